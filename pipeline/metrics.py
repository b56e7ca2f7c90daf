"""Accuracy with n and a 95% Wilson interval: the numbers `evaluate` writes and `report` reads.

``evaluate`` scores prediction rows (``PREDICTION_SCHEMA``) and writes one metrics file per
model with ``model_metrics``; ``report`` reads those files back with ``read_model_metrics``.
A metrics file holds numbers only, so ``dvc metrics show`` / ``dvc metrics diff`` can
compare every key across models and experiments::

    {"id":  {"embedded": {"n": 60, "correct": 12, "accuracy": 0.2, "ci_low": ..., "ci_high": ...,
                          "answered": 0.95, "strict_accuracy": 0.2, "flexible_accuracy": 0.25}, ...},
     "ood": {"csqa": {...}, ...},
     "avg": {"id": 0.2, "ood": 0.3, "all": 0.24}}

``id``/``ood`` group the datasets (in-distribution / out-of-distribution); ``avg`` holds
the unweighted mean accuracy over each group's datasets (the papers' "average" column).
``strict_accuracy``/``flexible_accuracy`` exist for numeric datasets only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from pipeline.config import described

Group = Literal["id", "ood"]
GROUPS: tuple[Group, ...] = ("id", "ood")
Z95 = 1.959963984540054  # the 97.5% standard-normal quantile

# Prediction shards (data/eval/<model>/<dataset>/). The first seven columns are what a reader
# of the predictions needs; the others let every metric be recomputed from the shards alone.
PREDICTION_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("dataset", pa.string()),
        ("id", pa.string()),
        ("output", pa.string()),
        ("pred_answer", pa.string()),  # null: no answer could be extracted
        ("gold", pa.string()),
        ("correct", pa.bool_()),
        ("answer_type", pa.string()),
        ("strict_correct", pa.bool_()),  # numeric tasks only (null otherwise): lm-eval strict-match
        ("flexible_correct", pa.bool_()),  # numeric tasks only (null otherwise): lm-eval flexible-extract
        ("num_tokens", pa.int32()),  # generated tokens
        ("finish_reason", pa.string()),  # stop | length (hit max_tokens)
    ]
)

SUMMARY_KEYS = ("n", "correct", "accuracy", "ci_low", "ci_high")


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``correct`` successes out of ``n`` trials.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n,
    which matters for the small eval sets of the embedded default.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: correct={correct} is outside [0, n={n}]")
    p = correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # At 0/n (n/n) the bound is exactly 0 (1) in theory, but centre - half rounds to e.g. 3.5e-18 at
    # 0/100: clamp to p so the interval always contains p (matplotlib error bars reject p - low < 0).
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def accuracy_summary(flags: Sequence[bool]) -> dict[str, float | int]:
    """n, correct, accuracy and its 95% Wilson interval for a list of per-question outcomes."""
    n = len(flags)
    if n == 0:
        raise ValueError("accuracy_summary: no predictions to score")
    k = sum(1 for f in flags if f)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "correct": k, "accuracy": k / n, "ci_low": lo, "ci_high": hi}


def dataset_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """Metrics of one (model, dataset) from its prediction rows (``PREDICTION_SCHEMA`` dicts).

    ``answered`` is the share of outputs from which an answer could be extracted at all;
    a low value means the model did not follow the answer format. ``truncated`` is the share
    that hit the token limit, ``mean_tokens`` the mean output length. The strict/flexible
    split is added when every row carries it (numeric tasks).
    """
    if not rows:
        raise ValueError("dataset_metrics: no prediction rows")
    out: dict[str, float | int] = dict(accuracy_summary([bool(r["correct"]) for r in rows]))
    out["answered"] = sum(1 for r in rows if r["pred_answer"] is not None) / len(rows)
    out["truncated"] = sum(1 for r in rows if r["finish_reason"] == "length") / len(rows)
    out["mean_tokens"] = sum(r["num_tokens"] for r in rows) / len(rows)
    strict = [r.get("strict_correct") for r in rows]
    flexible = [r.get("flexible_correct") for r in rows]
    if all(s is not None for s in strict) and all(f is not None for f in flexible):
        out["strict_accuracy"] = sum(1 for s in strict if s) / len(rows)
        out["flexible_accuracy"] = sum(1 for f in flexible if f) / len(rows)
    return out


def model_metrics(per_dataset: dict[str, dict[str, float | int]], groups: dict[str, Group]) -> dict[str, Any]:
    """One model's metrics file: datasets grouped into id/ood, plus the group averages."""
    missing = sorted(set(per_dataset) - set(groups))
    if missing:
        raise ValueError(f"model_metrics: no id/ood group for dataset(s) {missing}")
    out: dict[str, Any] = {g: {} for g in GROUPS}
    for name, m in per_dataset.items():
        out[groups[name]][name] = m
    avg: dict[str, float] = {}
    for g in GROUPS:
        accs = [m["accuracy"] for m in out[g].values()]
        if accs:
            avg[g] = sum(accs) / len(accs)
    every = [m["accuracy"] for m in per_dataset.values()]
    if every:
        avg["all"] = sum(every) / len(every)
    out["avg"] = avg
    return out


def read_model_metrics(path: Path) -> dict[str, Any]:
    """Read and check one evaluate metrics file; errors name the file and the bad key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not {"id", "ood", "avg"} <= set(data):
        raise ValueError(f"{path}: not an evaluate metrics file (expected top-level keys id, ood, avg)")
    for g in GROUPS:
        if not isinstance(data[g], dict):
            raise ValueError(f"{path}: '{g}' must map dataset names to metrics")
        for name, m in data[g].items():
            lacking = [k for k in SUMMARY_KEYS if not isinstance(m, dict) or k not in m]
            if lacking:
                raise ValueError(f"{path}: {g}.{name} lacks {lacking}")
            for key in (*SUMMARY_KEYS, *(k for k in ("answered", "strict_accuracy", "flexible_accuracy") if k in m)):
                _check_number(path, f"{g}.{name}.{key}", m[key])
    if not isinstance(data["avg"], dict):
        raise ValueError(f"{path}: 'avg' must map groups to accuracies")
    for g, value in data["avg"].items():
        _check_number(path, f"avg.{g}", value)
    return data


def _check_number(path: Path, key: str, value: Any) -> None:
    """A metric is a finite number: a null or a string would fail later, in a format string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: {key} must be a number, got {described(value)}")


# ---------------------------------------------------------------- paired comparisons


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (model right / reference
    wrong, and the reverse): the binomial test of b against Binomial(b + c, 1/2). 1.0 when there
    are no discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact_p: counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap_ci(model: Sequence[bool], reference: Sequence[bool], seed: int,
                        resamples: int = 10_000) -> tuple[float, float]:
    """95% percentile interval of the accuracy difference (model − reference) under a paired
    bootstrap: questions are resampled with replacement, both models' outcomes together."""
    import numpy as np

    if len(model) != len(reference) or not model:
        raise ValueError(f"paired_bootstrap_ci: need two equal, non-empty outcome lists ({len(model)}, {len(reference)})")
    diff = np.asarray(model, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def paired_comparison(model: dict[str, bool], reference: dict[str, bool], seed: int,
                      resamples: int = 10_000) -> dict[str, float | int]:
    """Compare two models on the questions both answered (question id -> correct).

    Returns n, both accuracies, Δ = model − reference, its seeded paired-bootstrap 95% CI, the
    discordant counts (``b``: only the model right, ``c``: only the reference right) and the
    exact McNemar p-value. The question sets must be the same: a comparison on different
    questions is not paired.
    """
    if set(model) != set(reference):
        only = sorted(set(model) ^ set(reference))
        raise ValueError(f"paired_comparison: the two models answered different questions ({len(only)} differ, "
                         f"e.g. {only[:3]})")
    ids = sorted(model)
    a = [model[i] for i in ids]
    r = [reference[i] for i in ids]
    b = sum(1 for x, y in zip(a, r) if x and not y)
    c = sum(1 for x, y in zip(a, r) if y and not x)
    lo, hi = paired_bootstrap_ci(a, r, seed, resamples)
    return {
        "n": len(ids), "accuracy": sum(a) / len(a), "reference_accuracy": sum(r) / len(r),
        "delta": (sum(a) - sum(r)) / len(a), "ci_low": lo, "ci_high": hi,
        "b": b, "c": c, "mcnemar_p": mcnemar_exact_p(b, c),
    }
