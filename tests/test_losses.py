"""MIND's losses and selection on literal tensors, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import losses as L


def test_path_token_ce_is_a_per_path_token_mean() -> None:
    # Two paths, vocab 3. Path 0 has targets at t=1,2; path 1 only at t=2.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                           [[5.0, 5.0, 5.0], [9.0, 9.0, 9.0], [0.0, 0.0, math.log(2.0)]]])
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 2]])
    ce = L.path_token_ce(logits, labels)
    lse1 = math.log(math.exp(2) + 2)
    lse2 = math.log(math.e + 2)
    want0 = ((lse1 - 2.0) + (lse2 - 1.0)) / 2
    want1 = math.log(4.0) - math.log(2.0)  # p(2) = 2 / (1 + 1 + 2)
    assert ce.tolist() == pytest.approx([want0, want1], rel=1e-6)


def test_path_token_ce_refuses_a_path_without_targets() -> None:
    with pytest.raises(ValueError, match="no target tokens"):
        L.path_token_ce(torch.zeros(1, 2, 3), torch.tensor([[-100, -100]]))


def test_listnet_kl_zero_when_rankings_imply_the_same_distribution() -> None:
    mask = torch.tensor([[True, True, True, False]])
    losses = torch.tensor([[0.5, 1.0, 2.0, 99.0]])
    scores = -losses + 3.0  # a constant shift: identical softmax
    assert float(L.listnet_kl(scores, losses, mask, tau=1.0)) == pytest.approx(0.0, abs=1e-7)
    # Same order but different spread: distributions differ, KL > 0.
    assert float(L.listnet_kl(-2 * losses, losses, mask, tau=1.0)) > 1e-3
    # Reversed ranking: clearly positive.
    assert float(L.listnet_kl(losses, losses, mask, tau=1.0)) > 0.5


def test_listnet_kl_matches_hand_computation_and_ignores_single_path_questions() -> None:
    scores = torch.tensor([[0.0, math.log(3.0)], [7.0, 0.0]])
    losses = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    mask = torch.tensor([[True, True], [True, False]])  # question 1 has one path: no ranking
    p = [0.25, 0.75]
    want = p[0] * math.log(p[0] / 0.5) + p[1] * math.log(p[1] / 0.5)
    assert float(L.listnet_kl(scores, losses, mask, tau=1.0)) == pytest.approx(want, rel=1e-6)


def test_listnet_kl_gradient_reaches_scores_not_losses() -> None:
    scores = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    losses = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    L.listnet_kl(scores, losses, torch.ones(1, 3, dtype=torch.bool), tau=0.5).backward()
    assert scores.grad is not None and float(scores.grad.abs().sum()) > 0
    assert losses.grad is None


def test_selection_and_weights_match_hand_computed_values() -> None:
    s = torch.tensor([[math.log(4.0), math.log(2.0), 0.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    # p = softmax over real paths = [4, 2, 1] / 7; max = 4/7.
    sel = L.select_paths(s, mask, beta=0.5, tau_student=1.0)  # keep p >= 2/7
    assert sel.tolist() == [[True, True, False, False]]
    alpha = L.path_weights(s, sel, tau_student=1.0)
    assert alpha.tolist()[0] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    assert L.select_paths(s, mask, beta=0.0, tau_student=1.0).tolist() == [[True, True, True, False]]
    assert L.select_paths(s, mask, beta=1.0, tau_student=1.0).tolist() == [[True, False, False, False]]
    # A temperature of 2 flattens p to [2, √2, 1]/(3+√2): β = 0.6 now keeps the second path only
    # if √2/2 >= 0.6 (yes) and the third if 1/2 >= 0.6 (no).
    sel2 = L.select_paths(s, mask, beta=0.6, tau_student=2.0)
    assert sel2.tolist() == [[True, True, False, False]]
    a2 = L.path_weights(s, sel2, tau_student=2.0)
    assert a2.tolist()[0][:2] == pytest.approx([2 / (2 + math.sqrt(2)), math.sqrt(2) / (2 + math.sqrt(2))])


def test_weights_are_detached() -> None:
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert not L.path_weights(s, mask, 1.0).requires_grad


def test_jsd_symmetric_zero_and_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 7, generator=g) * 3, dim=-1)
    q = torch.log_softmax(torch.randn(5, 7, generator=g) * 3, dim=-1)
    assert torch.allclose(L.jsd(p, q), L.jsd(q, p), atol=1e-7)
    assert torch.allclose(L.jsd(p, p), torch.zeros(5), atol=1e-7)
    assert float(L.jsd(p, q).min()) > 0
    # Disjoint supports reach the bound ln 2; nothing exceeds it.
    a = torch.log(torch.tensor([1.0, 1e-30, 1e-30]))
    b = torch.log(torch.tensor([1e-30, 1.0, 1e-30]))
    assert float(L.jsd(a, b)) == pytest.approx(math.log(2.0), rel=1e-5)
    assert float(L.jsd(p, q).max()) <= math.log(2.0) + 1e-7


def test_jsd_hand_computed() -> None:
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])
    m = torch.tensor([0.75, 0.25])
    want = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * (1.0 * math.log(1.0 / 0.75))
    got = L.jsd(p.log(), torch.log(q.clamp_min(1e-38)))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_pairwise_jsd_matrix() -> None:
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(3, 4, 6, generator=g), dim=-1)
    m = L.pairwise_jsd(lp)
    assert m.shape == (3, 3)
    assert torch.allclose(m, m.T) and torch.all(m.diagonal() == 0)
    assert float(m[0, 2]) == pytest.approx(float(L.jsd(lp[0], lp[2]).mean()), rel=1e-6)
    assert torch.all(L.pairwise_jsd(lp[:1]) == 0)


def test_student_loss_hand_computed() -> None:
    ce = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    alpha = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    j0 = torch.tensor([[0.0, 0.2, 0.4], [0.2, 0.0, 0.6], [0.4, 0.6, 0.0]])
    j1 = torch.zeros(1, 1)
    total, wce, cons = L.student_loss(ce, alpha, [j0, j1], lam=2.0)
    assert float(wce) == pytest.approx((1.5 + 4.0) / 2)
    assert float(cons) == pytest.approx((0.25 * 0.2 + 0.0) / 2)  # only the pair (0, 1) is in I
    assert float(total) == pytest.approx(float(wce) + 2.0 * float(cons))


def test_padding_slot_cannot_change_the_student_loss() -> None:
    alpha = torch.tensor([[0.25, 0.75, 0.0]])
    j = torch.rand(3, 3)
    j = (j + j.T).fill_diagonal_(0)
    a = L.student_loss(torch.tensor([[1.0, 2.0, 5.0]]), alpha, [j], 1.0)[0]
    j2 = j.clone()
    j2[2, :] = j2[:, 2] = 123.0
    b = L.student_loss(torch.tensor([[1.0, 2.0, float("nan")]]), alpha, [j2], 1.0)[0]
    assert float(a) == pytest.approx(float(b))


def test_uniform_weights_and_entropy() -> None:
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    w = L.uniform_weights(mask)
    assert w.tolist() == [[0.5, 0.5, 0.0, 0.0], [0.25] * 4]
    assert float(L.alpha_entropy(w)) == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_spearman() -> None:
    assert L.spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert L.spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # Ties get average ranks: x ranks [0, 1.5, 1.5] -> centred [-1, .5, .5]; y [0, 1, 2] -> [-1, 0, 1].
    want = 1.5 / (math.sqrt(1.5) * math.sqrt(2.0))
    got = L.spearman(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert got == pytest.approx(want, rel=1e-6)
    assert math.isnan(L.spearman(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])))
    s = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.0, 0.0]])
    t = torch.tensor([[1.0, 2.0, 9.0], [1.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert L.mean_question_spearman(s, t, mask) == pytest.approx(0.0)
