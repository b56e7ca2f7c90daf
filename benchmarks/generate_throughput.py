"""Generation throughput on the same prompts: the generate stage's vLLM path, a plain vLLM
script, transformers, and the machine's roofline, all in one run.

    .venv/bin/python benchmarks/generate_throughput.py                                  # the 135M student
    .venv/bin/python benchmarks/generate_throughput.py --model data/models/qwen2.5-coder-0.5b-instruct \\
        --variants stage,stage-compiled --hf-batch-sizes 16 --max-tokens 128           # the default teacher

Builds ``--num-prompts`` teacher prompts exactly as the generate stage does (training question i
under perspective i mod 8, through the chat template) and generates up to ``--max-tokens`` new
tokens per prompt, with the same sampling settings everywhere. Each vLLM variant runs in its own
process (start-up timed apart from generation):

- ``stage``: what ``mind generate`` runs: ``Engine`` (in-process engine, eager, no chunked
  prefill), one seeded ``SamplingParams`` per request, ``Engine.stream``'s rolling window;
- ``stage-compiled``: the same with ``enforce_eager: false`` (vLLM's compiled CPU mode);
- ``stage-no-prefix-cache``: the same with prefix caching off (it is on by default);
- ``stage-block32``: the same with ``engine.block_size`` 32 instead of vLLM's CPU default of 128
  (the CPU attention backend takes multiples of 32 only): prefix caching reuses whole blocks, and
  the prompts of one perspective share their first ~55 tokens (system prompt, template head);
- ``stage-per-shard``: the stage's engine, but one ``LLM.generate`` call per ``--shard-prompts``
  prompts (the stage before its rolling window: the batch drains at the end of every call);
- ``stage-unseeded``: the same without per-request seeds (the stage seeds every request so that a
  resumed shard comes out the same; this shows what the seeded sampler costs);
- ``plain``: a plain script: ``vllm.LLM(model, dtype, max_model_len, kv cache)`` with every other
  setting at vLLM's default (separate engine-core process, compiled, chunked prefill), one shared
  unseeded ``SamplingParams``, one ``LLM.generate`` call;
- ``plain-eager``: the plain script with ``enforce_eager=True``.

transformers runs batched ``generate`` with left padding at each ``--hf-batch-sizes``. Output
tokens count what each sequence generated up to and including its EOS; padding after a finished
sequence in a transformers batch is wasted work and is not counted.

The roofline: a square matmul's FLOP/s in the run's dtype, measured first in this process, over
2·N FLOP per decoded token (``roofline.py``). Prints tok/s, its share of the roofline, and the
ratios vLLM / transformers and stage / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import DTYPES, matmul_flops, matmul_params  # noqa: E402

from pipeline.engine import resolve_dtype  # noqa: E402
from pipeline.generation import Request, Sampling, make_requests  # noqa: E402
from pipeline.perspectives import load_perspectives  # noqa: E402
from pipeline.shards import read_rows  # noqa: E402

VARIANTS = ("stage", "stage-compiled", "stage-no-prefix-cache", "stage-unseeded", "stage-block32",
            "stage-per-shard",
            "plain", "plain-eager")


def build_requests(tok: Any, questions_dir: Path, num_prompts: int, seed: int) -> list[Request]:
    questions = read_rows(questions_dir)[:num_prompts]
    if len(questions) < num_prompts:
        raise SystemExit(f"{questions_dir}: only {len(questions)} questions, need {num_prompts}")
    perspectives = load_perspectives()
    reqs = []
    for i, q in enumerate(questions):
        reqs.extend(make_requests([q], [perspectives[i % len(perspectives)]], "bench", seed, tok))
    return reqs


def run_variant(variant: str, args: argparse.Namespace, reqs: list[Request], sampling: Sampling) -> dict[str, float]:
    """One vLLM variant in this (fresh) process: start-up seconds, output tokens, generation seconds."""
    prompts = [r.prompt for r in reqs]
    t0 = time.perf_counter()
    if variant.startswith("stage"):
        from pipeline.engine import Engine, EngineConfig
        from pipeline.generation import sampling_params

        block = 32 if variant == "stage-block32" else None
        cfg = EngineConfig(dtype=args.dtype, max_model_len=1024, kv_cache_gib=args.kv_cache_gib,
                           enforce_eager=variant != "stage-compiled", block_size=block)
        if variant == "stage-no-prefix-cache":
            import vllm

            real = vllm.LLM

            def no_prefix(*a: object, **kw: object) -> object:
                return real(*a, enable_prefix_caching=False, **kw)

            vllm.LLM = no_prefix  # Engine imports it by name when it loads
        engine = Engine(args.model, cfg)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        params = sampling_params(reqs, sampling)
        if variant == "stage-unseeded":
            for p in params:
                p.seed = None
        if variant == "stage-per-shard":
            k = args.shard_prompts
            done = [cs for i in range(0, len(prompts), k)
                    for cs in engine.generate(prompts[i:i + k], params[i:i + k])]
        else:
            done = [cs for _, cs in engine.stream(prompts, params)]
        seconds = time.perf_counter() - t0
        tokens = sum(c.num_tokens for cs in done for c in cs)
        engine.close()
    else:
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024,
                  kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), enforce_eager=variant == "plain-eager")
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                                    max_tokens=sampling.max_tokens), use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for out in outs for o in out.outputs)
        llm.llm_engine.engine_core.shutdown()
    return {"startup": startup, "tokens": tokens, "seconds": seconds}


def hf_rates(args: argparse.Namespace, reqs: list[Request], sampling: Sampling) -> dict[int, float]:
    from pipeline.generation import HFGenerator, hf_generate

    hf = HFGenerator(args.model, args.dtype, 1)
    rates = {}
    for bs in [int(b) for b in args.hf_batch_sizes.split(",") if b]:
        hf.batch_size = bs
        t0 = time.perf_counter()
        comps, _ = hf_generate(hf, reqs, sampling)
        secs = time.perf_counter() - t0
        tokens = sum(c.num_tokens for cs in comps for c in cs)
        rates[bs] = tokens / secs
        print(f"transformers batch {bs}: {tokens} output tokens in {secs:.1f} s = {rates[bs]:.1f} tok/s", flush=True)
    hf.close()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/smollm2-135m-instruct")
    ap.add_argument("--questions-dir", type=Path, default=Path("data/prepared/train"))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95, help="the generate stage's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU has native bf16, else float32")
    ap.add_argument("--variants", default="stage,stage-compiled,plain", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--hf-batch-sizes", default="16,64", help="comma-separated transformers batch sizes ('' for none)")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--shard-prompts", type=int, default=32,
                    help="stage-per-shard: prompts per call (4 questions x 8 perspectives)")
    ap.add_argument("--run-variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    args.dtype = resolve_dtype(args.dtype)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    reqs = build_requests(tok, args.questions_dir, args.num_prompts, args.seed)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed, n=1)
    if args.run_variant:
        print("RESULT " + json.dumps(run_variant(args.run_variant, args, reqs, sampling)), flush=True)
        return

    import torch

    # vLLM prefills every prompt token too (2·N FLOP each, like a decoded one): on short outputs
    # the prefill is a large share of the work, so the roofline share is printed both ways.
    prompt_tokens = sum(len(tok(r.prompt, add_special_tokens=False)["input_ids"]) for r in reqs)
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                    if f in Path("/proc/cpuinfo").read_text().split()})
    peak = matmul_flops(DTYPES[args.dtype])
    n = matmul_params(args.model)
    roof = peak / (2 * n)
    print(f"{args.model}: N = {n / 1e6:.0f} M matmul weights; {len(reqs)} prompts, max {args.max_tokens} new tokens, "
          f"T {args.temperature}, top_p {args.top_p}, dtype {args.dtype}; {os.cpu_count()} CPUs ({', '.join(flags)}); "
          f"{prompt_tokens} prompt tokens ({prompt_tokens / len(reqs):.0f} per prompt)")
    print(f"matmul {args.dtype}: {peak / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} threads -> "
          f"decode roofline {roof:.0f} tok/s (2·N FLOP per token)", flush=True)

    results: dict[str, dict[str, float]] = {}
    for variant in [v for v in args.variants.split(",") if v]:
        cmd = [sys.executable, __file__, "--run-variant", variant, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"vllm {variant}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1].removeprefix("RESULT "))
        r["rate"] = r["tokens"] / r["seconds"]
        results[variant] = r
        work = (prompt_tokens + r["tokens"]) / r["seconds"]
        print(f"vllm {variant:22s} start-up {r['startup']:5.1f} s; {r['tokens']} tokens in {r['seconds']:6.1f} s = "
              f"{r['rate']:6.1f} tok/s = {100 * r['rate'] / roof:4.1f}% of roofline; with the prefill "
              f"{work:6.1f} tok/s = {100 * work / roof:4.1f}%", flush=True)

    hf = hf_rates(args, reqs, sampling) if args.hf_batch_sizes else {}
    if hf and results:
        best_bs = max(hf, key=hf.__getitem__)
        best_v = max(results, key=lambda v: results[v]["rate"])
        print(f"ratio vllm ({best_v}) / transformers (best: batch {best_bs}, {hf[best_bs]:.1f} tok/s): "
              f"{results[best_v]['rate'] / hf[best_bs]:.1f}x; {100 * hf[best_bs] / roof:.1f}% of roofline")
    if "stage" in results and "plain" in results:
        print(f"ratio stage / plain: {results['stage']['rate'] / results['plain']['rate']:.2f}")


if __name__ == "__main__":  # vLLM spawns worker processes
    main()
