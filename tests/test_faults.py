"""Fault injection: what a new user's mistakes and a damaged disk do to the pipeline.

One case per kind of mistake or damage: damaged or unrecorded shards, undecodable bytes, empty
inputs, typos in params.yaml, malformed YAML, nested field maps, misleading messages, and then
one case per class of bad input. Each checks the message a user sees, the exit code, and that
nothing was lost, written elsewhere or silently accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import questions as Q
from pipeline.config import ConfigError, from_dict
from pipeline.engine import Completion
from pipeline.generation import Sampling
from pipeline.shards import (QUESTION_SCHEMA, RUN_MARKER, ShardError, read_rows, read_shard, read_table, verify,
                             write_shards)
from stages import generate as generate_stage
from stages.app import app, validate_params
from stages.prepare import PrepareConfig, run as prepare_run

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def mind(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh process: what a user sees on stderr, and the exit code."""
    return subprocess.run([sys.executable, "-m", "stages.app", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single logged error line of a failed command (no traceback, nothing else)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and " ERROR " in lines[0], proc.stderr
    return lines[0]


def _prepare_params(path: Path, data_file: Path, out: Path, **extra: Any) -> Path:
    section = {"train": [{"name": "g", "format": "gsm8k", "path": str(data_file)}], "out_dir": str(out), **extra}
    path.write_text(yaml.safe_dump({"prepare": section}))
    return path


# ================================================================ 1. resume never trusts an unverified shard


class _Tokenizer:
    """Just enough of a tokenizer for ``chat_prompts``."""

    chat_template = "plain"
    name_or_path = "scripted"
    bos_token = None

    def apply_chat_template(self, conv: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        return "\n".join(m["content"] for m in conv) + "\nassistant:"


class ScriptedTeacher:
    """Stands in for ``HFGenerator``: each prompt's text is a function of the prompt, so a rerun
    reproduces a run exactly; ``kill_at`` makes the n-th ``generate`` call die like a kill."""

    calls = 0
    kill_at: int | None = None

    def __init__(self, model_dir: str, dtype: str, batch_size: int) -> None:
        self.tokenizer = _Tokenizer()
        self.batch_size = batch_size

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        ScriptedTeacher.calls += 1
        if ScriptedTeacher.calls == ScriptedTeacher.kill_at:
            raise SystemExit("killed")
        return [[Completion(f"rationale {hashlib.sha256(p.encode()).hexdigest()[:16]} #{j}. The answer is 1.", 9,
                            "stop") for j in range(sampling.n)] for p in prompts]

    def close(self) -> None:
        pass


def _questions(tmp_path: Path, n: int = 6) -> Path:
    rows = [{"id": f"q{i}", "task": "t", "question": f"What is {i} + 1?", "answer": str(i + 1),
             "answer_type": "number", "choices": [], "source": "test"} for i in range(n)]
    write_shards(tmp_path / "questions", rows, QUESTION_SCHEMA, {})
    return tmp_path / "questions"


def _generate_params(tmp_path: Path, out: Path) -> Path:
    section = {"teachers": [{"name": "t", "model": "scripted"}], "backend": "transformers",
               "questions_dir": str(_questions(tmp_path)), "out_dir": str(out),
               "perspectives": ["Intuitive", "Planning"], "shard_size": 2, "max_tokens": 8}
    path = tmp_path / f"params-{out.name}.yaml"
    path.write_text(yaml.safe_dump({"generate": section}))
    return path


def _row_keys(out: Path) -> list[tuple[Any, ...]]:
    return sorted(tuple(r.values()) for r in read_rows(out))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(path: Path) -> None:
    path.unlink()


def _forget(path: Path) -> None:
    """A kill between the shard's rename and its record: the shard is complete but unrecorded."""
    marker = path.parent / RUN_MARKER
    state = json.loads(marker.read_text())
    state["shards"] = [e for e in state["shards"] if e["file"] != path.name]
    marker.write_text(json.dumps(state))


@pytest.mark.parametrize(("damage", "reason"), [(_flip, "is corrupted (sha256"), (_truncate, "is corrupted (sha256"),
                                                (_delete, "is missing"), (_forget, "is not recorded as complete")],
                         ids=["flipped-byte", "truncated", "missing", "unrecorded"])
def test_resume_regenerates_a_damaged_kept_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, damage: Any, reason: str
) -> None:
    monkeypatch.setattr(generate_stage, "HFGenerator", ScriptedTeacher)
    monkeypatch.setattr(ScriptedTeacher, "calls", 0)
    # The reference: one uninterrupted run.
    ref = tmp_path / "reference"
    assert runner.invoke(app, ["generate", "--params", str(_generate_params(tmp_path, ref))]).exit_code == 0
    expected = _row_keys(ref)
    assert len(expected) == 6 * 2

    # A run killed during its third shard leaves two complete shards, their record, no manifest.
    out = tmp_path / "out"
    params = _generate_params(tmp_path, out)
    monkeypatch.setattr(ScriptedTeacher, "calls", 0)
    monkeypatch.setattr(ScriptedTeacher, "kill_at", 3)
    killed = runner.invoke(app, ["generate", "--params", str(params)])
    assert killed.exit_code != 0 and not (out / "manifest.json").exists()
    assert [e["file"] for e in json.loads((out / RUN_MARKER).read_text())["shards"]] == [
        "shard-00000.arrow", "shard-00001.arrow"]

    damage(out / "shard-00000.arrow")
    monkeypatch.setattr(ScriptedTeacher, "kill_at", None)
    caplog.set_level(logging.INFO)
    rerun = runner.invoke(app, ["generate", "--params", str(params)])
    assert rerun.exit_code == 0, (rerun.output, caplog.text)
    assert f"resume: shard shard-00000.arrow {reason}" in caplog.text
    assert "its rows will be generated again" in caplog.text
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["rejected_shards"]) == ["shard-00000.arrow"]
    assert stats["resumed_shards"] == 1 and stats["resumed_rows"] == 4 and stats["generated_rows"] == 8
    # Nothing lost, nothing duplicated, nothing corrupted: the same rows as the clean run, verified.
    verify(out)
    assert _row_keys(out) == expected
    assert not (out / RUN_MARKER).exists()


def test_truncated_shard_is_named_not_an_anonymous_oserror(tmp_path: Path) -> None:
    write_shards(tmp_path / "out", [{"id": "a"}] * 50, pa.schema([("id", pa.string())]), {})
    shard = tmp_path / "out" / "shard-00000.arrow"
    _truncate(shard)
    with pytest.raises(ShardError, match=rf"{shard}: shard does not parse as Arrow"):
        read_shard(shard)
    with pytest.raises(ShardError, match="shard-00000.arrow is corrupted"):
        read_table(tmp_path / "out")


# ================================================================ 2. a non-UTF-8 byte in an input file


def test_non_utf8_byte_names_file_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "gsm.jsonl"
    f.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n'
                  b'{"question": "2+2\xff?", "answer": "#### 4"}\n')
    out = tmp_path / "prep"
    line = one_line_error(mind("prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", f, out))))
    assert f"{f}:2: question: not valid UTF-8 (byte 0xff at column 18)" in line
    assert not out.exists()


def test_non_utf8_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    jsonl = tmp_path / "gsm.jsonl"
    jsonl.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "#### \xfe4"}\n'
                      b'{"question": "3+3?", "answer": "#### 6"}\n')
    csv = tmp_path / "extra.csv"
    csv.write_bytes(b"q,a\n5+5?,10\n6+\xff6?,12\n")
    svamp = tmp_path / "svamp.json"
    svamp.write_bytes(b'[{"Body": "Tom has 3 apples.", "Question": "How many?", "Answer": 3},'
                      b' {"Body": "Ann has 4 \xe9ggs.", "Question": "How many?", "Answer": 4}]')
    cfg = from_dict(PrepareConfig, {
        "train": [{"name": "g", "format": "gsm8k", "path": str(jsonl)},
                  {"name": "c", "format": "generic", "path": str(csv), "answer_type": "number",
                   "fields": {"question": "q", "answer": "a"}},
                  {"name": "s", "format": "svamp", "path": str(svamp)}],
        "out_dir": str(tmp_path / "prep"), "on_bad_row": "skip"})
    assert str(list(Q.load_generic(csv, {"question": "q", "answer": "a"}))[1]) == f"{csv}:3: q: not valid UTF-8 (byte 0xff)"
    assert str(list(Q.load_svamp(svamp))[1]) == f"{svamp}:record 1: Body: not valid UTF-8 (byte 0xe9)"
    stats = prepare_run(cfg)["train"]
    assert stats["read"] == 7 and stats["bad"] == 3 and stats["kept"] == 4
    assert stats["bad:answer"] == 1 and stats["bad:q"] == 1 and stats["bad:Body"] == 1
    saved = json.loads((tmp_path / "prep" / "stats.json").read_text())["splits"]["train"]
    assert saved["bad"] == 3
    assert sorted(r["question"] for r in read_rows(tmp_path / "prep" / "train")) == [
        "1+1?", "3+3?", "5+5?", "Tom has 3 apples. How many?"]


# ================================================================ 3. an empty input file


def test_empty_input_file_is_an_error_naming_it(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    out = tmp_path / "prep"
    line = one_line_error(mind("prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", f, out))))
    assert f"prepare: g: {f} holds no records" in line
    assert not out.exists()  # no 0-row split for a later stage to trip over


# ================================================================ 4. a typo'd section in params.yaml


def test_every_stage_rejects_a_typod_section_suggesting_the_stage(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evalute"] = {"max_tokens": 10}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("prepare", "evaluate"):
        line = one_line_error(mind(stage, "--params", str(path), "--out-dir", str(tmp_path / stage)))
        assert f"{stage}: {path}: unknown section 'evalute' (did you mean 'evaluate'?)" in line
        assert not (tmp_path / stage).exists()


def test_a_bad_key_in_another_section_stops_this_stage(tmp_path: Path) -> None:
    f = tmp_path / "gsm.jsonl"
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    out = tmp_path / "prep"
    path = _prepare_params(tmp_path / "p.yaml", f, out)
    params = yaml.safe_load(path.read_text())
    params["filter"] = {"min_tokns": 3}
    path.write_text(yaml.safe_dump(params))
    line = one_line_error(mind("prepare", "--params", str(path)))
    assert "prepare: filter: unknown parameter(s) ['min_tokns']; did you mean 'min_tokens' for 'min_tokns'?" in line
    assert not out.exists()


# ================================================================ 5. malformed YAML: one line, file, line, column


def _merge_override(tmp_path: Path, override: Path) -> tuple[str, bool]:
    """`mind params OVERRIDE` on a copy of params.yaml: its one error line, and whether the copy is unchanged."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    before = params.read_text()
    line = one_line_error(mind("params", str(override), "--params", str(params)))
    return line, params.read_text() == before


def test_malformed_override_file_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare:\n  limit: 3\n  seed: [1, 2\n")
    line, unchanged = _merge_override(tmp_path, bad)
    assert f"params: {bad}: malformed YAML at line 4, column 1: expected ',' or ']', but got '<stream end>'" in line
    assert unchanged


def test_missing_override_file_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    line, unchanged = _merge_override(tmp_path, tmp_path / "nope.yaml")
    assert f"params: {tmp_path / 'nope.yaml'}: params override not found" in line
    assert unchanged


def test_malformed_yaml_option_names_line_and_column() -> None:
    line = one_line_error(mind("generate", "--engine", "{dtype: float32"))
    assert ("generate: --engine: malformed YAML at line 1, column 16: expected ',' or '}', but got '<stream end>' "
            "(while parsing a flow mapping)") in line


# ================================================================ 6. the generic loader reaches into nested fields


def test_field_map_takes_dotted_paths_and_list_indexes(tmp_path: Path) -> None:
    f = tmp_path / "nested.json"
    f.write_text(json.dumps([
        {"q": "Tom has 38 apples and buys 1. How many?", "answers": [39.0], "meta": {"answer": 39, "uid": "a"}},
        {"q": "Ann has 2 pens and buys 2. How many?", "answers": [4], "meta": {"answer": 4, "uid": "b"}},
    ]))
    for answer, field_id in (("answers.0", "meta.uid"), ("meta.answer", None)):
        fields = {"question": "q", "answer": answer, **({"id": field_id} if field_id else {})}
        rows = [Q.normalise(r, "n", "number", "generic") for r in Q.load_generic(f, fields)]
        assert [r["answer"] for r in rows] == ["39", "4"], answer  # type: ignore[index]
        if field_id:
            assert [r["id"] for r in rows] == ["n-a", "n-b"]  # type: ignore[index]
    bad = list(Q.load_generic(f, {"question": "q", "answer": "answers.1"}))
    assert str(bad[0]) == f"{f}:record 0: answers.1: missing field (no item 1 in a list of 1)"
    bad = list(Q.load_generic(f, {"question": "q", "answer": "meta.answer.x"}))
    assert str(bad[0]) == f"{f}:record 0: meta.answer.x: missing field (looked for 'x' inside a number: 39)"


# ================================================================ 7. messages


def test_unterminated_string_says_at_once(tmp_path: Path) -> None:
    f = tmp_path / "gsm.jsonl"
    f.write_text('{"question": "1+1?", "answer": "x #### 2"}\n{"question": "oops')  # cut off at the end
    line = one_line_error(mind("prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", f, tmp_path / "o"))))
    assert f"{f}:2: <line>: unparseable JSON: Unterminated string starting at column 14" in line
    assert "at at" not in line


def test_numeric_question_is_a_wrong_type(tmp_path: Path) -> None:
    f = tmp_path / "nums.jsonl"
    f.write_text('{"q": 42, "a": 1}\n')
    bad = Q.normalise(next(Q.load_generic(f, {"question": "q", "answer": "a"})), "n", "number", "generic")
    assert str(bad) == f"{f}:1: question: expected a string, got a number: 42"


def test_section_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^p.yaml: section distill must be a mapping, got a list$"):
        validate_params({"distill": [1, 2]}, "p.yaml")
    override = tmp_path / "o.yaml"
    override.write_text("distill: [1, 2]\n")
    line, unchanged = _merge_override(tmp_path, override)
    assert f"params: {override}: section distill must be a mapping, got a list" in line
    assert unchanged


def test_empty_student_folder_says_run_distill(tmp_path: Path) -> None:
    (tmp_path / "students" / "mind").mkdir(parents=True)
    rows = [{"id": "e1", "task": "e", "question": "1+1?", "answer": "2", "answer_type": "number", "choices": [],
             "source": "test"}]
    write_shards(tmp_path / "prep" / "arith", rows, QUESTION_SCHEMA, {})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {
        "model": "mind", "students_dir": str(tmp_path / "students"), "prepared_dir": str(tmp_path / "prep"),
        "datasets": [{"name": "arith"}], "out_dir": str(tmp_path / "eval"), "metrics_dir": str(tmp_path / "m")}}))
    proc = mind("evaluate", "--params", str(params))  # vLLM's import may log first: look for the error line
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert (f"evaluate: student mind: no merged model or adapter in {tmp_path / 'students' / 'mind'} "
            "(`mind distill --method <method> --seed <seed>` writes <students_dir>/<method>-s<seed>)") in errors[0]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "m").exists()


# ================================================================ bad input: one line, a counted skip, nothing lost


def _write_params(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def cli_error(caplog: pytest.LogCaptureFixture, *args: str) -> str:
    """The one error line of a command run in this process (faster than ``mind``): exit code 2,
    no exception escaping, one logged error without a line break."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = runner.invoke(app, list(args))
    assert result.exit_code == 2, (result.output, result.exception, caplog.text)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def _folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_malformed_values_are_bad_rows_never_a_silently_wrong_gold(tmp_path: Path) -> None:
    f = tmp_path / "g.jsonl"
    f.write_text("\n".join([
        '{"q": "A comma as a decimal point?", "a": "1,5"}',
        '{"q": "Commas in the wrong places?", "a": "12,34,5"}',
        '{"q": "A gold past a float\'s precision?", "a": 9007199254740993.5}',
        '{"q": "Thousands?", "a": "1,250.00"}',
        '{"q": "\\u200b", "a": "1"}',
        '{"q": "\\ufeff", "a": "1"}',
        '{"q": "A null id?", "a": "2", "id": null}',
        '{"q": "A lone surrogate \\ud83d?", "a": "3"}',
    ]) + "\n")
    svamp = tmp_path / "svamp.json"
    svamp.write_text(json.dumps([{"ID": "s1", "Body": None, "Question": "How many?", "Answer": 3}]))
    csqa = tmp_path / "csqa.jsonl"
    csqa.write_text(json.dumps({"id": "c1", "answerKey": "A", "question": {
        "stem": "Which?", "choices": [{"label": "A", "text": None}, {"label": "B", "text": "b"}]}}) + "\n"
        + json.dumps({"id": "c2", "answerKey": "A", "question": {"stem": "Which?", "choices": ["a", "b"]}}) + "\n")
    strategy = tmp_path / "strategyqa.json"
    strategy.write_text(json.dumps({"examples": [{"input": "Yes?", "target_scores": {"Yes": "1", "No": "0"}},
                                                 {"input": "No?", "target_scores": {"Yes": None, "No": 1}}]}))
    fields = {"question": "q", "answer": "a", "id": "id"}
    got = [Q.normalise(r, "g", "number", "generic") if isinstance(r, Q.RawQuestion) else r
           for r in Q.load_generic(f, {"question": "q", "answer": "a"})]
    assert [str(r) if isinstance(r, Q.BadRow) else r["answer"] for r in got] == [
        f"{f}:1: answer: not a number: '1,5'", f"{f}:2: answer: not a number: '12,34,5'",
        "9007199254740993.5", "1250", f"{f}:5: question: empty question", f"{f}:6: question: empty question",
        "2", f"{f}:8: question: lone surrogate U+D83D (not encodable as UTF-8)"]
    null_id = list(Q.load_generic(f, fields))[6]
    assert str(null_id) == f"{f}:7: id: expected a string or an integer id, got null"
    assert str(next(Q.load_svamp(svamp))) == f"{svamp}:record 0: Body: expected a string, got null"
    assert [str(r) for r in Q.load_csqa(csqa)] == [
        f"{csqa}:1: question.choices.0.text: expected a string, got null",
        f"{csqa}:2: question.choices.0: expected a mapping with label and text, got a string: 'a'"]
    assert [str(r) for r in Q.load_strategyqa(strategy)] == [
        f"{strategy}:record 0: target_scores.Yes: expected a number, got a string: '1'",
        f"{strategy}:record 1: target_scores.Yes: expected a number, got null"]

    cfg = from_dict(PrepareConfig, {"train": [{"name": "g", "format": "generic", "path": str(f),
                                               "answer_type": "number", "fields": {"question": "q", "answer": "a"}}],
                                    "out_dir": str(tmp_path / "prep"), "on_bad_row": "skip"})
    stats = prepare_run(cfg)["train"]
    assert stats["read"] == 8 and stats["bad"] == 5 and stats["kept"] == 3
    assert stats["bad:answer"] == 2 and stats["bad:question"] == 3


def test_ids_are_unique_across_the_training_pool_and_where_filter_keys_by_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = tmp_path / "a" / "x.json"
    a.write_text(json.dumps([{"q": "1+1?", "a": 2, "id": 1}, {"q": "2+2?", "a": 4, "id": 2}]))
    b = tmp_path / "b" / "x.json"
    b.write_text(json.dumps([{"q": "3+3?", "a": 6, "id": 2}]))
    spec = {"name": "pool", "format": "generic", "answer_type": "number",
            "fields": {"question": "q", "answer": "a", "id": "id"}}
    params = _write_params(tmp_path / "p.yaml", prepare={
        "train": [{**spec, "path": str(a)}, {**spec, "path": str(b)}], "out_dir": str(tmp_path / "prep")})
    line = cli_error(caplog, "prepare", "--params", str(params))
    assert "prepare: prepare.train: id pool-2 is used by two different questions, in datasets pool and pool" in line
    assert not (tmp_path / "prep").exists()

    from stages.filter import load_questions

    rows = [{"id": "q1", "task": "t", "question": f"What is {i}?", "answer": str(i), "answer_type": "number",
             "choices": [], "source": "test"} for i in (1, 2)]
    write_shards(tmp_path / "questions", rows, QUESTION_SCHEMA, {})
    with pytest.raises(ShardError, match=r"questions: question id 'q1' is used by two questions"):
        load_questions(tmp_path / "questions")


@pytest.mark.parametrize("name", ["..", ".", "stats.json", "a/b", ".hidden", "x" * 101])
def test_a_dataset_name_that_is_not_a_plain_name_is_refused_and_nothing_is_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    out = tmp_path / "root" / "prep"
    params = _write_params(tmp_path / "p.yaml", prepare={
        "train": [{"name": "e", "format": "embedded"}], "embedded_train_size": 20, "embedded_eval_size": 5,
        "eval": [{"name": name, "format": "embedded", "split": "eval"}], "out_dir": str(out)})
    line = cli_error(caplog, "prepare", "--params", str(params))
    assert "must be a plain name" in line and len(line) < 400
    assert not (tmp_path / "root").exists()


def _damaged_manifest(tmp_path: Path, change: Any) -> Path:
    out = tmp_path / "out"
    write_shards(out, [{"id": str(i)} for i in range(10)], pa.schema([("id", pa.string())]), {}, shard_size=4)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(change(manifest, out)))
    return out


def _extra_shard(m: dict[str, Any], out: Path) -> dict[str, Any]:
    (out / "shard-00003.arrow").write_bytes((out / "shard-00000.arrow").read_bytes())
    return m


def _lying_rows(m: dict[str, Any], out: Path) -> dict[str, Any]:
    return {**m, "num_rows": 8}


def _no_sha256(m: dict[str, Any], out: Path) -> dict[str, Any]:
    del m["shards"][1]["sha256"]
    return m


def _escape(m: dict[str, Any], out: Path) -> dict[str, Any]:
    m["shards"][0]["file"] = "../../x"
    return m


@pytest.mark.parametrize(("change", "message"), [
    (_extra_shard, r"out: shard shard-00003.arrow is not listed in the manifest"),
    (_lying_rows, r"manifest.json: num_rows 8, but its shards hold 10"),
    (_no_sha256, r"manifest.json: shard shard-00001.arrow: sha256 None is not a sha256 digest"),
    (_escape, r"manifest.json: shards\[0\].file: '../../x' is not a shard file name"),
    (lambda m, out: m["shards"], r"manifest.json: expected a JSON object, got a list"),
], ids=["extra-shard", "wrong-num-rows", "missing-sha256", "path-outside", "a-list"])
def test_a_manifest_is_the_complete_listing_of_its_folder(tmp_path: Path, change: Any, message: str) -> None:
    out = _damaged_manifest(tmp_path, change)
    with pytest.raises(ShardError, match=message):
        read_table(out)


def test_a_failure_while_writing_leaves_the_previous_output_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline import shards
    from stages import report

    out = tmp_path / "prep"
    section = {"train": [{"name": "e", "format": "embedded"}], "embedded_train_size": 20, "embedded_eval_size": 5,
               "eval": [{"name": "held", "format": "embedded", "split": "eval"}], "out_dir": str(out)}
    params = _write_params(tmp_path / "p.yaml", prepare=section)
    assert runner.invoke(app, ["prepare", "--params", str(params)]).exit_code == 0
    before = _folder_state(out)

    write_table = shards._write_table
    calls = {"n": 0}

    def disk_full_on_the_second_split(path: Path, table: pa.Table) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(path))
        write_table(path, table)

    monkeypatch.setattr(shards, "_write_table", disk_full_on_the_second_split)
    section["seed"] = 1
    line = cli_error(caplog, "prepare", "--params", str(_write_params(tmp_path / "p.yaml", prepare=section)))
    assert "No space left on device" in line and ".tmp-" in line
    assert _folder_state(out) == before
    assert [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name] == []

    # report: summary.md, paired.json and the plot are replaced together or not at all
    monkeypatch.setattr(shards, "_write_table", write_table)
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for model, acc in (("base", 0.5), ("mind", 0.6)):
        (metrics / f"{model}.json").write_text(json.dumps({
            "id": {"d": {"n": 10, "correct": int(10 * acc), "accuracy": acc, "ci_low": 0.2, "ci_high": 0.8}},
            "ood": {}, "avg": {"id": acc, "all": acc}}))
    cfg = from_dict(report.ReportConfig, {
        "metrics_dir": str(metrics), "summary": str(tmp_path / "r" / "summary.md"),
        "plot": str(tmp_path / "r" / "a.png"),
        "paired_metrics": str(tmp_path / "r" / "paired.json"), "compare_to": [], "eval_dir": str(tmp_path / "eval")})
    report.run(cfg)
    before = _folder_state(tmp_path / "r")
    (metrics / "mind.json").write_text((metrics / "mind.json").read_text().replace("0.6", "0.7"))
    def disk_full(path: Path, data: bytes) -> None:  # the plot, written last
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report, "atomic_write_bytes", disk_full)
    with pytest.raises(OSError):
        report.run(cfg)
    assert _folder_state(tmp_path / "r") == before
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["a.png", "paired.json", "summary.md"]


def test_expected_os_failures_and_wrong_types_are_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "a-folder.jsonl"
    folder.mkdir()
    out = tmp_path / "prep"
    line = cli_error(caplog, "prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", folder, out)))
    assert line.endswith(f"prepare: {folder}: Is a directory")

    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    real_open = open

    def no_permission(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(f):
            raise PermissionError(13, "Permission denied", str(f))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_permission)
    line = cli_error(caplog, "prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", f, out)))
    assert line.endswith(f"prepare: {f}: Permission denied")
    monkeypatch.undo()

    for value, kind in ((None, "null"), ([1, 2], "a list")):
        line = cli_error(caplog, "prepare", "--params", str(_write_params(tmp_path / "p.yaml", prepare={
            "train": [{"name": "g", "format": "gsm8k", "path": str(f)}], "out_dir": value})))
        assert f"prepare.out_dir: expected a path, got {kind}" in line

    import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    line = cli_error(caplog, "prepare", "--params", str(_write_params(tmp_path / "p.yaml", prepare={
        "train": [{"name": "h", "format": "hub", "path": "org/set", "answer_type": "number",
                   "fields": {"question": "q", "answer": "a"}}], "out_dir": str(out)})))
    assert "prepare: org/set[train]: Couldn't reach 'org/set' on the Hub (OfflineModeIsEnabled)" in line
    monkeypatch.undo()

    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"question": ' + "[" * 200_000 + "]" * 200_000 + ', "answer": "#### 1"}\n'
                    '{"question": "1+1?", "answer": "#### 2"}\n')
    line = cli_error(caplog, "prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", deep, out)))
    assert f"{deep}:1: <line>: unparseable JSON: nested too deeply" in line

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "base.json").write_text(json.dumps({
        "id": {"d": {"n": 10, "correct": 5, "accuracy": None, "ci_low": 0.2, "ci_high": 0.8}}, "ood": {},
        "avg": {"id": 0.5}}))
    line = cli_error(caplog, "report", "--params", str(_write_params(tmp_path / "r.yaml", report={
        "metrics_dir": str(metrics), "summary": str(tmp_path / "s.md"), "plot": str(tmp_path / "a.png"),
        "paired_metrics": str(tmp_path / "p.json")})))
    assert f"{metrics / 'base.json'}: id.d.accuracy must be a number, got null" in line


def test_params_validation_checks_nested_keys_duplicates_and_finite_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "g.json"
    f.write_text("[]")
    spec = {"name": "g", "format": "generic", "path": str(f), "answer_type": "number",
            "fields": {"question": "q", "answer": "a", "idd": "id"}}
    with pytest.raises(ConfigError, match=r"g: unknown key\(s\) \['idd'\] in fields"):
        from_dict(PrepareConfig, {"train": [spec]})
    with pytest.raises(ConfigError, match=r"generate.temperature: expected a finite number, got inf"):
        validate_params({"generate": {"temperature": float("inf")}}, "p.yaml")
    with pytest.raises(ConfigError, match=r"generate.engine: unknown parameter\(s\) \['dtyp'\]"):
        validate_params({"generate": {"engine": {"dtyp": "auto"}}}, "p.yaml")
    dup = tmp_path / "dup.yaml"
    dup.write_text("prepare:\n  seed: 1\n  limit: 3\n  seed: 2\n")
    line = cli_error(caplog, "prepare", "--params", str(dup))
    assert f"{dup}: malformed YAML at line 4, column 3: duplicate key 'seed' (first at line 2)" in line

    # `mind params` edits only the lines the override changes: every comment stays
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    override = tmp_path / "o.yaml"
    override.write_text("report:\n  seed: 7  # a new seed\n")
    assert runner.invoke(app, ["params", str(override), "--params", str(params)]).exit_code == 0
    old, new = (REPO / "params.yaml").read_text().splitlines(), params.read_text().splitlines()
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(old) == len(new) and changed == [("  seed: 0", "  seed: 7  # a new seed")]


def test_messages_name_physical_lines_read_bom_files_and_stay_short(tmp_path: Path) -> None:
    import time

    csv_file = tmp_path / "q.csv"
    csv_file.write_bytes("\ufeffq,a\n\"Two\nlines?\",2\n\"Bad\",1,5\nx,1\n".encode())
    rows = list(Q.load_generic(csv_file, {"question": "q", "answer": "a"}))
    assert isinstance(rows[0], Q.RawQuestion) and rows[0].question == "Two\nlines?" and rows[0].where == f"{csv_file}:2"
    assert str(rows[1]) == f"{csv_file}:4: <row>: 3 fields, the header has 2"
    assert rows[2].where == f"{csv_file}:5"  # type: ignore[union-attr]

    big = "9" * 50_000_000
    start = time.perf_counter()
    bad = Q.normalise(Q.RawQuestion("f:1", "How many?", big), "t", "number", "x")
    huge = Q.normalise(Q.RawQuestion("f:2", "How many?", "1e999999"), "t", "number", "x")
    assert time.perf_counter() - start < 1
    assert isinstance(bad, Q.BadRow) and len(str(bad)) < 200
    assert str(huge) == "f:2: answer: not a number: '1e999999'"

    out = tmp_path / "out"
    write_shards(out, [{"id": "a"}] * 3, pa.schema([("id", pa.string())]), {}, shard_size=2)
    write_shards(tmp_path / "other", [{"id": 1}], pa.schema([("id", pa.int64())]), {})
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "shard-00001.arrow").write_bytes((tmp_path / "other" / "shard-00000.arrow").read_bytes())
    manifest["shards"][1] = {**json.loads((tmp_path / "other" / "manifest.json").read_text())["shards"][0],
                             "file": "shard-00001.arrow"}
    manifest["num_rows"] = 3
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=rf"{out}: shard shard-00001.arrow has schema .*int64.*, shard shard-00000"):
        read_table(out)


def test_distill_settings_are_checked_before_any_division_and_answer_type_is_required(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, embedded_model_dir: Path
) -> None:
    """``distill.ta.heads: 0`` is one line from every stage (it was a ZeroDivisionError in the
    check, before any stage ran), and so is a misspelt key in the nested ``distill.ta``; a filtered set whose rows lack a known ``answer_type`` is an
    error naming file, row and field, not a silent fall-back to the number instruction."""
    from transformers import AutoTokenizer

    from distill_helpers import filtered_rows
    from stages import distill as D
    from stages.filter import FILTERED_SCHEMA

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"distill": {"ta": {"heads": 0}}}))
    line = cli_error(caplog, "prepare", "--params", str(params))
    assert "distill.ta.heads 0 must be >= 1" in line
    params.write_text(yaml.safe_dump({"distill": {"ta": {"heds": 4}}}))
    assert "distill.ta: unknown parameter(s) ['heds']; did you mean 'heads'" in cli_error(
        caplog, "prepare", "--params", str(params))
    # A mapping option merges into the file's mapping: --ta '{lr: ...}' keeps the file's heads 0.
    params.write_text(yaml.safe_dump({"distill": {"ta": {"heads": 0}}}))
    assert "distill.ta.heads 0 must be >= 1" in cli_error(caplog, "distill", "--params", str(params),
                                                          "--ta", "{lr: 0.01}")
    # An older flat key points at the nested one, not at the nearest spelling of distill's own keys.
    params.write_text(yaml.safe_dump({"distill": {"ta_heads": 4}}))
    assert "distill: unknown parameter(s) ['ta_heads']; did you mean 'ta.heads' for 'ta_heads'?" in cli_error(
        caplog, "prepare", "--params", str(params))

    rows = filtered_rows(2)
    rows[1]["answer_type"] = None
    write_shards(tmp_path / "f", rows, FILTERED_SCHEMA, {})
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    with pytest.raises(ConfigError, match=r"f: row 1 \(question_id q000.*field answer_type None is not one of"):
        D.load_units(D.DistillConfig(filtered_dir=tmp_path / "f"), tok)
