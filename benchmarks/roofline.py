"""The machine's matmul throughput and a model's FLOPs per token: the two halves of a roofline.

Imported by ``generate_throughput.py`` and ``distill_overhead.py``; also runnable on its own:

    .venv/bin/python benchmarks/roofline.py --model data/models/qwen2.5-coder-0.5b-instruct

Decoding one token costs about 2·N FLOP (a multiply and an add per weight that takes part in a
matmul), training about 6·N (forward 2·N, backward 4·N). N counts the weights that multiply:
an embedding table used only for lookups costs nothing; tied to the output layer, it does.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_flops(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """Best sustained FLOP/s of a square ``size`` matmul in ``dtype`` on this process's threads."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up: thread pool, kernel choice
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def matmul_params(model_dir: str | Path) -> int:
    """N: weights that take part in a matmul per token (from the safetensors headers, no load)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if "embed_tokens" in name and not tied:
                    continue  # a lookup table only: the untied lm_head does the output matmul
                total += math.prod(st.get_slice(name).get_shape())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = ap.parse_args()
    peak = matmul_flops(DTYPES[args.dtype])
    n = matmul_params(args.model)
    print(f"matmul {args.dtype}: {peak / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} threads")
    print(f"{args.model}: N = {n / 1e6:.0f} M matmul weights; decode roofline {peak / (2 * n):.0f} tok/s, "
          f"training roofline {peak / (6 * n):.0f} tok/s")


if __name__ == "__main__":
    main()
