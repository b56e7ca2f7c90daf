"""The filter stage: row filters, per-question selection, outputs and stats (stages/filter.py)."""

from __future__ import annotations

import contextlib
import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline.answers import answer_suffix, extract_number
from pipeline.config import ConfigError, from_dict
from pipeline.engine import EngineConfig
from pipeline.questions import format_question
from pipeline.shards import FILTERED_SCHEMA, QUESTION_SCHEMA, RATIONALE_SCHEMA, read_rows, write_shards
from stages import filter as F

# ---------------------------------------------------------------- a hand-made rationale set

QUESTIONS = {  # id -> (question, gold)
    "q1": ("Anna has 5 apples. Then Anna buys 3 more apples. How many apples does Anna have now?", "8"),
    "q2": ("Ben has 6 cards. Then Ben gives away 2 cards. How many cards does Ben have now?", "4"),
    "q3": ("Carla has 7 coins. Then Carla finds 3 more coins. How many coins does Carla have now?", "10"),
    "q4": ("David has 4 shells. Then David gets 3 more shells. How many shells does David have now?", "7"),
    "q5": ("Emma has 1 pen. Then Emma buys 2 more pens. How many pens does Emma have now?", "3"),
    "q6": ("Emma has 3 bags with 4 pens in each. How many pens does Emma have?", "12"),
    "q7": ("Felix has 9 shells. Then Felix loses 4 shells. How many shells does Felix have now?", "5"),
    "q8": ("Grace has 2 stamps. Then Grace finds 2 more stamps. How many stamps does Grace have now?", "4"),
}

LONG = "Carla has 7 coins. " * 14 + "She finds 3 more, 7 + 3 = 10. The answer is 10."
LOOP = "I add 3 and 4. " * 6 + "The answer is 7."  # under max_tokens=60 in the real tokenizer, all repetition

# (id, question, teacher, perspective, sample_index, text, finish_reason, num_tokens); the
# comment says what the filter must do with the row.
RATIONALES = [
    ("r1", "q1", "t1", "Alpha", 0, "Anna has 5 apples and buys 3 more. 5 + 3 = 8. The answer is 8.", "stop", 20),  # picked
    ("r2", "q1", "t1", "Alpha", 1, "Anna starts with 5 apples. She buys 3 more apples, giving 5 + 3 = 8 apples in total. So the answer is 8.", "stop", 30),  # extra_per_perspective (longer)
    ("r3", "q1", "t1", "Beta", 0, "Start at 5 and count up 3: 6, 7, 8. The answer is 8.", "stop", 22),  # picked
    ("r4", "q1", "t1", "Gamma", 0, "5 + 3 = 9. The answer is 9.", "stop", 12),  # wrong_answer
    ("r5", "q1", "t1", "Delta", 0, "Anna has 5 apples and she", "length", 60),  # truncated
    ("r6", "q2", "t1", "Alpha", 0, "Ben has 6 cards and gives away 2. 6 - 2 = 4. The answer is 4.", "stop", 20),  # picked
    ("r7", "q2", "t1", "Beta", 0, "Take 2 from 6 to get 4 cards left. The answer is 4.", "stop", 18),  # picked
    ("r8", "q2", "t1", "Gamma", 0, "Ben has 6 cards and gives away 2. 6 - 2 = 4. The answer is 4.", "stop", 20),  # exact_duplicate of r6
    ("r9", "q2", "t1", "Delta", 0, "take 2 from 6, to get 4 cards left.  The answer is 4", "stop", 18),  # near_duplicate of r7
    ("r10", "q3", "t1", "Alpha", 0, "10.", "stop", 3),  # too_short
    ("r11", "q3", "t1", "Beta", 0, "Carla has 7 coins and finds 3 more, so 7 + 3 = 10. The answer is 10.", "stop", 22),  # picked
    ("r12", "q3", "t1", "Gamma", 0, "Counting on from 7 by 3 gives 10 coins. The answer is 10.", "stop", 25),  # picked
    ("r13", "q3", "t1", "Delta", 0, LONG, "stop", 100),  # too_long
    ("r14", "q4", "t1", "Alpha", 0, LOOP, "stop", 50),  # repetition (answer right)
    ("r15", "q4", "t1", "Beta", 0, "I am not sure about this one.", "stop", 10),  # no_answer
    ("r16", "q4", "t1", "Gamma", 0, "David has 4 and gets 3, so 4 + 3 = 7. The answer is 7.", "stop", 20),  # q4 has K=1
    ("r17", "q4", "t1", "Delta", 0, "4 + 3 = 12. The answer is 12.", "stop", 12),  # wrong_answer
    ("r18", "q5", "t1", "Alpha", 0, "The answer is 5.", "stop", 10),  # wrong_answer
    ("r19", "q5", "t1", "Beta", 0, "The answer is 2.", "stop", 10),  # wrong_answer
    ("r20", "q6", "t2", "Alpha", 0, "Emma has 3 bags with 4 pens each, 3 x 4 = 12. The answer is 12.", "stop", 20),
    ("r21", "q6", "t2", "Beta", 0, "Four pens in each of 3 bags: 4 + 4 + 4 = 12. The answer is 12.", "stop", 22),
    ("r22", "q6", "t2", "Gamma", 0, "The answer is 7.", "stop", 10),  # wrong_answer
    ("r23", "q7", "t1", "Alpha", 0, "Felix has 9 shells and loses 4, 9 - 4 = 5. The answer is 5.", "stop", 20),
    ("r24", "q7", "t1", "Beta", 0, "Nine minus four leaves 5 shells. The answer is 5.", "stop", 15),
    ("r25", "q7", "t1", "Gamma", 0, "The answer is 13.", "stop", 10),  # wrong_answer
    ("r26", "q7", "t1", "Delta", 0, "The answer is 4.", "stop", 10),  # wrong_answer
]
PICKED = {"q1": ["r1", "r3"], "q2": ["r6", "r7"], "q3": ["r11", "r12"], "q6": ["r20", "r21"], "q7": ["r23", "r24"]}
EASY, HARD = {"q2", "q3"}, {"q1", "q6", "q7"}
PASS_RATE = {"q1": 3 / 5, "q2": 1.0, "q3": 1.0, "q4": 2 / 4, "q5": 0.0, "q6": 2 / 3, "q7": 2 / 4}


def question_rows() -> list[dict[str, Any]]:
    return [
        {"id": qid, "task": "embedded", "question": q, "answer": gold, "answer_type": "number",
         "choices": [], "source": "embedded"}
        for qid, (q, gold) in QUESTIONS.items()
    ]


def rationale_rows() -> list[dict[str, Any]]:
    return [
        {"question_id": q, "teacher": t, "perspective": p, "sample_index": s, "prompt": f"prompt {rid}",
         "text": text, "finish_reason": fin, "num_tokens": n, "seed": 1000 + i}
        for i, (rid, q, t, p, s, text, fin, n) in enumerate(RATIONALES)
    ]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    qdir, rdir = tmp_path / "prepared" / "train", tmp_path / "rationales"
    write_shards(qdir, question_rows(), QUESTION_SCHEMA, {"test": True})
    # Two shards, to read a multi-shard folder.
    write_shards(rdir, rationale_rows(), RATIONALE_SCHEMA, {"test": True}, shard_size=15)
    return qdir, rdir


# The filter counts tokens in the student's tokenizer: the real SmolLM2 one, converted once per
# machine by conftest's embedded_model_dir (the autouse fixture below makes sure it exists).
STUDENT_DIR = Path(__file__).resolve().parents[1] / ".cache" / "test-models" / "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def student_tokenizer(embedded_model_dir: Path) -> Path:
    assert embedded_model_dir == STUDENT_DIR
    return embedded_model_dir


def make_cfg(tmp_path: Path, qdir: Path, rdir: Path, **overrides: Any) -> F.FilterConfig:
    data = {
        "tokenizer": str(STUDENT_DIR),
        "rationales_dir": str(rdir), "questions_dir": str(qdir), "out_dir": str(tmp_path / "filtered"),
        "metrics_file": str(tmp_path / "metrics" / "filter.json"), "plots_dir": str(tmp_path / "metrics"),
        "min_tokens": 5, "max_tokens": 60, "max_repeat_share": 0.5, "min_perspectives": 2,
        "easy_threshold": 0.75, "easy_keep_fraction": 0.5, "max_questions": 3, "min_questions": 1, "seed": 0,
        **overrides,
    }
    return from_dict(F.FilterConfig, data, "filter")


def text_of(rid: str) -> str:
    return next(r[5] for r in RATIONALES if r[0] == rid)


# ---------------------------------------------------------------- the whole stage


def test_filtered_rows_are_rationale_rows_plus_the_judgement_and_training_text() -> None:
    assert FILTERED_SCHEMA.names == RATIONALE_SCHEMA.names + [
        "pred_answer", "correct", "question_pass_rate", "question", "answer", "answer_type", "answer_offset",
        "train_tokens", "rewrite"]


def test_stage_on_hand_made_set(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    cfg = make_cfg(tmp_path, *inputs)
    stats = F.run(cfg)
    assert json.loads((cfg.out_dir / "stats.json").read_text()) == json.loads(json.dumps(stats, default=str))

    out = read_rows(cfg.out_dir)
    kept_q = sorted({r["question_id"] for r in out})
    # Exactly one of the two easy questions survives the 0.5 down-sampling; the cap of 3 then
    # removes one of the four candidates.
    assert len(kept_q) == 3
    assert len(set(kept_q) & EASY) <= 1
    assert set(kept_q) <= EASY | HARD

    assert stats["rows"] == {
        "in": 26,
        "kept": 6,
        "dropped": {
            "truncated": 1, "no_answer": 1, "wrong_answer": 7, "too_short": 1, "too_long": 1,
            "repetition": 1, "exact_duplicate": 1, "near_duplicate": 1, "extra_per_perspective": 1,
            "few_perspectives": 1, "easy_downsampled": 2, "over_cap": 2,
        },
    }
    assert stats["questions"] == {
        "prepared": 8, "with_rationales": 7, "no_correct": 1, "kept": 3,
        "dropped": {"few_perspectives": 2, "easy_downsampled": 1, "over_cap": 1},
        "easy": 2, "hard": 3,
        "easy_kept": len(set(kept_q) & EASY), "hard_kept": len(set(kept_q) & HARD),
    }
    assert stats["judge"] == {"mode": "rules", "rules_undecided": 1}

    per_p_kept = Counter(text_perspective for q in kept_q for text_perspective in
                         [next(r[3] for r in RATIONALES if r[0] == rid) for rid in PICKED[q]])
    assert stats["accuracy"]["overall"] == {"n": 26, "correct": 17, "accuracy": 17 / 26}
    assert stats["accuracy"]["per_perspective"] == {
        "Alpha": {"n": 8, "correct": 7, "accuracy": 7 / 8, "kept": per_p_kept["Alpha"]},
        "Beta": {"n": 7, "correct": 5, "accuracy": 5 / 7, "kept": per_p_kept["Beta"]},
        "Delta": {"n": 5, "correct": 2, "accuracy": 2 / 5, "kept": per_p_kept["Delta"]},
        "Gamma": {"n": 6, "correct": 3, "accuracy": 3 / 6, "kept": per_p_kept["Gamma"]},
    }
    t2_kept = 2 if "q6" in kept_q else 0
    assert stats["accuracy"]["per_teacher"] == {
        "t1": {"n": 23, "correct": 15, "accuracy": 15 / 23, "kept": 6 - t2_kept},
        "t2": {"n": 3, "correct": 2, "accuracy": 2 / 3, "kept": t2_kept},
    }
    hist = {b["bin"]: (b["questions"], b["kept"]) for b in stats["pass_rate_histogram"]}
    assert list(hist) == [f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)]
    expected_hist = {b: (0, 0) for b in hist}
    expected_hist["0.0-0.1"] = (1, 0)  # q5
    expected_hist["0.5-0.6"] = (2, int("q7" in kept_q))  # q4, q7
    expected_hist["0.6-0.7"] = (2, int("q1" in kept_q) + int("q6" in kept_q))  # q1 0.6, q6 0.67
    expected_hist["0.9-1.0"] = (2, len(set(kept_q) & EASY))  # q2, q3 at 1.0
    assert hist == expected_hist
    assert stats["questions_by_k"] == {"before_selection": {"0": 1, "1": 1, "2": 5}, "kept": {"2": 3}}
    assert stats["config"]["min_perspectives"] == 2

    # The kept rows: the picked rationale of each perspective, canonical answer suffix last.
    assert sorted(r["prompt"].split()[-1] for r in out) == sorted(rid for q in kept_q for rid in PICKED[q])
    assert set(out[0]) == set(FILTERED_SCHEMA.names)
    qrows = {q["id"]: q for q in question_rows()}
    for r in out:
        q = qrows[r["question_id"]]
        suffix = answer_suffix(q["answer"], "number")
        assert r["text"].endswith(suffix) and r["text"][r["answer_offset"]:] == suffix
        assert r["correct"] is True and r["pred_answer"] == q["answer"]
        assert r["question"] == format_question(q) and r["answer"] == q["answer"] and r["answer_type"] == "number"
        assert r["question_pass_rate"] == pytest.approx(PASS_RATE[r["question_id"]])
        assert extract_number(r["text"]) == q["answer"]
    # Rows come in prepared-question order, then perspective.
    assert [(r["question_id"], r["perspective"]) for r in out] == sorted((r["question_id"], r["perspective"]) for r in out)
    if "q1" in kept_q:  # "So the answer is 8." became the canonical sentence; r1 was already canonical
        r1 = next(r for r in out if r["prompt"] == "prompt r1")
        assert r1["text"] == text_of("r1") and r1["answer_offset"] == len("Anna has 5 apples and buys 3 more. 5 + 3 = 8. ")

    metrics = json.loads(cfg.metrics_file.read_text())
    assert metrics == {
        "rows_in": 26, "rows_kept": 6, "questions_with_rationales": 7, "questions_kept": 3,
        "sample_accuracy": 17 / 26, "mean_k": 2.0,
        "mean_pass_rate_kept": pytest.approx(sum(PASS_RATE[q] for q in kept_q) / 3),
    }
    with open(cfg.plots_dir / "filter_perspectives.csv") as f:
        per_p = {row["perspective"]: row for row in csv.DictReader(f)}
    assert sorted(per_p) == ["Alpha", "Beta", "Delta", "Gamma"]
    assert float(per_p["Alpha"]["accuracy"]) == pytest.approx(7 / 8) and int(per_p["Delta"]["n"]) == 5
    with open(cfg.plots_dir / "filter_pass_rate.csv") as f:
        bins = list(csv.DictReader(f))
    assert [(b["pass_rate"], int(b["questions"])) for b in bins] == [(b, q) for b, (q, _) in expected_hist.items()]


def test_stage_is_deterministic_under_its_seed(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    runs = []
    for i, seed in enumerate([7, 7, 8, 9, 10, 11]):
        cfg = make_cfg(tmp_path / str(i), *inputs, seed=seed)
        F.run(cfg)
        runs.append([(r["question_id"], r["perspective"], r["text"]) for r in read_rows(cfg.out_dir)])
    assert runs[0] == runs[1]
    assert any(run != runs[0] for run in runs[2:])  # the seed does choose


def test_too_few_questions_stops_with_the_counts(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    cfg = make_cfg(tmp_path, *inputs, min_questions=3)
    F.run(cfg)
    assert (cfg.out_dir / "manifest.json").exists()
    cfg = make_cfg(tmp_path, *inputs, min_perspectives=3, max_questions=10, min_questions=4)
    with pytest.raises(ValueError) as err:
        F.run(cfg)
    msg = str(err.value)
    assert "kept 0 questions, fewer than min_questions=4" in msg
    assert "7 questions with rationales, 7 had fewer than min_perspectives=3" in msg
    assert "Most were removed by min_perspectives=3" in msg
    assert not (cfg.out_dir / "manifest.json").exists()  # the earlier output no longer looks complete
    assert json.loads((cfg.out_dir / "stats.json").read_text())["error"] == msg


def test_bad_inputs_name_the_problem(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    qdir, _ = inputs
    rows = rationale_rows()
    rows[3]["question_id"] = "nope"
    bad = tmp_path / "bad"
    write_shards(bad, rows, RATIONALE_SCHEMA, {})
    with pytest.raises(ValueError, match=r"row 3: field question_id 'nope' is not a question"):
        F.run(make_cfg(tmp_path, qdir, bad))
    rows = rationale_rows()
    rows[5]["text"] = None
    write_shards(bad, rows, RATIONALE_SCHEMA, {})
    with pytest.raises(ValueError, match=r"row 5 \(question 'q2'\): field text is null"):
        F.run(make_cfg(tmp_path, qdir, bad))
    with pytest.raises(ConfigError, match="min_tokens <= max_tokens"):
        make_cfg(tmp_path, qdir, bad, min_tokens=10, max_tokens=5)


def test_choice_and_yesno_questions(tmp_path: Path) -> None:
    qrows = [
        {"id": "c1", "task": "csqa", "question": "Where are books kept?", "answer": "C", "answer_type": "choice",
         "choices": ["bank", "park", "library"], "source": "csqa"},
        {"id": "y1", "task": "strategyqa", "question": "Can penguins fly?", "answer": "no", "answer_type": "yesno",
         "choices": [], "source": "strategyqa"},
    ]
    texts = {
        ("c1", "A"): "Books are lent by a library. The answer is library.",
        ("c1", "B"): "A library keeps books. So the answer is (C).",
        ("y1", "A"): "No, penguins cannot fly; their wings are flippers.",
        ("y1", "B"): "Penguins swim but do not fly. The answer is no.",
    }
    rrows = [{"question_id": q, "teacher": "t", "perspective": p, "sample_index": 0, "prompt": "", "text": t,
              "finish_reason": "stop", "num_tokens": 12, "seed": 0} for (q, p), t in texts.items()]
    write_shards(tmp_path / "q", qrows, QUESTION_SCHEMA, {})
    write_shards(tmp_path / "r", rrows, RATIONALE_SCHEMA, {})
    cfg = make_cfg(tmp_path, tmp_path / "q", tmp_path / "r", easy_keep_fraction=1.0, max_questions=10)
    F.run(cfg)
    out = {(r["question_id"], r["perspective"]): r for r in read_rows(cfg.out_dir)}
    assert out[("c1", "A")]["text"] == "Books are lent by a library. The answer is (C)."
    assert out[("c1", "B")]["text"] == "A library keeps books. The answer is (C)."
    assert out[("c1", "A")]["question"] == "Where are books kept?\nAnswer choices:\n(A) bank\n(B) park\n(C) library"
    assert out[("y1", "A")]["text"].endswith("flippers. The answer is no.")
    assert out[("y1", "A")]["answer_offset"] == len("No, penguins cannot fly; their wings are flippers. ")


# ---------------------------------------------------------------- selection


def _questions(n_easy: int, n_hard: int, k: int = 3) -> tuple[dict[str, int], dict[str, float]]:
    ks = {f"e{i:02d}": k for i in range(n_easy)} | {f"h{i:02d}": k for i in range(n_hard)}
    rates = {q: (0.9 if q.startswith("e") else 0.3) for q in ks}
    return ks, rates


def test_select_min_perspectives() -> None:
    ks = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 8}
    rates = dict.fromkeys(ks, 0.2)
    kept, dropped = F.select_questions(ks, rates, min_perspectives=2, easy_threshold=0.8,
                                       easy_keep_fraction=1.0, max_questions=100, seed=0)
    assert kept == ["c", "d", "e"]
    assert dropped == {"a": "few_perspectives", "b": "few_perspectives"}


def test_select_easy_hard_split() -> None:
    ks, rates = _questions(n_easy=10, n_hard=5)
    rates["h00"] = 0.7999  # just below the threshold: hard
    rates["e00"] = 0.8  # at the threshold: easy
    kept, dropped = F.select_questions(ks, rates, min_perspectives=2, easy_threshold=0.8,
                                       easy_keep_fraction=0.4, max_questions=100, seed=0)
    assert {q for q in kept if q.startswith("h")} == {f"h{i:02d}" for i in range(5)}  # every hard one
    assert len([q for q in kept if q.startswith("e")]) == 4  # round(0.4 x 10)
    assert Counter(dropped.values()) == {"easy_downsampled": 6}
    assert all(q.startswith("e") for q in dropped)
    none, _ = F.select_questions(ks, rates, min_perspectives=2, easy_threshold=0.8,
                                 easy_keep_fraction=0.0, max_questions=100, seed=0)
    assert sorted(none) == [f"h{i:02d}" for i in range(5)]
    # half up: one easy question at fraction 0.5 keeps it (round() would give 0, and 2.5 -> 2)
    one, _ = F.select_questions({"e": 2}, {"e": 1.0}, min_perspectives=2, easy_threshold=0.8,
                                easy_keep_fraction=0.5, max_questions=100, seed=0)
    assert one == ["e"]
    ks5, rates5 = _questions(n_easy=5, n_hard=0)
    five, _ = F.select_questions(ks5, rates5, min_perspectives=2, easy_threshold=0.8, easy_keep_fraction=0.5,
                                 max_questions=100, seed=0)
    assert len(five) == 3


def test_select_cap_and_determinism() -> None:
    ks, rates = _questions(n_easy=0, n_hard=30)
    kept, dropped = F.select_questions(ks, rates, min_perspectives=1, easy_threshold=0.8,
                                       easy_keep_fraction=1.0, max_questions=10, seed=3)
    assert len(kept) == 10 and kept == sorted(kept)
    assert Counter(dropped.values()) == {"over_cap": 20} and not set(kept) & set(dropped)
    again, _ = F.select_questions(dict(reversed(list(ks.items()))), rates, min_perspectives=1, easy_threshold=0.8,
                                  easy_keep_fraction=1.0, max_questions=10, seed=3)
    assert again == kept  # same seed, same choice, whatever the input order
    others = {tuple(F.select_questions(ks, rates, min_perspectives=1, easy_threshold=0.8, easy_keep_fraction=1.0,
                                       max_questions=10, seed=s)[0]) for s in range(5)}
    assert len(others) > 1


def _row(q: str, p: str, teacher: str, s: int, n: int, drop: str | None = None) -> dict[str, Any]:
    return {"question_id": q, "perspective": p, "teacher": teacher, "sample_index": s, "train_tokens": n, "drop": drop}


def test_one_rationale_per_perspective() -> None:
    rows = [
        _row("q", "A", "t", 0, 40), _row("q", "A", "t", 1, 20), _row("q", "A", "t", 2, 20),
        _row("q", "A", "t", 3, 5, drop="too_short"),  # already dropped: not a candidate
        _row("q", "B", "t", 0, 50), _row("q", "B", "s", 4, 50),
        _row("r", "A", "t", 0, 10),
    ]
    picked = F.pick_per_perspective(rows, "shortest")
    got = {q: sorted((r["perspective"], r["teacher"], r["sample_index"]) for r in rs) for q, rs in picked.items()}
    # Shortest wins; a tie goes to the lower (teacher, sample_index).
    assert got == {"q": [("A", "t", 1), ("B", "s", 4)], "r": [("A", "t", 0)]}
    assert [r["drop"] for r in rows] == ["extra_per_perspective", None, "extra_per_perspective", "too_short",
                                         "extra_per_perspective", None, None]
    for r in rows:
        r["drop"] = None if r["drop"] == "extra_per_perspective" else r["drop"]
    longest = F.pick_per_perspective(rows, "longest")
    assert sorted((r["perspective"], r["sample_index"]) for r in longest["q"]) == [("A", 0), ("B", 4)]
    for r in rows:
        r["drop"] = None if r["drop"] == "extra_per_perspective" else r["drop"]
    first = F.pick_per_perspective(rows, "first")
    assert sorted((r["perspective"], r["teacher"], r["sample_index"]) for r in first["q"]) == [("A", "t", 0), ("B", "t", 0)]


# ---------------------------------------------------------------- real models


@pytest.mark.slow
def test_near_duplicates_with_the_real_encoder(tmp_path: Path, inputs: tuple[Path, Path], encoder_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    enc = SentenceTransformer(str(encoder_dir), device="cpu")
    texts = [
        "Anna has 5 apples and buys 3 more, so she has 5 + 3 = 8 apples. The answer is 8.",
        "Anna has five apples and buys three more, so she has 5 + 3 = 8 apples. The answer is 8.",
        "Imagine a shelf: 5 books on it, add 3, count them all: 8. The answer is 8.",
    ]
    emb = enc.encode(texts, normalize_embeddings=True)
    assert F.near_duplicate_flags(emb, 0.9) == [False, True, False]
    assert F.near_duplicate_flags(emb, 0.999) == [False, False, False]

    # The whole stage with the encoder on: q1's Beta rationale now paraphrases its Alpha one,
    # and its two Alpha samples are close paraphrases too (cosine 0.96).
    qdir, _ = inputs
    rows = rationale_rows()
    rows[2]["text"] = "Anna has 5 apples and buys 3 more: 5 + 3 = 8. The answer is 8."  # r3 vs r1
    rdir = tmp_path / "r2"
    write_shards(rdir, rows, RATIONALE_SCHEMA, {})
    cfg = make_cfg(tmp_path, qdir, rdir, near_dup_threshold=0.95, encoder_dir=str(encoder_dir), max_questions=10)
    stats = F.run(cfg)
    dropped = stats["rows"]["dropped"]
    assert dropped["near_duplicate"] == 3  # r9 by normalised text; r2 and r3 (vs r1) by the encoder
    assert dropped["extra_per_perspective"] == 0  # r2 is gone before the pick
    assert stats["questions"]["dropped"]["few_perspectives"] == 3  # q1 falls to K=1 with q4, q5
    assert "q1" not in {r["question_id"] for r in read_rows(cfg.out_dir)}


@pytest.mark.slow
@pytest.mark.vllm
def test_llm_judge_on_the_embedded_model(
    tmp_path: Path, inputs: tuple[Path, Path], embedded_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = "Let me count the apples one by one again. " * 400 + "So the answer is 8."  # > max_model_len
    assert len(embedded_engine.tokenizer.encode(long)) > embedded_engine.cfg.max_model_len
    verdicts = F.llm_judge(embedded_engine, [
        ("What is 2 + 2?", "4", "2 + 2 makes four."),
        ("What is 5 + 3?", "8", "I do not know."),
        ("What is 5 + 3?", "8", long),  # shown by its end, so the prompt fits
    ])
    # The verdicts are the judge's own greedy replies to exactly these prompts, read with extract_yesno;
    # the too-long response was cut from its start, so its prompt fits and still shows its answer.
    from vllm import SamplingParams

    from pipeline.answers import extract_yesno
    from pipeline.engine import chat_prompts

    tok = embedded_engine.tokenizer
    budget = embedded_engine.cfg.max_model_len - 4
    messages = [F._fit_response(tok, q, g, r, budget) for q, g, r in [
        ("What is 2 + 2?", "4", "2 + 2 makes four."), ("What is 5 + 3?", "8", "I do not know."), ("What is 5 + 3?", "8", long)]]
    assert "So the answer is 8." in messages[2] and messages[2].count("count the apples") < 400
    prompts = chat_prompts(tok, messages)
    assert all(len(tok.encode(p, add_special_tokens=False)) <= budget for p in prompts)
    raw = embedded_engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
    assert verdicts == [extract_yesno(o[0].text) for o in raw]

    cfg = make_cfg(tmp_path, *inputs, judge="llm", max_questions=10)
    # The stage's judge is the session's engine (loading a second one costs minutes on CPU), opened
    # with the judge's own model and engine settings and left open for the other tests.
    opened: list[tuple[Path, EngineConfig]] = []

    def session_engine(model: Path, engine_cfg: EngineConfig) -> contextlib.nullcontext[Any]:
        opened.append((model, engine_cfg))
        return contextlib.nullcontext(embedded_engine)

    monkeypatch.setattr(F, "Engine", session_engine)
    stats = F.run(cfg)
    assert opened == [(cfg.judge_model, cfg.judge_engine)]
    judge = stats["judge"]
    # Only r15 has no extractable answer (r5 is truncated and not sent).
    assert judge["mode"] == "llm" and judge["rules_undecided"] == 1 and judge["llm_judged"] == 1
    assert judge.get("llm_yes", 0) + judge.get("llm_no", 0) + judge.get("llm_unclear", 0) == 1
    said_yes = judge.get("llm_yes", 0)
    assert stats["rows"]["dropped"]["no_answer"] == 1 - said_yes
    assert stats["accuracy"]["overall"]["correct"] == 17 + said_yes


def test_real_teacher_text_is_trained_with_its_reasoning_never_as_a_bare_answer(tmp_path: Path) -> None:
    """Real Qwen2.5 rationales (tests/fixtures) plus bare answers: every kept row keeps reasoning
    before the canonical suffix, the bare ones are dropped as too_short, the rewrites are counted."""
    from transformers import AutoTokenizer

    fixture = json.loads((Path(__file__).parent / "fixtures" / "qwen_rationales.json").read_text())["rationales"]
    qids = {}
    for r in fixture:
        qids.setdefault((r["question"], r["gold"]), f"fq{len(qids)}")
    questions = [{"id": qid, "task": "embedded", "question": q, "answer": gold, "answer_type": "number",
                  "choices": [], "source": "embedded"} for (q, gold), qid in qids.items()]
    rationales = [(qids[(r["question"], r["gold"])], r["perspective"], r["text"]) for r in fixture]
    bare = [(qid, "Bare", f"The answer is {gold}.") for (_, gold), qid in qids.items()]
    bare += [(qid, "BareChatter", f"The answer is {gold}. I hope this helps!") for (_, gold), qid in qids.items()]
    rows = [{"question_id": qid, "teacher": "qwen", "perspective": p, "sample_index": 0, "prompt": "p", "text": text,
             "finish_reason": "stop", "num_tokens": len(text) // 4, "seed": i}
            for i, (qid, p, text) in enumerate(rationales + bare)]
    write_shards(tmp_path / "q", questions, QUESTION_SCHEMA, {"test": True})
    write_shards(tmp_path / "r", rows, RATIONALE_SCHEMA, {"test": True})
    cfg = make_cfg(tmp_path, tmp_path / "q", tmp_path / "r", min_tokens=12, max_tokens=512, min_perspectives=1,
                   easy_keep_fraction=1.0, max_questions=100)
    stats = F.run(cfg)
    out = read_rows(cfg.out_dir)
    tok = AutoTokenizer.from_pretrained(STUDENT_DIR)
    assert out and not [r for r in out if r["perspective"].startswith("Bare")]
    for r in out:
        body = r["text"][: r["answer_offset"]]
        assert len(tok(body, add_special_tokens=False)["input_ids"]) >= 12, body
        assert r["text"][r["answer_offset"]:] == f"The answer is {r['answer']}."
        assert r["train_tokens"] == len(tok(r["text"], add_special_tokens=False)["input_ids"])
    assert stats["rows"]["dropped"]["too_short"] >= len(bare)
    kept = stats["rewrites"]["kept"]
    assert kept["answer_first"] >= 1 and kept["answer_in_middle"] >= 1 and kept["answer_last"] >= 1
    assert sum(kept[k] for k in ("answer_first", "answer_in_middle", "answer_last", "no_answer_sentence")) == len(out)
    assert stats["rewrites"]["correct"]["tail_dropped"] >= len(qids)  # "I hope this helps!" went
