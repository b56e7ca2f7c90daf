"""Latent-space analysis: do the teacher's perspectives form distinct clusters?

    mind analyze                      # params.yaml's `analyze` section
    mind analyze --per-perspective 50 --students '{base: data/models/smollm2-135m-instruct}'

For a seeded sample of ``per_perspective`` rationales of every perspective in
``data/rationales/``, three kinds of representation are built:

- ``encoder``: the sentence encoder's embedding of the rationale text (MiniLM by default);
- one per entry of ``students`` (default: the base student and the ``mind`` student): the
  student's last-layer hidden states on the rationale text, mean-pooled over its tokens.

Each representation is standardised, reduced by PCA to ``pca_dim`` dimensions and clustered
with a Dirichlet-process Gaussian mixture (scikit-learn's ``BayesianGaussianMixture`` with
``weight_concentration_prior_type="dirichlet_process"``): the number of clusters is not
given, the prior switches unneeded components off. Reported per representation: the number
of effective clusters (clusters holding at least ``min_share`` of the points)
and the adjusted Rand index / normalised mutual information between cluster assignments and
perspective labels (1 = the clusters are exactly the perspectives, 0 = unrelated); the same
against the question ids (``ari_question``, ``nmi_question``) tells whether a representation
groups rationales by question content instead.

Writes ``metrics/analyze.json`` (DVC metrics), ``data/analysis/tsne.png`` (one t-SNE map per
representation, points coloured by perspective; a DVC plot) and ``data/analysis/points/``
(shards: representation, question_id, perspective, sample_index, cluster, tsne_x, tsne_y;
the manifest holds the resolved config).
"""

from __future__ import annotations

import io
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pipeline.config import check, to_dict
from pipeline.shards import atomic_write_bytes, atomic_write_json, read_table, write_shards
from stages.cli import field

log = logging.getLogger("mind.analyze")

POINT_SCHEMA = pa.schema(
    [
        ("space", pa.string()),
        ("question_id", pa.string()),
        ("perspective", pa.string()),
        ("sample_index", pa.int32()),
        ("cluster", pa.int32()),
        ("tsne_x", pa.float32()),
        ("tsne_y", pa.float32()),
    ]
)


@dataclass
class AnalyzeConfig:
    rationales_dir: Path = field(Path("data/rationales"), help="rationale shards (generate's output)")
    encoder_dir: Path = field(Path("data/models/all-minilm-l6-v2"), help="sentence encoder (sentence-transformers dir)")
    students: dict[str, str] = field(
        help="name -> HF model dir whose mean-pooled last-layer hidden states are clustered",
        factory=lambda: {"base": "data/models/smollm2-135m-instruct", "mind": "data/students/mind-s0/merged"},
    )
    per_perspective: int = field(12, help="rationales sampled per perspective (seeded)")
    only_finished: bool = field(True, help="use only rationales that ended on their own (finish_reason stop)")
    max_length: int = field(96, help="tokens per rationale fed to the encoder and the students (longer ones are truncated)")
    batch_size: int = field(16, help="rationales per forward pass")
    pca_dim: int = field(16, help="PCA dimensions the mixture is fitted in")
    max_components: int = field(16, help="upper bound on mixture components (the DP prior prunes the rest)")
    concentration: float | None = field(None, help="Dirichlet-process concentration; None: 1/max_components")
    covariance_type: Literal["full", "diag", "tied", "spherical"] = field(
        "spherical", help="mixture covariance; spherical does not over-split a few dozen points per cluster")
    min_share: float = field(0.02, help="a cluster holding at least this share of the points counts as effective")
    perplexity: float = field(30.0, help="t-SNE perplexity (capped at (n-1)/3)")
    seed: int = field(0, help="sampling, mixture and t-SNE seed")
    out_dir: Path = field(Path("data/analysis/points"), help="per-point shards")
    plot: Path = field(Path("data/analysis/tsne.png"), help="t-SNE figure")
    metrics: Path = field(Path("metrics/analyze.json"), help="cluster statistics (DVC metrics)")

    def __post_init__(self) -> None:
        check(self.per_perspective >= 2, "analyze.per_perspective must be >= 2")
        check(self.max_length > 0 and self.batch_size > 0, "analyze.max_length and batch_size must be positive")
        check(self.pca_dim >= 2, "analyze.pca_dim must be >= 2")
        check(self.max_components >= 2, "analyze.max_components must be >= 2")
        check(self.concentration is None or self.concentration > 0, "analyze.concentration must be positive")
        check(0 < self.min_share < 1, "analyze.min_share must be in (0, 1)")
        check(self.perplexity > 0, "analyze.perplexity must be positive")
        check("encoder" not in self.students, "analyze.students: 'encoder' is reserved for the sentence encoder")
        check(self.plot.suffix == ".png", f"analyze.plot must be a .png file, got {self.plot}")


# ---------------------------------------------------------------- clustering (plain functions)


def reduce_dims(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Standardise every feature, then PCA to ``dim`` (fewer when there are fewer points/features).

    Standardising first matters for LM hidden states, where a few "massive activation"
    features would otherwise dominate every distance.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(x.astype(np.float64))
    k = min(dim, x.shape[0] - 1, x.shape[1])
    return PCA(n_components=k, random_state=seed).fit_transform(z)


def dpmm_cluster(
    x: np.ndarray,
    max_components: int,
    seed: int,
    concentration: float | None = None,
    covariance_type: str = "full",
) -> tuple[np.ndarray, np.ndarray]:
    """Fit a Dirichlet-process Gaussian mixture; return (cluster label per point, component weights)."""
    from sklearn.mixture import BayesianGaussianMixture

    gm = BayesianGaussianMixture(
        n_components=min(max_components, x.shape[0]),
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=concentration,
        covariance_type=covariance_type,
        max_iter=1000,
        n_init=3,
        init_params="kmeans",
        random_state=seed,
        reg_covar=1e-4,
    )
    labels = gm.fit_predict(x)
    return labels, gm.weights_


def effective_clusters(assigned: np.ndarray, min_share: float) -> int:
    """Clusters holding at least ``min_share`` of the points.

    Counted from the assignments, not from the mixture weights: a Dirichlet-process fit
    leaves a little weight on every unused component, which a weight threshold would count.
    """
    _, counts = np.unique(assigned, return_counts=True)
    return int(np.sum(counts >= min_share * len(assigned)))


def cluster_stats(
    x: np.ndarray, labels: list[str], cfg: AnalyzeConfig, questions: list[str] | None = None
) -> tuple[dict[str, float | int], np.ndarray]:
    """Reduce, cluster and score one representation against the perspective labels.

    With ``questions`` (the question id of every point) the clusters are also scored against
    the questions: a representation may group rationales by what they are about rather than
    by how they reason (``ari_question`` high, ``ari`` low).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    z = reduce_dims(x, cfg.pca_dim, cfg.seed)
    assigned, _ = dpmm_cluster(z, cfg.max_components, cfg.seed, cfg.concentration, cfg.covariance_type)
    stats = {
        "n": len(labels),
        "effective_clusters": effective_clusters(assigned, cfg.min_share),
        "occupied_clusters": len(set(assigned.tolist())),
        "ari": float(adjusted_rand_score(labels, assigned)),
        "nmi": float(normalized_mutual_info_score(labels, assigned)),
    }
    if questions is not None:
        stats["ari_question"] = float(adjusted_rand_score(questions, assigned))
        stats["nmi_question"] = float(normalized_mutual_info_score(questions, assigned))
    return stats, assigned


def tsne_2d(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    z = reduce_dims(x, 50, seed)  # the usual PCA-50 before t-SNE
    perp = min(perplexity, (x.shape[0] - 1) / 3)
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(z)


# ---------------------------------------------------------------- representations


def sample_rationales(rows: list[dict[str, Any]], per_perspective: int, seed: int) -> list[dict[str, Any]]:
    """Up to ``per_perspective`` rows of each perspective, seeded, perspectives in sorted order."""
    by_p: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_p[r["perspective"]].append(r)
    out: list[dict[str, Any]] = []
    for p in sorted(by_p):
        group = sorted(by_p[p], key=lambda r: (r["question_id"], r["sample_index"], r["teacher"]))
        random.Random(f"{seed}:{p}").shuffle(group)
        out.extend(group[:per_perspective])
    return out


def encoder_embeddings(encoder_dir: Path, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    if not Path(encoder_dir).is_dir():
        raise FileNotFoundError(f"sentence encoder {encoder_dir} does not exist (run `mind models`)")
    model = SentenceTransformer(str(encoder_dir), device="cpu")
    # The same opening window the students see, so the three spaces embed the same text.
    model.max_seq_length = min(model.max_seq_length, max_length)
    return model.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)


def student_embeddings(model_dir: Path, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    """Mean over the text's tokens of the student's last-layer hidden states (after the final norm)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"student model {model_dir} does not exist (run the stage that writes it)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    # float32 on CPU: bf16 matmuls are slow on CPUs without AMX; bf16 on GPU.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), batch_size), desc=f"hidden states {Path(model_dir).name}"):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length).to(device)
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu().numpy())
    del model
    return np.concatenate(out)


def tsne_png(maps: dict[str, np.ndarray], labels: list[str], stats: dict[str, dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(labels))
    colors = {p: f"C{i % 10}" for i, p in enumerate(names)}
    markers = {p: "o" if i < 10 else "^" for i, p in enumerate(names)}
    fig, axes = plt.subplots(1, len(maps), figsize=(4.6 * len(maps), 4.6), squeeze=False)
    lab = np.array(labels)
    for ax, (space, xy) in zip(axes[0], maps.items()):
        for p in names:
            sel = lab == p
            ax.scatter(xy[sel, 0], xy[sel, 1], s=10, c=colors[p], marker=markers[p], label=p, alpha=0.8)
        s = stats[space]
        ax.set_title(f"{space}: {s['effective_clusters']} clusters, ARI {s['ari']:.2f}, NMI {s['nmi']:.2f}",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="perspective")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run(cfg: AnalyzeConfig) -> dict[str, Any]:
    """Cluster per-perspective rationale representations and draw their t-SNE maps."""
    table = read_table(cfg.rationales_dir)
    rows = table.select(["question_id", "teacher", "perspective", "sample_index", "text", "finish_reason"]).to_pylist()
    read = len(rows)
    if cfg.only_finished:
        rows = [r for r in rows if r["finish_reason"] == "stop"]
    empty = sum(1 for r in rows if not r["text"].strip())
    rows = [r for r in rows if r["text"].strip()]
    sample = sample_rationales(rows, cfg.per_perspective, cfg.seed)
    perspectives = sorted({r["perspective"] for r in sample})
    log.info("read %d rationales from %s; dropped %d unfinished (only_finished=%s) and %d empty; "
             "sampled %d over %d perspectives", read, cfg.rationales_dir, read - len(rows) - empty,
             cfg.only_finished, empty, len(sample), len(perspectives))
    if len(perspectives) < 2:
        raise ValueError(f"{cfg.rationales_dir}: need rationales of at least 2 perspectives, got {perspectives}")
    if len(sample) < 10:
        raise ValueError(f"{cfg.rationales_dir}: only {len(sample)} usable rationales; too few to cluster")
    texts = [r["text"] for r in sample]
    labels = [r["perspective"] for r in sample]

    spaces: dict[str, np.ndarray] = {"encoder": encoder_embeddings(cfg.encoder_dir, texts, cfg.max_length, cfg.batch_size)}
    for name, model_dir in cfg.students.items():
        spaces[name] = student_embeddings(Path(model_dir), texts, cfg.max_length, cfg.batch_size)

    stats: dict[str, dict[str, Any]] = {}
    maps: dict[str, np.ndarray] = {}
    points: list[dict[str, Any]] = []
    for space, x in spaces.items():
        stats[space], assigned = cluster_stats(x, labels, cfg, [r["question_id"] for r in sample])
        maps[space] = tsne_2d(x, cfg.perplexity, cfg.seed)
        log.info("%s (dim %d): %d effective clusters; vs perspectives ARI %.3f, NMI %.3f; vs questions ARI %.3f",
                 space, x.shape[1], stats[space]["effective_clusters"], stats[space]["ari"], stats[space]["nmi"],
                 stats[space]["ari_question"])
        for r, c, (tx, ty) in zip(sample, assigned.tolist(), maps[space].tolist()):
            points.append({"space": space, "question_id": r["question_id"], "perspective": r["perspective"],
                           "sample_index": r["sample_index"], "cluster": c, "tsne_x": tx, "tsne_y": ty})

    config = to_dict(cfg)
    write_shards(cfg.out_dir, points, POINT_SCHEMA, {"stage": "analyze", **config})
    atomic_write_bytes(cfg.plot, tsne_png(maps, labels, stats))
    metrics = {"perspectives": len(perspectives), "rationales": len(sample), **stats}
    atomic_write_json(cfg.metrics, metrics)
    log.info("wrote %s, %s, %s", cfg.metrics, cfg.plot, cfg.out_dir)
    return metrics
