"""Prediction shards as evaluate writes them, for the report tests and reports/cells.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.metrics import PREDICTION_SCHEMA
from pipeline.shards import write_shards


def pred_rows(model: str, dataset: str, flags: list[bool], answer_type: str = "number",
              strict: list[bool] | None = None, flexible: list[bool] | None = None,
              unanswered: int = 0, truncated: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i, ok in enumerate(flags):
        numeric = answer_type == "number"
        rows.append({
            "model": model, "dataset": dataset, "id": f"{dataset}-{i}", "output": f"... The answer is {i}.",
            "pred_answer": None if i < unanswered else str(i), "gold": str(i) if ok else "x",
            "correct": ok, "answer_type": answer_type,
            "strict_correct": (strict[i] if strict else ok) if numeric else None,
            "flexible_correct": (flexible[i] if flexible else ok) if numeric else None,
            "num_tokens": 100 + i, "finish_reason": "length" if i < truncated else "stop",
        })
    return rows


def write_predictions(root: Path, rows: list[dict[str, Any]]) -> Path:
    out = root / rows[0]["model"] / rows[0]["dataset"]
    write_shards(out, rows, PREDICTION_SCHEMA, {"stage": "test"})
    return out
