"""Question loaders and normalisation: every benchmark format becomes the question columns.

Columns (DESIGN.md): ``id``, ``task``, ``question``, ``answer`` (canonical gold string),
``answer_type`` (number | choice | yesno | math), ``choices`` (list of option texts, may be
empty), ``source``.

Each loader yields ``RawQuestion`` records or ``BadRow`` errors (file:line, field, reason);
``normalise`` turns a record into a row with a canonical gold. The caller decides whether
a bad row stops the run or is skipped and counted: nothing is dropped silently here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from pipeline.config import kind_of
from pipeline.sample import embedded_splits

AnswerType = Literal["number", "choice", "yesno", "math"]
LETTERS = "ABCDEFGHIJ"

QUESTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_type", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("source", pa.string()),
    ]
)


@dataclass(frozen=True)
class BadRow:
    where: str  # "file:line" or "file:row N"
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.reason}"


@dataclass
class RawQuestion:
    where: str
    question: Any
    answer: Any
    choices: list[str] = field(default_factory=list)
    raw_id: str | None = None


class DataError(ValueError):
    """A bad input row with ``on_bad_row: error``; the message names file, row and field."""


# ---------------------------------------------------------------- canonical golds


def canonical_number(value: Any) -> str:
    """'1,250.00' -> '1250', '5.0' -> '5', '-3' -> '-3', '0.50' -> '0.5'. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    text = str(value).strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def canonical_answer(value: Any, answer_type: AnswerType, num_choices: int = 0) -> str:
    """The canonical gold string for ``answer_type``; raises ValueError with the reason."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("empty answer")
    if answer_type == "number":
        return canonical_number(value)
    if answer_type == "choice":
        letter = str(value).strip().strip("()").upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise ValueError(f"not a choice letter: {value!r}")
        if num_choices and LETTERS.index(letter) >= num_choices:
            raise ValueError(f"letter {letter} but only {num_choices} choices")
        return letter
    if answer_type == "yesno":
        if isinstance(value, bool):
            return "yes" if value else "no"
        text = str(value).strip().lower().rstrip(".")
        if text in ("yes", "true"):
            return "yes"
        if text in ("no", "false"):
            return "no"
        raise ValueError(f"not yes/no: {value!r}")
    if answer_type == "math":
        return str(value).strip()
    raise ValueError(f"unknown answer_type {answer_type!r}")


def stable_id(task: str, raw_id: str | None, question: str, choices: list[str]) -> str:
    if raw_id:
        return f"{task}-{raw_id}"
    digest = hashlib.sha1((question + "\x1f" + "\x1f".join(choices)).encode("utf-8")).hexdigest()[:12]
    return f"{task}-{digest}"


def question_key(question: str, choices: list[str]) -> str:
    """Exact-duplicate key: case- and whitespace-insensitive question plus options."""
    norm = " ".join(question.split()).casefold()
    return norm + "\x1f" + "\x1f".join(" ".join(c.split()).casefold() for c in choices)


def normalise(rec: RawQuestion, task: str, answer_type: AnswerType, source: str) -> dict[str, Any] | BadRow:
    if not isinstance(rec.question, str):
        return BadRow(rec.where, "question", f"expected a string, got {kind_of(rec.question)}: {rec.question!r}")
    if not rec.question.strip():
        return BadRow(rec.where, "question", "empty question")
    question = rec.question.strip()
    choices = [str(c).strip() for c in rec.choices]
    if answer_type == "choice" and len(choices) < 2:
        return BadRow(rec.where, "choices", f"a choice question needs at least 2 options, got {len(choices)}")
    try:
        answer = canonical_answer(rec.answer, answer_type, len(choices))
    except ValueError as e:
        return BadRow(rec.where, "answer", str(e))
    return {
        "id": stable_id(task, rec.raw_id, question, choices),
        "task": task,
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "source": source,
    }


def format_question(row: dict[str, Any]) -> str:
    """The question text a model sees: the stem, then lettered options for choice tasks."""
    if not row["choices"]:
        return row["question"]
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(row["choices"]))
    return f"{row['question']}\nAnswer choices:\n{options}"


# ---------------------------------------------------------------- file readers


def _dig(obj: Any, path: str) -> Any:
    """``a.b.c`` lookup in nested records; an integer part indexes a list (``answers.0``).

    KeyError carries the reason when a part is missing."""
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit():
            if int(part) >= len(obj):
                raise KeyError(f"missing field (no item {part} in a list of {len(obj)})")
            obj = obj[int(part)]
        elif isinstance(obj, (dict, list)):
            raise KeyError("missing field")
        else:
            raise KeyError(f"missing field (looked for {part!r} inside {kind_of(obj)}: {obj!r})")
    return obj


# Files are decoded with errors="surrogateescape": a byte that is not UTF-8 becomes one lone
# surrogate (U+DC80..U+DCFF) instead of an exception that names neither file nor line, so the
# record that holds it can be reported (and skipped) like any other bad row.
_UNDECODED = re.compile("[\udc80-\udcff]")


def _not_utf8(m: re.Match[str], column: bool = False) -> str:
    """The reason for an undecoded byte found by ``_UNDECODED`` (with its column in a line)."""
    where = f" at column {m.start() + 1}" if column else ""
    return f"not valid UTF-8 (byte 0x{ord(m.group()) - 0xDC00:02x}{where})"


def _undecoded_field(obj: Any, prefix: str = "") -> tuple[str, re.Match[str]] | None:
    """The dotted path of the first key or string in a record that holds an undecoded byte."""
    if isinstance(obj, str):
        m = _UNDECODED.search(obj)
        return (prefix, m) if m else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(key, str) and (m := _UNDECODED.search(key)):
            return path, m
        found = _undecoded_field(value, path)
        if found is not None:
            return found
    return None


def _undecoded_row(where: str, obj: dict[str, Any]) -> BadRow | None:
    found = _undecoded_field(obj)
    return None if found is None else BadRow(where, found[0], _not_utf8(found[1]))


def _json_reason(e: json.JSONDecodeError) -> str:
    # json's messages end in "at" when they expect a position ("Unterminated string starting at").
    return f"unparseable JSON: {e.msg.removesuffix(' at')} at column {e.colno}"


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for i, line in enumerate(f, start=1):
            where = f"{path}:{i}"
            if not line.strip():
                continue
            undecoded = _UNDECODED.search(line)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRow(where, "<line>", _not_utf8(undecoded, True) if undecoded else _json_reason(e))
                continue
            if undecoded:
                found = _undecoded_field(obj)
                yield where, BadRow(where, found[0] if found else "<line>", _not_utf8(undecoded, True))
                continue
            if not isinstance(obj, dict):
                yield where, BadRow(where, "<line>", "expected a JSON object")
                continue
            yield where, obj


def _json_list(path: Path, key: str | None = None) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    undecoded = _UNDECODED.search(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if undecoded:
            line = text.count("\n", 0, undecoded.start()) + 1
            raise DataError(f"{path}:{line}: <file>: {_not_utf8(undecoded)}") from None
        raise DataError(f"{path}:{e.lineno}: <file>: {_json_reason(e)}") from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: <file>: expected a JSON object with a '{key}' list")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: <file>: expected a JSON list of records")
    for i, obj in enumerate(data):
        where = f"{path}:record {i}"
        if not isinstance(obj, dict):
            yield where, BadRow(where, "<record>", "expected a JSON object")
        else:
            bad = _undecoded_row(where, obj) if undecoded else None  # walk records only if the file has a bad byte
            yield where, bad or obj


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """Generic reader by file suffix: .jsonl, .json (a list), .csv, .parquet."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path)
    elif suffix == ".json":
        yield from _json_list(path)
    elif suffix == ".csv":
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            for i, obj in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                where = f"{path}:{i}"
                yield where, _undecoded_row(where, obj) or dict(obj)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, obj in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", obj
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")


def _field(where: str, obj: dict[str, Any], path: str) -> Any:
    try:
        return _dig(obj, path)
    except KeyError as e:
        raise _Missing(BadRow(where, path, e.args[0])) from None


class _Missing(Exception):
    def __init__(self, bad: BadRow) -> None:
        self.bad = bad


def _guard(where: str, build: Any) -> RawQuestion | BadRow:
    try:
        return build()
    except _Missing as m:
        return m.bad


# ---------------------------------------------------------------- loaders, one per format


def load_gsm8k(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _jsonl(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion | BadRow:
            answer = str(_field(where, obj, "answer"))
            if "####" not in answer:
                return BadRow(where, "answer", "no '#### <gold>' marker")
            return RawQuestion(where, _field(where, obj, "question"), answer.split("####")[-1].strip())

        yield _guard(where, build)


def load_svamp(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _json_list(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion:
            body = str(_field(where, obj, "Body")).strip()
            question = str(_field(where, obj, "Question")).strip()
            # SVAMP bodies usually end without a full stop before the question.
            text = f"{body} {question}" if body.endswith((".", "?", "!")) else f"{body}. {question}"
            return RawQuestion(where, text, _field(where, obj, "Answer"), raw_id=str(obj.get("ID") or "") or None)

        yield _guard(where, build)


def load_csqa(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _jsonl(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion | BadRow:
            choices = _field(where, obj, "question.choices")
            if not isinstance(choices, list):
                return BadRow(where, "question.choices", "expected a list")
            ordered = sorted(choices, key=lambda c: str(c.get("label", "")))
            labels = [str(c.get("label", "")) for c in ordered]
            if labels != list(LETTERS[: len(labels)]):
                return BadRow(where, "question.choices", f"labels {labels} are not A, B, C, ...")
            return RawQuestion(
                where,
                _field(where, obj, "question.stem"),
                _field(where, obj, "answerKey"),
                [str(c.get("text", "")) for c in ordered],
                raw_id=str(obj.get("id") or "") or None,
            )

        yield _guard(where, build)


def load_strategyqa(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _json_list(path, key="examples"):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion | BadRow:
            scores = _field(where, obj, "target_scores")
            if not isinstance(scores, dict) or set(scores) != {"Yes", "No"}:
                return BadRow(where, "target_scores", f"expected {{Yes, No}}, got {scores!r}")
            if scores["Yes"] == scores["No"]:
                return BadRow(where, "target_scores", "Yes and No score the same")
            gold = "yes" if scores["Yes"] > scores["No"] else "no"
            return RawQuestion(where, _field(where, obj, "input"), gold)

        yield _guard(where, build)


def load_math500(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _records(path):
        if isinstance(obj, BadRow):
            yield obj
            continue
        yield _guard(
            where,
            lambda: RawQuestion(
                where,
                _field(where, obj, "problem"),
                _field(where, obj, "answer"),
                raw_id=str(obj.get("unique_id") or "").replace("/", "_").removesuffix(".json") or None,
            ),
        )


def load_gpqa(path: Path, seed: int = 0) -> Iterator[RawQuestion | BadRow]:
    """GPQA CSV: the correct answer and three distractors, shuffled per question.

    The option order is seeded by the question text, so it is the same on every run and
    does not depend on row order.
    """
    for where, obj in _records(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion | BadRow:
            question = str(_field(where, obj, "Question")).strip()
            correct = str(_field(where, obj, "Correct Answer")).strip()
            wrong = [str(_field(where, obj, f"Incorrect Answer {k}")).strip() for k in (1, 2, 3)]
            options = [correct, *wrong]
            if any(not o for o in options):
                return BadRow(where, "Correct Answer/Incorrect Answer", "empty option")
            digest = hashlib.sha256(f"{seed}:{question}".encode()).hexdigest()
            random.Random(int(digest[:16], 16)).shuffle(options)
            return RawQuestion(where, question, LETTERS[options.index(correct)], options,
                               raw_id=str(obj.get("Record ID") or "") or None)

        yield _guard(where, build)


def _mapped(where: str, obj: dict[str, Any], fields: dict[str, str]) -> RawQuestion | BadRow:
    def build() -> RawQuestion | BadRow:
        choices: list[str] = []
        if "choices" in fields:
            raw = _field(where, obj, fields["choices"])
            if isinstance(raw, str):
                raw = [c for c in raw.split("|")]  # CSV files carry options as "a|b|c"
            if not isinstance(raw, list):
                return BadRow(where, fields["choices"], "expected a list of options")
            choices = [str(c) for c in raw]
        raw_id = str(_field(where, obj, fields["id"])) if "id" in fields else None
        return RawQuestion(where, _field(where, obj, fields["question"]), _field(where, obj, fields["answer"]),
                           choices, raw_id)

    return _guard(where, build)


def load_generic(path: Path, fields: dict[str, str]) -> Iterator[RawQuestion | BadRow]:
    """JSON/JSONL/CSV/Parquet with a field map: question, answer, optional choices and id.

    Each field maps to a path into the record: a key (``question``), or dotted parts that
    reach into nested records, where an integer part indexes a list: ``meta.answer``,
    ``answers.0`` (the first item of the ``answers`` list)."""
    for where, obj in _records(path):
        yield obj if isinstance(obj, BadRow) else _mapped(where, obj, fields)


def load_hub(hub_id: str, split: str, subset: str | None, fields: dict[str, str]) -> Iterator[RawQuestion | BadRow]:
    """A Hub dataset through ``datasets.load_dataset`` (needs a network, or a warm HF cache)."""
    import datasets

    ds = datasets.load_dataset(hub_id, subset, split=split)
    for i, obj in enumerate(ds):
        yield _mapped(f"{hub_id}[{split}]:row {i}", obj, fields)


def load_embedded(split: Literal["train", "eval"], train_size: int, eval_size: int, seed: int) -> Iterator[RawQuestion]:
    for i, p in enumerate(embedded_splits(train_size, eval_size, seed)[split]):
        yield RawQuestion(f"embedded[{split}]:{i}", p.question, p.answer, raw_id=f"{split}-{i:05d}")
