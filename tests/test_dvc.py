"""The whole pipeline under DVC: a cold `dvc repro` of the smoke override, a no-change rerun, and a param change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _project_copy(dest: Path) -> Path:
    """The project's tracked and untracked-but-not-ignored files, less an earlier run's outputs, committed to a
    new git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        # a fresh project: the committed outputs of an earlier run (metrics, reports, dvc.lock) stay behind,
        # or the report would read the metrics of students this run does not train
        if Path(rel).parts[0] in ("metrics", "reports") or rel == "dvc.lock":
            continue
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    # committed, like a clone: dvclive (in distill) needs a HEAD revision
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "copy"],
                   cwd=dest, check=True)
    return dest


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run([f"{bindir}/dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_whole_pipeline_on_the_smoke_override(tmp_path: Path, shared_data: Path) -> None:
    """`mind params configs/smoke.yaml && dvc repro`: every stage runs, every output is complete,
    the metrics are readable by DVC, a second `dvc repro` reruns nothing and takes seconds, and a
    changed param reruns its stage and what follows it, not the stages before."""
    repo = _project_copy(tmp_path / "repo")
    bindir = Path(sys.executable).parent
    subprocess.run([f"{bindir}/mind", "params", "configs/smoke.yaml"], cwd=repo, check=True, capture_output=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["generate"]["num_questions"] == 4 and params["filter"]["min_questions"] == 1  # the override took
    assert params["distill"]["lr"] == 0.001  # ... and kept what it does not name
    params["prepare"]["shared_dir"] = str(shared_data)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    cold = _dvc(repo, "repro")
    methods = [f"{m}-s0" for m in params["distill"]["methods"]]
    stages = ["models", "prepare", "generate", "filter", *(f"distill@{m}-0" for m in params["distill"]["methods"]),
              "evaluate-base", *(f"evaluate@{m}-0" for m in params["distill"]["methods"]), "report", "analyze"]
    for stage in stages:
        assert f"Running stage '{stage}'" in cold.stdout, stage

    # every shard folder has its manifest; every other output its written-last file
    for folder in ["data/prepared/train", "data/prepared/embedded", "data/rationales", "data/filtered",
                   "data/analysis/points", *(f"data/eval/{m}/embedded" for m in ["base", *methods])]:
        assert (repo / folder / "manifest.json").exists(), folder
    assert (repo / "data/models/models.json").exists()
    for m in methods:
        assert (repo / f"data/students/{m}/metrics.json").exists(), m
        assert (repo / f"data/students/{m}/merged/config.json").exists(), m
    assert (repo / "data/students/mind-s0/ta.pt").exists()
    assert (repo / "reports/summary.md").read_text().count("|") > 10
    assert (repo / "reports/accuracy.png").stat().st_size > 0 and (repo / "data/analysis/tsne.png").stat().st_size > 0
    rows = yaml.safe_load((repo / "data/rationales/manifest.json").read_text())["num_rows"]
    assert rows == 4 * 8 * 1

    shown = _dvc(repo, "metrics", "show", "--json")
    base = json.loads(shown.stdout)[""]["data"]["metrics/eval/base.json"]["data"]
    assert base["id"]["embedded"]["n"] == 6 and base["ood"]["csqa"]["n"] == 2

    start = time.monotonic()
    again = _dvc(repo, "repro")
    assert time.monotonic() - start < 30
    assert "Running stage" not in again.stdout, again.stdout

    params["prepare"]["limit"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(repo, "repro", "models", "prepare")
    assert "Running stage 'prepare'" in changed.stdout and "Running stage 'models'" not in changed.stdout
    assert yaml.safe_load((repo / "data/prepared/train/manifest.json").read_text())["num_rows"] == 50
