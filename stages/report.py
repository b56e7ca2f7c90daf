"""Build the comparison report from whatever evaluate metrics files exist.

    mind report                       # params.yaml's `report` section
    mind report --base base --metrics-dir metrics/eval

Reads every ``metrics/eval/<model>.json`` written by ``mind evaluate``. Distill runs each method
once per training seed, so a model (a **run**) is named ``<method>-s<seed>`` (``mind-s0``,
``mind-length-s1``) or ``<method>-inj-s<seed>`` on injected data (``mind-inj-s2``); its **group**
is the name less the trailing ``-s<seed>``. A name without that suffix (``base``, or a run from
before seeds) is a group of one run whose seed is unknown. Writes:

- ``reports/summary.md``: a runs x datasets table of accuracy with 95% Wilson intervals (every
  run a row, runs in ``order`` of their group, then by seed), the in-distribution (ID) and
  out-of-distribution (OOD) averages, and their change (Δ, in points) against the base student;
  a per-dataset Δ table; the strict/flexible answer matching split for numeric datasets. A
  negative OOD Δ means the distilled student forgot something the base student could do.
- the **pooled table** (when any run has a seed): one row per group, its seeds, the mean accuracy
  over those seeds per dataset and ID/OOD average with the min–max over seeds, Δ of the means
  against base. The ablation table gives each group's mean over seeds; "What the TA did" (groups
  starting with ``mind``, from each run's ``<students_dir>/<model>/metrics.json``) each figure's
  mean over seeds with the min–max, and for injected data the mean K·α of the injected paths per
  question with a 95% CI from the hierarchical bootstrap below (seeds, then questions).
- the **paired comparisons**: every group against each group of ``compare_to`` (base and
  ``uniform`` by default; an ablation also against ``mind``, or ``mind-inj`` on injected data), per
  dataset, on the questions every paired run was scored on, read from the prediction shards
  (``data/eval/<model>/<dataset>/``). Seeds are paired by number; a group of one seedless run
  (base) is paired with every seed of the other; groups with seeds but none in common are not
  compared (a note says so). Δ = the mean over (seed, question) of the difference in
  correctness, in points, with a 95% CI from a hierarchical paired bootstrap (each resample
  draws the paired seeds with replacement, then the questions, one draw for all its seeds);
  with one seed that is the question bootstrap, and the discordant pairs and the exact McNemar
  p-value are given too. In ``summary.md`` and in
  ``metrics/paired.json`` (a DVC metrics file, so ``dvc metrics diff`` shows it): group ->
  ``vs_<reference>`` -> dataset -> delta, ci_low, ci_high, n_questions, seeds, ...
- ``reports/accuracy.png``: grouped bars (one cluster per dataset plus the ID/OOD averages, one
  bar per group at its mean over seeds) with the seed min–max as error bars for a group of
  several seeds and the Wilson interval for a single run; a DVC plot.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import check, to_dict
from pipeline.metrics import GROUPS, mcnemar_exact_p, read_model_metrics
from pipeline.shards import (ShardError, atomic_write_bytes, atomic_write_json, atomic_write_text, read_rows,
                             replacing_all)
from stages.cli import field

log = logging.getLogger("mind.report")

GROUP_LABEL = {"id": "ID", "ood": "OOD"}
# What each of distill's ablations removes from `mind` (stages/distill.py ABLATIONS; a test keeps the
# two in step). A group with one of these names (or one of them + INJECTED) gets a row in the
# ablation table and is also paired with `mind` (`mind-inj`).
ABLATION_BASE = "mind"
ABLATION_LABELS = {"mind-no-synergy": "no synergy layer", "mind-ema0": "instantaneous loss (μ = 0)",
                   "mind-beta0": "no threshold (β = 0)", "mind-length": "the TA (scores from length: s = -ln tokens)"}
INJECTED = "-inj"  # a method trained on injected data: <method>-inj-s<seed>
TA_FAMILY = "mind"  # groups starting with this report what the TA did (distill's metrics.json)

# A run's training seed: None for a name without -s<seed> (base, or a run from before seeds).
Seed = int | None
# One group's runs: seed -> run (model) name, seeds in ascending order.
Runs = dict[Seed, str]
# The canonical spelling only (no leading zero), so two names never give the same group and seed.
SEED_SUFFIX = re.compile(r"-s(0|[1-9][0-9]*)$")
# Bootstrap resamples evaluated at once: bounds the (resamples x questions) temporaries.
BOOTSTRAP_BLOCK = 1024


@dataclass
class ReportConfig:
    metrics_dir: Path = field(Path("metrics/eval"), help="folder of evaluate metrics files, one <model>.json per model")
    base: str = field("base", help="the model every other one is compared against (Δ columns)")
    order: list[str] = field(help="order of the groups (a run's name less its -s<seed>); runs follow their group, "
                                  "then seed; groups not listed follow alphabetically",
                             factory=lambda: ["base", "single", "uniform", "mcc", "mind", "mind-no-synergy", "mind-ema0",
                                              "mind-beta0", "mind-length", "uniform-inj", "mind-inj", "mind-length-inj"])
    summary: Path = field(Path("reports/summary.md"), help="the Markdown report")
    plot: Path = field(Path("reports/accuracy.png"), help="the bar chart (PNG)")
    eval_dir: Path = field(Path("data/eval"), help="prediction shards, <eval_dir>/<model>/<dataset>/ (paired comparisons)")
    compare_to: list[str] = field(help="groups every group is paired with; a group with no metrics is skipped",
                                  factory=lambda: ["base", "uniform"])
    paired_metrics: Path = field(Path("metrics/paired.json"), help="DVC metrics file of the paired comparisons")
    students_dir: Path = field(Path("data/students"), help="distill outputs, <students_dir>/<model>/metrics.json: "
                                                           "what the TA did, for mind and its ablations")
    bootstrap_resamples: int = field(10_000, help="bootstrap resamples per comparison or interval")
    seed: int = field(0, help="seed of the bootstraps")

    def __post_init__(self) -> None:
        check(self.bootstrap_resamples >= 100, "report.bootstrap_resamples must be >= 100")
        check(self.summary.suffix == ".md", f"report.summary must be a .md file, got {self.summary}")
        check(self.plot.suffix == ".png", f"report.plot must be a .png file, got {self.plot}")
        outputs = [self.summary, self.plot, self.paired_metrics]
        check(len(set(outputs)) == len(outputs), f"report: summary, plot and paired_metrics must differ, got {outputs}")


# ---------------------------------------------------------------- runs and groups


def split_seed(model: str) -> tuple[str, Seed]:
    """A run's group and training seed: ``mind-inj-s2`` -> (``mind-inj``, 2); a name without a
    ``-s<seed>`` suffix is its own group, seed unknown: ``base`` -> (``base``, None)."""
    m = SEED_SUFFIX.search(model)
    if m is None or m.start() == 0:
        return model, None
    return model[:m.start()], int(m.group(1))


def seed_order(seed: Seed) -> int:
    return -1 if seed is None else seed


def seeds_text(seeds: Iterable[Seed]) -> str:
    """``0, 1, 2``; ``–`` for a run without a seed."""
    return ", ".join("–" if s is None else str(s) for s in seeds)


def run_order(model: str, order: Sequence[str]) -> tuple[int, int, str, int]:
    """Sort key of a run: its group's place in ``order`` (unlisted groups after, alphabetically), then its seed."""
    group, seed = split_seed(model)
    return (0, order.index(group), "", seed_order(seed)) if group in order else (1, 0, group, seed_order(seed))


def load_all(cfg: ReportConfig) -> dict[str, dict[str, Any]]:
    """Every run's metrics, in report order."""
    if not cfg.metrics_dir.is_dir():
        raise FileNotFoundError(f"{cfg.metrics_dir}: no metrics folder (run `mind evaluate` first)")
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(cfg.metrics_dir.glob("*.json")):
        found[path.stem] = read_model_metrics(path)
        log.info("read %s", path)
    if not found:
        raise FileNotFoundError(f"{cfg.metrics_dir}: no evaluate metrics files (run `mind evaluate` first)")
    return {m: found[m] for m in sorted(found, key=lambda m: run_order(m, cfg.order))}


def group_runs(models: Iterable[str]) -> tuple[dict[str, Runs], list[str]]:
    """group -> its runs (seed -> model), in the order of ``models``, and notes on runs left out.

    A group is either one run without a seed or runs with seeds: a seedless run beside seeded
    runs of the same name (``mind`` from before seeds beside ``mind-s0``) is left out of the
    group, since pooling it would count an unknown seed, maybe one of the others, twice. It keeps
    its row in the per-run table.
    """
    groups: dict[str, Runs] = {}
    for model in models:
        group, seed = split_seed(model)
        groups.setdefault(group, {})[seed] = model
    notes = []
    for group, runs in groups.items():
        if None in runs and len(runs) > 1:
            stale = runs.pop(None)
            notes.append(f"`{stale}` has no seed and is left out of group `{group}`, which pools its seeded runs "
                         f"({seeds_text(runs)}); it keeps its row in the per-run table")
        groups[group] = dict(sorted(runs.items(), key=lambda kv: seed_order(kv[0])))
    return groups, notes


def dataset_columns(all_metrics: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(id|ood, dataset) columns: ID datasets first, each in order of first appearance."""
    cols: list[tuple[str, str]] = []
    for g in GROUPS:
        for m in all_metrics.values():
            for name in m[g]:
                if (g, name) not in cols:
                    cols.append((g, name))
    return cols


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def signed_points(x: float) -> str:
    points = round(100 * x, 1) + 0.0  # + 0.0 turns -0.0 (float noise around a tie) into 0.0
    return f"{points:+.1f}"


def delta_ci(d: dict[str, Any]) -> str:
    """A paired comparison's Δ with its CI, in points: ``+4.0 [+1.5, +6.5]``."""
    return f"{signed_points(d['delta'])} [{signed_points(d['ci_low'])}, {signed_points(d['ci_high'])}]"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def cell(m: dict[str, Any], show_n: bool) -> str:
    text = f"{pct(m['accuracy'])} [{pct(m['ci_low'])}, {pct(m['ci_high'])}]"
    return f"{text} (n={m['n']})" if show_n else text


def summary_markdown(all_metrics: dict[str, dict[str, Any]], base: str) -> str:
    """The report text: accuracy table with CIs and averages, Δ tables, strict/flexible split."""
    cols = dataset_columns(all_metrics)
    has_base = base in all_metrics
    lines = [
        "# Evaluation summary",
        "",
        "Accuracy in % with the 95% Wilson interval in brackets. ID = in-distribution, "
        "OOD = out-of-distribution; the averages are unweighted means over the ID (OOD) datasets. "
        f"Δ = change against `{base}` in points; a negative OOD Δ is forgetting.",
        "",
    ]
    if not has_base:
        lines += [f"No metrics for the base model `{base}`: the Δ columns are empty.", ""]

    header = ["model"]
    show_n: dict[tuple[str, str], bool] = {}
    for g, name in cols:
        ns = {m[g][name]["n"] for m in all_metrics.values() if name in m[g]}
        show_n[(g, name)] = len(ns) > 1  # the same n everywhere goes in the header
        header.append(f"{name} ({GROUP_LABEL[g]}" + (f", n={ns.pop()})" if len(ns) == 1 else ")"))
    header += ["ID avg", "Δ ID", "OOD avg", "Δ OOD"]
    base_avg = all_metrics[base]["avg"] if has_base else {}
    rows = []
    for model, m in all_metrics.items():
        row = [f"`{model}`"]
        for g, name in cols:
            row.append(cell(m[g][name], show_n[(g, name)]) if name in m[g] else "–")
        for g in GROUPS:
            avg = m["avg"].get(g)
            row.append(pct(avg) if avg is not None else "–")
            if avg is None or g not in base_avg or model == base:
                row.append("–")
            else:
                row.append(signed_points(avg - base_avg[g]))
        rows.append(row)
    lines += table(header, rows) + [""]

    if has_base and len(all_metrics) > 1:
        lines += [f"## Δ against `{base}` per dataset (points)", ""]
        b = all_metrics[base]
        lines += table(["model"] + [f"{name} ({GROUP_LABEL[g]})" for g, name in cols], (
            [f"`{model}`"] + [signed_points(m[g][name]["accuracy"] - b[g][name]["accuracy"])
                              if name in m[g] and name in b[g] else "–" for g, name in cols]
            for model, m in all_metrics.items() if model != base)) + [""]

    numeric = [(g, name) for g, name in cols
               if any("strict_accuracy" in m[g].get(name, {}) for m in all_metrics.values())]
    if numeric:
        lines += [
            "## Numeric answers: strict / flexible matching (%)",
            "",
            "strict: the first `The answer is X` sentence only (lm-eval strict-match); flexible: the "
            "last number in the output (lm-eval flexible-extract); answered: outputs with any "
            "extractable answer.",
            "",
        ]
        def split(d: dict[str, Any] | None) -> str:
            if d is None or "strict_accuracy" not in d:
                return "–"
            return f"{pct(d['strict_accuracy'])} / {pct(d['flexible_accuracy'])} / {pct(d['answered'])}"

        lines += table(["model"] + [f"{name} strict / flexible / answered" for _, name in numeric],
                       ([f"`{model}`"] + [split(m[g].get(name)) for g, name in numeric]
                        for model, m in all_metrics.items())) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- pooled over seeds


@dataclass(frozen=True)
class Spread:
    """One figure over a group's seeds: the mean, the min–max, and how many runs had it."""

    mean: float
    low: float
    high: float
    n: int


def spread(values: Sequence[float]) -> Spread | None:
    if not values:
        return None
    return Spread(sum(values) / len(values), min(values), max(values), len(values))


def spread_text(s: Spread | None, fmt: str = "{:.2f}") -> str:
    """``mean`` for one run, ``mean (min–max)`` for several; ``–`` for none."""
    if s is None:
        return "–"
    text = fmt.format(s.mean)
    return text if s.n == 1 else f"{text} ({fmt.format(s.low)}–{fmt.format(s.high)})"


def pooled_accuracy(all_metrics: dict[str, dict[str, Any]],
                    groups: dict[str, Runs]) -> dict[str, dict[tuple[str, str], Spread]]:
    """group -> (id|ood, dataset) or ("avg", id|ood) -> its accuracy over the group's seeds; a key
    no run of the group has is absent."""
    keys = dataset_columns(all_metrics) + [("avg", g) for g in GROUPS]
    out: dict[str, dict[tuple[str, str], Spread]] = {}
    for group, runs in groups.items():
        out[group] = {}
        for section, name in keys:
            values = []
            for model in runs.values():
                m = all_metrics[model][section]
                if name in m:
                    values.append(m[name] if section == "avg" else m[name]["accuracy"])
            s = spread(values)
            if s is not None:
                out[group][(section, name)] = s
    return out


def pooled_markdown(all_metrics: dict[str, dict[str, Any]], groups: dict[str, Runs], base: str, notes: list[str]) -> str:
    """One row per group: its seeds, the mean accuracy over them with the min–max, Δ of the means
    against base. Empty when no run has a seed (the per-run table says it all)."""
    if all(None in runs for runs in groups.values()) and not notes:
        return ""
    cols = dataset_columns(all_metrics)
    pooled = pooled_accuracy(all_metrics, groups)
    base_group = split_seed(base)[0]
    base_avg = pooled.get(base_group, {})
    lines = ["## Pooled over training seeds", "",
             "One row per group (a run's name less its `-s<seed>`): the mean accuracy over the group's seeds in %, "
             "with the min–max over seeds in parentheses when it has several; Δ = change of the mean against "
             f"`{base_group}` in points. A figure only some seeds have is the mean over those (k of n seeds).", ""]
    header = ["group", "runs", "seeds"] + [f"{name} ({GROUP_LABEL[g]})" for g, name in cols]
    header += ["ID avg", "Δ ID", "OOD avg", "Δ OOD"]

    def text(s: Spread | None, runs: int) -> str:
        if s is None:
            return "–"
        t = spread_text(Spread(100 * s.mean, 100 * s.low, 100 * s.high, s.n), "{:.1f}")
        return t if s.n == runs else f"{t} ({s.n} of {runs} seeds)"

    rows = []
    for group, runs in groups.items():
        p = pooled[group]
        row = [f"`{group}`", str(len(runs)), seeds_text(runs)]
        row += [text(p.get((g, name)), len(runs)) for g, name in cols]
        for g in GROUPS:
            avg = p.get(("avg", g))
            row.append(text(avg, len(runs)))
            ref = base_avg.get(("avg", g))
            row.append("–" if avg is None or ref is None or group == base_group else signed_points(avg.mean - ref.mean))
        rows.append(row)
    lines += table(header, rows) + [""]
    if notes:
        lines += ["Left out:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def ablated_mind(group: str) -> str | None:
    """The mind group an ablation group is paired with: `mind` for `mind-length`, `mind-inj` for
    `mind-length-inj`; None for a group that is no ablation."""
    data = INJECTED if group.endswith(INJECTED) else ""
    return ABLATION_BASE + data if group.removesuffix(data) in ABLATION_LABELS else None


def ablation_markdown(all_metrics: dict[str, dict[str, Any]], groups: dict[str, Runs]) -> str:
    """The paper's ablation table: `mind` and each of its ablations (and the same on injected
    data, against `mind-inj`), ID/OOD averages (means over seeds) and Δ against their mind group."""
    pooled = pooled_accuracy(all_metrics, groups)
    rows = [(g, ablated_mind(g)) for g in groups]
    rows = [(g, mind) for g, mind in rows if mind is not None and mind in groups]
    if not rows:
        return ""
    minds = list(dict.fromkeys(m for _, m in rows))
    out = []
    for mind in minds:
        base = pooled[mind]
        out.append([f"`{mind}`", seeds_text(groups[mind]), "–"] + [
            c for g in GROUPS for c in ((pct(base[("avg", g)].mean), "–") if ("avg", g) in base else ("–", "–"))])
        for group, _ in (r for r in rows if r[1] == mind):
            avg = pooled[group]
            cells = []
            for g in GROUPS:
                if ("avg", g) not in avg:
                    cells += ["–", "–"]
                else:
                    ref = base.get(("avg", g))
                    cells += [pct(avg[("avg", g)].mean),
                              signed_points(avg[("avg", g)].mean - ref.mean) if ref is not None else "–"]
            out.append([f"`{group}`", seeds_text(groups[group]), ABLATION_LABELS[group.removesuffix(INJECTED)]] + cells)
    lines = ["## Ablations (against " + ", ".join(f"`{m}`" for m in minds) + ")", "",
             "ID/OOD averages are means over each group's seeds.", ""]
    lines += table(["group", "seeds", "removes", "ID avg", "Δ ID", "OOD avg", "Δ OOD"], out) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- paired comparisons


def load_outcomes(eval_dir: Path, model: str, dataset: str) -> dict[str, bool]:
    """question id -> correct, from one model's prediction shards of one dataset."""
    folder = eval_dir / model / dataset
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no prediction shards for the paired comparison (run `mind evaluate --model {model}`)")
    rows = read_rows(folder)
    outcomes = {r["id"]: bool(r["correct"]) for r in rows}
    if len(outcomes) != len(rows):  # pairs are matched by id: a repeated id would pair the wrong answers
        raise ShardError(f"{folder}: {len(rows) - len(outcomes)} question id(s) appear more than once")
    return outcomes


class NothingToPair(ValueError):
    """Two groups have no run pair or no question in common: the comparison is skipped with a note."""


def paired_seeds(a: Collection[Seed], b: Collection[Seed]) -> list[tuple[Seed, Seed]]:
    """Which run of group a meets which run of group b: the seeds both have, each with itself; a
    group of one seedless run (base) meets every run of the other. [] when both have seeds but
    share none."""
    for seeds in (a, b):
        if None in seeds and len(seeds) > 1:
            raise ValueError("paired_seeds: a group is one run without a seed or runs with seeds, got "
                             f"{sorted(seeds, key=seed_order)}")
    if None in a:
        return [(None, s) for s in sorted(b, key=seed_order)]
    if None in b:
        return [(s, None) for s in sorted(a, key=seed_order)]
    return [(s, s) for s in sorted(set(a) & set(b), key=seed_order)]


def hierarchical_bootstrap_ci(values: np.ndarray, seed: int, resamples: int = 10_000) -> tuple[float, float]:
    """95% percentile interval of the mean of a seeds x questions table (NaN: no value) under a
    two-level bootstrap: each resample draws the seeds with replacement, then the questions with
    replacement, and takes the mean over the drawn (seed, question) cells that hold a value.

    The questions are drawn once per resample, for all the drawn seeds: every seed was scored on
    the same questions, so a question's effect is shared by the seeds, and drawing the questions
    anew for each seed would shrink that part of the variance by the number of seeds. They are
    drawn first and with the very call of ``paired_bootstrap_ci``, so that one seed gives exactly
    its interval.
    """
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"hierarchical_bootstrap_ci: need a non-empty seeds x questions table, got shape {values.shape}")
    n_seeds, n_questions = values.shape
    rng = np.random.default_rng(seed)
    questions = rng.integers(0, n_questions, size=(resamples, n_questions))
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    # draws[r, s]: how often resample r drew seed s
    draws = (seeds[:, :, None] == np.arange(n_seeds)).sum(axis=1).astype(np.float64)
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    means = np.empty(resamples)
    for start in range(0, resamples, BOOTSTRAP_BLOCK):
        block = slice(start, start + BOOTSTRAP_BLOCK)
        total = np.take_along_axis(draws[block] @ filled, questions[block], axis=1).sum(axis=1)
        count = np.take_along_axis(draws[block] @ present, questions[block], axis=1).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0: a resample that drew no cell with a value
            means[block] = total / count
    lo, hi = np.nanquantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def pooled_paired_delta(a: dict[Seed, dict[str, bool]], b: dict[Seed, dict[str, bool]], seed: int,
                        resamples: int = 10_000) -> dict[str, Any]:
    """Group a against group b (seed -> question id -> correct), pooled over the paired seeds.

    Runs are paired by ``paired_seeds``; the questions are those every paired run was scored on.
    Δ = the mean over (seed, question) of correct_a − correct_b, with the 95% CI of
    ``hierarchical_bootstrap_ci`` (seeds, then questions). Returns delta, ci_low, ci_high,
    n_questions, n_seeds, seeds (the seed of each pair; None for two seedless runs), both mean
    accuracies, and for one pair the discordant counts (``b``: only a right, ``c``: only b right)
    and the exact McNemar p-value, for several the per-seed Δ min–max (delta_seed_min/max).
    Raises NothingToPair when no run pair or no question is shared.
    """
    pairs = paired_seeds(list(a), list(b))
    if not pairs:
        raise NothingToPair(f"no shared seed ({seeds_text(sorted(a, key=seed_order))} against "
                            f"{seeds_text(sorted(b, key=seed_order))})")
    shared = set.intersection(*(set(a[sa]) & set(b[sb]) for sa, sb in pairs))
    if not shared:
        raise NothingToPair("no question in common")
    ids = sorted(shared)  # the order of paired_comparison, so one seed draws the same questions
    xa = np.array([[a[sa][q] for q in ids] for sa, _ in pairs], dtype=np.float64)
    xb = np.array([[b[sb][q] for q in ids] for _, sb in pairs], dtype=np.float64)
    diff = xa - xb
    lo, hi = hierarchical_bootstrap_ci(diff, seed, resamples)
    out: dict[str, Any] = {
        "delta": float(diff.mean()), "ci_low": lo, "ci_high": hi, "n_questions": len(ids), "n_seeds": len(pairs),
        "seeds": [sa if sa is not None else sb for sa, sb in pairs],
        "accuracy": float(xa.mean()), "reference_accuracy": float(xb.mean()),
    }
    if len(pairs) == 1:
        only_a, only_b = int((diff > 0).sum()), int((diff < 0).sum())
        out |= {"b": only_a, "c": only_b, "mcnemar_p": mcnemar_exact_p(only_a, only_b)}
    else:
        per_seed = diff.mean(axis=1)
        out |= {"delta_seed_min": float(per_seed.min()), "delta_seed_max": float(per_seed.max())}
    return out


def paired_comparisons(all_metrics: dict[str, dict[str, Any]], groups: dict[str, Runs],
                       cfg: ReportConfig) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """group -> "vs_<reference>" -> dataset -> ``pooled_paired_delta``, for every reference of
    ``compare_to`` that has metrics (and `mind` for its ablations), on every dataset both groups
    were scored on; and the notes on comparisons skipped for want of a shared seed or question."""
    refs = [r for r in cfg.compare_to if r in groups]
    cache: dict[tuple[str, str], dict[str, bool]] = {}

    def outcomes(model: str, dataset: str) -> dict[str, bool]:
        if (model, dataset) not in cache:
            cache[(model, dataset)] = load_outcomes(cfg.eval_dir, model, dataset)
        return cache[(model, dataset)]

    def by_seed(runs: Runs, g: str, dataset: str) -> dict[Seed, dict[str, bool]]:
        return {s: outcomes(model, dataset) for s, model in runs.items() if dataset in all_metrics[model][g]}

    out: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for group, runs in groups.items():
        ablated = ablated_mind(group)
        extra = [ablated] if ablated is not None and ablated in groups and ablated not in refs else []
        for ref in refs + extra:
            # base vs uniform is the mirror of uniform vs base: each pair of references appears once
            if ref == group or (group in refs and refs.index(group) < refs.index(ref)):
                continue
            if not paired_seeds(runs, groups[ref]):
                notes.append(f"`{group}` vs `{ref}`: not compared, no shared seed ({seeds_text(runs)} against "
                             f"{seeds_text(groups[ref])})")
                log.warning("%s", notes[-1])
                continue
            for g, name in dataset_columns({m: all_metrics[m] for m in runs.values()}):
                mine, theirs = by_seed(runs, g, name), by_seed(groups[ref], g, name)
                if not theirs:
                    continue  # the reference was not scored on this dataset
                try:
                    d = pooled_paired_delta(mine, theirs, cfg.seed, cfg.bootstrap_resamples)
                except NothingToPair as e:
                    notes.append(f"`{group}` vs `{ref}` on {name}: not compared, {e}")
                    log.warning("%s", notes[-1])
                    continue
                most = max(len(o) for o in (*mine.values(), *theirs.values()))
                if d["n_questions"] < most:  # still paired, but a run was scored on questions another was not
                    log.warning("`%s` vs `%s` on %s: paired on the %d questions every run answered (of up to %d)",
                                group, ref, name, d["n_questions"], most)
                out.setdefault(group, {}).setdefault(f"vs_{ref}", {})[name] = d
    return out, notes


def paired_markdown(paired: dict[str, dict[str, Any]], notes: list[str], resamples: int, seed: int) -> str:
    lines = [
        "## Paired comparisons (the same questions)",
        "",
        "Δ = group − reference in points: the mean over the paired seeds and the questions both were scored on of "
        "the difference in correctness. Seeds are paired by number; a group of one run without a seed (`–`, "
        "such as base) is paired with every seed of the other. 95% CI: a hierarchical paired bootstrap "
        f"({resamples:,} resamples, seed {seed}): each resample draws the paired seeds with replacement, then the "
        "questions (one draw for all its seeds). With one seed that is the paired question bootstrap, and "
        "b = questions only the group got right, c = only the reference, p = exact McNemar test on b and c; with "
        "several seeds, the per-seed Δ min–max.",
        "",
    ]
    rows = []
    for group, by_ref in paired.items():
        for ref, by_ds in by_ref.items():
            for name, d in by_ds.items():
                one = d["n_seeds"] == 1
                per_seed = "–" if one else f"{signed_points(d['delta_seed_min'])} – {signed_points(d['delta_seed_max'])}"
                rows.append([f"`{group}`", f"`{ref.removeprefix('vs_')}`", name, seeds_text(d["seeds"]),
                             str(d["n_questions"]), pct(d["accuracy"]), pct(d["reference_accuracy"]),
                             delta_ci(d),
                             per_seed] + ([f"{d['b']} / {d['c']}", f"{d['mcnemar_p']:.2g}"] if one else ["–", "–"]))
    lines += table(["group", "vs", "dataset", "seeds", "n", "group %", "ref %", "Δ [95% CI]", "per-seed Δ", "b / c",
                    "McNemar p"], rows) + [""]
    if notes:
        lines += ["Not compared:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- what the TA did

# distill's metrics.json keys (stages/distill.py weighting_summary), their column and format
TA_FIGURES = (("alpha_entropy_share", "H(α)/ln K", "{:.2f}"), ("oracle_alpha_entropy_share", "oracle", "{:.2f}"),
              ("ta_fit", "ta_fit", "{:.2f}"), ("ta_score_slope", "score slope", "{:.2f}"),
              ("selected_share", "selected share", "{:.2f}"), ("alpha_length_corr", "corr(α, length)", "{:+.2f}"))
INJECTED_FIGURES = (("injected_alpha_share", "injected K·α", "{:.2f}"),
                    ("injected_deselected_share", "injected deselected share", "{:.2f}"))
INJECTED_BY_QUESTION = "injected_alpha_by_question"


def number(x: Any) -> float | None:
    """A figure of distill's metrics.json, or None: a run that did not log it writes null (or NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def read_distill_metrics(students_dir: Path, model: str) -> dict[str, Any] | None:
    """A run's ``<students_dir>/<model>/metrics.json``; None when the run has none."""
    path = students_dir / model / "metrics.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of distill metrics")
    return data


def pooled_mean_ci(values: dict[Seed, dict[str, float]], seed: int,
                   resamples: int = 10_000) -> tuple[float, float, float, int]:
    """The mean over (seed, question) of a per-question figure (seed -> question id -> value), its
    95% CI from ``hierarchical_bootstrap_ci`` (seeds, then questions) and the number of questions.
    A question some seeds lack counts where it has a value."""
    ids = sorted(set().union(*values.values()))
    if not ids:
        raise ValueError("pooled_mean_ci: no values")
    table = np.array([[v.get(q, math.nan) for q in ids] for v in values.values()], dtype=np.float64)
    lo, hi = hierarchical_bootstrap_ci(table, seed, resamples)
    return float(np.nanmean(table)), lo, hi, len(ids)


def ta_markdown(groups: dict[str, Runs], students_dir: Path, seed: int, resamples: int) -> str:
    """"What the TA did": for every mind-family group with distill metrics, each figure's mean over
    the group's seeds (the min–max beside it for several), and what the TA did with injected paths."""
    rows: list[tuple[str, dict[Seed, dict[str, Any]]]] = []
    for group, runs in groups.items():
        if not group.startswith(TA_FAMILY):
            continue
        found = {s: read_distill_metrics(students_dir, model) for s, model in runs.items()}
        per_seed = {s: m for s, m in found.items() if m is not None}
        if per_seed:
            rows.append((group, per_seed))
    if not rows:
        return ""

    def figure(per_seed: dict[Seed, dict[str, Any]], key: str, fmt: str) -> str:
        values = [v for m in per_seed.values() if (v := number(m.get(key))) is not None]
        return spread_text(spread(values), fmt)

    def shares(m: dict[str, Any]) -> dict[str, Any]:
        s = m.get("alpha_share")
        return s if isinstance(s, dict) else {}

    lines = ["## What the TA did", "",
             "Means over the joint phase of each run (`<students_dir>/<model>/metrics.json`), then over the group's "
             "seeds, with the min–max over seeds in parentheses when several runs report the figure (– : none "
             "does). `H(α)/ln K` is 1 for uniform weights; the oracle is a TA that fitted -L̄ exactly (same β and "
             "τ_student); `ta_fit` is the share of the oracle's sharpening the run realised; the slope is the "
             "within-question least-squares slope of the TA's scores on -L̄ (1 = fitted); `corr(α, length)` is "
             "within questions.", ""]
    lines += table(["group", "seeds"] + [label for _, label, _ in TA_FIGURES],
                   ([f"`{group}`", seeds_text(per_seed)] + [figure(per_seed, key, fmt) for key, _, fmt in TA_FIGURES]
                    for group, per_seed in rows))
    names = sorted({n for _, per_seed in rows for m in per_seed.values() for n in shares(m)})
    if names:
        lines += ["", "Each perspective's mean K·α (1 = a uniform share):", ""]
        lines += table(["group"] + names, ([f"`{group}`"] + [
            spread_text(spread([v for m in per_seed.values() if (v := number(shares(m).get(n))) is not None]))
            for n in names] for group, per_seed in rows))
    injected_keys = [key for key, _, _ in INJECTED_FIGURES] + [INJECTED_BY_QUESTION]
    if any(key in m for _, per_seed in rows for m in per_seed.values() for key in injected_keys):
        lines += ["", "Injected paths (a question's rationale replaced by another question's): `injected K·α` is the "
                  "mean K·α the TA put on them (1 = a uniform share, 0 = ignored); `injected deselected share` is "
                  "the share of them left out of the selected set; `per question` is the mean over seeds and "
                  "questions of each injected question's K·α, with its 95% CI from a hierarchical bootstrap "
                  f"({resamples:,} resamples, seed {seed}; the seeds, then the questions).", ""]
        injected_rows = []
        for group, per_seed in rows:
            by_question: dict[Seed, dict[str, float]] = {}
            for s, m in per_seed.items():
                d = m.get(INJECTED_BY_QUESTION)
                values = {str(q): v for q, x in d.items() if (v := number(x)) is not None} if isinstance(d, dict) else {}
                if values:
                    by_question[s] = values
            if by_question:
                mean, lo, hi, n = pooled_mean_ci(by_question, seed, resamples)
                per_question = f"{mean:.2f} [{lo:.2f}, {hi:.2f}] (n={n})"
            else:
                per_question = "–"
            injected_rows.append([f"`{group}`", seeds_text(per_seed)]
                                 + [figure(per_seed, key, fmt) for key, _, fmt in INJECTED_FIGURES] + [per_question])
        lines += table(["group", "seeds"] + [label for _, label, _ in INJECTED_FIGURES] + ["per question [95% CI]"],
                       injected_rows)
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- plot


def group_bar(all_metrics: dict[str, dict[str, Any]], runs: Runs, g: str, name: str) -> tuple[float, float, float] | None:
    """A group's bar on one dataset: (mean over seeds, low, high), the error bar being the seed
    min–max where several runs were scored on it, else the one run's Wilson interval; None: no run was."""
    scored = [all_metrics[m][g][name] for m in runs.values() if name in all_metrics[m][g]]
    if not scored:
        return None
    if len(scored) == 1:
        return scored[0]["accuracy"], scored[0]["ci_low"], scored[0]["ci_high"]
    accs = [d["accuracy"] for d in scored]
    return sum(accs) / len(accs), min(accs), max(accs)


def accuracy_png(all_metrics: dict[str, dict[str, Any]], groups: dict[str, Runs]) -> bytes:
    """Grouped bar chart, one bar per group at its mean over seeds, as PNG bytes. Error bars: the
    seed min–max where several runs have the figure, else the one run's Wilson interval (none on
    a one-run average)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    cols = dataset_columns(all_metrics)
    pooled = pooled_accuracy(all_metrics, groups)
    labels = [f"{name}\n({GROUP_LABEL[g]})" for g, name in cols] + ["ID avg", "OOD avg"]
    names = list(groups)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * max(1, len(names)) * 0.45), 4.5))
    for i, group in enumerate(names):
        runs, p = groups[group], pooled[group]
        offset = (i - (len(names) - 1) / 2) * width
        xs, ys, lo, hi = [], [], [], []
        for j, (g, name) in enumerate(cols):
            bar = group_bar(all_metrics, runs, g, name)
            if bar is None:
                continue
            mean, low, high = bar
            xs.append(j + offset)
            ys.append(100 * mean)
            lo.append(100 * (mean - low))
            hi.append(100 * (high - mean))
        label = group if len(runs) == 1 else f"{group} ({len(runs)} seeds)"
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=label, color=f"C{i % 10}")
        avgs = [(len(cols) + k + offset, p[("avg", g)]) for k, g in enumerate(GROUPS) if ("avg", g) in p]
        ax.bar([x for x, _ in avgs], [100 * s.mean for _, s in avgs], width, color=f"C{i % 10}", hatch="//")
        spread_avgs = [(x, s) for x, s in avgs if s.n > 1]  # a one-run average has no interval to draw
        if spread_avgs:
            ax.errorbar([x for x, _ in spread_avgs], [100 * s.mean for _, s in spread_avgs], fmt="none", ecolor="black",
                        yerr=[[100 * (s.mean - s.low) for _, s in spread_avgs],
                              [100 * (s.high - s.mean) for _, s in spread_avgs]], capsize=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy, mean over seeds (error bars: seed min–max; one run: 95% Wilson)", fontsize=10)
    ax.legend(fontsize=8, ncols=min(len(names), 5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def run(cfg: ReportConfig) -> dict[str, Any]:
    """Rebuild reports/summary.md, reports/accuracy.png and the paired metrics from the metrics files."""
    all_metrics = load_all(cfg)
    groups, group_notes = group_runs(all_metrics)
    for note in group_notes:
        log.warning("%s", note)
    paired, paired_notes = paired_comparisons(all_metrics, groups, cfg)
    text = summary_markdown(all_metrics, cfg.base)
    for section in (pooled_markdown(all_metrics, groups, cfg.base, group_notes), ablation_markdown(all_metrics, groups),
                    ta_markdown(groups, cfg.students_dir, cfg.seed, cfg.bootstrap_resamples)):
        if section:
            text += "\n" + section
    if paired or paired_notes:
        text += "\n" + paired_markdown(paired, paired_notes, cfg.bootstrap_resamples, cfg.seed)
    config_note = "\n".join(f"- `{k}`: `{v}`" for k, v in to_dict(cfg).items())
    png = accuracy_png(all_metrics, groups)
    # The three outputs describe one set of metrics: each is written under a temporary name and
    # they are renamed together, so a failure leaves the previous three, not a mix.
    with replacing_all([cfg.paired_metrics, cfg.summary, cfg.plot]) as (paired_tmp, summary_tmp, plot_tmp):
        atomic_write_json(paired_tmp, paired)
        atomic_write_text(summary_tmp, f"{text}\nReport config:\n\n{config_note}\n")
        atomic_write_bytes(plot_tmp, png)
    log.info("wrote %s and %s (%d runs in %d groups: %s)", cfg.summary, cfg.plot, len(all_metrics), len(groups),
             ", ".join(groups))
    return all_metrics
