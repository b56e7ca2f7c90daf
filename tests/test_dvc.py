"""DVC wiring: a cold `dvc repro` of models+prepare, a no-change rerun, and a param change."""

from __future__ import annotations

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
    """The project's tracked and untracked-but-not-ignored files, in a new git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run([f"{bindir}/dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_repro_cold_then_cached_then_param_change(tmp_path: Path, shared_data: Path) -> None:
    repo = _project_copy(tmp_path / "repo")
    # the copy sits elsewhere, so point '{shared}' paths at the real reference data
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["shared_dir"] = str(shared_data)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    cold = _dvc(repo, "repro", "models", "prepare")
    assert "Running stage 'models'" in cold.stdout and "Running stage 'prepare'" in cold.stdout
    assert (repo / "data/models/smollm2-135m-instruct/model.safetensors").exists()
    assert (repo / "data/prepared/train/manifest.json").exists()

    start = time.monotonic()
    warm = _dvc(repo, "repro", "models", "prepare")
    assert time.monotonic() - start < 15
    assert "Running stage" not in warm.stdout
    assert "Stage 'models' didn't change" in warm.stdout and "Stage 'prepare' didn't change" in warm.stdout

    params["prepare"]["limit"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(repo, "repro", "models", "prepare")
    assert "Running stage 'prepare'" in changed.stdout and "Running stage 'models'" not in changed.stdout
    manifest = yaml.safe_load((repo / "data/prepared/train/manifest.json").read_text())
    assert manifest["num_rows"] == 50
