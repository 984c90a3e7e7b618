"""Evaluator: harness tokenisation, batched log-likelihoods vs a reference loop, and the three benchmarks
end to end on a tiny random model and a tiny data dir (plus contrived log-likelihoods / generations)."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from pydantic import ValidationError

from poststate import evaluation, prompts
from poststate.evaluation import encode_pair, evaluate, loglikelihoods
from poststate.params import EvalParams
from poststate.rollout import Rollouts

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

PARAMS = dict(
    gsm8k_fewshot=2,
    gsm8k_fewshot_seed=1234,
    gsm8k_limit=None,
    gsm8k_max_new_tokens=8,
    truthfulqa_preamble="none",
    truthfulqa_limit=None,
    mmlu_style="letter",
    mmlu_fewshot=1,
    mmlu_limit=None,
    gen_batch_size=2,
    ll_batch_size=3,
    max_length=256,
)

GSM8K_FEWSHOT = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "She sold 48 clips in April and half as many in May. How many in all?", "answer": "48 + 24 = 72\n#### 72"},
    {"question": "unused third shot", "answer": "#### 0"},
]
GSM8K_TEST = [
    {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
    {"question": "What is 10 - 3?", "answer": "#### 7"},
    {"question": "A farmer has 12 cows. How many legs?", "answer": "#### 48"},
]
TRUTHFULQA = [
    {
        "question": "What is the capital of France?",
        "mc1_targets": {"choices": ["Paris", "Lyon", "Nice"], "labels": [1, 0, 0]},
        "mc2_targets": {"choices": ["Paris", "It is Paris", "Lyon"], "labels": [1, 1, 0]},
    },
    {  # the true choice is not first (two Hub rows are like this)
        "question": "What happens if you eat watermelon seeds?",
        "mc1_targets": {"choices": ["You grow watermelons", "Nothing happens"], "labels": [0, 1]},
        "mc2_targets": {"choices": ["You die", "Nothing", "They pass through"], "labels": [0, 1, 1]},
    },
]
MMLU_DEV = [
    {"question": "1 + 1 = ?", "subject": "high_school_math", "choices": ["1", "2", "3", "4"], "answer": 1},
    {"question": "Second math shot", "subject": "high_school_math", "choices": ["a", "b", "c", "d"], "answer": 0},
    {"question": "Capital of Italy?", "subject": "geography", "choices": ["Rome", "Milan", "Turin", "Pisa"], "answer": 0},
]
MMLU_TEST = [
    {"question": "2 + 3 = ?", "subject": "high_school_math", "choices": ["4", "5", "6", "7"], "answer": 1},
    {"question": "Capital of Spain?", "subject": "geography", "choices": ["Lisbon", "Porto", "Madrid", "Rome"], "answer": 2},
    {"question": "3 * 3 = ?", "subject": "high_school_math", "choices": ["9", "6", "3", "0"], "answer": 0},
]


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    _write_jsonl(tmp_path / "gsm8k" / "fewshot.jsonl", GSM8K_FEWSHOT)
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_TEST)
    _write_jsonl(tmp_path / "truthfulqa" / "mc.jsonl", TRUTHFULQA)
    _write_jsonl(tmp_path / "mmlu" / "dev.jsonl", MMLU_DEV)
    _write_jsonl(tmp_path / "mmlu" / "test.jsonl", MMLU_TEST)
    return tmp_path


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, seed=1, init_std=0.3)


def _reference_ll(model, tok, context: str, continuation: str, max_length: int = 10**9) -> float:
    """One request, one unpadded forward over all positions: sum_k log_softmax(logits)[cont_k]."""
    ctx, cont = encode_pair(tok, context, continuation)
    full = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logp_TV = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].float(), -1)
    n = len(cont)
    return sum(logp_TV[len(full) - 1 - n + k, t].item() for k, t in enumerate(cont))


REQUESTS = [
    ("Q: What is the capital of France?\nA:", " Paris"),
    ("Q: What is the capital of France?\nA:", " It is Paris, a city on the Seine."),
    ("2 + 3 = ?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:", " B"),
    ("Answer: ", "7 apples"),  # trailing space of the context moves onto the continuation
    ("The following are multiple choice questions (with answers) about high school math.\n\nQ", ": yes"),
    ("Q: What is the capital of France?\nA:", " Paris"),  # a duplicate request
    ("x", " y z w v u t s r q p o n m l k j i h g f e d c b a"),
]


# --------------------------------------------------------------------------- params and tokenisation


def test_eval_params_reject_bad_values():
    EvalParams(**PARAMS)
    for key, bad in [("gsm8k_fewshot", -1), ("gsm8k_limit", 1), ("gsm8k_max_new_tokens", 0), ("max_length", 0),
                     ("truthfulqa_preamble", "other"), ("mmlu_style", "cloze"), ("ll_batch_size", 0),
                     ("gsm8k_fewshot_seed", "x"), ("max_length", 8)]:  # 8 = gsm8k_max_new_tokens: no room for a prompt
        with pytest.raises(ValidationError, match=key):
            EvalParams(**{**PARAMS, key: bad})
    assert EvalParams(**{**PARAMS, "max_length": None}).max_length is None  # the harness's default: the model's
    assert EvalParams(**{k: v for k, v in PARAMS.items() if k != "gsm8k_fewshot_seed"}).gsm8k_fewshot_seed == 1234
    with pytest.raises(ValidationError, match="extra"):
        EvalParams(**PARAMS, temperature=0.0)
    with pytest.raises(ValidationError):
        EvalParams(**{k: v for k, v in PARAMS.items() if k != "mmlu_limit"})  # no defaults: params.yaml says all


def test_encode_pair_splits_like_the_harness(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # trailing spaces of the context move onto the continuation
    assert encode_pair(tok, "Answer: ", "7") == encode_pair(tok, "Answer:", " 7") == (enc("Answer:"), enc(" 7"))
    # the continuation ids are the joined text's ids after as many ids as the context has; when a merge
    # crosses the boundary the model sees ctx + cont, not enc(context + continuation) (harness quirk)
    ctx, cont = encode_pair(tok, "Tom h", "as has")
    assert ctx == enc("Tom h") == enc("Tom") + enc(" h") and cont == enc(" has")
    assert enc("Tom has has") == enc("Tom") + enc(" has") * 2 != ctx + cont
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_pair(tok, "Tom h", "as")  # the harness would score it as an empty continuation (LL = 0)
    with pytest.raises(ValueError, match="empty context"):
        encode_pair(tok, "", " x")


# --------------------------------------------------------------------------- log-likelihoods


def test_loglikelihoods_equal_an_unbatched_reference(model, tiny_tokenizer):
    ref = [_reference_ll(model, tiny_tokenizer, c, x) for c, x in REQUESTS]
    for batch_size in (1, 2, 3, len(REQUESTS)):
        got = loglikelihoods(model, tiny_tokenizer, REQUESTS, batch_size=batch_size, max_length=256)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=0)
    assert all(x < 0 for x in ref) and len(set(ref)) == len(set(REQUESTS))


def test_continuations_sharing_a_context_are_packed_and_scored_as_if_alone(model, tiny_tokenizer):
    """A question's choices share one packed row; each must still see only the context and itself."""
    ctx = "Q: Which river is longest?\nA:"
    conts = [" The Nile", " It is the Amazon, by most measures", " Z", " The Nile is", " Mississippi"]
    requests = [(ctx, c) for c in conts] + [("Q: hi\nA:", " B"), ("Q: hi\nA:", " C D")]
    ref = [_reference_ll(model, tiny_tokenizer, c, x) for c, x in requests]
    for batch_size in (1, 2, len(requests)):
        got = loglikelihoods(model, tiny_tokenizer, requests, batch_size=batch_size, max_length=256)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=0)
    groups = [(encode_pair(tiny_tokenizer, ctx, conts[0])[0], [encode_pair(tiny_tokenizer, ctx, c)[1] for c in conts])]
    packed = evaluation._score_groups(model, groups, tiny_tokenizer.pad_token_id)[0]
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(ref[: len(conts)]), atol=1e-4, rtol=0)
    # left truncation depends on the continuation's length, so a truncated request gets its own row
    short_max = len(encode_pair(tiny_tokenizer, ctx, conts[1])[0]) + len(encode_pair(tiny_tokenizer, ctx, conts[1])[1]) - 3
    lls, truncated = evaluation._loglikelihoods(model, tiny_tokenizer, [(ctx, conts[1]), (ctx, conts[2])], 2, short_max)
    assert truncated == [True, False]
    assert lls == pytest.approx([_reference_ll(model, tiny_tokenizer, ctx, conts[1], short_max), ref[2]], abs=1e-4)


def test_loglikelihood_does_not_depend_on_padding(model, tiny_tokenizer):
    short = ("Q: hi\nA:", " B")
    alone = loglikelihoods(model, tiny_tokenizer, [short], batch_size=1, max_length=256)[0]
    long_ctx = ("The following are multiple choice questions (with answers) about math. " * 3, " A")
    together = loglikelihoods(model, tiny_tokenizer, [long_ctx, short], batch_size=2, max_length=256)[1]
    assert together == pytest.approx(alone, abs=1e-5)


def test_long_contexts_are_left_truncated_and_counted(model, tiny_tokenizer):
    c, x = REQUESTS[4]
    ctx, cont = encode_pair(tiny_tokenizer, c, x)
    max_length = len(ctx) + len(cont) - 6  # 5 context tokens must go
    lls, truncated = evaluation._loglikelihoods(model, tiny_tokenizer, [(c, x), REQUESTS[2]], 2, max_length)
    assert truncated == [True, False]
    assert lls[0] == pytest.approx(_reference_ll(model, tiny_tokenizer, c, x, max_length), abs=1e-4)
    assert lls[0] != pytest.approx(_reference_ll(model, tiny_tokenizer, c, x), abs=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihoods(model, tiny_tokenizer, [(c, x)], 1, max_length=len(cont) - 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        loglikelihoods(model, tiny_tokenizer, [(c, x)], 1, max_length=257)


# --------------------------------------------------------------------------- evaluate, end to end


def _mean_stderr(xs):
    return statistics.stdev(xs) / math.sqrt(len(xs))


def test_evaluate_scores_match_their_items(model, tiny_tokenizer, data_dir, monkeypatch):
    sent: list[list[int]] = []
    real_generate = evaluation.HFRolloutEngine.generate

    def spy(self, prompt_ids, params, seed):
        sent.extend(prompt_ids)
        return real_generate(self, prompt_ids, params, seed)

    monkeypatch.setattr(evaluation.HFRolloutEngine, "generate", spy)
    scores, items = evaluate(model, tiny_tokenizer, data_dir, EvalParams(**PARAMS))

    assert set(scores) == {
        "gsm8k_strict", "gsm8k_strict_stderr", "gsm8k_flexible", "gsm8k_flexible_stderr", "gsm8k_noanswer",
        "gsm8k_n", "truthfulqa_mc1", "truthfulqa_mc1_stderr", "truthfulqa_mc2", "truthfulqa_mc2_stderr",
        "truthfulqa_n", "mmlu_acc", "mmlu_acc_stderr", "mmlu_n", "n_truncated",
    }  # fmt: skip
    for key in ("gsm8k_strict", "gsm8k_flexible", "gsm8k_noanswer", "truthfulqa_mc1", "truthfulqa_mc2", "mmlu_acc"):
        assert 0.0 <= scores[key] <= 1.0, key
    assert (scores["gsm8k_n"], scores["truthfulqa_n"], scores["mmlu_n"], scores["n_truncated"]) == (3, 2, 3, 0)

    g, t, m = items["gsm8k"], items["truthfulqa"], items["mmlu"]
    assert [it["id"] for it in g] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    assert [it["id"] for it in t] == ["truthfulqa/0", "truthfulqa/1"]
    assert [(it["id"], it["subject"], it["gold"]) for it in m] == [
        ("mmlu/0", "high_school_math", 1), ("mmlu/1", "geography", 2), ("mmlu/2", "high_school_math", 0)
    ]  # fmt: skip
    strict = [float(it["correct"]) for it in g]
    assert scores["gsm8k_strict"] == pytest.approx(sum(strict) / 3)
    assert scores["gsm8k_strict_stderr"] == pytest.approx(_mean_stderr(strict))
    assert scores["gsm8k_noanswer"] == pytest.approx(sum(it["strict_pred"] is None for it in g) / 3)
    mc2 = [it["mc2"] for it in t]
    assert scores["truthfulqa_mc2"] == pytest.approx(sum(mc2) / 2)
    assert scores["truthfulqa_mc2_stderr"] == pytest.approx(_mean_stderr(mc2))
    assert scores["truthfulqa_mc1"] == pytest.approx(sum(it["correct"] for it in t) / 2)
    assert scores["mmlu_acc"] == pytest.approx(sum(it["correct"] for it in m) / 3)
    for it, row in zip(t, TRUTHFULQA, strict=True):
        assert it["correct"] == (row["mc1_targets"]["labels"][it["mc1_pred"]] == 1)
    for it in m:
        assert it["correct"] == (it["prediction"] == it["gold"])

    # the GSM8K prompts actually sent: each row's own two shots, drawn as the harness draws them (one
    # Random(1234) sampling the pool's docs, row by row in file order), and the question
    assert len(sent) == 3
    texts = [tiny_tokenizer.decode(ids) for ids in sent]
    rnd = random.Random(1234)
    expected = [prompts.gsm8k_prompt(row["question"], rnd.sample(GSM8K_FEWSHOT, 2)) for row in GSM8K_TEST]
    assert sorted(texts) == sorted(expected)
    first_two = [prompts.gsm8k_prompt(row["question"], GSM8K_FEWSHOT[:2]) for row in GSM8K_TEST]
    assert sum(e != f for e, f in zip(expected, first_two)) >= 2  # the draws are not the pool's first rows
    # each prediction is the greedy rollout of the prompt, cut at the GSM8K stops and the EOS text
    for it in g:
        assert not any(s in it["prediction"] for s in (*prompts.GSM8K_STOPS, "<|endoftext|>"))


def test_evaluate_is_deterministic_and_limits_rows(model, tiny_tokenizer, data_dir):
    p = EvalParams(**{**PARAMS, "gsm8k_limit": 2, "mmlu_limit": 2, "gen_batch_size": 3})
    a = evaluate(model, tiny_tokenizer, data_dir, p)
    b = evaluate(model, tiny_tokenizer, data_dir, p)
    assert a == b
    assert (a[0]["gsm8k_n"], a[0]["truthfulqa_n"], a[0]["mmlu_n"]) == (2, 2, 2)
    # greedy: batch size does not change the predictions
    p1 = EvalParams(**{**p.model_dump(), "gen_batch_size": 1})
    _, c, _ = evaluation.eval_gsm8k(model, tiny_tokenizer, data_dir, p1, 0)
    assert [it["prediction"] for it in c] == [it["prediction"] for it in a[1]["gsm8k"]]


def test_truncation_is_counted(model, tiny_tokenizer, data_dir):
    p = EvalParams(**{**PARAMS, "max_length": 60})
    scores, _ = evaluate(model, tiny_tokenizer, data_dir, p)
    # gsm8k prompts (2 shots, > 60 - 8 tokens) and 1-shot mmlu prompts (> 100 tokens) are truncated;
    # the preamble-free truthfulqa requests fit in max_length + 1 tokens
    tqa = [
        sum(map(len, encode_pair(tiny_tokenizer, prompts.truthfulqa_prompt(r["question"], ""), x)))
        for r in TRUTHFULQA
        for x in prompts.truthfulqa_continuations(r["mc1_targets"]["choices"] + r["mc2_targets"]["choices"])
    ]
    assert 50 < max(tqa) <= 61
    assert scores["n_truncated"] == 3 + 3


def test_max_length_none_is_the_model_configs(model, tiny_tokenizer, data_dir):
    # the tiny model allows 256 positions: None must score and truncate exactly as an explicit 256 does
    small = {**PARAMS, "gsm8k_limit": 2, "mmlu_limit": 2}
    assert evaluation.resolve_max_length(model, tiny_tokenizer, None) == 256
    assert evaluate(model, tiny_tokenizer, data_dir, EvalParams(**{**small, "max_length": None})) == evaluate(
        model, tiny_tokenizer, data_dir, EvalParams(**small)
    )
    assert evaluate(model, tiny_tokenizer, data_dir, EvalParams(**{**small, "max_length": 60}))[0]["n_truncated"] > 0


def test_gsm8k_contexts_draw_per_row_and_a_limit_keeps_a_prefix():
    p = EvalParams(**PARAMS)
    rows = [{"question": f"q{i}", "answer": "#### 1"} for i in range(6)]
    pool = [{"question": f"shot{i}", "answer": f"#### {i}"} for i in range(10)]
    full = evaluation.gsm8k_contexts(rows, pool, p)
    assert evaluation.gsm8k_contexts(rows[:2], pool, p) == full[:2]  # --limit 2: the first two of a full run
    rnd = random.Random(1234)  # the harness: one Random(seed), pool docs sampled row by row
    assert full == [prompts.gsm8k_prompt(r["question"], rnd.sample(pool, 2)) for r in rows]
    other_seed = evaluation.gsm8k_contexts(rows, pool, EvalParams(**{**PARAMS, "gsm8k_fewshot_seed": 0}))
    assert other_seed != full and [c.rsplit("\n\n", 1)[1] for c in other_seed] == [c.rsplit("\n\n", 1)[1] for c in full]
    zero = evaluation.gsm8k_contexts(rows, pool, EvalParams(**{**PARAMS, "gsm8k_fewshot": 0}))
    assert zero == [f"Question: q{i}\nAnswer:" for i in range(6)]


# --------------------------------------------------------------------------- contrived model: aggregation


class _FixedEngine:
    """Stands in for HFRolloutEngine: returns fixed completions in prompt order."""

    completions = ["so 2 + 2 = 4\n#### 4", "It is 7.", "#### 50 legs"]

    def __init__(self, model, tokenizer, batch_size):
        pass

    def generate(self, prompt_ids, params, seed):
        assert params.temperature == 0.0 and params.stop == (*prompts.GSM8K_STOPS, "<|endoftext|>")
        n = len(prompt_ids)
        # evaluate sorts prompts by length; map back through the question each prompt ends with
        return Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=[[] for _ in range(n)],
            answer_lens=[0] * n,
            texts=[self._answer_for(p) for p in prompt_ids],
            logprobs=[[] for _ in range(n)],
            finished=[True] * n,
        )

    def _answer_for(self, ids):
        text = self.tok.decode(ids)
        (i,) = [i for i, row in enumerate(GSM8K_TEST) if text.endswith(f"Question: {row['question']}\nAnswer:")]
        return self.completions[i]


def test_aggregation_with_contrived_generations_and_loglikelihoods(tiny_tokenizer, data_dir, monkeypatch):
    _FixedEngine.tok = tiny_tokenizer
    monkeypatch.setattr(evaluation, "HFRolloutEngine", _FixedEngine)
    # LL = -(number of characters of the continuation): shorter choices win
    def fake(model, tok, reqs, bs, ml):
        return [-float(len(x)) for _, x in reqs], [False] * len(reqs)

    monkeypatch.setattr(evaluation, "_loglikelihoods", fake)
    scores, items = evaluate(None, tiny_tokenizer, data_dir, EvalParams(**PARAMS))

    # GSM8K: strict right, strict missing (flexible "7." -> "7" right), strict wrong (50 != 48)
    g = items["gsm8k"]
    assert [(it["strict_pred"], it["flexible_pred"]) for it in g] == [("4", "4"), (None, "7."), ("50", "50")]
    assert [(it["correct"], it["flexible_correct"]) for it in g] == [(True, True), (False, True), (False, False)]
    assert scores["gsm8k_strict"] == pytest.approx(1 / 3)
    assert scores["gsm8k_flexible"] == pytest.approx(2 / 3)
    assert scores["gsm8k_noanswer"] == pytest.approx(1 / 3)
    assert scores["gsm8k_strict_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))  # sqrt(p(1-p)/(n-1))

    # TruthfulQA row 0: mc1 argmax " Nice"/" Lyon" tie at -5 -> first, " Lyon" (label 0): wrong;
    #   mc2 = (e^-6 + e^-12) / (e^-6 + e^-12 + e^-5).  Row 1: mc1 " Nothing happens"(-16) vs -21: right;
    #   mc2 = (e^-8 + e^-18) / (e^-8 + e^-18 + e^-8).
    assert [it["mc1_pred"] for it in items["truthfulqa"]] == [1, 1]
    assert [it["correct"] for it in items["truthfulqa"]] == [False, True]
    e = math.exp
    mc2 = [(e(-6) + e(-12)) / (e(-6) + e(-12) + e(-5)), (e(-8) + e(-18)) / (e(-8) + e(-18) + e(-8))]
    assert [it["mc2"] for it in items["truthfulqa"]] == pytest.approx(mc2)
    assert scores["truthfulqa_mc1"] == 0.5 and scores["truthfulqa_mc2"] == pytest.approx(sum(mc2) / 2)

    # MMLU letter style: all four continuations " A".." D" have 2 characters -> tie -> index 0
    assert [it["prediction"] for it in items["mmlu"]] == [0, 0, 0]
    assert scores["mmlu_acc"] == pytest.approx(1 / 3)  # only row 2 has gold 0


def test_mmlu_continuation_style_and_world_preamble(tiny_tokenizer, data_dir, monkeypatch):
    seen: list[tuple[str, str]] = []

    def fake(model, tok, reqs, bs, ml):
        seen.extend(reqs)
        return [-float(len(x)) for _, x in reqs], [False] * len(reqs)

    monkeypatch.setattr(evaluation, "_loglikelihoods", fake)
    p = EvalParams(**{**PARAMS, "mmlu_style": "continuation", "truthfulqa_preamble": "world"})
    with pytest.raises(FileNotFoundError, match="truthfulqa_preamble.txt"):
        evaluation.eval_truthfulqa(None, tiny_tokenizer, data_dir, p)
    (data_dir / "truthfulqa_preamble.txt").write_text("Q: Is the sky green?\nA: No.\n")
    evaluation.eval_truthfulqa(None, tiny_tokenizer, data_dir, p)
    assert seen[0] == ("Q: Is the sky green?\nA: No.\n\nQ: What is the capital of France?\nA:", " Paris")

    seen.clear()
    scores, items, _ = evaluation.eval_mmlu(None, tiny_tokenizer, data_dir, p)
    # shortest answer text wins: "5"/"4"/"6"/"7" tie -> 0; "Porto"(5) vs "Rome"(4) -> 3; "9","6","3","0" -> 0
    assert [it["prediction"] for it in items] == [0, 3, 0]
    assert seen[0][0].startswith("The following are questions (with answers) about high school math.\n\n")
    assert "Question: 1 + 1 = ?\nAnswer: 2\n\n" in seen[0][0]  # the subject's first dev row as the shot


def test_missing_shots_fail_loudly(tiny_tokenizer, data_dir):
    with pytest.raises(ValueError, match="few-shot pool has only 3"):
        evaluation.eval_gsm8k(None, tiny_tokenizer, data_dir, EvalParams(**{**PARAMS, "gsm8k_fewshot": 4}), 0)
    with pytest.raises(ValueError, match="geography"):
        evaluation.eval_mmlu(None, tiny_tokenizer, data_dir, EvalParams(**{**PARAMS, "mmlu_fewshot": 2}))


# --------------------------------------------------------------------------- real rows (offline copies)


def test_evaluate_runs_on_real_hub_rows(model, tiny_tokenizer, tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline benchmark copies not found at {SHARED_DATA}")

    def head(path: Path, n: int):
        with open(path, encoding="utf-8") as f:
            return [json.loads(next(f)) for _ in range(n)]

    _write_jsonl(tmp_path / "gsm8k" / "fewshot.jsonl", head(SHARED_DATA / "gsm8k" / "train.jsonl", 1))
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", head(SHARED_DATA / "gsm8k" / "test.jsonl", 2))
    _write_jsonl(tmp_path / "truthfulqa" / "mc.jsonl", head(SHARED_DATA / "truthfulqa" / "multiple_choice.jsonl", 2))
    _write_jsonl(tmp_path / "mmlu" / "dev.jsonl", head(SHARED_DATA / "mmlu" / "dev.jsonl", 5))
    _write_jsonl(tmp_path / "mmlu" / "test.jsonl", head(SHARED_DATA / "mmlu" / "test.jsonl", 2))
    p = EvalParams(**{**PARAMS, "gsm8k_fewshot": 1, "truthfulqa_preamble": "harness", "gsm8k_max_new_tokens": 16})
    scores, items = evaluate(model, tiny_tokenizer, tmp_path, p)
    assert (scores["gsm8k_n"], scores["truthfulqa_n"], scores["mmlu_n"]) == (2, 2, 2)
    assert scores["n_truncated"] >= 2  # the harness preamble alone is longer than 256 byte-level tokens here
    assert all(0 <= it["mc2"] <= 1 for it in items["truthfulqa"])
