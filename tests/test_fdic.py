"""FDIC's state and rules without a training loop: the inertia rule and its μ = 0 ablation, the
warm-up and joint-phase TA updates, resumable accumulation, and the TA's own RNG."""

from __future__ import annotations

import pytest
import torch

from pipeline import losses as L
from pipeline.fdic import Fdic, FdicConfig, build_fdic, half_life_steps, inertia_update, update_ema


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw: object) -> FdicConfig:
    base = dict(hidden_dim=16, num_heads=4, synergy=True, score_heads=1, dropout=0.2, lr=1e-2, joint_lr=1e-3,
                accum_steps=4, mu=0.5, seed=0)
    base.update(kw)
    return FdicConfig(**base)  # type: ignore[arg-type]


def _fdic(**kw: object) -> Fdic:
    emb = torch.randn(12, 10, generator=torch.Generator().manual_seed(5))
    return build_fdic(emb, _cfg(**kw), torch.device("cpu"))


def _table(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n,), float("nan")), torch.full((n,), -1, dtype=torch.long)


# ---------------------------------------------------------------- the inertia rule


def test_first_visit_sets_the_loss_and_a_revisit_decays_per_student_step() -> None:
    ema, seen = _table()
    inertia_update(ema, seen, torch.tensor([0, 2]), torch.tensor([3.0, 5.0]), clock=0, mu=0.5)
    assert ema[0] == 3.0 and ema[2] == 5.0 and torch.isnan(ema[[1, 3]]).all()
    assert seen.tolist() == [0, -1, 0, -1]
    # 3 student steps later: the old value keeps 0.5^3 of its weight.
    inertia_update(ema, seen, torch.tensor([0]), torch.tensor([1.0]), clock=3, mu=0.5)
    assert float(ema[0]) == pytest.approx(0.125 * 3.0 + 0.875 * 1.0)
    assert seen[0] == 3
    # A revisit in the same step counts as one step, not zero.
    inertia_update(ema, seen, torch.tensor([2]), torch.tensor([1.0]), clock=0, mu=0.5)
    assert float(ema[2]) == pytest.approx(0.5 * 5.0 + 0.5 * 1.0)


def test_mu_zero_is_the_instantaneous_loss() -> None:
    ema, seen = _table()
    for clock, loss in [(0, 4.0), (0, 3.0), (1, 2.5), (5, 0.7)]:  # the same-step revisit included
        inertia_update(ema, seen, torch.tensor([1]), torch.tensor([loss]), clock=clock, mu=0.0)
        assert float(ema[1]) == pytest.approx(loss, abs=1e-7)


def test_inertia_follows_a_loss_that_changes() -> None:
    """The paper-scale run: 48 steps, a rationale revisited every 15 steps (4 visits), its loss
    falling 3 -> 1 as the student learns. L̄ must end near the current loss, not near the
    frozen student's first loss, which a per-visit μ = 0.9 kept 73% of."""
    ema, seen = _table(1)
    visits = [0, 15, 30, 45]
    loss = {t: 3.0 - 2.0 * t / 45 for t in visits}
    for t in visits:
        inertia_update(ema, seen, torch.tensor([0]), torch.tensor([loss[t]]), clock=t, mu=0.9)
    assert abs(float(ema[0]) - loss[45]) < 0.3 * (loss[30] - loss[45])
    # The old per-visit rule on the same visits stays far behind.
    old = loss[0]
    for t in visits[1:]:
        old = 0.9 * old + 0.1 * loss[t]
    assert old - loss[45] > 1.0
    assert half_life_steps(0.9) == pytest.approx(6.58, abs=0.01) and half_life_steps(0.0) == 0.0


def test_inertia_refuses_a_rationale_twice_in_one_update() -> None:
    ema, seen = _table()
    with pytest.raises(ValueError, match="twice"):
        inertia_update(ema, seen, torch.tensor([1, 1]), torch.tensor([1.0, 2.0]), clock=0, mu=0.5)


def test_update_ema_returns_the_batch_grid_of_the_smoothed_losses() -> None:
    fdic = _fdic(mu=0.0)
    path_ids = torch.tensor([[3, 7, -1], [5, -1, -1]])
    mask = path_ids >= 0
    losses = torch.tensor([[1.0, 2.0, 99.0], [4.0, 99.0, 99.0]])
    grid = update_ema(fdic, path_ids, mask, losses, clock=2, slots=6, gather=lambda t: t)
    assert grid.tolist() == [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]
    assert fdic.seen_at[[3, 5, 7]].tolist() == [2, 2, 2] and int((fdic.seen_at >= 0).sum()) == 3


# ---------------------------------------------------------------- the two phases


def _meta(fdic: Fdic, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    path_ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    return L.listnet_kl(fdic.scores(path_ids, mask, train=True), torch.rand(2, 3, generator=g) * 3, mask, 0.5)


def _params(fdic: Fdic) -> list[torch.Tensor]:
    return [p.detach().clone() for p in fdic.ta.parameters()]


def test_warmup_steps_every_micro_batch_at_ta_lr_then_joint_lr() -> None:
    fdic = _fdic()
    assert fdic.opt.param_groups[0]["lr"] == 1e-2
    before = _params(fdic)
    fdic.warmup_step(_meta(fdic, 0), None)
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(fdic)))
    assert all(p.grad is None or not p.grad.any() for p in fdic.ta.parameters())  # cleared after the step
    fdic.start_joint()
    assert [g["lr"] for g in fdic.opt.param_groups] == [1e-3]


def test_joint_phase_steps_the_ta_every_accum_steps_micro_batches() -> None:
    fdic = _fdic(accum_steps=4)
    fdic.start_joint()
    stepped = []
    for micro in range(10):
        before = _params(fdic)
        did = fdic.joint_micro(_meta(fdic, micro), micro, None)
        moved = any(not torch.equal(a, b) for a, b in zip(before, _params(fdic)))
        assert did == moved
        stepped.append(did)
    assert [i for i, s in enumerate(stepped) if s] == [3, 7]


def test_joint_accumulation_is_the_mean_of_the_window() -> None:
    """Four accumulated micro-batches step the TA like one step on their mean meta loss."""
    a, b = _fdic(accum_steps=4), _fdic(accum_steps=4)
    for f in (a, b):
        f.start_joint()
    for micro in range(4):
        a.joint_micro(_meta(a, micro), micro, None)
    # b: the same dropout draws, summed into one backward.
    total = sum(_meta(b, micro) for micro in range(4)) / 4
    total.backward()
    b.step(None)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_params(a), _params(b)))


def test_pending_gradients_and_rng_survive_a_checkpoint() -> None:
    """Stop after 3 of 4 accumulated micro-batches, restore into a fresh Fdic, finish the window:
    the same TA as without the stop (finding 1: the old loop restarted its counter and lost the
    pending gradients)."""
    straight = _fdic(accum_steps=4)
    straight.start_joint()
    for micro in range(6):
        straight.joint_micro(_meta(straight, micro), micro, None)

    first = _fdic(accum_steps=4)
    first.start_joint()
    for micro in range(3):
        first.joint_micro(_meta(first, micro), micro, None)
    state, pending = first.state_dict(), first.pending_grads()
    assert any(g is not None and g.abs().sum() > 0 for g in pending)

    resumed = _fdic(accum_steps=4)
    resumed.load_state_dict(state)
    resumed.load_pending_grads(pending)
    for micro in range(3, 6):
        resumed.joint_micro(_meta(resumed, micro), micro, None)
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(_params(straight), _params(resumed)))
    assert torch.equal(straight.rng.get_state(), resumed.rng.get_state())


# ---------------------------------------------------------------- RNG isolation


def test_the_ta_never_draws_from_the_global_rng() -> None:
    """Building the TA, training-mode scores with dropout and TA steps leave torch's global RNG
    where it was, so the student's dropout masks do not depend on the method."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    fdic = _fdic(dropout=0.5)
    fdic.warmup_step(_meta(fdic, 0), None)
    fdic.start_joint()
    fdic.joint_micro(_meta(fdic, 1), 0, None)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_ta_is_seeded_and_its_dropout_is_live() -> None:
    a, b, c = _fdic(seed=3), _fdic(seed=3), _fdic(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))
    assert not all(torch.equal(x, y) for x, y in zip(_params(a), _params(c)))
    path_ids, mask = torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool)
    s1, s2 = a.scores(path_ids, mask, train=True), a.scores(path_ids, mask, train=True)
    assert not torch.allclose(s1, s2)  # dropout draws new masks
    assert torch.allclose(s1, b.scores(path_ids, mask, train=True))  # ... from the seeded generator
    assert torch.equal(a.scores(path_ids, mask, train=False), a.scores(path_ids, mask, train=False))


def test_building_the_ta_does_not_reseed_the_accelerator_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the student's dropout draws from the CUDA RNG: seeding the TA must not touch it
    (torch.manual_seed would reseed every CUDA generator)."""
    def no_cuda_seed(seed: int) -> None:
        raise AssertionError("the TA reseeded the CUDA RNG")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", no_cuda_seed)
    monkeypatch.setattr(torch.cuda, "manual_seed", no_cuda_seed)
    _fdic()
