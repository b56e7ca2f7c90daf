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
def test_stream_keeps_its_window_and_matches_one_batch(embedded_llm) -> None:
    """``stream`` (generate's rolling window): every prompt comes back exactly once, with the same
    text as one whole-batch call; never more than ``window`` requests sit in the engine; closing
    the stream early leaves the engine empty and working."""
    from vllm import SamplingParams

    from pipeline.engine import chat_prompts, complete, stream

    prompts = chat_prompts(embedded_llm.get_tokenizer(), [f"What is {i} + {2 * i}?" for i in range(7)])
    params = [SamplingParams(temperature=0.8, max_tokens=10 + 3 * i, seed=i) for i in range(7)]
    expected = [[c.text for c in cs] for cs in complete(embedded_llm, prompts, params)]
    engine = embedded_llm.llm_engine
    got: dict[int, list[str]] = {}
    for i, completions in stream(embedded_llm, prompts, params, window=3):
        assert engine.get_num_unfinished_requests() <= 3
        assert i not in got
        got[i] = [c.text for c in completions]
    assert [got[i] for i in range(7)] == expected
    assert not engine.has_unfinished_requests()

    early = stream(embedded_llm, prompts, params, window=4)
    next(early)
    early.close()  # a stage interrupted mid-stream
    assert not engine.has_unfinished_requests()
    assert [c[0].text for c in complete(embedded_llm, prompts[:1], params[:1])] == expected[0]


@pytest.mark.slow
@pytest.mark.vllm
def test_data_parallel_pool_matches_one_engine(embedded_llm, embedded_model_dir: Path) -> None:
    """``data_parallel_size: 2`` on CPU: two replica processes, one core each, split the batch and
    return the completions in prompt order, the same greedy text as a single engine."""
    from vllm import SamplingParams

    from pipeline.engine import (
        EngineConfig,
        EnginePool,
        chat_prompts,
        close_engine,
        complete,
        engine_generate,
        engine_stream,
        open_engine,
    )

    prompts = chat_prompts(embedded_llm.get_tokenizer(), [f"What is {i} + {i + 2}?" for i in range(5)])
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    pool = open_engine(embedded_model_dir, EngineConfig(max_model_len=512, kv_cache_gib=0.25, max_num_seqs=8,
                                                       data_parallel_size=2))
    try:
        assert isinstance(pool, EnginePool) and pool.size == 2
        got = [c[0].text for c in engine_generate(pool, prompts, greedy)]
        streamed = list(engine_stream(pool, prompts, [greedy] * len(prompts), window=2))
    finally:
        close_engine(pool)
    assert got == [c[0].text for c in complete(embedded_llm, prompts, greedy)]
    assert len(set(got)) > 1  # in prompt order, not one answer repeated
    # streaming: each prompt once, from whichever replica finished it, under its global index
    assert sorted(i for i, _ in streamed) == list(range(5))
    assert {i: cs[0].text for i, cs in streamed} == dict(enumerate(got))
