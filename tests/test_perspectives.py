"""Perspectives: the built-in 8, prompt construction through a chat template, custom YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.engine import chat_prompts
from pipeline.perspectives import (
    BUILTIN,
    BUILTIN_NAMES,
    PerspectiveError,
    answer_instruction,
    build_prompt,
    teacher_instruction,
    load_perspectives,
)
from pipeline.questions import format_question

QUESTION = {"id": "q1", "question": "Ann has 3 apples and buys 2 more. How many apples does Ann have?",
            "answer": "5", "answer_type": "number", "choices": []}
CHOICE = {"id": "q2", "question": "Which is a fruit?", "answer": "B", "answer_type": "choice",
          "choices": ["carrot", "apple", "potato"]}

# A small ChatML-style template, like SmolLM2's: enough to check that prompts go through it.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                bos_token="<|im_start|>")
    t.chat_template = CHATML
    return t


def test_builtin_set_is_the_eight_mind_paradigms() -> None:
    assert BUILTIN_NAMES == ("Formal-Symbolic", "Intuitive", "Decomposition", "Planning", "Analogy",
                             "Socratic", "Contrastive", "Counterfactual")
    assert len({p.template for p in BUILTIN}) == 8


@pytest.mark.parametrize("perspective", BUILTIN, ids=BUILTIN_NAMES)
def test_prompt_for_every_perspective_through_chat_template(perspective, tokenizer) -> None:
    user = build_prompt(perspective, format_question(QUESTION), "number")
    assert QUESTION["question"] in user
    assert user.endswith(teacher_instruction("number"))
    assert teacher_instruction("number").startswith("Keep it short: reason in two to four plain sentences")
    assert '"The answer is X."' in user and "the final number" in user
    [prompt] = chat_prompts(tokenizer, [user])
    assert prompt == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_prompts_differ_per_perspective_and_choice_questions_show_options(tokenizer) -> None:
    users = [build_prompt(p, format_question(CHOICE), "choice") for p in BUILTIN]
    assert len(set(users)) == 8
    for u in users:
        assert "(B) apple" in u and "the letter of the correct option" in u


def test_chat_prompts_refuses_a_tokenizer_without_template(tokenizer) -> None:
    tokenizer_copy = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>")
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompts(tokenizer_copy, ["hi"])


def test_unknown_answer_type() -> None:
    with pytest.raises(ValueError, match="unknown answer_type 'essay'"):
        answer_instruction("essay")


def test_select_subset_in_given_order_and_unknown_name() -> None:
    got = load_perspectives(select=["Planning", "Intuitive"])
    assert [p.name for p in got] == ["Planning", "Intuitive"]
    with pytest.raises(PerspectiveError, match="unknown perspective.*'Telepathic'"):
        load_perspectives(select=["Telepathic"])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "perspectives.yaml"
    path.write_text(text)
    return path


def test_custom_yaml_extends_and_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, """
mode: extend
perspectives:
  - name: Visual
    template: "Picture the problem as a diagram, then solve it. Use {{braces}} literally.\\n\\nQuestion: {question}"
  - name: Intuitive
    template: "Go with your gut.\\n\\nQuestion: {question}"
""")
    got = load_perspectives(path)
    assert [p.name for p in got] == list(BUILTIN_NAMES) + ["Visual"]
    assert got[1].template.startswith("Go with your gut.")
    user = build_prompt(got[-1], "What is 1 + 1?", "number")
    assert "Use {braces} literally." in user and "Question: What is 1 + 1?" in user
    assert user.endswith(teacher_instruction("number"))


def test_custom_yaml_replaces(tmp_path: Path) -> None:
    path = _write(tmp_path, """
mode: replace
perspectives:
  - {name: A, template: "Think A. {question}"}
  - {name: B, template: "Think B. {question}"}
""")
    assert [p.name for p in load_perspectives(path)] == ["A", "B"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("perspectives: [\n  - {name: A", "not valid YAML"),
        ("- {name: A, template: '{question}'}", "expected a mapping"),
        ("mode: merge\nperspectives: [{name: A, template: '{question}'}]", "mode must be 'extend' or 'replace'"),
        ("perspectives: []", "non-empty list"),
        ("perspectives: [{name: A, template: 'no placeholder'}]", r"perspectives\[0\] \(A\): template must contain"),
        ("perspectives: [{name: A, template: '{question} {answer}'}]", r"unknown placeholder\(s\) \['answer'\]"),
        ("perspectives: [{name: A, template: '{question} {'}]", "not valid format syntax"),
        ("perspectives: [{template: '{question}'}]", r"perspectives\[0\]: 'name' must be"),
        ("perspectives: [{name: A, template: '{question}'}, {name: A, template: 'x {question}'}]",
         r"perspectives\[1\] \(A\): duplicate name"),
        ("perspectives: [{name: A, prompt: '{question}'}]", r"unknown key\(s\) \['prompt'\]"),
        ("styles: [{name: A, template: '{question}'}]", r"unknown key\(s\) \['styles'\]"),
    ],
)
def test_malformed_yaml_names_file_entry_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(PerspectiveError, match=message) as err:
        load_perspectives(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PerspectiveError, match="perspectives file not found"):
        load_perspectives(tmp_path / "nope.yaml")
