"""distill on one GPU: every method's steps on CUDA, with the student's architecture at random init.

    python benchmarks/distill_gpu.py --student data/models/smollm2-135m-instruct \
        --encoder data/models/all-minilm-l6-v2 --filtered data/filtered --steps 8

Checks the GPU path of ``stages/distill.py`` (bf16 from ``dtype: auto``, the TA and FDIC on the same
device as the student) and prints, per method, the seconds per step, the trained tokens per second,
the first and last loss and the peak GPU memory. The student is built from ``--student``'s
config.json and tokenizer with random weights, so only a few MB need to reach a GPU machine that has
no copy of the weights; the timings are those of the real architecture, the losses are not. Each
method runs in this process one after another, on the same filtered data and seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.fdic import TaConfig
from stages import distill as D


def random_student(src: Path, out: Path) -> Path:
    """``src``'s architecture and tokenizer with seeded random weights, saved to ``out``."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)  # writes the chat template too
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", type=Path, required=True, help="folder with the student's config.json and tokenizer")
    ap.add_argument("--encoder", type=Path, required=True, help="the TA's sentence encoder")
    ap.add_argument("--filtered", type=Path, required=True, help="a filter output folder")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["single", "uniform", "mcc", "mind"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill_gpu"))
    args = ap.parse_args()
    # the logs name the device (distill: "on cuda") and the dtype (engine: "dtype auto -> bfloat16")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    if args.work.exists():
        shutil.rmtree(args.work)
    student = random_student(args.student, args.work / "student")
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}")
    print("| method | steps | s/step | tokens/s | loss first → last | peak GPU GiB |")  # device, dtype: in the logs
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        cfg = D.DistillConfig(method=method, filtered_dir=args.filtered, student=str(student), encoder=str(args.encoder),
                              out_root=args.work / "students", live_root=args.work / "live",
                              embedding_cache=args.work / "cache", max_steps=args.steps,
                              ta=TaConfig(warmup_steps=2, accum_steps=2), checkpoint_every=args.steps)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        D.run(cfg)
        wall = time.perf_counter() - start
        metrics = json.loads((args.work / "students" / method / "metrics.json").read_text())
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"| {method} | {metrics['steps']} | {metrics['train_seconds'] / metrics['steps']:.3f} | "
              f"{metrics['tokens_per_second']:.0f} | {metrics['first_loss']:.3f} → {metrics['final_loss']:.3f} | "
              f"{peak:.2f} |  (wall {wall:.1f} s with loading)", flush=True)


if __name__ == "__main__":
    main()
