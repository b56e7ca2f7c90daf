"""The Teaching Assistant: shapes, masking, the synergy switch, learning to rank, embeddings."""

from __future__ import annotations

import copy
import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline import losses as L
from pipeline.ta import TeachingAssistant, embed_paths, encode_texts, encoder_key


pytestmark = pytest.mark.usefixtures("one_thread")


def _ta(synergy: bool = True, dim: int = 13) -> TeachingAssistant:
    torch.manual_seed(0)
    return TeachingAssistant(dim, hidden_dim=16, num_heads=4, synergy=synergy, score_heads=2, dropout=0.0).eval()


def test_shapes_and_padding_scores() -> None:
    ta = _ta()
    emb = torch.randn(3, 5, 13)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    s = ta(emb, mask)
    assert s.shape == (3, 5)
    assert torch.isfinite(s).all()
    assert torch.all(s[~mask] == 0)


@pytest.mark.parametrize("synergy", [True, False])
def test_missing_path_changes_neither_other_scores_nor_student_loss(synergy: bool) -> None:
    ta = _ta(synergy)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(2, 4, 13, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s1 = ta(emb, mask)
    emb2 = emb.clone()
    emb2[~mask] = torch.randn(int((~mask).sum()), 13, generator=g) * 100  # garbage in the padding slots
    s2 = ta(emb2, mask)
    assert torch.allclose(s1, s2, atol=1e-6)
    # The same questions with the padding slots cut off score identically.
    assert torch.allclose(ta(emb[:1, :3], mask[:1, :3]), s1[:1, :3], atol=1e-6)
    # ... and the student loss does not see the padding either.
    ce = torch.tensor([[1.0, 2.0, 3.0, 50.0], [0.5, 1.5, 80.0, 90.0]])
    jsd = [torch.rand(4, 4).triu(1) + torch.rand(4, 4).triu(1).T for _ in range(2)]
    alpha1 = L.path_weights(s1, L.select_paths(s1, mask, 0.2, 1.0), 1.0)
    alpha2 = L.path_weights(s2, L.select_paths(s2, mask, 0.2, 1.0), 1.0)
    ce2 = ce.clone()
    ce2[~mask] = -7.0
    assert float(L.student_loss(ce, alpha1, jsd, 0.5)[0]) == pytest.approx(float(L.student_loss(ce2, alpha2, jsd, 0.5)[0]))


def test_synergy_layer_mixes_paths_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without synergy a path's score is a function of its own row of ``path_features``; with it,
    of the other paths' rows too."""
    import pipeline.ta as T

    emb, mask = torch.randn(1, 3, 13), torch.ones(1, 3, dtype=torch.bool)
    feats = T.path_features(emb, mask)
    changed = feats.clone()
    changed[0, 2] += 5.0  # change path 2's row only
    on, off = _ta(True), _ta(False)

    def scores(ta: TeachingAssistant, x: torch.Tensor) -> torch.Tensor:
        monkeypatch.setattr(T, "path_features", lambda e, m: x)
        return ta(emb, mask)[0, 0]

    assert not torch.allclose(scores(on, feats), scores(on, changed))
    assert torch.allclose(scores(off, feats), scores(off, changed))


def test_path_features_relate_each_path_to_its_question_and_siblings() -> None:
    """On literal vectors: a rationale unlike its question and its siblings gets the lowest
    centred cosines, the relational inputs sum to 0 over a question's real paths, and padding
    (and what it holds) changes nothing."""
    import pipeline.ta as T

    q = torch.tensor([1.0, 0.0, 0.0])
    rs = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [9.0, 9.0, 9.0]])  # the last is padding
    lens = torch.tensor([[3.0], [4.0], [5.0], [7.0]])
    emb = torch.cat([q.expand(4, 3), rs, lens], dim=-1)[None]
    mask = torch.tensor([[True, True, True, False]])
    x = T.path_features(emb, mask)
    assert x.shape == (1, 4, 3 + 3 + 3)
    q_cos, sib, length = x[0, :3, 6] / T.RELATION_SCALE, x[0, :3, 7] / T.RELATION_SCALE, x[0, :3, 8] / T.RELATION_SCALE
    assert q_cos.tolist() == pytest.approx([1 - 0.6, 0.8 - 0.6, 0 - 0.6])
    assert sib.tolist() == pytest.approx([0.4 - 0.8 / 3, 0.4 - 0.8 / 3, 0.0 - 0.8 / 3])  # mean sibling cosines 0.4, 0.4, 0
    assert length.tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert torch.all(x[0, 3] == 0)
    assert torch.allclose(x[0, :3, 3:6].sum(dim=0), torch.zeros(3), atol=1e-6)  # r - mean r


def test_refuses_a_question_without_paths() -> None:
    with pytest.raises(ValueError, match="at least one real path"):
        _ta()(torch.randn(1, 2, 13), torch.zeros(1, 2, dtype=torch.bool))


def test_ta_learns_to_rank_synthetic_losses() -> None:
    """Per-path losses are a hidden function of the embeddings; after a few hundred ListNet-KL
    steps the TA's scores must rank held-out paths like -loss (Spearman >= 0.8)."""
    torch.manual_seed(0)
    D, K = 17, 4
    w = torch.randn(D)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = torch.randn(n, K, D)
        mask = torch.ones(n, K, dtype=torch.bool)
        mask[: n // 3, 3] = False  # some questions have 3 paths
        loss = (emb @ w).div(4).sigmoid() * 3 + 0.02 * torch.randn(n, K)
        return emb, mask, loss

    emb, mask, loss = make(256)
    ta = TeachingAssistant(D, hidden_dim=32, num_heads=4, synergy=True, dropout=0.0)
    opt = torch.optim.AdamW(ta.parameters(), lr=3e-3)
    before_emb, before_mask, before_loss = make(128)
    rho_before = L.mean_question_spearman(ta.eval()(before_emb, before_mask).detach(), -before_loss, before_mask)
    ta.train()
    for step in range(300):
        idx = torch.randint(0, 256, (32,))
        meta = L.listnet_kl(ta(emb[idx], mask[idx]), loss[idx], mask[idx], tau=0.5)
        opt.zero_grad()
        meta.backward()
        opt.step()
    rho = L.mean_question_spearman(ta.eval()(before_emb, before_mask).detach(), -before_loss, before_mask)
    assert rho >= 0.8, f"Spearman {rho:.3f} (before training {rho_before:.3f})"


def test_embeddings_are_cached_per_text(encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q = ["What is 2 + 3?", "What is 2 + 3?", "Sam has 4 apples."]
    r = ["2 + 3 = 5. The answer is 5.", "Add them: 5. The answer is 5.", "He has 4. The answer is 4."]
    emb = embed_paths(q, r, str(encoder_dir), tmp_path)
    assert emb.shape == (3, 2 * 384 + 1)
    assert emb[0, -1] == pytest.approx(math.log(len(r[0])))  # ln chars of the rationale
    assert torch.allclose(emb[0, :384], emb[1, :384])  # same question, same half
    assert not torch.allclose(emb[0, 384:768], emb[1, 384:768])
    assert torch.allclose(emb[0, 384:768].norm(), torch.tensor(1.0), atol=1e-4)

    import sentence_transformers

    def _no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder was loaded although every text is cached")

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", _no_load)
    again = embed_paths(q, r, str(encoder_dir), tmp_path)
    assert torch.equal(emb, again)
    # A new text does need the encoder.
    with pytest.raises(AssertionError, match="encoder was loaded"):
        encode_texts(["a brand new rationale"], str(encoder_dir), tmp_path)


def test_embedding_cache_is_keyed_by_the_encoders_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other weights written to the encoder's folder get their own cache file (a cache named by the
    path would hand back the old encoder's vectors); the same files at another path reuse it."""
    loads: list[str] = []

    class FolderEncoder:
        """Stands in for SentenceTransformer: every vector carries the folder's one weight byte."""

        def __init__(self, folder: str, device: str) -> None:
            loads.append(folder)
            self.weight = float(Path(folder, "weights.bin").read_bytes()[0])

        def encode(self, texts: list[str], **kwargs: object) -> torch.Tensor:
            return torch.tensor([[self.weight, float(len(t))] for t in texts])

    monkeypatch.setitem(sys.modules, "sentence_transformers",
                        types.SimpleNamespace(SentenceTransformer=FolderEncoder))
    texts = ["What is 2 + 3?", "2 + 3 = 5. The answer is 5."]
    cache, encoder = tmp_path / "cache", tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "weights.bin").write_bytes(b"\x01")
    first = encode_texts(texts, str(encoder), cache)
    (encoder / "weights.bin").write_bytes(b"\x02")  # another encoder at the same path
    second = encode_texts(texts, str(encoder), cache)
    assert len(loads) == 2 and second[:, 0].eq(2.0).all() and first[:, 0].eq(1.0).all()
    assert len(list(cache.glob("*.pt"))) == 2

    moved = tmp_path / "elsewhere" / "encoder"
    shutil.copytree(encoder, moved)
    assert torch.equal(encode_texts(texts, str(moved), cache), second)
    (encoder / "weights.bin").write_bytes(b"\x01")  # the first encoder again
    assert torch.equal(encode_texts(texts, str(encoder), cache), first)
    assert len(loads) == 2  # both served from the cache: no encoder was loaded
    # A Hub id names no folder to hash: its name is the key.
    assert encoder_key("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_score_heads_are_independent_not_one_linear_map() -> None:
    """Each head has its own hidden layer: two heads are an ensemble, which one head with the
    averaged weights does not reproduce (with heads sharing a GELU and only a linear map after
    it, it would, exactly)."""
    torch.manual_seed(0)
    two = TeachingAssistant(13, hidden_dim=16, num_heads=4, score_heads=2, dropout=0.0).eval()
    assert len(two.heads) == 2
    assert two.heads[0][0].weight.data_ptr() != two.heads[1][0].weight.data_ptr()
    one = TeachingAssistant(13, hidden_dim=16, num_heads=4, score_heads=1, dropout=0.0).eval()
    state = {k: v for k, v in two.state_dict().items() if not k.startswith("heads.")}
    for name, _ in one.heads[0].named_parameters():
        state[f"heads.0.{name}"] = (two.heads[0].get_parameter(name) + two.heads[1].get_parameter(name)) / 2
    one.load_state_dict(state)
    emb, mask = torch.randn(4, 3, 13), torch.ones(4, 3, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(one(emb, mask), two(emb, mask), atol=1e-4)
        # ... while two copies of one head score exactly like that head.
        one.heads.append(copy.deepcopy(one.heads[0]))
        single = TeachingAssistant(13, hidden_dim=16, num_heads=4, score_heads=1, dropout=0.0).eval()
        single.load_state_dict(state)
        assert torch.allclose(one(emb, mask), single(emb, mask), atol=1e-6)


def test_no_synergy_removes_the_attention_only() -> None:
    """With the attention's output zeroed, synergy on and off are the same network: the ablation
    keeps the LayerNorm (it used to drop it too, removing two things)."""
    on, off = _ta(True), _ta(False)
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        on.attn.out_proj.weight.zero_()
        on.attn.out_proj.bias.zero_()
        off.attn.out_proj.weight.zero_()
        off.attn.out_proj.bias.zero_()
        on.norm.weight.mul_(3.0)  # a LayerNorm that is not the identity
        off.norm.weight.mul_(3.0)
    emb, mask = torch.randn(2, 3, 13), torch.ones(2, 3, dtype=torch.bool)
    assert torch.allclose(on(emb, mask), off(emb, mask), atol=1e-6)
    with torch.no_grad():
        off.norm.weight.mul_(2.0)
    assert not torch.allclose(on(emb, mask), off(emb, mask), atol=1e-4)  # the norm acts without synergy


def test_dropout_draws_from_the_given_generator_only() -> None:
    torch.manual_seed(0)
    ta = TeachingAssistant(13, hidden_dim=16, num_heads=4, dropout=0.5).train()
    emb, mask = torch.randn(2, 3, 13), torch.ones(2, 3, dtype=torch.bool)
    state = torch.get_rng_state()
    a = ta(emb, mask, torch.Generator().manual_seed(1))
    b = ta(emb, mask, torch.Generator().manual_seed(1))
    c = ta(emb, mask, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG did not move
    assert torch.equal(a, b) and not torch.allclose(a, c)
