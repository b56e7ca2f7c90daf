"""A study's cells: one row per (cell, student run), each student paired against base on the same
questions of one dataset, then the weakest and median Δ per cell.

    .venv/bin/python reports/cells.py reports/cpu-spread > reports/cpu-spread/cells.md
    .venv/bin/python reports/cells.py reports/cpu-sizing --dataset embedded-val > reports/cpu-sizing/cells.md
    .venv/bin/python reports/cells.py reports/cpu-sizing --dataset embedded-val --versus t2-q48-lr2e-3 t2-q48-lr1e-3

Reads every sub-folder of ``<folder>`` that holds ``eval/``, as a study's loop leaves it: ``eval/*.json``
(evaluate's metrics), ``predictions/<model>/<dataset>/`` (its per-question shards), ``filter.json``,
and where present ``students/<run>/metrics.json`` (distill's: its training minutes). The CI is the
paired question bootstrap of ``mind report`` (one run against base), so a cell here and the report's
row for the same run agree. ``--versus A B`` adds two arms on the same teacher data: each method of cell A
against the same method of cell B, paired by training seed and question, pooled over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.report import (  # noqa: E402
    delta_ci, load_outcomes, pct, pooled_paired_delta, seeds_text, signed_points, split_seed, table,
)

BASE = "base"


def train_minutes(cell: Path, run: str) -> str:
    path = cell / "students" / run / "metrics.json"
    return f"{json.loads(path.read_text())['train_seconds'] / 60:.1f}" if path.exists() else "–"


def cells(folder: Path, dataset: str = "embedded", resamples: int = 10_000) -> list[str]:
    rows, summary = [], []
    for cell in sorted(p.parent for p in folder.glob("*/eval")):
        filt = json.loads((cell / "filter.json").read_text())
        kept = f"{filt['questions_kept']} / {filt['rows_kept']}"
        base = load_outcomes(cell / "predictions", BASE, dataset)
        deltas = []
        for path in sorted((cell / "eval").glob("*.json")):
            if path.stem == BASE:
                continue
            student = load_outcomes(cell / "predictions", path.stem, dataset)
            _, seed = split_seed(path.stem)
            d = pooled_paired_delta({seed: student}, {None: base}, seed=0, resamples=resamples)
            deltas.append(d["delta"])
            rows.append([cell.name, kept, f"`{path.stem}`", pct(d["accuracy"]), delta_ci(d), str(d["n_questions"]),
                         train_minutes(cell, path.stem)])
        summary.append([cell.name, str(len(deltas)), signed_points(min(deltas)),
                        signed_points(statistics.median(deltas)), pct(max(deltas) - min(deltas))])
    return ([f"Paired against `{BASE}` on the `{dataset}` questions (95% paired bootstrap, {resamples:,} resamples).", ""]
            + table(["cell", "kept questions / rationales", "student", "accuracy %", "Δ vs base [95% CI]", "n",
                     "distill min"], rows)
            + [""] + table(["cell", "students", "weakest Δ", "median Δ", "spread (max − min)"], summary))


def versus(folder: Path, a: str, b: str, dataset: str = "embedded", resamples: int = 10_000) -> list[str]:
    runs: dict[str, dict[str, dict]] = {a: {}, b: {}}  # cell -> method -> seed -> question id -> correct
    for cell in (a, b):
        for path in sorted((folder / cell / "eval").glob("*.json")):
            if path.stem == BASE:
                continue
            method, seed = split_seed(path.stem)
            runs[cell].setdefault(method, {})[seed] = load_outcomes(folder / cell / "predictions", path.stem, dataset)
    rows = []
    for method in sorted(runs[a].keys() & runs[b].keys()):
        d = pooled_paired_delta(runs[a][method], runs[b][method], seed=0, resamples=resamples)
        rows.append([f"`{method}`", seeds_text(d["seeds"]), pct(d["reference_accuracy"]), pct(d["accuracy"]),
                     delta_ci(d), str(d["n_questions"])])
    return ([f"`{a}` against `{b}`, per method, paired by training seed and question on `{dataset}`, pooled over "
             f"the seeds (95% hierarchical bootstrap).", ""]
            + table(["method", "training seeds", f"{b} %", f"{a} %", "Δ [95% CI]", "questions"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dataset", default="embedded", help="the prepared dataset the students are paired on")
    parser.add_argument("--versus", nargs=2, metavar=("A", "B"), help="also: cell A's runs against cell B's, per method")
    args = parser.parse_args()
    print("\n".join(cells(args.folder, args.dataset)))
    if args.versus:
        print("\n" + "\n".join(versus(args.folder, *args.versus, dataset=args.dataset)))
