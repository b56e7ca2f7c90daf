"""Fault injection: what a new user's mistakes and a damaged disk do to the pipeline.

One named case per finding of issue 13. Each checks the message a user sees, the exit
code, and that nothing was lost or silently accepted.
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
from pipeline.questions import QUESTION_SCHEMA
from pipeline.shards import RUN_MARKER, ShardError, read_rows, read_shard, read_table, verify, write_shards
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
def test_finding1_resume_regenerates_a_damaged_kept_shard(
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


def test_finding1_truncated_shard_is_named_not_an_anonymous_oserror(tmp_path: Path) -> None:
    write_shards(tmp_path / "out", [{"id": "a"}] * 50, pa.schema([("id", pa.string())]), {})
    shard = tmp_path / "out" / "shard-00000.arrow"
    _truncate(shard)
    with pytest.raises(ShardError, match=rf"{shard}: shard does not parse as Arrow"):
        read_shard(shard)
    with pytest.raises(ShardError, match="shard-00000.arrow is corrupted"):
        read_table(tmp_path / "out")


# ================================================================ 2. a non-UTF-8 byte in an input file


def test_finding2_non_utf8_byte_names_file_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "gsm.jsonl"
    f.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n'
                  b'{"question": "2+2\xff?", "answer": "#### 4"}\n')
    out = tmp_path / "prep"
    line = one_line_error(mind("prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", f, out))))
    assert f"{f}:2: question: not valid UTF-8 (byte 0xff at column 18)" in line
    assert not out.exists()


def test_finding2_non_utf8_rows_are_skipped_and_counted(tmp_path: Path) -> None:
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


def test_finding3_empty_input_file_is_an_error_naming_it(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    out = tmp_path / "prep"
    line = one_line_error(mind("prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", f, out))))
    assert f"prepare: g: {f} holds no records" in line
    assert not out.exists()  # no 0-row split for a later stage to trip over


# ================================================================ 4. a typo'd section in params.yaml


def test_finding4_every_stage_rejects_a_typod_section_suggesting_the_stage(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evalute"] = {"max_tokens": 10}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("prepare", "evaluate"):
        line = one_line_error(mind(stage, "--params", str(path), "--out-dir", str(tmp_path / stage)))
        assert f"{stage}: {path}: unknown section 'evalute' (did you mean 'evaluate'?)" in line
        assert not (tmp_path / stage).exists()


def test_finding4_a_bad_key_in_another_section_stops_this_stage(tmp_path: Path) -> None:
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


def test_finding5_malformed_override_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare:\n  limit: 3\n  seed: [1, 2\n")
    line, unchanged = _merge_override(tmp_path, bad)
    assert f"params: {bad}: malformed YAML at line 4, column 1: expected ',' or ']', but got '<stream end>'" in line
    assert unchanged


def test_finding5_missing_override_file(tmp_path: Path) -> None:
    line, unchanged = _merge_override(tmp_path, tmp_path / "nope.yaml")
    assert f"params: {tmp_path / 'nope.yaml'}: params override not found" in line
    assert unchanged


def test_finding5_malformed_yaml_option() -> None:
    line = one_line_error(mind("generate", "--engine", "{dtype: float32"))
    assert ("generate: --engine: malformed YAML at line 1, column 16: expected ',' or '}', but got '<stream end>' "
            "(while parsing a flow mapping)") in line


# ================================================================ 6. the generic loader reaches into nested fields


def test_finding6_field_map_takes_dotted_paths_and_list_indexes(tmp_path: Path) -> None:
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


def test_finding7_unterminated_string_says_at_once(tmp_path: Path) -> None:
    f = tmp_path / "gsm.jsonl"
    f.write_text('{"question": "1+1?", "answer": "x #### 2"}\n{"question": "oops')  # cut off at the end
    line = one_line_error(mind("prepare", "--params", str(_prepare_params(tmp_path / "p.yaml", f, tmp_path / "o"))))
    assert f"{f}:2: <line>: unparseable JSON: Unterminated string starting at column 14" in line
    assert "at at" not in line


def test_finding7_numeric_question_is_a_wrong_type(tmp_path: Path) -> None:
    f = tmp_path / "nums.jsonl"
    f.write_text('{"q": 42, "a": 1}\n')
    bad = Q.normalise(next(Q.load_generic(f, {"question": "q", "answer": "a"})), "n", "number", "generic")
    assert str(bad) == f"{f}:1: question: expected a string, got a number: 42"


def test_finding7_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^p.yaml: section distill must be a mapping, got a list$"):
        validate_params({"distill": [1, 2]}, "p.yaml")
    override = tmp_path / "o.yaml"
    override.write_text("distill: [1, 2]\n")
    line, unchanged = _merge_override(tmp_path, override)
    assert f"params: {override}: section distill must be a mapping, got a list" in line
    assert unchanged


def test_finding7_empty_student_folder_says_run_distill(tmp_path: Path) -> None:
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
            "(run `mind distill --method mind`)") in errors[0]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "m").exists()
