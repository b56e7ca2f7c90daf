"""Teacher rationale generation: requests, the two backends, rows, and the resumption planner.

A *request* is one (teacher, question, perspective) prompt; it yields ``n`` samples, one
rationale row each. Every request carries its own sampling seed, derived from the run seed
and its key, so a request's output does not depend on which batch or which (resumed) run
generated it.

Backends (same output: per request, its ``n`` ``Completion``s in sample order):

- vLLM: ``sampling_params`` gives each request its seeded ``SamplingParams``; the engine
  (``pipeline.engine``) schedules the whole batch.
- ``HFGenerator``: plain transformers ``generate``, batched with left padding. For hosts
  without vLLM and as the benchmark's baseline. One seed per batch (transformers samples a
  batch from one global generator); the ``seed`` column then holds that batch seed.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.engine import Completion, chat_prompts
from pipeline.perspectives import Perspective, build_prompt
from pipeline.questions import format_question
from pipeline.shards import ShardError

if TYPE_CHECKING:
    from vllm import SamplingParams


@dataclass
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    n: int


@dataclass
class Request:
    question_id: str
    perspective: str
    prompt: str  # after the chat template
    seed: int


def request_seed(seed: int, teacher: str, question_id: str, perspective: str) -> int:
    """A stable 31-bit seed for one request (independent of batching and resumption)."""
    key = f"{seed}\x1f{teacher}\x1f{question_id}\x1f{perspective}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") & 0x7FFFFFFF


def make_requests(
    questions: list[dict[str, Any]], perspectives: list[Perspective], teacher: str, seed: int, tokenizer: Any
) -> list[Request]:
    """Question-major requests (all perspectives of question 1, then question 2, ...)."""
    keys = [(q, p) for q in questions for p in perspectives]
    messages = [build_prompt(p, format_question(q), q["answer_type"]) for q, p in keys]
    prompts = chat_prompts(tokenizer, messages)
    return [
        Request(q["id"], p.name, prompt, request_seed(seed, teacher, q["id"], p.name))
        for (q, p), prompt in zip(keys, prompts)
    ]


def sampling_params(requests: list[Request], sampling: Sampling) -> list[SamplingParams]:
    """One seeded ``SamplingParams`` per request: a request's samples do not depend on batching."""
    from vllm import SamplingParams

    return [
        SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                       max_tokens=sampling.max_tokens, seed=r.seed)
        for r in requests
    ]


class HFGenerator:
    """transformers backend: batched ``generate`` with left padding."""

    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
                       "float32": torch.float32, "float": torch.float32}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos_ids if e is not None}
        if not self.eos_ids:
            raise ValueError(f"{model_dir}: generation_config has no eos_token_id")

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        """Completions per prompt, ``batch_size`` prompts per ``generate`` call; ``seeds[i]``
        is the seed of batch ``i // batch_size``."""
        import torch

        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            torch.manual_seed(seeds[start])
            enc = self.tokenizer(batch, return_tensors="pt", padding=True)
            sample = sampling.temperature > 0
            kwargs: dict[str, Any] = (
                {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
                if sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            )
            with torch.inference_mode():
                seqs = self.model.generate(
                    **enc,
                    max_new_tokens=sampling.max_tokens,
                    num_return_sequences=sampling.n,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **kwargs,
                )
            gen = seqs[:, enc["input_ids"].shape[1]:].tolist()
            for i in range(len(batch)):
                out.append([self._completion(gen[i * sampling.n + j]) for j in range(sampling.n)])
        return out

    def _completion(self, ids: list[int]) -> Completion:
        # Like vLLM: the EOS token counts as a generated token but is not part of the text.
        for k, t in enumerate(ids):
            if t in self.eos_ids:
                return Completion(self.tokenizer.decode(ids[:k], skip_special_tokens=True), k + 1, "stop")
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids), "length")

    def close(self) -> None:
        del self.model


def hf_generate(gen: HFGenerator, requests: list[Request], sampling: Sampling) -> tuple[list[list[Completion]], list[int]]:
    """Run requests through ``gen``; returns completions and the seed used for each request
    (its batch's seed: the first request's own seed)."""
    seeds = []
    for start in range(0, len(requests), gen.batch_size):
        batch = requests[start:start + gen.batch_size]
        seeds.extend([batch[0].seed] * len(batch))
    return gen.generate([r.prompt for r in requests], sampling, seeds), seeds


def to_rows(
    teacher: str, requests: list[Request], completions: list[list[Completion]], seeds: list[int] | None = None
) -> list[dict[str, Any]]:
    """Rationale rows (one per sample) in the ``pipeline.shards.RATIONALE_SCHEMA`` column order."""
    if len(completions) != len(requests):
        raise RuntimeError(f"backend returned {len(completions)} results for {len(requests)} requests")
    rows = []
    for k, (req, comps) in enumerate(zip(requests, completions)):
        for i, c in enumerate(comps):
            rows.append({
                "question_id": req.question_id,
                "teacher": teacher,
                "perspective": req.perspective,
                "sample_index": i,
                "prompt": req.prompt,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "num_tokens": c.num_tokens,
                "seed": seeds[k] if seeds is not None else req.seed,
            })
    return rows


def plan_remaining(
    question_ids: list[str],
    teachers: dict[str, int],
    perspectives: list[str],
    kept: Iterable[pa.Table],
) -> dict[str, list[str]]:
    """Which questions each teacher still has to do, given the shards kept from an interrupted run.

    ``teachers`` maps teacher name -> samples per request ``n``. A question is done for a teacher
    when the kept shards hold exactly its perspectives x n rows (shards are written whole
    questions at a time, so anything else means the folder was tampered with: ShardError).
    Remaining questions keep the order of ``question_ids``.
    """
    seen: dict[tuple[str, str], set[tuple[str, int]]] = defaultdict(set)
    wanted_q = set(question_ids)
    for table in kept:
        cols = table.select(["question_id", "teacher", "perspective", "sample_index"]).to_pydict()
        for q, t, p, s in zip(cols["question_id"], cols["teacher"], cols["perspective"], cols["sample_index"]):
            if t not in teachers or q not in wanted_q:
                raise ShardError(f"kept shard has a row for teacher {t!r}, question {q!r} outside this run's config")
            key = (p, s)
            if key in seen[(t, q)]:
                raise ShardError(f"kept shards hold a duplicate row: teacher {t!r}, question {q!r}, {p}, sample {s}")
            seen[(t, q)].add(key)
    remaining: dict[str, list[str]] = {}
    for t, n in teachers.items():
        want = {(p, s) for p in perspectives for s in range(n)}
        todo = []
        for q in question_ids:
            have = seen.get((t, q), set())
            if have == want:
                continue
            if have:
                raise ShardError(
                    f"kept shards hold {len(have)} of {len(want)} rows for teacher {t!r}, question {q!r} "
                    f"(missing {sorted(want - have)[:3]}...); delete the output folder and rerun"
                )
            todo.append(q)
        remaining[t] = todo
    return remaining


def summarize(table: pa.Table) -> dict[str, Any]:
    """Counts per teacher and perspective, mean tokens, share of finish_reason == 'length'."""
    cols = table.select(["teacher", "perspective", "num_tokens", "finish_reason"]).to_pydict()
    n = table.num_rows
    per: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for t, p, k, f in zip(cols["teacher"], cols["perspective"], cols["num_tokens"], cols["finish_reason"]):
        groups[(t, p)].append((k, f))
    for (t, p), items in sorted(groups.items()):
        per.setdefault(t, {})[p] = {
            "rows": len(items),
            "mean_tokens": sum(k for k, _ in items) / len(items),
            "length_share": sum(f == "length" for _, f in items) / len(items),
        }
    reasons = Counter(cols["finish_reason"])
    return {
        "rows": n,
        "tokens": int(sum(cols["num_tokens"])),
        "mean_tokens": (sum(cols["num_tokens"]) / n) if n else math.nan,
        "length_share": (reasons.get("length", 0) / n) if n else math.nan,
        "finish_reasons": dict(reasons),
        "per_teacher_perspective": per,
    }
