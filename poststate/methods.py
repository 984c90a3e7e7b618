"""A post-training method is a pair (state source, signal).

A *state* is a prompt plus a response prefix, s_t = (x, y_<t). A state source draws the states of one
optimizer step (from a dataset, from the learner's own rollouts, or from the teacher's); a signal turns
them into a supervised batch (gold tokens, a teacher continuation, teacher distributions, or rewards). The
one loop in `loop.py` never needs to know which method it runs.

| method                         | source                                | signal                   |
|--------------------------------|---------------------------------------|--------------------------|
| SFT                            | DatasetStates (gold prefixes)         | GoldTokens               |
| OPD continuation (the paper's) | RolloutStates(learner, K cuts)        | TeacherContinuation      |
| OPD one-step KL                | RolloutStates(learner, K cuts)        | TeacherDistribution      |
| OPD token-level KL             | RolloutStates(learner)                | TeacherDistribution / TeacherSampledLogp |
| teacher-state control          | RolloutStates(teacher, K cuts)        | TeacherContinuation      |
| RL (GRPO-style)                | RolloutStates(learner, G per prompt)  | Reward                   |

The teacher-state control is the state-axis control of the paper's OPD: the same teacher, signal and loss,
on prefixes of the *teacher's* own rollouts (off-policy for the student) instead of the student's. It is not
Kim & Rush's sequence-level KD (which trains on whole teacher sequences): here the teacher continues L
tokens from a cut in its own rollout, exactly as it does from a cut in the student's for OPD.

Data parallelism: every source draws the *global* step batch with the same seeded order on every process
and keeps its rank's share (`Shard`): rows `rank::world` of a dataset step, prompts `rank::world` of a
rollout step (whole prompt groups, so group-relative advantages stay within a process). Sampling streams
are named by rank, so ranks never share random draws.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from poststate import losses
from poststate.objective import LossConfig, Micro
from poststate.prompts import GSM8K_STOPS, gsm8k_prompt, gsm8k_target
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.scoring import gsm8k_reward
from poststate.streams import stream_seed

if TYPE_CHECKING:  # params (pydantic) only for annotations: the core imports with torch, transformers, peft, accelerate
    from poststate.params import Continuation, Sampling

Tensor = torch.Tensor


@dataclass(frozen=True)
class Shard:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world: int = 1

    def take(self, items: Sequence, what: str) -> list:
        """Items rank, rank + world, ... of a global list whose length the world size must divide."""
        if len(items) % self.world:
            raise ValueError(f"{what}: {len(items)} per step cannot be split evenly over {self.world} processes")
        return list(items[self.rank :: self.world])


@dataclass(frozen=True)
class States:
    """A batch of training states. Each entry is a prompt x and a response prefix y.

    `all_prefixes=True`: every prefix (x, y_<t), t = 0..len(y)-1, is a state (teacher-forced trajectories:
    SFT's gold answers, RL's samples). `all_prefixes=False`: only the full (x, y) is the state (cut points).
    `texts`: the scorer's reading of each sampled completion (rollouts only).
    """

    origin: str  # "dataset" | "corpus" | "learner" | "teacher"
    prompt_ids: list[list[int]]
    prefix_ids: list[list[int]]
    rows: list[dict[str, Any]]
    group: list[int]  # which prompt of this batch each state came from
    all_prefixes: bool
    texts: list[str] | None = None


@dataclass
class Supervised:
    """A step batch, row by row: `seqs[b]` is a training sequence, `positions[b]` its state positions (the
    logits at t predict seqs[b][t + 1]). `prompt_lens[b]` is the prompt's length in seqs[b]."""

    kind: str  # "tokens" | "distribution" | "sampled_kl" | "reward"
    seqs: list[list[int]]
    positions: list[list[int]]
    prompt_lens: list[int]
    origin: str
    adv: list[float] | None = None  # reward: per row
    teacher: Any = None  # distribution / sampled_kl: the frozen teacher, scored per micro-batch
    stats: dict[str, float] = field(default_factory=dict)
    _micro: dict[tuple[int, int, int], list[Micro]] = field(default_factory=dict, repr=False)

    def units(self, agg: losses.Agg, max_len: int) -> int:
        """Loss units of this (local) batch after truncation to max_len: states, or sequences with >= 1 state."""
        kept = [[p for p in pos if p - max(0, len(s) - max_len) >= 0] for s, pos in zip(self.seqs, self.positions)]
        return sum(map(len, kept)) if agg == "token_mean" else sum(1 for k in kept if k)

    def micro_batches(self, batch_size: int, max_len: int, pad_id: int) -> list[Micro]:
        """The rows as micro-batches of at most `batch_size` rows of similar length (longest first), each
        right-padded to its own longest row. Rows longer than max_len are left-truncated (the prompt loses
        its oldest tokens; states shift with it, states that fall off are dropped). Cached per size: a
        batch reused for PPO epochs gets the same micro-batches back (the loop keeps their device copies,
        on which the first pass stores pi_old)."""
        key = (batch_size, max_len, pad_id)
        if key not in self._micro:
            order = sorted(range(len(self.seqs)), key=lambda b: (-min(len(self.seqs[b]), max_len), b))
            self._micro[key] = [self._micro_batch(order[i : i + batch_size], max_len, pad_id)
                                for i in range(0, len(order), batch_size)]
        return self._micro[key]

    def _micro_batch(self, rows: list[int], max_len: int, pad_id: int) -> Micro:
        cut = [max(0, len(self.seqs[b]) - max_len) for b in rows]
        seqs = [self.seqs[b][c:] for b, c in zip(rows, cut)]
        T = max(len(s) for s in seqs)
        ids_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
        attn_BT = torch.zeros((len(rows), T), dtype=torch.long)
        pos, tgt, row, adv = [], [], [], []
        for r, (b, s, c) in enumerate(zip(rows, seqs, cut)):
            ids_BT[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn_BT[r, : len(s)] = 1
            for p in self.positions[b]:
                t = p - c
                if t < 0:
                    continue
                pos.append(r * T + t)
                tgt.append(s[t + 1] if t + 1 < len(s) else pad_id)  # distribution states have no target token
                row.append(r)
                if self.adv is not None:
                    adv.append(self.adv[b])
        return Micro(
            ids_BT=ids_BT,
            attn_BT=attn_BT,
            pos_N=torch.tensor(pos, dtype=torch.long),
            target_N=torch.tensor(tgt, dtype=torch.long),
            row_N=torch.tensor(row, dtype=torch.long),
            adv_N=torch.tensor(adv, dtype=torch.float32) if self.adv is not None else None,
            rows=list(rows),
        )

    def sample(self, k: int) -> list[dict[str, Any]]:
        """Up to k rows (evenly spaced) as the tokens the loss was applied to, for the locality diagnostic:
        `ids` = context + supervised tokens, scored from `score_from`. Distribution signals have no target
        tokens: their state's own prefix (after the prompt) is recorded instead."""
        n = len(self.seqs)
        picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})
        out = []
        for b in picks:
            pos = self.positions[b]
            if not pos:
                continue
            if self.kind in ("tokens", "reward"):
                ids, start = self.seqs[b][: pos[-1] + 2], pos[0] + 1
            else:
                ids, start = self.seqs[b][: pos[-1] + 1], self.prompt_lens[b]
            if start < len(ids):
                out.append({"origin": self.origin, "ids": ids, "score_from": start, "prompt_len": self.prompt_lens[b]})
        return out


class StateSource(Protocol):
    origin: str

    def draw(self, policy, gathered: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> States: ...


class Signal(Protocol):
    def supervise(self, states: States, policy) -> Supervised: ...


def trajectory_positions(prompt_len: int, response_len: int) -> list[int]:
    """States predicting each response token: positions prompt_len-1 .. prompt_len+response_len-2."""
    return list(range(prompt_len - 1, prompt_len + response_len - 1))


def encode_prompt(tokenizer, row: dict[str, Any]) -> list[int]:
    return tokenizer(gsm8k_prompt(row["question"], shots=[]), add_special_tokens=False)["input_ids"]


def encode_gold(tokenizer, row: dict[str, Any]) -> list[int]:
    return tokenizer(gsm8k_target(row["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# --------------------------------------------------------------------------- state sources


class Epochs:
    """Row indices in seeded per-epoch shuffles: every row once per epoch, batches across epoch ends."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("no rows to draw from")
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        idx = []
        while len(idx) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            idx.append(self.order.pop())
        return idx


class DatasetStates:
    """Dataset states: gold prefixes of the SFT split, in seeded per-epoch shuffles (SFT's q_k).
    A step batch is `rows_per_step` rows (all processes together)."""

    origin = "dataset"

    def __init__(self, rows: list[dict[str, Any]], tokenizer, rows_per_step: int, seed: int, shard: Shard = Shard()):
        if not rows:
            raise ValueError("DatasetStates: no rows")
        self.rows, self.rows_per_step, self.shard = rows, rows_per_step, shard
        self.encoded = [(encode_prompt(tokenizer, r), encode_gold(tokenizer, r)) for r in rows]
        self.epochs = Epochs(len(rows), seed)
        self.drawn: list[list[int]] = []  # row indices of each step's local share (tests check the shards)

    def draw(self, policy, gathered=contextlib.nullcontext) -> States:
        idx = self.shard.take(self.epochs.take(self.rows_per_step), "rows per step (batch_size x grad_accum)")
        self.drawn.append(idx)
        return States(
            origin=self.origin,
            prompt_ids=[self.encoded[i][0] for i in idx],
            prefix_ids=[self.encoded[i][1] for i in idx],
            rows=[self.rows[i] for i in idx],
            group=list(range(len(idx))),
            all_prefixes=True,
        )


class CorpusStates:
    """Pretraining's states: every prefix of seeded random windows of the packed corpus (no prompt)."""

    origin = "corpus"

    def __init__(self, token_ids: list[int], seq_len: int, rows_per_step: int, seed: int, shard: Shard = Shard()):
        if len(token_ids) <= seq_len:
            raise ValueError(f"corpus has {len(token_ids)} tokens, fewer than seq_len={seq_len}")
        self.ids = torch.tensor(token_ids, dtype=torch.long)
        self.seq_len, self.rows_per_step, self.shard = seq_len, rows_per_step, shard
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, policy, gathered=contextlib.nullcontext) -> States:
        starts = torch.randint(0, len(self.ids) - self.seq_len, (self.rows_per_step,), generator=self.gen)
        chunks = [self.ids[s : s + self.seq_len].tolist() for s in self.shard.take(starts.tolist(), "windows per step")]
        # The first token is the "prompt" (a state needs a context); every later token is supervised.
        return States(self.origin, [c[:1] for c in chunks], [c[1:] for c in chunks], [{}] * len(chunks), list(range(len(chunks))), True)


def cut_points(answer_len: int, k: int, rule: str, rng: random.Random) -> list[int]:
    """Up to K distinct cut positions c in [0, answer_len], the state being x + y[:c]: no cut lands at or
    after the rollout's terminator (its EOS or stop string), so the teacher never continues past the end.
    `uniform` samples them without replacement (all of them when fewer than K exist); `stride` spaces them
    evenly (distinct)."""
    if k < 1:
        raise ValueError(f"cuts must be >= 1, got {k}")
    n = answer_len + 1
    if rule == "uniform":
        return sorted(rng.sample(range(n), min(k, n)))
    if rule == "stride":
        m = min(k, n)
        return sorted({i * n // m for i in range(m)})
    raise ValueError(f"cut rule {rule!r}: expected 'uniform' or 'stride'")


class RolloutStates:
    """States from rollouts of a model: the learner's own (OPD, RL: `who="learner"`) or a fixed teacher's
    (the teacher-state control: `who="teacher"`). With `cuts`, up to K prefix states per rollout (inside the
    answer, see `cut_points`); without, whole trajectories through their terminator."""

    def __init__(
        self,
        who: str,
        rows: list[dict[str, Any]],
        tokenizer,
        sampling: Sampling,
        prompts_per_step: int,
        samples_per_prompt: int,
        stream: tuple,
        gen_batch_size: int,
        cuts: Continuation | None = None,
        teacher=None,
        shard: Shard = Shard(),
        engine=None,
    ):
        if who not in ("learner", "teacher"):
            raise ValueError(f"rollout source {who!r}: expected 'learner' or 'teacher'")
        if who == "teacher" and teacher is None:
            raise ValueError("teacher states need a teacher model")
        self.origin, self.rows, self.tokenizer, self.shard = who, rows, tokenizer, shard
        self.sampling = SamplingParams(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p, stop=GSM8K_STOPS
        )
        self.prompts_per_step, self.samples_per_prompt = prompts_per_step, samples_per_prompt
        shard.take(range(prompts_per_step), "prompts per step")  # fail now, not at the first draw
        self.cuts, self.gen_batch_size, self.stream = cuts, gen_batch_size, tuple(stream)
        self.engine = engine or HFRolloutEngine(teacher if who == "teacher" else None, tokenizer, gen_batch_size)
        self.rng = random.Random(stream_seed(*self.stream, "cuts", shard.rank))
        self.epochs = Epochs(len(rows), stream_seed(*self.stream, "prompts"))
        self.calls = 0
        self.gen_seconds = 0.0
        self.generated_tokens = 0
        self._ahead: list[States] = []  # teacher states drawn ahead

    def draw(self, policy, gathered=contextlib.nullcontext) -> States:
        """The next step's states. A learner's rollouts are drawn fresh each step, from its current weights;
        a fixed teacher's do not depend on the learner (offline states), so they are drawn for several steps
        at once, as many as fill one generation batch (`gen_batch_size` rollouts)."""
        if not self._ahead:
            per_step = self.prompts_per_step * self.samples_per_prompt // self.shard.world
            steps = 1 if self.origin == "learner" else max(1, self.gen_batch_size // per_step)
            if self.origin == "learner":
                with gathered():
                    self.engine.sync(policy)
            self._ahead = self.rollouts([self.shard.take(self.epochs.take(self.prompts_per_step), "prompts per step")
                                         for _ in range(steps)])
        return self._ahead.pop(0)

    def rollouts(self, steps: list[list[int]]) -> list[States]:
        """One States per list of row indices, sampled in one engine call."""
        idx = [i for step in steps for i in step]
        prompts = [encode_prompt(self.tokenizer, self.rows[i]) for i in idx for _ in range(self.samples_per_prompt)]
        t0 = time.perf_counter()
        out = self.engine.generate(prompts, self.sampling, seed=stream_seed(*self.stream, "rollouts", self.calls, self.shard.rank))
        self.gen_seconds += time.perf_counter() - t0
        self.generated_tokens += sum(map(len, out.completion_ids))
        self.calls += 1
        states, start = [], 0
        for step in steps:
            m = len(step) * self.samples_per_prompt
            part = slice(start, start + m)
            states.append(self._states(step, out.prompt_ids[part], out.completion_ids[part], out.answer_lens[part], out.texts[part]))
            start += m
        return states

    def _states(self, idx, prompt_ids, completion_ids, answer_lens, texts) -> States:
        rows = [self.rows[i] for i in idx for _ in range(self.samples_per_prompt)]
        group = [g for g in range(len(idx)) for _ in range(self.samples_per_prompt)]
        if self.cuts is None:
            return States(self.origin, list(prompt_ids), [list(c) for c in completion_ids], rows, group, True, list(texts))
        p_ids, y_ids, r_out, g_out = [], [], [], []
        for p, y, n, r, g in zip(prompt_ids, completion_ids, answer_lens, rows, group):
            for c in cut_points(n, self.cuts.cuts, self.cuts.cut_rule, self.rng):
                p_ids.append(list(p))
                y_ids.append(list(y[:c]))
                r_out.append(r)
                g_out.append(g)
        return States(self.origin, p_ids, y_ids, r_out, g_out, False)


# --------------------------------------------------------------------------- signals


def _rows(states: States, extra: list[list[int]] | None = None) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Sequences x + y (+ extra) and their state positions: every prefix of y (all_prefixes), else the end
    of y; and with `extra`, every prefix of the extra tokens instead (a teacher continuation is supervised
    token by token)."""
    seqs, pos, plen = [], [], []
    for i, (x, y) in enumerate(zip(states.prompt_ids, states.prefix_ids)):
        tail = extra[i] if extra is not None else []
        seqs.append(list(x) + list(y) + list(tail))
        plen.append(len(x))
        if extra is not None:
            pos.append(trajectory_positions(len(x) + len(y), len(tail)))
        elif states.all_prefixes:
            pos.append(trajectory_positions(len(x), len(y)))
        else:
            pos.append([len(x) + len(y) - 1])
    return seqs, pos, plen


class GoldTokens:
    """SFT's signal: the dataset's own next token at every gold prefix."""

    def supervise(self, states: States, policy) -> Supervised:
        if not states.all_prefixes:
            raise ValueError("GoldTokens needs whole gold trajectories (all_prefixes=True)")
        seqs, pos, plen = _rows(states)
        return Supervised("tokens", seqs, pos, plen, states.origin)


class TeacherContinuation:
    """The paper's OPD signal: from each state the frozen teacher writes an L-token continuation (through
    its EOS or stop string when it ends sooner); the student is trained with cross-entropy on the teacher's
    tokens only (DAgger-style)."""

    def __init__(self, teacher, tokenizer, p: Continuation, gen_batch_size: int, stream: tuple, max_new_tokens: int):
        length = max_new_tokens if p.length == "full" else p.length
        self.sampling = SamplingParams(max_new_tokens=length, temperature=p.temperature, top_p=1.0, stop=GSM8K_STOPS)
        self.engine = HFRolloutEngine(teacher, tokenizer, gen_batch_size)
        self.stream, self.calls = tuple(stream), 0
        self.gen_seconds = 0.0
        self.generated_tokens = 0

    def supervise(self, states: States, policy) -> Supervised:
        contexts = [list(x) + list(y) for x, y in zip(states.prompt_ids, states.prefix_ids)]
        t0 = time.perf_counter()
        out = self.engine.generate(contexts, self.sampling, seed=stream_seed(*self.stream, "continuations", self.calls))
        self.gen_seconds += time.perf_counter() - t0
        self.calls += 1
        conts = [list(c) for c in out.completion_ids]
        self.generated_tokens += sum(map(len, conts))
        seqs, pos, plen = _rows(states, extra=conts)
        return Supervised("tokens", seqs, pos, plen, states.origin, stats={"teacher_tokens": float(sum(map(len, conts)))})


class TeacherDistribution:
    """Teacher next-token distributions at the states: KL at cut points (one-step) or at every token of a
    student sample (token-level), full vocabulary, direction chosen by the loss. The teacher is scored per
    micro-batch inside the objective (never a whole-batch (B, T, V) tensor)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def supervise(self, states: States, policy) -> Supervised:
        seqs, pos, plen = _rows(states)
        return Supervised("distribution", seqs, pos, plen, states.origin, teacher=self.teacher)


class TeacherSampledLogp:
    """Teacher log-probability of the tokens the student sampled (the sampled-token reverse-KL estimator)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def supervise(self, states: States, policy) -> Supervised:
        if not states.all_prefixes:
            raise ValueError("the sampled-token estimator needs whole student samples (all_prefixes=True)")
        seqs, pos, plen = _rows(states)
        return Supervised("sampled_kl", seqs, pos, plen, states.origin, teacher=self.teacher)


class Reward:
    """RL's signal: the exact-answer reward of each sampled answer (the GSM8K eval's own scorer, on the
    engine's `texts`, as the eval reads a generation), turned into group-relative advantages."""

    def __init__(self, std_norm: bool, reward_fn: Callable[[str, str], float] = gsm8k_reward):
        self.std_norm, self.reward_fn = std_norm, reward_fn

    def supervise(self, states: States, policy) -> Supervised:
        if not states.all_prefixes or states.texts is None:
            raise ValueError("Reward needs whole samples with their texts (rollouts without cuts)")
        r = torch.tensor([self.reward_fn(t, row["answer"]) for t, row in zip(states.texts, states.rows)])
        groups = max(states.group) + 1
        r_PG = r.view(groups, -1)
        adv_B = losses.grpo_advantages(r_PG, self.std_norm).reshape(-1)
        seqs, pos, plen = _rows(states)
        stats = {
            "reward_mean": r.mean().item(),
            "zero_spread_groups": (r_PG.std(1) == 0).float().mean().item(),
            "completion_len": float(sum(map(len, states.prefix_ids)) / len(states.prefix_ids)),
        }
        return Supervised("reward", seqs, pos, plen, states.origin, adv=adv_B.tolist(), stats=stats)


# --------------------------------------------------------------------------- methods


@dataclass
class Method:
    """A post-training method: where states come from, and what supervises them."""

    name: str
    source: StateSource
    signal: Signal
    loss: LossConfig = field(default_factory=LossConfig)
    reuse: int = 1  # optimizer steps per drawn step batch (PPO epochs)


def sft_method(name: str, rows, tokenizer, p, seed: int, shard: Shard = Shard()) -> Method:
    """SFT = (dataset states, gold tokens); a step batch is batch_size x grad_accum rows."""
    return Method(name, DatasetStates(rows, tokenizer, p.batch_size * p.grad_accum, seed, shard), GoldTokens())


def opd_method(name: str, rows, tokenizer, teacher, p, seed: int, shard: Shard = Shard(), engine=None) -> Method:
    """OPD = (student states, teacher signal); with `p.states == "teacher"` the same signal on the
    teacher's own states: the teacher-state control that isolates the state axis."""
    who = "learner" if p.states == "student" else "teacher"
    cuts = p.continuation if p.signal in ("continuation", "one_step_kl") else None
    stream = ("train", name, seed)
    source = RolloutStates(who, rows, tokenizer, p.rollout, p.prompts_per_step, 1, stream, p.gen_batch_size,
                           cuts=cuts, teacher=teacher, shard=shard, engine=engine if who == "learner" else None)
    if p.signal == "continuation":
        signal = TeacherContinuation(teacher, tokenizer, p.continuation, p.gen_batch_size, stream, p.rollout.max_new_tokens)
        kind = "tokens"
    elif p.signal == "one_step_kl" or p.kl.estimator == "full":
        signal, kind = TeacherDistribution(teacher), "distribution"
    elif p.kl.direction == "reverse":
        signal, kind = TeacherSampledLogp(teacher), "sampled_kl"
    else:
        raise ValueError("opd.kl.estimator = 'sampled' estimates the reverse KL only; set opd.kl.direction = 'reverse'")
    return Method(name, source, signal, LossConfig(kind=kind, kl_direction=p.kl.direction))


def rl_method(name: str, rows, tokenizer, p, seed: int, shard: Shard = Shard(), engine=None) -> Method:
    """RL = (policy states, reward): G samples per prompt, group-relative advantages, PPO epochs.
    `engine` samples the policy (default: the HF engine on a synced merged copy; see rollout.make_engine)."""
    source = RolloutStates("learner", rows, tokenizer, p.rollout, p.prompts_per_step, p.group_size, ("train", name, seed),
                           p.gen_batch_size, shard=shard, engine=engine)
    loss = LossConfig(kind="reward", agg=p.loss_agg, clip_eps=p.clip_eps, kl_coef=p.kl_coef)
    return Method(name, source, Reward(p.std_norm), loss, reuse=p.inner_steps)
