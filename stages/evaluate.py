"""Evaluate one model (the base student or a distilled student) on the eval splits.

    mind evaluate --model base        # the base student, zero-shot chain of thought
    mind evaluate --model mind-s0     # data/students/mind-s0/ (merged model or LoRA adapter)
    mind evaluate --model mcc-s0 --student-source adapter --datasets '[{name: gsm8k, group: id, limit: 50}]'

``--model base`` (``base_name``) evaluates ``base_model``; any other name evaluates the
distilled student ``students_dir/<model>/``: its ``merged/`` HF folder, or with
``student_source: adapter`` its PEFT ``adapter/`` served on top of ``base_model`` through
vLLM's LoRA support (``enable_lora`` + ``LoRARequest``).

Every model gets the same prompt, the one distill trains on (``pipeline.perspectives.student_message``:
a zero-shot chain-of-thought line) filled with the question as the model sees it (``format_question``: stem and lettered
options) and the answer-type instruction ``The answer is X.`` (the one the teacher prompts
end with, ``pipeline.perspectives.answer_instruction``), wrapped in the model's chat
template. Decoding is greedy, one batched vLLM call over all the datasets. Answers are
extracted and judged with ``pipeline.answers`` (the functions ``filter`` uses); numeric
datasets also get lm-eval's GSM8K strict-match / flexible-extract scores.

Writes, per dataset, ``data/eval/<model>/<dataset>/`` prediction shards (model, dataset, id,
output, pred_answer, gold, correct, answer_type, strict_correct, flexible_correct,
num_tokens, finish_reason; the manifest holds the resolved config), and one DVC metrics
file ``metrics/eval/<model>.json``: accuracy, n and the 95% Wilson interval per dataset, grouped
into ``id``/``ood``, with the group averages (see ``pipeline/metrics.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline import answers as A
from pipeline.config import check, to_dict
from pipeline.engine import Engine, EngineConfig, chat_prompts
from pipeline.metrics import PREDICTION_SCHEMA, Group, dataset_metrics, model_metrics
from pipeline.perspectives import student_message
from pipeline.questions import format_question
from pipeline.shards import atomic_write_json, check_name, clear_dir, read_rows, write_shards
from stages.cli import field

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger("mind.evaluate")

# vLLM accepts only these LoRA ranks as max_lora_rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class EvalDataset:
    """One eval split: ``data/prepared/<name>/``, its group, and an optional cap on questions."""

    name: str
    group: Group = "id"  # id: in-distribution, ood: out-of-distribution
    limit: int | None = None  # the first `limit` questions (prepare already shuffled them, seeded)

    def __post_init__(self) -> None:
        check_name(self.name, "eval dataset name")  # a folder under prepared_dir and under out_dir/<model>
        check(self.limit is None or self.limit > 0, f"{self.name}: limit must be positive")


def default_datasets() -> list[EvalDataset]:
    """All 300 embedded questions (the comparison that can tell) and 10 of each benchmark."""
    return [EvalDataset("embedded", "id"), EvalDataset("gsm8k", "id", 10), EvalDataset("svamp", "id", 10),
            EvalDataset("csqa", "ood", 10), EvalDataset("strategyqa", "ood", 10)]


@dataclass
class EvaluateConfig:
    model: str = field("base", help="model to evaluate: base_name for the base student, else a method under students_dir")
    base_name: str = field("base", help="the name that means the base student (no training)")
    base_model: str = field("data/models/smollm2-135m-instruct", help="base student: HF dir or Hub id")
    students_dir: Path = field(Path("data/students"), help="distilled students, one folder per method")
    student_source: Literal["merged", "adapter"] = field(
        "merged", help="serve a student's merged/ model, or its PEFT adapter/ on base_model via vLLM LoRA")
    prepared_dir: Path = field(Path("data/prepared"), help="prepared eval splits, one folder per dataset")
    datasets: list[EvalDataset] = field(help="eval splits: {name, group: id|ood, limit}", factory=default_datasets)
    max_tokens: int = field(256, help="generated tokens per answer (greedy)")
    engine: EngineConfig = field(help="vLLM engine settings",
                                 factory=lambda: EngineConfig(max_model_len=1024, kv_cache_gib=1.0))
    out_dir: Path = field(Path("data/eval"), help="prediction shards go to <out_dir>/<model>/<dataset>/")
    metrics_dir: Path = field(Path("metrics/eval"), help="metrics file goes to <metrics_dir>/<model>.json")
    shard_size: int = field(5000, help="rows per prediction shard")

    def __post_init__(self) -> None:
        check_name(self.model, "evaluate.model")  # a folder under out_dir, a file name under metrics_dir
        check(bool(self.datasets), "evaluate.datasets: at least one eval split is needed")
        names = [d.name for d in self.datasets]
        check(len(names) == len(set(names)), f"evaluate.datasets: duplicate names {names}")
        check(self.max_tokens > 0, "evaluate.max_tokens must be positive")
        check(self.shard_size > 0, "evaluate.shard_size must be positive")
        check(self.max_tokens < self.engine.max_model_len,
              f"evaluate.max_tokens {self.max_tokens} leaves no room for the prompt in "
              f"engine.max_model_len {self.engine.max_model_len}")


# ---------------------------------------------------------------- scoring (plain functions)


def user_message(row: dict[str, Any]) -> str:
    """The zero-shot CoT user message for one question row (the same for every model, and what distill trains on)."""
    return student_message(format_question(row), row["answer_type"])


def score(output: str, row: dict[str, Any]) -> dict[str, Any]:
    """pred_answer/correct with ``pipeline.answers``, and the lm-eval strict/flexible split for numbers."""
    pred = A.extract_answer(output, row["answer_type"], row["choices"])
    out: dict[str, Any] = {
        "pred_answer": pred,
        "correct": A.is_correct(pred, row["answer"], row["answer_type"]),
        "strict_correct": None,
        "flexible_correct": None,
    }
    if row["answer_type"] == "number":
        strict = A.gsm8k_strict_match(output, A.GSM8K_COT_STRICT_RE)
        out["strict_correct"] = A.lm_eval_exact_match(strict, row["answer"])
        out["flexible_correct"] = A.lm_eval_exact_match(A.gsm8k_flexible_extract(output), row["answer"])
    return out


def evaluate_model(
    engine: Engine,
    model_name: str,
    questions: dict[str, list[dict[str, Any]]],
    max_tokens: int,
    lora_request: LoRARequest | None = None,
    max_model_len: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Prediction rows per dataset, from one greedy batched generation call over all datasets.

    One call, not one per dataset: a small dataset alone keeps only a few sequences in flight,
    which leaves most of the engine idle (on 2 CPU cores, 90 questions in five per-dataset
    calls took about twice as long as in one).

    With ``max_model_len``, a prompt that leaves less than ``max_tokens`` of room is an
    error naming the question (the engine would otherwise cut that answer short or fail the
    whole batch).
    """
    from vllm import SamplingParams

    tokenizer = engine.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    prompts: list[str] = []
    for dataset, rows in questions.items():
        texts = chat_prompts(tokenizer, [user_message(r) for r in rows])
        if max_model_len is not None:
            for row, text in zip(rows, texts):
                n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                if n + max_tokens > max_model_len:
                    raise ValueError(f"{dataset}: question {row['id']} has a {n}-token prompt; with max_tokens "
                                     f"{max_tokens} it needs engine.max_model_len >= {n + max_tokens} "
                                     f"(now {max_model_len})")
        prompts.extend(texts)
    t0 = time.perf_counter()
    completions = iter(engine.generate(prompts, params, lora_request))
    secs = time.perf_counter() - t0
    out: dict[str, list[dict[str, Any]]] = {}
    for dataset, rows in questions.items():
        preds = []
        for row, (c,) in zip(rows, completions):
            preds.append({"model": model_name, "dataset": dataset, "id": row["id"], "output": c.text,
                          "gold": row["answer"], "answer_type": row["answer_type"],
                          "num_tokens": c.num_tokens, "finish_reason": c.finish_reason, **score(c.text, row)})
        log.info("%s on %s: %d questions, %d output tokens, accuracy %.3f", model_name, dataset, len(rows),
                 sum(p["num_tokens"] for p in preds), sum(p["correct"] for p in preds) / max(1, len(preds)))
        out[dataset] = preds
    tokens = sum(p["num_tokens"] for preds in out.values() for p in preds)
    log.info("%s: %d questions, %d output tokens in %.1f s (%.0f tok/s)", model_name, len(prompts), tokens, secs,
             tokens / max(secs, 1e-9))
    return out


# ---------------------------------------------------------------- the stage


def load_questions(cfg: EvaluateConfig) -> dict[str, list[dict[str, Any]]]:
    questions: dict[str, list[dict[str, Any]]] = {}
    for d in cfg.datasets:
        folder = cfg.prepared_dir / d.name
        if not folder.exists():
            raise FileNotFoundError(f"eval split {d.name}: {folder} does not exist (add it to prepare.eval and run "
                                    "`mind prepare`)")
        rows = read_rows(folder)
        if not rows:
            raise ValueError(f"eval split {d.name}: {folder} holds no questions")
        kept = rows if d.limit is None else rows[: d.limit]
        log.info("read %d questions from %s, kept %d (limit %s)", len(rows), folder, len(kept), d.limit)
        questions[d.name] = kept
    return questions


def lora_rank(adapter_dir: Path) -> int:
    """The adapter's LoRA rank ``r`` from its adapter_config.json."""
    path = adapter_dir / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    try:
        r = json.loads(path.read_text())["r"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: unreadable LoRA rank 'r' ({e})") from None
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: LoRA rank r={r!r} is not a positive integer")
    return r


def resolve_model(cfg: EvaluateConfig) -> tuple[str, Path | None, EngineConfig]:
    """(model dir for the engine, LoRA adapter dir or None, engine config) for ``cfg.model``."""
    if cfg.model == cfg.base_name:
        return cfg.base_model, None, cfg.engine
    student = cfg.students_dir / cfg.model
    train = "`mind distill --method <method> --seed <seed>` writes <students_dir>/<method>-s<seed>"
    if not student.is_dir():
        raise FileNotFoundError(f"student {cfg.model}: {student} does not exist ({train})")
    if cfg.student_source == "merged":
        merged = student / "merged"
        if not (merged / "config.json").exists():
            if not (student / "adapter").is_dir():
                raise FileNotFoundError(f"student {cfg.model}: no merged model or adapter in {student} ({train})")
            raise FileNotFoundError(f"student {cfg.model}: no merged model in {merged} "
                                    "(distill did not merge it; use student_source: adapter)")
        return str(merged), None, cfg.engine
    adapter = student / "adapter"
    r = lora_rank(adapter)
    rank = next((k for k in VLLM_LORA_RANKS if k >= max(r, cfg.engine.max_lora_rank)), None)
    if rank is None:
        raise ValueError(f"student {cfg.model}: LoRA rank {r} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}")
    return cfg.base_model, adapter, dataclasses.replace(cfg.engine, enable_lora=True, max_lora_rank=rank)


def write_outputs(
    cfg: EvaluateConfig,
    predictions: dict[str, list[dict[str, Any]]],
    resolved: dict[str, Any],
    timing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Prediction shards per dataset, then the model's metrics file (written last).

    ``resolved`` (the model folder, adapter and engine actually used) joins the config in
    every manifest and in ``data/eval/<model>/config.json``; ``timing`` goes to the latter only.
    """
    config = {"stage": "evaluate", **to_dict(cfg), "resolved": resolved}
    groups = {d.name: d.group for d in cfg.datasets}
    model_dir = cfg.out_dir / cfg.model
    clear_dir(model_dir)  # datasets dropped from params must not linger next to the new ones
    per_dataset = {}
    for dataset, rows in predictions.items():
        write_shards(model_dir / dataset, rows, PREDICTION_SCHEMA, config, shard_size=cfg.shard_size)
        per_dataset[dataset] = dataset_metrics(rows)
    metrics = model_metrics(per_dataset, groups)
    atomic_write_json(model_dir / "config.json", {**config, "timing": timing or {}})
    atomic_write_json(cfg.metrics_dir / f"{cfg.model}.json", metrics)
    log.info("wrote %s and %s", model_dir, cfg.metrics_dir / f"{cfg.model}.json")
    return metrics


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Generate greedy zero-shot CoT answers for every eval split, score them, write shards and metrics."""
    from vllm.lora.request import LoRARequest

    questions = load_questions(cfg)
    model_dir, adapter, engine_cfg = resolve_model(cfg)
    lora = LoRARequest(cfg.model, 1, str(adapter.resolve())) if adapter is not None else None
    log.info("evaluating %s: %s%s on %s", cfg.model, model_dir, f" + LoRA {adapter}" if adapter else "",
             ", ".join(f"{k} ({len(v)})" for k, v in questions.items()))
    t0 = time.perf_counter()
    # The prompts use the served model's tokenizer (and chat template): the merged student's
    # own, or the base student's for a LoRA adapter (adapters do not change the template).
    with Engine(model_dir, engine_cfg) as engine:
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        predictions = evaluate_model(engine, cfg.model, questions, cfg.max_tokens, lora,
                                     engine_cfg.max_model_len)
        gen_s = time.perf_counter() - t1
    resolved = {"model_dir": model_dir, "adapter": str(adapter) if adapter else None, "engine": to_dict(engine_cfg)}
    timing = {"engine_load_seconds": round(load_s, 1), "generate_seconds": round(gen_s, 1)}
    log.info("%s: engine start %.1f s, generation %.1f s", cfg.model, load_s, gen_s)
    metrics = write_outputs(cfg, predictions, resolved, timing)
    log.info("%s: ID avg %s, OOD avg %s", cfg.model, metrics["avg"].get("id"), metrics["avg"].get("ood"))
    return metrics
