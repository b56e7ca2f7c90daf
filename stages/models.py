"""Resolve every model named in params into a local directory under ``data/models/``.

    mind models
    mind models --models '{qwen-1.5b: Qwen/Qwen2.5-1.5B-Instruct}'

Causal LMs (teachers, students, judges) become ``data/models/<name>/``: a standard HF
directory (bf16 safetensors, tokenizer, chat template) that transformers and vLLM load.
Sentence encoders for the Teaching Assistant are saved as sentence-transformers
directories. ``data/models/models.json`` records each model's spec, source and checksums.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from pipeline.config import check, to_dict
from pipeline.models import resolve
from pipeline.shards import atomic_write_json
from stages.cli import field

log = logging.getLogger("mind.models")


@dataclass
class ModelsConfig:
    models: dict[str, str] = field(
        help="causal LMs, name -> spec (Hub id, local HF dir, .gguf file, embedded:qwen2.5-coder-0.5b-instruct, embedded:smollm2-135m-instruct)",
        factory=lambda: {"qwen2.5-coder-0.5b-instruct": "embedded:qwen2.5-coder-0.5b-instruct",
                         "smollm2-135m-instruct": "embedded:smollm2-135m-instruct"},
    )
    encoders: dict[str, str] = field(
        help="sentence encoders for the TA, name -> spec (Hub id, local dir, or embedded:all-minilm-l6-v2)",
        factory=lambda: {"all-minilm-l6-v2": "embedded:all-minilm-l6-v2"},
    )
    out_dir: Path = field(Path("data/models"), help="output root; each model goes to <out_dir>/<name>")
    dtype: Literal["bfloat16", "float16", "float32"] = field("bfloat16", help="weight dtype of saved causal LMs")

    def __post_init__(self) -> None:
        names = list(self.models) + list(self.encoders)
        check(bool(names), "models: name at least one model")
        check(len(names) == len(set(names)), f"models: a name is used twice in models and encoders: {names}")
        for name in names:
            check(bool(name) and "/" not in name and not name.startswith("."), f"models: bad model name {name!r}")


def run(cfg: ModelsConfig) -> dict[str, Any]:
    """Resolve every model and encoder spec into data/models/<name>/."""
    jobs = [(n, s, "causal_lm") for n, s in cfg.models.items()] + [(n, s, "encoder") for n, s in cfg.encoders.items()]
    records: dict[str, Any] = {}
    for name, spec, kind in tqdm(jobs, desc="models", unit="model"):
        records[name] = resolve(spec, cfg.out_dir / name, kind, cfg.dtype)  # type: ignore[arg-type]
        log.info("%s: %s from %s", name, kind, records[name]["source"])
    atomic_write_json(cfg.out_dir / "models.json", {"models": records, "config": to_dict(cfg)})
    log.info("wrote %d model(s) to %s", len(records), cfg.out_dir)
    return records
