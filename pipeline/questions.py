"""Question loaders and normalisation: every benchmark format becomes the question columns.

Columns (``pipeline.shards.QUESTION_SCHEMA``): ``id``, ``task``, ``question``, ``answer``
(canonical gold string), ``answer_type`` (number | choice | yesno | math), ``choices`` (list
of option texts, may be empty), ``source``.

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
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from pipeline.answers import LETTERS, AnswerType, format_number
from pipeline.config import InputError, described, kind_of, shown
from pipeline.sample import embedded_splits


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


class DataError(InputError):
    """A bad input row with ``on_bad_row: error``; the message names file, row and field."""


# ---------------------------------------------------------------- canonical golds


# The rule for a gold number, read as text: an optional sign, an optional "$", then digits,
# either plain or with commas between groups of exactly three ("1,250"; "1,5" and "12,34,5" are
# not numbers), then an optional decimal fraction and an optional final full stop. The value is
# exact (Decimal, never a float). Exponents are not part of the rule, and a number with more
# than MAX_DIGITS digits before or after the point is refused: a gold such as 1e999999 must not
# cost seconds to write out.
MAX_DIGITS = 40
_GOLD_NUMBER_RE = re.compile(r"(?P<sign>[+-]?)\$?(?P<int>\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?P<frac>(?:\.\d+)?)\.?")


def _gold_decimal(value: Any) -> Decimal:
    """The exact value of a gold number (text, int, Decimal from JSON, float from Parquet)."""
    if isinstance(value, str):
        text = value.strip()
        m = _GOLD_NUMBER_RE.fullmatch(text) if len(text) <= 4 * MAX_DIGITS else None
        if m is None:
            raise ValueError(f"not a number: {shown(value)}")
        digits = m["int"].replace(",", "")
        if len(digits) > MAX_DIGITS or len(m["frac"]) - 1 > MAX_DIGITS:
            raise ValueError(f"more than {MAX_DIGITS} digits: {shown(value)}")
        return Decimal(f"{m['sign']}{digits or '0'}{m['frac']}")
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ValueError(f"expected a number, got {described(value)}")
    if isinstance(value, int):
        if value.bit_length() > 3.33 * MAX_DIGITS:  # ~ MAX_DIGITS decimal digits, without writing them out
            raise ValueError(f"more than {MAX_DIGITS} digits: {shown(value)}")
        return Decimal(value)
    d = Decimal(repr(value)) if isinstance(value, float) else value  # a float's shortest exact text
    if not d.is_finite():
        raise ValueError(f"not a finite number: {shown(value)}")
    if d and (d.adjusted() >= MAX_DIGITS or d.as_tuple().exponent < -MAX_DIGITS):
        raise ValueError(f"more than {MAX_DIGITS} digits: {shown(value)}")
    return d


def canonical_answer(value: Any, answer_type: AnswerType, num_choices: int = 0) -> str:
    """The canonical gold string for ``answer_type``; raises ValueError with the reason."""
    if value is None:
        raise ValueError("expected an answer, got null")
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty answer")
    if answer_type == "number":
        return format_number(Fraction(_gold_decimal(value)))  # '1,250.00' -> '1250', '0.50' -> '0.5'
    if answer_type == "choice":
        if not isinstance(value, str):
            raise ValueError(f"expected a choice letter, got {described(value)}")
        letter = value.strip().strip("()").upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise ValueError(f"not a choice letter: {shown(value)}")
        if num_choices and LETTERS.index(letter) >= num_choices:
            raise ValueError(f"letter {letter} but only {num_choices} choices")
        return letter
    if answer_type == "yesno":
        if isinstance(value, bool):
            return "yes" if value else "no"
        if not isinstance(value, str):
            raise ValueError(f"expected yes/no, got {described(value)}")
        text = value.strip().lower().rstrip(".")
        if text in ("yes", "true"):
            return "yes"
        if text in ("no", "false"):
            return "no"
        raise ValueError(f"not yes/no: {shown(value)}")
    if answer_type == "math":
        if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
            return str(value)  # an exact number from JSON, as written there
        if not isinstance(value, str):
            raise ValueError(f"expected a LaTeX answer, got {described(value)}")
        return value.strip()
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


# Lone surrogates: what a JSON escape such as "\ud83d" decodes to (and what an undecodable byte
# becomes under errors="surrogateescape"). Arrow cannot encode them, so a row holding one would
# fail only when its shard is written, after the previous output was already being replaced.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _visible(text: str) -> bool:
    """Whether ``text`` holds a character that shows: not only whitespace, zero-width spaces,
    byte-order marks or other format and control characters."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in text)


def normalise(rec: RawQuestion, task: str, answer_type: AnswerType, source: str) -> dict[str, Any] | BadRow:
    if not isinstance(rec.question, str):
        return BadRow(rec.where, "question", f"expected a string, got {described(rec.question)}")
    if not _visible(rec.question):
        return BadRow(rec.where, "question", "empty question")
    question = rec.question.strip()
    choices = [c.strip() for c in rec.choices]
    for i, c in enumerate(choices):
        if not _visible(c):
            return BadRow(rec.where, f"choices.{i}", "empty option")
    if answer_type == "choice" and len(choices) < 2:
        return BadRow(rec.where, "choices", f"a choice question needs at least 2 options, got {len(choices)}")
    try:
        answer = canonical_answer(rec.answer, answer_type, len(choices))
    except ValueError as e:
        return BadRow(rec.where, "answer", str(e))
    texts = [("id", rec.raw_id or ""), ("question", question), ("answer", answer),
             *((f"choices.{i}", c) for i, c in enumerate(choices))]
    for name, text in texts:
        if m := _SURROGATE.search(text):
            return BadRow(rec.where, name, f"lone surrogate U+{ord(m.group()):04X} (not encodable as UTF-8)")
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
            raise KeyError(f"missing field (looked for {shown(part)} inside {kind_of(obj)}: {shown(obj)})")
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


def _parse_json(text: str) -> Any:
    """``json.loads`` with exact numbers: a JSON number with a fraction or an exponent becomes a
    Decimal, so a gold such as 9007199254740993.5 is never rounded through a float.

    Raises ``_Unparseable`` with the reason for anything that is not valid JSON, including what
    ``json`` reports as RecursionError (nesting too deep) or a plain ValueError (an integer of
    more than 4,300 digits)."""
    try:
        return json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as e:
        # json's messages end in "at" when they expect a position ("Unterminated string starting at").
        raise _Unparseable(f"unparseable JSON: {e.msg.removesuffix(' at')} at column {e.colno}", e.lineno) from None
    except RecursionError:
        raise _Unparseable("unparseable JSON: nested too deeply", None) from None
    except ValueError as e:
        raise _Unparseable(f"unparseable JSON: {e}", None) from None


class _Unparseable(Exception):
    def __init__(self, reason: str, line: int | None) -> None:
        self.reason = reason
        self.line = line


# Every file is read as "utf-8-sig": a byte-order mark that some editors put at the start of a
# file is dropped instead of becoming part of the first key (a CSV whose question column would
# then be missing on every row) or a JSON syntax error.
_ENCODING = "utf-8-sig"


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    with open(path, encoding=_ENCODING, errors="surrogateescape") as f:
        for i, line in enumerate(f, start=1):
            where = f"{path}:{i}"
            if not line.strip():
                continue
            undecoded = _UNDECODED.search(line)
            try:
                obj = _parse_json(line)
            except _Unparseable as e:
                yield where, BadRow(where, "<line>", _not_utf8(undecoded, True) if undecoded else e.reason)
                continue
            if undecoded:
                found = _undecoded_field(obj)
                yield where, BadRow(where, found[0] if found else "<line>", _not_utf8(undecoded, True))
                continue
            if not isinstance(obj, dict):
                yield where, BadRow(where, "<line>", f"expected a JSON object, got {kind_of(obj)}")
                continue
            yield where, obj


def _json_list(path: Path, key: str | None = None) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    text = Path(path).read_text(encoding=_ENCODING, errors="surrogateescape")
    undecoded = _UNDECODED.search(text)
    try:
        data = _parse_json(text)
    except _Unparseable as e:
        if undecoded:
            line = text.count("\n", 0, undecoded.start()) + 1
            raise DataError(f"{path}:{line}: <file>: {_not_utf8(undecoded)}") from None
        raise DataError(f"{path}{'' if e.line is None else f':{e.line}'}: <file>: {e.reason}") from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: <file>: expected a JSON object with a '{key}' list")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: <file>: expected a JSON list of records, got {kind_of(data)}")
    for i, obj in enumerate(data):
        where = f"{path}:record {i}"
        if not isinstance(obj, dict):
            yield where, BadRow(where, "<record>", f"expected a JSON object, got {kind_of(obj)}")
        else:
            bad = _undecoded_row(where, obj) if undecoded else None  # walk records only if the file has a bad byte
            yield where, bad or obj


def _csv(path: Path) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """CSV records, each named by the physical line it starts on (a quoted field may span lines)."""
    with open(path, encoding=_ENCODING, errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        start = reader.line_num + 1
        for obj in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if None in obj or None in obj.values():  # csv pads a short row with None, keeps extras under None
                n = len(obj) - 1 + len(obj[None]) if None in obj else sum(v is not None for v in obj.values())
                yield where, BadRow(where, "<row>", f"{n} fields, the header has {len(header)}")
                continue
            yield where, _undecoded_row(where, obj) or dict(obj)


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """Generic reader by file suffix: .jsonl, .json (a list), .csv, .parquet."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path)
    elif suffix == ".json":
        yield from _json_list(path)
    elif suffix == ".csv":
        yield from _csv(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: <file>: not a Parquet file ({shown(str(e))})") from None
        for i, obj in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", obj
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")


class _Bad(Exception):
    """A field is missing or has the wrong type: the record is the bad row it carries."""

    def __init__(self, bad: BadRow) -> None:
        self.bad = bad


def _field(where: str, obj: dict[str, Any], path: str) -> Any:
    """The value at ``path`` (``_dig``), of any type; a missing one is a bad row."""
    try:
        return _dig(obj, path)
    except KeyError as e:
        raise _Bad(BadRow(where, path, e.args[0])) from None


def _wrong_type(where: str, name: str, expected: str, value: Any) -> _Bad:
    return _Bad(BadRow(where, name, f"expected {expected}, got {described(value)}"))


def _string(where: str, obj: dict[str, Any], path: str, name: str | None = None) -> str:
    """The text at ``path``: null or any other type is a bad row, never ``str(value)``
    (a null body would otherwise become the question "None. How many ...")."""
    value = _field(where, obj, path)
    if not isinstance(value, str):
        raise _wrong_type(where, name or path, "a string", value)
    return value


def _number(where: str, obj: dict[str, Any], path: str) -> int | float | Decimal:
    value = _field(where, obj, path)
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise _wrong_type(where, path, "a number", value)
    return value


def _raw_id(where: str, obj: dict[str, Any], path: str, *, required: bool = False) -> str | None:
    """A record's own id: text or an integer. Absent (and not ``required``): None, and the row
    gets a content hash instead. Null, empty or any other type is a bad row: a null id must not
    become the id "None" of every such row."""
    if not required and path not in obj:
        return None
    value = _field(where, obj, path)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _wrong_type(where, path, "a string or an integer id", value)
    if not _visible(value):
        raise _Bad(BadRow(where, path, "empty id"))
    return value.strip()


def _strings(where: str, items: Any, name: str) -> list[str]:
    """A list of option texts; each must be a string."""
    if not isinstance(items, list):
        raise _wrong_type(where, name, "a list", items)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _wrong_type(where, f"{name}.{i}", "a string", item)
    return items


def _guard(build: Callable[[], RawQuestion | BadRow]) -> RawQuestion | BadRow:
    try:
        return build()
    except _Bad as b:
        return b.bad


# ---------------------------------------------------------------- loaders, one per format


def load_gsm8k(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _jsonl(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion | BadRow:
            answer = _string(where, obj, "answer")
            if "####" not in answer:
                return BadRow(where, "answer", "no '#### <gold>' marker")
            return RawQuestion(where, _field(where, obj, "question"), answer.split("####")[-1].strip())

        yield _guard(build)


def load_svamp(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _json_list(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion:
            body = _string(where, obj, "Body").strip()
            question = _string(where, obj, "Question").strip()
            # SVAMP bodies usually end without a full stop before the question.
            text = f"{body} {question}" if body.endswith((".", "?", "!")) else f"{body}. {question}"
            return RawQuestion(where, text, _field(where, obj, "Answer"), raw_id=_raw_id(where, obj, "ID"))

        yield _guard(build)


def load_csqa(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _jsonl(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion | BadRow:
            choices = _field(where, obj, "question.choices")
            if not isinstance(choices, list):
                raise _wrong_type(where, "question.choices", "a list", choices)
            options: dict[str, str] = {}
            for i, c in enumerate(choices):
                if not isinstance(c, dict):
                    raise _wrong_type(where, f"question.choices.{i}", "a mapping with label and text", c)
                options[_string(where, c, "label", f"question.choices.{i}.label")] = _string(
                    where, c, "text", f"question.choices.{i}.text")
            labels = sorted(options)
            if len(options) != len(choices) or labels != list(LETTERS[: len(labels)]):
                return BadRow(where, "question.choices",
                              f"labels {shown([c['label'] for c in choices])} are not A, B, C, ...")
            return RawQuestion(
                where,
                _field(where, obj, "question.stem"),
                _field(where, obj, "answerKey"),
                [options[label] for label in labels],
                raw_id=_raw_id(where, obj, "id"),
            )

        yield _guard(build)


def load_strategyqa(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _json_list(path, key="examples"):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion | BadRow:
            scores = _field(where, obj, "target_scores")
            if not isinstance(scores, dict) or set(scores) != {"Yes", "No"}:
                return BadRow(where, "target_scores", f"expected {{Yes, No}}, got {shown(scores)}")
            yes, no = _number(where, obj, "target_scores.Yes"), _number(where, obj, "target_scores.No")
            if yes == no:
                return BadRow(where, "target_scores", "Yes and No score the same")
            return RawQuestion(where, _field(where, obj, "input"), "yes" if yes > no else "no")

        yield _guard(build)


def load_math500(path: Path) -> Iterator[RawQuestion | BadRow]:
    for where, obj in _records(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion:
            raw_id = _raw_id(where, obj, "unique_id")
            return RawQuestion(where, _field(where, obj, "problem"), _field(where, obj, "answer"),
                               raw_id=raw_id.replace("/", "_").removesuffix(".json") if raw_id else None)

        yield _guard(build)


def load_gpqa(path: Path) -> Iterator[RawQuestion | BadRow]:
    """GPQA CSV: the correct answer and three distractors, shuffled per question.

    The option order is seeded by the question text, so it is the same on every run and
    does not depend on row order.
    """
    for where, obj in _records(path):
        if isinstance(obj, BadRow):
            yield obj
            continue

        def build() -> RawQuestion | BadRow:
            question = _string(where, obj, "Question").strip()
            correct = _string(where, obj, "Correct Answer").strip()
            wrong = [_string(where, obj, f"Incorrect Answer {k}").strip() for k in (1, 2, 3)]
            options = [correct, *wrong]
            if any(not _visible(o) for o in options):
                return BadRow(where, "Correct Answer/Incorrect Answer", "empty option")
            # The "0:" prefix keeps the option order every earlier prepare run wrote.
            digest = hashlib.sha256(f"0:{question}".encode("utf-8", "surrogatepass")).hexdigest()
            random.Random(int(digest[:16], 16)).shuffle(options)
            return RawQuestion(where, question, LETTERS[options.index(correct)], options,
                               raw_id=_raw_id(where, obj, "Record ID"))

        yield _guard(build)


# The keys of a generic or hub dataset's ``fields`` map.
FIELD_KEYS = ("question", "answer", "choices", "id")


def _mapped(where: str, obj: dict[str, Any], fields: dict[str, str]) -> RawQuestion | BadRow:
    def build() -> RawQuestion | BadRow:
        choices: list[str] = []
        if "choices" in fields:
            raw = _field(where, obj, fields["choices"])
            if isinstance(raw, str):
                raw = raw.split("|")  # CSV files carry options as "a|b|c"
            choices = _strings(where, raw, fields["choices"])
        raw_id = _raw_id(where, obj, fields["id"], required=True) if "id" in fields else None
        return RawQuestion(where, _field(where, obj, fields["question"]), _field(where, obj, fields["answer"]),
                           choices, raw_id)

    return _guard(build)


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

    try:
        ds = datasets.load_dataset(hub_id, subset, split=split)
    except ConnectionError as e:  # offline, or the Hub unreachable: expected, so one line
        raise DataError(f"{hub_id}[{split}]: {e} (format hub needs a network or the dataset in the Hugging Face "
                        "cache)") from None
    for i, obj in enumerate(ds):
        yield _mapped(f"{hub_id}[{split}]:row {i}", obj, fields)


def load_embedded(split: Literal["train", "eval"], train_size: int, eval_size: int, seed: int) -> Iterator[RawQuestion]:
    for i, p in enumerate(embedded_splits(train_size, eval_size, seed)[split]):
        yield RawQuestion(f"embedded[{split}]:{i}", p.question, p.answer, raw_id=f"{split}-{i:05d}")
