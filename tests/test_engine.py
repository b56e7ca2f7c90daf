"""The shared vLLM engine helper (pipeline/engine.py) with several engines in one process."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.vllm
def test_unloading_one_engine_leaves_the_others_working(embedded_llm, embedded_model_dir: Path) -> None:
    """vLLM keeps its distributed groups in per-process globals and an engine's shutdown tears them
    down. On CPU every engine runs in this process, so unloading a second engine (or dropping it
    to the garbage collector) must leave the session's engine working: before the fix the next
    generate failed with "pipeline model parallel group is not initialized"."""
    import gc

    from vllm import SamplingParams

    from pipeline.engine import EngineConfig, chat_prompts, complete, load_llm, unload_llm

    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    prompts = chat_prompts(embedded_llm.get_tokenizer(), ["What is 2 + 3?", "Name a colour."])
    before = [c[0].text for c in complete(embedded_llm, prompts, greedy)]
    assert all(before)

    cfg = EngineConfig(max_model_len=512, kv_cache_gib=0.25, max_num_seqs=8)
    second = load_llm(embedded_model_dir, cfg)
    assert [c[0].text for c in complete(second, prompts, greedy)] == before
    unload_llm(second)
    assert [c[0].text for c in complete(embedded_llm, prompts, greedy)] == before

    third = load_llm(embedded_model_dir, cfg)
    assert [c[0].text for c in complete(third, prompts, greedy)] == before
    del third
    gc.collect()
    assert [c[0].text for c in complete(embedded_llm, prompts, greedy)] == before


@pytest.mark.slow
@pytest.mark.vllm
def test_data_parallel_pool_matches_one_engine(embedded_llm, embedded_model_dir: Path) -> None:
    """``data_parallel_size: 2`` on CPU: two replica processes, one core each, split the batch and
    return the completions in prompt order, the same greedy text as a single engine."""
    from vllm import SamplingParams

    from pipeline.engine import EngineConfig, EnginePool, chat_prompts, close_engine, complete, engine_generate, open_engine

    prompts = chat_prompts(embedded_llm.get_tokenizer(), [f"What is {i} + {i + 2}?" for i in range(5)])
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    pool = open_engine(embedded_model_dir, EngineConfig(max_model_len=512, kv_cache_gib=0.25, max_num_seqs=8,
                                                       data_parallel_size=2))
    try:
        assert isinstance(pool, EnginePool) and pool.size == 2
        got = [c[0].text for c in engine_generate(pool, prompts, greedy)]
    finally:
        close_engine(pool)
    assert got == [c[0].text for c in complete(embedded_llm, prompts, greedy)]
    assert len(set(got)) > 1  # in prompt order, not one answer repeated
