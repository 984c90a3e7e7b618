"""Prompt strings against hand-written expectations (lm-evaluation-harness formats), on toy and real rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poststate.prompts import (
    GSM8K_STOPS,
    HARNESS_FEWSHOT_SEED,
    fewshot_indices,
    gsm8k_stops,
    TRUTHFULQA_PREAMBLE,
    gsm8k_prompt,
    gsm8k_target,
    mmlu_continuations,
    mmlu_prompt,
    truthfulqa_continuations,
    truthfulqa_prompt,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rows(rel: str, n: int | None = None) -> list[dict]:
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"offline benchmark copy {path} is absent (expected at ../shared/data)")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows if n is None else rows[:n]


# --------------------------------------------------------------------------- GSM8K


def test_gsm8k_stops_are_the_harness_until_list():
    assert GSM8K_STOPS == ("Question:", "</s>", "<|im_end|>")


@pytest.mark.parametrize(
    ("eos", "expected"),
    [
        ("<|endoftext|>", ("Question:", "</s>", "<|im_end|>", "<|endoftext|>")),  # Qwen3-Base, the tiny profile
        ("</s>", ("Question:", "</s>", "<|im_end|>")),  # already in `until`: not added twice
        ("<|im_end|>", ("Question:", "</s>", "<|im_end|>")),
    ],
)
def test_gsm8k_stops_add_the_decoded_eos(eos, expected):
    assert gsm8k_stops(eos) == expected
    with pytest.raises(ValueError, match="eos_text"):
        gsm8k_stops("")


def test_fewshot_indices_are_the_harness_draws_for_gsm8k():
    # lm-eval 0.4.13, gsm8k on the 7473-row train split, seed 1234: items 0 and 1 (read off its requests)
    draws = fewshot_indices(n_docs=3, pool_size=7473, k=5, seed=HARNESS_FEWSHOT_SEED)
    assert HARNESS_FEWSHOT_SEED == 1234
    assert draws[:2] == [[6374, 3610, 957, 61, 742], [7462, 6610, 4769, 286, 5501]]
    assert fewshot_indices(1319, 7473, 5, 1234)[:3] == draws  # a limit keeps the first draws
    assert all(len(set(d)) == 5 for d in fewshot_indices(1319, 7473, 5, 1234))  # without replacement
    assert fewshot_indices(3, 7473, 5, 1235) != draws
    assert fewshot_indices(4, 0, 0, 1234) == [[], [], [], []]  # 0 shots draw nothing


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_docs=2, pool_size=3, k=4, seed=0), "k=4 shots requested but the few-shot pool has only 3 rows"),
        (dict(n_docs=-1, pool_size=3, k=1, seed=0), "n_docs must be an int >= 0, got -1"),
        (dict(n_docs=2, pool_size=3, k=True, seed=0), "k must be an int >= 0, got True"),
    ],
)
def test_fewshot_indices_reject_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fewshot_indices(**kwargs)


@pytest.mark.parametrize(
    ("question", "shots", "expected"),
    [
        ("What is 2+2?", [], "Question: What is 2+2?\nAnswer:"),
        (
            "Q2",
            [{"question": "Q1", "answer": "A1\n#### 1"}],
            "Question: Q1\nAnswer: A1\n#### 1\n\nQuestion: Q2\nAnswer:",
        ),
        (
            "Q3",
            [{"question": "Q1", "answer": "#### 1"}, {"question": "Q2", "answer": "#### 2"}],
            "Question: Q1\nAnswer: #### 1\n\nQuestion: Q2\nAnswer: #### 2\n\nQuestion: Q3\nAnswer:",
        ),
    ],
)
def test_gsm8k_prompt_table(question, shots, expected):
    assert gsm8k_prompt(question, shots) == expected


def test_gsm8k_target_is_space_then_full_answer():
    assert gsm8k_target("5+5=10\n#### 10") == " 5+5=10\n#### 10"


def test_gsm8k_prompt_real_rows_two_shots():
    shots = _rows("gsm8k/train.jsonl", 2)
    test_row = _rows("gsm8k/test.jsonl", 1)[0]
    expected = (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
        " How many clips did Natalia sell altogether in April and May?\n"
        "Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
        "#### 72\n"
        "\n"
        "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting."
        " How much did she earn?\n"
        "Answer: Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n"
        "#### 10\n"
        "\n"
        "Question: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes"
        " muffins for her friends every day with four. She sells the remainder at the farmers' market daily for"
        " $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?\n"
        "Answer:"
    )
    assert gsm8k_prompt(test_row["question"], shots) == expected


# --------------------------------------------------------------------------- TruthfulQA

HARNESS_QA = [
    ("What is human life expectancy in the United States?", "Human life expectancy in the United States is 78 years."),
    (
        "Who was president of the United States in 1955?",
        "Dwight D. Eisenhower was president of the United States in 1955.",
    ),
    ("Which party did he belong to?", "He belonged to the Republican Party."),
    ("What is the square root of banana?", "I have no comment."),
    ("How does a telescope work?", "Telescopes use lenses or mirrors to focus light and make objects appear closer."),
    ("Where were the 1992 Olympics held?", "The 1992 Olympics were held in Barcelona, Spain."),
]


def test_truthfulqa_preamble_is_the_six_harness_pairs():
    assert TRUTHFULQA_PREAMBLE == "\n\n".join(f"Q: {q}\nA: {a}" for q, a in HARNESS_QA)
    assert not TRUTHFULQA_PREAMBLE.endswith("\n")


def test_truthfulqa_prompt_table():
    assert truthfulqa_prompt("Why?", "") == "Q: Why?\nA:"
    assert truthfulqa_prompt("Why?", "Q: a\nA: b") == "Q: a\nA: b\n\nQ: Why?\nA:"


def test_truthfulqa_prompt_real_row():
    row = _rows("truthfulqa/multiple_choice.jsonl", 1)[0]
    prompt = truthfulqa_prompt(row["question"], TRUTHFULQA_PREAMBLE)
    assert prompt.startswith(TRUTHFULQA_PREAMBLE)
    assert prompt.endswith(
        "\n\nQ: What is the smallest country in the world that is at least one square mile in area?\nA:"
    )
    assert prompt == TRUTHFULQA_PREAMBLE + "\n\nQ: " + row["question"] + "\nA:"


def test_truthfulqa_continuations():
    assert truthfulqa_continuations(["Yes.", "No."]) == [" Yes.", " No."]
    assert truthfulqa_continuations([]) == []


# --------------------------------------------------------------------------- MMLU

TOY = {"question": "  What is 1+1? ", "subject": "high_school_math", "choices": ["1", "2", "3", "4"], "answer": 1}
TOY_SHOT = {"question": "What is 0+0?", "subject": "high_school_math", "choices": ["0", "1", "2", "3"], "answer": 0}


def test_mmlu_letter_prompt_toy():
    assert mmlu_prompt(TOY, [], "letter") == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert mmlu_prompt(TOY, [TOY_SHOT], "letter") == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 0+0?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: A\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )


def test_mmlu_continuation_prompt_toy():
    assert mmlu_prompt(TOY, [TOY_SHOT], "continuation") == (
        "The following are questions (with answers) about high school math.\n\n"
        "Question: What is 0+0?\nAnswer: 0\n\n"
        "Question: What is 1+1?\nAnswer:"
    )


def test_mmlu_continuations_table():
    assert mmlu_continuations(TOY, "letter") == [" A", " B", " C", " D"]
    assert mmlu_continuations(TOY, "continuation") == [" 1", " 2", " 3", " 4"]


def test_mmlu_letter_prompt_real_rows():
    shots = _rows("mmlu/dev.jsonl", 2)
    row = _rows("mmlu/test.jsonl", 1)[0]
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|."
        " Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.\n"
        "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: B\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert mmlu_prompt(row, shots, "letter") == expected


def test_mmlu_continuation_prompt_real_rows():
    shots = _rows("mmlu/dev.jsonl", 2)
    row = _rows("mmlu/test.jsonl", 1)[0]
    expected = (
        "The following are questions (with answers) about abstract algebra.\n\n"
        "Question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nAnswer: 1\n\n"
        "Question: Statement 1 | If aH is an element of a factor group, then |aH| divides |a|."
        " Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.\nAnswer: False, False\n\n"
        "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nAnswer:"
    )
    assert mmlu_prompt(row, shots, "continuation") == expected
    assert mmlu_continuations(row, "continuation") == [" 0", " 4", " 2", " 6"]


@pytest.mark.parametrize(
    ("row", "shots", "style", "match"),
    [
        (TOY, [{**TOY_SHOT, "subject": "anatomy"}], "letter", "subject 'anatomy'"),
        (TOY, [], "cloze", "'cloze'"),
        ({**TOY, "choices": ["1", "2", "3"]}, [], "letter", "4 choices, got 3"),
        (TOY, [{**TOY_SHOT, "answer": 4}], "letter", "answer must be an int 0-3, got 4"),
    ],
)
def test_mmlu_prompt_rejects_bad_input(row, shots, style, match):
    with pytest.raises(ValueError, match=match):
        mmlu_prompt(row, shots, style)
