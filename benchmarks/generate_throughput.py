"""Throughput of the two generate backends on the same prompts: vLLM vs transformers.

    .venv/bin/python benchmarks/generate_throughput.py
    .venv/bin/python benchmarks/generate_throughput.py --hf-batch-sizes 16,64 --no-enforce-eager

Builds 64 teacher prompts exactly as the generate stage does (training question i under
perspective i mod 8, through the chat template), then generates 256 new tokens max per
prompt with the same sampling settings on both backends, in this one process run:

- vLLM: one whole-batch ``LLM.generate`` call (engine start-up timed separately);
- transformers: batched ``generate`` with left padding, at several batch sizes.

Prints output tokens/s for each and the ratio of vLLM to the best transformers setting.
Output tokens count what each sequence generated up to and including its EOS; padding
after a finished sequence in a transformers batch is wasted work and is not counted.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from pipeline.engine import EngineConfig, load_llm, unload_llm  # noqa: E402
from pipeline.generation import HFGenerator, Request, Sampling, hf_generate, make_requests, vllm_generate  # noqa: E402
from pipeline.perspectives import load_perspectives  # noqa: E402
from pipeline.shards import read_rows  # noqa: E402


def build_requests(model: str, questions_dir: Path, num_prompts: int, seed: int) -> list[Request]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    questions = read_rows(questions_dir)[:num_prompts]
    if len(questions) < num_prompts:
        raise SystemExit(f"{questions_dir}: only {len(questions)} questions, need {num_prompts}")
    perspectives = load_perspectives()
    reqs = []
    for i, q in enumerate(questions):
        reqs.extend(make_requests([q], [perspectives[i % len(perspectives)]], "bench", seed, tok))
    return reqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/smollm2-135m-instruct")
    ap.add_argument("--questions-dir", type=Path, default=Path("data/prepared/train"))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0, help="the generate default: top_p < 1 sorts the vocabulary every step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="both backends; bf16 is emulated on AVX2-only CPUs")
    ap.add_argument("--hf-batch-sizes", default="8,16,32,64", help="comma-separated transformers batch sizes")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                    help="vLLM eager mode (the stage default): faster start-up, ~10%% lower throughput")
    args = ap.parse_args()

    reqs = build_requests(args.model, args.questions_dir, args.num_prompts, args.seed)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                        seed=args.seed, n=1)
    print(f"{len(reqs)} prompts, max {args.max_tokens} new tokens, temperature {args.temperature}, "
          f"top_p {args.top_p}, dtype {args.dtype}, {os.cpu_count()} CPUs")

    t0 = time.perf_counter()
    llm = load_llm(args.model, EngineConfig(dtype=args.dtype, max_model_len=1024, enforce_eager=args.enforce_eager,
                                            kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.num_prompts))
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = vllm_generate(llm, reqs, sampling)
    v_secs = time.perf_counter() - t0
    v_tokens = sum(c.num_tokens for cs in out for c in cs)
    unload_llm(llm)
    v_rate = v_tokens / v_secs
    print(f"vllm: engine start-up {startup:.1f} s (enforce_eager={args.enforce_eager}); "
          f"{v_tokens} output tokens in {v_secs:.1f} s = {v_rate:.1f} tokens/s")

    import torch

    hf = HFGenerator(args.model, args.dtype, 1)
    # Same process as the vLLM run above: show that transformers still gets every core.
    print(f"transformers: {torch.get_num_threads()} torch threads")
    results = {}
    for bs in [int(b) for b in args.hf_batch_sizes.split(",")]:
        hf.batch_size = bs
        t0 = time.perf_counter()
        comps, _ = hf_generate(hf, reqs, sampling)
        secs = time.perf_counter() - t0
        tokens = sum(c.num_tokens for cs in comps for c in cs)
        results[bs] = tokens / secs
        print(f"transformers batch {bs}: {tokens} output tokens in {secs:.1f} s = {results[bs]:.1f} tokens/s")
    best = max(results, key=results.__getitem__)
    print(f"ratio vllm / transformers (best: batch {best}, {results[best]:.1f} tokens/s): "
          f"{v_rate / results[best]:.1f}x")


if __name__ == "__main__":  # vLLM spawns worker processes
    main()
