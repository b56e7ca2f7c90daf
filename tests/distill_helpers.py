"""Hand-made filtered shard folders and a tiny random student for the distill tests."""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.answers import canonical_rationale
from pipeline.shards import FILTERED_SCHEMA, write_shards

PERSPECTIVES = ["Analogy", "Decomposition", "Formal-Symbolic", "Intuitive", "Planning", "Socratic"]


def filtered_rows(n_questions: int = 6, ks: list[int] | None = None, seed: int = 0) -> list[dict]:
    """Arithmetic questions with K = 2..4 correct rationales each, canonical suffix included."""
    rng = random.Random(seed)
    rows = []
    for q in range(n_questions):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        gold = str(a + b)
        question = f"Sam has {a} apples. Then Sam buys {b} more apples. How many apples does Sam have now?"
        k = ks[q % len(ks)] if ks else 2 + q % 3
        styles = [
            f"Sam starts with {a} apples and buys {b} more, so {a} + {b} = {gold}. The answer is {gold}.",
            f"Step 1: Sam has {a}.\nStep 2: add {b} to get {gold}.\nThe answer is {gold}.",
            f"Let x = {a} + {b}. Then x = {gold}. Answer: {gold}",
            f"Think of {a} apples in a basket; adding {b} more makes {gold} apples in total. The answer is {gold}.",
        ]
        for i in range(k):
            text, offset, _, _ = canonical_rationale(styles[i % len(styles)], gold, "number")
            rows.append({
                "question_id": f"q{q:03d}", "teacher": "teacher", "perspective": PERSPECTIVES[i],
                "sample_index": 0, "prompt": "p", "text": text, "finish_reason": "stop", "num_tokens": len(text) // 4,
                "seed": 0, "pred_answer": gold, "correct": True, "question_pass_rate": 0.5, "question": question,
                "answer": gold, "answer_type": "number", "answer_offset": offset,
            })
    return rows


def make_filtered(out: Path, n_questions: int = 6, ks: list[int] | None = None, seed: int = 0) -> Path:
    write_shards(out, filtered_rows(n_questions, ks, seed), FILTERED_SCHEMA, {"stage": "test"}, shard_size=7)
    return out


def make_tiny_model(out: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama with the embedded student's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
