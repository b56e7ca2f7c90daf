"""The generate stage: requests, config hashing and resumption, the planner, both backends,
and a kill-and-resume run of the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from pipeline.config import ConfigError, from_dict
from pipeline.generation import (
    Request,
    Sampling,
    make_requests,
    plan_remaining,
    request_seed,
    sampling_params,
    summarize,
    to_rows,
)
from pipeline.engine import Completion
from pipeline.perspectives import BUILTIN, load_perspectives
from pipeline.shards import (QUESTION_SCHEMA, RATIONALE_SCHEMA, ShardError, ShardWriter, config_hash, read_table,
                             verify, write_shards)
from stages.generate import GenerateConfig, run, run_config

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    {"id": f"q{i}", "task": "embedded",
     "question": f"Tom has {i + 2} marbles. Then Tom buys {i + 1} more marbles. How many marbles does Tom have now?",
     "answer": str(2 * i + 3), "answer_type": "number", "choices": [], "source": "test"}
    for i in range(8)
]
# Small engine for tests: other engines may run on this machine at the same time.
TEST_ENGINE = {"max_model_len": 768, "kv_cache_gib": 0.25, "enforce_eager": True, "max_num_seqs": 64}


def _questions_dir(tmp_path: Path, n: int = 8) -> Path:
    out = tmp_path / "questions"
    write_shards(out, QUESTIONS[:n], QUESTION_SCHEMA, {"test": True})
    return out


def _rows(teacher: str, qids: list[str], perspectives: list[str], n: int) -> list[dict[str, Any]]:
    return [
        {"question_id": q, "teacher": teacher, "perspective": p, "sample_index": s, "prompt": "p",
         "text": "t", "finish_reason": "stop", "num_tokens": 3, "seed": 1}
        for q in qids for p in perspectives for s in range(n)
    ]


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RATIONALE_SCHEMA)


def _keys(table: pa.Table) -> list[tuple[str, str, str, int]]:
    d = table.select(["question_id", "teacher", "perspective", "sample_index"]).to_pydict()
    return list(zip(d["question_id"], d["teacher"], d["perspective"], d["sample_index"]))


# ---------------------------------------------------------------- unit tests (no model)


def test_request_seed_is_stable_and_key_dependent() -> None:
    a = request_seed(0, "t", "q1", "Planning")
    assert a == request_seed(0, "t", "q1", "Planning")
    assert 0 <= a < 2**31
    others = {request_seed(1, "t", "q1", "Planning"), request_seed(0, "u", "q1", "Planning"),
              request_seed(0, "t", "q2", "Planning"), request_seed(0, "t", "q1", "Socratic")}
    assert a not in others and len(others) == 4


def test_to_rows_one_row_per_sample() -> None:
    reqs = [Request("q1", "Intuitive", "P1", 11), Request("q2", "Intuitive", "P2", 22)]
    comps = [[Completion("a", 4, "stop"), Completion("b", 9, "length")], [Completion("c", 2, "stop")] * 2]
    rows = to_rows("T", reqs, comps)
    assert [(r["question_id"], r["sample_index"], r["text"], r["seed"]) for r in rows] == [
        ("q1", 0, "a", 11), ("q1", 1, "b", 11), ("q2", 0, "c", 22), ("q2", 1, "c", 22)]
    assert _table(rows).num_rows == 4
    with pytest.raises(RuntimeError, match="2 requests"):
        to_rows("T", reqs, comps[:1])


def test_plan_remaining_from_complete_shards() -> None:
    qids = ["q1", "q2", "q3", "q4", "q5"]
    persp = ["Intuitive", "Planning"]
    kept = [_table(_rows("A", ["q1", "q2"], persp, 2)), _table(_rows("B", ["q3"], persp, 1)),
            _table(_rows("A", ["q4"], persp, 2))]
    assert plan_remaining(qids, {"A": 2, "B": 1}, persp, kept) == {
        "A": ["q3", "q5"], "B": ["q1", "q2", "q4", "q5"]}
    assert plan_remaining(qids, {"A": 2}, persp, []) == {"A": qids}


def test_plan_remaining_rejects_partial_duplicate_and_foreign_rows() -> None:
    persp = ["Intuitive", "Planning"]
    partial = _table(_rows("A", ["q1"], persp, 2)[:3])
    with pytest.raises(ShardError, match="3 of 4 rows for teacher 'A', question 'q1'"):
        plan_remaining(["q1"], {"A": 2}, persp, [partial])
    dup = _table(_rows("A", ["q1"], persp, 1) * 2)
    with pytest.raises(ShardError, match="duplicate row"):
        plan_remaining(["q1"], {"A": 1}, persp, [dup])
    with pytest.raises(ShardError, match="outside this run's config"):
        plan_remaining(["q1"], {"A": 1}, persp, [_table(_rows("Z", ["q1"], persp, 1))])


def _cfg(tmp_path: Path, **over: Any) -> GenerateConfig:
    data = {"teachers": [{"name": "t", "model": "data/models/smollm2-135m-instruct"}],
            "questions_dir": str(tmp_path / "questions"), "out_dir": str(tmp_path / "out"), **over}
    return from_dict(GenerateConfig, data, "generate")


def test_config_hash_tracks_generation_params_only(tmp_path: Path) -> None:
    qdir = _questions_dir(tmp_path)
    from pipeline.shards import read_manifest

    manifest = read_manifest(qdir)
    ids = [q["id"] for q in QUESTIONS]

    def h(cfg: GenerateConfig, perspectives: list = list(BUILTIN), qids: list[str] = ids) -> str:
        return config_hash(run_config(cfg, manifest, qids, perspectives))

    base = h(_cfg(tmp_path))
    assert base == h(_cfg(tmp_path))
    assert base == h(_cfg(tmp_path, resume=False))  # resume does not shape the output
    changed = [
        h(_cfg(tmp_path, temperature=0.3)), h(_cfg(tmp_path, top_p=0.5)), h(_cfg(tmp_path, max_tokens=7)),
        h(_cfg(tmp_path, seed=5)), h(_cfg(tmp_path, n=2)), h(_cfg(tmp_path, shard_size=3)),
        h(_cfg(tmp_path, engine={"dtype": "bfloat16"})),
        h(_cfg(tmp_path, teachers=[{"name": "t", "model": "data/models/smollm2-135m-instruct", "temperature": 0.1}])),
        h(_cfg(tmp_path), perspectives=list(BUILTIN[:2])),
        h(_cfg(tmp_path), qids=ids[:3]),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_resume_keeps_shards_only_for_the_same_config(tmp_path: Path) -> None:
    qdir = _questions_dir(tmp_path)
    from pipeline.shards import read_manifest

    manifest = read_manifest(qdir)
    ids = [q["id"] for q in QUESTIONS]
    out = tmp_path / "out"
    persp = ["Intuitive"]
    cfg = _cfg(tmp_path)
    config = run_config(cfg, manifest, ids, load_perspectives(select=persp))
    w = ShardWriter(out, RATIONALE_SCHEMA, config, resume=True)
    w.write(_rows("t", ids[:2], persp, 1))  # "killed" here: no close(), no manifest

    again = ShardWriter(out, RATIONALE_SCHEMA, config, resume=True)
    assert len(again.resumed_shards) == 1
    assert plan_remaining(ids, {"t": 1}, persp, again.existing_tables())["t"] == ids[2:]

    changed = run_config(_cfg(tmp_path, temperature=0.1), manifest, ids, load_perspectives(select=persp))
    fresh = ShardWriter(out, RATIONALE_SCHEMA, changed, resume=True)
    assert fresh.resumed_shards == [] and not list(out.glob("shard-*.arrow"))


def test_config_validation_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one teacher"):
        _cfg(tmp_path, teachers=[])
    with pytest.raises(ConfigError, match="duplicate names"):
        _cfg(tmp_path, teachers=[{"name": "a", "model": "m"}, {"name": "a", "model": "m"}])
    with pytest.raises(ConfigError, match=r"teachers\[a\]\.engine: unknown parameter\(s\) \['tensor_parallel'\]"):
        _cfg(tmp_path, teachers=[{"name": "a", "model": "m", "engine": {"tensor_parallel": 2}}])
    with pytest.raises(ConfigError, match="top_p must be in"):
        _cfg(tmp_path, teachers=[{"name": "a", "model": "m", "top_p": 0}])
    cfg = _cfg(tmp_path, n=2, teachers=[{"name": "a", "model": "m", "n": 3, "engine": {"tensor_parallel_size": 4}},
                                        {"name": "b", "model": "m"}])
    assert cfg.sampling(cfg.teachers[0]).n == 3 and cfg.sampling(cfg.teachers[1]).n == 2
    assert cfg.engine_for(cfg.teachers[0]).tensor_parallel_size == 4
    assert cfg.engine_for(cfg.teachers[1]).tensor_parallel_size == 1


def test_summarize_counts() -> None:
    rows = _rows("A", ["q1", "q2"], ["Intuitive", "Planning"], 1)
    rows[0]["finish_reason"], rows[0]["num_tokens"] = "length", 9
    s = summarize(_table(rows))
    assert s["rows"] == 4 and s["tokens"] == 18 and s["mean_tokens"] == 4.5 and s["length_share"] == 0.25
    assert s["per_teacher_perspective"]["A"]["Intuitive"] == {"rows": 2, "mean_tokens": 6.0, "length_share": 0.5}


# ---------------------------------------------------------------- real model


def _check_output(out: Path, expected_rows: int, max_tokens: int) -> pa.Table:
    import datasets

    manifest = verify(out)
    table = read_table(out)
    assert manifest["num_rows"] == table.num_rows == expected_rows
    keys = _keys(table)
    assert len(set(keys)) == len(keys)
    d = table.to_pydict()
    assert all(t.strip() for t in d["text"])
    assert all(1 <= k <= max_tokens for k in d["num_tokens"])
    assert set(d["finish_reason"]) <= {"stop", "length"}
    assert all(k == max_tokens for k, f in zip(d["num_tokens"], d["finish_reason"]) if f == "length")
    assert all("<|im_start|>assistant" in p for p in d["prompt"])
    files = [str(out / s["file"]) for s in manifest["shards"]]
    assert sum(datasets.Dataset.from_file(f).num_rows for f in files) == expected_rows
    ds = datasets.load_dataset("arrow", data_files=files, split="train")
    assert ds.num_rows == expected_rows and ds.column_names == RATIONALE_SCHEMA.names
    return table


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_stage_on_embedded_model(tmp_path: Path, embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One rolling window per teacher across all shards, and each shard written as soon as its
    requests are done: the first shard lands while the second's requests still run."""
    from stages import generate as G

    events: list[str] = []
    real_stream, real_write = G.Engine.stream, G.ShardWriter.write

    def spy_stream(self: Any, *args: Any, **kwargs: Any) -> Any:
        events.append("stream")
        for item in real_stream(self, *args, **kwargs):
            events.append("item")
            yield item

    def spy_write(self: Any, rows: list[dict[str, Any]]) -> Path:
        events.append("write")
        return real_write(self, rows)

    qdir = _questions_dir(tmp_path, 4)
    monkeypatch.setattr(G.Engine, "stream", spy_stream)
    monkeypatch.setattr(G.ShardWriter, "write", spy_write)
    out = tmp_path / "out"
    # max_num_seqs 2: the window (4 requests) is smaller than the workload (8), so it must top up
    cfg = _cfg(tmp_path, teachers=[{"name": "smol", "model": str(embedded_model_dir)}],
               perspectives=["Decomposition", "Socratic"], n=2, max_tokens=48, shard_size=2,
               questions_dir=str(qdir), out_dir=str(out), engine={**TEST_ENGINE, "max_num_seqs": 2})
    stats = run(cfg)
    assert events.count("stream") == 1 and events.count("item") == 8 and events.count("write") == 2
    assert events.index("write") < len(events) - 2  # shard 1 written before the last request finished
    table = _check_output(out, 4 * 2 * 2, 48)
    assert sorted(Counter(table.column("perspective").to_pylist()).items()) == [("Decomposition", 8), ("Socratic", 8)]
    assert len(list(out.glob("shard-*.arrow"))) == 2
    saved = json.loads((out / "stats.json").read_text())
    assert saved["rows"] == 16 and saved["generated_rows"] == 16 and saved["resumed_rows"] == 0
    assert saved["per_teacher_perspective"]["smol"]["Socratic"]["rows"] == 8
    assert 0 <= saved["length_share"] <= 1 and saved["tokens_per_second"] > 0
    assert stats["mean_tokens"] == pytest.approx(sum(table.column("num_tokens").to_pylist()) / 16)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_request_seeds_reproduce_a_batch(embedded_engine) -> None:
    """A resumed run regenerates a missing shard as the same batch of seeded requests: the
    samples come out the same, while different request seeds give different samples."""
    persp = load_perspectives(select=["Intuitive", "Planning"])
    reqs = make_requests(QUESTIONS[:3], persp, "smol", 0, embedded_engine.tokenizer)
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=24, seed=0, n=2)
    prompts = [r.prompt for r in reqs]
    first = [[c.text for c in cs] for cs in embedded_engine.generate(prompts, sampling_params(reqs, sampling))]
    second = [[c.text for c in cs] for cs in embedded_engine.generate(prompts, sampling_params(reqs, sampling))]
    assert first == second
    texts = [t for ts in first for t in ts]
    assert len(texts) == 12 and len(set(texts)) > len(texts) // 2


@pytest.mark.slow
def test_transformers_backend_two_teachers(tmp_path: Path, embedded_model_dir: Path) -> None:
    qdir = _questions_dir(tmp_path, 3)
    out = tmp_path / "out"
    model = str(embedded_model_dir)
    cfg = _cfg(tmp_path, backend="transformers", hf_batch_size=4, max_tokens=32, n=2, shard_size=2,
               perspectives=["Analogy", "Contrastive"], questions_dir=str(qdir), out_dir=str(out),
               teachers=[{"name": "sampled", "model": model},
                         {"name": "greedy", "model": model, "temperature": 0.0, "n": 1}])
    stats = run(cfg)
    table = _check_output(out, 3 * 2 * 2 + 3 * 2 * 1, 32)
    per = Counter(table.column("teacher").to_pylist())
    assert per == {"sampled": 12, "greedy": 6}
    assert stats["per_teacher_perspective"]["greedy"]["Analogy"]["rows"] == 3
    # one teacher's shards never mix in the other's rows: 2 + 2 shards of <= 2 questions
    assert len(list(out.glob("shard-*.arrow"))) == 4


@pytest.mark.slow
@pytest.mark.vllm
def test_kill_and_resume(tmp_path: Path, embedded_model_dir: Path) -> None:
    qdir = _questions_dir(tmp_path, 6)
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    section = {"teachers": [{"name": "smol", "model": str(embedded_model_dir)}], "questions_dir": str(qdir),
               "out_dir": str(out), "perspectives": ["Planning", "Analogy"], "n": 1, "max_tokens": 64,
               "shard_size": 2, "engine": {**TEST_ENGINE, "max_num_seqs": 2}}  # shards finish one by one
    params.write_text(yaml.safe_dump({"generate": section}))
    cmd = [sys.executable, "-m", "stages.app", "generate", "--params", str(params)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "shard-00000.arrow").exists():
            assert proc.poll() is None, "generate exited before its first shard"
            assert time.monotonic() < deadline, "no shard after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its vLLM engine processes
        proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = len(list(out.glob("shard-*.arrow")))
    assert 1 <= done_before < 3

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_shards"] == done_before
    assert stats["resumed_rows"] == done_before * 2 * 2
    assert stats["generated_rows"] == 12 - stats["resumed_rows"]
    table = _check_output(out, 6 * 2 * 1, 64)
    assert sorted(set(table.column("question_id").to_pylist())) == [f"q{i}" for i in range(6)]


def test_data_parallel_replicas_get_disjoint_cpu_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.engine import _cpu_binds

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert _cpu_binds(2, 2) == ["0,1|2,3", "4,5|6,7"]
    assert _cpu_binds(2, 1) == ["0,1,2,3", "4,5,6,7"]
    with pytest.raises(ValueError, match="9 CPU ranks, only 8 cores"):
        _cpu_binds(3, 3)
