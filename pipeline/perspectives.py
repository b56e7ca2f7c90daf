"""The 8 reasoning perspectives of MIND and the teacher prompts built from them.

Each perspective is a name and a prompt template: an instruction to reason in that style
with a ``{question}`` placeholder. ``build_prompt`` fills the question in and always appends
the fixed answer instruction, so every rationale, built-in or custom, is asked to end with
the parseable sentence ``The answer is X.`` (``X``: a number, an option letter, yes/no or a
math expression, by the question's answer type). The prompt then goes through the
teacher's chat template (``pipeline.engine.chat_prompts``).

A YAML file can replace or extend the set::

    mode: extend          # extend (default): add new names, override same-named built-ins
                          # replace: use exactly the perspectives in this file
    perspectives:
      - name: Visual
        template: |
          Solve the problem by describing a picture or diagram of it.

          Question: {question}

Templates use ``str.format`` syntax: ``{question}`` is required and is the only field;
write literal braces as ``{{`` and ``}}``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class PerspectiveError(ValueError):
    """A malformed perspectives file or an unknown perspective name."""


@dataclass(frozen=True)
class Perspective:
    name: str
    template: str


def _t(instruction: str) -> str:
    return instruction + "\n\nQuestion: {question}"


BUILTIN: tuple[Perspective, ...] = (
    Perspective("Formal-Symbolic", _t(
        "Solve the problem with formal, symbolic reasoning: name each quantity with a variable, "
        "write the equations that relate them, and solve the equations step by step.")),
    Perspective("Intuitive", _t(
        "Solve the problem intuitively: explain in plain everyday words what happens, the way "
        "you would to a friend, and check that the result makes sense.")),
    Perspective("Decomposition", _t(
        "Solve the problem by decomposition: break it into smaller sub-problems, solve each "
        "sub-problem in turn, then combine their results.")),
    Perspective("Planning", _t(
        "Solve the problem by planning: first write a short numbered plan of the steps needed, "
        "then carry out the plan one step at a time.")),
    Perspective("Analogy", _t(
        "Solve the problem by analogy: relate it to a familiar situation with the same "
        "structure, reason about that situation, and map the result back to this problem.")),
    Perspective("Socratic", _t(
        "Solve the problem the Socratic way: ask yourself a short sequence of guiding "
        "questions and answer each one until the solution follows.")),
    Perspective("Contrastive", _t(
        "Solve the problem by contrast: point out a tempting but wrong way to solve it, "
        "explain why it is wrong, then give the correct reasoning.")),
    Perspective("Counterfactual", _t(
        "Solve the problem with counterfactual reasoning: consider what would change if a key "
        "number or condition were different, then use that to reason about the actual case.")),
)

BUILTIN_NAMES: tuple[str, ...] = tuple(p.name for p in BUILTIN)

# What X is in "The answer is X.", by the question's answer_type (pipeline/questions.py).
ANSWER_FORMS: dict[str, str] = {
    "number": "the final number",
    "choice": "the letter of the correct option",
    "yesno": "yes or no",
    "math": "the final answer in simplest form",
}


def answer_instruction(answer_type: str) -> str:
    """The fixed closing instruction: end with the sentence 'The answer is X.'."""
    if answer_type not in ANSWER_FORMS:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {sorted(ANSWER_FORMS)}")
    return f'End your response with the sentence "The answer is X." where X is {ANSWER_FORMS[answer_type]}.'


# The student's user message, in training (distill) and in evaluation (evaluate): a zero-shot
# chain-of-thought line and the same answer instruction. One template and one function, so that the
# students are scored on exactly the prompt they were trained on.
STUDENT_PROMPT = "{question}\n\nLet's think step by step. {answer_instruction}"


def student_message(question: str, answer_type: str) -> str:
    """The student's user turn for a formatted question (``questions.format_question``): no perspective."""
    return STUDENT_PROMPT.format(question=question, answer_instruction=answer_instruction(answer_type))


def teacher_instruction(answer_type: str) -> str:
    """The teacher's closing instruction: brief plain-text reasoning first, then the answer sentence.

    Measured with Qwen2.5-Coder-0.5B-Instruct on 12 embedded questions x 8 perspectives (T 0.7,
    float32), counting the rationales that are correct and have >= 12 tokens of reasoning:
    - asked only to "end with" the answer sentence: 15 of 96 usable (half of the Decomposition,
      Planning, Analogy, Socratic and Counterfactual answers were the bare sentence);
    - asked to reason step by step first: 61 usable, 124 tokens each (markdown lists and LaTeX,
      which the 135M student imitated into loops: 14% on the embedded eval after 24 steps);
    - asked for two to four plain sentences (this): 63 usable, 51 tokens each.
    """
    if answer_type not in ANSWER_FORMS:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {sorted(ANSWER_FORMS)}")
    return ("Keep it short: reason in two to four plain sentences, with no LaTeX, then end your response with "
            f'the sentence "The answer is X." where X is {ANSWER_FORMS[answer_type]}.')


def build_prompt(perspective: Perspective, question: str, answer_type: str) -> str:
    """The user message for one (perspective, question): the template, then the teacher instruction."""
    return perspective.template.format(question=question).rstrip() + "\n\n" + teacher_instruction(answer_type)


def _check_template(template: str, where: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # e.g. a single "{" or "}"
        raise PerspectiveError(f"{where}: template is not valid format syntax ({e}); write literal braces as {{{{ }}}}") from None
    if "question" not in fields:
        raise PerspectiveError(f"{where}: template must contain the placeholder {{question}}")
    others = sorted({f for f in fields if f != "question"})
    if others:
        raise PerspectiveError(
            f"{where}: template uses unknown placeholder(s) {others}; only {{question}} is filled in "
            "(write literal braces as {{ and }})"
        )


def parse_perspectives(data: Any, source: str) -> tuple[str, list[Perspective]]:
    """Validate the YAML content of a perspectives file: returns (mode, perspectives)."""
    if not isinstance(data, dict):
        raise PerspectiveError(f"{source}: expected a mapping with keys 'perspectives' and optional 'mode'")
    unknown = sorted(set(data) - {"mode", "perspectives"})
    if unknown:
        raise PerspectiveError(f"{source}: unknown key(s) {unknown}; expected 'mode' and 'perspectives'")
    mode = data.get("mode", "extend")
    if mode not in ("extend", "replace"):
        raise PerspectiveError(f"{source}: mode must be 'extend' or 'replace', got {mode!r}")
    items = data.get("perspectives")
    if not isinstance(items, list) or not items:
        raise PerspectiveError(f"{source}: 'perspectives' must be a non-empty list of {{name, template}} entries")
    out: list[Perspective] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"{source}: perspectives[{i}]"
        if not isinstance(item, dict):
            raise PerspectiveError(f"{where}: expected a mapping with 'name' and 'template', got {item!r}")
        extra = sorted(set(item) - {"name", "template"})
        if extra:
            raise PerspectiveError(f"{where}: unknown key(s) {extra}; expected 'name' and 'template'")
        name, template = item.get("name"), item.get("template")
        if not isinstance(name, str) or not name.strip():
            raise PerspectiveError(f"{where}: 'name' must be a non-empty string")
        where = f"{where} ({name})"
        if not isinstance(template, str) or not template.strip():
            raise PerspectiveError(f"{where}: 'template' must be a non-empty string")
        if name in seen:
            raise PerspectiveError(f"{where}: duplicate name")
        seen.add(name)
        _check_template(template, where)
        out.append(Perspective(name.strip(), template))
    return mode, out


def load_perspectives(path: str | Path | None = None, select: list[str] | None = None) -> list[Perspective]:
    """The built-in 8, replaced or extended by the YAML file at ``path``, then optionally
    narrowed to the names in ``select`` (in that order)."""
    perspectives = list(BUILTIN)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PerspectiveError(f"{path}: perspectives file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise PerspectiveError(f"{path}: not valid YAML: {e}") from None
        mode, custom = parse_perspectives(data, str(path))
        if mode == "replace":
            perspectives = custom
        else:
            by_name = {p.name: p for p in custom}
            perspectives = [by_name.pop(p.name, p) for p in perspectives] + list(by_name.values())
    if select is not None:
        by_name = {p.name: p for p in perspectives}
        missing = [s for s in select if s not in by_name]
        if missing:
            raise PerspectiveError(f"unknown perspective(s) {missing}; available: {list(by_name)}")
        if len(set(select)) != len(select):
            raise PerspectiveError(f"perspective list {select} names one twice")
        perspectives = [by_name[s] for s in select]
    if not perspectives:
        raise PerspectiveError("no perspectives selected")
    return perspectives
