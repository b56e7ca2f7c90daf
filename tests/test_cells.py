"""reports/cells.py: a study's cells against base, and two arms against each other (``--versus``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from report_helpers import pred_rows, write_predictions

ROOT = Path(__file__).resolve().parents[1]
DATASET = "embedded-val"


def load_cells() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cells", ROOT / "reports" / "cells.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(cell: Path, model: str, right: int, n: int = 10) -> None:
    """One run's eval metrics file and prediction shard: questions 0..right-1 correct, the rest wrong."""
    (cell / "eval").mkdir(parents=True, exist_ok=True)
    (cell / "eval" / f"{model}.json").write_text(json.dumps({"id": {DATASET: {"accuracy": right / n}}}))
    write_predictions(cell / "predictions", pred_rows(model, DATASET, [i < right for i in range(n)]))


def make_cell(root: Path, name: str, runs: dict[str, int]) -> None:
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "filter.json").write_text(json.dumps({"questions_kept": 3, "rows_kept": 12}))
    for model, right in runs.items():
        write_run(cell, model, right)


def test_versus_pairs_each_method_by_seed_and_pools_the_seeds(tmp_path: Path) -> None:
    make_cell(tmp_path, "arm-a", {"base": 2, "m-s0": 6, "m-s1": 4, "only-a-s0": 9})
    make_cell(tmp_path, "arm-b", {"base": 2, "m-s0": 3, "m-s1": 5})
    lines = load_cells().versus(tmp_path, "arm-a", "arm-b", dataset=DATASET, resamples=200)
    rows = [line for line in lines if line.startswith("| `")]
    assert len(rows) == 1  # a method trained in one arm only has nothing to pair with
    cols = [c.strip() for c in rows[0].strip("|").split("|")]
    # seed 0: 6 against 3 right, seed 1: 4 against 5, on the same 10 questions: (3 - 1) / 20 = +10 points
    assert cols[:4] == ["`m`", "0, 1", "40.0", "50.0"]
    assert cols[4].startswith("+10.0 [")
    assert cols[5] == "10"


def test_cells_rows_pair_every_run_against_base(tmp_path: Path) -> None:
    make_cell(tmp_path, "c", {"base": 2, "m-s0": 6, "m-s1": 4})
    text = "\n".join(load_cells().cells(tmp_path, DATASET, resamples=200))
    assert "| c | 3 / 12 | `m-s0` | 60.0 | +40.0 [" in text
    assert "| c | 3 / 12 | `m-s1` | 40.0 | +20.0 [" in text
    assert "| c | 2 | +20.0 | +30.0 | 20.0 |" in text  # weakest, median, spread over the two runs
