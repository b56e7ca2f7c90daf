"""evaluate: prompts and scoring on literal strings; the stage's core on the real embedded model,
with the base weights and through a LoRA adapter served by vLLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ConfigError, from_dict
from pipeline.engine import EngineConfig
from pipeline.metrics import PREDICTION_SCHEMA, read_model_metrics, wilson_interval
from pipeline.shards import QUESTION_SCHEMA, read_rows, read_table, write_shards
from stages.evaluate import (
    EvalDataset,
    EvaluateConfig,
    evaluate_model,
    load_questions,
    resolve_model,
    score,
    user_message,
    write_outputs,
)


def q(qid: str, question: str, answer: str, answer_type: str, choices: list[str] | None = None) -> dict[str, Any]:
    return {"id": qid, "task": "t", "question": question, "answer": answer, "answer_type": answer_type,
            "choices": choices or [], "source": "test"}


QUESTIONS = {
    "arith": [
        q("a1", "Anna has 3 apples. Then Anna buys 2 more apples. How many apples does Anna have now?", "5", "number"),
        q("a2", "Ben has 4 boxes with 2 pencils in each. How many pencils does Ben have?", "8", "number"),
    ],
    "mc": [
        q("c1", "Which of these is a fruit?", "B", "choice", ["car", "apple", "table"]),
        q("c2", "Where do fish live?", "A", "choice", ["water", "trees", "clouds"]),
    ],
    "yn": [
        q("y1", "Is the sky blue on a clear day?", "yes", "yesno"),
        q("y2", "Can a dog fly without help?", "no", "yesno"),
    ],
    "latex": [q("m1", "Simplify the fraction 2/4.", "\\frac{1}{2}", "math")],
}
GROUPS = {"arith": "id", "latex": "id", "mc": "ood", "yn": "ood"}


# ---------------------------------------------------------------- plain functions


def test_user_message_is_the_same_cot_prompt_for_every_model() -> None:
    row = QUESTIONS["mc"][0]
    msg = user_message(row)
    assert msg.startswith("Which of these is a fruit?\nAnswer choices:\n(A) car\n(B) apple\n(C) table")
    assert "Let's think step by step." in msg
    assert msg.endswith('"The answer is X." where X is the letter of the correct option.')
    assert user_message(QUESTIONS["arith"][0]).endswith("X is the final number.")


def test_score_per_answer_type() -> None:
    num = QUESTIONS["arith"][0]
    s = score("3 + 2 = 5. The answer is 5.", num)
    assert s == {"pred_answer": "5", "correct": True, "strict_correct": True, "flexible_correct": True}
    # Our extraction reads the answer sentence; lm-eval strict needs "The answer is N." and
    # flexible takes the last number-like run, here the trailing "2".
    s = score("The answer is 5. Check: 3 + 2", num)
    assert (s["pred_answer"], s["correct"], s["strict_correct"], s["flexible_correct"]) == ("5", True, True, False)
    s = score("So in total, answer: 5", num)
    assert (s["pred_answer"], s["correct"], s["strict_correct"], s["flexible_correct"]) == ("5", True, False, True)
    s = score("I think it is 6.", num)
    assert (s["pred_answer"], s["correct"], s["strict_correct"], s["flexible_correct"]) == ("6", False, False, False)
    s = score("no idea", num)
    assert s["pred_answer"] is None and s["correct"] is False
    assert score("An apple is a fruit. The answer is (B).", QUESTIONS["mc"][0]) == {
        "pred_answer": "B", "correct": True, "strict_correct": None, "flexible_correct": None}
    assert score("Dogs have no wings. The answer is no.", QUESTIONS["yn"][1])["correct"] is True
    assert score("So it is $\\boxed{\\frac{2}{4}}$.", QUESTIONS["latex"][0])["correct"] is True  # math-verify


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        EvaluateConfig(datasets=[EvalDataset("a"), EvalDataset("a")])
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(EvaluateConfig, {"datasets": [{"name": "a", "group": "middle"}]})
    with pytest.raises(ConfigError, match="max_model_len"):
        EvaluateConfig(max_tokens=600, engine=EngineConfig(max_model_len=512))
    with pytest.raises(ConfigError, match="unknown parameter"):
        from_dict(EvaluateConfig, {"datsets": []})


def test_load_questions_limit_and_missing_split(tmp_path: Path) -> None:
    write_shards(tmp_path / "arith", QUESTIONS["arith"], QUESTION_SCHEMA, {})
    cfg = EvaluateConfig(prepared_dir=tmp_path, datasets=[EvalDataset("arith", "id", limit=1)])
    assert [r["id"] for r in load_questions(cfg)["arith"]] == ["a1"]
    cfg = EvaluateConfig(prepared_dir=tmp_path, datasets=[EvalDataset("gsm8k", "id")])
    with pytest.raises(FileNotFoundError, match="gsm8k.*mind prepare"):
        load_questions(cfg)


def test_resolve_model_base_merged_and_adapter(tmp_path: Path) -> None:
    cfg = EvaluateConfig(model="base", base_model="models/base", students_dir=tmp_path)
    assert resolve_model(cfg) == ("models/base", None, cfg.engine)

    with pytest.raises(FileNotFoundError, match="mind distill"):
        resolve_model(EvaluateConfig(model="mind", students_dir=tmp_path))
    (tmp_path / "mind" / "merged").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no merged model"):
        resolve_model(EvaluateConfig(model="mind", students_dir=tmp_path))
    (tmp_path / "mind" / "merged" / "config.json").write_text("{}")
    assert resolve_model(EvaluateConfig(model="mind", students_dir=tmp_path))[:2] == (str(tmp_path / "mind/merged"), None)

    cfg = EvaluateConfig(model="mind", students_dir=tmp_path, student_source="adapter", base_model="models/base")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        resolve_model(cfg)
    (tmp_path / "mind" / "adapter").mkdir()
    (tmp_path / "mind" / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 24}))
    model_dir, adapter, engine = resolve_model(cfg)
    assert (model_dir, adapter) == ("models/base", tmp_path / "mind" / "adapter")
    assert engine.enable_lora and engine.max_lora_rank == 32  # rounded up to a rank vLLM accepts
    assert cfg.engine.enable_lora is False  # the params' engine config is not mutated


def hand_rows(model: str, dataset: str, flags: list[bool], answer_type: str) -> list[dict[str, Any]]:
    return [{"model": model, "dataset": dataset, "id": f"{dataset}-{i}", "output": "o", "pred_answer": "1",
             "gold": "1" if ok else "2", "correct": ok, "answer_type": answer_type,
             "strict_correct": ok if answer_type == "number" else None,
             "flexible_correct": ok if answer_type == "number" else None,
             "num_tokens": 5, "finish_reason": "stop"} for i, ok in enumerate(flags)]


def test_write_outputs_metrics_schema(tmp_path: Path) -> None:
    cfg = EvaluateConfig(model="mind", datasets=[EvalDataset("arith", "id"), EvalDataset("yn", "ood")],
                         out_dir=tmp_path / "eval", metrics_dir=tmp_path / "metrics")
    (tmp_path / "eval" / "mind" / "stale").mkdir(parents=True)  # a dataset no longer in params
    preds = {"arith": hand_rows("mind", "arith", [True, False, True, True], "number"),
             "yn": hand_rows("mind", "yn", [False, True], "yesno")}
    write_outputs(cfg, preds, {"model_dir": "x"}, {"generate_seconds": 1.0})
    m = read_model_metrics(tmp_path / "metrics" / "mind.json")
    assert not (tmp_path / "eval" / "mind" / "stale").exists()
    assert m["id"]["arith"]["accuracy"] == 0.75 and m["id"]["arith"]["n"] == 4
    assert (m["id"]["arith"]["ci_low"], m["id"]["arith"]["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    assert m["id"]["arith"]["strict_accuracy"] == 0.75
    assert "strict_accuracy" not in m["ood"]["yn"]
    assert m["avg"] == {"id": 0.75, "ood": 0.5, "all": 0.625}
    manifest = json.loads((tmp_path / "eval" / "mind" / "arith" / "manifest.json").read_text())
    assert manifest["config"]["model"] == "mind" and manifest["config"]["resolved"] == {"model_dir": "x"}
    assert json.loads((tmp_path / "eval" / "mind" / "config.json").read_text())["timing"] == {"generate_seconds": 1.0}


# ---------------------------------------------------------------- on the real embedded model


def check_metrics_file(path: Path, groups: dict[str, str], sizes: dict[str, int]) -> dict[str, Any]:
    """The metrics file a DVC `metrics` entry points at: numbers only, grouped id/ood, averages."""
    data = json.loads(path.read_text())
    assert set(data) == {"id", "ood", "avg"}

    def leaves(obj: Any) -> list[Any]:
        return [x for v in obj.values() for x in leaves(v)] if isinstance(obj, dict) else [obj]

    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves(data))
    for name, group in groups.items():
        d = data[group][name]
        assert d["n"] == sizes[name]
        assert 0 <= d["ci_low"] <= d["accuracy"] <= d["ci_high"] <= 1
        assert d["accuracy"] == pytest.approx(d["correct"] / d["n"])
        assert ("strict_accuracy" in d) == (name == "arith")
    assert set(data["avg"]) == set(groups.values()) | {"all"}
    return data


@pytest.mark.slow
@pytest.mark.vllm
def test_evaluate_on_the_embedded_model(tmp_path: Path, embedded_engine: Any, embedded_model_dir: Path) -> None:
    preds = evaluate_model(embedded_engine, "base", QUESTIONS, max_tokens=64,
                           max_model_len=1024)
    assert list(preds) == list(QUESTIONS)
    for dataset, rows in preds.items():
        assert [r["id"] for r in rows] == [x["id"] for x in QUESTIONS[dataset]]
        for r, question in zip(rows, QUESTIONS[dataset]):
            assert r["output"].strip() and 0 < r["num_tokens"] <= 64
            assert r["finish_reason"] in ("stop", "length")
            assert r["gold"] == question["answer"] and r["answer_type"] == question["answer_type"]
            assert {k: r[k] for k in ("pred_answer", "correct", "strict_correct", "flexible_correct")} == score(
                r["output"], question)
    long_q = {"arith": [q("long", "Add these up: " + " + ".join(["1"] * 400), "400", "number")]}
    with pytest.raises(ValueError, match=r"arith: question long has a \d+-token prompt.*max_model_len >= "):
        evaluate_model(embedded_engine, "base", long_q, 64, max_model_len=512)

    cfg = EvaluateConfig(model="base", datasets=[EvalDataset(n, g) for n, g in GROUPS.items()],  # type: ignore[arg-type]
                         out_dir=tmp_path / "eval", metrics_dir=tmp_path / "metrics")
    write_outputs(cfg, preds, {"model_dir": str(embedded_model_dir)})
    check_metrics_file(tmp_path / "metrics" / "base.json", GROUPS, {k: len(v) for k, v in QUESTIONS.items()})
    table = read_table(tmp_path / "eval" / "base" / "arith")
    assert table.schema.equals(PREDICTION_SCHEMA)
    import datasets  # the shards load with the datasets library, as the README says

    shard = tmp_path / "eval" / "base" / "arith" / "shard-00000.arrow"
    assert datasets.Dataset.from_file(str(shard)).num_rows == 2


@pytest.mark.slow
@pytest.mark.vllm
def test_evaluate_through_a_lora_adapter(tmp_path: Path, embedded_engine: Any, embedded_model_dir: Path) -> None:
    """A random (non-zero) LoRA adapter saved by peft, served with vLLM's LoRARequest: the
    outputs must differ from the base model's, so the adapter really is applied."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    lora_cfg = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
    student = tmp_path / "students" / "lora"
    get_peft_model(base, lora_cfg).save_pretrained(student / "adapter")

    cfg = EvaluateConfig(model="lora", base_model=str(embedded_model_dir), students_dir=tmp_path / "students",
                         student_source="adapter", datasets=[EvalDataset("arith", "id")],
                         out_dir=tmp_path / "eval", metrics_dir=tmp_path / "metrics")
    model_dir, adapter, engine_cfg = resolve_model(cfg)
    assert adapter is not None and engine_cfg.enable_lora and engine_cfg.max_lora_rank == 16
    assert model_dir == embedded_engine.model  # the adapter is served on the base model's engine
    qs = {"arith": QUESTIONS["arith"]}
    with_lora = evaluate_model(embedded_engine, "lora", qs, 48, LoRARequest("lora", 1, str(adapter)))
    plain = evaluate_model(embedded_engine, "base", qs, 48)
    assert [r["output"] for r in with_lora["arith"]] != [r["output"] for r in plain["arith"]]
    assert all(r["model"] == "lora" for r in with_lora["arith"])
    write_outputs(cfg, with_lora, {"model_dir": model_dir, "adapter": str(adapter)})
    check_metrics_file(tmp_path / "metrics" / "lora.json", {"arith": "id"}, {"arith": 2})
    assert len(read_rows(tmp_path / "eval" / "lora" / "arith")) == 2
