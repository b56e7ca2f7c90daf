"""The Teaching Assistant (TA, MIND's "MetaNet"): scores how learnable each path is right now.

Input: for every (question, rationale) path, the frozen sentence encoder's embedding of the
question and of the rationale, and the rationale's log-length in characters, concatenated
(``2·d + 1``). The encoder never trains, so the
embeddings are computed once per text and cached on disk (``embed_paths``).

Per question (``K`` path slots, ``mask`` marks the real ones):

0. relational inputs (``path_features``): the rationale embedding centred on its question's
   mean, and the path's cosine to its question, mean cosine to its siblings and log-length,
   each relative to the question's mean;
1. an MLP projection ``-> hidden``;
2. the synergy layer: multi-head self-attention across the question's paths, with a
   key-padding mask so a missing path is never attended to, plus a residual connection.
   ``synergy=False`` (the ablation) removes only the attention: each path is scored alone;
3. LayerNorm (with or without synergy, so the ablation differs by the attention alone);
4. scoring heads: ``score_heads`` independent heads, each its own hidden layer
   (``hidden -> hidden``, GELU, ``hidden -> 1``), averaged into one score ``s_k``: an
   ensemble, not one linear map in disguise. Padding slots get score 0 and must be ignored
   through ``mask``.

Dropout (after the projection's hidden layer and on the attention output) draws its masks
from the ``generator`` passed to ``forward`` (``pipeline.fdic`` passes the TA's own), not from
torch's global RNG: MIND's TA must not shift the student's LoRA dropout masks, which the
baselines draw from that global RNG.

Choice: the question and the rationale are embedded separately (rather than as one
concatenated text) so that neither is truncated by the encoder's sequence limit and the TA
sees the question's identity explicitly.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("mind.ta")


class TeachingAssistant(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int = 256,
        num_heads: int = 4,
        synergy: bool = True,
        score_heads: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by num_heads {num_heads}")
        if embed_dim % 2 != 1:
            raise ValueError(f"embed_dim {embed_dim} must be 2·d + 1: [question; rationale; ln chars] (embed_paths)")
        if score_heads < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"score_heads {score_heads} must be >= 1 and dropout {dropout} in [0, 1)")
        self.synergy = synergy
        self.dropout = dropout
        # path_features adds three relational inputs to [q; r] and drops ln chars from the rest.
        self.proj_in = nn.Linear(embed_dim + 2, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, hidden_dim)
        # Built even when synergy is off, so TA checkpoints share one layout; unused then. Its own
        # dropout is off: the output dropout below draws from the TA's generator instead.
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
            for _ in range(score_heads))

    def _drop(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Inverted dropout whose mask comes from ``generator`` (None: torch's global RNG)."""
        if not self.training or self.dropout == 0.0:
            return x
        where = generator.device if generator is not None else x.device
        keep = torch.rand(x.shape, generator=generator, device=where).to(x.device) >= self.dropout
        return x * keep / (1.0 - self.dropout)

    def forward(self, emb: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``emb [Q, K, embed_dim]``, ``mask [Q, K]`` (True = real path) -> scores ``[Q, K]``.

        In train mode, dropout masks are drawn from ``generator``."""
        if emb.dim() != 3 or mask.shape != emb.shape[:2]:
            raise ValueError(f"TA expects emb [Q, K, D] and mask [Q, K], got {tuple(emb.shape)}, {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every question needs at least one real path")
        # Padding embeddings may hold anything; zero them so they cannot produce NaN/inf.
        emb = emb.masked_fill(~mask[..., None], 0.0)
        x = path_features(emb, mask)
        h = self.proj_out(self._drop(F.gelu(self.proj_in(x)), generator))
        if self.synergy:
            # key_padding_mask: True = ignore that key. Every question has a real key, so no
            # attention row is all-masked (which would give NaN).
            a, _ = self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)
            h = h + self._drop(a, generator)
        h = self.norm(h)
        s = torch.stack([head(h).squeeze(-1) for head in self.heads], dim=-1).mean(dim=-1)
        return s.masked_fill(~mask, 0.0)


# Within a question, cosines differ by hundredths to tenths and log-lengths by tenths: scaled
# so that the three relational inputs are not drowned by the 2·d embedding entries (~0.05 each).
RELATION_SCALE = 10.0


def path_features(emb: Tensor, mask: Tensor) -> Tensor:
    """The TA's input per path from ``[q; r; ln chars]`` (``embed_paths``): ``[q; r - r̄; 10·c(q·r);
    10·c(sib); 10·c(ln chars)]``, where ``r̄`` is the mean rationale embedding of the question's real
    paths, ``sib`` a path's mean cosine to its siblings, and ``c(x)`` is ``x`` minus its mean over
    the question's real paths. Padding slots are 0.

    Why: the TA ranks a question's paths against each other, so only what differs between them
    can inform it, and what they share dominates their embeddings (a question's rationales sit at
    cosine ~0.9). With the raw ``[q; r]`` the part that varies between one question's paths was
    19 % of the input's norm and 5 % after the projection, and a TA that fitted its training
    questions did not carry over to new ones (a rationale of another question, at 1 nat more
    loss, kept its uniform weight on held-out questions). How a path relates to its question and
    to its siblings, and how long it is, carry over; the embeddings keep the content."""
    d = (emb.shape[-1] - 1) // 2
    m = mask[..., None].to(emb.dtype)
    k = m.sum(dim=1, keepdim=True).clamp_min(1.0)

    def centred(x: Tensor) -> Tensor:
        return (x - (x * m).sum(dim=1, keepdim=True) / k) * m

    q, r, log_len = emb[..., :d], emb[..., d: 2 * d], emb[..., 2 * d:]
    q_cos = (q * r).sum(dim=-1, keepdim=True)
    sib = ((r @ r.transpose(1, 2)) * mask[:, None, :].to(emb.dtype)).sum(dim=-1, keepdim=True)
    sib = (sib - (r * r).sum(dim=-1, keepdim=True)) / (k - 1.0).clamp_min(1.0)
    rel = torch.cat([centred(q_cos), centred(sib), centred(log_len)], dim=-1) * RELATION_SCALE
    return torch.cat([q * m, centred(r), rel], dim=-1)


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def encoder_key(encoder: str) -> str:
    """What an encoder's cached vectors belong to. A local folder: the sha256 over its files (each
    file's relative path and sha256), so other weights written to the same path never reuse
    its vectors while a copy at another path does; ~90 MB for MiniLM, hashed once per
    ``encode_texts`` call, i.e. once per distill run. A Hub id (no such folder): the id itself."""
    folder = Path(encoder)
    if not folder.is_dir():
        return str(encoder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\0".encode())
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def encoder_cache_path(cache_dir: Path, key: str) -> Path:
    """The cache file of the encoder whose ``encoder_key`` is ``key``."""
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def encode_texts(
    texts: list[str],
    encoder: str,
    cache_dir: Path | None,
    batch_size: int = 64,
    device: str = "cpu",
) -> Tensor:
    """Embeddings ``[len(texts), d]`` from a sentence-transformers model (a name or a local dir).

    Texts already in the on-disk cache are not re-encoded; the cache is keyed by the
    encoder's content (``encoder_key``) and the sha256 of each text, and rewritten atomically
    when it grows.
    """
    cache: dict[str, Tensor] = {}
    key = encoder_key(encoder) if cache_dir is not None else ""  # no cache: nothing to key
    path = encoder_cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("encoder") == key:
                cache = dict(zip(saved["keys"], saved["vectors"]))
        except (RuntimeError, EOFError, KeyError) as e:  # a broken cache is rebuilt, not fatal
            log.warning("ignoring unreadable embedding cache %s: %s", path, e)
    keys = [_text_key(t) for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items())
    if missing:
        from sentence_transformers import SentenceTransformer  # heavy import, only when needed

        model = SentenceTransformer(str(encoder), device=device)
        log.info("encoding %d new texts with %s (%d cached)", len(missing), encoder, len(keys) - len(missing))
        vecs = model.encode([t for _, t in missing], batch_size=batch_size, convert_to_tensor=True,
                            show_progress_bar=len(missing) > 256, normalize_embeddings=True)
        for (k, _), v in zip(missing, vecs.float().cpu()):
            cache[k] = v
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            ks = list(cache)
            torch.save({"encoder": key, "keys": ks, "vectors": torch.stack([cache[k] for k in ks])}, tmp)
            tmp.replace(path)
    return torch.stack([cache[k] for k in keys])


def embed_paths(
    questions: list[str],
    rationales: list[str],
    encoder: str,
    cache_dir: Path | None,
    device: str = "cpu",
) -> Tensor:
    """TA input per path: ``[encode(question); encode(rationale); ln(chars of rationale)]``, shape ``[N, 2·d + 1]``."""
    if len(questions) != len(rationales):
        raise ValueError(f"{len(questions)} questions for {len(rationales)} rationales")
    uniq_q = sorted(set(questions))
    # One call, so the encoder loads at most once.
    vecs = encode_texts(uniq_q + list(rationales), encoder, cache_dir, device=device)
    q_vecs, r_vecs = vecs[: len(uniq_q)], vecs[len(uniq_q):]
    q_index = {q: i for i, q in enumerate(uniq_q)}
    q_rows = q_vecs[torch.tensor([q_index[q] for q in questions], dtype=torch.long)]
    log_len = torch.tensor([[math.log(max(1, len(r)))] for r in rationales], dtype=r_vecs.dtype)
    return torch.cat([q_rows, r_vecs, log_len], dim=-1)
