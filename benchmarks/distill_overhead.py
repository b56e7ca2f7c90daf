"""MIND's per-step overhead over uniform multi-path SFT, on the same batches, in one process.

    .venv/bin/python benchmarks/distill_overhead.py                  # data/filtered, else a synthetic set
    .venv/bin/python benchmarks/distill_overhead.py --steps 8 --threads 1

Both methods run the distill stage's own step code (``micro_losses`` + backward + optimizer
step; for mind also the EMA update, TA scoring, selection, JSD and the TA's accumulated meta
step) on the identical batch, alternating which goes first. Prints the median seconds per
optimizer step of each, their ratio (target: mind <= 1.15x uniform), target and total tokens/s,
the TA warm-up step time (forward only) and the peak RSS.

MFU: 6·N FLOP per trained token (N: the student's matmul weights, ``roofline.py``) times the
uniform step's tokens/s, over this machine's matmul FLOP/s in the training dtype, measured in
the same run. With LoRA the frozen weights get no weight gradient, so the work actually done
is nearer 4·N per token: the 6·N figure is the usual full-fine-tuning yardstick.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from roofline import matmul_flops, matmul_params  # noqa: E402

from pipeline.answers import canonical_rationale  # noqa: E402
from pipeline.config import from_dict  # noqa: E402
from pipeline.shards import FILTERED_SCHEMA, write_shards  # noqa: E402
from stages import distill as D  # noqa: E402


def synthetic_filtered(out: Path, n_questions: int, k: int, seed: int = 0) -> Path:
    """Arithmetic questions with K verbose rationales (~80-100 tokens each, like the embedded teacher's)."""
    rng = random.Random(seed)
    rows = []
    for q in range(n_questions):
        a, b, c = rng.randint(3, 20), rng.randint(2, 9), rng.randint(1, 5)
        gold = str(a + b - c)
        question = (f"Mia has {a} marbles. Then Mia buys {b} more marbles. Then Mia gives away {c} marbles. "
                    "How many marbles does Mia have now?")
        for i in range(k):
            text = (f"Let's think about this carefully, one step at a time ({i}). At the start Mia has {a} marbles. "
                    f"She buys {b} more marbles, so she now has {a} + {b} = {a + b} marbles in her collection. "
                    f"After that she gives away {c} marbles to a friend, which leaves her with {a + b} - {c} = "
                    f"{gold} marbles. We can check: {gold} + {c} - {b} = {a}, which matches the start. "
                    f"The answer is {gold}.")
            text, offset, _, _ = canonical_rationale(text, gold, "number")
            rows.append({"question_id": f"q{q:04d}", "teacher": "t", "perspective": f"p{i}", "sample_index": 0,
                         "prompt": "", "text": text, "finish_reason": "stop", "num_tokens": 0, "seed": 0,
                         "pred_answer": gold, "correct": True, "question_pass_rate": 0.5, "question": question,
                         "answer": gold, "answer_type": "number", "answer_offset": offset})
    write_shards(out, rows, FILTERED_SCHEMA, {"stage": "benchmark"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--filtered", type=Path, default=ROOT / "data" / "filtered")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--synthetic-k", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    section = (yaml.safe_load(args.params.read_text()) or {}).get("distill", {}) if args.params.exists() else {}
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    filtered = args.filtered
    if not (filtered / "manifest.json").exists():
        filtered = synthetic_filtered(tmp / "filtered", 64, args.synthetic_k)
        print(f"no {args.filtered}: using a synthetic set of 64 questions x {args.synthetic_k} paths")
    common = {**section, "filtered_dir": str(filtered), "out_root": str(tmp / "students"),
              "live_root": str(tmp / "live"), "max_epochs": 1000.0}
    mind = from_dict(D.DistillConfig, {**common, "method": "mind"})
    uniform = from_dict(D.DistillConfig, {**common, "method": "uniform"})

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, tok = D.load_student(mind)
    peak = matmul_flops(next(model.parameters()).dtype)  # before training: nothing else running
    n_params = matmul_params(mind.student)
    units, path_rows, counts = D.load_units(mind, tok)
    t0 = time.perf_counter()
    fdic = D.build_run_fdic(mind, units, path_rows, accelerator.device, mind.embedding_cache)
    embed_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=mind.lr)
    model, opt = accelerator.prepare(model, opt)
    print(f"{counts['questions']} questions, {counts['paths']} paths; {mind.questions_per_step} questions/step; "
          f"torch threads {torch.get_num_threads()}; TA embeddings {embed_s:.1f}s")

    def student_step(cfg: D.DistillConfig, batch: D.Batch) -> None:
        loss, _ = D.micro_losses(cfg, model, batch, accelerator.device, fdic if cfg.method == "mind" else None,
                                 accelerator, 0)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
        if cfg.method == "mind":
            fdic.fit(cfg.ta.joint_lr, None)  # a TA step (ta.updates re-fits) every step: the worst case

    # The TA warm-up step: the frozen student's forward only, plus the TA's own step.
    model.eval()
    batch = D.collate([units[i] for i in range(mind.questions_per_step)], tok.pad_token_id, mind.max_paths)
    t0 = time.perf_counter()
    with torch.no_grad():
        ce, _ = D.forward_losses(model, batch, accelerator.device, "off")
    D.observe(accelerator, fdic, batch, ce, 0, mind)
    fdic.warmup_step(None)
    warm_s = time.perf_counter() - t0
    model.train()

    times: dict[str, list[float]] = {"uniform": [], "mind": []}
    tokens = targets = 0
    for step in range(args.warmup + args.steps):
        idx = D.question_stream(len(units), 0, step, mind.questions_per_step)
        batch = D.collate([units[i] for i in idx], tok.pad_token_id, mind.max_paths)
        order = [("uniform", uniform), ("mind", mind)]
        for name, cfg in order if step % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            student_step(cfg, batch)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
        if step >= args.warmup:
            tokens += int(batch.attention_mask.sum())
            targets += batch.tokens
    u, m = statistics.median(times["uniform"]), statistics.median(times["mind"])
    total_u = sum(times["uniform"])
    print(f"uniform: {u:.2f} s/step (median of {args.steps})")
    print(f"mind:    {m:.2f} s/step (median of {args.steps})")
    print(f"ratio mind/uniform: {m / u:.3f}  (target <= 1.15)")
    print(f"uniform throughput: {targets / total_u:.0f} target tokens/s, {tokens / total_u:.0f} tokens/s")
    mfu = 6 * n_params * tokens / total_u / peak
    print(f"MFU (uniform): 6 x {n_params / 1e6:.0f} M x {tokens / total_u:.0f} tok/s / "
          f"{peak / 1e9:.0f} GFLOP/s matmul ({next(model.parameters()).dtype}) = {100 * mfu:.1f}%")
    print(f"TA warm-up step (frozen student forward + TA step): {warm_s:.2f} s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
