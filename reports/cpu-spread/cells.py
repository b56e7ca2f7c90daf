"""The spread table of configs/cpu-spread.yaml: one row per (teacher seed, student run), each student
paired against base on the same embedded questions, then the weakest and median Δ per teacher seed.

    .venv/bin/python reports/cpu-spread/cells.py reports/cpu-spread > reports/cpu-spread/cells.md

Reads ``<folder>/t<seed>/`` as the study's loop leaves it: ``eval/*.json`` (evaluate's metrics),
``predictions/<model>/<dataset>/`` (its per-question shards) and ``filter.json``. The CI is the paired
question bootstrap of ``mind report`` (one run against base), so a cell here and the report's row for
the same run agree.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stages.report import load_outcomes, pooled_paired_delta, signed_points, split_seed, table  # noqa: E402

DATASET = "embedded"
BASE = "base"


def cells(folder: Path, resamples: int = 10_000) -> list[str]:
    rows, summary = [], []
    for cell in sorted(folder.glob("t*/")):
        filt = json.loads((cell / "filter.json").read_text())
        kept = f"{filt['questions_kept']} / {filt['rows_kept']}"
        base = load_outcomes(cell / "predictions", BASE, DATASET)
        deltas = []
        for path in sorted((cell / "eval").glob("*.json")):
            if path.stem == BASE:
                continue
            student = load_outcomes(cell / "predictions", path.stem, DATASET)
            _, seed = split_seed(path.stem)
            d = pooled_paired_delta({seed: student}, {None: base}, seed=0, resamples=resamples)
            deltas.append(d["delta"])
            rows.append([cell.name[1:], kept, f"`{path.stem}`", f"{100 * d['accuracy']:.1f}",
                         f"{signed_points(d['delta'])} [{signed_points(d['ci_low'])}, {signed_points(d['ci_high'])}]",
                         str(d["n_questions"])])
        summary.append([cell.name[1:], str(len(deltas)), signed_points(min(deltas)),
                        signed_points(statistics.median(deltas))])
    return ([f"Paired against `{BASE}` on the {DATASET} eval questions (95% paired bootstrap, {resamples:,} resamples).", ""]
            + table(["teacher seed", "kept questions / rationales", "student", "accuracy %", "Δ vs base [95% CI]", "n"], rows)
            + [""] + table(["teacher seed", "students", "weakest Δ", "median Δ"], summary))


if __name__ == "__main__":
    print("\n".join(cells(Path(sys.argv[1]))))
