"""Judge, clean and select teacher rationales into the distillation set.

    mind filter                                   # params.yaml's `filter` section
    mind filter --judge llm --min-perspectives 3 --max-questions 100

Reads the rationale shards (``data/rationales/``) and the training questions
(``data/prepared/train/``); writes ``data/filtered/`` (shards of the kept rationales,
manifest last, plus ``stats.json``), ``metrics/filter.json`` (DVC metrics) and two CSVs for
``dvc plots``: per-perspective teacher accuracy and the pass-rate histogram.

What happens, in order:

1. **Judge.** Every rationale's final answer is extracted for its question's answer type
   (``pipeline.answers``) and compared with the gold (``pred_answer``, ``correct``). With
   ``judge: llm`` a judge model (vLLM, yes/no prompt) decides the rows from which the rules
   extract no answer at all; truncated rows are not sent to it.
2. **Pass rate.** A question's pass rate is the share of *all* its rationales (every
   teacher, perspective and sample; truncated, short or repetitive ones included) that the
   judge marks correct. Only correctness counts here; the row filters below do not.
3. **Training text.** Every correct rationale is rewritten into the text the student will train
   on (``pipeline.answers.canonical_rationale``): its reasoning, in order, then the canonical
   ``answer_suffix(gold)`` ("The answer is 42."). Answer statements are removed wherever the
   teacher put them, so "The answer is 2. Tom has 5 ..." keeps its reasoning instead of
   becoming a bare answer; ``stats.json`` counts the rewrites (``answer_last``,
   ``answer_first``, ``answer_in_middle``, ``no_answer_sentence``, ``tail_dropped``).
   ``answer_offset`` is where the suffix starts in ``text``.
4. **Row filters**, each row dropped for the first reason that applies, in this order:
   ``truncated`` (finish_reason "length"), ``no_answer``, ``wrong_answer``, ``too_short``
   (fewer than min_tokens tokens of reasoning before the suffix: a bare answer has none),
   ``too_long`` (more than max_tokens tokens of training text), both counted in ``tokenizer``
   (the student's) on the rewritten text, ``repetition`` (share of repeated word n-grams above
   max_repeat_share), ``exact_duplicate`` (same training text as an earlier rationale of the
   same question), ``near_duplicate`` (same text after lower-casing and removing
   punctuation/whitespace, or, when ``near_dup_threshold`` is set, MiniLM cosine similarity at
   or above it). "Earlier" is the order (perspective, teacher, sample_index).
5. **One rationale per (question, perspective)**, by ``pick``: ``shortest`` (fewest tokens),
   ``longest`` or ``first`` (lowest sample_index); ties go to the lower (teacher,
   sample_index). The others are dropped as ``extra_per_perspective``. K is the number of
   perspectives a question keeps.
6. **Questions.** A question needs K >= ``min_perspectives`` (else ``few_perspectives``).
   Easy questions (pass rate >= ``easy_threshold``) are down-sampled to
   ``easy_keep_fraction`` x their number, rounded half up, by a seeded choice (``easy_downsampled``);
   hard ones all stay. Then at most ``max_questions`` remain, a seeded uniform choice
   (``over_cap``). Fewer than ``min_questions`` left is an error that gives the counts.

The output rows keep the teacher's ``num_tokens`` for its original text, and add
``train_tokens`` (the rewritten text, in ``tokenizer``) and ``rewrite``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from pipeline import answers as A
from pipeline.config import check, described, shown, to_dict
from pipeline.engine import Engine, EngineConfig, chat_prompts
from pipeline.questions import format_question
from pipeline.shards import (FILTERED_SCHEMA, MANIFEST, RATIONALE_SCHEMA, STATS, ShardError, atomic_write_json,
                             atomic_write_text, read_table, replacing_all, write_shards)
from stages.cli import field

log = logging.getLogger("mind.filter")

QUESTION_COLUMNS = ("id", "question", "answer", "answer_type", "choices")

ROW_REASONS = (
    "truncated", "no_answer", "wrong_answer", "too_short", "too_long", "repetition",
    "exact_duplicate", "near_duplicate", "extra_per_perspective",
)
QUESTION_REASONS = ("few_perspectives", "easy_downsampled", "over_cap")
HIST_BINS = 10

JUDGE_PROMPT = (
    "You check answers to questions.\n\n"
    "Question:\n{question}\n\n"
    "Correct answer: {gold}\n\n"
    "Response:\n{response}\n\n"
    "Does the response arrive at the correct answer? Reply with only yes or no."
)


@dataclass
class FilterConfig:
    rationales_dir: Path = field(Path("data/rationales"), help="rationale shards written by `mind generate`")
    questions_dir: Path = field(Path("data/prepared/train"), help="question shards the rationales answer")
    out_dir: Path = field(Path("data/filtered"), help="output folder: kept rationales + stats.json")
    metrics_file: Path = field(Path("metrics/filter.json"), help="DVC metrics file")
    plots_dir: Path = field(Path("metrics"),
                            help="folder of the plot CSVs (filter_perspectives.csv, filter_pass_rate.csv)")
    judge: Literal["rules", "llm"] = field(
        "rules", help="rules: extracted answer vs gold; llm: also ask a judge model when no answer is found")
    judge_model: Path = field(Path("data/models/smollm2-135m-instruct"), help="judge model dir (judge: llm)")
    judge_engine: EngineConfig = field(help="vLLM settings of the judge (judge: llm)",
                                       factory=lambda: EngineConfig(max_model_len=2048, kv_cache_gib=1.0))
    judge_max_tokens: int = field(4, help="tokens the judge may generate for its yes/no")
    tokenizer: Path = field(Path("data/models/smollm2-135m-instruct"),
                            help="the student's tokenizer: min_tokens / max_tokens count the training text in its tokens")
    min_tokens: int = field(12, help="drop rationales with fewer tokens of reasoning before the answer suffix (too_short)")
    max_tokens: int = field(512, help="drop rationales whose training text has more tokens (too_long)")
    repeat_ngram: int = field(4, help="n of the word n-grams of the repetition check")
    max_repeat_share: float = field(
        0.5, help="drop rationales whose share of repeated n-grams exceeds this (repetition)")
    near_dup_threshold: float | None = field(
        None, help="MiniLM cosine similarity at or above which a rationale is a near-duplicate of an earlier one "
        "of its question; null: text normalisation only")
    encoder_dir: Path = field(Path("data/models/all-minilm-l6-v2"), help="sentence encoder for near_dup_threshold")
    pick: Literal["shortest", "longest", "first"] = field(
        "shortest", help="which rationale a (question, perspective) keeps")
    min_perspectives: int = field(
        2, help="keep a question only if at least this many perspectives have a kept rationale")
    easy_threshold: float = field(0.75, help="questions with pass rate >= this are easy")
    easy_keep_fraction: float = field(0.5, help="share of easy questions kept (seeded choice); hard ones are all kept")
    max_questions: int = field(497, help="cap on kept questions (seeded choice); the paper keeps 497")
    min_questions: int = field(20, help="stop with an error when fewer questions remain")
    seed: int = field(0, help="seed of the easy down-sampling and the cap")
    shard_size: int = field(5000, help="rows per output shard")

    def __post_init__(self) -> None:
        check(self.judge_max_tokens >= 1, "filter.judge_max_tokens must be >= 1")
        check(0 <= self.min_tokens <= self.max_tokens, "filter: need 0 <= min_tokens <= max_tokens")
        check(self.repeat_ngram >= 1, "filter.repeat_ngram must be >= 1")
        check(0 < self.max_repeat_share <= 1, "filter.max_repeat_share must be in (0, 1]")
        check(self.near_dup_threshold is None or 0 < self.near_dup_threshold <= 1,
              "filter.near_dup_threshold must be in (0, 1] or null")
        check(self.min_perspectives >= 1, "filter.min_perspectives must be >= 1")
        check(0 <= self.easy_threshold <= 1, "filter.easy_threshold must be in [0, 1]")
        check(0 <= self.easy_keep_fraction <= 1, "filter.easy_keep_fraction must be in [0, 1]")
        check(self.max_questions >= 1, "filter.max_questions must be >= 1")
        check(0 <= self.min_questions <= self.max_questions, "filter: need 0 <= min_questions <= max_questions")
        check(self.shard_size >= 1, "filter.shard_size must be >= 1")


# ---------------------------------------------------------------- inputs


def load_questions(questions_dir: Path) -> dict[str, dict[str, Any]]:
    """The prepared questions by id, checked: every column present and typed, every id used
    once (rationales are judged against the gold of the question their id names)."""
    table = read_table(questions_dir)
    missing = [c for c in QUESTION_COLUMNS if c not in table.column_names]
    if missing:
        raise ShardError(f"{questions_dir}: question shards lack column(s) {missing}")
    questions: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(table.to_pylist()):
        for name in ("id", "question", "answer", "answer_type"):
            if not isinstance(row[name], str):
                raise ShardError(f"{questions_dir}: row {i}: field {name} is {described(row[name])}, not a string")
        if row["answer_type"] not in A.ANSWER_TYPES:
            raise ShardError(f"{questions_dir}: row {i}: answer_type {shown(row['answer_type'])} is not one of "
                             f"{list(A.ANSWER_TYPES)}")
        if row["id"] in questions:
            raise ShardError(f"{questions_dir}: question id {shown(row['id'])} is used by two questions "
                             "(ids must be unique; rerun `mind prepare`)")
        questions[row["id"]] = row
    return questions


def load_rationales(rationales_dir: Path, questions: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rationale rows, checked: every column present, no nulls, every question known."""
    table = read_table(rationales_dir)
    missing = [c for c in RATIONALE_SCHEMA.names if c not in table.column_names]
    if missing:
        raise ValueError(f"{rationales_dir}: rationale shards lack column(s) {missing}")
    rows = table.select(RATIONALE_SCHEMA.names).to_pylist()
    for i, row in enumerate(rows):
        for name, value in row.items():
            if value is None:
                raise ValueError(
                    f"{rationales_dir}: row {i} (question {shown(row['question_id'])}): field {name} is null")
        if row["question_id"] not in questions:
            raise ValueError(
                f"{rationales_dir}: row {i}: field question_id {shown(row['question_id'])} is not a question "
                "of the questions folder (were the rationales generated from another prepare run?)"
            )
    return rows


# ---------------------------------------------------------------- judging


def judge_rows(rows: list[dict[str, Any]], questions: dict[str, dict[str, Any]]) -> None:
    """Set ``pred_answer`` (None when nothing is found) and ``correct`` on every row (rules)."""
    for row in tqdm(rows, desc="judge", unit="row", mininterval=5):
        q = questions[row["question_id"]]
        pred = A.extract_answer(row["text"], q["answer_type"], q["choices"])
        row["pred_answer"] = pred
        row["correct"] = A.is_correct(pred, q["answer"], q["answer_type"])


def _gold_for_judge(q: dict[str, Any]) -> str:
    if q["answer_type"] == "choice" and q["choices"]:
        return f"({q['answer']}) {q['choices'][A.LETTERS.index(q['answer'])]}"
    return q["answer"]


def _fit_response(tokenizer: Any, question: str, gold: str, response: str, budget: int) -> str:
    """The judge's user message, with the response cut from its start (keeping the end, where
    the answer is) until the chat prompt fits in ``budget`` tokens."""
    ids = tokenizer.encode(response, add_special_tokens=False)
    while True:
        message = JUDGE_PROMPT.format(question=question, gold=gold, response=response)
        n = len(tokenizer.encode(chat_prompts(tokenizer, [message])[0], add_special_tokens=False))
        if n <= budget or not ids:
            return message
        ids = ids[n - budget + 4:]
        response = "..." + tokenizer.decode(ids)


def llm_judge(engine: Engine, items: Sequence[tuple[str, str, str]], max_tokens: int = 4) -> list[str | None]:
    """Ask the judge model ``engine`` serves whether each (question, gold, response) reaches the
    gold: "yes", "no" or None (the judge said neither). Greedy decoding, one short reply per item;
    long responses are shown by their end so the prompt fits the engine's max_model_len."""
    from vllm import SamplingParams

    if not items:
        return []
    tokenizer = engine.tokenizer
    budget = engine.cfg.max_model_len - max_tokens
    messages = [_fit_response(tokenizer, q, g, r, budget) for q, g, r in items]
    prompts = chat_prompts(tokenizer, messages)
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [A.extract_yesno(o[0].text) for o in outs]


def judge_undecided_with_llm(
    rows: list[dict[str, Any]], questions: dict[str, dict[str, Any]], cfg: FilterConfig
) -> Counter[str]:
    """``judge: llm``: rows without an extracted answer (and not truncated) go to the judge
    model; a "yes" marks them correct. Returns counts (undecided, yes, no, unclear)."""
    undecided = [r for r in rows if r["pred_answer"] is None and r["finish_reason"] != "length"]
    counts: Counter[str] = Counter(llm_judged=len(undecided))
    if not undecided:
        return counts
    items = []
    for r in undecided:
        q = questions[r["question_id"]]
        items.append((format_question(q), _gold_for_judge(q), r["text"]))
    with Engine(cfg.judge_model, cfg.judge_engine) as judge:
        verdicts = llm_judge(judge, items, cfg.judge_max_tokens)
    for r, verdict in zip(undecided, verdicts):
        counts[f"llm_{verdict or 'unclear'}"] += 1
        r["correct"] = verdict == "yes"
    return counts


# ---------------------------------------------------------------- row filters


def near_duplicate_flags(embeddings: np.ndarray, threshold: float) -> list[bool]:
    """True for each row of ``embeddings`` (unit vectors, in order) whose cosine similarity to an
    earlier, unflagged row is >= threshold."""
    sims = embeddings @ embeddings.T
    flags = [False] * len(embeddings)
    kept: list[int] = []
    for i in range(len(embeddings)):
        if any(sims[i, j] >= threshold for j in kept):
            flags[i] = True
        else:
            kept.append(i)
    return flags


def rewrite_correct_rows(rows: list[dict[str, Any]], questions: dict[str, dict[str, Any]], tokenizer: Any) -> None:
    """Give every correct row its training text (``canonical_rationale``) and token counts.

    Sets ``train_text``, ``answer_offset``, ``rewrite``, ``tail_dropped``, ``reasoning_tokens``
    (before the suffix) and ``train_tokens`` (the whole training text), in ``tokenizer``'s tokens.
    """
    correct = [r for r in rows if r["correct"]]
    for r in correct:
        q = questions[r["question_id"]]
        c = A.canonical_rationale(r["text"], q["answer"], q["answer_type"])
        r.update(train_text=c.text, answer_offset=c.offset, rewrite=c.rewrite, tail_dropped=c.tail_dropped)
    if not correct:
        return
    bodies = tokenizer([r["train_text"][: r["answer_offset"]] for r in correct], add_special_tokens=False)["input_ids"]
    whole = tokenizer([r["train_text"] for r in correct], add_special_tokens=False)["input_ids"]
    for r, body, ids in zip(correct, bodies, whole):
        r["reasoning_tokens"] = len(body)
        r["train_tokens"] = len(ids)


def row_drop_reasons(rows: list[dict[str, Any]], cfg: FilterConfig, encoder: Any | None) -> None:
    """Set ``drop`` on every row: the first row filter that rejects it, or None. Correct rows must
    already carry their training text (``rewrite_correct_rows``): the length and duplicate checks
    look at what the student will train on."""
    by_question: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_question[r["question_id"]].append(r)
    survivors: list[list[dict[str, Any]]] = []  # per question, for the embedding check
    for qrows in tqdm(by_question.values(), desc="row filters", unit="question", mininterval=5):
        qrows.sort(key=lambda r: (r["perspective"], r["teacher"], r["sample_index"]))
        seen_exact: set[str] = set()
        seen_norm: set[str] = set()
        survivors.append([])
        for r in qrows:
            r["drop"] = None
            if r["finish_reason"] == "length":
                r["drop"] = "truncated"
            elif not r["correct"] and r["pred_answer"] is None:
                r["drop"] = "no_answer"
            elif not r["correct"]:
                r["drop"] = "wrong_answer"
            elif r["reasoning_tokens"] < cfg.min_tokens:
                r["drop"] = "too_short"
            elif r["train_tokens"] > cfg.max_tokens:
                r["drop"] = "too_long"
            elif A.repeated_ngram_share(r["train_text"], cfg.repeat_ngram) > cfg.max_repeat_share:
                r["drop"] = "repetition"
            elif r["train_text"].strip() in seen_exact:
                r["drop"] = "exact_duplicate"
            elif A.normalise_text(r["train_text"]) in seen_norm:
                r["drop"] = "near_duplicate"
            else:
                seen_exact.add(r["train_text"].strip())
                seen_norm.add(A.normalise_text(r["train_text"]))
                survivors[-1].append(r)
    if encoder is None or cfg.near_dup_threshold is None:
        return
    # One encode call for every survivor (small per-question batches are much slower on CPU).
    texts = [r["train_text"] for group in survivors for r in group]
    log.info("embedding %d rationales for the near-duplicate check", len(texts))
    emb = np.asarray(encoder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False))
    start = 0
    for group in survivors:
        flags = near_duplicate_flags(emb[start:start + len(group)], cfg.near_dup_threshold)
        start += len(group)
        for r, flag in zip(group, flags):
            if flag:
                r["drop"] = "near_duplicate"


# ---------------------------------------------------------------- selection


def pick_key(row: dict[str, Any], pick: str) -> tuple[Any, ...]:
    """Sort key of the ``pick`` rule; the lowest key is kept."""
    tie = (row["teacher"], row["sample_index"])
    if pick == "shortest":
        return (row["train_tokens"], *tie)
    if pick == "longest":
        return (-row["train_tokens"], *tie)
    return (row["sample_index"], row["teacher"])


def pick_per_perspective(rows: list[dict[str, Any]], pick: str) -> dict[str, list[dict[str, Any]]]:
    """At most one surviving row per (question, perspective): question id -> picked rows.

    Rows that lose to another of their perspective get ``drop = "extra_per_perspective"``.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["drop"] is None:
            groups[(r["question_id"], r["perspective"])].append(r)
    picked: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (qid, _), group in sorted(groups.items()):
        group.sort(key=lambda r: pick_key(r, pick))
        picked[qid].append(group[0])
        for r in group[1:]:
            r["drop"] = "extra_per_perspective"
    return picked


def select_questions(
    k: dict[str, int],
    pass_rate: dict[str, float],
    *,
    min_perspectives: int,
    easy_threshold: float,
    easy_keep_fraction: float,
    max_questions: int,
    seed: int,
) -> tuple[list[str], dict[str, str]]:
    """MIND's data recipe on per-question K and pass rates.

    Returns the kept question ids (sorted) and, for every dropped one, its reason:
    ``few_perspectives`` (K < min_perspectives), ``easy_downsampled`` (pass rate >=
    easy_threshold and not among the seeded round(easy_keep_fraction x #easy)), ``over_cap``
    (not among the seeded max_questions). The same inputs and seed give the same result.
    """
    dropped: dict[str, str] = {}
    eligible = sorted(q for q in k if k[q] >= min_perspectives)
    dropped.update({q: "few_perspectives" for q in k if k[q] < min_perspectives})
    easy = [q for q in eligible if pass_rate[q] >= easy_threshold]
    hard = [q for q in eligible if pass_rate[q] < easy_threshold]
    # Half up, not Python's round-half-to-even: one easy question at fraction 0.5 keeps 1, not 0.
    n_easy = math.floor(easy_keep_fraction * len(easy) + 0.5)
    keep_easy = set(random.Random(f"{seed}:easy").sample(easy, n_easy))
    dropped.update({q: "easy_downsampled" for q in easy if q not in keep_easy})
    kept = sorted(hard + sorted(keep_easy))
    if len(kept) > max_questions:
        capped = set(random.Random(f"{seed}:cap").sample(kept, max_questions))
        dropped.update({q: "over_cap" for q in kept if q not in capped})
        kept = sorted(capped)
    return kept, dropped


# ---------------------------------------------------------------- statistics


def _accuracy(rows: Sequence[dict[str, Any]], key: str, kept: Counter[str]) -> dict[str, dict[str, Any]]:
    n: Counter[str] = Counter()
    c: Counter[str] = Counter()
    for r in rows:
        n[r[key]] += 1
        c[r[key]] += bool(r["correct"])
    return {v: {"n": n[v], "correct": c[v], "accuracy": c[v] / n[v], "kept": kept[v]} for v in sorted(n)}


def pass_rate_histogram(rates: dict[str, float], kept: set[str]) -> list[dict[str, Any]]:
    """Ten equal bins on [0, 1] (the last one closed); questions and kept questions per bin."""
    out = []
    for b in range(HIST_BINS):
        lo, hi = b / HIST_BINS, (b + 1) / HIST_BINS
        inside = [q for q, p in rates.items() if lo <= p < hi or (b == HIST_BINS - 1 and p == 1.0)]
        out.append({"bin": f"{lo:.1f}-{hi:.1f}", "lo": lo, "hi": hi, "questions": len(inside),
                    "kept": sum(1 for q in inside if q in kept)})
    return out


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def rewrite_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Rows per rewrite kind (``pipeline.answers.REWRITES``), plus how many had chatter dropped."""
    kinds = Counter(r["rewrite"] for r in rows)
    return {**{k: kinds[k] for k in A.REWRITES}, "tail_dropped": sum(bool(r["tail_dropped"]) for r in rows)}


def too_few_message(stats: dict[str, Any], cfg: FilterConfig) -> str:
    q = stats["questions"]
    d = q["dropped"]
    rows = stats["rows"]["dropped"]
    removed_by = {
        f"min_perspectives={cfg.min_perspectives}": d["few_perspectives"],
        f"easy_threshold={cfg.easy_threshold}/easy_keep_fraction={cfg.easy_keep_fraction}": d["easy_downsampled"],
        f"max_questions={cfg.max_questions}": d["over_cap"],
    }
    worst = max(removed_by, key=lambda name: removed_by[name])
    row_part = ", ".join(f"{k} {v}" for k, v in rows.items() if v)
    return (
        f"filter kept {q['kept']} questions, fewer than min_questions={cfg.min_questions}. "
        f"Of {q['with_rationales']} questions with rationales, {d['few_perspectives']} had fewer than "
        f"min_perspectives={cfg.min_perspectives} perspectives with a kept rationale "
        f"({q['no_correct']} had no correct rationale at all), {d['easy_downsampled']} easy ones "
        f"(pass rate >= easy_threshold={cfg.easy_threshold}) were dropped by easy_keep_fraction="
        f"{cfg.easy_keep_fraction}, {d['over_cap']} were over max_questions={cfg.max_questions}. "
        f"Most were removed by {worst}. Rows: {stats['rows']['in']} in, dropped: {row_part or 'none'}. "
        "Generate more questions or samples, lower min_perspectives, or lower min_questions."
    )


# ---------------------------------------------------------------- the stage


def run(cfg: FilterConfig) -> dict[str, Any]:
    """Judge, filter and select rationales into data/filtered/."""
    config = to_dict(cfg)
    questions = load_questions(cfg.questions_dir)
    rows = load_rationales(cfg.rationales_dir, questions)
    log.info("read %d rationales of %d questions from %s (%d prepared questions in %s)",
             len(rows), len({r["question_id"] for r in rows}), cfg.rationales_dir, len(questions), cfg.questions_dir)

    judge_rows(rows, questions)
    judge_counts: Counter[str] = Counter(rules_undecided=sum(r["pred_answer"] is None for r in rows))
    if cfg.judge == "llm":
        judge_counts.update(judge_undecided_with_llm(rows, questions, cfg))

    by_question: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_question[r["question_id"]].append(r)
    pass_rate = {q: sum(r["correct"] for r in rs) / len(rs) for q, rs in by_question.items()}

    encoder = None
    if cfg.near_dup_threshold is not None:
        from sentence_transformers import SentenceTransformer

        if not cfg.encoder_dir.is_dir():
            raise FileNotFoundError(f"encoder directory {cfg.encoder_dir} does not exist (run `mind models`)")
        encoder = SentenceTransformer(str(cfg.encoder_dir), device="cpu")
    from transformers import AutoTokenizer

    if not cfg.tokenizer.is_dir():
        raise FileNotFoundError(f"filter.tokenizer: {cfg.tokenizer} does not exist (run `mind models`)")
    rewrite_correct_rows(rows, questions, AutoTokenizer.from_pretrained(str(cfg.tokenizer)))
    row_drop_reasons(rows, cfg, encoder)
    picked = pick_per_perspective(rows, cfg.pick)
    k = {q: len(picked.get(q, [])) for q in by_question}
    kept_ids, q_dropped = select_questions(
        k, pass_rate, min_perspectives=cfg.min_perspectives, easy_threshold=cfg.easy_threshold,
        easy_keep_fraction=cfg.easy_keep_fraction, max_questions=cfg.max_questions, seed=cfg.seed,
    )
    for qid, reason in q_dropped.items():
        for r in picked.get(qid, []):
            r["drop"] = reason
    kept_set = set(kept_ids)

    # Output rows: prepared-question order, then perspective.
    order = {qid: i for i, qid in enumerate(questions)}
    out_rows = []
    for qid in sorted(kept_ids, key=order.__getitem__):
        q = questions[qid]
        for r in sorted(picked[qid], key=lambda r: (r["perspective"], r["teacher"])):
            out_rows.append({
                **{c: r[c] for c in RATIONALE_SCHEMA.names}, "text": r["train_text"],
                "pred_answer": r["pred_answer"], "correct": True, "question_pass_rate": pass_rate[qid],
                "question": format_question(q), "answer": q["answer"], "answer_type": q["answer_type"],
                "answer_offset": r["answer_offset"], "train_tokens": r["train_tokens"], "rewrite": r["rewrite"],
            })

    kept_rows = [r for qid in kept_ids for r in picked[qid]]
    row_drops = Counter(r["drop"] for r in rows if r["drop"] is not None)
    q_drops = Counter(q_dropped.values())
    easy_all = [q for q in k if k[q] >= cfg.min_perspectives and pass_rate[q] >= cfg.easy_threshold]
    kept_by_perspective = Counter(r["perspective"] for r in out_rows)
    kept_by_teacher = Counter(r["teacher"] for r in out_rows)
    stats: dict[str, Any] = {
        "rows": {
            "in": len(rows),
            "kept": len(out_rows),
            "dropped": {reason: row_drops[reason] for reason in (*ROW_REASONS, *QUESTION_REASONS)},
        },
        "questions": {
            "prepared": len(questions),
            "with_rationales": len(by_question),
            "no_correct": sum(1 for q in by_question if pass_rate[q] == 0),
            "kept": len(kept_ids),
            "dropped": {reason: q_drops[reason] for reason in QUESTION_REASONS},
            "easy": len(easy_all),
            "easy_kept": sum(1 for q in easy_all if q in kept_set),
            "hard": sum(1 for q in k if k[q] >= cfg.min_perspectives) - len(easy_all),
            "hard_kept": sum(1 for q in kept_ids if pass_rate[q] < cfg.easy_threshold),
        },
        "judge": {"mode": cfg.judge, **{key: judge_counts[key] for key in sorted(judge_counts)}},
        # How the teacher had placed its answer, over every correct row and over the kept ones.
        "rewrites": {
            "correct": rewrite_counts([r for r in rows if r["correct"]]),
            "kept": rewrite_counts(kept_rows),
        },
        "accuracy": {
            "overall": {"n": len(rows), "correct": sum(r["correct"] for r in rows),
                        "accuracy": sum(r["correct"] for r in rows) / len(rows) if rows else 0.0},
            "per_perspective": _accuracy(rows, "perspective", kept_by_perspective),
            "per_teacher": _accuracy(rows, "teacher", kept_by_teacher),
        },
        "pass_rate_histogram": pass_rate_histogram(pass_rate, kept_set),
        "questions_by_k": {
            "before_selection": {str(n): c for n, c in sorted(Counter(k.values()).items())},
            "kept": {str(n): c for n, c in sorted(Counter(k[q] for q in kept_ids).items())},
        },
        "config": config,
    }
    for reason, count in stats["rows"]["dropped"].items():
        log.info("dropped %d rows: %s", count, reason)
    log.info("questions: %d with rationales, %d kept (%s dropped), %d rows kept",
             len(by_question), len(kept_ids), dict(q_drops), len(out_rows))

    if len(kept_ids) < cfg.min_questions:
        # The old output, if any, must not look complete next to the new stats.
        (cfg.out_dir / MANIFEST).unlink(missing_ok=True)
        message = too_few_message(stats, cfg)
        atomic_write_json(cfg.out_dir / STATS, {**stats, "error": message})
        raise ValueError(message)

    kept_k = [k[q] for q in kept_ids]
    metrics = {
        "rows_in": len(rows),
        "rows_kept": len(out_rows),
        "questions_with_rationales": len(by_question),
        "questions_kept": len(kept_ids),
        "sample_accuracy": stats["accuracy"]["overall"]["accuracy"],
        "mean_k": sum(kept_k) / len(kept_k) if kept_k else 0.0,
        "mean_pass_rate_kept": sum(pass_rate[q] for q in kept_ids) / len(kept_ids) if kept_ids else 0.0,
    }
    per_p = stats["accuracy"]["per_perspective"]
    perspectives_csv = _csv(["perspective", "accuracy", "n", "kept"],
                            [[p, round(v["accuracy"], 6), v["n"], v["kept"]] for p, v in per_p.items()])
    pass_rate_csv = _csv(["pass_rate", "questions", "kept"],
                         [[b["bin"], b["questions"], b["kept"]] for b in stats["pass_rate_histogram"]])
    # The shards with their stats.json, the metrics and the plot CSVs describe one run: all are
    # written under temporary names and renamed together at the end.
    outputs = [cfg.out_dir, cfg.metrics_file, cfg.plots_dir / "filter_perspectives.csv",
               cfg.plots_dir / "filter_pass_rate.csv"]
    with replacing_all(outputs) as (out_tmp, metrics_tmp, perspectives_tmp, pass_rate_tmp):
        write_shards(out_tmp, out_rows, FILTERED_SCHEMA, {"stage": "filter", **config}, shard_size=cfg.shard_size,
                     stats=stats)
        atomic_write_json(metrics_tmp, metrics)
        atomic_write_text(perspectives_tmp, perspectives_csv)
        atomic_write_text(pass_rate_tmp, pass_rate_csv)
    log.info("wrote %d rationales of %d questions to %s; metrics %s", len(out_rows), len(kept_ids),
             cfg.out_dir, cfg.metrics_file)
    return stats
