"""Generate multi-perspective teacher rationales for the training questions.

    mind generate                                   # params.yaml's `generate` section
    mind generate --num-questions 20 --perspectives '[Intuitive, Planning]'
    mind generate --teachers '[{name: big, model: Qwen/Qwen2.5-7B-Instruct, engine: {tensor_parallel_size: 2}}]'

For every teacher (one after another: each loads once and is unloaded before the next),
every question of ``questions_dir`` and every perspective, samples ``n`` rationales. With vLLM,
the teacher's whole workload streams through one rolling window of 2 × ``max_num_seqs``
requests, so the engine's batch stays full across shards, and each shard is written the moment
its last request finishes. Writes
``data/rationales/``: Arrow shards of ``shard_size`` questions each (columns question_id,
teacher, perspective, sample_index, prompt, text, finish_reason, num_tokens, seed), the
manifest last, and ``stats.json`` (rows and mean tokens per perspective, share of
finish_reason == "length", wall time, throughput).

Resumption: after a crash or kill, a rerun with the same configuration keeps every complete
shard and generates only the missing questions; any change of a generation parameter (or of
the questions, the perspectives or the teacher model) starts clean. A kept shard must match
the sha256 recorded when it was written: a corrupted, truncated or missing one is logged and
its questions are generated again (``stats.json``: ``rejected_shards``). Under DVC the output is
``persist: true`` so ``dvc repro`` leaves the partial folder in place for this.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from tqdm import tqdm

from pipeline.config import check, from_dict, to_dict
from pipeline.engine import Completion, Engine, EngineConfig
from pipeline.generation import (
    HFGenerator,
    Request,
    Sampling,
    hf_generate,
    make_requests,
    plan_remaining,
    sampling_params,
    summarize,
    to_rows,
)
from pipeline.perspectives import Perspective, load_perspectives
from pipeline.shards import (RATIONALE_SCHEMA, ShardError, ShardWriter, atomic_write_json, read_manifest, read_rows,
                             read_shard, shard_files)
from stages.cli import field

log = logging.getLogger("mind.generate")


@dataclass
class TeacherSpec:
    """One teacher model. Unset sampling keys fall back to the stage-wide values."""

    name: str  # the `teacher` column value
    model: str  # a local HF dir (e.g. data/models/<name>) or a Hub id
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    n: int | None = None
    engine: dict[str, Any] | None = None  # EngineConfig keys overriding the stage's `engine`

    def __post_init__(self) -> None:
        check(bool(self.name), "generate.teachers: every teacher needs a name")
        check(bool(self.model), f"generate.teachers[{self.name}]: model is required")


@dataclass
class GenerateConfig:
    teachers: list[TeacherSpec] = field(help="teacher models, run one after another", factory=list)
    questions_dir: Path = field(Path("data/prepared/train"), help="prepared training questions (shard folder)")
    out_dir: Path = field(Path("data/rationales"), help="output shard folder")
    num_questions: int | None = field(48, help="use only the first N questions (null: all)")
    perspectives: list[str] | None = field(None, help="perspective names to use, in order (null: all)")
    perspectives_file: str | None = field(None, help="YAML file that replaces or extends the 8 built-in perspectives")
    n: int = field(1, help="samples per (question, perspective)")
    temperature: float = field(0.7, help="sampling temperature (0: greedy)")
    top_p: float = field(1.0, help="nucleus sampling mass (< 1 sorts the vocabulary at every step: ~30% slower on CPU)")
    max_tokens: int = field(192, help="max new tokens per rationale")
    seed: int = field(0, help="run seed; each request's seed derives from it and the request's key")
    backend: Literal["vllm", "transformers"] = field("vllm", help="generation backend")
    engine: EngineConfig = field(help="vLLM engine settings (mapping)",
                                 factory=lambda: EngineConfig(max_model_len=1024, kv_cache_gib=2.0))
    hf_batch_size: int = field(16, help="transformers backend: prompts per generate call")
    shard_size: int = field(8, help="questions per shard (the unit of resumption; vLLM's batch spans shards)")
    resume: bool = field(True, help="keep complete shards of an interrupted run with the same config")

    def __post_init__(self) -> None:
        check(bool(self.teachers), "generate.teachers: at least one teacher is needed")
        names = [t.name for t in self.teachers]
        check(len(set(names)) == len(names), f"generate.teachers: duplicate names {names}")
        check(self.num_questions is None or self.num_questions > 0, "generate.num_questions must be positive")
        check(self.shard_size > 0, "generate.shard_size must be positive")
        check(self.hf_batch_size > 0, "generate.hf_batch_size must be positive")
        for t in self.teachers:
            s = self.sampling(t)
            check(s.n >= 1, f"generate: n must be >= 1 (teacher {t.name})")
            check(s.temperature >= 0, f"generate: temperature must be >= 0 (teacher {t.name})")
            check(0 < s.top_p <= 1, f"generate: top_p must be in (0, 1] (teacher {t.name})")
            check(s.max_tokens >= 1, f"generate: max_tokens must be >= 1 (teacher {t.name})")
            self.engine_for(t)  # validates the overrides

    def sampling(self, t: TeacherSpec) -> Sampling:
        def pick(own: Any, default: Any) -> Any:
            return default if own is None else own

        return Sampling(
            temperature=pick(t.temperature, self.temperature),
            top_p=pick(t.top_p, self.top_p),
            max_tokens=pick(t.max_tokens, self.max_tokens),
            seed=pick(t.seed, self.seed),
            n=pick(t.n, self.n),
        )

    def engine_for(self, t: TeacherSpec) -> EngineConfig:
        return from_dict(EngineConfig, {**to_dict(self.engine), **(t.engine or {})}, f"generate.teachers[{t.name}].engine")


def _model_fingerprint(model: str) -> str:
    """Cheap identity of a local model dir (config + weight file names and sizes); a Hub id as is."""
    path = Path(model)
    if not path.is_dir():
        return model
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.suffix in (".json", ".safetensors", ".bin", ".jinja") and p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
            if p.name in ("config.json", "generation_config.json", "chat_template.jinja"):
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_config(
    cfg: GenerateConfig, q_manifest: dict[str, Any], question_ids: list[str], perspectives: list[Perspective]
) -> dict[str, Any]:
    """The config recorded in the manifest. Its hash decides resumption, so it holds everything
    that shapes the output (all parameters but ``resume``, the input questions, the resolved
    perspective templates, the teacher models' identity): any change starts clean."""
    return {
        "stage": "generate",
        **{k: v for k, v in to_dict(cfg).items() if k != "resume"},
        "questions_shards": [s["sha256"] for s in q_manifest["shards"]],
        "question_ids_hash": hashlib.sha256("\n".join(question_ids).encode()).hexdigest()[:16],
        "perspective_templates": {p.name: p.template for p in perspectives},
        "teacher_models": {t.name: _model_fingerprint(t.model) for t in cfg.teachers},
    }


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # A plain SIGTERM (DVC, a scheduler, `timeout`) would kill this process but leave vLLM's
    # engine processes running; exiting through Python runs the `finally` that shuts them down.
    raise SystemExit(f"generate: terminated by signal {signum}; complete shards are kept for a rerun")


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate teacher rationales per question x perspective x sample into Arrow shards."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        return _generate(cfg)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _generate(cfg: GenerateConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    questions = read_rows(cfg.questions_dir)
    q_manifest = read_manifest(cfg.questions_dir)
    if cfg.num_questions is not None:
        questions = questions[: cfg.num_questions]
    check(bool(questions), f"{cfg.questions_dir}: no questions to generate for")
    ids = [q["id"] for q in questions]
    if len(set(ids)) != len(ids):
        raise ShardError(f"{cfg.questions_dir}: question ids are not unique")
    by_id = {q["id"]: q for q in questions}
    perspectives = load_perspectives(cfg.perspectives_file, cfg.perspectives)
    log.info("read %d questions from %s; %d perspectives: %s", len(questions), cfg.questions_dir,
             len(perspectives), ", ".join(p.name for p in perspectives))

    resolved = to_dict(cfg)
    config = run_config(cfg, q_manifest, ids, perspectives)
    writer = ShardWriter(cfg.out_dir, RATIONALE_SCHEMA, config, resume=cfg.resume)
    ns = {t.name: cfg.sampling(t).n for t in cfg.teachers}
    names = [p.name for p in perspectives]
    remaining = plan_remaining(ids, ns, names, writer.existing_tables())
    total = sum(len(ids) * len(names) * n for n in ns.values())
    todo = sum(len(remaining[t]) * len(names) * ns[t] for t in ns)
    if writer.resumed_shards or writer.rejected:
        log.info("resuming: kept %d verified shard(s) with %d rows, rejected %d; %d rows to generate",
                 len(writer.resumed_shards), total - todo, len(writer.rejected), todo)

    bar = tqdm(total=todo, unit="row", desc="generate", dynamic_ncols=True)
    new_tokens = 0
    t_gen = time.perf_counter()
    load_seconds: dict[str, float] = {}
    for teacher in cfg.teachers:
        qids = remaining[teacher.name]
        if not qids:
            log.info("teacher %s: nothing left to generate", teacher.name)
            continue
        sampling = cfg.sampling(teacher)
        eng_cfg = cfg.engine_for(teacher)
        t_load = time.perf_counter()
        if cfg.backend == "vllm":
            engine = Engine(teacher.model, eng_cfg)
            tokenizer = engine.tokenizer
        else:
            hf = HFGenerator(teacher.model, eng_cfg.dtype, cfg.hf_batch_size)
            tokenizer = hf.tokenizer
        load_seconds[teacher.name] = time.perf_counter() - t_load
        log.info("teacher %s (%s) loaded in %.1f s; %d questions to do", teacher.name, teacher.model,
                 load_seconds[teacher.name], len(qids))
        chunks = [[by_id[q] for q in chunk] for chunk in _chunks(qids, cfg.shard_size)]
        t_teacher = time.perf_counter()

        def write(requests: list[Request], completions: list[list[Completion]], seeds: list[int] | None = None) -> None:
            nonlocal new_tokens
            rows = to_rows(teacher.name, requests, completions, seeds)
            path = writer.write(rows)
            new_tokens += sum(r["num_tokens"] for r in rows)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t_gen):.0f}", shard=path.name)

        try:
            if cfg.backend == "vllm":
                # The teacher's whole workload goes through one rolling window of requests, so the
                # engine's batch stays full across shard boundaries; a shard is written as soon as
                # its last request finishes.
                shards = [make_requests(c, perspectives, teacher.name, sampling.seed, tokenizer) for c in chunks]
                owner = [(s, j) for s, reqs in enumerate(shards) for j in range(len(reqs))]
                flat = [r for reqs in shards for r in reqs]
                done: list[dict[int, list[Completion]]] = [{} for _ in shards]
                # closing(): on an error the stream's requests are aborted before the engine closes
                with closing(engine.stream([r.prompt for r in flat], sampling_params(flat, sampling))) as finished:
                    for i, completions in finished:
                        s, j = owner[i]
                        done[s][j] = completions
                        bar.update(len(completions))
                        if len(done[s]) == len(shards[s]):
                            write(shards[s], [done[s][k] for k in range(len(shards[s]))])
                            done[s] = {}
            else:
                for chunk in chunks:
                    requests = make_requests(chunk, perspectives, teacher.name, sampling.seed, tokenizer)
                    completions, seeds = hf_generate(hf, requests, sampling)
                    write(requests, completions, seeds)
                    bar.update(sum(map(len, completions)))
        finally:
            if cfg.backend == "vllm":
                engine.close()
            else:
                hf.close()
        log.info("teacher %s: %d questions in %.1f s", teacher.name, len(qids), time.perf_counter() - t_teacher)
    bar.close()

    # The final check: exactly questions x perspectives x n rows per teacher, no duplicates.
    tables = [read_shard(p) for p in shard_files(cfg.out_dir)]
    left = plan_remaining(ids, ns, names, tables)
    if any(left.values()):
        raise ShardError(f"{cfg.out_dir}: rows missing after generation for {sum(map(len, left.values()))} questions")
    table = pa.concat_tables(tables) if tables else RATIONALE_SCHEMA.empty_table()
    if table.num_rows != total:
        raise ShardError(f"{cfg.out_dir}: {table.num_rows} rows, expected {total}")
    wall = time.perf_counter() - t_start
    gen_wall = time.perf_counter() - t_gen
    stats = {
        **summarize(table),
        "expected_rows": total,
        "questions": len(ids),
        "perspectives": names,
        "resumed_shards": len(writer.resumed_shards),
        "rejected_shards": writer.rejected,
        "resumed_rows": total - todo,
        "generated_rows": todo,
        "generated_tokens": new_tokens,
        "wall_seconds": wall,
        "generation_seconds": gen_wall,
        "engine_load_seconds": load_seconds,
        "rows_per_second": todo / gen_wall if gen_wall > 0 else None,
        "tokens_per_second": new_tokens / gen_wall if gen_wall > 0 else None,
        "backend": cfg.backend,
        "config": resolved,
    }
    atomic_write_json(cfg.out_dir / "stats.json", stats)
    writer.close({"stats": {k: stats[k] for k in ("rows", "mean_tokens", "length_share", "wall_seconds")}})
    for t, per in stats["per_teacher_perspective"].items():
        for p, s in per.items():
            log.info("%s / %s: %d rows, mean %.1f tokens, %.1f%% hit max_tokens", t, p, s["rows"],
                     s["mean_tokens"], 100 * s["length_share"])
    log.info("wrote %d rows (%d generated, %d resumed) to %s; mean %.1f tokens, %.1f%% length-capped; "
             "%.1f s wall, %.0f generated tokens/s", table.num_rows, todo, total - todo, cfg.out_dir,
             stats["mean_tokens"], 100 * stats["length_share"], wall, stats["tokens_per_second"] or 0)
    return stats
