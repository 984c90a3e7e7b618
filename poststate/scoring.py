"""Answer extraction and scoring, matching lm-evaluation-harness; one GSM8K scorer for eval and the RL reward.

GSM8K (lm_eval/tasks/gsm8k/gsm8k.yaml, version 3.0):
  - generations are cut at `until` (GSM8K_STOPS);
  - strict-match: regex `#### (\\-?[0-9\\.\\,]+)`, take_first;
  - flexible-extract: regex `(-?[$0-9.,]{2,})|(-?[0-9]+)`, group_select -1 (the last match);
  - the RegexFilter (lm_eval/filters/extraction.py) takes `findall(...)[group_select]`, and when that is a
    tuple of groups, its first non-empty group, then `.strip()`; no match is "[invalid]" (here None, wrong);
  - exact_match (lm_eval/api/metrics.py `exact_match_hf_evaluate`) applies `regexes_to_ignore`
    [",", "\\$", "(?s).*#### ", "\\.$"] in order to prediction and reference alike, then lower-cases
    (ignore_case true, ignore_punctuation false); the reference is the dataset's full `answer` field.
TruthfulQA MC1/MC2 and MMLU score summed continuation log-likelihoods (not length-normalised).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from poststate.prompts import GSM8K_STOPS

STRICT_REGEX = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_REGEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_REGEXES: tuple[str, ...] = (",", r"\$", r"(?s).*#### ", r"\.$")


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string; unchanged if none occurs."""
    cut = len(text)
    for stop in stops:
        if stop == "":
            raise ValueError(f"empty stop string in {list(stops)!r}")
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _regex_filter(pattern: re.Pattern[str], text: str, group_select: int) -> str | None:
    # lm_eval RegexFilter: findall, pick one match, first non-empty group of a tuple, strip.
    matches = pattern.findall(text)
    if not matches:
        return None
    match = matches[group_select]
    if isinstance(match, tuple):
        match = [g for g in match if g][0]
    return match.strip()


def extract_strict(text: str) -> str | None:
    """strict-match: group 1 of the first `#### (\\-?[0-9\\.\\,]+)` match, stripped; None when absent."""
    return _regex_filter(STRICT_REGEX, text, 0)


def extract_flexible(text: str) -> str | None:
    """flexible-extract: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` (its non-empty group); None when absent."""
    return _regex_filter(FLEXIBLE_REGEX, text, -1)


def normalize_answer(s: str) -> str:
    """Harness exact_match normalisation for gsm8k: delete `,`, `$`, everything up to `#### `, a final `.`; lower."""
    for pattern in IGNORE_REGEXES:
        s = re.sub(pattern, "", s)
    return s.lower()


def gold_answer(answer_field: str) -> str:
    """The gold number of a GSM8K `answer` field: the text after `#### `, normalised (the harness reference)."""
    if "#### " not in answer_field:
        raise ValueError(f"GSM8K answer field has no '#### ' line: {answer_field[-200:]!r}")
    gold = normalize_answer(answer_field)
    if gold.strip() == "":
        raise ValueError(f"GSM8K answer field has an empty answer after '#### ': {answer_field[-200:]!r}")
    return gold


@dataclass(frozen=True)
class GSM8KScore:
    strict: bool  # strict-match correct
    flexible: bool  # flexible-extract correct
    strict_pred: str | None  # extracted (un-normalised) strict answer; None = no parsable answer
    flexible_pred: str | None


def gsm8k_score(completion: str, answer_field: str) -> GSM8KScore:
    """Score one GSM8K completion both ways, as the harness does.

    The completion is first cut at GSM8K_STOPS (a no-op when the generator already stopped there), then
    pred_m = extract_m(completion); correct_m = pred_m is not None and normalize(pred_m) == gold_answer(answer).
    """
    gold = gold_answer(answer_field)
    text = truncate_at_stop(completion, GSM8K_STOPS)
    strict_pred = extract_strict(text)
    flexible_pred = extract_flexible(text)
    return GSM8KScore(
        strict=strict_pred is not None and normalize_answer(strict_pred) == gold,
        flexible=flexible_pred is not None and normalize_answer(flexible_pred) == gold,
        strict_pred=strict_pred,
        flexible_pred=flexible_pred,
    )


def gsm8k_reward(completion: str, answer_field: str) -> float:
    """The RL reward: 1.0 when the completion is strict-match correct (`gsm8k_score(...).strict`), else 0.0."""
    return 1.0 if gsm8k_score(completion, answer_field).strict else 0.0


# --------------------------------------------------------------------------- multiple choice


def _check_ll(ll: Sequence[float], what: str) -> list[float]:
    values = [float(x) for x in ll]
    if not values:
        raise ValueError(f"{what}: no log-likelihoods")
    for i, x in enumerate(values):
        if math.isnan(x) or x == math.inf:
            raise ValueError(f"{what}: log-likelihood {i} is {x}")
    return values


def _check_labels(labels: Sequence[int], n: int, what: str) -> list[int]:
    values = list(labels)
    if len(values) != n:
        raise ValueError(f"{what}: {n} log-likelihoods but {len(values)} labels")
    for i, v in enumerate(values):
        if isinstance(v, bool) or v not in (0, 1):
            raise ValueError(f"{what}: label {i} must be 0 or 1, got {v!r}")
    if 1 not in values:
        raise ValueError(f"{what}: no choice is labelled 1: {values}")
    return values


def _argmax(values: Sequence[float]) -> int:
    # numpy.argmax semantics: the first index among ties
    best = 0
    for i, x in enumerate(values):
        if x > values[best]:
            best = i
    return best


def mc1_correct(ll: Sequence[float], labels: Sequence[int]) -> bool:
    """TruthfulQA MC1: the choice with the largest summed log-likelihood is labelled 1 (ties -> first index)."""
    values = _check_ll(ll, "mc1")
    lab = _check_labels(labels, len(values), "mc1")
    return lab[_argmax(values)] == 1


def mc2_score(ll: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: normalised probability mass on the true choices, by label (never by position).

    mc2 = sum_{i: label_i=1} exp(ll_i) / sum_i exp(ll_i) = exp(LSE(ll_true) - LSE(ll_all)), computed with
    log-sum-exp so very negative log-likelihoods do not underflow. lm-evaluation-harness 0.4.13's
    `process_results_mc2` (tasks/truthfulqa/utils.py) selects by label too (`probs_norm[labels == 1]`); it
    exponentiates without log-sum-exp, so the two agree wherever its exp does not underflow
    (tests/test_harness.py compares them on all 817 items, rows 25 and 208 among them).
    """
    values = _check_ll(ll, "mc2")
    lab = _check_labels(labels, len(values), "mc2")
    top = max(values)
    if top == -math.inf:
        raise ValueError(f"mc2: every log-likelihood is -inf: {values}")

    def lse(xs: list[float]) -> float:
        m = max(xs)
        if m == -math.inf:
            return -math.inf
        return m + math.log(sum(math.exp(x - m) for x in xs))

    true_ll = [x for x, y in zip(values, lab, strict=True) if y == 1]
    return math.exp(lse(true_ll) - lse(values))


def mmlu_correct(ll: Sequence[float], gold: int) -> bool:
    """MMLU: the argmax (ties -> first index) of the four continuations' log-likelihoods is the gold index."""
    values = _check_ll(ll, "mmlu")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(values):
        raise ValueError(f"mmlu: gold index must be an int in [0, {len(values)}), got {gold!r}")
    return _argmax(values) == gold
