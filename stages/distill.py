"""Distil the filtered multi-perspective rationales into the student: MIND and its baselines.

    mind distill --method mind                 # params.yaml's `distill` section -> data/students/mind-s0/
    mind distill --method uniform --seed 1     # also: single, mcc -> data/students/uniform-s1/
    mind distill --method mind-no-synergy      # an ablation (also mind-ema0, mind-beta0, mind-length)
    mind distill --method mind --inject 0.25   # a quarter of the questions get a foreign path -> mind-inj-s0/
    accelerate launch --config_file configs/accelerate/ddp_gpu.yaml -m stages.app distill --method mind

Reads ``data/filtered/`` (one training unit = one question with its K <= ``max_paths`` kept
rationales) and the student model, and writes ``data/students/<run_name>/`` (run_name
defaults to ``<method>-s<seed>``): ``adapter/`` (PEFT LoRA adapter; absent for full fine-tuning),
``merged/`` (HF model dir with tokenizer and chat template; transformers and vLLM load it),
``ta.pt`` (the Teaching Assistant, ``mind`` only), ``config.json`` (resolved config) and
``metrics.json`` (written last). Training curves go through dvclive to
``metrics/distill/<run_name>/``.

The student sees each question through its chat template, with no perspective instruction,
and learns the rationale, the canonical answer suffix and the end-of-turn token; prompt
tokens are masked out. Methods share one code path and differ only in how the K paths of a
question are weighted:

- ``single``  one path per question (SbS-KD), picked once by ``single_rule``; CE only.
- ``uniform`` every kept path, equal weights; CE only.
- ``mcc``     uniform + the answer-consistency term (MCC-KD style), weight ``consistency_weight``.
- ``mind``    the TA's selection ``I`` and weights ``α`` + the consistency term, with
              Feedback-Driven Inertia Calibration (FDIC, ``pipeline/fdic.py``; its settings are the
              mapping ``ta``): ``ta.warmup_steps`` of TA-only training against the frozen student's
              per-path losses, then a joint phase in which the TA steps every ``ta.accum_steps``
              student micro-batches with ``ta.joint_lr``; per-rationale losses are smoothed with an
              inertia ``ta.mu`` per student optimizer step. Each TA step re-fits every smoothed loss
              seen so far (``ta.updates`` AdamW updates), so the TA's scores reach the scale of ``-L̄``.

Ablations (the paper's table) are methods too: ``mind-no-synergy`` (``ta.synergy: false``),
``mind-ema0`` (``ta.mu: 0``, the instantaneous loss) and ``mind-beta0`` (``beta: 0``) run
``mind`` with that one parameter forced, into ``<out_root>/<ablation>-s<seed>``; ``mind-length``
(``scorer: length``) is the length baseline: mind's selection and weights with ``s = -ln tokens``
instead of the TA, which tells whether the TA learns more than "shorter is easier".
dvc.yaml trains and evaluates every one of ``methods`` once per seed in ``seeds``
(``distill@<method>-<seed>``, ``evaluate@<method>-<seed>``); the report pools the seeds.

``inject`` (off by default) tests the mechanism end to end: in a seeded share of the questions,
one kept path is replaced by a rationale of another question that ends in this question's own
answer, the same questions and rationales for every method and seed. dvc.yaml trains
``inject_methods`` on that data too (``distill-injected@...``, students ``<method>-inj-s<seed>``).
mind's ``metrics.json`` then says how much weight the injected paths got:
``injected_alpha_share`` and ``injected_deselected_share`` over the joint phase, and
``injected_alpha_by_question`` under the final TA.

For mind and its ablations the run's ``metrics.json`` says what the weights did, averaged over
the joint phase: ``alpha_entropy_share`` (H(α) / ln K), ``oracle_alpha_entropy_share`` (the same
for a TA that fitted -L̄ exactly), ``ta_fit`` ((1 - the first) / (1 - the second)),
``ta_score_slope`` (within-question least-squares slope of the TA's scores on -L̄),
``selected_share`` (|I| / K), ``alpha_length_corr`` and ``alpha_share`` (each perspective's mean
K·α; 1 = a uniform share); ``alpha_share.png`` plots the last over the steps.

Every method gets the same question stream (same seed, questions per step, steps, learning
rate): the TA warm-up draws from its own, separate stream, so it does not shift the
student's data. The TA also draws its initialisation and dropout from its own generators,
so the student's RNG (LoRA dropout) is the same for every method.

Checkpoints (``checkpoint_every``) hold the student's and the TA's whole state (its inertia
table included), and a ``checksums.json`` (sha256 of every file)
written when the checkpoint is complete. A resume verifies it; a checkpoint that fails is
discarded with a log line and the run resumes from the one before (the newest two are kept)
or starts from scratch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from pipeline import losses as L
from pipeline.answers import ANSWER_TYPES
from pipeline.config import ConfigError, check, deep_merge, from_dict, shown, to_dict
from pipeline.engine import resolve_dtype
from pipeline.fdic import Fdic, TaConfig, build_fdic, half_life_steps, rng_fork, update_ema
from pipeline.models import torch_dtype
from pipeline.perspectives import student_message
from pipeline.shards import (FILTERED_SCHEMA, atomic_write_json, config_hash, mismatched_file, read_manifest, read_rows,
                             sha256_file)
from pipeline.ta import embed_paths
from stages.cli import field

log = logging.getLogger("mind.distill")

Method = Literal["single", "uniform", "mcc", "mind", "mind-no-synergy", "mind-ema0", "mind-beta0", "mind-length"]
# Each ablation is mind with one parameter forced: the paper's ablation table, plus the length
# baseline (mind's selection and weights, with scores from each path's length instead of the TA).
# The forced keys are a params.yaml override of the distill section (nested mappings merge key by key).
ABLATIONS: dict[str, dict[str, Any]] = {
    "mind-no-synergy": {"ta": {"synergy": False}}, "mind-ema0": {"ta": {"mu": 0.0}}, "mind-beta0": {"beta": 0.0},
    "mind-length": {"scorer": "length"}}
# Keys that do not change what is trained: a checkpoint stays valid when only these change.
_RESUME_NEUTRAL = ("resume", "checkpoint_every", "keep_checkpoints", "log_every", "out_root", "live_root",
                   "embedding_cache", "run_name", "cpu_threads", "methods", "seeds", "inject_methods")
CHECKSUMS = "checksums.json"  # in every checkpoint, written when it is complete


@dataclass
class DistillConfig:
    method: Method = field("mind", help="training method, or an ablation of mind (mind-no-synergy, mind-ema0, "
                                        "mind-beta0: mind with ta.synergy false, ta.mu 0, beta 0)")
    methods: list[Method] = field(help="the methods (and ablations) dvc.yaml trains and evaluates, once per seed: "
                                       "distill@<method>-<seed>", factory=lambda: ["single", "uniform", "mcc", "mind"])
    seeds: list[int] = field(help="the training seeds dvc.yaml runs every method with (seed: this run's)",
                             factory=lambda: [0])
    inject: float = field(0.0, help="share of questions whose kept paths get one foreign rationale (another "
                                    "question's, ending in this question's own answer); 0: off. The same "
                                    "questions and rationales for every method and seed")
    inject_methods: list[Method] = field(help="methods dvc.yaml also trains on injected data (distill-injected@...; "
                                              "needs inject > 0); [] runs none", factory=list)
    run_name: str | None = field(None, help="output folder name under out_root (default: <method>-s<seed>, "
                                            "<method>-inj-s<seed> with inject > 0)")
    filtered_dir: Path = field(Path("data/filtered"), help="filtered rationale shards")
    student: str = field("data/models/smollm2-135m-instruct", help="student model: local HF dir or Hub id")
    encoder: str = field("data/models/all-minilm-l6-v2", help="TA sentence encoder: sentence-transformers dir or name")
    out_root: Path = field(Path("data/students"), help="output root; the run goes to <out_root>/<run_name>")
    live_root: Path = field(Path("metrics/distill"), help="dvclive root; curves go to <live_root>/<run_name>")
    embedding_cache: Path | None = field(Path(".cache/ta_embeddings"), help="TA embedding cache dir (null: no cache)")
    # data
    max_paths: int = field(4, help="K: at most this many paths per question; a question with more keeps a seeded "
                                   "random draw of them, the same for every method")
    max_seq_len: int = field(384, help="paths longer than this (prompt + rationale) are dropped and counted")
    single_rule: Literal["random", "first", "shortest"] = field(
        "random", help="single: which path a question keeps (seeded random, first by perspective, fewest tokens)")
    # optimisation
    questions_per_step: int = field(2, help="questions per micro-batch per process (all their paths together)")
    grad_accum: int = field(1, help="student gradient-accumulation micro-batches per optimizer step")
    max_steps: int = field(48, help="student optimizer steps")
    max_epochs: float = field(5.0, help="error if max_steps needs more passes over the questions than this")
    lr: float = field(1e-3, help="student peak learning rate")
    warmup_ratio: float = field(0.1, help="linear LR warm-up share of max_steps, then cosine decay to 0")
    weight_decay: float = field(0.0, help="AdamW weight decay (student)")
    max_grad_norm: float = field(1.0, help="student gradient clipping norm (0: off)")
    seed: int = field(0, help="seed for data order, single_rule, initialisation and dropout")
    # student
    finetune: Literal["lora", "full"] = field("lora", help="LoRA adapters or full fine-tuning")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA alpha")
    lora_dropout: float = field(0.05, help="LoRA dropout")
    lora_target_modules: list[str] = field(
        help="modules that get LoRA adapters",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_layers: list[int] | None = field(None, help="only these layer indices get adapters (null: all)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="student weight dtype while training; auto: bfloat16 on GPUs and CPUs with native bf16, else float32")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        None, help="accelerate mixed precision (null: from `accelerate launch`/its config, else no)")
    save_dtype: Literal["float32", "bfloat16", "float16"] = field("bfloat16", help="dtype of the merged model")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")
    force_cpu: bool = field(False, help="train on CPU even when an accelerator is present")
    cpu_threads: int | None = field(None, help="torch CPU threads per process (null: torch's default)")
    # losses and TA
    consistency_weight: float = field(0.5, help="λ: weight of the answer-consistency JSD term (mcc, mind)")
    beta: float = field(0.3, help="selection threshold β in [0, 1] on TA softmax probabilities (0: keep all)")
    tau_student: float = field(0.5, help="τ_student of the selection probabilities and the weights α")
    scorer: Literal["ta", "length"] = field(
        "ta", help="how mind scores paths: ta (the Teaching Assistant) or length (s = -ln tokens, the length "
                   "baseline; the mind-length ablation)")
    ta: TaConfig = field(help="the Teaching Assistant and its FDIC training (mapping: the keys of "
                              "pipeline/fdic.py TaConfig)", factory=TaConfig)
    # robustness and logging
    checkpoint_every: int = field(6, help="save a resumable, sha256-verified checkpoint every N steps (0: never)")
    keep_checkpoints: bool = field(False, help="keep checkpoints after a successful run")
    resume: bool = field(True, help="resume from the last checkpoint of an identical config")
    log_every: int = field(1, help="log a progress line every N steps")

    def __post_init__(self) -> None:
        check(self.run_name is None or (bool(self.run_name) and "/" not in self.run_name),
              f"distill.run_name {self.run_name!r} must be a plain folder name")
        check(1 <= self.max_paths <= 64, "distill.max_paths must be in [1, 64]")
        check(self.max_seq_len >= 16, "distill.max_seq_len must be >= 16")
        check(self.questions_per_step >= 1, "distill.questions_per_step must be >= 1")
        check(self.grad_accum >= 1, "distill.grad_accum must be >= 1")
        check(self.max_steps >= 1, "distill.max_steps must be >= 1")
        check(self.max_epochs > 0, "distill.max_epochs must be positive")
        check(self.lr > 0, "distill.lr must be positive")
        check(0.0 <= self.warmup_ratio < 1.0, "distill.warmup_ratio must be in [0, 1)")
        check(self.max_grad_norm >= 0, "distill.max_grad_norm must be >= 0")
        check(self.lora_r >= 1 and self.lora_alpha >= 1, "distill: lora_r and lora_alpha must be >= 1")
        check(0.0 <= self.lora_dropout < 1.0, "distill.lora_dropout must be in [0, 1)")
        check(bool(self.lora_target_modules), "distill.lora_target_modules must name at least one module")
        check(self.consistency_weight >= 0, "distill.consistency_weight must be >= 0")
        check(0.0 <= self.beta <= 1.0, "distill.beta must be in [0, 1]")
        check(self.tau_student > 0, "distill.tau_student must be positive")
        check(self.checkpoint_every >= 0 and self.log_every >= 1, "distill: checkpoint_every >= 0, log_every >= 1")
        check(self.cpu_threads is None or self.cpu_threads >= 1, "distill.cpu_threads must be >= 1 or null")
        check(bool(self.methods) and len(set(self.methods)) == len(self.methods),
              f"distill.methods {self.methods} must name at least one method, each once")
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
              f"distill.seeds {self.seeds} must list at least one seed >= 0, each once")
        check(0.0 <= self.inject <= 1.0, f"distill.inject {self.inject} must be in [0, 1]")
        check(len(set(self.inject_methods)) == len(self.inject_methods),
              f"distill.inject_methods {self.inject_methods} repeats a name")

    @property
    def name(self) -> str:
        """The run's folder and model name; dvc.yaml writes the same pattern."""
        return self.run_name or run_label(self.method, self.seed, self.inject > 0)

    @property
    def lam(self) -> float:
        """λ actually used: the consistency term belongs to mcc and mind only."""
        return self.consistency_weight if self.method in ("mcc", "mind") else 0.0


def check_injected_arm(cfg: DistillConfig, source: str) -> None:
    """dvc.yaml's injected entries pass ``--inject`` distill.inject: at 0 they would train clean data under an
    ``-inj`` name. A check on the params file, not on a run: the clean entries pass ``--inject 0``."""
    check(not cfg.inject_methods or cfg.inject > 0,
          f"{source}: distill.inject_methods {cfg.inject_methods} needs distill.inject > 0 (it is 0: off)")


def run_label(method: str, seed: int, injected: bool) -> str:
    """``<method>-s<seed>``, or ``<method>-inj-s<seed>`` on injected data: evaluate and the report take
    the name apart again (the report pools a method's seeds)."""
    return f"{method}{'-inj' if injected else ''}-s{seed}"


def resolve_ablation(cfg: DistillConfig) -> DistillConfig:
    """An ablation method as the ``mind`` config it stands for, run under the ablation's name."""
    if cfg.method not in ABLATIONS:
        return cfg
    forced = {**ABLATIONS[cfg.method], "method": "mind", "run_name": cfg.name}
    return from_dict(DistillConfig, deep_merge(to_dict(cfg), forced), "distill")


# ---------------------------------------------------------------- data


@dataclass
class PathExample:
    path_id: int  # row in the path table (TA embeddings, EMA losses)
    key: str  # question_id/teacher/perspective/sample_index: the rationale's identity
    perspective: str
    input_ids: list[int]
    prompt_len: int  # tokens before the first target token
    suffix_start: int  # position of the first answer-suffix token in input_ids
    suffix_ids: list[int]
    injected: bool = False  # another question's rationale put here by distill.inject


@dataclass
class QuestionUnit:
    question_id: str
    paths: list[PathExample]
    jsd_len: int  # answer-suffix tokens shared by all paths (aligned from the end)


def chat_parts(tokenizer: Any, user: str) -> tuple[str, str, str]:
    """(prompt, response_prefix, tail) of the chat template around an assistant reply.

    ``prompt`` is what the student sees at inference (generation prompt included);
    ``response_prefix`` is any template text between that prompt and the reply when the
    reply is rendered as history (usually empty); ``tail`` closes the turn (end-of-turn
    token), which the student must learn in order to stop.
    """
    if not tokenizer.chat_template:
        raise ConfigError("distill: the student tokenizer has no chat template")
    sentinel = "\uE000MIND_REPLY\uE000"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                           tokenize=False)
    full = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                          {"role": "assistant", "content": sentinel}], tokenize=False)
    if full.count(sentinel) != 1 or not full.startswith(prompt):
        raise ConfigError("distill: the student's chat template does not render an assistant reply after its "
                          "generation prompt; cannot build training sequences")
    pre, tail = full.split(sentinel)
    return prompt, pre[len(prompt):], tail


def common_tail(seqs: list[list[int]]) -> int:
    """Length of the longest common suffix of several token lists."""
    n = min(len(s) for s in seqs)
    m = 0
    while m < n and all(s[-1 - m] == seqs[0][-1 - m] for s in seqs):
        m += 1
    return m


def encode_path(tokenizer: Any, prompt_ids: list[int], prefix: str, tail_ids: list[int], text: str,
                offset: int) -> tuple[list[int], int, list[int]]:
    """Token ids of prompt + rationale + answer suffix + tail, the suffix tokenized on its own.

    Tokenizing the suffix separately makes it the same token sequence on every path of a
    question, whatever precedes it, so the consistency term compares aligned tokens. One
    trailing space of the rationale body moves into the suffix (" The answer is 4.") so a
    byte-level BPE tokenizes it the way the model writes it.
    """
    body, suffix = text[:offset], text[offset:]
    if body.endswith(" "):
        body, suffix = body[:-1], " " + suffix
    body_ids = tokenizer(prefix + body, add_special_tokens=False)["input_ids"] if (prefix + body) else []
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + body_ids + suffix_ids + tail_ids
    return ids, len(prompt_ids) + len(body_ids), suffix_ids


def injected_questions(question_ids: list[str], share: float) -> set[str]:
    """The ``share`` of questions that get a foreign path: a seeded draw that depends on nothing but
    the question ids, so every method and training seed sees the same injected data."""
    ids = sorted(question_ids)
    return set(random.Random("inject").sample(ids, round(share * len(ids))))


def foreign_row(row: dict[str, Any], qid: str, by_q: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``row`` with its rationale body replaced by a rationale of another question (seeded per
    question), ending in ``row``'s own answer suffix: right answer, reasoning about something else."""
    rng = random.Random(f"inject/{qid}")
    donor_q = rng.choice(sorted(q for q in by_q if q != qid))
    donor = rng.choice(sorted(by_q[donor_q], key=lambda r: (r["perspective"], r["teacher"], r["sample_index"])))
    body = donor["text"][: donor["answer_offset"]]
    return {**row, "text": body + row["text"][row["answer_offset"]:], "answer_offset": len(body)}


def load_units(cfg: DistillConfig, tokenizer: Any) -> tuple[list[QuestionUnit], list[dict[str, Any]], dict[str, int]]:
    """Read the filtered set into question units; returns (units, path rows, counts)."""
    rows = read_rows(cfg.filtered_dir)
    counts: dict[str, int] = defaultdict(int)
    counts["rows_read"] = len(rows)
    if rows:
        missing = [c for c in FILTERED_SCHEMA.names if c not in rows[0]]
        if missing:
            raise ConfigError(f"{cfg.filtered_dir}: missing column(s) {missing}; is this a filtered set?")
    by_q: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, r in enumerate(rows):
        text, off = r["text"], r["answer_offset"]
        where = f"{cfg.filtered_dir}: row {i} (question_id {r['question_id']}, perspective {r['perspective']})"
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: field text is empty")
        if not isinstance(off, int) or not 0 <= off < len(text):
            raise ConfigError(f"{where}: field answer_offset {off!r} is outside text (length {len(text)})")
        if not isinstance(r["question"], str) or not r["question"].strip():
            raise ConfigError(f"{where}: field question is empty")
        if r["answer_type"] not in ANSWER_TYPES:
            # The answer instruction depends on it: a silent default would train the wrong prompt.
            raise ConfigError(f"{where}: field answer_type {shown(r['answer_type'])} is not one of {ANSWER_TYPES}")
        by_q[r["question_id"]].append(r)

    units: list[QuestionUnit] = []
    path_rows: list[dict[str, Any]] = []
    rng = random.Random(cfg.seed)
    inject = injected_questions(list(by_q), cfg.inject) if cfg.inject > 0 and len(by_q) > 1 else set()
    for qid in sorted(by_q):
        # Documented order: perspective, then teacher, then sample index.
        group = sorted(by_q[qid], key=lambda r: (r["perspective"], r["teacher"], r["sample_index"]))
        questions = {r["question"] for r in group}
        if len(questions) != 1:
            raise ConfigError(f"{cfg.filtered_dir}: question_id {qid} has {len(questions)} different question texts")
        prompt, prefix, tail = chat_parts(tokenizer, student_message(group[0]["question"], group[0]["answer_type"]))
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        encoded = []
        for r in group:
            ids, s_start, s_ids = encode_path(tokenizer, prompt_ids, prefix, tail_ids, r["text"], r["answer_offset"])
            if len(ids) > cfg.max_seq_len:
                counts["paths_too_long"] += 1
                continue
            encoded.append((r, ids, s_start, s_ids, False))
        if len(encoded) > cfg.max_paths:
            # A seeded draw per question, the same for every method: cutting by perspective name
            # dropped the same perspectives from every question.
            keep = sorted(random.Random(f"{cfg.seed}/{qid}").sample(range(len(encoded)), cfg.max_paths))
            for i in sorted(set(range(len(encoded))) - set(keep)):
                counts["paths_over_max_paths"] += 1
                counts[f"paths_over_max_paths/{encoded[i][0]['perspective']}"] += 1
            encoded = [encoded[i] for i in keep]
        if qid in inject and encoded:
            # After the max_paths draw, so the foreign path always reaches the student.
            j = random.Random(f"inject/{qid}/slot").randrange(len(encoded))
            r = foreign_row(encoded[j][0], qid, by_q)
            ids, s_start, s_ids = encode_path(tokenizer, prompt_ids, prefix, tail_ids, r["text"], r["answer_offset"])
            if len(ids) > cfg.max_seq_len:
                counts["injections_too_long"] += 1
            else:
                encoded[j] = (r, ids, s_start, s_ids, True)
                counts["paths_injected"] += 1
        if not encoded:
            counts["questions_without_paths"] += 1
            continue
        if cfg.method == "single":
            if cfg.single_rule == "random":
                pick = rng.randrange(len(encoded))
            elif cfg.single_rule == "first":
                pick = 0
            else:
                pick = min(range(len(encoded)), key=lambda i: len(encoded[i][1]))
            counts["paths_unused_by_single"] += len(encoded) - 1
            encoded = [encoded[pick]]
        paths = []
        for r, ids, s_start, s_ids, foreign in encoded:
            key = f"{qid}/{r['teacher']}/{r['perspective']}/{r['sample_index']}"
            paths.append(PathExample(len(path_rows), key, r["perspective"], ids, len(prompt_ids), s_start, s_ids,
                                     foreign))
            path_rows.append({"key": key, "question": r["question"], "text": r["text"], "perspective": r["perspective"]})
        units.append(QuestionUnit(qid, paths, common_tail([p.suffix_ids for p in paths])))
    counts["questions"] = len(units)
    counts["paths"] = len(path_rows)
    return units, path_rows, dict(counts)


@functools.lru_cache(maxsize=64)
def epoch_order(n: int, seed: int, size: int, epoch: int) -> tuple[int, ...]:
    """The order of the ``n`` questions in ``epoch`` of a stream cut into micro-batches of ``size``.

    A seeded shuffle per epoch, except that when a micro-batch straddles the boundary with the
    previous epoch, this epoch's first questions skip the ones already in that micro-batch
    (they move later), so no micro-batch holds a question twice.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    start = epoch * n
    straddle = start // size * size  # first position of the micro-batch holding this epoch's start
    if epoch == 0 or straddle == start:
        return tuple(order)
    prev = epoch_order(n, seed, size, epoch - 1)
    taken = set(prev[straddle - (start - n):])
    head = [q for q in order if q not in taken][: straddle + size - start]
    rest = [q for q in order if q not in set(head)]
    return tuple(head + rest)


def question_stream(n: int, seed: int, micro: int, size: int) -> list[int]:
    """Global micro-batch ``micro`` (``size`` distinct questions) of a seeded epoch-by-epoch shuffle."""
    if not 1 <= size <= n:
        raise ValueError(f"question_stream: micro-batches of {size} need 1 <= size <= {n} questions")
    pos = micro * size
    return [epoch_order(n, seed, size, p // n)[p % n] for p in range(pos, pos + size)]


@dataclass
class Batch:
    input_ids: Tensor  # [P, T]
    attention_mask: Tensor  # [P, T]
    labels: Tensor  # [P, T], IGNORE_INDEX outside the targets
    start: int  # first input position whose logits are kept
    grid: Tensor  # [Q, K] index into the P paths, -1 for padding
    mask: Tensor  # [Q, K]
    path_ids: Tensor  # [Q, K] global path ids, -1 for padding
    jsd_pos: list[Tensor]  # per question: [K_q, M_q] input positions of the shared suffix tokens
    tokens: int  # target tokens in the batch
    path_tokens: Tensor  # [Q, K] target tokens of each path (padding 0)
    perspectives: list[list[str]]  # per question, its paths' perspectives
    injected: Tensor  # [Q, K] True on a path distill.inject put there


def collate(units: list[QuestionUnit], pad_id: int, k_max: int) -> Batch:
    paths = [p for u in units for p in u.paths]
    T = max(len(p.input_ids) for p in paths)
    P, Q = len(paths), len(units)
    input_ids = torch.full((P, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((P, T), dtype=torch.long)
    labels = torch.full((P, T), L.IGNORE_INDEX, dtype=torch.long)
    grid = torch.full((Q, k_max), -1, dtype=torch.long)
    path_ids = torch.full((Q, k_max), -1, dtype=torch.long)
    jsd_pos = []
    i = 0
    for q, u in enumerate(units):
        pos = []
        for k, p in enumerate(u.paths):
            n = len(p.input_ids)
            input_ids[i, :n] = torch.tensor(p.input_ids)
            attention_mask[i, :n] = 1
            labels[i, p.prompt_len:n] = input_ids[i, p.prompt_len:n]
            grid[q, k] = i
            path_ids[q, k] = p.path_id
            end = p.suffix_start + len(p.suffix_ids)
            pos.append(list(range(end - u.jsd_len, end)))
            i += 1
        jsd_pos.append(torch.tensor(pos, dtype=torch.long).view(len(u.paths), u.jsd_len))
    start = min(p.prompt_len for p in paths) - 1
    path_tokens = torch.zeros((Q, k_max), dtype=torch.long)
    path_tokens[grid >= 0] = (labels != L.IGNORE_INDEX).sum(dim=1)[grid[grid >= 0]]
    injected = torch.zeros((Q, k_max), dtype=torch.bool)
    for q, u in enumerate(units):
        injected[q, : len(u.paths)] = torch.tensor([p.injected for p in u.paths])
    return Batch(input_ids, attention_mask, labels, start, grid, grid >= 0, path_ids, jsd_pos,
                 int((labels != L.IGNORE_INDEX).sum()), path_tokens, [[p.perspective for p in u.paths] for u in units],
                 injected)


# ---------------------------------------------------------------- model


def load_student(cfg: DistillConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch_dtype(resolve_dtype(cfg.dtype)))
    model.config.use_cache = False
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules), layers_to_transform=cfg.lora_layers,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def forward_losses(model: Any, batch: Batch, device: torch.device,
                   jsd_mode: Literal["off", "grad", "log"]) -> tuple[Tensor, list[Tensor] | None]:
    """Per-path CE ``[P]`` and one ``[K_q, K_q]`` suffix-JSD matrix per question (None when
    ``jsd_mode`` is off; computed without gradient when it is ``log``)."""
    ids = batch.input_ids.to(device)
    T = ids.shape[1]
    out = model(input_ids=ids, attention_mask=batch.attention_mask.to(device), logits_to_keep=T - batch.start)
    logits = out.logits  # [P, T - start, V]; logits[:, j] predicts input position start + j + 1
    ce = L.path_token_ce(logits[:, :-1], batch.labels[:, batch.start + 1:].to(device))
    if jsd_mode == "off":
        return ce, None
    if jsd_mode == "log":
        logits = logits.detach()
    mats = []
    for q, pos in enumerate(batch.jsd_pos):
        rows = batch.grid[q][batch.mask[q]].to(device)
        if pos.shape[0] < 2 or pos.shape[1] == 0:
            mats.append(ce.new_zeros(pos.shape[0], pos.shape[0]))
            continue
        idx = (pos - 1 - batch.start).to(device)  # logits index that predicts each suffix token
        lp = torch.log_softmax(logits[rows[:, None], idx].float(), dim=-1)  # [K_q, M_q, V]
        mats.append(L.pairwise_jsd(lp))
    return ce, mats


def to_grid(values: Tensor, batch: Batch) -> Tensor:
    """``[P]`` per-path values -> ``[Q, K]`` (padding slots 0)."""
    g = values.new_zeros(batch.grid.shape)
    m = batch.mask.to(values.device)
    g[m] = values[batch.grid.to(values.device)[m]]
    return g


# ---------------------------------------------------------------- FDIC (state and rules: pipeline/fdic.py)


def build_run_fdic(cfg: DistillConfig, units: list[QuestionUnit], path_rows: list[dict[str, Any]],
                   device: torch.device, cache: Path | None) -> Fdic:
    """The run's FDIC state over the frozen encoder's path embeddings and the questions' path grid."""
    with rng_fork(device):  # loading the encoder must not move the student's RNG either
        emb = embed_paths([r["question"] for r in path_rows], [r["text"] for r in path_rows], cfg.encoder, cache,
                          device=str(device) if device.type == "cuda" else "cpu")
    questions = torch.full((len(units), cfg.max_paths), -1, dtype=torch.long)
    for i, u in enumerate(units):
        questions[i, : len(u.paths)] = torch.tensor([p.path_id for p in u.paths])
    return build_fdic(emb, questions, cfg.ta, cfg.seed, device)


def observe(accelerator: Any, fdic: Fdic, batch: Batch, ce: Tensor, clock: int, cfg: DistillConfig) -> Tensor:
    """Fold this micro-batch's per-path CE into L̄ (all processes); returns this process's ``[Q, K]`` L̄."""
    return update_ema(fdic, batch.path_ids, batch.mask, to_grid(ce.detach(), batch), clock,
                      cfg.questions_per_step * cfg.max_paths, accelerator.gather)


def grad_average(accelerator: Any) -> Callable[[Tensor], Tensor] | None:
    """How a TA step averages gradients over processes (None: one process)."""
    if accelerator.num_processes == 1:
        return None
    return lambda g: accelerator.reduce(g, "mean")


def nan_list(x: Tensor) -> list[float]:
    """Per-question values as floats (NaN entries are skipped when records are averaged)."""
    return [float(v) for v in x.detach().cpu()]


def ta_stats(scores: Tensor, smoothed: Tensor, mask: Tensor, cfg: DistillConfig) -> dict[str, list[float]]:
    """How well the TA's eval-mode ``scores`` fit their target ``-L̄`` on this micro-batch, and the
    α a TA that fitted it exactly would give (the oracle: s = -L̄, same β and τ_student)."""
    oracle = -smoothed
    alpha_star = L.path_weights(oracle, L.select_paths(oracle, mask, cfg.beta, cfg.tau_student), cfg.tau_student)
    return {"oracle_alpha_entropy_share": nan_list(L.entropy_share(alpha_star, mask)),
            "ta_score_slope": [L.within_question_slope(oracle, scores, mask)],
            "spearman": [L.mean_question_spearman(scores, oracle, mask)],
            "meta_loss": [float(L.listnet_kl(scores, smoothed, mask, cfg.ta.tau))]}


def alpha_stats(alpha: Tensor, selected: Tensor, mask: Tensor, batch: Batch) -> dict[str, list[float]]:
    """What the weights did: entropy share and selected share per question, the within-question
    correlation of α with path length, and each perspective's K·α (1 = a uniform share)."""
    k = mask.sum(dim=-1)
    out = {"alpha_entropy_share": nan_list(L.entropy_share(alpha, mask)),
           "selected_share": nan_list(selected.sum(dim=-1) / k),
           "alpha_length_corr": [L.within_question_corr(batch.path_tokens.to(alpha.device), alpha, mask)]}
    share = (alpha * k[:, None]).cpu()
    for q, names in enumerate(batch.perspectives):
        for j, name in enumerate(names):
            out.setdefault(f"alpha_share/{name}", []).append(float(share[q, j]))
    foreign = batch.injected
    if foreign.any():
        out["injected_alpha_share"] = [float(v) for v in share[foreign]]
        out["injected_deselected_share"] = [float(v) for v in (~selected.cpu()[foreign]).float()]
    return out


def micro_losses(cfg: DistillConfig, model: Any, batch: Batch, device: torch.device, fdic: Fdic | None,
                 accelerator: Any, clock: int) -> tuple[Tensor, dict[str, list[float]]]:
    """One micro-batch of the joint phase at student step ``clock``: (student loss, logged figures)."""
    mask = batch.mask.to(device)
    # uniform computes the JSD too, without gradient, so every multi-path method logs it.
    jsd_mode = "off" if cfg.method == "single" else ("grad" if cfg.lam > 0 else "log")
    ce, mats = forward_losses(model, batch, device, jsd_mode)  # type: ignore[arg-type]
    stats: dict[str, list[float]] = {}
    if cfg.method == "mind":
        if fdic is not None:
            smoothed = observe(accelerator, fdic, batch, ce, clock, cfg)
            with torch.no_grad():  # α comes from the TA without dropout
                s = fdic.scores(batch.path_ids, batch.mask, train=False)
            stats.update(ta_stats(s, smoothed, mask, cfg))
        else:
            s = L.length_scores(batch.path_tokens.to(device), mask)
        selected = L.select_paths(s, mask, cfg.beta, cfg.tau_student)
        alpha = L.path_weights(s, selected, cfg.tau_student)
        stats.update(alpha_stats(alpha, selected, mask, batch))
    else:
        selected = mask
        alpha = mask.float() if cfg.method == "single" else L.uniform_weights(mask)
    loss, wce, cons = L.student_loss(to_grid(ce, batch), alpha, mats if cfg.lam > 0 else None, cfg.lam)
    if mats is not None:
        if cfg.lam == 0:
            cons = torch.stack([L.consistency_term(m, a[: m.shape[0]]) for m, a in zip(mats, alpha)]).mean()
        stats["jsd"] = [cons.item()]
    stats.update(loss=[loss.item()], ce=[wce.item()], ce_mean=[float(ce.detach().mean())],
                 mean_selected=[float(selected.sum(dim=-1).float().mean())],
                 alpha_entropy=[float(L.alpha_entropy(alpha))])
    return loss, stats


def ta_fit(alpha_share: float | None, oracle_share: float | None) -> float | None:
    """The share of the achievable α sharpening that the TA realises:
    ``(1 - alpha_entropy_share) / (1 - oracle_alpha_entropy_share)``."""
    if alpha_share is None or oracle_share is None or oracle_share >= 1.0:
        return None
    return (1.0 - alpha_share) / (1.0 - oracle_share)


# ---------------------------------------------------------------- training


class NonFiniteLoss(ValueError):
    """A loss or gradient became NaN/inf; training stops, the last checkpoint stays intact."""


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """Checkpoints under their final names (given when complete; verify_checkpoint checks what is
    in them since), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def write_checksums(ckpt: Path) -> None:
    """sha256 of every file of a complete checkpoint, into ``checksums.json``."""
    files = sorted(f for f in ckpt.rglob("*") if f.is_file() and f.name != CHECKSUMS)
    atomic_write_json(ckpt / CHECKSUMS, {str(f.relative_to(ckpt)): sha256_file(f) for f in files})


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file listed in ``checksums.json`` is there with its sha256, else what is wrong."""
    try:
        expected = json.loads((ckpt / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {CHECKSUMS} ({e.__class__.__name__})"
    bad = mismatched_file(ckpt, dict(sorted(expected.items())))
    if bad is None:
        return None
    rel, digest = bad
    return f"{rel} is missing" if digest is None else f"{rel} does not match its sha256"


def pick_checkpoint(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that verifies, or None; the ones newer than it that failed, with the
    reason). The caller still checks that the one found belongs to its config."""
    failed: list[tuple[Path, str]] = []
    for ckpt in reversed(checkpoint_dirs(ckpt_root)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, failed
        failed.append((ckpt, problem))
    return None, failed


def resume_hash(cfg: DistillConfig) -> str:
    """Hash of everything that shapes training (a round trip through from_dict normalises types)."""
    d = to_dict(from_dict(DistillConfig, to_dict(cfg)))
    for k in _RESUME_NEUTRAL:
        d.pop(k, None)
    return config_hash(d)


def check_finite(accelerator: Any, values: dict[str, Tensor | float | None], step: int, ckpt_root: Path,
                 name: str) -> None:
    """Stop every process together when any of them sees a NaN/inf."""
    floats = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in values.items() if v is not None}
    bad = [k for k, v in floats.items() if not math.isfinite(v)]
    flag = accelerator.reduce(torch.tensor(float(bool(bad)), device=accelerator.device), "sum")
    if float(flag) > 0:
        last = checkpoint_dirs(ckpt_root)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        what = ", ".join(f"{k} = {floats[k]}" for k in bad) or "a value on another process"
        raise NonFiniteLoss(f"distill {name}: non-finite {what} at step {step}; training stopped, {where}. "
                            "Lower lr, check the filtered data, or train in float32.")


def save_checkpoint(accelerator: Any, ckpt_root: Path, step: int, state: dict[str, Any]) -> Path:
    """accelerate's state (model/optimizer/RNG) + ours (the TA's whole state included), and
    ``checksums.json``, under a temp name renamed when complete. The newest two checkpoints are
    kept: one that fails verification falls back to the one before."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(state, tmp / "trainer_state.pt")
        write_checksums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(ckpt_root)[:-2]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def reduce_record(accelerator: Any, acc: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each figure over micro-batches, then over processes (NaNs skipped). Every process
    reduces the union of all processes' figures: one that saw no path of a perspective this step
    has no such key, and a collective called on some processes only would hang."""
    keys = sorted(acc)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        keys = sorted(set(gather_object(keys)))
    rec = {}
    for k in keys:
        vals = [x for x in acc.get(k, []) if not math.isnan(x)]
        local = torch.tensor([sum(vals), float(len(vals))], device=accelerator.device, dtype=torch.float64)
        total = accelerator.reduce(local, "sum")
        rec[k] = float(total[0] / total[1]) if float(total[1]) > 0 else float("nan")
    return rec


@dataclass
class RunState:
    """What the phases of one training run share. Every process holds its own; ``step`` and
    ``warm_done`` are where the run stands (restored by a resume, saved by a checkpoint)."""

    cfg: DistillConfig  # with any ablation resolved
    accelerator: Any
    model: Any  # prepared by accelerate
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    fdic: Fdic | None  # mind with the TA scorer only
    average: Callable[[Tensor], Tensor] | None  # how a TA step averages gradients over processes
    units: list[QuestionUnit]
    counts: dict[str, int]  # load_units' counts
    started: float  # time.time() when run() began
    step: int = 0  # student optimizer steps done
    warm_done: int = 0  # TA warm-up steps done
    resumed_from: int | None = None  # the checkpoint's step, when the run resumed
    live: Any = None  # dvclive's Live, on the main process once the run has started

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def out_dir(self) -> Path:
        return self.cfg.out_root / self.cfg.name

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def batch_at(self, stream_seed: int, micro: int) -> Batch:
        """This process's share of global micro-batch ``micro`` of a seeded question stream."""
        per = self.cfg.questions_per_step
        first = self.accelerator.process_index * per
        idx = question_stream(len(self.units), stream_seed, micro, per * self.accelerator.num_processes)
        return collate([self.units[i] for i in idx[first: first + per]], self.tokenizer.pad_token_id,
                       self.cfg.max_paths)

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides accelerate's state (model, optimizer, RNG)."""
        return {"resume_hash": resume_hash(self.cfg), "step": self.step, "warm_done": self.warm_done,
                "scheduler": self.scheduler.state_dict(), "fdic": self.fdic.state_dict() if self.fdic else None}


@dataclass
class Trained:
    """What the joint phase leaves for the outputs."""

    history: list[dict[str, float]]  # one record per student step this run took (after a resume: the rest)
    tokens: int  # target tokens over every process
    seconds: float


def run(cfg: DistillConfig) -> dict[str, Any]:
    """Train one student (method, ablation) on the filtered set and save adapter, merged model, TA and metrics."""
    started = time.time()
    cfg = resolve_ablation(cfg)
    read_manifest(cfg.filtered_dir)  # fail fast, before any model loads, when the filtered set is missing
    r = set_up(cfg, started)
    start_or_resume(r)
    warm_curve = warm_up_ta(r)
    trained = train(r)
    write_run_outputs(r, warm_curve, trained)
    r.accelerator.wait_for_everyone()
    r.accelerator.end_training()
    return {"out_dir": str(r.out_dir), "steps": r.step, "resumed_from_step": r.resumed_from}


def set_up(cfg: DistillConfig, started: float) -> RunState:
    """The accelerator, the student, its question units, the TA (mind) and the optimizer, in the
    order that fixes the RNG: the seed, then the student's initialisation (LoRA)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=cfg.force_cpu or not torch.accelerator.is_available(),
                              gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision)
    main, world, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    set_seed(cfg.seed)

    model, tokenizer = load_student(cfg)
    units, path_rows, counts = load_units(cfg, tokenizer)
    check_enough_questions(cfg, len(units), world)
    say(accelerator,
        "%s: %d questions, %d paths (K mean %.2f, max %d) from %d rows; dropped: %s; %d process(es) on %s (%s)",
        cfg.name, len(units), counts["paths"], counts["paths"] / len(units), max(len(u.paths) for u in units),
        counts["rows_read"], {k: v for k, v in counts.items() if k not in ("rows_read", "questions", "paths")}
        or "none", world, device, accelerator.state.backend or "single process")
    uses_ta = cfg.method == "mind" and cfg.scorer == "ta"
    fdic = build_run_fdic(cfg, units, path_rows, device, cfg.embedding_cache if main else None) if uses_ta else None
    if fdic is not None:
        say(accelerator, "%s: FDIC inertia ta.mu %g: half-life %.1f of %d student steps", cfg.name, cfg.ta.mu,
            half_life_steps(cfg.ta.mu), cfg.max_steps)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(round(cfg.warmup_ratio * cfg.max_steps),
                                                                       cfg.max_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.finetune == "lora" and not sharded(accelerator):
        save_adapter_only(accelerator, model)
    return RunState(cfg, accelerator, model, tokenizer, optimizer, scheduler, fdic, grad_average(accelerator), units,
                    counts, started)


def say(accelerator: Any, msg: str, *args: Any) -> None:
    """Log on the main process (debug on the others): one log line per event, not one per process."""
    (log.info if accelerator.is_main_process else log.debug)(msg, *args)


def sharded(accelerator: Any) -> bool:
    """FSDP or DeepSpeed: the model's state is sharded over the processes."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def check_enough_questions(cfg: DistillConfig, n: int, world: int) -> None:
    """The usable questions fill a step, and the steps take no more than ``max_epochs`` passes."""
    per_step = cfg.questions_per_step * world
    visits = cfg.max_steps * cfg.grad_accum * per_step
    if n < per_step:
        raise ConfigError(f"distill: {n} usable questions in {cfg.filtered_dir}, but one step needs "
                          f"{cfg.questions_per_step} questions/step x {world} processes = {per_step}")
    if visits > cfg.max_epochs * n:
        raise ConfigError(
            f"distill: too few questions for the configured steps: {n} usable questions in {cfg.filtered_dir}, but "
            f"{cfg.max_steps} steps x {cfg.grad_accum} accumulation x {cfg.questions_per_step} questions/step x "
            f"{world} processes = {visits} question visits = {visits / n:.1f} epochs > max_epochs "
            f"{cfg.max_epochs:g}; lower max_steps, raise max_epochs, or filter less strictly")


def save_adapter_only(accelerator: Any, model: Any) -> None:
    """Make accelerate's checkpoints hold the trainable (LoRA) weights only: a LoRA checkpoint needs
    the adapter, not another copy of the frozen base model."""
    names = {k for k, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def only_adapter(_models: list[Any], weights: list[dict[str, Any]], _dir: str) -> None:
        for w in weights:
            for k in [k for k in w if k.removeprefix("module.") not in names]:
                del w[k]

    accelerator.register_save_state_pre_hook(only_adapter)


def start_or_resume(r: RunState) -> None:
    """Resume from the newest checkpoint that verifies and belongs to this config, else start
    clean (a fresh run owns its folder: nothing stale survives); then open the dvclive log."""
    cfg, accelerator = r.cfg, r.accelerator
    ckpt, failed = pick_checkpoint(r.ckpt_root) if cfg.resume else (None, [])
    for bad, problem in failed:
        say(accelerator, "%s: checkpoint %s fails verification (%s); discarded", cfg.name, bad, problem)
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False) if ckpt else None
    if ckpt is not None and state["resume_hash"] != resume_hash(cfg):
        say(accelerator, "%s: checkpoint %s belongs to another config; starting fresh", cfg.name, ckpt)
    elif ckpt is not None:
        accelerator.load_state(str(ckpt), **({} if sharded(accelerator) else {"strict": False}))
        r.step, r.warm_done = state["step"], state["warm_done"]
        r.scheduler.load_state_dict(state["scheduler"])
        if r.fdic is not None:
            r.fdic.load_state_dict(state["fdic"])
        r.resumed_from = r.step
        say(accelerator, "%s: resumed from %s (step %d)", cfg.name, ckpt, r.step)
    elif failed:
        say(accelerator, "%s: no checkpoint verifies; starting from scratch", cfg.name)
    accelerator.wait_for_everyone()
    if r.main:
        for bad, _ in failed:
            shutil.rmtree(bad, ignore_errors=True)
    if r.main and r.resumed_from is None:
        shutil.rmtree(r.out_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    if r.main:
        from dvclive import Live

        r.live = Live(str(cfg.live_root / cfg.name), resume=r.resumed_from is not None, save_dvc_exp=False,
                      dvcyaml=None)
        r.live.step = r.step


def warm_up_ta(r: RunState) -> list[dict[str, float]]:
    """FDIC phase 1: the TA learns alone against the frozen student's per-path losses, for the
    warm-up steps a resume has not done yet. Its questions come from a separate stream, so the
    student's stream is the same for every method. Returns the warm-up's curve."""
    cfg, fdic = r.cfg, r.fdic
    curve: list[dict[str, float]] = []
    if fdic is None:
        return curve
    r.model.eval()
    for w in range(r.warm_done, cfg.ta.warmup_steps):
        batch = r.batch_at(cfg.seed + 7919, w)
        with torch.no_grad():
            ce, _ = forward_losses(r.model, batch, r.device, "off")
        target = observe(r.accelerator, fdic, batch, ce, 0, cfg)  # clock 0: the student has not stepped
        meta = fdic.warmup_step(r.average)
        check_finite(r.accelerator, {"TA meta loss": meta}, -cfg.ta.warmup_steps + w, r.ckpt_root, cfg.name)
        with torch.no_grad():
            rho = L.mean_question_spearman(fdic.scores(batch.path_ids, batch.mask, train=False), -target,
                                           batch.mask.to(r.device))
        curve.append(reduce_record(r.accelerator, {"meta_loss": [nan_if_none(meta)], "spearman": [rho]}))
        r.warm_done = w + 1
        say(r.accelerator, "%s: TA warm-up %d/%d: table meta loss %.4f, batch Spearman(s, -L̄) %.3f", cfg.name,
            r.warm_done, cfg.ta.warmup_steps, curve[-1]["meta_loss"], curve[-1]["spearman"])
    return curve


def train(r: RunState) -> Trained:
    """The joint phase: the student trains up to ``max_steps``; the TA follows L̄ at a smaller LR,
    every ``ta.accum_steps`` micro-batches. Logs every step, checkpoints every ``checkpoint_every``."""
    from tqdm import tqdm

    cfg, accelerator, model = r.cfg, r.accelerator, r.model
    model.train()
    history: list[dict[str, float]] = []
    tokens = 0
    t_train = time.time()
    bar = tqdm(total=cfg.max_steps, initial=r.step, desc=f"distill {cfg.name}", unit="step", disable=not r.main)
    while r.step < cfg.max_steps:
        acc: dict[str, list[float]] = defaultdict(list)
        for a in range(cfg.grad_accum):
            micro = r.step * cfg.grad_accum + a
            batch = r.batch_at(cfg.seed, micro)
            tokens += batch.tokens
            with accelerator.accumulate(model):
                loss, stats = micro_losses(cfg, model, batch, r.device, r.fdic, accelerator, r.step)
                check_finite(accelerator, {"loss": loss}, r.step, r.ckpt_root, cfg.name)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # all parameters: FSDP's own clipping only engages for the model's full parameter list
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                    check_finite(accelerator, {"gradient norm": norm}, r.step, r.ckpt_root, cfg.name)
                r.optimizer.step()
                r.optimizer.zero_grad()
            if r.fdic is not None:
                # Steps where the micro-batch index says, so a resumed run steps where this one would.
                r.fdic.joint_micro(micro, r.average)
            for k, v in stats.items():
                acc[k].extend(v)
        r.scheduler.step()
        r.step += 1
        rec = reduce_record(accelerator, acc)
        rec["lr"] = r.scheduler.get_last_lr()[0]
        if "oracle_alpha_entropy_share" in rec:
            rec["ta_fit"] = nan_if_none(ta_fit(rec["alpha_entropy_share"], rec["oracle_alpha_entropy_share"]))
        history.append(rec)
        bar.update(1)
        if r.live is not None:
            for k, v in rec.items():
                if not math.isnan(v):
                    r.live.log_metric(f"train/{k}", v)
            r.live.next_step()
            if r.step % cfg.log_every == 0 or r.step == cfg.max_steps:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ce=f"{rec['ce']:.4f}")
        if cfg.checkpoint_every and r.step % cfg.checkpoint_every == 0 and r.step < cfg.max_steps:
            path = save_checkpoint(accelerator, r.ckpt_root, r.step, r.trainer_state())
            say(accelerator, "%s: checkpoint %s", cfg.name, path)
    bar.close()
    seconds = time.time() - t_train
    return Trained(history, int(accelerator.reduce(torch.tensor(tokens, device=r.device), "sum")), seconds)


def write_run_outputs(r: RunState, warm_curve: list[dict[str, float]], trained: Trained) -> None:
    """adapter/, merged/ and ta.pt (save_outputs), then on the main process config.json, the alpha
    plot and metrics.json, last: it marks the run complete. Checkpoints go unless kept."""
    cfg, history = r.cfg, trained.history
    save_outputs(cfg, r.accelerator, r.model, r.tokenizer, r.fdic, r.out_dir)
    if not r.main:
        return
    tail = history[-max(1, len(history) // 4):]

    def final(key: str) -> float | None:
        vals = [h[key] for h in tail if key in h and not math.isnan(h[key])]
        return sum(vals) / len(vals) if vals else None

    counts, train_s = r.counts, trained.seconds
    metrics = {
        "method": cfg.method, "run_name": cfg.name, "steps": r.step, "resumed_from_step": r.resumed_from,
        "processes": r.accelerator.num_processes, "questions": len(r.units), "paths": counts["paths"],
        "data_counts": counts, "first_loss": history[0]["loss"] if history else None,
        **{f"final_{k}": final(k) for k in ("loss", "ce", "ce_mean", "jsd", "meta_loss", "spearman",
                                              "mean_selected", "alpha_entropy")},
        **weighting_summary(history),
        **({"injected_alpha_by_question": injected_alpha_by_question(cfg, r.units, r.fdic, r.device)}
           if cfg.method == "mind" and counts.get("paths_injected") else {}),
        "ta_warmup": warm_curve, "train_seconds": round(train_s, 2),
        "total_seconds": round(time.time() - r.started, 2), "train_tokens": trained.tokens,
        "tokens_per_second": round(trained.tokens / train_s, 1) if train_s > 0 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "history": history,
    }
    atomic_write_json(r.out_dir / "config.json", {"stage": "distill", **to_dict(cfg)})
    if "alpha_share" in metrics:
        plot_alpha_share(history, r.out_dir / "alpha_share.png")
    if not cfg.keep_checkpoints:
        shutil.rmtree(r.ckpt_root, ignore_errors=True)
    atomic_write_json(r.out_dir / "metrics.json", metrics)
    r.live.end()
    say(r.accelerator, "%s: %d steps in %.1fs (%.0f target tokens/s), loss %.4f -> %.4f; wrote %s", cfg.name, r.step,
        train_s, metrics["tokens_per_second"] or 0.0, metrics["first_loss"] or float("nan"),
        metrics["final_loss"] or float("nan"), r.out_dir)


def nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else x


def share_names(history: list[dict[str, float]]) -> list[str]:
    """The perspectives whose K·α the run logged (``alpha_share/<name>``), sorted."""
    return sorted({k.split("/", 1)[1] for h in history for k in h if k.startswith("alpha_share/")})


def weighting_summary(history: list[dict[str, float]]) -> dict[str, Any]:
    """What the weights did over the whole joint phase (mind and its ablations): the mean of each
    per-step figure, ``ta_fit`` from those means, and each perspective's mean K·α."""

    def mean(key: str) -> float | None:
        vals = [h[key] for h in history if key in h and not math.isnan(h[key])]
        return sum(vals) / len(vals) if vals else None

    if not any("alpha_entropy_share" in h for h in history):
        return {}
    out: dict[str, Any] = {k: mean(k) for k in ("alpha_entropy_share", "oracle_alpha_entropy_share", "ta_score_slope",
                                                  "selected_share", "alpha_length_corr")}
    if any("injected_alpha_share" in h for h in history):
        out.update({k: mean(k) for k in ("injected_alpha_share", "injected_deselected_share")})
    out["ta_fit"] = ta_fit(out["alpha_entropy_share"], out["oracle_alpha_entropy_share"])
    out["alpha_share"] = {n: mean(f"alpha_share/{n}") for n in share_names(history)}
    return out


def injected_alpha_by_question(cfg: DistillConfig, units: list[QuestionUnit], fdic: Fdic | None,
                               device: torch.device) -> dict[str, float]:
    """K·α of each injected path under the final scorer (1 = a uniform share, 0 = ignored), per question.

    The TA scores from the encoder's embeddings alone, so this needs no student forward pass."""
    hit = [u for u in units if any(p.injected for p in u.paths)]
    if not hit:
        return {}
    batch = collate(hit, 0, cfg.max_paths)
    mask = batch.mask.to(device)
    with torch.no_grad():
        s = (fdic.scores(batch.path_ids, batch.mask, train=False) if fdic is not None
             else L.length_scores(batch.path_tokens.to(device), mask))
        alpha = L.path_weights(s, L.select_paths(s, mask, cfg.beta, cfg.tau_student), cfg.tau_student)
    share = (alpha * mask.sum(dim=-1, keepdim=True)).cpu()
    return {u.question_id: float(share[q][batch.injected[q]].mean()) for q, u in enumerate(hit)}


def plot_alpha_share(history: list[dict[str, float]], path: Path) -> None:
    """Each perspective's K·α over the steps (1 = a uniform share), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in share_names(history):
        pts = [(i + 1, h[f"alpha_share/{n}"]) for i, h in enumerate(history)
               if not math.isnan(h.get(f"alpha_share/{n}", float("nan")))]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=n)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("student step")
    ax.set_ylabel("K·α (1 = uniform share)")
    ax.set_title("each perspective's weight over the steps")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_outputs(cfg: DistillConfig, accelerator: Any, model: Any, tokenizer: Any, fdic: Fdic | None,
                 out_dir: Path) -> None:
    """adapter/ (LoRA), merged/ (always) and ta.pt (mind), each written under a temp name, then renamed."""
    from transformers import AutoModelForCausalLM

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # every process: gathers FSDP/DeepSpeed shards
    if not accelerator.is_main_process:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # rewritten last by run()
    unwrapped = accelerator.unwrap_model(model)
    save_dtype = torch_dtype(cfg.save_dtype)

    def place(tmp: Path, final: Path) -> None:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    merged_tmp = out_dir / ".merged.tmp"
    shutil.rmtree(merged_tmp, ignore_errors=True)
    if cfg.finetune == "lora":
        from peft import PeftModel

        adapter_tmp = out_dir / ".adapter.tmp"
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        unwrapped.save_pretrained(str(adapter_tmp), state_dict=state)
        # Merge into a fresh float32 copy of the base weights, whatever sharding trained the adapter.
        base = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter_tmp)).merge_and_unload()
        merged.to(save_dtype).save_pretrained(str(merged_tmp))
        place(adapter_tmp, out_dir / "adapter")
    else:
        unwrapped.save_pretrained(str(merged_tmp), state_dict={
            k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state.items()})
        # config.json must state the saved dtype (vLLM and dtype="auto" read it), not the training one.
        config_path = merged_tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = cfg.save_dtype
        atomic_write_json(config_path, config)
    tokenizer.save_pretrained(str(merged_tmp))  # includes the chat template
    generation_config = Path(cfg.student) / "generation_config.json"
    if generation_config.exists():
        shutil.copy(generation_config, merged_tmp / "generation_config.json")
    place(merged_tmp, out_dir / "merged")
    if fdic is not None:
        tmp = out_dir / ".ta.pt.tmp"
        torch.save({"state_dict": fdic.ta.state_dict(), "ema": fdic.ema.cpu(), "seen_at": fdic.seen_at.cpu(),
                    "encoder": cfg.encoder, "config": {
            "embed_dim": fdic.emb.shape[1], "hidden_dim": cfg.ta.hidden, "num_heads": cfg.ta.heads,
            "synergy": cfg.ta.synergy, "score_heads": cfg.ta.score_heads, "dropout": cfg.ta.dropout}}, tmp)
        os.replace(tmp, out_dir / "ta.pt")
