"""How much of distill's work is padding, and what one forward pass per question would save.

    .venv/bin/python benchmarks/distill_padding.py                 # data/filtered and params.yaml's distill section
    .venv/bin/python benchmarks/distill_padding.py --timed 6       # also time fwd+bwd of 6 micro-batches both ways

``collate`` pads every path of a micro-batch (``questions_per_step`` questions x K paths) to the
longest one. The student's forward and backward run over all of those positions, so the padded
share is work thrown away. The alternative measured side by side: one forward per question, each
padded only to that question's longest path. Prints, over the micro-batches of the default run
(``max_steps`` x ``grad_accum``, the run's own seeded question stream), the token counts both ways;
with ``--timed N``, the median seconds of LoRA forward+backward on the first N micro-batches both
ways, alternating which goes first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import losses as L  # noqa: E402
from pipeline.config import from_dict  # noqa: E402
from stages import distill as D  # noqa: E402


def padded_positions(batch: D.Batch) -> tuple[int, int, int]:
    """(real positions, positions as padded to the batch, positions padded per question)."""
    lengths = batch.attention_mask.sum(dim=1)
    per_question = sum(int(lengths[batch.grid[q][batch.mask[q]]].max()) * int(batch.mask[q].sum())
                       for q in range(batch.grid.shape[0]))
    return int(lengths.sum()), lengths.numel() * batch.input_ids.shape[1], per_question


def fwd_bwd(model: torch.nn.Module, batch: D.Batch, per_question: bool) -> float:
    """Seconds of the summed path CE's forward and backward, as one pass or one pass per question."""
    t0 = time.perf_counter()
    groups = [batch.grid[q][batch.mask[q]] for q in range(batch.grid.shape[0])] if per_question else [
        torch.arange(batch.input_ids.shape[0])]
    for rows in groups:
        mask = batch.attention_mask[rows]
        T = int(mask.sum(dim=1).max())
        out = model(input_ids=batch.input_ids[rows, :T], attention_mask=mask[:, :T],
                    logits_to_keep=T - batch.start)
        ce = L.path_token_ce(out.logits[:, :-1], batch.labels[rows, batch.start + 1:T])
        ce.sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--filtered", type=Path, default=ROOT / "data" / "filtered")
    ap.add_argument("--timed", type=int, default=0, help="micro-batches to time both ways (0: count only)")
    args = ap.parse_args()

    section = (yaml.safe_load(args.params.read_text()) or {})["distill"]
    cfg = from_dict(D.DistillConfig, {**section, "method": "uniform", "filtered_dir": str(args.filtered)})
    model, tok = D.load_student(cfg)
    units, _, counts = D.load_units(cfg, tok)
    micros = cfg.max_steps * cfg.grad_accum
    batches = [D.collate([units[i] for i in D.question_stream(len(units), cfg.seed, m, cfg.questions_per_step)],
                         tok.pad_token_id, cfg.max_paths) for m in range(micros)]
    real = batch_pad = question_pad = 0
    for b in batches:
        r, bp, qp = padded_positions(b)
        real, batch_pad, question_pad = real + r, batch_pad + bp, question_pad + qp
    print(f"{counts['questions']} questions, {counts['paths']} paths; {micros} micro-batches of "
          f"{cfg.questions_per_step} questions (seed {cfg.seed})")
    print(f"positions run: padded to the batch {batch_pad}, per question {question_pad}, real {real}")
    print(f"padding share: per batch {1 - real / batch_pad:.1%}, per question {1 - real / question_pad:.1%}; "
          f"per-question positions / per-batch positions = {question_pad / batch_pad:.3f}")
    if args.timed:
        model.train()
        fwd_bwd(model, batches[0], False)  # untimed: first-call allocations
        times: dict[bool, list[float]] = {False: [], True: []}
        for i, b in enumerate(batches[: args.timed]):
            for per_question in ((False, True) if i % 2 == 0 else (True, False)):
                times[per_question].append(fwd_bwd(model, b, per_question))
        one, per = statistics.median(times[False]), statistics.median(times[True])
        print(f"fwd+bwd median over {args.timed} micro-batches ({next(model.parameters()).dtype}, "
              f"{torch.get_num_threads()} threads): one pass {one:.2f} s, one per question {per:.2f} s, "
              f"ratio {per / one:.3f}")


if __name__ == "__main__":
    main()
