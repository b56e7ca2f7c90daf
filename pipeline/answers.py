"""Answer extraction, judging and the canonical answer sentence, shared by filter and evaluate.

One plain function per answer type pulls the final answer out of a model's text:

    extract_number("So she has 1,250 dollars. The answer is $1,250.00.")  -> "1250"
    extract_choice("The answer is (C) library.", ["bank", "park", "library"]) -> "C"
    extract_yesno("Yes, because penguins cannot fly.")                    -> "yes"
    extract_math(r"... so $x = \\boxed{\\frac{1}{2}}$.")                     -> "\\frac{1}{2}"

``extract_answer(text, answer_type, choices)`` dispatches on the type and returns ``None``
when no answer can be found. ``is_correct(pred, gold, answer_type)`` compares a prediction
with the canonical gold (exact numbers, letters, yes/no; ``math`` through the math-verify
library). ``answer_suffix(gold, answer_type)`` is the one canonical answer sentence
("The answer is 42.") that every kept rationale of a question ends with, and
``canonical_rationale(text, gold, answer_type)`` turns a rationale into training text: its
reasoning (answer statements removed wherever they stood) followed by that sentence.

Where to look, for every type: the *answer sentence* first, i.e. the text after the last
"The answer is" / "Final answer:" / "Answer:" / "####" (the generation prompts of
``pipeline.perspectives`` ask for "The answer is X."); if it holds no answer, the rest of
the text (last number, last option, ...).

The lm-evaluation-harness GSM8K filters are here too (``gsm8k_strict_match``,
``gsm8k_flexible_extract``, ``lm_eval_exact_match``), reproduced from the regexes and
the exact-match settings documented in its ``gsm8k.yaml`` so that ``evaluate`` can report
the usual strict/flexible split next to our own extraction.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Literal, NamedTuple, get_args

AnswerType = Literal["number", "choice", "yesno", "math"]
ANSWER_TYPES: tuple[str, ...] = get_args(AnswerType)
LETTERS = "ABCDEFGHIJ"  # option labels: gold letters, and the "(A) ..." lines of pipeline.questions.format_question

# ---------------------------------------------------------------- the answer sentence

# "The answer is", "the final answer is:", "the answer to the problem is", "Final Answer:", "Answer:",
# "answer =", "####".
# The last match in a text is the model's final answer sentence.
ANSWER_ANCHOR_RE = re.compile(
    r"(?:\b(?:the\s+)?(?:final\s+|correct\s+)?answer(?:\s+to\s+(?:the|this)\s+(?:problem|question))?"
    r"\s*(?:is\b|:|=)\s*:?|####)[ \t]*",
    re.IGNORECASE,
)
# The end of a sentence: a period not followed by a digit (so "1,250.00." ends after the
# last "."), "!" or "?", or a line break.
_SENTENCE_END_RE = re.compile(r"\.(?!\d)|[!?]|\n")


def answer_suffix(gold: str, answer_type: AnswerType) -> str:
    """The canonical final answer sentence for a gold answer ("The answer is 42.")."""
    gold = str(gold).strip()
    if not gold:
        raise ValueError("answer_suffix: empty gold answer")
    if answer_type == "number":
        return f"The answer is {gold}."
    if answer_type == "choice":
        return f"The answer is ({gold.strip('()').upper()})."
    if answer_type == "yesno":
        return f"The answer is {gold.lower()}."
    if answer_type == "math":
        return f"The answer is $\\boxed{{{gold}}}$."
    raise ValueError(f"answer_suffix: unknown answer_type {answer_type!r}")


def _anchor_segments(text: str, whole_line: bool = False) -> list[tuple[int, str]]:
    """(start of the anchor, text of its answer sentence) for every answer anchor, last first.

    The sentence runs from the anchor to the next sentence end (``whole_line``: to the end
    of the line, for LaTeX whose periods are not sentence ends). Leading whitespace and line
    breaks after the anchor are skipped ("The answer is:\\n42").
    """
    out = []
    for m in ANSWER_ANCHOR_RE.finditer(text):
        rest = text[m.end():].lstrip()
        end = rest.find("\n") if whole_line else -1
        if not whole_line:
            stop = _SENTENCE_END_RE.search(rest)
            end = stop.start() if stop else -1
        out.append((m.start(), rest if end < 0 else rest[:end]))
    return out[::-1]


# ---------------------------------------------------------------- numbers

# A number: optional minus glued to it (or to a "$"), thousands separators, decimals, a
# simple fraction "3/4". The look-behind stops "x2" or "5-3" from yielding "2" or "-3".
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<sign>[-\u2212]?)\$?(?P<sign2>-?)"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<dec>\.\d+)?"
    r"(?:[ \t]?/[ \t]?(?P<den>\d+)(?![\d.]))?"
)
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
} | {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100}
_WORD_NUMBER_RE = re.compile(r"\b(" + "|".join(_WORD_NUMBERS) + r")\b", re.IGNORECASE)


def _number_value(m: re.Match[str]) -> Fraction | None:
    value = Fraction(Decimal(m["int"].replace(",", "") + (m["dec"] or "")))
    if m["den"] is not None:
        if int(m["den"]) == 0:
            return None
        value /= int(m["den"])
    return -value if (m["sign"] or m["sign2"]) else value


def format_number(value: Fraction) -> str:
    """The canonical number string of golds (``pipeline.questions.canonical_answer``) and of
    predictions: "1250", "-3", "0.75": no exponent, no trailing zeros, and a value that is not
    whole rounded to 28 significant digits (decimal's default context); "1/3" when no finite
    decimal exists."""
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    if value.denominator == 1:
        return str(value.numerator)
    d = Decimal(value.numerator) / Decimal(value.denominator)
    return format(d.normalize(), "f")


def parse_number(text: str) -> Fraction | None:
    """The value of a number string ("1,250.00", "$5", "-3", "3/4", "50%"); None if none."""
    m = _NUMBER_RE.search(str(text).strip())
    return _number_value(m) if m else None


def numbers_in(text: str) -> list[Fraction]:
    """Every number in ``text``, in order."""
    return [v for v in (_number_value(m) for m in _NUMBER_RE.finditer(text)) if v is not None]


# A placeholder instead of an answer: the prompt's "The answer is X." copied literally
# ("The answer is X because ...", "... = X + 2"), optionally after one filler word.
_PLACEHOLDER_RE = re.compile(r"^[\s*_$(\"']*(?:[a-z]+\s+)?X\b")
PLACEHOLDER = "placeholder"


def _number_in_sentence(sentence: str) -> Fraction | str | None:
    """The answer of an answer sentence: the first number after the last "=" ("The answer is
    5 + 3 = 8."), else its first number; spelled-out numbers ("The answer is seven.") as a
    fallback. ``PLACEHOLDER`` when the answer is a literal "X"; None when nothing is found."""
    # A parenthetical working ("The answer is 8 (= 5 + 3).") is not the answer's "=".
    sentence = re.sub(r"\([^()]*=[^()]*\)", "", sentence)
    tail = sentence.rsplit("=", 1)[1] if "=" in sentence else sentence
    if _PLACEHOLDER_RE.match(tail):
        return PLACEHOLDER
    found = numbers_in(tail) or numbers_in(sentence)
    if found:
        return found[0]
    word = _WORD_NUMBER_RE.search(sentence)
    if word:
        neg = re.search(r"\b(?:minus|negative)\s+$", sentence[: word.start()], re.IGNORECASE)
        value = Fraction(_WORD_NUMBERS[word[1].lower()])
        return -value if neg else value
    return None


def extract_number(text: str) -> str | None:
    """The final numeric answer as a canonical string ("1250", "-3", "0.75"), or None.

    The last answer sentence holding a number wins; otherwise the last number in the text.
    Thousands separators, "$", "%", units and a trailing period are ignored. An answer
    sentence with a literal placeholder ("The answer is X because she has 10.") and no other
    answer sentence with a number gives None: the model named no answer, and a number from
    elsewhere would only be a guess.
    """
    placeholder = False
    for _, sentence in _anchor_segments(text):
        value = _number_in_sentence(sentence)
        if isinstance(value, Fraction):
            return format_number(value)
        placeholder = placeholder or value == PLACEHOLDER
    if placeholder:
        return None
    found = numbers_in(text)
    return format_number(found[-1]) if found else None


# ---------------------------------------------------------------- multiple choice

_LETTER_PAREN_RE = re.compile(r"\(([A-J])\)|\b([A-J])\)")
_LETTER_WORD_RE = re.compile(r"\b(?:option|choice|letter)\s*:?\s*\(?([A-J])\b", re.IGNORECASE)
_LEADING_LETTER_RE = re.compile(r"^[\s*_\"']*\(?([A-J])\)?(?=$|[\s).:,;!*_\"'])")


def _norm_words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _option_text_letter(segment: str, choices: Sequence[str], last: bool) -> str | None:
    """The letter whose option text occurs in ``segment`` (first or last occurrence; a longer
    option wins over one it contains, e.g. "pet store" over "store")."""
    seg = f" {_norm_words(segment)} "
    best: tuple[int, int, str] | None = None
    for i, choice in enumerate(choices):
        opt = _norm_words(choice)
        if not opt:
            continue
        pos = seg.rfind(f" {opt} ") if last else seg.find(f" {opt} ")
        if pos < 0:
            continue
        end = pos + len(opt)
        key = (end if last else -pos, len(opt), LETTERS[i])
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def _letter_in(segment: str, allowed: str, choices: Sequence[str], last: bool) -> str | None:
    letters = [a or b for a, b in _LETTER_PAREN_RE.findall(segment)] + _LETTER_WORD_RE.findall(segment)
    letters = [x.upper() for x in letters if x.upper() in allowed]
    lead = _LEADING_LETTER_RE.match(segment)
    by_text = _option_text_letter(segment, choices, last) if choices else None
    if not last and lead and lead[1] in allowed:
        # "The answer is A library": "A" may be an article; trust the option text then.
        rest = segment[lead.end():]
        if lead[1] == "A" and rest[:1].isspace() and by_text is not None and not letters:
            return by_text
        return lead[1]
    if letters:
        return letters[-1] if last else letters[0]
    if lead and lead[1] in allowed and segment.strip().strip("().*").strip() == lead[1]:
        return lead[1]
    return by_text


def extract_choice(text: str, choices: Sequence[str] = ()) -> str | None:
    """The chosen option letter ("C"), or None.

    Looks in the last answer sentence first ("The answer is (C).", "Answer: C",
    "the answer is library"), then the whole text: a lone letter ("C", "(C) library"),
    the last "(C)" / "option C", and finally the option text itself. ``choices`` are the
    row's option texts; they restrict the letters and let the option text stand for its letter.
    """
    allowed = LETTERS[: len(choices)] if choices else LETTERS[:5]
    for _, sentence in _anchor_segments(text):
        letter = _letter_in(sentence, allowed, choices, last=False)
        if letter:
            return letter
    lead = _LEADING_LETTER_RE.match(text)
    if lead and lead[1] in allowed and (len(text.split()) <= 1 or text.lstrip()[:1] == "(" or lead[1] != "A"):
        # "(A) bank is wrong ... I choose library": a later choice overrides the opening letter.
        later = _letter_in(text[lead.end():], allowed, choices, last=True)
        return later if later is not None and later != lead[1] else lead[1]
    return _letter_in(text, allowed, choices, last=True)


# ---------------------------------------------------------------- yes / no

_YES_NO_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_TO_YESNO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def extract_yesno(text: str) -> str | None:
    """"yes" or "no", or None: from the answer sentence, else the first word ("Yes, because..."),
    else the last yes/no/true/false of the final sentence."""
    for _, sentence in _anchor_segments(text):
        m = _YES_NO_RE.search(sentence)
        if m:
            return _TO_YESNO[m[1].lower()]
    first = re.match(r"^[\s*_\"']*(yes|no|true|false)\b", text, re.IGNORECASE)
    if first:
        return _TO_YESNO[first[1].lower()]
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]
    if sentences:
        found = _YES_NO_RE.findall(sentences[-1])
        if found:
            return _TO_YESNO[found[-1].lower()]
    return None


# ---------------------------------------------------------------- math (LaTeX)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...}, with nested braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1].strip())
    return out


_PLAIN_MATH_RE = re.compile(r"[^\s,;]+(?:\s*[-+*/^=]\s*[^\s,;]+)*")
_INLINE_MATH_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)


def _math_in_sentence(sentence: str) -> str | None:
    boxed = _boxed_contents(sentence)
    if boxed:
        return boxed[-1]
    found = [next(g for g in m.groups() if g is not None) for m in _INLINE_MATH_RE.finditer(sentence)]
    if found:
        return found[0].strip()
    # Plain text: the leading expression only ("3.5 because 7/2" -> "3.5", "x + 1" stays whole).
    plain = _PLAIN_MATH_RE.match(sentence.strip())
    return plain[0].rstrip(".").strip() or None if plain else None


def _math_verify_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def extract_math(text: str) -> str | None:
    """The final LaTeX answer ("\\frac{1}{2}"), or None: the last \\boxed{}, else the answer
    sentence's math, else the last expression math-verify finds in the text."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1]
    for _, sentence in _anchor_segments(text, whole_line=True):
        found = _math_in_sentence(sentence)
        if found:
            return found
    from math_verify import parse

    parsed = parse(text, parsing_timeout=_math_verify_timeout())
    if len(parsed) >= 2 and isinstance(parsed[-1], str) and parsed[-1].strip():
        return parsed[-1].strip()
    return None


def math_equal(pred: str, gold: str) -> bool:
    """LaTeX equivalence through math-verify ("\\frac{1}{2}" == "0.5" == "1/2")."""
    if " ".join(pred.split()) == " ".join(gold.split()):
        return True
    from math_verify import parse, verify

    t = _math_verify_timeout()
    gold_parsed = parse(f"${gold}$", parsing_timeout=t)
    pred_parsed = parse(f"${pred}$", parsing_timeout=t)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))


# ---------------------------------------------------------------- dispatch and judging


def extract_answer(text: str, answer_type: AnswerType, choices: Sequence[str] = ()) -> str | None:
    """The final answer of ``text`` for ``answer_type``, as a canonical string, or None."""
    if answer_type == "number":
        return extract_number(text)
    if answer_type == "choice":
        return extract_choice(text, choices)
    if answer_type == "yesno":
        return extract_yesno(text)
    if answer_type == "math":
        return extract_math(text)
    raise ValueError(f"extract_answer: unknown answer_type {answer_type!r} (expected one of {ANSWER_TYPES})")


def numbers_equal(pred: str, gold: str, rel_tol: float = 1e-6) -> bool:
    """Numeric equality of two number strings ("3/4" == "0.75", "1,250.00" == "1250")."""
    p, g = parse_number(pred), parse_number(gold)
    if g is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    if p is None:
        return False
    return p == g or abs(p - g) <= rel_tol * max(1, abs(g))


def is_correct(pred: str | None, gold: str, answer_type: AnswerType) -> bool:
    """Whether the extracted ``pred`` matches the canonical ``gold``; None is never correct."""
    if pred is None:
        return False
    if answer_type == "number":
        return numbers_equal(pred, gold)
    if answer_type == "choice":
        return pred.strip().strip("()").upper() == gold.strip().strip("()").upper()
    if answer_type == "yesno":
        return pred.strip().lower() == gold.strip().lower()
    if answer_type == "math":
        return math_equal(pred, gold)
    raise ValueError(f"is_correct: unknown answer_type {answer_type!r} (expected one of {ANSWER_TYPES})")


# ---------------------------------------------------------------- canonical answer suffix

# Connectives left dangling when the answer sentence is cut out of "..., so the answer is 8."
_DANGLING_RE = re.compile(r"(?:[\s,;:*_#\-]*\b(?:so|thus|therefore|hence|and|then)\b)?[\s,;:*_#\-]*$", re.IGNORECASE)
# Where a clause ends: a period not followed by a digit, "!", "?", a line break, "," or ";".
_CLAUSE_END_RE = re.compile(r"\.(?!\d)|[!?\n,;]")
# What may stand between a clause start and an answer anchor for the anchor to open an answer
# *statement* ("So the answer is 8.", "**Final Answer:** 8"). Anything else makes it a mention
# inside reasoning ("Let's see what the correct answer is: Tom has 5 ...") that stays.
_STATEMENT_LEAD_RE = re.compile(r"[\s*_#>\-\"'\u201c]*(?:(?:so|thus|therefore|hence|then|and)\b[\s,]*)?", re.IGNORECASE)
# Markup and quotes that close an answer statement ("**The answer is 14.**", '"The answer is 6."').
_TRAILING_MARKUP_RE = re.compile(r"[*_\"'\u201d]*")
# A display-math block right after an anchor ("the answer is:\n\\[\n\\boxed{14}\n\\]").
_DISPLAY_MATH_RE = re.compile(r"\\\[.*?\\\]\.?|\$\$.*?\$\$\.?", re.DOTALL)
# Text after the final answer statement counts as reasoning (and stays) when it computes or
# explains: a digit, an "=", or at least this many words. Shorter chatter ("I hope this
# helps!") is dropped.
_TAIL_MIN_WORDS = 8
REWRITES = ("answer_last", "answer_first", "answer_in_middle", "no_answer_sentence")


class Canonical(NamedTuple):
    """A rationale rewritten to end in the canonical answer sentence.

    ``text[offset:]`` is ``answer_suffix(gold)`` and ``text[:offset]`` the reasoning (empty for a
    bare answer). ``rewrite`` says where the teacher had stated its answer: ``answer_last`` (the
    usual "... so the answer is 8."), ``answer_first`` (an answer statement before any
    reasoning), ``answer_in_middle`` (reasoning both before and after it) or
    ``no_answer_sentence`` (none: the suffix is appended). ``tail_dropped`` is True when short
    chatter after the final answer statement was removed.
    """

    text: str
    offset: int
    rewrite: str
    tail_dropped: bool


def _answer_statements(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kept) of every answer statement: an answer anchor that opens its clause (after
    at most a connective such as "so" or "Therefore," and markup or a quote), through the end of
    its sentence, a display-math block right after the anchor included. ``kept`` is the
    statement's computation, when it has one ("The answer is 4 + 9 = 13." keeps "4 + 9 = 13."):
    that is reasoning, not a restated answer."""
    spans: list[tuple[int, int, str]] = []
    for m in ANSWER_ANCHOR_RE.finditer(text):
        if spans and m.start() < spans[-1][1]:
            continue
        ends = [e.end() for e in _CLAUSE_END_RE.finditer(text, 0, m.start())]
        clause = ends[-1] if ends else 0
        if not _STATEMENT_LEAD_RE.fullmatch(text, clause, m.start()):
            continue
        body = m.end() + len(_leading_space(text[m.end():]))
        display = _DISPLAY_MATH_RE.match(text, body)
        sentence_end = _SENTENCE_END_RE.search(text, body)
        stop = display.end() if display else sentence_end.end() if sentence_end else len(text)
        content = text[body:stop]
        end = _TRAILING_MARKUP_RE.match(text, stop).end()
        kept = content.strip().rstrip(".") + "." if "=" in content and not display else ""
        spans.append((clause, end, kept))
    return spans


def _leading_space(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def _is_reasoning(segment: str) -> bool:
    return bool(re.search(r"\d|=", segment)) or len(segment.split()) >= _TAIL_MIN_WORDS


def _clean_piece(piece: str) -> str:
    """A piece of reasoning left beside a removed answer statement: no dangling connective, and a
    sentence end."""
    piece = _DANGLING_RE.sub("", piece.strip()).strip()
    if piece and piece[-1] not in ".!?:)]}$\"'":
        piece += "."
    return piece


def canonical_rationale(text: str, gold: str, answer_type: AnswerType) -> Canonical:
    """``text`` as training text: its reasoning, in order, followed by ``answer_suffix(gold)``.

    Every answer *statement* is removed, wherever it stands: "The answer is 2. Tom has 5 ..."
    keeps "Tom has 5 ..." and gets the suffix at the end, never becomes the bare suffix. A
    mention of the answer inside reasoning ("what the correct answer is: Tom has ...") is not a
    statement and stays. Short chatter after the final statement is dropped. The suffix follows
    a line break if the last statement stood on its own line, else a space.
    """
    suffix = answer_suffix(gold, answer_type)
    spans = _answer_statements(text)
    if not spans:
        body = _clean_piece(text)
        return Canonical(body + " " + suffix if body else suffix, len(body) + 1 if body else 0,
                         "no_answer_sentence", False)
    bounds = [0, *(x for start, end, _ in spans for x in (start, end)), len(text)]
    pieces = [text[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]  # len(spans) + 1 pieces
    for i, (_, _, kept) in enumerate(spans):  # a statement's computation stays where it stood
        if kept:
            pieces[i] = (_leading_space(pieces[i]) + _clean_piece(pieces[i]) + " " + kept).rstrip()
    tail_dropped = bool(pieces[-1].strip()) and not _is_reasoning(pieces[-1])
    if tail_dropped:
        pieces[-1] = ""
    cleaned = [_clean_piece(p) for p in pieces]
    has = [bool(c) for c in cleaned]
    rewrite = "answer_last"
    for i in range(len(spans)):
        before, after = any(has[: i + 1]), any(has[i + 1:])
        if not before and after:
            rewrite = "answer_first"
            break
        if before and after:
            rewrite = "answer_in_middle"
    # Join the kept pieces with a line break where the removed statement between them touched one.
    body = ""
    for i, (piece, clean) in enumerate(zip(pieces, cleaned)):
        if not clean:
            continue
        if body:
            on_new_line = text[: spans[i - 1][0]].endswith("\n") or "\n" in _leading_space(piece)
            body += "\n" if on_new_line else " "
        body += clean
    if not body:
        return Canonical(suffix, 0, rewrite, tail_dropped)
    # The suffix takes the last statement's place: on its own line if that one stood on its own.
    own_line = not has[-1] and text[: spans[-1][0]].rstrip(" \t").endswith("\n")
    sep = "\n" if own_line else " "
    return Canonical(body + sep + suffix, len(body) + len(sep), rewrite, tail_dropped)


# ---------------------------------------------------------------- lm-evaluation-harness GSM8K

# From lm-evaluation-harness lm_eval/tasks/gsm8k/gsm8k.yaml (and gsm8k-cot.yaml for the
# chain-of-thought "strict-match"): filter regexes, then exact_match with ignore_case and
# these regexes_to_ignore applied to prediction and reference.
GSM8K_STRICT_RE = r"#### (\-?[0-9\.\,]+)"
GSM8K_COT_STRICT_RE = r"The answer is (\-?[0-9\.\,]+)."
GSM8K_FLEXIBLE_RE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def _lm_eval_regex(text: str, pattern: str, group_select: int) -> str | None:
    """lm-eval's RegexFilter: findall, pick ``group_select``, first non-empty group, strip.
    None stands for its "[invalid]" fallback."""
    found = re.findall(pattern, text)
    if not found:
        return None
    match = found[group_select]
    if isinstance(match, tuple):
        groups = [g for g in match if g]
        if not groups:
            return None
        match = groups[0]
    return match.strip()


def gsm8k_strict_match(text: str, pattern: str = GSM8K_STRICT_RE) -> str | None:
    """lm-eval "strict-match": the first match of ``pattern`` (default "#### N"; pass
    ``GSM8K_COT_STRICT_RE`` for the "The answer is N." chain-of-thought variant)."""
    return _lm_eval_regex(text, pattern, 0)


def gsm8k_flexible_extract(text: str) -> str | None:
    """lm-eval "flexible-extract": the last number-like run in the text."""
    return _lm_eval_regex(text, GSM8K_FLEXIBLE_RE, -1)


def lm_eval_normalise(text: str) -> str:
    for pattern in LM_EVAL_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def lm_eval_exact_match(extracted: str | None, gold: str) -> bool:
    """lm-eval's exact_match for GSM8K: both sides stripped of ",", "$", "... #### " and a
    trailing ".", case-insensitive, then compared as strings ("1,250.00" != "1250")."""
    if extracted is None:
        return False
    return lm_eval_normalise(extracted) == lm_eval_normalise(gold)


# ---------------------------------------------------------------- text quality


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier one (0: none, near 1:
    the same phrase over and over). Texts shorter than n words score 0."""
    if n < 1:
        raise ValueError(f"repeated_ngram_share: n must be >= 1, got {n}")
    words = text.split()
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def normalise_text(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form of a rationale, for near-duplicates."""
    return _norm_words(text)
