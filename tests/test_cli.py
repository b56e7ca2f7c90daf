"""The `mind` command line: stages listed, every parameter documented, errors without tracebacks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from stages.app import app
from stages.prepare import PrepareConfig

runner = CliRunner()


def test_help_lists_stages() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in ("models", "prepare"):
        assert stage in result.output


def test_prepare_help_documents_every_parameter() -> None:
    result = runner.invoke(app, ["prepare", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for f in dataclasses.fields(PrepareConfig):
        assert f"--{f.name.replace('_', '-')}" in result.output, f.name
        assert f.metadata["help"].split(";")[0][:30] in " ".join(result.output.split())


def test_overrides_and_clear_errors(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  train: [{name: embedded, format: embedded}]\n  embedded_train_size: 30\n"
                      "  embedded_eval_size: 10\n")
    out = tmp_path / "prep"
    result = runner.invoke(app, ["prepare", "--params", str(params), "--out-dir", str(out), "--limit", "7",
                                 "--eval", "[{name: e, format: embedded, split: eval}]"])
    assert result.exit_code == 0, result.output
    assert (out / "train" / "manifest.json").exists() and (out / "e" / "manifest.json").exists()

    params.write_text("prepare:\n  train: [{name: embedded, format: embedded}]\n  limit: -1\n")
    proc = subprocess.run([sys.executable, "-m", "stages.app", "prepare", "--params", str(params)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "prepare.limit must be positive" in proc.stderr and "Traceback" not in proc.stderr


def test_params_override_merges_and_validates(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    params = tmp_path / "params.yaml"
    params.write_text((root / "params.yaml").read_text())
    result = runner.invoke(app, ["params", str(root / "configs" / "paper.yaml"), "--params", str(params)])
    assert result.exit_code == 0, result.output
    import yaml

    merged = yaml.safe_load(params.read_text())
    paper = yaml.safe_load((root / "configs" / "paper.yaml").read_text())
    assert merged["prepare"]["train"] == paper["prepare"]["train"]
    assert merged["report"] == yaml.safe_load((root / "params.yaml").read_text())["report"] | paper.get("report", {})
    before = params.read_text()
    bad = tmp_path / "bad.yaml"
    for text in ("prepare: {limit: -3}\n", "evalute: {max_tokens: 64}\n"):  # a bad value; a misspelt stage
        bad.write_text(text)
        assert runner.invoke(app, ["params", str(bad), "--params", str(params)]).exit_code == 2, text
        assert params.read_text() == before
