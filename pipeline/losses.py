"""MIND's losses and the TA-driven selection, as plain typed functions on tensors.

Shapes: ``Q`` questions, ``K`` path slots per question (padded; ``mask[q, k]`` is True for a
real path), ``P`` real paths in a batch, ``T`` token positions, ``V`` vocabulary.

- ``path_token_ce``: each path's token-mean cross-entropy (its own length, not the batch's).
- ``listnet_kl``: the TA's meta loss ``KL(softmax(s/τ) || softmax(-L̄/τ))`` per question.
- ``select_paths`` / ``path_weights``: the selected set ``I`` and the weights ``α``.
- ``pairwise_jsd``: Jensen-Shannon divergence between paths' answer-suffix distributions.
- ``student_loss``: ``Σ_I α_k CE_k + λ Σ_{i<j∈I} α_i α_j JSD_ij``, averaged over questions.
- ``spearman``: rank correlation, to log how well the TA tracks the student.

Selection rule (the paper leaves the scale of ``s`` open): the threshold is applied to the
softmax probabilities ``p = softmax_valid(s / τ_student)``, i.e.
``I = {k : p_k >= β · max_j p_j}``, which is ``s_k >= max(s) + τ_student · ln β``. The
argmax is always selected, ``β = 0`` selects every real path and ``β = 1`` only the best.
The weights are then ``α = softmax_I(s / τ_student)``, which equals ``p`` renormalised over
``I``. Both are computed without gradient: the student's loss never trains the TA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def masked_softmax(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over the entries where ``mask`` is True; masked entries get probability 0.

    Every row must have at least one True entry (a question always has a path).
    """
    x = x.masked_fill(~mask, float("-inf"))
    return torch.softmax(x, dim=dim).masked_fill(~mask, 0.0)


def masked_log_softmax(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Log-softmax over the True entries; masked entries are 0 (use with a mask afterwards)."""
    x = x.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(x, dim=dim).masked_fill(~mask, 0.0)


def path_token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean cross-entropy of each path: ``[P, T, V]`` logits, ``[P, T]`` labels -> ``[P]``.

    ``logits[p, t]`` must already predict ``labels[p, t]`` (shifted by the caller);
    ``IGNORE_INDEX`` marks prompt and padding positions. Each path is averaged over its own
    target tokens, so long and short rationales count the same. Computed in float32.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    P, T, V = logits.shape
    tok = F.cross_entropy(logits.reshape(P * T, V).float(), labels.reshape(P * T), ignore_index=IGNORE_INDEX,
                          reduction="none").view(P, T)
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a path has no target tokens (its labels are all masked)")
    return tok.sum(dim=1) / counts


def listnet_kl(scores: Tensor, losses: Tensor, mask: Tensor, tau: float) -> Tensor:
    """Meta loss ``KL(softmax(s/τ) || softmax(-L̄/τ))``, averaged over questions.

    ``scores`` ``[Q, K]`` carry the TA's gradient; ``losses`` ``[Q, K]`` are the detached,
    inertia-filtered per-path losses (lower loss = more learnable now = should score higher).
    Questions with a single real path carry no ranking information and contribute 0; the
    mean is over questions with at least two paths (0, still differentiable, if none).
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    losses = losses.detach()
    log_p = masked_log_softmax(scores / tau, mask)
    log_q = masked_log_softmax(-losses / tau, mask)
    p = log_p.exp().masked_fill(~mask, 0.0)
    kl = (p * (log_p - log_q)).masked_fill(~mask, 0.0).sum(dim=-1)
    ranked = mask.sum(dim=-1) >= 2
    if not bool(ranked.any()):
        return scores.sum() * 0.0
    return kl[ranked].mean()


@torch.no_grad()
def select_paths(scores: Tensor, mask: Tensor, beta: float, tau_student: float) -> Tensor:
    """The selected set ``I = {k : p_k >= β · max p}`` with ``p = softmax_valid(s/τ_student)``.

    Returns a bool ``[Q, K]`` mask; the best path of each question is always selected.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    p = masked_softmax(scores.float() / tau_student, mask)
    top = p.max(dim=-1, keepdim=True).values
    return mask & (p >= beta * top)


@torch.no_grad()
def path_weights(scores: Tensor, selected: Tensor, tau_student: float) -> Tensor:
    """``α = softmax_I(s / τ_student)``: ``[Q, K]``, zero outside ``I``, detached, rows sum to 1."""
    return masked_softmax(scores.detach().float() / tau_student, selected)


def uniform_weights(mask: Tensor) -> Tensor:
    """Equal weights over each question's real paths (the uniform and mcc baselines)."""
    m = mask.float()
    return m / m.sum(dim=-1, keepdim=True)


def question_entropy(alpha: Tensor) -> Tensor:
    """``-Σ α log α`` per question ``[Q]`` (padding and unselected slots have α = 0 and add 0)."""
    return -(alpha * alpha.clamp_min(1e-12).log()).sum(dim=-1)


def alpha_entropy(alpha: Tensor) -> Tensor:
    """Mean over questions of ``-Σ α log α`` (0 for a single selected path)."""
    return question_entropy(alpha).mean()


def jsd(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions given as log-probs over the last
    dim. Symmetric, 0 for identical inputs, at most ln 2."""
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def pairwise_jsd(log_probs: Tensor) -> Tensor:
    """``[K, M, V]`` log-probs of K paths over M aligned answer-suffix positions -> ``[K, K]``.

    Entry ``(i, j)`` is the JSD between paths i and j averaged over the M positions; the
    matrix is symmetric with a zero diagonal. Only the upper triangle is computed.
    """
    K, M, _ = log_probs.shape
    out = log_probs.new_zeros(K, K)
    if K < 2 or M == 0:
        return out
    i, j = torch.triu_indices(K, K, offset=1, device=log_probs.device)
    d = jsd(log_probs[i], log_probs[j]).mean(dim=-1)  # [pairs]
    out = out.index_put((i, j), d)
    return out + out.T


def consistency_term(jsd_matrix: Tensor, alpha: Tensor) -> Tensor:
    """``Σ_{i<j} α_i α_j JSD_ij`` for one question (``α`` is 0 outside ``I``)."""
    w = alpha[:, None] * alpha[None, :]
    return torch.triu(w * jsd_matrix, diagonal=1).sum()


def student_loss(ce: Tensor, alpha: Tensor, jsd_matrices: list[Tensor] | None, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """The student's loss ``Σ_I α_k CE_k + λ Σ_{i<j∈I} α_i α_j JSD_ij``, mean over questions.

    ``ce`` and ``alpha`` are ``[Q, K]`` (padding slots must have ``α = 0``; their CE value is
    ignored), ``jsd_matrices`` holds one ``[K, K]`` matrix per question (or None when λ = 0
    and the term is not computed). Returns (total, weighted CE, consistency term), each a
    mean over questions; the consistency term is before the λ factor.
    """
    ce = torch.where(alpha > 0, ce, torch.zeros_like(ce))  # a padding slot's CE never enters
    weighted_ce = (alpha * ce).sum(dim=-1).mean()
    if jsd_matrices is None:
        cons = weighted_ce.new_zeros(())
    else:
        if len(jsd_matrices) != alpha.shape[0]:
            raise ValueError(f"{len(jsd_matrices)} JSD matrices for {alpha.shape[0]} questions")
        cons = torch.stack([consistency_term(m, a[: m.shape[0]]) for m, a in zip(jsd_matrices, alpha)]).mean()
    return weighted_ce + lam * cons, weighted_ce, cons


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64, device=x.device)
    for v in torch.unique(x):
        tie = x == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors; NaN when either is constant or n < 2."""
    if x.numel() != y.numel():
        raise ValueError(f"spearman: {x.numel()} vs {y.numel()} values")
    if x.numel() < 2:
        return float("nan")
    rx, ry = _ranks(x.detach().double().cpu()), _ranks(y.detach().double().cpu())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float("nan") if denom == 0.0 else float((rx * ry).sum()) / denom


def mean_question_spearman(scores: Tensor, target: Tensor, mask: Tensor) -> float:
    """Mean over questions (with >= 2 paths and no constant side) of Spearman(scores, target)."""
    vals = []
    for s, t, m in zip(scores, target, mask):
        r = spearman(s[m], t[m])
        if not math.isnan(r):
            vals.append(r)
    return float("nan") if not vals else sum(vals) / len(vals)


def entropy_share(alpha: Tensor, mask: Tensor) -> Tensor:
    """``H(α) / ln K`` per question ``[Q]``: 1 for uniform weights over the ``K`` real paths, 0 for
    one path taking all the weight; NaN for a question with a single path (nothing to share)."""
    k = mask.sum(dim=-1).to(torch.float32)
    h = question_entropy(alpha.float().masked_fill(~mask, 0.0))
    return torch.where(k >= 2, h / k.clamp_min(2).log(), torch.full_like(h, float("nan")))


def _centered(x: Tensor, mask: Tensor) -> Tensor:
    """Each question's real entries minus their mean (padding 0)."""
    m = mask.to(torch.float64)
    x = x.double() * m
    return (x - x.sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp_min(1.0)) * m


def within_question_slope(x: Tensor, y: Tensor, mask: Tensor) -> float:
    """Least-squares slope of ``y`` on ``x`` within questions (both centred per question, then
    pooled): 1 when ``y = x + c_q``. NaN when ``x`` never varies inside a question."""
    cx, cy = _centered(x, mask), _centered(y, mask)
    den = float((cx * cx).sum())
    return float("nan") if den == 0.0 else float((cx * cy).sum()) / den


def within_question_corr(x: Tensor, y: Tensor, mask: Tensor) -> float:
    """Pearson correlation of ``x`` and ``y`` within questions (centred per question, then
    pooled). NaN when either never varies inside a question."""
    cx, cy = _centered(x, mask), _centered(y, mask)
    den = math.sqrt(float((cx * cx).sum()) * float((cy * cy).sum()))
    return float("nan") if den == 0.0 else float((cx * cy).sum()) / den


def length_scores(tokens: Tensor, mask: Tensor) -> Tensor:
    """The length baseline's scores ``s_k = -ln(tokens_k)`` (padding 0): shorter scores higher, and
    with ``α = softmax(s / τ_student)`` a path's weight scales as ``tokens^(-1/τ_student)``."""
    return (-tokens.float().clamp_min(1.0).log()).masked_fill(~mask, 0.0)
