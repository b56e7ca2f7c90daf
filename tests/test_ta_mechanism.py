"""The Teaching Assistant's mechanism on a case whose right answer is known.

Real MiniLM embeddings of the embedded teacher's real rationales (tests/fixtures/teacher_paths.json,
31 questions), each question with its own paths plus one rationale taken from another question.
The losses are synthetic and known: the question's own paths sit at 0.6 ± 0.1 nats, the foreign
one at 1.6. The schedule is the default's, read from params.yaml (the warm-up, then max_steps
student steps of questions_per_step questions, a TA step every ta.accum_steps micro-batches),
and it runs through the real FDIC code. The TA only ever sees the training questions; on the
held-out ones it must give the foreign path a small weight, deselect it, and score the paths
on the scale of -L̄. A TA that does not fit its target, or fits it without carrying over to new
questions, fails here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import losses as L
from pipeline.config import from_dict
from pipeline.fdic import Fdic, build_fdic, update_ema
from pipeline.ta import embed_paths
from stages import distill as D

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 10


def _scenario(seed: int, k: int) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor, list[int]]:
    """(questions, rationales) per path, the ``[Q, k]`` path-id grid, the known losses on that
    grid, and the foreign path's slot per question."""
    qs = json.loads((ROOT / "tests/fixtures/teacher_paths.json").read_text())["questions"]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    questions, rationales, grid, losses, foreign = [], [], [], [], []
    for i, q in enumerate(qs):
        own = [p["text"] for p in q["paths"][: k - 1]]
        slot = rng.randrange(len(own) + 1)
        texts = own[:slot] + [qs[(i + 1) % len(qs)]["paths"][0]["text"]] + own[slot:]
        row, loss = [], []
        for j, text in enumerate(texts):
            row.append(len(rationales))
            questions.append(q["question"])
            rationales.append(text)
            loss.append(1.6 if j == slot else 0.6 + 0.1 * float(torch.randn((), generator=gen)))
        grid.append(row + [-1] * (k - len(row)))
        losses.append(loss + [0.0] * (k - len(loss)))
        foreign.append(slot)
    return questions, rationales, torch.tensor(grid), torch.tensor(losses), foreign


def _train_default_schedule(cfg: D.DistillConfig, emb: torch.Tensor, grid: torch.Tensor, losses: torch.Tensor,
                            train: list[int]) -> Fdic:
    fdic = build_fdic(emb, grid[train], cfg.ta, cfg.seed, torch.device("cpu"))
    per = cfg.questions_per_step
    slots = per * grid.shape[1]

    def visit(stream_seed: int, micro: int, clock: int) -> None:
        idx = [train[j] for j in D.question_stream(len(train), stream_seed, micro, per)]
        ids = grid[idx]
        update_ema(fdic, ids, ids >= 0, losses[idx], clock, slots, lambda t: t)

    for w in range(cfg.ta.warmup_steps):  # the warm-up's own question stream, as distill draws it
        visit(cfg.seed + 7919, w, 0)
        fdic.warmup_step(None)
    for step in range(cfg.max_steps):
        for a in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + a
            visit(cfg.seed, micro, step)
            fdic.joint_micro(micro, None)
    return fdic


@pytest.mark.parametrize("seed", [0, 1])
def test_ta_deselects_a_foreign_rationale_on_held_out_questions(seed: int, encoder_dir: Path,
                                                                 one_thread: object) -> None:
    cfg = from_dict(D.DistillConfig, yaml.safe_load((ROOT / "params.yaml").read_text())["distill"])
    questions, rationales, grid, losses, foreign = _scenario(seed, cfg.max_paths)
    emb = embed_paths(questions, rationales, str(encoder_dir), cache_dir=None)
    order = list(range(len(grid)))
    random.Random(seed).shuffle(order)
    held, train = sorted(order[:HELD_OUT]), sorted(order[HELD_OUT:])
    fdic = _train_default_schedule(cfg, emb, grid, losses, train)
    assert int((fdic.seen_at >= 0).sum()) > 0 and not bool((fdic.seen_at[grid[held][grid[held] >= 0]] >= 0).any())

    ids, mask = grid[held], grid[held] >= 0
    with torch.no_grad():
        s = fdic.scores(ids, mask, train=False)
    selected = L.select_paths(s, mask, cfg.beta, cfg.tau_student)
    alpha = L.path_weights(s, selected, cfg.tau_student)
    rows = torch.arange(len(held))
    slot = torch.tensor([foreign[i] for i in held])
    k_q = mask.sum(dim=1).float()
    foreign_alpha = alpha[rows, slot]
    slope = L.within_question_slope(-losses[held], s, mask)
    report = (f"K·α of the foreign path {[round(x, 2) for x in (foreign_alpha * k_q).tolist()]}, "
              f"deselected {(~selected[rows, slot]).float().mean():.2f}, score slope {slope:.2f}")
    assert bool((foreign_alpha < 0.5 / k_q).all()), report
    assert float((~selected[rows, slot]).float().mean()) >= 0.8, report
    assert slope >= 0.5, report
