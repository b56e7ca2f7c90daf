"""FDIC's state and rules without a training loop: the inertia rule and its μ = 0 ablation, the
warm-up and joint-phase TA steps (each a re-fit of the inertia table), resumable TA state, and
the TA's own RNG."""

from __future__ import annotations

import pytest
import torch

from pipeline import losses as L
from pipeline.config import ConfigError
from pipeline.fdic import Fdic, TaConfig, build_fdic, half_life_steps, inertia_update, update_ema


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw: object) -> TaConfig:
    base = dict(hidden=16, heads=4, synergy=True, score_heads=1, dropout=0.2, lr=1e-2, joint_lr=1e-3,
                accum_steps=4, updates=3, mu=0.5, tau=0.5)
    base.update(kw)
    return TaConfig(**base)  # type: ignore[arg-type]


# Four questions of three paths each: path ids 0..11.
QUESTIONS = torch.arange(12).view(4, 3)


def _fdic(seed: int = 0, **kw: object) -> Fdic:
    emb = torch.randn(12, 11, generator=torch.Generator().manual_seed(5))
    return build_fdic(emb, QUESTIONS, _cfg(**kw), seed, torch.device("cpu"))


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


def _observe(fdic: Fdic, questions: list[int], clock: int, seed: int) -> None:
    """Random per-path losses for ``questions`` into the inertia table."""
    ids = QUESTIONS[questions]
    losses = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) * 3
    update_ema(fdic, ids, ids >= 0, losses, clock, slots=ids.numel(), gather=lambda t: t)


def _params(fdic: Fdic) -> list[torch.Tensor]:
    return [p.detach().clone() for p in fdic.ta.parameters()]


def test_a_ta_step_fits_every_question_with_two_smoothed_losses() -> None:
    fdic = _fdic()
    assert fdic.warmup_step(None) is None  # nothing seen yet: no step
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    # question 0 fully seen, question 1 with one path only: a single loss ranks nothing
    update_ema(fdic, ids, torch.tensor([[True, True, True], [True, False, False]]), torch.ones(2, 3), 0, 6,
               lambda t: t)
    table, mask = fdic.table()
    assert table.tolist() == [[0, 1, 2]] and mask.all()
    update_ema(fdic, torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2), 0, 2, lambda t: t)
    assert fdic.table()[0].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_warmup_steps_at_lr_and_joint_steps_at_joint_lr_every_accum_steps() -> None:
    fdic = _fdic(accum_steps=4)
    _observe(fdic, [0, 1], 0, seed=0)
    before = _params(fdic)
    assert fdic.warmup_step(None) is not None
    assert fdic.opt.param_groups[0]["lr"] == 1e-2
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(fdic)))
    assert all(p.grad is None or not p.grad.any() for p in fdic.ta.parameters())  # cleared after the step
    stepped = []
    for micro in range(10):
        _observe(fdic, [micro % 4], micro, seed=micro)
        before = _params(fdic)
        did = fdic.joint_micro(micro, None)
        assert did == any(not torch.equal(a, b) for a, b in zip(before, _params(fdic)))
        stepped.append(did)
    assert [i for i, s in enumerate(stepped) if s] == [3, 7]
    assert fdic.opt.param_groups[0]["lr"] == 1e-3


def test_a_ta_step_is_updates_adamw_steps_on_the_whole_table() -> None:
    """The TA step equals ``updates`` hand-made AdamW steps of the ListNet-KL meta loss on every
    smoothed loss in the table, with the TA's own dropout draws."""
    a, b = _fdic(updates=3), _fdic(updates=3)
    for f in (a, b):
        _observe(f, [0, 1, 2], 0, seed=1)
    a.warmup_step(None)
    ids, mask = b.table()
    for _ in range(3):
        meta = L.listnet_kl(b.scores(ids, mask, train=True), b.smoothed(ids, mask), mask, 0.5)
        meta.backward()
        b.opt.step()
        b.opt.zero_grad()
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_params(a), _params(b)))


def test_the_ta_state_survives_a_checkpoint() -> None:
    """Stop mid-window, restore into a fresh Fdic, go on: the same TA as without the stop."""
    def joint(f: Fdic, micros: range) -> None:
        for micro in micros:
            _observe(f, [micro % 4], micro, seed=micro)
            f.joint_micro(micro, None)

    straight = _fdic(accum_steps=4)
    joint(straight, range(10))
    first = _fdic(accum_steps=4)
    joint(first, range(5))
    resumed = _fdic(accum_steps=4)
    resumed.load_state_dict(first.state_dict())
    joint(resumed, range(5, 10))
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(_params(straight), _params(resumed)))
    assert torch.equal(straight.rng.get_state(), resumed.rng.get_state())
    assert torch.equal(straight.ema, resumed.ema)


# ---------------------------------------------------------------- RNG isolation


def test_the_ta_never_draws_from_the_global_rng() -> None:
    """Building the TA, training-mode scores with dropout and TA steps leave torch's global RNG
    where it was, so the student's dropout masks do not depend on the method."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    fdic = _fdic(dropout=0.5, accum_steps=1)
    _observe(fdic, [0, 1], 0, seed=0)
    fdic.warmup_step(None)
    fdic.joint_micro(0, None)
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


# ---------------------------------------------------------------- the settings


@pytest.mark.parametrize("key, value", [("hidden", 0), ("heads", 0), ("heads", 3), ("score_heads", 0),
                                        ("dropout", 1.0), ("lr", 0.0), ("warmup_steps", -1), ("joint_lr", -1e-4),
                                        ("accum_steps", 0), ("updates", 0), ("mu", 1.0), ("mu", -0.1), ("tau", 0.0)])
def test_a_bad_ta_setting_is_an_error_naming_its_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^distill\.ta\.{key} {value} must "):
        TaConfig(**{key: value})  # type: ignore[arg-type]
