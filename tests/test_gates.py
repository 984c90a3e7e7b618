"""Validity gates: each method's own objective on held-out items, per item, computed by hand here."""

from __future__ import annotations

import math

import pytest
import torch

from poststate import gates, methods, scoring
from poststate.params import Opd, Sampling
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.prompts import GSM8K_STOPS
from poststate.streams import stream_seed
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7.\n#### 7"},
    {"question": "She sold 48 clips. How many?", "answer": "48 clips.\n#### 48"},
    {"question": "Ann has 2 pens and 5 cups. How many things?", "answer": "2 + 5 = 7 things in all.\n#### 7"},
]


def row_nll(lm, ids: list[int], first: int, max_len: int) -> float:
    """Mean NLL of ids[first:] given what precedes each, the row left-truncated to its last max_len tokens."""
    cut = max(0, len(ids) - max_len)
    seq = ids[cut:]
    with torch.no_grad():
        logp_TV = torch.log_softmax(lm(torch.tensor([seq])).logits[0].float(), -1)
    nll = [-float(logp_TV[t, seq[t + 1]]) for t in range(max(first - 1 - cut, 0), len(seq) - 1)]
    return sum(nll) / len(nll)


@pytest.mark.parametrize("max_len", [512, 30])
def test_sft_nll_is_the_per_row_mean_gold_nll(tiny_tokenizer, max_len):
    lm = build_tiny_model(tiny_tokenizer, init_std=0.3)
    got = gates.sft_nll(lm, tiny_tokenizer, ROWS, max_len)
    want = []
    for r in ROWS:
        x, y = methods.encode_prompt(tiny_tokenizer, r), methods.encode_gold(tiny_tokenizer, r)
        if max_len < 512:
            assert len(x) + len(y) > max_len  # left-truncated: the prompt loses its first tokens
        want.append(row_nll(lm, x + y, len(x), max_len))
    assert got == pytest.approx(want, rel=1e-5)
    assert len(set(got)) == 3  # rows differ: a mix-up of rows would show


def test_record_validates_and_names_the_bad_input():
    ok = {"nll": {"better": "lower", "items": ["a", "b"], "before": [2.0, 1.0], "after": [1.5, 1.25]}}
    assert gates.record(ok, "nll") == {"primary": "nll", "objectives": ok}
    with pytest.raises(KeyError, match="'reward'.*'nll'"):
        gates.record(ok, "reward")
    short = {"nll": {**ok["nll"], "after": [1.0]}}
    with pytest.raises(ValueError, match="gate objective nll: 2 items, 2 before, 1 after"):
        gates.record(short, "nll")
    with pytest.raises(ValueError, match="gate objective nll: better = 'sideways'"):
        gates.record({"nll": {**ok["nll"], "better": "sideways"}}, "nll")


def test_improvement_signs():
    assert gates.improvement({"better": "lower", "before": [2.0, 1.0], "after": [1.5, 1.25]}) == [0.5, -0.25]
    assert gates.improvement({"better": "higher", "before": [0.25, 1.0], "after": [0.5, 0.0]}) == [0.25, -1.0]


def test_rl_reward_greedy_and_sampled_per_item(tiny_tokenizer, monkeypatch):
    assert gates.gsm8k_reward is scoring.gsm8k_reward  # the eval's own scorer
    parity = lambda text, answer: float(len(text) % 2)  # a reward with spread on a random model
    monkeypatch.setattr(gates, "gsm8k_reward", parity)
    lm = build_tiny_model(tiny_tokenizer, init_std=0.5)
    sampling = Sampling(max_new_tokens=10, temperature=1.0, top_p=1.0)
    out = gates.rl_reward(lm, tiny_tokenizer, ROWS, sampling, samples=4, gen_batch_size=5, stream=("gate", "rl", 0))
    assert set(out) == {"reward_greedy", "reward_sampled"} and all(len(v) == 3 for v in out.values())
    prompts = [methods.encode_prompt(tiny_tokenizer, r) for r in ROWS]
    engine = HFRolloutEngine(lm, tiny_tokenizer, 5)
    greedy = engine.generate(prompts, SamplingParams(10, 0.0, stop=GSM8K_STOPS), seed=0)
    assert out["reward_greedy"] == [parity(t, None) for t in greedy.texts]
    sampled = engine.generate([p for p in prompts for _ in range(4)], SamplingParams(10, 1.0, stop=GSM8K_STOPS),
                              seed=stream_seed("gate", "rl", 0, "sampled"))
    want = [sum(parity(t, None) for t in sampled.texts[4 * i : 4 * i + 4]) / 4 for i in range(3)]
    assert out["reward_sampled"] == want and len(set(sampled.texts)) > 3


class RecordingContinuation(gates.TeacherContinuation):
    seen: list = []

    def supervise(self, states, policy):
        sup = super().supervise(states, policy)
        RecordingContinuation.seen.append((states, sup))
        return sup


def opd_params() -> Opd:
    return Opd.model_validate(dict(
        lr=1e-3, batch_size=4, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, max_len=160, adapter={"kind": "lora"},
        signal="continuation", states="student", init="base", steps=1, prompts_per_step=3, gen_batch_size=4,
        rollout={"max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0},
        continuation={"cuts": 2, "cut_rule": "uniform", "length": 4, "temperature": 0.0},
        kl={"direction": "reverse", "estimator": "full"}))


@pytest.mark.parametrize("who", ["teacher", "learner"])
def test_opd_ce_per_item_and_the_control_states_do_not_depend_on_the_student(tiny_tokenizer, monkeypatch, who):
    monkeypatch.setattr(gates, "TeacherContinuation", RecordingContinuation)
    RecordingContinuation.seen = []
    teacher = build_tiny_model(tiny_tokenizer, seed=1, init_std=0.5)
    before, after = build_tiny_model(tiny_tokenizer, seed=2, init_std=0.5), build_tiny_model(tiny_tokenizer, seed=3, init_std=0.5)
    p = opd_params()
    stream = ("gate", "opd", 0)
    held = [gates.opd_states(lm, tiny_tokenizer, ROWS, teacher, p, who, 2, stream) for lm in (before, after)]
    assert len(RecordingContinuation.seen) == 2
    for lm, h, (states, sup) in zip((before, after), held, RecordingContinuation.seen):
        assert states.origin == who and h[0] is sup and h[1] == list(states.group)
        assert sorted(set(states.group)) == [0, 1, 2] and len(states.group) >= 3  # 2 rollouts x up to K cuts per prompt
        assert len(states.group) <= len(ROWS) * 2 * p.continuation.cuts
        got = gates.opd_ce(lm, tiny_tokenizer, h, len(ROWS), p.max_len)
        # by hand: per cut state the mean CE of the teacher's continuation, then the mean over the item's states
        per_state = [row_nll(lm, s, pos[0] + 1, p.max_len) if pos else None for s, pos in zip(sup.seqs, sup.positions)]
        for g in range(3):
            mine = [v for v, gg in zip(per_state, states.group) if gg == g and v is not None]
            assert got[g] == pytest.approx(sum(mine) / len(mine), rel=1e-5) if mine else math.isnan(got[g])
    (s0, _), (s1, _) = RecordingContinuation.seen
    same = (s0.prompt_ids, s0.prefix_ids, s0.group) == (s1.prompt_ids, s1.prefix_ids, s1.group)
    assert same == (who == "teacher")  # the control's states come from the teacher alone; OPD's from each model
    # the gate scores one set of states with both models: an exactly paired difference
    paired = [gates.opd_ce(lm, tiny_tokenizer, held[0], len(ROWS), p.max_len) for lm in (before, after)]
    assert paired[0] != paired[1]
    assert any(a != b for a, b in zip(*paired) if not math.isnan(a))  # on a scored item, not a NaN (no states) one