"""analyze: the Dirichlet-process mixture on hand-made embeddings, and the stage on the real models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards import RATIONALE_SCHEMA, read_rows, write_shards
from stages.analyze import (
    AnalyzeConfig,
    cluster_stats,
    dpmm_cluster,
    effective_clusters,
    reduce_dims,
    run,
    sample_rationales,
)


def blobs(k: int, per: int, dim: int, sep: float, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, sep, (k, dim))
    x = np.concatenate([c + rng.normal(0.0, 1.0, (per, dim)) for c in centers])
    return x, [f"p{i}" for i in range(k) for _ in range(per)]


@pytest.mark.parametrize(("k", "dim", "seed"), [(4, 32, 0), (8, 384, 1), (3, 64, 2)])
def test_dpmm_finds_known_clusters(k: int, dim: int, seed: int) -> None:
    x, labels = blobs(k, 30, dim, sep=3.0, seed=seed)
    stats, assigned = cluster_stats(x, labels, AnalyzeConfig(max_components=16))
    assert stats["effective_clusters"] == k  # the DP prior prunes the 16 - k spare components
    assert stats["ari"] > 0.9 and stats["nmi"] > 0.9
    assert len(assigned) == len(labels)


def test_clusters_scored_against_questions_too() -> None:
    """Points grouped by question, perspectives spread across them: question ARI high, perspective ARI ~0."""
    x, qs = blobs(4, 24, 64, sep=3.0, seed=5)
    perspectives = [f"p{i % 6}" for i in range(len(qs))]
    stats, _ = cluster_stats(x, perspectives, AnalyzeConfig(), questions=qs)
    assert stats["ari_question"] > 0.9 and stats["ari"] < 0.1


def test_dpmm_on_structureless_data_finds_no_perspective_clusters() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(160, 64))
    labels = [f"p{i % 8}" for i in range(160)]
    stats, _ = cluster_stats(x, labels, AnalyzeConfig())
    assert stats["ari"] < 0.1
    assert stats["effective_clusters"] < 8


def test_effective_clusters_counts_points_not_weights() -> None:
    assigned = np.array([0] * 50 + [3] * 48 + [7] * 2)
    assert effective_clusters(assigned, 0.05) == 2  # cluster 7 holds 2% < 5%
    assert effective_clusters(assigned, 0.02) == 3


def test_reduce_dims_caps_at_points_and_features() -> None:
    x = np.random.default_rng(0).normal(size=(10, 5))
    assert reduce_dims(x, 16, 0).shape == (10, 5)
    assert reduce_dims(np.random.default_rng(0).normal(size=(6, 40)), 16, 0).shape == (6, 5)
    labels, weights = dpmm_cluster(reduce_dims(x, 4, 0), 16, 0)
    assert labels.shape == (10,) and len(weights) == 10  # no more components than points


def test_sample_rationales_is_seeded_and_capped() -> None:
    rows = [{"question_id": f"q{i}", "sample_index": 0, "teacher": "t", "perspective": p}
            for p in ("B", "A") for i in range(10)]
    a = sample_rationales(rows, 4, seed=1)
    assert [r["perspective"] for r in a] == ["A"] * 4 + ["B"] * 4
    assert a == sample_rationales(list(reversed(rows)), 4, seed=1)  # independent of input order
    assert a != sample_rationales(rows, 4, seed=2)


def test_config_rejects_bad_values() -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="reserved"):
        AnalyzeConfig(students={"encoder": "x"})
    with pytest.raises(ConfigError, match="per_perspective"):
        AnalyzeConfig(per_perspective=1)


def rationale_shards(folder: Path) -> None:
    """Two perspectives with very different wording, 8 rationales each, plus rows that must be dropped."""
    rows = []
    for i in range(8):
        a, b = 3 + i, 2 + i % 4
        rows.append(("Formal-Symbolic", f"Let x = {a} and y = {b}. Then x + y = {a + b}. The answer is {a + b}.", "stop"))
        rows.append(("Analogy", f"Think of a basket of fruit: you start with {a} apples and a friend gives you {b} "
                                f"more, just like filling a jar. The answer is {a + b}.", "stop"))
    rows.append(("Analogy", "Imagine a", "length"))  # unfinished: dropped with only_finished
    rows.append(("Analogy", "   ", "stop"))  # empty: dropped and counted
    write_shards(folder, [
        {"question_id": f"q{i // 2}", "teacher": "t", "perspective": p, "sample_index": 0, "prompt": "p",
         "text": text, "finish_reason": fin, "num_tokens": 10, "seed": 0}
        for i, (p, text, fin) in enumerate(rows)
    ], RATIONALE_SCHEMA, {"stage": "test"})


@pytest.mark.slow
def test_analyze_on_real_models(tmp_path: Path, embedded_model_dir: Path, encoder_dir: Path) -> None:
    rationale_shards(tmp_path / "rationales")
    cfg = AnalyzeConfig(
        rationales_dir=tmp_path / "rationales", encoder_dir=encoder_dir,
        students={"base": str(embedded_model_dir)}, per_perspective=6, pca_dim=4, max_components=6,
        batch_size=4, max_length=64, perplexity=5.0,
        out_dir=tmp_path / "analysis/points", plot=tmp_path / "analysis/tsne.png", metrics=tmp_path / "analyze.json",
    )
    metrics = run(cfg)
    assert metrics["perspectives"] == 2 and metrics["rationales"] == 12
    on_disk = json.loads(cfg.metrics.read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for space in ("encoder", "base"):
        s = on_disk[space]
        assert set(s) == {"n", "effective_clusters", "occupied_clusters", "ari", "nmi", "ari_question", "nmi_question"}
        assert s["n"] == 12 and 1 <= s["effective_clusters"] <= 6
        assert -1.0 <= s["ari"] <= 1.0 and 0.0 <= s["nmi"] <= 1.0
    # The two styles differ in wording and length: the sentence encoder separates them.
    assert on_disk["encoder"]["ari"] > 0.5
    points = read_rows(cfg.out_dir)
    assert len(points) == 24 and {p["space"] for p in points} == {"encoder", "base"}
    assert all(np.isfinite(p["tsne_x"]) and np.isfinite(p["tsne_y"]) for p in points)
    png = cfg.plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((cfg.out_dir / "manifest.json").read_text())
    assert manifest["config"]["per_perspective"] == 6


def test_analyze_needs_two_perspectives(tmp_path: Path) -> None:
    write_shards(tmp_path / "r", [{"question_id": f"q{i}", "teacher": "t", "perspective": "Intuitive",
                                   "sample_index": 0, "prompt": "p", "text": "x", "finish_reason": "stop",
                                   "num_tokens": 1, "seed": 0} for i in range(20)], RATIONALE_SCHEMA, {})
    with pytest.raises(ValueError, match="at least 2 perspectives"):
        run(AnalyzeConfig(rationales_dir=tmp_path / "r"))
