"""What `dtype: auto` chooses on this machine, and what float32 and bfloat16 cost here, side by side.

    .venv/bin/python benchmarks/dtype_choice.py
    .venv/bin/python benchmarks/dtype_choice.py --model data/models/qwen2.5-coder-0.5b-instruct --num-prompts 16

In one process run, for float32 and then bfloat16:
- vLLM generation: the same prompts (embedded questions, greedy, `max_tokens` new tokens each),
  output tokens/s, engine start-up excluded;
- student training: `--train-steps` forward+backward passes of the model on the same batch of
  `--train-batch` sequences of `--train-len` tokens, tokens/s.

Prints both, the bf16/float32 ratios, the CPU's bf16 flags and what ``resolve_dtype("auto")``
picks. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.engine import BF16_CPU_FLAGS, Engine, EngineConfig, chat_prompts, cpu_has_native_bf16, resolve_dtype
from pipeline.models import torch_dtype
from pipeline.shards import read_rows


def generation_tok_s(model: str, dtype: str, questions: list[str], max_tokens: int) -> float:
    from vllm import SamplingParams

    with Engine(model, EngineConfig(dtype=dtype, max_model_len=1024, kv_cache_gib=1)) as engine:
        prompts = chat_prompts(engine.tokenizer, questions)
        start = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        secs = time.perf_counter() - start
    return sum(o[0].num_tokens for o in outs) / secs


def training_tok_s(model: str, dtype: str, steps: int, batch: int, length: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype(dtype))
    ids = torch.randint(0, net.config.vocab_size, (batch, length))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    net(input_ids=ids, labels=ids).loss.backward()  # warm-up, untimed
    opt.zero_grad()
    start = time.perf_counter()
    for _ in range(steps):
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * batch * length / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/smollm2-135m-instruct")
    ap.add_argument("--questions-dir", type=Path, default=Path("data/prepared/train"))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-len", type=int, default=160)
    args = ap.parse_args()

    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = [f for f in BF16_CPU_FLAGS if f in cpuinfo]
    questions = [r["question"] for r in read_rows(args.questions_dir)[: args.num_prompts]]
    results: dict[str, tuple[float, float]] = {}
    for dtype in ("float32", "bfloat16"):
        gen = generation_tok_s(args.model, dtype, questions, args.max_tokens)
        train = training_tok_s(args.model, dtype, args.train_steps, args.train_batch, args.train_len)
        results[dtype] = (gen, train)
        print(f"{dtype:>9}: vLLM {gen:7.1f} output tok/s | training {train:7.1f} tok/s", flush=True)
    (g32, t32), (g16, t16) = results["float32"], results["bfloat16"]
    print(f"bf16 / float32: vLLM {g16 / g32:.2f}x, training {t16 / t32:.2f}x")
    print(f"CPU bf16 flags: {flags or 'none'} (native: {cpu_has_native_bf16(cpuinfo)}); "
          f"dtype auto -> {resolve_dtype('auto')}")


if __name__ == "__main__":
    main()
