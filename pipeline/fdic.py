"""Feedback-Driven Inertia Calibration (FDIC): the Teaching Assistant's training state and rules.

The distill stage runs the loop; this module holds what FDIC keeps between micro-batches and
how it changes, so each rule is testable without a training loop:

- ``TaConfig``: the TA's and FDIC's settings (params.yaml's ``distill.ta``);
- ``Fdic``: the TA, its optimiser, its own RNG, the frozen path embeddings, the inertia
  table ``L̄`` (one entry per rationale) and the clock of each rationale's last visit;
- ``inertia_update``: the smoothing rule for ``L̄`` (below);
- ``update_ema``: that rule applied to one micro-batch, gathered over processes;
- ``Fdic.fit``: one TA step. The TA re-fits the whole inertia table: ``updates`` full-batch
  AdamW steps of the ListNet-KL meta loss over every question with at least two smoothed
  losses, not one gradient step on the latest micro-batch. Warm-up: a TA step after every
  micro-batch, at ``lr``, while the student is frozen. Joint: a TA step after every
  ``accum_steps``-th student micro-batch, at ``joint_lr``. Which micro-batches step is a
  function of the micro-batch index, so a resumed run steps the TA where an uninterrupted one
  does.

Why a re-fit of the table. The TA must fit its target, s ≈ −L̄ + const, or α stays uniform
and ``mind`` trains like ``mcc``. One gradient step per window gave the TA 10 optimizer steps in
a 24-step run: its scores reached a quarter of the scale of −L̄ and α kept 99 % of its entropy.
The table holds every smoothed loss seen so far (no extra student forward pass), so each TA
step can afford many updates; "slow" stays what FDIC means by it: the TA follows ``L̄``, the
inertia-filtered losses, and steps at a lower rate in the joint phase.

Inertia, the choice made here. ``L̄`` forgets per *student optimizer step*, not per visit:

    r = μ ** max(1, t - t_last)        L̄ <- r·L̄ + (1 - r)·L

where ``t`` counts the student's optimizer steps (0 during the warm-up) and ``t_last`` is the
clock of the rationale's previous visit. Why: a rationale is revisited once per epoch, only
2-4 times in a run, so a per-visit ``μ = 0.9`` left 73-81% of ``L̄`` on the first visit, made
while the student was still frozen, and the TA ranked paths by the untrained student's losses.
Counted in steps, the memory is about ``1/(1-μ)`` steps (half-life ``ln 2 / -ln μ``) whatever
the epoch length, so ``μ`` is set against the run's ``max_steps``. ``μ = 0`` gives ``L̄ = L``
at every visit: the instantaneous-loss ablation. A visit counts as at least one step so that
``μ = 0`` stays exact when a rationale seen in the warm-up (student frozen, ``t = 0``) comes
back in the first joint step.

RNG: the TA's initialisation and its dropout draw from their own seeded generators, never
from torch's global RNG, so ``mind`` and the baselines draw identical student RNG (LoRA
dropout masks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipeline.config import check
from pipeline.losses import listnet_kl
from pipeline.ta import TeachingAssistant

# The TA's dropout generator is seeded away from its initialisation seed.
_DROPOUT_SEED_OFFSET = 1_000_003


def _setting(default: Any, help: str) -> Any:
    """A field with its help text, stored as stages/cli.py's ``field`` stores it (pipeline does not
    import the stages)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TaConfig:
    """The Teaching Assistant and its FDIC training: ``distill.ta`` in params.yaml, taken whole by
    ``build_fdic``. Every default is params.yaml's value."""

    # the network (pipeline/ta.py)
    hidden: int = _setting(256, "TA hidden size")
    heads: int = _setting(4, "TA synergy attention heads (must divide hidden)")
    score_heads: int = _setting(1, "TA scoring heads, each with its own hidden layer (averaged into one score)")
    dropout: float = _setting(0.1, "TA dropout")
    synergy: bool = _setting(True, "TA synergy layer: self-attention across a question's paths (false: the "
                                   "mind-no-synergy ablation)")
    # its training
    lr: float = _setting(1e-3, "TA learning rate in the warm-up")
    warmup_steps: int = _setting(4, "FDIC warm-up: TA-only steps against the frozen student")
    joint_lr: float = _setting(1e-4, "TA learning rate in the joint phase (much smaller than lr)")
    accum_steps: int = _setting(4, "joint phase: a TA step every this many student micro-batches")
    updates: int = _setting(128, "AdamW updates per TA step, each over every question's smoothed losses L̄ so far "
                                 "(no extra student forward pass): enough for the TA to fit its target")
    mu: float = _setting(0.85, "FDIC inertia μ per student optimizer step: a revisit after Δ steps does "
                               "L̄ <- r·L̄ + (1-r)·L, r = μ^max(1, Δ); half-life ln2/-ln μ steps: set it against "
                               "max_steps (0: the instantaneous loss, the mind-ema0 ablation)")
    tau: float = _setting(0.5, "τ of the ListNet-KL meta loss (in per-token loss units: nats)")

    def __post_init__(self) -> None:
        check(self.hidden >= 1, f"distill.ta.hidden {self.hidden} must be >= 1")
        check(self.heads >= 1 and self.hidden % self.heads == 0,
              f"distill.ta.heads {self.heads} must be >= 1 and divide distill.ta.hidden {self.hidden}")
        check(self.score_heads >= 1, f"distill.ta.score_heads {self.score_heads} must be >= 1")
        check(0.0 <= self.dropout < 1.0, f"distill.ta.dropout {self.dropout} must be in [0, 1)")
        check(self.lr > 0, f"distill.ta.lr {self.lr} must be positive")
        check(self.warmup_steps >= 0, f"distill.ta.warmup_steps {self.warmup_steps} must be >= 0")
        check(self.joint_lr > 0, f"distill.ta.joint_lr {self.joint_lr} must be positive")
        check(self.accum_steps >= 1, f"distill.ta.accum_steps {self.accum_steps} must be >= 1")
        check(self.updates >= 1, f"distill.ta.updates {self.updates} must be >= 1")
        check(0.0 <= self.mu < 1.0, f"distill.ta.mu {self.mu} must be in [0, 1)")
        check(self.tau > 0, f"distill.ta.tau {self.tau} must be positive")


def half_life_steps(mu: float) -> float:
    """Student optimizer steps after which a loss keeps half its weight in ``L̄`` (0 for μ = 0)."""
    return 0.0 if mu == 0.0 else math.log(0.5) / math.log(mu)


@contextmanager
def rng_fork(device: torch.device) -> Iterator[None]:
    """Run a block without moving torch's global RNG (CPU, and ``device`` when it is CUDA)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@torch.no_grad()
def inertia_update(ema: Tensor, seen_at: Tensor, ids: Tensor, losses: Tensor, clock: int, mu: float) -> None:
    """``L̄ <- r·L̄ + (1-r)·L`` with ``r = μ^max(1, clock - seen_at)`` for rationales ``ids``, in place.

    A first visit (``seen_at < 0``) sets ``L̄ = L``. ``ids`` must be unique: two values for one
    rationale in one update would race.
    """
    if ids.numel() != torch.unique(ids).numel():
        raise ValueError("inertia_update: a rationale appears twice in one update")
    old, last = ema[ids], seen_at[ids]
    steps = (clock - last).clamp_min(1).to(old.dtype)
    keep = torch.where(last < 0, torch.zeros_like(old), torch.pow(torch.full_like(old, mu), steps))
    ema[ids] = keep * torch.nan_to_num(old) + (1.0 - keep) * losses.to(old.dtype)
    seen_at[ids] = clock


@dataclass
class Fdic:
    """MIND's Teaching Assistant state. Every process holds a full, identical copy (the TA is not
    wrapped by accelerate; the inertia table is gathered over processes, and a TA step averages
    its gradients)."""

    cfg: TaConfig
    ta: TeachingAssistant
    opt: torch.optim.Optimizer
    rng: torch.Generator  # the TA's dropout masks
    emb: Tensor  # [paths, 2·d] frozen encoder embeddings
    questions: Tensor  # [questions, K] path ids of each question (-1: padding)
    ema: Tensor  # [paths] L̄, NaN until the first visit
    seen_at: Tensor  # [paths] student step of the last visit, -1 until the first

    def scores(self, path_ids: Tensor, mask: Tensor, train: bool) -> Tensor:
        """``[Q, K]`` scores of the paths ``path_ids`` (padding: any id, masked out)."""
        self.ta.train(train)
        dev = self.emb.device
        return self.ta(self.emb[path_ids.clamp_min(0).to(dev)], mask.to(dev), self.rng)

    def smoothed(self, path_ids: Tensor, mask: Tensor) -> Tensor:
        """``[Q, K]`` grid of ``L̄`` (padding slots 0)."""
        dev = self.ema.device
        m = mask.to(dev)
        grid = torch.zeros(m.shape, device=dev)
        grid[m] = self.ema[path_ids.to(dev)[m]]
        return grid

    def table(self) -> tuple[Tensor, Tensor]:
        """(path ids ``[Q', K]``, mask ``[Q', K]``) of the questions with at least two smoothed
        losses: what a TA step fits. The mask keeps only the paths already seen."""
        ids = self.questions
        seen = (ids >= 0) & (self.seen_at[ids.clamp_min(0)] >= 0)
        rows = seen.sum(dim=1) >= 2
        return ids[rows], seen[rows]

    def fit(self, lr: float, average: Callable[[Tensor], Tensor] | None) -> float | None:
        """One TA step: ``updates`` AdamW steps at ``lr`` of the meta loss over the whole table
        (gradients averaged over processes by ``average``; None for one process). Returns the
        last meta loss (None when no question has two smoothed losses yet)."""
        ids, mask = self.table()
        if len(ids) == 0:
            return None
        for g in self.opt.param_groups:
            g["lr"] = lr
        target = self.smoothed(ids, mask)
        meta = torch.zeros(())
        for _ in range(self.cfg.updates):
            meta = listnet_kl(self.scores(ids, mask, train=True), target, mask.to(target.device), self.cfg.tau)
            meta.backward()
            if average is not None:
                for p in self.ta.parameters():
                    if p.grad is not None:
                        p.grad = average(p.grad)
            self.opt.step()
            self.opt.zero_grad()
        return float(meta.detach())

    def warmup_step(self, average: Callable[[Tensor], Tensor] | None) -> float | None:
        """Warm-up: a TA step after every micro-batch, at ``lr``."""
        return self.fit(self.cfg.lr, average)

    def joint_micro(self, micro: int, average: Callable[[Tensor], Tensor] | None) -> bool:
        """Joint phase, after micro-batch ``micro`` (0-based, counted from the first joint
        micro-batch): a TA step at ``joint_lr`` after every ``accum_steps``-th. Returns whether
        the TA stepped."""
        if (micro + 1) % self.cfg.accum_steps:
            return False
        self.fit(self.cfg.joint_lr, average)
        return True

    def state_dict(self) -> dict[str, Any]:
        """The state every process shares: TA, optimiser, RNG and the inertia table."""
        return {"ta": self.ta.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.get_state(),
                "ema": self.ema.cpu(), "seen_at": self.seen_at.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ta.load_state_dict(state["ta"])
        self.opt.load_state_dict(state["opt"])
        self.rng.set_state(state["rng"])
        self.ema.copy_(state["ema"].to(self.ema.device))
        self.seen_at.copy_(state["seen_at"].to(self.seen_at.device))


def build_fdic(emb: Tensor, questions: Tensor, cfg: TaConfig, seed: int, device: torch.device) -> Fdic:
    """A fresh TA (initialised from ``seed`` without touching the global RNG) over the path
    embeddings ``emb [paths, 2·d]`` of the questions ``questions [Q, K]`` (path ids, -1 padding),
    its AdamW at the warm-up ``lr`` and an empty ``L̄``."""
    with torch.random.fork_rng(devices=[]):  # built on CPU, then moved
        # The CPU generator only: torch.manual_seed would also reseed CUDA, the student's RNG on a GPU.
        torch.default_generator.manual_seed(seed)
        ta = TeachingAssistant(emb.shape[1], cfg.hidden, cfg.heads, cfg.synergy, cfg.score_heads, cfg.dropout)
    ta = ta.to(device)
    rng = torch.Generator().manual_seed(seed + _DROPOUT_SEED_OFFSET)
    n = emb.shape[0]
    return Fdic(cfg, ta, torch.optim.AdamW(ta.parameters(), lr=cfg.lr), rng, emb.to(device), questions.to(device),
                torch.full((n,), float("nan"), device=device), torch.full((n,), -1, dtype=torch.long, device=device))


def update_ema(fdic: Fdic, path_ids: Tensor, mask: Tensor, losses: Tensor, clock: int, slots: int,
               gather: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``inertia_update`` to every rationale any process saw in this micro-batch.

    ``path_ids``/``mask``/``losses`` are this process's ``[Q, K]`` grids; ``slots`` (>= its
    real paths) pads them to one size so ``gather`` (accelerate's, or the identity for one
    process) can concatenate all processes' values, keeping every copy of ``L̄`` identical.
    Returns this process's ``[Q, K]`` grid of the updated ``L̄``.
    """
    dev = fdic.ema.device
    m = mask.to(dev)
    local = path_ids.to(dev)[m]
    if len(local) > slots:
        raise ValueError(f"update_ema: {len(local)} paths for {slots} slots")
    ids = torch.full((slots,), -1, dtype=torch.long, device=dev)
    vals = torch.zeros(slots, device=dev)
    ids[: len(local)] = local
    vals[: len(local)] = losses.detach().float().to(dev)[m]
    ids, vals = gather(ids), gather(vals)
    seen = ids >= 0
    inertia_update(fdic.ema, fdic.seen_at, ids[seen], vals[seen], clock, fdic.cfg.mu)
    return fdic.smoothed(path_ids, mask)
