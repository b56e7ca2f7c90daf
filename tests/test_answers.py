"""Answer extraction, judging and the canonical answer sentence (pipeline/answers.py)."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline.answers import (
    GSM8K_COT_STRICT_RE,
    answer_suffix,
    canonical_rationale,
    extract_answer,
    extract_choice,
    extract_math,
    extract_number,
    extract_yesno,
    format_number,
    gsm8k_flexible_extract,
    gsm8k_strict_match,
    is_correct,
    lm_eval_exact_match,
    normalise_text,
    parse_number,
    repeated_ngram_share,
)
from pipeline.questions import canonical_answer

# ---------------------------------------------------------------- extraction table

NUMBER_CASES = [
    ("The answer is $1,250.00.", "1250"),
    ("-3", "-3"),
    ("3/4", "0.75"),
    ("The answer is 42.", "42"),
    ("42", "42"),
    ("She has 5 apples and buys 3 more, so 5 + 3 = 8. The answer is 8.", "8"),
    ("First 12, then 7, finally 30 apples.", "30"),  # several numbers, no answer sentence: the last
    ("The answer is 8. Check: 8 - 3 = 5 and 5 + 3 = 8, 100% sure.", "8"),  # answer sentence beats last number
    ("The answer is 5 + 3 = 8.", "8"),  # the value after "=" in the answer sentence
    ("The answer is -7.", "-7"),
    ("The answer is 3.5 km.", "3.5"),
    ("The answer is 0.50.", "0.5"),
    ("It costs $4.", "4"),
    ("The discount is 25%.", "25"),
    ("The answer is 1,000,000.", "1000000"),
    ("The answer is seven.", "7"),
    ("The final answer is: **12** apples", "12"),
    ("#### 1,234", "1234"),
    ("Answer: 15", "15"),
    ("x = 5-3 = 2", "2"),  # "-3" glued to "5" is a subtraction, not a negative number
    ("Temperature fell to -4 degrees.", "-4"),
    ("Final Answer: 1/3", "1/3"),
    ("The answer is 12/3.", "4"),
    ("She has 2 boxes with 3 pens in each, 2 x 3 = 6 pens.", "6"),
    ("The answer is:\n17", "17"),
    ("I am not sure how many.", None),
    ("", None),
    ("The answer is 9.\n\nThe answer is 10.", "10"),  # the last answer sentence wins
    ("The answer is unknown. She has 6.", "6"),  # an answer sentence without a number falls back
    ("The answer is X because Tina has 10 balloons.", None),  # the prompt's placeholder: no answer
    ("So the answer is indeed X, but 2*1 + 1 = X + 2.", None),
    ("Tina has 8 left. The answer is 8.\nThe answer is X.", "8"),  # an earlier answer sentence still counts
    ("The answer is x = 5 - 2 = 3.", "3"),
]

CHOICES = ["bank", "park", "library", "pet store", "store"]
CHOICE_CASES = [
    ("(C) library", "C"),
    ("The answer is (C).", "C"),
    ("The answer is C.", "C"),
    ("The answer is: E", "E"),
    ("The answer is library.", "C"),  # option text instead of the letter
    ("The answer is A library.", "C"),  # "A" is an article here
    ("The answer is A.", "A"),
    ("C", "C"),
    ("B) park", "B"),
    ("I think the answer is B) park, not (A) bank.", "B"),
    ("Option D is right.", "D"),
    ("People buy pets at a pet store.", "D"),  # the longer option beats "store"
    ("Books are kept in a library.", "C"),
    ("Looking at (A) bank and (B) park, I pick (C).", "C"),  # the last letter when no answer sentence
    ("It is hard to say.", None),
]

YESNO_CASES = [
    ("Yes, because penguins cannot fly.", "yes"),
    ("No.", "no"),
    ("The answer is no.", "no"),
    ("The answer is yes.", "yes"),
    ("There is no way to tell at first. The answer is yes.", "yes"),
    ("So the statement is true.", "yes"),
    ("Apples are red. The claim is false.", "no"),
    ("**Yes**, it is.", "yes"),
    ("I do not know.", None),
]

MATH_CASES = [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"The answer is $\frac{\sqrt{3}}{2}$.", r"\frac{\sqrt{3}}{2}"),
    (r"Thus \boxed{3} first, then \boxed{\{1, 2\}}.", r"\{1, 2\}"),  # the last boxed, braces balanced
    (r"The answer is 0.5.", "0.5"),
    (r"We simplify and get $x^2 + 1$", "x^2 + 1"),
    ("No math here.", None),
]


@pytest.mark.parametrize(("text", "expected"), NUMBER_CASES)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize(("text", "expected"), CHOICE_CASES)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text, CHOICES) == expected
    assert extract_answer(text, "choice", CHOICES) == expected


@pytest.mark.parametrize(("text", "expected"), YESNO_CASES)
def test_extract_yesno(text: str, expected: str | None) -> None:
    assert extract_yesno(text) == expected
    assert extract_answer(text, "yesno") == expected


@pytest.mark.parametrize(("text", "expected"), MATH_CASES)
def test_extract_math(text: str, expected: str | None) -> None:
    assert extract_math(text) == expected


def test_answers_that_older_rules_got_wrong() -> None:
    # a parenthetical working is not the answer's "="
    assert extract_number("The answer is 8 (= 5 + 3).") == "8"
    assert extract_number("The answer is 5 + 3 = 8.") == "8"
    # an opening option letter, then another option chosen by its text
    assert extract_choice("(A) bank is wrong, books are not kept there. I choose library.",
                          ["bank", "park", "library"]) == "C"
    assert extract_choice("(C) library", ["bank", "park", "library"]) == "C"
    # the math fallback is the leading expression, not the whole line
    assert extract_math("The answer is 3.5 because 7/2") == "3.5"
    assert extract_math("The answer is x + 1") == "x + 1"


def test_choice_letters_limited_to_the_rows_options() -> None:
    assert extract_choice("The answer is E.", ["x", "y", "z"]) is None
    assert extract_choice("The answer is (B).", ["x", "y"]) == "B"
    # Without option texts, A-E are letters.
    assert extract_choice("The answer is (E).") == "E"


def test_unknown_answer_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown answer_type"):
        extract_answer("42", "float")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown answer_type"):
        is_correct("42", "42", "float")  # type: ignore[arg-type]


# ---------------------------------------------------------------- judging

CORRECT_CASES = [
    ("1250", "1250", "number", True),
    ("0.75", "0.75", "number", True),
    ("3/4", "0.75", "number", True),
    ("1,250.00", "1250", "number", True),
    ("8", "9", "number", False),
    ("-3", "3", "number", False),
    (None, "3", "number", False),
    ("c", "C", "choice", True),
    ("(B)", "B", "choice", True),
    ("A", "B", "choice", False),
    ("yes", "yes", "yesno", True),
    ("no", "yes", "yesno", False),
    (r"\frac{1}{2}", "0.5", "math", True),  # \boxed{\frac{1}{2}} vs 0.5
    ("0.5", r"\frac{1}{2}", "math", True),
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", "math", True),
    ("(x+1)^2", "x^2+2x+1", "math", True),
    ("3", "4", "math", False),
    (None, "4", "math", False),
]


@pytest.mark.parametrize(("pred", "gold", "answer_type", "expected"), CORRECT_CASES)
def test_is_correct(pred: str | None, gold: str, answer_type: str, expected: bool) -> None:
    assert is_correct(pred, gold, answer_type) is expected  # type: ignore[arg-type]


def test_boxed_half_matches_point_five_end_to_end() -> None:
    pred = extract_answer(r"Half of it: \boxed{\frac{1}{2}}", "math")
    assert is_correct(pred, "0.5", "math")
    assert not is_correct(pred, "0.25", "math")


def test_number_gold_must_be_a_number() -> None:
    with pytest.raises(ValueError, match="not a number"):
        is_correct("3", "three", "number")


@pytest.mark.parametrize(("written", "canonical"), [
    ("1,250.00", "1250"), ("5.0", "5"), ("-3", "-3"), ("0.50", "0.5"), ("$12", "12"), ("1,000,000", "1000000"),
    ("-$4.25", "-4.25"), ("0.125", "0.125"), ("100", "100"), ("2.000001", "2.000001"),
])
def test_golds_and_predictions_share_one_number_form(written: str, canonical: str) -> None:
    """The gold prepare writes and the prediction read from model text are one string for one value."""
    assert canonical_answer(written, "number") == canonical
    assert extract_number(f"So the answer is {written}.") == canonical


def test_number_form_of_fractions_and_long_decimals() -> None:
    """Fractions with no finite decimal stay fractions; past 28 significant digits, a gold and a
    prediction of the same value are rounded alike."""
    assert format_number(Fraction(3, 4)) == "0.75" and format_number(Fraction(1, 3)) == "1/3"
    long = "0.123456789012345678901234567890"
    assert canonical_answer(long, "number") == extract_number(f"The answer is {long}.") == "0.1234567890123456789012345679"
    big = "1234567890123456789012345678901234567890"  # integers are exact however long
    assert canonical_answer(big, "number") == extract_number(f"The answer is {big}.") == big


def test_number_helpers() -> None:
    assert str(parse_number("$1,250.00")) == "1250"
    assert format_number(parse_number("-0.50")) == "-0.5"  # type: ignore[arg-type]
    assert parse_number("no digits") is None
    assert parse_number("5/0") is None


# ---------------------------------------------------------------- canonical answer sentence


@pytest.mark.parametrize(
    ("gold", "answer_type", "suffix"),
    [
        ("42", "number", "The answer is 42."),
        ("-3", "number", "The answer is -3."),
        ("C", "choice", "The answer is (C)."),
        ("yes", "yesno", "The answer is yes."),
        (r"\frac{1}{2}", "math", r"The answer is $\boxed{\frac{1}{2}}$."),
    ],
)
def test_answer_suffix_round_trips(gold: str, answer_type: str, suffix: str) -> None:
    assert answer_suffix(gold, answer_type) == suffix  # type: ignore[arg-type]
    pred = extract_answer(suffix, answer_type, CHOICES)  # type: ignore[arg-type]
    assert is_correct(pred, gold, answer_type)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected", "rewrite"),
    [
        ("Anna has 5. She buys 3. 5 + 3 = 8. So the answer is 8.", "Anna has 5. She buys 3. 5 + 3 = 8. The answer is 8.",
         "answer_last"),
        # short chatter after the final answer is dropped
        ("Anna has 8.\nThe answer is 8. Then I keep talking.", "Anna has 8.\nThe answer is 8.", "answer_last"),
        ("Anna has 8 apples", "Anna has 8 apples. The answer is 8.", "no_answer_sentence"),
        ("The answer is 8.", "The answer is 8.", "answer_last"),  # a bare answer stays bare: filter drops it
        ("Therefore, the answer is $8.00.", "The answer is 8.", "answer_last"),
        ("5 + 3 = 8\n\n**Final Answer:** 8", "5 + 3 = 8.\nThe answer is 8.", "answer_last"),
        ("She ends with 8 apples, so the answer is eight.", "She ends with 8 apples. The answer is 8.", "answer_last"),
        # answer first, then reasoning: the reasoning is kept and the suffix moves to the end
        ("The answer is 8. Tom has 5 apples and buys 3 more, so 5 + 3 = 8.",
         "Tom has 5 apples and buys 3 more, so 5 + 3 = 8. The answer is 8.", "answer_first"),
        ("**Answer:** 8\n\nExplanation: 5 + 3 = 8 apples.", "Explanation: 5 + 3 = 8 apples. The answer is 8.",
         "answer_first"),
        # in the middle: both sides kept, in order
        ("Tom has 5.\nThe answer is 8.\nBecause 5 + 3 = 8, he has 8.", "Tom has 5.\nBecause 5 + 3 = 8, he has 8. The answer is 8.",
         "answer_in_middle"),
        # a mention of "the answer" inside reasoning is not an answer statement
        ("Let's find what the correct answer is: Tom has 5, buys 3, so he has 8",
         "Let's find what the correct answer is: Tom has 5, buys 3, so he has 8. The answer is 8.", "no_answer_sentence"),
        # an earlier answer statement and a final one: both go, the reasoning between stays
        ("The answer is 8.\n5 + 3 = 8.\nSo the answer is 8.", "5 + 3 = 8.\nThe answer is 8.", "answer_first"),
    ],
)
def test_canonical_rationale(text: str, expected: str, rewrite: str) -> None:
    c = canonical_rationale(text, "8", "number")
    assert (c.text, c.rewrite) == (expected, rewrite)
    assert c.text[c.offset:] == "The answer is 8."
    assert extract_number(c.text) == "8"


def test_answer_first_never_becomes_a_bare_answer() -> None:
    # The bug this guards: cutting from the *first* answer sentence left only "The answer is 2."
    text = "The answer is 2. Tom had 5 cookies and ate 3, so 5 - 3 = 2 cookies are left."
    c = canonical_rationale(text, "2", "number")
    assert c.offset > 0 and "5 - 3 = 2" in c.text[: c.offset]


def test_canonicalise_choice_and_offset() -> None:
    new, offset, _, _ = canonical_rationale("Books live in libraries. The answer is library.", "C", "choice")
    assert new == "Books live in libraries. The answer is (C)."
    assert new[offset:] == answer_suffix("C", "choice")


# ---------------------------------------------------------------- lm-evaluation-harness parity

# Expected values written by hand from lm-eval's gsm8k.yaml: strict-match takes the first
# r"#### (\-?[0-9\.\,]+)" group; flexible-extract the last match of
# r"(-?[$0-9.,]{2,})|(-?[0-9]+)" (first non-empty group); exact_match then removes ",", "$",
# "... #### " and a trailing "." from both sides and compares case-insensitively.
LM_EVAL_CASES = [
    # text, strict, flexible, our number
    ("She pays 3 + 4 = 7 dollars.\n#### 7", "7", "7", "7"),
    ("The total is $1,250.00.", None, "$1,250.00.", "1250"),
    ("#### -3", "-3", "-3", "-3"),
    ("Costs 5 then 12 and finally 30.", None, "30.", "30"),
    ("The answer is 8. Check: 8 - 3 = 5", None, "5", "8"),
    ("#### 1,000\nExtra 17 words", "1,000", "17", "1000"),  # "####" counts as our answer sentence
    ("Nothing numeric here", None, None, None),
    ("x = 4", None, "4", "4"),
]


@pytest.mark.parametrize(("text", "strict", "flexible", "ours"), LM_EVAL_CASES)
def test_lm_eval_gsm8k_filters(text: str, strict: str | None, flexible: str | None, ours: str | None) -> None:
    assert gsm8k_strict_match(text) == strict
    assert gsm8k_flexible_extract(text) == flexible
    # Ours agrees with strict-match where it matches, else it prefers the answer sentence
    # over flexible-extract's last number.
    assert extract_number(text) == ours
    if strict is not None:
        assert ours == format_number(parse_number(strict))  # type: ignore[arg-type]


def test_lm_eval_exact_match_settings() -> None:
    assert lm_eval_exact_match(gsm8k_flexible_extract("The total is $1,250."), "1250")
    assert not lm_eval_exact_match(gsm8k_flexible_extract("The total is $1,250.00."), "1250")  # "1250.00"
    assert lm_eval_exact_match(gsm8k_strict_match("#### 1,250"), "1250")
    assert not lm_eval_exact_match(None, "1250")  # "[invalid]"
    assert lm_eval_exact_match("18.", "#### 18")


def test_lm_eval_cot_strict_variant() -> None:
    text = "So 3 + 5 = 8. The answer is 8. Then 9."
    # The greedy group takes the sentence's period too; exact_match strips it again.
    assert gsm8k_strict_match(text, GSM8K_COT_STRICT_RE) == "8."
    assert lm_eval_exact_match(gsm8k_strict_match(text, GSM8K_COT_STRICT_RE), "8")
    assert gsm8k_strict_match("So the total is 8.", GSM8K_COT_STRICT_RE) is None
    assert re.fullmatch(GSM8K_COT_STRICT_RE, "The answer is 8.")


# ---------------------------------------------------------------- text quality


def test_repeated_ngram_share() -> None:
    assert repeated_ngram_share("Anna has 5 apples. She buys 3 more. Now she has 8.") == 0.0
    loop = "she has 5 apples " * 20
    assert repeated_ngram_share(loop) > 0.9
    assert repeated_ngram_share("too short") == 0.0
    half = "a b c d e f g h " + "x y z w " * 4  # 21 four-grams, 8 of them repeats
    assert 0.3 < repeated_ngram_share(half) < 0.6
    with pytest.raises(ValueError):
        repeated_ngram_share("a b", n=0)


def test_normalise_text() -> None:
    assert normalise_text("Anna has 5  apples!\nSo: 5.") == normalise_text("anna has 5 apples so 5")
    assert normalise_text("Anna has 5 apples") != normalise_text("Anna has 6 apples")


# ---------------------------------------------------------------- real teacher outputs

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "qwen_rationales.json").read_text())["rationales"]
# "6 + 8 = 14", "3 * 6 = 18", "12 - 2 = 10": the computations that make a rationale worth distilling.
EQUATION_RE = re.compile(r"\d+(?:\s*[-+*×x/]\s*\d+)+\s*=\s*\d+")


def test_fixture_covers_every_answer_position() -> None:
    positions = {r["teacher_answer_position"] for r in FIXTURE}
    assert positions == {"answer_first", "answer_in_middle", "answer_last", "no_answer_sentence"}
    assert len(FIXTURE) >= 30


@pytest.mark.parametrize("row", FIXTURE, ids=[f"{i}-{r['teacher_answer_position']}" for i, r in enumerate(FIXTURE)])
def test_real_teacher_rationales_keep_their_reasoning(row: dict) -> None:
    c = canonical_rationale(row["text"], row["gold"], "number")
    body = c.text[: c.offset]
    assert c.text[c.offset:] == answer_suffix(row["gold"], "number")
    assert c.rewrite == row["teacher_answer_position"]  # read by hand for each text
    assert len(body.split()) >= 12, f"reasoning lost: {body!r}"
    assert not re.match(r"[\s*\"']*the answer is", body, re.IGNORECASE), "an answer statement still opens the text"
    # every computation of the teacher's text survives the rewrite
    for eq in EQUATION_RE.findall(row["text"]):
        assert eq in c.text, f"{eq!r} was dropped"
    assert extract_number(c.text) == format_number(parse_number(row["gold"]))
