"""prepare: loaders, canonical golds, bad rows, dedup, and the real reference datasets in full."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pyarrow as pa
import pytest

from pipeline import questions as Q
from pipeline.config import ConfigError, deep_merge, from_dict
from pipeline.sample import embedded_splits
from pipeline.shards import QUESTION_SCHEMA, read_rows
from stages.cli import read_params
from stages.prepare import DatasetSpec, PrepareConfig, load_dataset_rows, run


def _cfg(tmp_path: Path, train: list[dict], eval: list[dict] | None = None, **kw: object) -> PrepareConfig:
    return from_dict(PrepareConfig, {"train": train, "eval": eval or [], "out_dir": str(tmp_path / "prep"), **kw})


@pytest.mark.parametrize(
    ("value", "answer_type", "expected"),
    [
        ("1,250", "number", "1250"), ("5.0", "number", "5"), (72.0, "number", "72"), ("-3", "number", "-3"),
        ("0.50", "number", "0.5"), ("$18", "number", "18"), ("c", "choice", "C"), ("(b)", "choice", "B"),
        ("Yes", "yesno", "yes"), ("FALSE", "yesno", "no"), (True, "yesno", "yes"), (" \\frac{1}{2} ", "math", "\\frac{1}{2}"),
    ],
)
def test_canonical_answer(value: object, answer_type: Q.AnswerType, expected: str) -> None:
    assert Q.canonical_answer(value, answer_type, 5) == expected


@pytest.mark.parametrize(("value", "answer_type"), [("ten", "number"), ("", "number"), ("F", "choice"), ("maybe", "yesno")])
def test_canonical_answer_rejects(value: str, answer_type: Q.AnswerType) -> None:
    with pytest.raises(ValueError):
        Q.canonical_answer(value, answer_type, 5)


def test_embedded_sample_is_deterministic_disjoint_and_exact() -> None:
    a, b = embedded_splits(), embedded_splits()
    assert [p.question for p in a["train"]] == [p.question for p in b["train"]]
    assert len(a["train"]) >= 1000 and len(a["eval"]) >= 300
    assert not {p.question for p in a["train"]} & {p.question for p in a["eval"]}
    assert {p.steps for p in a["train"]} == {1, 2, 3}
    # the gold is the arithmetic of the text: replay a one-step add/subtract problem
    p = next(p for p in a["train"] if p.steps == 1 and "Then" in p.question)
    start = int(p.question.split(" has ")[1].split()[0])
    n = int(p.question.split("Then")[1].split()[2])
    assert p.answer in (start + n, start - n)
    assert embedded_splits(seed=7)["train"][0].question != a["train"][0].question


def test_broken_jsonl_line_names_file_line_field(tmp_path: Path) -> None:
    f = tmp_path / "gsm.jsonl"
    f.write_text('{"question": "1+1?", "answer": "x #### 2"}\n{"question": "oops", \n{"question": "2+2?", "answer": "#### 4"}\n')
    cfg = _cfg(tmp_path, [{"name": "g", "format": "gsm8k", "path": str(f)}])
    with pytest.raises(Q.DataError, match=rf"{f}:2: <line>: unparseable JSON"):
        run(cfg)
    assert not (tmp_path / "prep" / "train").exists()


def test_bad_rows_skipped_and_counted(tmp_path: Path) -> None:
    f = tmp_path / "gsm.jsonl"
    f.write_text(
        '{"question": "1+1?", "answer": "x #### 2"}\n'
        '{"question": "oops", \n'  # unparseable
        '{"question": "2+2?", "answer": "#### four"}\n'  # non-numeric gold
        '{"question": "", "answer": "#### 4"}\n'  # empty question
        '{"answer": "#### 4"}\n'  # missing field
        '{"question": "1 + 1?", "answer": "#### 2"}\n'  # fine
        '{"question": "1+1?", "answer": "#### 2"}\n'  # exact duplicate
    )
    cfg = _cfg(tmp_path, [{"name": "g", "format": "gsm8k", "path": str(f)}], on_bad_row="skip")
    stats = run(cfg)["train"]
    assert stats == {"read": 7, "bad": 4, "bad:<line>": 1, "bad:answer": 1, "bad:question": 2,
                     "duplicate": 1, "contaminated": 0, "kept": 2}
    rows = read_rows(tmp_path / "prep" / "train")
    assert sorted(r["answer"] for r in rows) == ["2", "2"]
    assert json.loads((tmp_path / "prep" / "stats.json").read_text())["splits"]["train"]["bad"] == 4


def test_non_numeric_gold_error_message(tmp_path: Path) -> None:
    f = tmp_path / "gsm.jsonl"
    f.write_text('{"question": "2+2?", "answer": "#### four"}\n')
    with pytest.raises(Q.DataError, match=rf"{f}:1: answer: not a number: 'four'"):
        run(_cfg(tmp_path, [{"name": "g", "format": "gsm8k", "path": str(f)}]))


def test_generic_loaders_all_formats(tmp_path: Path) -> None:
    records = [{"q": "Is ice cold?", "a": "Yes", "k": "a1"}, {"q": "Is fire cold?", "a": "no", "k": "a2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.csv").write_text("q,a,k\nIs ice cold?,Yes,a1\nIs fire cold?,no,a2\n")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    for ext in ("jsonl", "json", "csv", "parquet"):
        spec = {"name": "yn", "format": "generic", "path": str(tmp_path / f"d.{ext}"), "answer_type": "yesno",
                "fields": {"question": "q", "answer": "a", "id": "k"}}
        rows = load_dataset_rows(from_dict(DatasetSpec, spec), _cfg(tmp_path, [spec], shuffle=False), __import__("collections").Counter())
        assert [(r["id"], r["answer"]) for r in rows] == [("yn-a1", "yes"), ("yn-a2", "no")], ext


def test_generic_needs_answer_type_and_fields() -> None:
    with pytest.raises(ConfigError, match="explicit answer_type"):
        from_dict(DatasetSpec, {"name": "x", "format": "generic", "path": "x.jsonl", "fields": {"question": "q", "answer": "a"}})
    with pytest.raises(ConfigError, match="unknown parameter"):
        from_dict(PrepareConfig, {"train": [{"name": "e", "format": "embedded"}], "limt": 3})


def test_math500_and_gpqa_fixtures(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(json.dumps({"problem": "What is 1/2 + 1/2?", "answer": "1", "unique_id": "test/x/1.json"}) + "\n")
    (tmp_path / "g.csv").write_text(
        "Record ID,Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
        "r1,Which is a noble gas?,Neon,Iron,Carbon,Sodium\n"
    )
    cfg = _cfg(tmp_path, [{"name": "math500", "format": "math500", "path": str(tmp_path / "m.jsonl")}],
               [{"name": "gpqa", "format": "gpqa", "path": str(tmp_path / "g.csv")}])
    run(cfg)
    (m,) = read_rows(tmp_path / "prep" / "train")
    assert (m["answer_type"], m["answer"], m["id"]) == ("math", "1", "math500-test_x_1")
    (g,) = read_rows(tmp_path / "prep" / "gpqa")
    assert g["answer_type"] == "choice" and sorted(g["choices"]) == ["Carbon", "Iron", "Neon", "Sodium"]
    assert g["choices"]["ABCD".index(g["answer"])] == "Neon"
    run(cfg)  # the option order is stable across runs
    assert read_rows(tmp_path / "prep" / "gpqa")[0]["choices"] == g["choices"]


def test_shuffle_limit_decontaminate_and_stable_ids(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [{"name": "embedded", "format": "embedded", "split": "train"}],
               [{"name": "emb_eval", "format": "embedded", "split": "eval", "limit": 20}],
               limit=50, embedded_train_size=200, embedded_eval_size=40)
    stats = run(cfg)
    train = read_rows(tmp_path / "prep" / "train")
    assert len(train) == 50 and stats["train"]["over_limit"] == 150
    assert len(read_rows(tmp_path / "prep" / "emb_eval")) == 20
    assert len({r["id"] for r in train}) == 50
    run(cfg)
    assert [r["id"] for r in read_rows(tmp_path / "prep" / "train")] == [r["id"] for r in train]
    # an eval question placed in the train pool is removed and counted
    f = tmp_path / "leak.jsonl"
    leaked = read_rows(tmp_path / "prep" / "emb_eval")[0]
    f.write_text(json.dumps({"question": leaked["question"], "answer": f"#### {leaked['answer']}"}) + "\n")
    cfg2 = _cfg(tmp_path, [{"name": "embedded", "format": "embedded"}, {"name": "leak", "format": "gsm8k", "path": str(f)}],
                [{"name": "emb_eval", "format": "embedded", "split": "eval", "limit": 20}],
                embedded_train_size=200, embedded_eval_size=40)
    assert run(cfg2)["train"]["contaminated"] == 1


def test_eval_sets_are_prepared_alone_without_a_training_set(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [], [{"name": "emb_eval", "format": "embedded", "split": "eval", "limit": 20}],
               embedded_eval_size=40)
    stats = run(cfg)
    assert set(stats) == {"emb_eval"} and stats["emb_eval"]["kept"] == 20
    assert len(read_rows(tmp_path / "prep" / "emb_eval")) == 20
    assert not (tmp_path / "prep" / "train").exists()  # no empty pool for generate to trip over
    assert set(json.loads((tmp_path / "prep" / "stats.json").read_text())["splits"]) == {"emb_eval"}


def test_no_dataset_at_all_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one dataset"):
        _cfg(tmp_path, [], [])


@pytest.mark.parametrize(
    ("fmt", "rel", "count", "answer_type"),
    [
        ("gsm8k", "gsm8k/train.jsonl", 7473, "number"),
        ("gsm8k", "gsm8k/test.jsonl", 1319, "number"),
        ("svamp", "svamp/SVAMP.json", 1000, "number"),
        ("csqa", "csqa/dev_rand_split.jsonl", 1221, "choice"),
        ("strategyqa", "strategyqa/task.json", 2289, "yesno"),
    ],
)
def test_real_reference_datasets_load_in_full(tmp_path: Path, shared_data: Path, fmt: str, rel: str, count: int, answer_type: str) -> None:
    spec = {"name": fmt, "format": fmt, "path": str(shared_data / rel)}
    cfg = _cfg(tmp_path, [spec])  # on_bad_row: error, so every gold must parse
    stats = run(cfg)["train"]
    assert stats["read"] == count and stats["kept"] == count, stats
    rows = read_rows(tmp_path / "prep" / "train")
    assert len({r["id"] for r in rows}) == count
    assert {r["answer_type"] for r in rows} == {answer_type}
    if answer_type == "number":
        assert all(Q.canonical_answer(r["answer"], "number") == r["answer"] for r in rows)
    if answer_type == "choice":
        assert all(len(r["choices"]) == 5 and r["answer"] in "ABCDE" for r in rows)
    if answer_type == "yesno":
        assert {r["answer"] for r in rows} == {"yes", "no"}
    files = sorted(str(f) for f in (tmp_path / "prep" / "train").glob("shard-*.arrow"))
    ds = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == count and set(ds.column_names) == set(QUESTION_SCHEMA.names)


def test_real_svamp_question_text(tmp_path: Path, shared_data: Path) -> None:
    rows = list(Q.load_svamp(shared_data / "svamp" / "SVAMP.json"))
    first = json.loads((shared_data / "svamp" / "SVAMP.json").read_text())[0]
    assert rows[0].question.startswith(first["Body"].strip()) and rows[0].question.endswith(first["Question"].strip())


def test_cpu_real_study_pool_shares_no_question_with_its_eval_splits(tmp_path: Path, shared_data: Path) -> None:
    """configs/cpu-real.yaml's own prepare section, on the real files: the SVAMP training pool is SVAMP
    minus the 300 held-out questions, and no pool question appears in any eval split. Without
    decontamination the same config would train on all 300 of them."""
    root = Path(__file__).resolve().parent.parent
    params = deep_merge(read_params(root / "params.yaml"), read_params(root / "configs" / "cpu-real.yaml"))
    section = {**params["prepare"], "out_dir": str(tmp_path / "prep"), "shared_dir": str(shared_data)}
    stats = run(from_dict(PrepareConfig, section))
    assert stats["train"]["contaminated"] == 300 and stats["train"]["kept"] == 700
    evals = [spec["name"] for spec in section["eval"]]
    assert evals == ["svamp", "gsm8k", "csqa", "strategyqa"]
    keys = {name: {Q.question_key(r["question"], r["choices"]) for r in read_rows(tmp_path / "prep" / name)}
            for name in ["train", *evals]}
    assert len(keys["svamp"]) == 300
    assert all(not keys["train"] & keys[name] for name in evals)

    leaky = run(from_dict(PrepareConfig, {**section, "decontaminate": False, "out_dir": str(tmp_path / "leaky")}))
    pool = {Q.question_key(r["question"], r["choices"]) for r in read_rows(tmp_path / "leaky" / "train")}
    assert leaky["train"]["kept"] == 1000 and len(pool & keys["svamp"]) == 300
