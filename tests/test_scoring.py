"""Scorers against hand-computed tables (lm-evaluation-harness semantics), and gold extraction on every GSM8K row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import poststate.scoring as scoring
from poststate.prompts import GSM8K_STOPS
from poststate.scoring import (
    GSM8KScore,
    extract_flexible,
    extract_strict,
    gold_answer,
    gsm8k_reward,
    gsm8k_score,
    mc1_correct,
    mc2_score,
    mmlu_correct,
    normalize_answer,
    truncate_at_stop,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abc Question: x", "abc "),
        ("a</s>b Question:", "a"),
        ("x<|im_end|>y</s>", "x"),
        ("Question: at start", ""),
        ("no stops here", "no stops here"),
        ("", ""),
    ],
)
def test_truncate_at_stop(text, expected):
    assert truncate_at_stop(text, GSM8K_STOPS) == expected


def test_truncate_rejects_empty_stop():
    with pytest.raises(ValueError, match="empty stop"):
        truncate_at_stop("abc", ["x", ""])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 5\n#### 72", "72"),
        ("#### -3.5", "-3.5"),
        ("#### 1,234\n#### 5", "1,234"),  # first match
        ("#### 72.", "72."),
        ("####72", None),
        ("#### $5", None),
        ("The answer is 72", None),
    ],
)
def test_extract_strict(text, expected):
    assert extract_strict(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is $1,234.", "$1,234."),
        ("no number at all", None),
        ("I have 3 apples and 12 pears", "12"),  # last match, group 1
        ("x 5 y", "5"),  # single digit: group 2 is the non-empty one
        ("-7", "-7"),  # group 2 with its sign
        ("Total: 10. Then 2", "2"),
        ("pay 3.50 dollars.", "3.50"),
        ("version 1.2.3", "1.2.3"),
        ("It is 5...", "5..."),
    ],
)
def test_extract_flexible(text, expected):
    assert extract_flexible(text) == expected


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("$1,234.", "1234"),
        ("1,234.5", "1234.5"),
        ("solution\n#### 72", "72"),
        ("a\n#### 1\n#### 2", "2"),  # (?s).*#### is greedy: up to the last '#### '
        ("72..", "72."),  # only one final '.'
        ("ABC", "abc"),
        ("-3", "-3"),
        (" 5", " 5"),  # the harness does not strip
    ],
)
def test_normalize_answer(s, expected):
    assert normalize_answer(s) == expected


def test_gold_answer_table():
    assert gold_answer("x\n#### 1,000") == "1000"
    assert gold_answer("#### -2") == "-2"
    with pytest.raises(ValueError, match="no '#### ' line: 'the answer is 3'"):
        gold_answer("the answer is 3")
    with pytest.raises(ValueError, match="####72"):
        gold_answer("####72")


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("9*8=72\n#### 72", "work\n#### 72", GSM8KScore(True, True, "72", "72")),
        ("The answer is $1,234.", "w\n#### 1234", GSM8KScore(False, True, None, "$1,234.")),
        ("no number", "w\n#### 4", GSM8KScore(False, False, None, None)),
        # truncation at "Question:" happens before extraction: otherwise flexible would read 5
        ("#### 72\n\nQuestion: What is 5?", "w\n#### 72", GSM8KScore(True, True, "72", "72")),
        ("#### 7.0", "w\n#### 7", GSM8KScore(False, False, "7.0", "7.0")),
        ("#### 72 is not 73", "w\n#### 72", GSM8KScore(True, False, "72", "73")),
        ("#### 1,234.", "w\n#### 1,234", GSM8KScore(True, True, "1,234.", "1,234.")),
    ],
)
def test_gsm8k_score_table(completion, answer, expected):
    assert gsm8k_score(completion, answer) == expected


def test_gsm8k_reward_values():
    assert gsm8k_reward("#### 72", "w\n#### 72") == 1.0
    assert gsm8k_reward("The answer is 72", "w\n#### 72") == 0.0  # flexible-correct only: no reward


def test_gsm8k_reward_calls_the_shared_scorer(monkeypatch):
    calls = []

    def fake(completion, answer_field):
        calls.append((completion, answer_field))
        return GSM8KScore(strict=True, flexible=False, strict_pred="x", flexible_pred=None)

    monkeypatch.setattr(scoring, "gsm8k_score", fake)
    assert scoring.gsm8k_reward("anything", "#### 1") == 1.0
    assert calls == [("anything", "#### 1")]


@pytest.mark.parametrize(
    ("ll", "labels", "expected"),
    [
        ([-1.0, -2.0, -3.0], [1, 0, 0], True),
        ([-2.0, -1.0, -3.0], [1, 0, 0], False),
        ([-3.0, -1.0, -2.0], [0, 1, 0], True),  # the true choice need not be first
        ([-1.0, -1.0], [1, 0], True),  # tie: first index wins
        ([-1.0, -1.0], [0, 1], False),
        ([-math.inf, -5.0], [1, 0], False),
    ],
)
def test_mc1_correct(ll, labels, expected):
    assert mc1_correct(ll, labels) is expected


@pytest.mark.parametrize(
    ("ll", "labels", "expected"),
    [
        ([0.0, 0.0], [1, 0], 0.5),
        ([math.log(3), 0.0], [1, 0], 0.75),
        ([math.log(1), math.log(2), math.log(3), math.log(4)], [0, 1, 0, 1], 0.6),  # (2+4)/10
        ([-1.0, -2.0], [1, 1], 1.0),
        ([-1000.0, -1000.0 - math.log(3)], [0, 1], 0.25),  # naive exp underflows to 0/0
        ([-math.inf, 0.0], [1, 0], 0.0),
        # the label layout of TruthfulQA row 25 (an "Unknown." false choice between true ones):
        # true mass 1+2+3+5 over 1+...+9 = 11/45 (the harness's split-at-first-0 would give 6/45)
        ([math.log(p) for p in range(1, 10)], [1, 1, 1, 0, 1, 0, 0, 0, 0], 11 / 45),
    ],
)
def test_mc2_score(ll, labels, expected):
    assert mc2_score(ll, labels) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("ll", "labels", "match"),
    [
        ([-1.0, -2.0], [1], "2 log-likelihoods but 1 labels"),
        ([-1.0, -2.0], [1, 2], "label 1 must be 0 or 1, got 2"),
        ([-1.0, -2.0], [0, 0], "no choice is labelled 1"),
        ([-1.0, math.nan], [1, 0], "log-likelihood 1 is nan"),
        ([], [], "no log-likelihoods"),
    ],
)
def test_mc_rejects_bad_input(ll, labels, match):
    with pytest.raises(ValueError, match=match):
        mc1_correct(ll, labels)
    with pytest.raises(ValueError, match=match):
        mc2_score(ll, labels)


def test_mc2_rejects_all_minus_inf():
    with pytest.raises(ValueError, match="every log-likelihood is -inf"):
        mc2_score([-math.inf, -math.inf], [1, 0])


@pytest.mark.parametrize(
    ("ll", "gold", "expected"),
    [
        ([-1.0, -2.0, -3.0, -4.0], 0, True),
        ([-4.0, -3.0, -2.0, -1.0], 3, True),
        ([-4.0, -3.0, -2.0, -1.0], 2, False),
        ([-1.0, -1.0, -5.0, -5.0], 0, True),  # tie: first index
        ([-1.0, -1.0, -5.0, -5.0], 1, False),
    ],
)
def test_mmlu_correct(ll, gold, expected):
    assert mmlu_correct(ll, gold) is expected


@pytest.mark.parametrize("gold", [4, -1, True, 1.0])
def test_mmlu_correct_rejects_bad_gold(gold):
    with pytest.raises(ValueError, match="gold index"):
        mmlu_correct([-1.0, -2.0, -3.0, -4.0], gold)


@pytest.mark.parametrize("rel", ["gsm8k/test.jsonl", "gsm8k/train.jsonl"])
def test_gold_answer_on_every_gsm8k_row(rel):
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"offline benchmark copy {path} is absent (expected at ../shared/data)")
    n = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            row = json.loads(line)
            gold = gold_answer(row["answer"])
            float(gold)  # a plain number string: no ',', '$', spaces or text left
            assert gold == gold.strip() and "," not in gold, (rel, lineno, gold)
            # the gold answer, written as a strict-format completion, is strict-match correct
            assert gsm8k_score(f"#### {row['answer'].split('#### ')[-1]}", row["answer"]).strict, (rel, lineno)
            n += 1
    assert n == {"gsm8k/test.jsonl": 1319, "gsm8k/train.jsonl": 7473}[rel]
