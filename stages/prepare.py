"""Normalise datasets into question shards: the training pool and one folder per eval set.

    mind prepare                      # params.yaml's `prepare` section
    mind prepare --limit 50 --on-bad-row skip

Writes ``data/prepared/train/`` (the teacher's question pool; absent when ``train`` is
empty, so eval sets can be prepared alone) and ``data/prepared/<name>/`` for every eval
dataset, each a shard folder with the question columns of ``pipeline.shards.QUESTION_SCHEMA``,
plus ``data/prepared/stats.json`` (rows read, kept, bad, duplicate, contaminated, per split).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import questions as Q
from pipeline.config import check, to_dict
from pipeline.shards import QUESTION_SCHEMA, STATS, atomic_write_json, check_name, replacing_all, write_shards
from stages.cli import field

log = logging.getLogger("mind.prepare")

Format = Literal["embedded", "gsm8k", "svamp", "csqa", "strategyqa", "math500", "gpqa", "generic", "hub"]


@dataclass
class DatasetSpec:
    """One dataset. ``path`` may start with ``{shared}``: the reference data folder."""

    name: str
    format: Format
    path: str = ""
    answer_type: Q.AnswerType | None = None  # required for generic and hub; fixed by the others
    fields: dict[str, str] | None = None  # generic/hub: question, answer, [choices], [id]
    split: str = "train"  # embedded: train|eval; hub: the hub split
    subset: str | None = None  # hub config name
    limit: int | None = None  # per-dataset cap, after the shuffle

    def __post_init__(self) -> None:
        check_name(self.name, "dataset name")  # an eval set's name is its output folder
        if self.fields is not None:
            unknown = sorted(set(self.fields) - set(Q.FIELD_KEYS))
            check(not unknown, f"{self.name}: unknown key(s) {unknown} in fields; the keys are {list(Q.FIELD_KEYS)}")
        if self.format in ("generic", "hub"):
            check(self.answer_type is not None, f"{self.name}: format {self.format} needs an explicit answer_type")
            check(bool(self.fields) and {"question", "answer"} <= set(self.fields or {}),
                  f"{self.name}: format {self.format} needs fields with at least question and answer")
        elif self.format != "embedded":
            check(bool(self.path), f"{self.name}: format {self.format} needs a path")
        if self.format == "embedded":
            check(self.split in ("train", "eval"), f"{self.name}: embedded split must be train or eval")
        check(self.limit is None or self.limit > 0, f"{self.name}: limit must be positive")


FIXED_TYPES: dict[str, Q.AnswerType] = {
    "embedded": "number", "gsm8k": "number", "svamp": "number", "csqa": "choice",
    "strategyqa": "yesno", "math500": "math", "gpqa": "choice",
}


@dataclass
class PrepareConfig:
    train: list[DatasetSpec] = field(help="datasets pooled into the training split", factory=list)
    eval: list[DatasetSpec] = field(help="eval datasets, one output folder each", factory=list)
    out_dir: Path = field(Path("data/prepared"), help="output root")
    shared_dir: str = field("../shared/data", help="reference data folder for '{shared}' paths (a DVC dep of prepare)")
    on_bad_row: Literal["error", "skip"] = field("error", help="stop at the first bad row, or skip and count it")
    shuffle: bool = field(True, help="seeded shuffle of each dataset before its limit")
    seed: int = field(0, help="shuffle seed")
    limit: int | None = field(None, help="cap on questions per split (after per-dataset limits)")
    decontaminate: bool = field(True, help="drop train questions that also appear in an eval split")
    embedded_train_size: int = field(1200, help="embedded sample: train questions")
    embedded_eval_size: int = field(300, help="embedded sample: held-out eval questions")
    embedded_seed: int = field(1234, help="embedded sample: generator seed")
    shard_size: int = field(5000, help="rows per shard")

    def __post_init__(self) -> None:
        # eval sets alone are a valid run: scoring a new benchmark needs no training pool
        check(bool(self.train or self.eval), "prepare: at least one dataset (train or eval) is needed")
        names = [d.name for d in self.eval]
        check(len(names) == len(set(names)), f"prepare.eval: duplicate names {names}")
        check("train" not in names, "prepare.eval: 'train' is reserved for the training split")
        check(self.limit is None or self.limit > 0, "prepare.limit must be positive")
        check(self.shard_size > 0, "prepare.shard_size must be positive")


def source_path(spec: DatasetSpec, cfg: PrepareConfig) -> Path:
    """The dataset's file, with ``{shared}`` resolved (a Hub id for format hub).

    The shared folder comes from the params only, never the environment: dvc.yaml depends on
    ``${prepare.shared_dir}``, and DVC could not see a folder chosen elsewhere."""
    return Path(spec.path.replace("{shared}", cfg.shared_dir)) if spec.path else Path()


def _read(spec: DatasetSpec, cfg: PrepareConfig) -> Iterator[Q.RawQuestion | Q.BadRow]:
    path = source_path(spec, cfg)
    if spec.format not in ("embedded", "hub") and not path.exists():
        raise FileNotFoundError(f"{spec.name}: {path} not found")
    if spec.format == "embedded":
        return Q.load_embedded(spec.split, cfg.embedded_train_size, cfg.embedded_eval_size, cfg.embedded_seed)  # type: ignore[arg-type]
    if spec.format == "hub":
        return Q.load_hub(spec.path, spec.split, spec.subset, spec.fields or {})
    if spec.format == "generic":
        return Q.load_generic(path, spec.fields or {})
    loader = {"gsm8k": Q.load_gsm8k, "svamp": Q.load_svamp, "csqa": Q.load_csqa,
              "strategyqa": Q.load_strategyqa, "math500": Q.load_math500, "gpqa": Q.load_gpqa}[spec.format]
    return loader(path)


def load_dataset_rows(spec: DatasetSpec, cfg: PrepareConfig, counts: Counter[str]) -> list[dict[str, Any]]:
    """Read, normalise and de-duplicate one dataset; bad rows stop the run or are counted."""
    answer_type = spec.answer_type or FIXED_TYPES[spec.format]
    task = spec.name
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    ids: set[str] = set()
    read = 0
    for rec in _read(spec, cfg):
        read += 1
        counts["read"] += 1
        row = rec if isinstance(rec, Q.BadRow) else Q.normalise(rec, task, answer_type, spec.format)
        if isinstance(row, Q.BadRow):
            if cfg.on_bad_row == "error":
                raise Q.DataError(f"{row} (set on_bad_row: skip to skip and count such rows)")
            counts["bad"] += 1
            counts[f"bad:{row.field}"] += 1
            log.warning("skipping bad row %s", row)
            continue
        key = Q.question_key(row["question"], row["choices"])
        if key in seen:
            counts["duplicate"] += 1
            continue
        if row["id"] in ids:
            raise Q.DataError(f"{spec.name}: id {row['id']} is used by two different questions")
        seen.add(key)
        ids.add(row["id"])
        rows.append(row)
    if read == 0:  # an empty file would otherwise become a 0-row split that only a later stage refuses
        where = source_path(spec, cfg) if spec.format != "embedded" else f"embedded[{spec.split}]"
        raise Q.DataError(f"{spec.name}: {where} holds no records")
    if cfg.shuffle:
        random.Random(f"{cfg.seed}:{spec.name}").shuffle(rows)
    if spec.limit is not None:
        counts["over_limit"] += max(0, len(rows) - spec.limit)
        rows = rows[: spec.limit]
    return rows


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Normalise the configured datasets into question shards (train pool + eval splits)."""
    config = to_dict(cfg)
    stats: dict[str, Any] = {}
    eval_rows: dict[str, list[dict[str, Any]]] = {}
    for spec in cfg.eval:
        counts: Counter[str] = Counter()
        eval_rows[spec.name] = load_dataset_rows(spec, cfg, counts)
        stats[spec.name] = dict(counts)

    counts = Counter()
    train: list[dict[str, Any]] = []
    train_keys: set[str] = set()
    owner: dict[str, str] = {}  # id -> the training dataset it came from
    for spec in cfg.train:
        for row in load_dataset_rows(spec, cfg, counts):
            key = Q.question_key(row["question"], row["choices"])
            if key in train_keys:  # the same question in two training datasets
                counts["duplicate"] += 1
                continue
            # Later stages key the pool by id: two questions under one id would be judged
            # against each other's gold.
            if row["id"] in owner:
                raise Q.DataError(f"prepare.train: id {row['id']} is used by two different questions, in datasets "
                                  f"{owner[row['id']]} and {spec.name} (ids must be unique across the training pool; "
                                  "give the datasets different names)")
            owner[row["id"]] = spec.name
            train_keys.add(key)
            train.append(row)
    if cfg.decontaminate:
        eval_keys = {Q.question_key(r["question"], r["choices"]) for rows in eval_rows.values() for r in rows}
        before = len(train)
        train = [r for r in train if Q.question_key(r["question"], r["choices"]) not in eval_keys]
        counts["contaminated"] = before - len(train)
    if cfg.train:  # eval sets alone write no train split, rather than an empty one generate would refuse
        stats["train"] = dict(counts)
    splits = {"train": train, **eval_rows} if cfg.train else eval_rows
    # Every split and stats.json are written under temporary names first and take their places
    # together at the end: a failure while writing leaves the previous output whole.
    with replacing_all([cfg.out_dir / name for name in splits] + [cfg.out_dir / STATS]) as tmps:
        for (name, rows), tmp in zip(splits.items(), tmps):
            if cfg.limit is not None and len(rows) > cfg.limit:
                stats[name]["over_limit"] = stats[name].get("over_limit", 0) + len(rows) - cfg.limit
                rows = rows[: cfg.limit]
            stats[name]["kept"] = len(rows)
            write_shards(tmp, rows, QUESTION_SCHEMA, {"stage": "prepare", "split": name, **config},
                         shard_size=cfg.shard_size)
            s = stats[name]
            log.info("%s: read %d, kept %d, bad %d, duplicate %d, over limit %d%s -> %s",
                     name, s.get("read", 0), s["kept"], s.get("bad", 0), s.get("duplicate", 0),
                     s.get("over_limit", 0), f", contaminated {s['contaminated']}" if "contaminated" in s else "",
                     cfg.out_dir / name)
        atomic_write_json(tmps[-1], {"splits": stats, "config": config})
    return stats
