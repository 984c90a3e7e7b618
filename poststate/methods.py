"""A post-training method is a pair (state source, signal).

A *state* is a prompt plus a response prefix, s_t = (x, y_<t). A state source draws batches of states
(from a dataset, from the learner's own rollouts, or from the teacher's); a signal turns them into a
supervised batch (gold tokens, a teacher continuation, teacher distributions, or rewards). The one loop in
`loop.py` never needs to know which method it runs.

| method            | source                                   | signal                 |
|-------------------|------------------------------------------|------------------------|
| SFT               | DatasetStates (gold prefixes)            | GoldTokens             |
| OPD continuation  | RolloutStates(student, cuts)             | TeacherContinuation    |
| OPD one-step KL   | RolloutStates(student, cuts)             | TeacherDistribution    |
| OPD token rev. KL | RolloutStates(student)                   | TeacherDistribution / TeacherSampledLogp |
| offline SeqKD     | RolloutStates(teacher, cuts)             | TeacherContinuation    |
| RL (GRPO-style)   | RolloutStates(policy, G per prompt)      | Reward                 |
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from poststate import losses
from poststate.modeling import SamplingCopy
from poststate.params import Continuation, Sampling
from poststate.prompts import GSM8K_STOPS, gsm8k_prompt, gsm8k_target
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.scoring import gsm8k_reward

Tensor = torch.Tensor


@dataclass(frozen=True)
class States:
    """A batch of training states. Each entry is a prompt x and a response prefix y.

    `all_prefixes=True`: every prefix (x, y_<t), t = 0..len(y)-1, is a state (teacher-forced trajectories:
    SFT's gold answers, RL's samples). `all_prefixes=False`: only the full (x, y) is the state (cut points).
    """

    origin: str  # "dataset" | "learner" | "teacher"
    prompt_ids: list[list[int]]
    prefix_ids: list[list[int]]
    rows: list[dict[str, Any]]
    group: list[int]  # which prompt of this batch each state came from
    all_prefixes: bool


@dataclass
class Supervised:
    """A padded batch: `state_BT[b, t] = 1` marks s = ids[b, :t+1] as a training state (see losses.py)."""

    ids_BT: Tensor
    attn_BT: Tensor
    state_BT: Tensor
    kind: str  # "tokens" | "distribution" | "sampled_kl" | "reward"
    teacher_logp_BTV: Tensor | None = None
    teacher_logp_BT: Tensor | None = None
    adv_B: Tensor | None = None
    old_logp_BT: Tensor | None = None
    ref_logp_BT: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    _groups: dict[int, list[tuple[Supervised, float]]] = field(default_factory=dict, repr=False)

    def length_groups(self, k: int) -> list[tuple[Supervised, float]]:
        """The batch as up to k groups of rows of similar length (longest first), each cut to its own
        longest row, with its weight: its share of the batch's states. Every loss here is a mean over
        the batch's states, so the weighted sum of the groups' losses is the batch's loss, and so is
        its gradient (up to float summation order). Cached: a reused batch (PPO inner steps) gets the
        same groups back, with the pi_old that `objective` stored on them."""
        if k not in self._groups:
            n = float(self.state_BT.sum())
            if k == 1 or n == 0 or self.ids_BT.shape[0] < 2:
                self._groups[k] = [(self, 1.0)]
            else:
                lengths = self.attn_BT.cumsum(1).argmax(1) + 1  # through the last attended position
                order = torch.argsort(lengths, descending=True, stable=True)
                tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
                groups = []
                for rows in order.tensor_split(min(k, len(order))):
                    T = int(lengths[rows].max())
                    sub = Supervised(**{name: v[rows] if v.ndim == 1 else v[rows, :T] for name, v in tensors.items()}, kind=self.kind)
                    groups.append((sub, float(sub.state_BT.sum()) / n))
                self._groups[k] = groups
        return self._groups[k]


class StateSource(Protocol):
    origin: str

    def draw(self, policy) -> States: ...


class Signal(Protocol):
    def supervise(self, states: States, policy) -> Supervised: ...


# --------------------------------------------------------------------------- batching


def pad_batch(seqs: Sequence[Sequence[int]], states: Sequence[Sequence[int]], pad_id: int, max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad token lists; `states[i]` lists the state positions of sequence i. Sequences longer than
    `max_len` are left-truncated (the prompt loses its oldest tokens; marked states shift with it)."""
    cut = [max(0, len(s) - max_len) for s in seqs]
    seqs = [list(s[c:]) for s, c in zip(seqs, cut)]
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    state_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, (s, pos, c) in enumerate(zip(seqs, states, cut)):
        ids_BT[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn_BT[b, : len(s)] = 1
        kept = [p - c for p in pos if p - c >= 0]
        state_BT[b, kept] = 1
    return ids_BT, attn_BT, state_BT


def trajectory_positions(prompt_len: int, response_len: int) -> list[int]:
    """States predicting each response token: positions prompt_len-1 .. prompt_len+response_len-2."""
    return list(range(prompt_len - 1, prompt_len + response_len - 1))


# --------------------------------------------------------------------------- state sources


def encode_prompt(tokenizer, row: dict[str, Any]) -> list[int]:
    return tokenizer(gsm8k_prompt(row["question"], shots=[]), add_special_tokens=False)["input_ids"]


def encode_gold(tokenizer, row: dict[str, Any]) -> list[int]:
    return tokenizer(gsm8k_target(row["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


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
    """Dataset states: gold prefixes of the SFT split, in seeded per-epoch shuffles (SFT's q_k)."""

    origin = "dataset"

    def __init__(self, rows: list[dict[str, Any]], tokenizer, batch_size: int, seed: int):
        if not rows:
            raise ValueError("DatasetStates: no rows")
        self.rows, self.batch_size = rows, batch_size
        self.encoded = [(encode_prompt(tokenizer, r), encode_gold(tokenizer, r)) for r in rows]
        self.epochs = Epochs(len(rows), seed)

    def draw(self, policy) -> States:
        idx = self.epochs.take(self.batch_size)
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

    def __init__(self, token_ids: list[int], seq_len: int, batch_size: int, seed: int):
        if len(token_ids) <= seq_len:
            raise ValueError(f"corpus has {len(token_ids)} tokens, fewer than seq_len={seq_len}")
        self.ids = torch.tensor(token_ids, dtype=torch.long)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, policy) -> States:
        starts = torch.randint(0, len(self.ids) - self.seq_len, (self.batch_size,), generator=self.gen)
        chunks = [self.ids[s : s + self.seq_len].tolist() for s in starts.tolist()]
        # The first token is the "prompt" (a state needs a context); every later token is supervised.
        return States(self.origin, [c[:1] for c in chunks], [c[1:] for c in chunks], [{}] * len(chunks), list(range(len(chunks))), True)


def cut_points(length: int, k: int, rule: str, rng: random.Random) -> list[int]:
    """K cut positions in [0, length]: `uniform` draws them independently; `stride` spaces them evenly."""
    if rule == "uniform":
        return sorted(rng.randint(0, length) for _ in range(k))
    if rule == "stride":
        return [i * length // k for i in range(k)]
    raise ValueError(f"cut rule {rule!r}: expected 'uniform' or 'stride'")


class RolloutStates:
    """States from rollouts of a model: the learner's own (OPD, RL: `who="learner"`) or a fixed teacher's
    (offline SeqKD: `who="teacher"`). With `cuts`, K prefix states per rollout; without, whole trajectories."""

    def __init__(
        self,
        who: str,
        rows: list[dict[str, Any]],
        tokenizer,
        sampling: Sampling,
        prompts_per_step: int,
        samples_per_prompt: int,
        seed: int,
        batch_size: int,
        cuts: Continuation | None = None,
        teacher=None,
    ):
        if who not in ("learner", "teacher"):
            raise ValueError(f"rollout source {who!r}: expected 'learner' or 'teacher'")
        if who == "teacher" and teacher is None:
            raise ValueError("teacher states need a teacher model")
        self.origin, self.rows, self.tokenizer = who, rows, tokenizer
        self.sampling = SamplingParams(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p, stop=GSM8K_STOPS
        )
        self.prompts_per_step, self.samples_per_prompt = prompts_per_step, samples_per_prompt
        self.per_step = prompts_per_step * samples_per_prompt  # rollouts per step
        self.cuts, self.teacher, self.batch_size = cuts, teacher, batch_size
        self.rng = random.Random(seed)  # cut points
        self.epochs = Epochs(len(rows), seed)
        self.seed, self.calls = seed, 0
        self.gen_seconds = 0.0
        self._sampler: SamplingCopy | None = None
        self._ahead: list[States] = []  # teacher states drawn ahead

    def _sampling_model(self, policy):
        """The teacher, or the learner's current weights in a plain (adapter-merged) copy."""
        if self.origin == "teacher":
            return self.teacher
        if self._sampler is None or self._sampler.policy is not policy:
            self._sampler = SamplingCopy(policy)
        return self._sampler.sync()

    def draw(self, policy) -> States:
        """The next step's states. A learner's rollouts are drawn fresh each step, from its current weights;
        a fixed teacher's do not depend on the learner (offline states), so they are drawn for several steps
        at once, as many as fill one generation batch (`batch_size` rollouts)."""
        if not self._ahead:
            steps = 1 if self.origin == "learner" else max(1, self.batch_size // self.per_step)
            self._ahead = self._rollouts(policy, steps)
        return self._ahead.pop(0)

    def _rollouts(self, policy, steps: int) -> list[States]:
        idx = self.epochs.take(self.prompts_per_step * steps)
        prompts = [encode_prompt(self.tokenizer, self.rows[i]) for i in idx for _ in range(self.samples_per_prompt)]
        t0 = time.perf_counter()
        model = self._sampling_model(policy)
        out = HFRolloutEngine(model, self.tokenizer, self.batch_size).generate(
            prompts, self.sampling, seed=self.seed * 7919 + self.calls
        )
        self.gen_seconds += time.perf_counter() - t0
        self.calls += 1
        n, m = self.prompts_per_step, self.per_step
        return [self._states(idx[k * n : (k + 1) * n], out.prompt_ids[k * m : (k + 1) * m], out.completion_ids[k * m : (k + 1) * m]) for k in range(steps)]

    def _states(self, idx, prompt_ids, completion_ids) -> States:
        rows = [self.rows[i] for i in idx for _ in range(self.samples_per_prompt)]
        group = [g for g in range(len(idx)) for _ in range(self.samples_per_prompt)]
        if self.cuts is None:
            return States(self.origin, list(prompt_ids), [list(c) for c in completion_ids], rows, group, True)
        p_ids, y_ids, r_out, g_out = [], [], [], []
        for p, y, r, g in zip(prompt_ids, completion_ids, rows, group):
            for c in cut_points(len(y), self.cuts.cuts, self.cuts.cut_rule, self.rng):
                p_ids.append(list(p))
                y_ids.append(list(y[:c]))
                r_out.append(r)
                g_out.append(g)
        return States(self.origin, p_ids, y_ids, r_out, g_out, False)


# --------------------------------------------------------------------------- signals


def _state_batch(states: States, pad_id: int, max_len: int, extra: list[list[int]] | None = None):
    """Sequences x + y (+ extra). States: every prefix of y (all_prefixes), else the end of y, and then
    every prefix of the `extra` tokens (a teacher continuation is supervised token by token)."""
    seqs, pos = [], []
    for i, (x, y) in enumerate(zip(states.prompt_ids, states.prefix_ids)):
        tail = extra[i] if extra is not None else []
        seqs.append(list(x) + list(y) + list(tail))
        if extra is not None:
            pos.append(trajectory_positions(len(x) + len(y), len(tail)))
        elif states.all_prefixes:
            pos.append(trajectory_positions(len(x), len(y)))
        else:
            pos.append([len(x) + len(y) - 1])
    return pad_batch(seqs, pos, pad_id, max_len)


class GoldTokens:
    """SFT's signal: the dataset's own next token at every gold prefix."""

    def __init__(self, tokenizer, max_len: int):
        self.pad_id, self.max_len = tokenizer.pad_token_id, max_len

    def supervise(self, states: States, policy) -> Supervised:
        if not states.all_prefixes:
            raise ValueError("GoldTokens needs whole gold trajectories (all_prefixes=True)")
        ids, attn, st = _state_batch(states, self.pad_id, self.max_len)
        return Supervised(ids, attn, st, "tokens")


class TeacherContinuation:
    """The paper's OPD signal: from each state the frozen teacher writes an L-token continuation; the
    student is trained with cross-entropy on the teacher's tokens only (DAgger-style)."""

    def __init__(self, teacher, tokenizer, p: Continuation, max_len: int, batch_size: int, seed: int, max_new_tokens: int):
        length = max_new_tokens if p.length == "full" else p.length
        self.sampling = SamplingParams(max_new_tokens=length, temperature=p.temperature, top_p=1.0, stop=GSM8K_STOPS)
        self.engine = HFRolloutEngine(teacher, tokenizer, batch_size)
        self.pad_id, self.max_len, self.seed, self.calls = tokenizer.pad_token_id, max_len, seed, 0
        self.gen_seconds = 0.0

    def supervise(self, states: States, policy) -> Supervised:
        contexts = [list(x) + list(y) for x, y in zip(states.prompt_ids, states.prefix_ids)]
        t0 = time.perf_counter()
        out = self.engine.generate(contexts, self.sampling, seed=self.seed * 104729 + self.calls)
        self.gen_seconds += time.perf_counter() - t0
        self.calls += 1
        conts = [list(c) for c in out.completion_ids]
        ids, attn, st = _state_batch(states, self.pad_id, self.max_len, extra=conts)
        return Supervised(ids, attn, st, "tokens", stats={"teacher_tokens": float(sum(map(len, conts)))})


@torch.no_grad()
def _logits(model, ids_BT: Tensor, attn_BT: Tensor) -> Tensor:
    """Logits of a model in eval mode (no dropout), without gradients; restores its mode."""
    was = model.training
    model.eval()
    out = model(input_ids=ids_BT, attention_mask=attn_BT).logits.float()
    model.train(was)
    return out


def _logp_BTV(model, ids_BT: Tensor, attn_BT: Tensor) -> Tensor:
    return torch.log_softmax(_logits(model, ids_BT, attn_BT), dim=-1)


class TeacherDistribution:
    """Teacher next-token distributions at the states: KL at cut points (one-step) or at every token of a
    student sample (token-level), full vocabulary, direction chosen by the loss."""

    def __init__(self, teacher, tokenizer, max_len: int):
        self.teacher, self.pad_id, self.max_len = teacher, tokenizer.pad_token_id, max_len

    def supervise(self, states: States, policy) -> Supervised:
        ids, attn, st = _state_batch(states, self.pad_id, self.max_len)
        dev = next(policy.parameters()).device
        t = _logp_BTV(self.teacher, ids.to(dev), attn.to(dev))
        return Supervised(ids, attn, st, "distribution", teacher_logp_BTV=t)


class TeacherSampledLogp:
    """Teacher log-probability of the tokens the student sampled (for the sampled-token reverse-KL estimator)."""

    def __init__(self, teacher, tokenizer, max_len: int):
        self.teacher, self.pad_id, self.max_len = teacher, tokenizer.pad_token_id, max_len

    def supervise(self, states: States, policy) -> Supervised:
        if not states.all_prefixes:
            raise ValueError("the sampled-token estimator needs whole student samples (all_prefixes=True)")
        ids, attn, st = _state_batch(states, self.pad_id, self.max_len)
        dev = next(policy.parameters()).device
        t_BTV = _logp_BTV(self.teacher, ids.to(dev), attn.to(dev))
        t_BT = torch.zeros(ids.shape, dtype=t_BTV.dtype, device=dev)
        t_BT[:, :-1] = t_BTV[:, :-1].gather(-1, ids.to(dev)[:, 1:, None]).squeeze(-1)
        return Supervised(ids, attn, st, "sampled_kl", teacher_logp_BT=t_BT)


class Reward:
    """RL's signal: the exact-answer reward of each sampled answer (the GSM8K eval's own scorer),
    turned into group-relative advantages. Caches per States, so a batch reused for several inner PPO
    steps keeps the old log-probs that `objective` stores on it at its first pass."""

    def __init__(self, tokenizer, max_len: int, std_norm: bool, kl_coef: float, reward_fn: Callable[[str, str], float] = gsm8k_reward):
        self.tokenizer, self.pad_id, self.max_len = tokenizer, tokenizer.pad_token_id, max_len
        self.std_norm, self.kl_coef, self.reward_fn = std_norm, kl_coef, reward_fn
        self._cache: tuple[int, Supervised] | None = None

    def supervise(self, states: States, policy) -> Supervised:
        if self._cache is not None and self._cache[0] == id(states):
            return self._cache[1]
        if not states.all_prefixes:
            raise ValueError("Reward needs whole samples (all_prefixes=True)")
        texts = [self.tokenizer.decode(y, skip_special_tokens=True) for y in states.prefix_ids]
        r = torch.tensor([self.reward_fn(t, row["answer"]) for t, row in zip(texts, states.rows)])
        groups = max(states.group) + 1
        r_PG = r.view(groups, -1)
        adv_B = losses.grpo_advantages(r_PG, self.std_norm).reshape(-1)
        ids, attn, st = _state_batch(states, self.pad_id, self.max_len)
        dev = next(policy.parameters()).device
        ids_d, attn_d = ids.to(dev), attn.to(dev)
        ref = None
        if hasattr(policy, "disable_adapter"):
            with policy.disable_adapter():
                ref = losses.next_token_logp(_logits(policy, ids_d, attn_d), ids_d)
        elif self.kl_coef > 0:
            raise ValueError("rl.kl_coef > 0 needs a LoRA policy (the reference is the adapter-free base)")
        lengths = st.sum(1).float()
        stats = {
            "reward_mean": r.mean().item(),
            "zero_spread_groups": (r_PG.std(1) == 0).float().mean().item(),
            "completion_len": lengths.mean().item(),
        }
        sup = Supervised(ids, attn, st, "reward", adv_B=adv_B, ref_logp_BT=ref, stats=stats)
        self._cache = (id(states), sup)
        return sup


# --------------------------------------------------------------------------- objective


@dataclass(frozen=True)
class LossConfig:
    kl_direction: str = "reverse"
    clip_eps: float = 0.2
    kl_coef: float = 0.0


def objective(logits_BTV: Tensor, sup: Supervised, cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """The loss a supervised batch calls for: CE on tokens, KL on distributions, policy gradient on rewards."""
    dev = logits_BTV.device
    ids, st = sup.ids_BT.to(dev), sup.state_BT.to(dev)
    if sup.kind == "tokens":
        return losses.cross_entropy(logits_BTV, ids, st), {}
    if sup.kind == "distribution":
        return losses.distill_kl(logits_BTV, sup.teacher_logp_BTV.to(dev), st, cfg.kl_direction), {}
    if sup.kind == "sampled_kl":
        loss, est = losses.sampled_reverse_kl(logits_BTV, ids, sup.teacher_logp_BT.to(dev), st)
        return loss, {"kl_estimate": est.item()}
    if sup.kind == "reward":
        if sup.old_logp_BT is None:  # the first pass over this batch: pi_old is this very forward, detached,
            sup.old_logp_BT = losses.next_token_logp(logits_BTV.detach(), ids)  # kept for its reuse (PPO inner steps)
        loss, stats = losses.policy_gradient(
            logits_BTV, ids, st, sup.adv_B.to(dev), sup.old_logp_BT.to(dev), cfg.clip_eps,
            None if sup.ref_logp_BT is None else sup.ref_logp_BT.to(dev), cfg.kl_coef,
        )
        out = {k: v.item() for k, v in stats.items()}
        out["entropy"] = losses.entropy(logits_BTV.detach(), st).item()
        return loss, out
    raise ValueError(f"unknown supervision kind {sup.kind!r}")


@dataclass
class Method:
    """A post-training method: where states come from, and what supervises them."""

    name: str
    source: StateSource
    signal: Signal
    loss: LossConfig = field(default_factory=LossConfig)
    reuse: int = 1  # optimizer steps per drawn batch (PPO-style inner steps)


# --------------------------------------------------------------------------- the paper's methods as pairs


def sft_method(name: str, rows, tokenizer, p, seed: int) -> Method:
    """SFT = (dataset states, gold tokens)."""
    return Method(name, DatasetStates(rows, tokenizer, p.batch_size, seed), GoldTokens(tokenizer, p.max_len))


def opd_method(name: str, rows, tokenizer, teacher, p, seed: int) -> Method:
    """OPD = (student states, teacher signal); with `p.states == "teacher"` the same signal on the
    teacher's own states: the offline SeqKD control that isolates the state axis."""
    who = "learner" if p.states == "student" else "teacher"
    cuts = p.continuation if p.signal in ("continuation", "one_step_kl") else None
    source = RolloutStates(who, rows, tokenizer, p.rollout, p.prompts_per_step, 1, seed, p.batch_size, cuts=cuts, teacher=teacher)
    if p.signal == "continuation":
        signal = TeacherContinuation(teacher, tokenizer, p.continuation, p.max_len, p.batch_size, seed, p.rollout.max_new_tokens)
    elif p.signal == "one_step_kl" or p.kl.estimator == "full":
        signal = TeacherDistribution(teacher, tokenizer, p.max_len)
    elif p.kl.direction == "reverse":
        signal = TeacherSampledLogp(teacher, tokenizer, p.max_len)
    else:
        raise ValueError("opd.kl.estimator = 'sampled' estimates the reverse KL only; set opd.kl.direction = 'reverse'")
    return Method(name, source, signal, LossConfig(kl_direction=p.kl.direction))


def rl_method(name: str, rows, tokenizer, p, seed: int) -> Method:
    """RL = (policy states, reward): G samples per prompt, group-relative advantages."""
    source = RolloutStates("learner", rows, tokenizer, p.rollout, p.prompts_per_step, p.group_size, seed, p.batch_size)
    signal = Reward(tokenizer, p.max_len, p.std_norm, p.kl_coef)
    return Method(name, source, signal, LossConfig(clip_eps=p.clip_eps, kl_coef=p.kl_coef), reuse=p.inner_steps)
