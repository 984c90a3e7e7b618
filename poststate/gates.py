""""Did the method learn?": each trained run measures its own objective on held-out data, before and after.

A verdict on a finding is only worth something when the run behind it did its job. Each method's gate
takes the method's own objective, with its own code path (source, signal, loss), on items it never
trained on, with the initial model (before) and the trained one (after), per item:

| method                  | held-out items                       | objective (per item)                         |
|-------------------------|--------------------------------------|----------------------------------------------|
| SFT                     | gsm8k/sft_heldout.jsonl rows         | gold-token NLL (token mean over the answer)  |
| RL                      | gsm8k/prompts_heldout.jsonl prompts  | reward at the rollout temperature (mean of `gate_samples` samples) and greedy |
| OPD                     | gsm8k/prompts_heldout.jsonl prompts  | CE of the teacher's continuation from states of the student's own rollouts: drawn once from the initial student (primary: the same states before and after), and again from the trained one (secondary) |
| teacher-state control   | gsm8k/prompts_heldout.jsonl prompts  | CE of the teacher's continuation from states of the teacher's rollouts (the same before and after) |

Sampling design: items are the held-out rows/prompts (independent draws of the method's training
distribution). Before and after draw from ONE random stream (common random numbers): where the states or
samples depend on the model (OPD, RL) the two measurements are coupled draws, so the per-item difference
keeps its expectation (the difference of the two expectations) and loses most of the sampling noise; the
teacher-state control's states do not depend on the student, so they are the same states before and after.
OPD's stream is per run and seed (each seed has its own teacher). RL's is per run: every seed starts from
the same policy, the base, so its "before" is measured once and every seed's "after" draws on the same
stream - each seed's difference is still exactly paired; across seeds the "before" is one more property
of the item, which the seeds x items interval treats as such (`stats.seed_item_interval`: items crossed
with seeds). (The drift instruments do the opposite, on purpose: a two-sample distance between
coupled samples is biased toward 0, so drift samples come from independent streams.) The report turns
the per-item (before, after) pairs into an improvement with a CI over items (per seed) and over seeds x
items (`stats.seed_item_interval`) and calls a run *valid* when its per-seed CI lies above 0 on every seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from poststate.methods import GoldTokens, RolloutStates, States, TeacherContinuation, encode_gold, encode_prompt
from poststate.objective import LossConfig, row_values
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.prompts import GSM8K_STOPS
from poststate.scoring import gsm8k_reward
from poststate.streams import stream_seed

GATE_BATCH = 64  # rows per scoring micro-batch (held-out measurement only)


def _per_row(lm, sup, max_len: int, pad_id: int, cfg: LossConfig, teacher=None) -> list[float]:
    """Per-row mean loss of a supervised batch, in the batch's row order (NaN for a row without states)."""
    device = next(lm.parameters()).device
    out = [float("nan")] * len(sup.seqs)
    for micro in sup.micro_batches(GATE_BATCH, max_len, pad_id):
        for b, v in zip(micro.rows, row_values(lm, micro.to(device), cfg, teacher).tolist()):
            out[b] = v
    return out


def sft_nll(lm, tokenizer, rows: Sequence[dict[str, Any]], max_len: int) -> list[float]:
    """Per held-out row: the model's mean NLL of the gold answer tokens (SFT's own loss)."""
    states = States("dataset", [encode_prompt(tokenizer, r) for r in rows], [encode_gold(tokenizer, r) for r in rows],
                    list(rows), list(range(len(rows))), True)
    return _per_row(lm, GoldTokens().supervise(states, lm), max_len, tokenizer.pad_token_id, LossConfig(kind="tokens"))


def rl_reward(lm, tokenizer, rows: Sequence[dict[str, Any]], sampling, samples: int, gen_batch_size: int,
              stream: tuple) -> dict[str, list[float]]:
    """Per held-out prompt: the exact-answer reward (the eval's scorer) of the greedy completion, and the
    mean over `samples` completions at the rollout temperature."""
    engine = HFRolloutEngine(None, tokenizer, gen_batch_size)
    engine.sync(lm)
    prompts = [encode_prompt(tokenizer, r) for r in rows]
    greedy = SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=0.0, stop=GSM8K_STOPS)
    sampled = SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                             top_p=sampling.top_p, stop=GSM8K_STOPS)
    g = engine.generate(prompts, greedy, seed=0)
    s = engine.generate([p for p in prompts for _ in range(samples)], sampled, seed=stream_seed(*stream, "sampled"))
    r_s = [gsm8k_reward(t, rows[i // samples]["answer"]) for i, t in enumerate(s.texts)]
    return {
        "reward_greedy": [gsm8k_reward(t, r["answer"]) for t, r in zip(g.texts, rows)],
        "reward_sampled": [sum(r_s[i * samples : (i + 1) * samples]) / samples for i in range(len(rows))],
    }


def opd_states(lm, tokenizer, rows: Sequence[dict[str, Any]], teacher, p, who: str, samples: int, stream: tuple):
    """Held-out OPD states with their supervision: `samples` rollouts per held-out prompt (the model's own
    for OPD, `who="learner"`; the teacher's for the teacher-state control), up to K cut states each, and
    the teacher's continuation from every state. Returns (the supervised batch, the prompt of each row)."""
    source = RolloutStates(who, list(rows), tokenizer, p.rollout, len(rows), samples, stream, p.gen_batch_size,
                           cuts=p.continuation, teacher=teacher)
    if who == "learner":
        source.engine.sync(lm)
    states = source.rollouts([list(range(len(rows)))])[0]
    signal = TeacherContinuation(teacher, tokenizer, p.continuation, p.gen_batch_size, stream, p.rollout.max_new_tokens)
    return signal.supervise(states, lm), list(states.group)


def opd_ce(lm, tokenizer, held, n_prompts: int, max_len: int) -> list[float]:
    """Per held-out prompt: the model's mean CE on the teacher's continuations of its states (`opd_states`)
    - OPD's own loss. Scoring the same states before and after training makes the difference exactly paired."""
    sup, group = held
    per_state = _per_row(lm, sup, max_len, tokenizer.pad_token_id, LossConfig(kind="tokens"))
    sums, counts = [0.0] * n_prompts, [0] * n_prompts
    for g, v in zip(group, per_state):
        if v == v:  # a state whose continuation is empty has no loss (NaN): skip it
            sums[g] += v
            counts[g] += 1
    return [s / c if c else float("nan") for s, c in zip(sums, counts)]


def record(objectives: dict[str, dict[str, Any]], primary: str) -> dict[str, Any]:
    """The gate file: per objective its direction, item ids, before and after values."""
    if primary not in objectives:
        raise KeyError(f"primary gate objective {primary!r} not among {sorted(objectives)}")
    for name, o in objectives.items():
        if len(o["before"]) != len(o["after"]) or len(o["before"]) != len(o["items"]):
            raise ValueError(f"gate objective {name}: {len(o['items'])} items, {len(o['before'])} before, {len(o['after'])} after")
        if o["better"] not in ("lower", "higher"):
            raise ValueError(f"gate objective {name}: better = {o['better']!r}")
    return {"primary": primary, "objectives": objectives}


def improvement(o: dict[str, Any]) -> list[float]:
    """Per item, how much the objective improved (after - before when higher is better, else before - after)."""
    sign = 1.0 if o["better"] == "higher" else -1.0
    return [sign * (a - b) for b, a in zip(o["before"], o["after"])]


__all__ = ["improvement", "opd_ce", "record", "rl_reward", "sft_nll"]
