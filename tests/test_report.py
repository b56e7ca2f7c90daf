"""Wilson intervals, metrics from hand-made prediction shards, and the report built from them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from pipeline.metrics import (
    mcnemar_exact_p,
    paired_bootstrap_ci,
    paired_comparison,
    accuracy_summary,
    dataset_metrics,
    model_metrics,
    read_model_metrics,
    wilson_interval,
)
from pipeline.shards import atomic_write_json, read_rows
from report_helpers import pred_rows, write_predictions
from stages.report import (
    NothingToPair,
    ReportConfig,
    group_bar,
    group_runs,
    paired_seeds,
    pooled_mean_ci,
    pooled_paired_delta,
    run,
    run_order,
    split_seed,
    summary_markdown,
)


# ---------------------------------------------------------------- Wilson


def test_wilson_against_hand_computed_values() -> None:
    # 5/10: p=0.5, z^2=3.8415, centre=(0.5+0.19207)/1.38415=0.5,
    # half=1.95996/1.38415*sqrt(0.025+0.0096037)=1.41600*0.18602=0.26340.
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.23659, abs=1e-4)
    assert hi == pytest.approx(0.76341, abs=1e-4)
    # 0/10: centre=0.19207/1.38415=0.13877, half=1.41600*sqrt(0.0096037)=0.13877 -> [0, 0.27753].
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(0.27753, abs=1e-4)
    # 10/10 mirrors 0/10.
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(1 - 0.27753, abs=1e-4) and hi == pytest.approx(1.0)
    # 8/10: centre=(0.8+0.19207)/1.38415=0.71674, half=1.41600*sqrt(0.016+0.0096037)=0.22657.
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4)
    assert hi == pytest.approx(0.94331, abs=1e-4)
    # 81/263: p=0.30798; the interval is [0.25529, 0.36621].
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.25529, abs=1e-4)
    assert hi == pytest.approx(0.36621, abs=1e-4)


def test_wilson_matches_scipy() -> None:
    from scipy.stats import binomtest  # an independent implementation (scipy comes with scikit-learn)

    for k, n in [(0, 1), (1, 3), (17, 40), (99, 100), (123, 1000)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_is_narrower_with_more_data_and_contains_p() -> None:
    a = wilson_interval(30, 100)
    b = wilson_interval(300, 1000)
    assert a[0] < 0.3 < a[1] and b[0] < 0.3 < b[1]
    assert (b[1] - b[0]) < (a[1] - a[0])


def test_wilson_contains_p_exactly_at_zero_and_all_correct() -> None:
    # 0/100, 0/300 and 100/100 round to bounds just past p (3.5e-18, ...) without the clamp; the
    # report's error bars (p - low, high - p) must never be negative.
    for k, n in [(0, 100), (0, 300), (0, 7), (100, 100), (300, 300)]:
        lo, hi = wilson_interval(k, n)
        assert lo <= k / n <= hi
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(100, 100)[1] == 1.0


def test_wilson_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="outside"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="no predictions"):
        accuracy_summary([])


# ---------------------------------------------------------------- metrics from prediction shards


def metrics_from_shards(root: Path, model: str, groups: dict[str, str]) -> dict[str, Any]:
    per = {name: dataset_metrics(read_rows(root / model / name)) for name in groups}
    return model_metrics(per, groups)  # type: ignore[arg-type]


def test_dataset_metrics_from_a_shard(tmp_path: Path) -> None:
    flags = [True] * 3 + [False] * 7
    strict = [True, False, False] + [False] * 7
    flexible = [True, True, True, True] + [False] * 6
    folder = write_predictions(tmp_path, pred_rows("m", "gsm8k", flags, strict=strict, flexible=flexible,
                                                   unanswered=2, truncated=1))
    m = dataset_metrics(read_rows(folder))
    lo, hi = wilson_interval(3, 10)
    assert (m["n"], m["correct"]) == (10, 3)
    assert m["accuracy"] == pytest.approx(0.3)
    assert (m["ci_low"], m["ci_high"]) == pytest.approx((lo, hi))
    assert m["strict_accuracy"] == pytest.approx(0.1)
    assert m["flexible_accuracy"] == pytest.approx(0.4)
    assert m["answered"] == pytest.approx(0.8)
    assert m["truncated"] == pytest.approx(0.1)
    assert m["mean_tokens"] == pytest.approx(104.5)


def test_choice_dataset_has_no_strict_flexible_split(tmp_path: Path) -> None:
    folder = write_predictions(tmp_path, pred_rows("m", "csqa", [True, False], answer_type="choice"))
    m = dataset_metrics(read_rows(folder))
    assert "strict_accuracy" not in m and "flexible_accuracy" not in m
    assert m["accuracy"] == pytest.approx(0.5)


def test_model_metrics_groups_and_averages() -> None:
    per = {"a": accuracy_summary([True, False]), "b": accuracy_summary([True] * 3 + [False]),
           "c": accuracy_summary([False] * 4 + [True])}
    m = model_metrics(per, {"a": "id", "b": "id", "c": "ood"})
    assert set(m["id"]) == {"a", "b"} and set(m["ood"]) == {"c"}
    assert m["avg"]["id"] == pytest.approx((0.5 + 0.75) / 2)  # unweighted over datasets
    assert m["avg"]["ood"] == pytest.approx(0.2)
    assert m["avg"]["all"] == pytest.approx((0.5 + 0.75 + 0.2) / 3)
    with pytest.raises(ValueError, match="no id/ood group"):
        model_metrics(per, {"a": "id"})


def test_read_model_metrics_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"id": {"gsm8k": {"n": 3}}, "ood": {}, "avg": {}}))
    with pytest.raises(ValueError, match=r"x\.json: id\.gsm8k lacks"):
        read_model_metrics(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON"):
        read_model_metrics(bad)
    bad.write_text(json.dumps({"ari": 0.5}))
    with pytest.raises(ValueError, match="not an evaluate metrics file"):
        read_model_metrics(bad)


# ---------------------------------------------------------------- report


def build_metrics(tmp_path: Path) -> Path:
    """Three models, hand-made shards: base, mind (better ID, worse OOD), single (no csqa)."""
    groups = {"embedded": "id", "gsm8k": "id", "csqa": "ood"}
    data = {
        "base": {"embedded": [True] * 2 + [False] * 8, "gsm8k": [True] + [False] * 9, "csqa": [True] * 5 + [False] * 5},
        "mind": {"embedded": [True] * 6 + [False] * 4, "gsm8k": [True] * 2 + [False] * 8, "csqa": [True] * 4 + [False] * 6},
        "single": {"embedded": [True] * 3 + [False] * 7, "gsm8k": [False] * 10},
    }
    root = tmp_path / "eval"
    metrics_dir = tmp_path / "metrics"
    for model, sets in data.items():
        for name, flags in sets.items():
            write_predictions(root, pred_rows(model, name, flags, answer_type="choice" if name == "csqa" else "number"))
        g = {k: v for k, v in groups.items() if k in sets}
        atomic_write_json(metrics_dir / f"{model}.json", metrics_from_shards(root, model, g))
    return metrics_dir


def table_rows(md: str) -> dict[str, list[str]]:
    """The first table of the summary: model name -> its cells."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(header, cells))  # type: ignore[assignment]
    return rows  # type: ignore[return-value]


def test_report_table_numbers_and_plot(tmp_path: Path) -> None:
    metrics_dir = build_metrics(tmp_path)
    cfg = ReportConfig(metrics_dir=metrics_dir, summary=tmp_path / "reports/summary.md",
                       plot=tmp_path / "reports/accuracy.png", eval_dir=tmp_path / "eval",
                       paired_metrics=tmp_path / "paired.json")
    all_metrics = run(cfg)
    assert list(all_metrics) == ["base", "single", "mind"]  # the order of ReportConfig.order
    md = cfg.summary.read_text()
    rows = table_rows(md)
    lo, hi = wilson_interval(6, 10)
    assert rows["mind"]["embedded (ID, n=10)"] == f"60.0 [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert rows["base"]["gsm8k (ID, n=10)"].startswith("10.0 [")
    assert rows["single"]["csqa (OOD, n=10)"] == "–"
    # ID avg: base (20+10)/2 = 15, mind (60+20)/2 = 40 -> Δ +25; OOD: 50 -> 40 = -10 (forgetting).
    assert rows["base"]["ID avg"] == "15.0" and rows["base"]["Δ ID"] == "–"
    assert rows["mind"]["ID avg"] == "40.0" and rows["mind"]["Δ ID"] == "+25.0"
    assert rows["mind"]["OOD avg"] == "40.0" and rows["mind"]["Δ OOD"] == "-10.0"
    assert rows["single"]["ID avg"] == "15.0" and rows["single"]["Δ ID"] == "+0.0"
    assert rows["single"]["OOD avg"] == "–"
    assert "per dataset" in md and "| `mind` | +40.0 | +10.0 | -10.0 |" in md
    assert "strict / flexible" in md
    png = cfg.plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from PIL import Image

    with Image.open(cfg.plot) as im:
        assert im.size[0] > 400 and im.size[1] > 300


def test_report_without_base_and_without_metrics(tmp_path: Path) -> None:
    metrics_dir = build_metrics(tmp_path)
    (metrics_dir / "base.json").unlink()
    md = summary_markdown({m: read_model_metrics(metrics_dir / f"{m}.json") for m in ("mind",)}, "base")
    assert "No metrics for the base model" in md
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no evaluate metrics files"):
        run(ReportConfig(metrics_dir=empty, summary=tmp_path / "s.md", plot=tmp_path / "p.png"))


def test_report_differing_n_goes_into_cells(tmp_path: Path) -> None:
    a = model_metrics({"gsm8k": accuracy_summary([True, False])}, {"gsm8k": "id"})
    b = model_metrics({"gsm8k": accuracy_summary([True, False, False, False])}, {"gsm8k": "id"})
    md = summary_markdown({"base": a, "mind": b}, "base")
    rows = table_rows(md)
    assert rows["mind"]["gsm8k (ID)"].endswith("(n=4)")
    assert math.isclose(float(rows["mind"]["Δ ID"]), -25.0)


# ---------------------------------------------------------------- paired comparisons


def test_mcnemar_exact_against_hand_values_and_scipy() -> None:
    from scipy.stats import binomtest

    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(7, 7) == 1.0
    for b, c in [(94, 21), (3, 12), (40, 31)]:
        assert mcnemar_exact_p(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def test_paired_bootstrap_is_seeded_and_brackets_the_difference() -> None:
    model = [True] * 60 + [False] * 40
    ref = [True] * 30 + [False] * 70
    lo, hi = paired_bootstrap_ci(model, ref, seed=0)
    assert (lo, hi) == paired_bootstrap_ci(model, ref, seed=0)
    assert (lo, hi) != paired_bootstrap_ci(model, ref, seed=1, resamples=200)  # few resamples: the seed shows
    assert 0.15 < lo < 0.30 < hi < 0.45  # 30 discordant pairs, all for the model
    assert paired_bootstrap_ci(ref, ref, seed=0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap_ci(model, ref[:-1], seed=0)


def test_pairing_is_by_question_not_by_position() -> None:
    model = {"q1": True, "q2": False, "q3": True}
    ref = {"q3": True, "q1": False, "q2": False}  # another order
    d = paired_comparison(model, ref, seed=0, resamples=500)
    assert (d["n"], d["b"], d["c"]) == (3, 1, 0)
    assert d["delta"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="different questions"):
        paired_comparison(model, {"q1": True, "q2": True, "q4": True}, seed=0)


def test_report_pairs_every_model_with_base_and_uniform(tmp_path: Path) -> None:
    metrics_dir = build_metrics(tmp_path)
    root = tmp_path / "eval"
    # uniform: right where base was wrong on 3 embedded questions, wrong on one base got right
    flags = [False, True, True, True, True] + [False] * 5
    write_predictions(root, pred_rows("uniform", "embedded", flags))
    atomic_write_json(metrics_dir / "uniform.json", metrics_from_shards(root, "uniform", {"embedded": "id"}))
    cfg = ReportConfig(metrics_dir=metrics_dir, summary=tmp_path / "summary.md", plot=tmp_path / "p.png",
                       eval_dir=root, paired_metrics=tmp_path / "paired.json", bootstrap_resamples=2000)
    run(cfg)
    paired = json.loads(cfg.paired_metrics.read_text())
    assert set(paired) == {"single", "uniform", "mind"}  # base vs uniform would only mirror uniform vs base
    assert set(paired["mind"]) == {"vs_base", "vs_uniform"} and set(paired["uniform"]) == {"vs_base"}
    d = paired["mind"]["vs_base"]["embedded"]  # mind 6/10 vs base 2/10, same ids: 4 discordant, all mind's
    assert (d["n_questions"], d["b"], d["c"], d["seeds"], d["n_seeds"]) == (10, 4, 0, [None], 1)
    assert d["delta"] == pytest.approx(0.4) and d["mcnemar_p"] == pytest.approx(2 / 16)
    assert d["ci_low"] > 0
    assert set(paired["mind"]["vs_uniform"]) == {"embedded"}  # uniform was scored on embedded only
    u = paired["uniform"]["vs_base"]["embedded"]
    assert (u["b"], u["c"]) == (3, 1)
    md = cfg.summary.read_text()
    assert "## Paired comparisons" in md
    assert "| `mind` | `base` | embedded | – | 10 | 60.0 | 20.0 | +40.0 [" in md
    assert "## Pooled over training seeds" not in md  # no run has a seed: the per-run table says it all
    # a model whose predictions are gone cannot be paired: the error names the folder and the fix
    import shutil

    shutil.rmtree(root / "single" / "gsm8k")
    with pytest.raises(FileNotFoundError, match=r"single/gsm8k: no prediction shards.*mind evaluate --model single"):
        run(cfg)


def test_ablations_get_their_table_and_are_paired_with_mind(tmp_path: Path) -> None:
    from stages.distill import ABLATIONS
    from stages.report import ABLATION_LABELS

    assert set(ABLATION_LABELS) == set(ABLATIONS)  # the report names every ablation distill can run
    metrics_dir = build_metrics(tmp_path)
    root = tmp_path / "eval"
    # mind-beta0: 5/10 on embedded where mind has 6/10, 3/10 on gsm8k (mind 2/10), csqa 4/10 as mind
    sets = {"embedded": [True] * 5 + [False] * 5, "gsm8k": [True] * 3 + [False] * 7, "csqa": [True] * 4 + [False] * 6}
    for name, flags in sets.items():
        write_predictions(root, pred_rows("mind-beta0", name, flags, answer_type="choice" if name == "csqa" else "number"))
    atomic_write_json(metrics_dir / "mind-beta0.json",
                      metrics_from_shards(root, "mind-beta0", {"embedded": "id", "gsm8k": "id", "csqa": "ood"}))
    cfg = ReportConfig(metrics_dir=metrics_dir, summary=tmp_path / "summary.md", plot=tmp_path / "p.png",
                       eval_dir=root, paired_metrics=tmp_path / "paired.json", bootstrap_resamples=500)
    run(cfg)
    md = cfg.summary.read_text()
    assert "## Ablations (against `mind`)" in md
    # ID avg: mind (60 + 20) / 2 = 40, mind-beta0 (50 + 30) / 2 = 40 -> +0.0; OOD 40 vs 40
    assert "| `mind-beta0` | – | no threshold (β = 0) | 40.0 | +0.0 | 40.0 | +0.0 |" in md
    paired = json.loads(cfg.paired_metrics.read_text())
    assert set(paired["mind-beta0"]) == {"vs_base", "vs_mind"}
    assert paired["mind-beta0"]["vs_mind"]["embedded"]["delta"] == pytest.approx(-0.1)
    assert "vs_mind" not in paired["single"]  # only ablations are paired with mind


def test_what_the_ta_did_reports_each_weighted_students_figures(tmp_path: Path) -> None:
    """A section for every student whose distill metrics report weights (mind here); none for the
    others (single has no weights), and none at all when no student folder has metrics."""
    metrics_dir = build_metrics(tmp_path)
    students = tmp_path / "students"
    atomic_write_json(students / "mind" / "metrics.json", {
        "alpha_entropy_share": 0.9, "oracle_alpha_entropy_share": 0.8, "ta_fit": 0.5, "ta_score_slope": 0.61,
        "selected_share": 0.875, "alpha_length_corr": -0.42, "alpha_share": {"Analogy": 1.25, "Socratic": 0.75}})
    atomic_write_json(students / "single" / "metrics.json", {"method": "single"})
    cfg = ReportConfig(metrics_dir=metrics_dir, summary=tmp_path / "summary.md", plot=tmp_path / "p.png",
                       eval_dir=tmp_path / "eval", paired_metrics=tmp_path / "paired.json", students_dir=students,
                       bootstrap_resamples=200)
    run(cfg)
    md = cfg.summary.read_text()
    start = md.index("## What the TA did")
    section = md[start: md.index("\n## ", start + 1) if "\n## " in md[start + 1:] else len(md)]
    assert "| `mind` | – | 0.90 | 0.80 | 0.50 | 0.61 | 0.88 | -0.42 |" in section
    assert "| `mind` | 1.25 | 0.75 |" in section and "`single`" not in section
    assert "Injected paths" not in section  # no run reports them
    run(ReportConfig(metrics_dir=metrics_dir, summary=tmp_path / "s2.md", plot=tmp_path / "p2.png",
                     eval_dir=tmp_path / "eval", paired_metrics=tmp_path / "paired2.json",
                     students_dir=tmp_path / "none", bootstrap_resamples=200))
    assert "What the TA did" not in (tmp_path / "s2.md").read_text()


# ---------------------------------------------------------------- training seeds


def test_a_runs_group_is_its_name_less_the_seed() -> None:
    assert split_seed("mind-s0") == ("mind", 0)
    assert split_seed("mind-inj-s2") == ("mind-inj", 2)
    assert split_seed("mind-length-s12") == ("mind-length", 12)
    assert split_seed("base") == ("base", None)
    assert split_seed("mind-no-synergy") == ("mind-no-synergy", None)  # -s… inside a name is no seed
    assert split_seed("mind-s01") == ("mind-s01", None)  # not the canonical spelling: would clash with mind-s1
    assert split_seed("-s3") == ("-s3", None)
    order = ["base", "uniform", "mind", "mind-inj"]
    names = ["zeta", "mind-inj-s0", "mind-s10", "uniform-s1", "mind-s2", "base", "alpha-s1", "uniform-s0"]
    assert sorted(names, key=lambda m: run_order(m, order)) == [
        "base", "uniform-s0", "uniform-s1", "mind-s2", "mind-s10", "mind-inj-s0", "alpha-s1", "zeta"]
    groups, notes = group_runs(["base", "mind", "mind-s1", "mind-s0"])
    assert groups == {"base": {None: "base"}, "mind": {0: "mind-s0", 1: "mind-s1"}}
    assert len(notes) == 1 and "`mind` has no seed and is left out of group `mind`" in notes[0]


def test_paired_seeds_share_or_broadcast() -> None:
    assert paired_seeds([0, 1, 2], [2, 1, 5]) == [(1, 1), (2, 2)]
    assert paired_seeds([1, 0], [None]) == [(0, None), (1, None)]
    assert paired_seeds([None], [3]) == [(None, 3)]
    assert paired_seeds([None], [None]) == [(None, None)]
    assert paired_seeds([0], [1]) == []
    with pytest.raises(ValueError, match="one run without a seed or runs with seeds"):
        paired_seeds([None, 0], [0])


def flags_by_id(flags: list[bool], prefix: str = "q") -> dict[str, bool]:
    return {f"{prefix}{i:02d}": f for i, f in enumerate(flags)}


def test_one_seed_is_the_question_paired_bootstrap() -> None:
    """(a) With one seed the pooled statistic is the existing question-only paired bootstrap:
    same Δ, the very same CI, the same discordant counts and McNemar p."""
    a = flags_by_id([True] * 25 + [False] * 10 + [True] * 5)
    b = flags_by_id([True] * 12 + [False] * 13 + [True] * 10 + [False] * 5)
    ref = paired_comparison(a, b, seed=3, resamples=2000)
    for seeds in ({0: a}, {None: a}):
        d = pooled_paired_delta(seeds, {s: b for s in seeds}, seed=3, resamples=2000)
        assert d["delta"] == pytest.approx(ref["delta"], abs=1e-12)
        assert (d["ci_low"], d["ci_high"]) == (ref["ci_low"], ref["ci_high"])
        ids = sorted(a)
        assert (d["ci_low"], d["ci_high"]) == paired_bootstrap_ci([a[i] for i in ids], [b[i] for i in ids], 3, 2000)
        assert (d["b"], d["c"], d["mcnemar_p"]) == (ref["b"], ref["c"], ref["mcnemar_p"])
        assert (d["n_questions"], d["n_seeds"], d["seeds"]) == (40, 1, list(seeds))
        assert (d["accuracy"], d["reference_accuracy"]) == pytest.approx((ref["accuracy"], ref["reference_accuracy"]))
        assert "delta_seed_min" not in d


def test_seeds_that_disagree_widen_the_interval() -> None:
    """(b) Seed 0 says +50 points, seed 1 says -50, seed 2 says 0: each seed's own question
    bootstrap is narrow and sure, the pooled interval is wider than any of them and spans 0."""
    n = 40
    a = {0: flags_by_id([True] * 30 + [False] * 10), 1: flags_by_id([True] * 10 + [False] * 30),
         2: flags_by_id([True] * 20 + [False] * 20)}
    b = {0: flags_by_id([True] * 10 + [False] * 30), 1: flags_by_id([True] * 30 + [False] * 10),
         2: flags_by_id([True] * 20 + [False] * 20)}
    d = pooled_paired_delta(a, b, seed=0, resamples=4000)
    assert d["delta"] == pytest.approx(0.0, abs=1e-12)
    assert (d["n_questions"], d["n_seeds"], d["seeds"]) == (n, 3, [0, 1, 2])
    assert (d["delta_seed_min"], d["delta_seed_max"]) == pytest.approx((-0.5, 0.5))
    assert "b" not in d and "mcnemar_p" not in d  # McNemar is for one seed
    widths = []
    for s in a:
        one = pooled_paired_delta({s: a[s]}, {s: b[s]}, seed=0, resamples=4000)
        widths.append(one["ci_high"] - one["ci_low"])
    assert d["ci_low"] < 0 < d["ci_high"]
    assert d["ci_high"] - d["ci_low"] > max(widths) + 0.2
    one = pooled_paired_delta({0: a[0]}, {0: b[0]}, seed=0, resamples=4000)
    assert one["ci_low"] > 0.3  # alone, seed 0 is sure of a gain the other seeds do not repeat
    # the same seeds that agree give an interval no wider than one seed's
    same = pooled_paired_delta({s: a[0] for s in a}, {s: b[0] for s in a}, seed=0, resamples=4000)
    assert same["delta"] == pytest.approx(0.5) and same["ci_high"] - same["ci_low"] <= widths[0] + 0.02


def test_a_seedless_reference_is_paired_with_every_seed() -> None:
    """(c) base has no seed: each seed of the group meets the one base run; the questions are those
    every run answered."""
    a = {0: flags_by_id([True] * 6 + [False] * 4), 1: flags_by_id([True] * 8 + [False] * 2)}
    base = flags_by_id([True] * 2 + [False] * 8)
    d = pooled_paired_delta(a, {None: base}, seed=1, resamples=1000)
    assert d["seeds"] == [0, 1] and d["n_seeds"] == 2 and d["n_questions"] == 10
    assert d["delta"] == pytest.approx(((0.6 - 0.2) + (0.8 - 0.2)) / 2)
    assert (d["delta_seed_min"], d["delta_seed_max"]) == pytest.approx((0.4, 0.6))
    assert (d["accuracy"], d["reference_accuracy"]) == pytest.approx((0.7, 0.2))
    assert d == pooled_paired_delta(a, {0: base, 1: base}, seed=1, resamples=1000)  # broadcasting = a copy per seed
    # the reversed comparison: the seedless group on the left
    r = pooled_paired_delta({None: base}, a, seed=1, resamples=1000)
    assert r["seeds"] == [0, 1] and r["delta"] == pytest.approx(-d["delta"])
    # a question one run lacks is left out of every pair
    short = {0: a[0], 1: {q: v for q, v in a[1].items() if q != "q09"}}
    assert pooled_paired_delta(short, {None: base}, seed=1, resamples=1000)["n_questions"] == 9


def test_no_shared_seed_is_not_compared() -> None:
    """(d) Two groups with seeds but none in common cannot be paired."""
    a = {0: flags_by_id([True, False]), 1: flags_by_id([True, True])}
    with pytest.raises(NothingToPair, match=r"no shared seed \(0, 1 against 2\)"):
        pooled_paired_delta(a, {2: flags_by_id([False, False])}, seed=0, resamples=100)
    with pytest.raises(NothingToPair, match="no question in common"):
        pooled_paired_delta({0: {"x": True}}, {0: {"y": True}}, seed=0, resamples=100)


def test_a_per_question_mean_pools_seeds_then_questions() -> None:
    by_seed = {0: {"q1": 0.0, "q2": 0.5, "q3": 1.0}, 1: {"q1": 0.5, "q2": 1.0}}  # seed 1 lacks q3
    mean, lo, hi, n = pooled_mean_ci(by_seed, seed=0, resamples=2000)
    assert n == 3 and mean == pytest.approx((0.0 + 0.5 + 1.0 + 0.5 + 1.0) / 5)
    assert 0.0 <= lo < mean < hi <= 1.0
    assert pooled_mean_ci({None: {"q": 0.25}}, seed=0, resamples=100) == (0.25, 0.25, 0.25, 1)


def write_run(root: Path, metrics_dir: Path, model: str, sets: dict[str, list[bool]]) -> None:
    """Prediction shards and the evaluate metrics file of one run."""
    groups = {"embedded": "id", "gsm8k": "id", "csqa": "ood"}
    for name, flags in sets.items():
        write_predictions(root, pred_rows(model, name, flags, answer_type="choice" if name == "csqa" else "number"))
    atomic_write_json(metrics_dir / f"{model}.json", metrics_from_shards(root, model, {k: groups[k] for k in sets}))


def seeded_study(tmp_path: Path) -> ReportConfig:
    """base (no seed); mind and uniform with seeds 0 and 1; mind-inj with seed 5 only."""
    root, metrics_dir = tmp_path / "eval", tmp_path / "metrics"
    right = lambda k: [True] * k + [False] * (10 - k)  # noqa: E731
    write_run(root, metrics_dir, "base", {"embedded": right(2), "csqa": right(5)})
    write_run(root, metrics_dir, "mind-s0", {"embedded": right(6), "csqa": right(4)})
    write_run(root, metrics_dir, "mind-s1", {"embedded": right(8), "csqa": right(6)})
    write_run(root, metrics_dir, "uniform-s0", {"embedded": right(5), "csqa": right(5)})
    write_run(root, metrics_dir, "uniform-s1", {"embedded": right(7), "csqa": right(5)})
    write_run(root, metrics_dir, "mind-inj-s5", {"embedded": right(3)})
    return ReportConfig(metrics_dir=metrics_dir, summary=tmp_path / "summary.md", plot=tmp_path / "p.png",
                        eval_dir=root, paired_metrics=tmp_path / "paired.json", students_dir=tmp_path / "students",
                        bootstrap_resamples=500, order=["base", "uniform", "mind", "mind-inj"])


def section_of(md: str, heading: str) -> str:
    start = md.index(heading)
    end = md.find("\n## ", start + 1)
    return md[start: end if end >= 0 else len(md)]


def test_report_pools_seeds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = seeded_study(tmp_path)
    with caplog.at_level("WARNING", logger="mind.report"):
        all_metrics = run(cfg)
    # every run is a row, in the order of its group, then seed
    assert list(all_metrics) == ["base", "uniform-s0", "uniform-s1", "mind-s0", "mind-s1", "mind-inj-s5"]
    md = cfg.summary.read_text()
    assert table_rows(md)["mind-s1"]["embedded (ID, n=10)"].startswith("80.0 [")
    pooled = section_of(md, "## Pooled over training seeds")
    # mind: embedded (60 + 80) / 2 = 70, csqa 50 (40-60); ID avg = embedded; Δ ID 70 - 20 = +50, OOD 50 - 50
    assert "| `mind` | 2 | 0, 1 | 70.0 (60.0–80.0) | 50.0 (40.0–60.0) | 70.0 (60.0–80.0) | +50.0 | " \
           "50.0 (40.0–60.0) | +0.0 |" in pooled
    assert "| `base` | 1 | – | 20.0 | 50.0 | 20.0 | – | 50.0 | – |" in pooled
    assert "| `mind-inj` | 1 | 5 | 30.0 | – | 30.0 | +10.0 | – | – |" in pooled

    paired = json.loads(cfg.paired_metrics.read_text())
    assert set(paired) == {"uniform", "mind", "mind-inj"}
    assert set(paired["mind"]) == {"vs_base", "vs_uniform"} and set(paired["uniform"]) == {"vs_base"}
    d = paired["mind"]["vs_base"]["embedded"]  # base broadcast to both seeds: (60 - 20 + 80 - 20) / 2
    assert d["seeds"] == [0, 1] and d["n_seeds"] == 2 and d["n_questions"] == 10
    assert d["delta"] == pytest.approx(0.5) and (d["delta_seed_min"], d["delta_seed_max"]) == pytest.approx((0.4, 0.6))
    assert d["ci_low"] <= 0.4 and d["ci_high"] >= 0.6 and "mcnemar_p" not in d
    u = paired["mind"]["vs_uniform"]["csqa"]  # seed 0: 40 vs 50, seed 1: 60 vs 50
    assert u["seeds"] == [0, 1] and u["delta"] == pytest.approx(0.0)
    one = paired["mind-inj"]["vs_base"]["embedded"]  # one seed: the McNemar figures are there
    assert (one["seeds"], one["b"], one["c"]) == ([5], 1, 0) and one["mcnemar_p"] == pytest.approx(1.0)
    assert "vs_uniform" not in paired["mind-inj"]  # seed 5 against 0, 1
    section = section_of(md, "## Paired comparisons")
    assert "| `mind` | `base` | embedded | 0, 1 | 10 | 70.0 | 20.0 | +50.0 [" in section
    assert "| +40.0 – +60.0 | – | – |" in section
    assert "| `mind-inj` | `base` | embedded | 5 | 10 | 30.0 | 20.0 | +10.0 [" in section
    note = "`mind-inj` vs `uniform`: not compared, no shared seed (5 against 0, 1)"
    assert note in section and any(note in r.getMessage() for r in caplog.records)
    # the plot: one bar per group at the mean over seeds; the seed min–max for several, Wilson for one
    groups, _ = group_runs(all_metrics)
    assert group_bar(all_metrics, groups["mind"], "id", "embedded") == pytest.approx((0.7, 0.6, 0.8))
    lo, hi = wilson_interval(3, 10)
    assert group_bar(all_metrics, groups["mind-inj"], "id", "embedded") == pytest.approx((0.3, lo, hi))
    assert group_bar(all_metrics, groups["mind-inj"], "ood", "csqa") is None
    assert cfg.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stale_seedless_run_keeps_its_row_but_is_not_pooled(tmp_path: Path) -> None:
    cfg = seeded_study(tmp_path)
    write_run(cfg.eval_dir, cfg.metrics_dir, "mind", {"embedded": [False] * 10})
    run(cfg)
    md = cfg.summary.read_text()
    assert "mind" in table_rows(md)  # the per-run table
    assert "`mind` has no seed and is left out of group `mind`" in section_of(md, "## Pooled over training seeds")
    assert json.loads(cfg.paired_metrics.read_text())["mind"]["vs_base"]["embedded"]["seeds"] == [0, 1]


def test_ablations_and_injected_ablations_pool_their_seeds(tmp_path: Path) -> None:
    cfg = seeded_study(tmp_path)
    right = lambda k: [True] * k + [False] * (10 - k)  # noqa: E731
    write_run(cfg.eval_dir, cfg.metrics_dir, "mind-length-s0", {"embedded": right(4)})
    write_run(cfg.eval_dir, cfg.metrics_dir, "mind-length-s1", {"embedded": right(6)})
    write_run(cfg.eval_dir, cfg.metrics_dir, "mind-length-inj-s5", {"embedded": right(1)})
    run(cfg)
    table = section_of(cfg.summary.read_text(), "## Ablations")
    assert table.startswith("## Ablations (against `mind`, `mind-inj`)")
    assert "| `mind` | 0, 1 | – | 70.0 | – | 50.0 | – |" in table
    assert "| `mind-length` | 0, 1 | the TA (scores from length: s = -ln tokens) | 50.0 | -20.0 | – | – |" in table
    assert "| `mind-length-inj` | 5 | the TA (scores from length: s = -ln tokens) | 10.0 | -20.0 | – | – |" in table
    paired = json.loads(cfg.paired_metrics.read_text())
    assert paired["mind-length"]["vs_mind"]["embedded"]["delta"] == pytest.approx(-0.2)
    assert paired["mind-length-inj"]["vs_mind-inj"]["embedded"]["seeds"] == [5]
    assert "vs_mind" not in paired["mind-length-inj"]  # an injected ablation is paired with mind-inj only


def test_what_the_ta_did_pools_seeds_and_reports_injected_paths(tmp_path: Path) -> None:
    cfg = seeded_study(tmp_path)
    students = cfg.students_dir
    atomic_write_json(students / "mind-s0" / "metrics.json", {
        "alpha_entropy_share": 0.9, "oracle_alpha_entropy_share": 0.8, "ta_fit": 0.5, "ta_score_slope": 0.6,
        "selected_share": 0.8, "alpha_length_corr": -0.4, "alpha_share": {"Analogy": 1.2, "Socratic": 0.8}})
    atomic_write_json(students / "mind-s1" / "metrics.json", {
        "alpha_entropy_share": 0.7, "oracle_alpha_entropy_share": None, "ta_fit": 0.7, "ta_score_slope": 0.8,
        "selected_share": 1.0, "alpha_length_corr": -0.2, "alpha_share": {"Analogy": 1.0, "Socratic": 1.0}})
    # an injected run: its new keys, and the older ones missing
    atomic_write_json(students / "mind-inj-s5" / "metrics.json", {
        "alpha_entropy_share": 0.95, "injected_alpha_share": 0.25, "injected_deselected_share": 0.75,
        "injected_alpha_by_question": {"q1": 0.0, "q2": 0.5, "q3": None}})
    atomic_write_json(students / "uniform-s0" / "metrics.json", {"method": "uniform"})
    run(cfg)
    section = section_of(cfg.summary.read_text(), "## What the TA did")
    assert "| `mind` | 0, 1 | 0.80 (0.70–0.90) | 0.80 | 0.60 (0.50–0.70) | 0.70 (0.60–0.80) | 0.90 (0.80–1.00) | " \
           "-0.30 (-0.40–-0.20) |" in section
    assert "| `mind-inj` | 5 | 0.95 | – | – | – | – | – |" in section
    assert "| `mind` | 1.10 (1.00–1.20) | 0.90 (0.80–1.00) |" in section and "| `mind-inj` | – | – |" in section
    assert "`uniform`" not in section  # not a mind-family group
    assert "| `mind` | 0, 1 | – | – | – |" in section  # no injected figures: dashes, not a crash
    row = next(line for line in section.splitlines() if line.startswith("| `mind-inj` | 5 | 0.25 | 0.75 | "))
    assert row.endswith("(n=2) |") and row.split(" | ")[4].startswith("0.25 [0.00, 0.50]")
