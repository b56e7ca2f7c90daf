"""Build the comparison report from whatever evaluate metrics files exist.

    mind report                       # params.yaml's `report` section
    mind report --base base --metrics-dir metrics/eval

Reads every ``metrics/eval/<model>.json`` written by ``mind evaluate`` and writes:

- ``reports/summary.md``: a models x datasets table of accuracy with 95% Wilson intervals,
  the in-distribution (ID) and out-of-distribution (OOD) averages, and their change (Δ, in
  points) against the base student; a per-dataset Δ table; the strict/flexible answer
  matching split for numeric datasets. A negative OOD Δ means the distilled student forgot
  something the base student could do.
- the **paired comparisons**: every model against each of ``compare_to`` (base and ``uniform``
  by default) on the very same questions, per dataset, read from the prediction shards
  (``data/eval/<model>/<dataset>/``): Δ in points with a seeded paired-bootstrap 95% CI, the
  discordant pairs and the exact McNemar p-value. In ``summary.md`` and in
  ``metrics/paired.json`` (a DVC metrics file, so ``dvc metrics diff`` shows it).
- ``reports/accuracy.png``: grouped bars (one group per dataset plus the ID/OOD averages,
  one bar per model) with the Wilson intervals as error bars; a DVC plot.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import check, to_dict
from pipeline.metrics import GROUPS, paired_comparison, read_model_metrics
from pipeline.shards import (ShardError, atomic_write_bytes, atomic_write_json, atomic_write_text, read_rows,
                             replacing_all)
from stages.cli import field

log = logging.getLogger("mind.report")

GROUP_LABEL = {"id": "ID", "ood": "OOD"}
# What each of distill's ablations removes from `mind` (stages/distill.py ABLATIONS; a test keeps the
# two in step). A model with one of these names gets a row in the ablation table and is also paired
# with `mind`.
ABLATION_BASE = "mind"
ABLATION_LABELS = {"mind-no-synergy": "no synergy layer", "mind-ema0": "instantaneous loss (μ = 0)",
                   "mind-beta0": "no threshold (β = 0)", "mind-length": "the TA (scores from length: s = -ln tokens)"}


@dataclass
class ReportConfig:
    metrics_dir: Path = field(Path("metrics/eval"), help="folder of evaluate metrics files, one <model>.json per model")
    base: str = field("base", help="the model every other one is compared against (Δ columns)")
    order: list[str] = field(help="row order of the models; models not listed follow alphabetically",
                             factory=lambda: ["base", "single", "uniform", "mcc", "mind"])
    summary: Path = field(Path("reports/summary.md"), help="the Markdown report")
    plot: Path = field(Path("reports/accuracy.png"), help="the bar chart (PNG)")
    eval_dir: Path = field(Path("data/eval"), help="prediction shards, <eval_dir>/<model>/<dataset>/ (paired comparisons)")
    compare_to: list[str] = field(help="references of the paired comparisons; a reference with no metrics is skipped",
                                  factory=lambda: ["base", "uniform"])
    paired_metrics: Path = field(Path("metrics/paired.json"), help="DVC metrics file of the paired comparisons")
    students_dir: Path = field(Path("data/students"), help="distill outputs, <students_dir>/<model>/metrics.json: "
                                                           "what the TA did, for mind and its ablations")
    bootstrap_resamples: int = field(10_000, help="paired-bootstrap resamples per comparison")
    seed: int = field(0, help="seed of the paired bootstrap")

    def __post_init__(self) -> None:
        check(self.bootstrap_resamples >= 100, "report.bootstrap_resamples must be >= 100")
        check(self.summary.suffix == ".md", f"report.summary must be a .md file, got {self.summary}")
        check(self.plot.suffix == ".png", f"report.plot must be a .png file, got {self.plot}")
        outputs = [self.summary, self.plot, self.paired_metrics]
        check(len(set(outputs)) == len(outputs), f"report: summary, plot and paired_metrics must differ, got {outputs}")


def load_all(cfg: ReportConfig) -> dict[str, dict[str, Any]]:
    """Every model's metrics, in report order."""
    if not cfg.metrics_dir.is_dir():
        raise FileNotFoundError(f"{cfg.metrics_dir}: no metrics folder (run `mind evaluate` first)")
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(cfg.metrics_dir.glob("*.json")):
        found[path.stem] = read_model_metrics(path)
        log.info("read %s", path)
    if not found:
        raise FileNotFoundError(f"{cfg.metrics_dir}: no evaluate metrics files (run `mind evaluate` first)")
    names = [m for m in cfg.order if m in found] + sorted(m for m in found if m not in cfg.order)
    return {m: found[m] for m in names}


def dataset_columns(all_metrics: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(group, dataset) columns: ID datasets first, each in order of first appearance."""
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
        "OOD = out-of-distribution; the averages are unweighted means over each group's datasets. "
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
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_avg = all_metrics[base]["avg"] if has_base else {}
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
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    if has_base and len(all_metrics) > 1:
        lines += [f"## Δ against `{base}` per dataset (points)", ""]
        head = ["model"] + [f"{name} ({GROUP_LABEL[g]})" for g, name in cols]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        b = all_metrics[base]
        for model, m in all_metrics.items():
            if model == base:
                continue
            row = [f"`{model}`"]
            for g, name in cols:
                ok = name in m[g] and name in b[g]
                row.append(signed_points(m[g][name]["accuracy"] - b[g][name]["accuracy"]) if ok else "–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

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
        head = ["model"] + [f"{name} strict / flexible / answered" for _, name in numeric]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for model, m in all_metrics.items():
            row = [f"`{model}`"]
            for g, name in numeric:
                d = m[g].get(name)
                if d is None or "strict_accuracy" not in d:
                    row.append("–")
                else:
                    row.append(f"{pct(d['strict_accuracy'])} / {pct(d['flexible_accuracy'])} / {pct(d['answered'])}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


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


def paired_comparisons(all_metrics: dict[str, dict[str, Any]], cfg: ReportConfig) -> dict[str, dict[str, Any]]:
    """model -> "vs_<reference>" -> dataset -> ``paired_comparison``, for every reference of
    ``compare_to`` that has metrics, on every dataset both models were scored on."""
    refs = [r for r in cfg.compare_to if r in all_metrics]
    cache: dict[tuple[str, str], dict[str, bool]] = {}

    def outcomes(model: str, dataset: str) -> dict[str, bool]:
        if (model, dataset) not in cache:
            cache[(model, dataset)] = load_outcomes(cfg.eval_dir, model, dataset)
        return cache[(model, dataset)]

    out: dict[str, dict[str, Any]] = {}
    for model, m in all_metrics.items():
        ablated = [ABLATION_BASE] if model in ABLATION_LABELS and ABLATION_BASE in all_metrics else []
        for ref in refs + [r for r in ablated if r not in refs]:
            # base vs uniform is the mirror of uniform vs base: each pair of references appears once
            if ref == model or (model in refs and refs.index(model) < refs.index(ref)):
                continue
            for g, name in dataset_columns({model: m}):
                if name not in all_metrics[ref][g]:
                    continue
                out.setdefault(model, {}).setdefault(f"vs_{ref}", {})[name] = paired_comparison(
                    outcomes(model, name), outcomes(ref, name), cfg.seed, cfg.bootstrap_resamples)
    return out


def ablation_markdown(all_metrics: dict[str, dict[str, Any]]) -> str:
    """The paper's ablation table: `mind` and each of its ablations, ID/OOD averages and Δ against `mind`."""
    rows = [m for m in all_metrics if m in ABLATION_LABELS]
    if not rows or ABLATION_BASE not in all_metrics:
        return ""
    base = all_metrics[ABLATION_BASE]["avg"]
    lines = [f"## Ablations (against `{ABLATION_BASE}`)", "",
             "| model | removes | ID avg | Δ ID | OOD avg | Δ OOD |", "|---|---|---|---|---|---|",
             f"| `{ABLATION_BASE}` | – | " + " | ".join(
                 f"{pct(base[g])} | –" if g in base else "– | –" for g in GROUPS) + " |"]
    for model in rows:
        avg = all_metrics[model]["avg"]
        cells = []
        for g in GROUPS:
            if g not in avg:
                cells += ["–", "–"]
            else:
                cells += [pct(avg[g]), signed_points(avg[g] - base[g]) if g in base else "–"]
        lines.append(f"| `{model}` | {ABLATION_LABELS[model]} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def ta_markdown(models: list[str], students_dir: Path) -> str:
    """"What the TA did": for every student whose distill metrics report weights (mind and its
    ablations), the figures that say whether the TA acted and what it favoured."""
    rows = []
    for model in models:
        path = students_dir / model / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        if "alpha_entropy_share" in m:
            rows.append((model, m))
    if not rows:
        return ""

    def num(x: float | None, fmt: str = "{:.2f}") -> str:
        return "–" if x is None else fmt.format(x)

    lines = ["## What the TA did", "",
             "Means over the joint phase of each run (`<students_dir>/<model>/metrics.json`). "
             "`H(α)/ln K` is 1 for uniform weights; the oracle is a TA that fitted -L̄ exactly (same β and "
             "τ_student); `ta_fit` is the share of the oracle's sharpening the run realised; the slope is the "
             "within-question least-squares slope of the TA's scores on -L̄ (1 = fitted); `corr(α, length)` is "
             "within questions.", "",
             "| model | H(α)/ln K | oracle | ta_fit | score slope | selected share | corr(α, length) |",
             "|---|---|---|---|---|---|---|"]
    for model, m in rows:
        lines.append(f"| `{model}` | {num(m['alpha_entropy_share'])} | {num(m.get('oracle_alpha_entropy_share'))} | "
                     f"{num(m.get('ta_fit'))} | {num(m.get('ta_score_slope'))} | {num(m['selected_share'])} | "
                     f"{num(m.get('alpha_length_corr'), '{:+.2f}')} |")
    names = sorted({n for _, m in rows for n in m.get("alpha_share", {})})
    if names:
        lines += ["", "Each perspective's mean K·α (1 = a uniform share):", "",
                  "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for model, m in rows:
            lines.append(f"| `{model}` | " + " | ".join(num(m.get("alpha_share", {}).get(n)) for n in names) + " |")
    lines.append("")
    return "\n".join(lines)


def paired_markdown(paired: dict[str, dict[str, Any]], resamples: int, seed: int) -> str:
    lines = [
        "## Paired comparisons (the same questions)",
        "",
        f"Δ = model − reference in points, with the paired-bootstrap 95% CI ({resamples:,} resamples, seed {seed}); "
        "b = questions only the model got right, c = only the reference; p = exact McNemar test on b and c.",
        "",
        "| model | vs | dataset | n | model % | ref % | Δ [95% CI] | b / c | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, by_ref in paired.items():
        for ref, by_ds in by_ref.items():
            for name, d in by_ds.items():
                lines.append(
                    f"| `{model}` | `{ref.removeprefix('vs_')}` | {name} | {d['n']} | {pct(d['accuracy'])} | "
                    f"{pct(d['reference_accuracy'])} | {signed_points(d['delta'])} "
                    f"[{signed_points(d['ci_low'])}, {signed_points(d['ci_high'])}] | {d['b']} / {d['c']} | "
                    f"{d['mcnemar_p']:.2g} |")
    lines.append("")
    return "\n".join(lines)


def accuracy_png(all_metrics: dict[str, dict[str, Any]]) -> bytes:
    """Grouped bar chart with Wilson error bars, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    cols = dataset_columns(all_metrics)
    labels = [f"{name}\n({GROUP_LABEL[g]})" for g, name in cols] + ["ID avg", "OOD avg"]
    models = list(all_metrics)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * max(1, len(models)) * 0.45), 4.5))
    for i, model in enumerate(models):
        m = all_metrics[model]
        xs, ys, lo, hi = [], [], [], []
        for j, (g, name) in enumerate(cols):
            if name in m[g]:
                d = m[g][name]
                xs.append(j + (i - (len(models) - 1) / 2) * width)
                ys.append(100 * d["accuracy"])
                lo.append(100 * (d["accuracy"] - d["ci_low"]))
                hi.append(100 * (d["ci_high"] - d["accuracy"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=model, color=f"C{i % 10}")
        avg_x = [len(cols) + k + (i - (len(models) - 1) / 2) * width for k, g in enumerate(GROUPS) if g in m["avg"]]
        avg_y = [100 * m["avg"][g] for g in GROUPS if g in m["avg"]]
        ax.bar(avg_x, avg_y, width, color=f"C{i % 10}", hatch="//")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy with 95% Wilson intervals")
    ax.legend(fontsize=8, ncols=min(len(models), 5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def run(cfg: ReportConfig) -> dict[str, Any]:
    """Rebuild reports/summary.md and reports/accuracy.png from the metrics files."""
    all_metrics = load_all(cfg)
    paired = paired_comparisons(all_metrics, cfg)
    text = summary_markdown(all_metrics, cfg.base)
    ablations = ablation_markdown(all_metrics)
    if ablations:
        text += "\n" + ablations
    ta = ta_markdown(list(all_metrics), cfg.students_dir)
    if ta:
        text += "\n" + ta
    if paired:
        text += "\n" + paired_markdown(paired, cfg.bootstrap_resamples, cfg.seed)
    config_note = "\n".join(f"- `{k}`: `{v}`" for k, v in to_dict(cfg).items())
    png = accuracy_png(all_metrics)
    # The three outputs describe one set of metrics: each is written under a temporary name and
    # they are renamed together, so a failure leaves the previous three, not a mix.
    with replacing_all([cfg.paired_metrics, cfg.summary, cfg.plot]) as (paired_tmp, summary_tmp, plot_tmp):
        atomic_write_json(paired_tmp, paired)
        atomic_write_text(summary_tmp, f"{text}\nReport config:\n\n{config_note}\n")
        atomic_write_bytes(plot_tmp, png)
    log.info("wrote %s and %s (%d models: %s)", cfg.summary, cfg.plot, len(all_metrics), ", ".join(all_metrics))
    return all_metrics
