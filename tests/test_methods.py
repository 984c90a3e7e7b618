"""Methods = (state source, signal), and the one loop: micro-batching invariance, sources and shards, cut
points, rewards, PPO epochs, and a short smoke run per method on the tiny random model."""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError

from poststate import methods
from poststate.loop import NonFiniteLoss, train
from poststate.methods import Method, Shard, States, Supervised
from poststate.modeling import with_adapter
from poststate.objective import LossConfig, StateObjective
from poststate.params import Opd, Rl, Sft
from poststate.rollout import Rollouts
from poststate.streams import stream_seed
from tests.conftest import build_tiny_model, give_lora_weights

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "She sold 48 clips in April and half as many in May. How many clips?", "answer": "48 / 2 = <<48/2=24>>24, 48 + 24 = <<48+24=72>>72.\n#### 72"},
]
MANY = [{"question": f"Ann has {a} pens and gets {b} more. How many?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
        for a in range(2, 6) for b in range(2, 4)]  # 8 rows
OPTIM = dict(lr=1e-2, batch_size=4, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, max_len=160)
LORA = {"kind": "lora", "r": 4, "alpha": 8}
ROLLOUT = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}


def merged(body, over):
    out = copy.deepcopy(body)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def opd_params(**over) -> Opd:
    body = dict(OPTIM, adapter=LORA, signal="continuation", states="student", init="base", steps=2, prompts_per_step=2,
                gen_batch_size=4, rollout=ROLLOUT, continuation={"cuts": 2, "cut_rule": "uniform", "length": 4, "temperature": 0.0},
                kl={"direction": "reverse", "estimator": "full"})
    return Opd.model_validate(merged(body, over))


def rl_params(**over) -> Rl:
    body = dict(OPTIM, adapter=LORA, init="base", steps=2, prompts_per_step=2, group_size=3, gen_batch_size=6, rollout=ROLLOUT,
                loss_agg="token_mean", std_norm=True, kl_coef=0.0, clip_eps=0.2, inner_steps=1)
    return Rl.model_validate({**body, **over})


def sft_params(**over) -> Sft:
    return Sft.model_validate({**OPTIM, "adapter": LORA, "epochs": 1, **over})


class FakeEngine:
    """A `RolloutEngine` that records what it is asked: completions are seeded random ids ending with EOS."""

    def __init__(self, eos_id: int, events: list | None = None, fixed_len: int | None = None):
        self.eos_id, self.fixed_len = eos_id, fixed_len
        self.events = [] if events is None else events
        self.calls: list[tuple[list[list[int]], int]] = []  # (prompts, seed) per generate call
        self.synced: list = []

    def sync(self, policy) -> None:
        self.synced.append(policy)
        self.events.append("sync")

    def generate(self, prompt_ids, params, seed) -> Rollouts:
        self.events.append("generate")
        self.calls.append(([list(p) for p in prompt_ids], seed))
        rng = random.Random(seed)
        lens = [self.fixed_len if self.fixed_len is not None else rng.randint(0, 6) for _ in prompt_ids]
        bodies = [[rng.randrange(2, 300) for _ in range(n)] for n in lens]
        return Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=[b + [self.eos_id] for b in bodies],
            answer_lens=[len(b) for b in bodies],
            texts=[f"sample {seed} {i}" for i in range(len(bodies))],
            logprobs=[[0.0] * (len(b) + 1) for b in bodies],
            finished=[True] * len(bodies),
        )


class FixedSource:
    """A state source that returns the same States at every draw, and counts its draws."""

    def __init__(self, states: States):
        self.states, self.origin, self.draws = states, states.origin, 0

    def draw(self, policy, gathered=contextlib.nullcontext) -> States:
        self.draws += 1
        return self.states


class RecordingAccelerator(Accelerator):
    """The loop's accelerator, recording each optimizer step's gradient (before clipping)."""

    def __init__(self):
        super().__init__(step_scheduler_with_optimizer=False)
        self.grads: list[list[torch.Tensor]] = []

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        self.grads.append([p.grad.detach().clone() for p in parameters])
        return super().clip_grad_norm_(parameters, max_norm, norm_type)


def run_train(lm, method, p, steps, **kw):
    logged = []
    result = train(lm, method, p, steps, pad_id=0, progress=False, log=lambda step, m, dt=None: logged.append(dict(m)), **kw)
    return result, logged


# --------------------------------------------------------------------------- Supervised: micro-batches, units


def test_micro_batches_truncate_left_and_gather_state_positions():
    sup = Supervised("tokens", [[1, 2, 3, 4, 5], [6, 7]], [[1, 3], [0]], [2, 1], "test")
    (m,) = sup.micro_batches(8, max_len=4, pad_id=0)
    assert m.ids_BT.tolist() == [[2, 3, 4, 5], [6, 7, 0, 0]]  # row 0 lost its first token
    assert m.attn_BT.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert m.pos_N.tolist() == [0, 2, 4]  # flat row * T + t: positions 1, 3 -> 0, 2 in row 0; 0 in row 1
    assert m.target_N.tolist() == [3, 5, 7] and m.row_N.tolist() == [0, 0, 1] and m.rows == [0, 1]
    assert m.adv_N is None and m.old_logp_N is None
    assert sup.micro_batches(8, 4, 0)[0] is m  # cached: a reused batch keeps its micro-batches
    small = sup.micro_batches(1, 4, 0)
    assert [x.rows for x in small] == [[0], [1]]  # longest first, one row each, each padded to its own length
    assert [tuple(x.ids_BT.shape) for x in small] == [(1, 4), (1, 2)]
    # a state at a row's last token (one-step KL) has no target: the pad id stands in
    end = Supervised("distribution", [[1, 2, 3]], [[2]], [1], "test").micro_batches(4, 8, pad_id=9)[0]
    assert end.pos_N.tolist() == [2] and end.target_N.tolist() == [9]
    # reward rows carry their advantage to every state
    rew = Supervised("reward", [[1, 2, 3], [4, 5, 6, 7]], [[0, 1], [1, 2]], [1, 2], "test", adv=[0.5, -2.0])
    (rm,) = rew.micro_batches(8, 8, 0)
    assert rm.rows == [1, 0] and rm.adv_N.tolist() == [-2.0, -2.0, 0.5, 0.5]


def test_units_count_states_or_sequences_after_truncation():
    sup = Supervised("tokens", [[1, 2, 3, 4, 5], [6, 7]], [[1, 3], [0]], [2, 1], "test")
    assert sup.units("token_mean", 4) == 3 and sup.units("sequence_mean", 4) == 2
    assert sup.units("token_mean", 2) == 2 and sup.units("sequence_mean", 2) == 2  # row 0 keeps position 3 only
    one = Supervised("tokens", [[1, 2, 3, 4, 5], [6, 7]], [[1], [0]], [2, 1], "test")
    assert one.units("token_mean", 2) == 1 and one.units("sequence_mean", 2) == 1  # row 0 lost its only state
    assert one.units("sequence_mean", 5) == 2


def _ragged_states(vocab: int, with_texts: bool) -> States:
    """8 rows, 2 groups of 4, of different lengths; with max_len 12 several are left-truncated."""
    gen = torch.Generator().manual_seed(11)
    plens, ylens = [3, 9, 5, 2, 7, 4, 6, 3], [4, 10, 2, 8, 14, 3, 6, 1]
    draw = lambda n: torch.randint(2, vocab, (n,), generator=gen).tolist()
    return States(
        origin="learner" if with_texts else "dataset",
        prompt_ids=[draw(n) for n in plens],
        prefix_ids=[draw(n) for n in ylens],
        rows=[{"question": "q", "answer": "#### 1"}] * 8,
        group=[0, 0, 0, 0, 1, 1, 1, 1],
        all_prefixes=True,
        texts=["a", "bb", "c", "dddd", "ee", "f", "ggg", "hh"] if with_texts else None,
    )


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("kind", ["tokens", "reward"])
def test_step_loss_and_gradient_do_not_depend_on_micro_batching(tiny_tokenizer, kind, agg):
    states = _ragged_states(len(tiny_tokenizer), with_texts=kind == "reward")
    signal = methods.GoldTokens() if kind == "tokens" else methods.Reward(True, lambda text, answer: float(len(text) % 2))
    cfg = LossConfig(kind=kind, agg=agg)
    runs = {}
    for bs in (2, 64):
        model = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.3), sft_params().adapter)
        give_lora_weights(model)
        acc = RecordingAccelerator()
        p = sft_params(batch_size=bs, max_len=12)
        result, logged = run_train(model, Method("m", FixedSource(states), signal, cfg), p, 1, accelerator=acc)
        runs[bs] = (logged[0], acc.grads[0])
    (m2, g2), (m64, g64) = runs[2], runs[64]
    sup = signal.supervise(states, None)
    assert sup.units("token_mean", 12) < sum(len(p) for p in sup.positions)  # truncation drops states
    assert len(sup.micro_batches(2, 12, 0)) == 4 and len(sup.micro_batches(64, 12, 0)) == 1
    assert m2["states"] == m64["states"] == sum(len(m.pos_N) for m in sup.micro_batches(64, 12, 0))
    assert m2["loss"] == pytest.approx(m64["loss"], rel=1e-5, abs=1e-6)  # reward, sequence mean, first pass: ~0
    assert m2["grad_norm"] == pytest.approx(m64["grad_norm"], rel=1e-5)
    scale = max(float(g.abs().max()) for g in g64)
    assert scale > 1e-3
    for a, b in zip(g2, g64, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * scale


def test_step_loss_is_the_mean_over_the_step_units(tiny_tokenizer):
    # the logged loss is the objective's sum over the whole step batch / units: token mean of -log p
    states = _ragged_states(len(tiny_tokenizer), with_texts=False)
    model = build_tiny_model(tiny_tokenizer, init_std=0.3)
    sup = methods.GoldTokens().supervise(states, None)
    with torch.no_grad():
        values = torch.cat([StateObjective(model, LossConfig()).state_values(m)[0] for m in sup.micro_batches(64, 12, 0)])
    _, logged = run_train(model, Method("m", FixedSource(states), methods.GoldTokens()), sft_params(max_len=12, adapter={"kind": "full"}), 1)
    assert len(values) == sup.units("token_mean", 12)
    assert logged[0]["loss"] == pytest.approx(values.mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- shards and sources


def test_shard_take_splits_disjointly_and_refuses_uneven_splits():
    items = list(range(12))
    parts = [Shard(r, 3).take(items, "rows per step") for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert sorted(sum(parts, [])) == items
    assert Shard().take(items, "x") == items
    with pytest.raises(ValueError, match=r"rows per step: 12 per step cannot be split evenly over 5 processes"):
        Shard(0, 5).take(items, "rows per step")


def test_dataset_states_draw_rows_per_step_and_shard_them(tiny_tokenizer):
    whole = methods.DatasetStates(MANY, tiny_tokenizer, 4, seed=3)
    ranks = [methods.DatasetStates(MANY, tiny_tokenizer, 4, seed=3, shard=Shard(r, 2)) for r in range(2)]
    for _ in range(4):  # two epochs
        st = whole.draw(None)
        parts = [src.draw(None) for src in ranks]
        g = whole.drawn[-1]
        assert len(g) == 4
        assert [src.drawn[-1] for src in ranks] == [g[0::2], g[1::2]]
        assert [p.rows for p in parts] == [[MANY[i] for i in g[0::2]], [MANY[i] for i in g[1::2]]]
        assert st.all_prefixes and st.origin == "dataset" and st.group == [0, 1, 2, 3]
        assert st.prompt_ids == [methods.encode_prompt(tiny_tokenizer, MANY[i]) for i in g]
        assert st.prefix_ids == [methods.encode_gold(tiny_tokenizer, MANY[i]) for i in g]
        assert all(y[-1] == tiny_tokenizer.eos_token_id for y in st.prefix_ids)
    assert sorted(whole.drawn[0] + whole.drawn[1]) == list(range(8))  # every row once per epoch
    assert sorted(whole.drawn[2] + whole.drawn[3]) == list(range(8))
    assert whole.drawn[:2] != whole.drawn[2:]  # reshuffled
    with pytest.raises(ValueError, match="4 per step cannot be split evenly over 3"):
        methods.DatasetStates(MANY, tiny_tokenizer, 4, seed=3, shard=Shard(0, 3)).draw(None)


def _rollout_source(tok, engine, who="learner", shard=Shard(), prompts=2, G=3, gen_batch=64, cuts=None, rows=MANY):
    sampling = rl_params().rollout
    return methods.RolloutStates(who, rows, tok, sampling, prompts, G, ("train", "x", 0), gen_batch, cuts=cuts,
                                 teacher=object() if who == "teacher" else None, shard=shard, engine=engine)


def test_learner_source_draws_prompts_times_group_from_current_weights(tiny_tokenizer):
    events = []
    engine = FakeEngine(tiny_tokenizer.eos_token_id, events)
    src = _rollout_source(tiny_tokenizer, engine)

    @contextlib.contextmanager
    def gathered():
        events.append("gather")
        yield
        events.append("release")

    policy = object()
    order = methods.Epochs(len(MANY), stream_seed("train", "x", 0, "prompts")).take(4)
    for call in range(2):
        st = src.draw(policy, gathered)
        step = order[2 * call : 2 * call + 2]
        assert st.origin == "learner" and st.all_prefixes
        assert st.group == [0, 0, 0, 1, 1, 1] and st.rows == [MANY[i] for i in step for _ in range(3)]
        prompts, seed = engine.calls[call]
        assert prompts == [methods.encode_prompt(tiny_tokenizer, MANY[i]) for i in step for _ in range(3)]
        assert seed == stream_seed("train", "x", 0, "rollouts", call, 0)
        out = FakeEngine(tiny_tokenizer.eos_token_id).generate(prompts, None, seed)
        assert st.prefix_ids == out.completion_ids and st.texts == out.texts  # through the terminator
    # every draw syncs the policy's current weights (inside `gathered`) before it samples
    assert events == ["gather", "sync", "release", "generate"] * 2 and engine.synced == [policy, policy]


def test_teacher_states_are_drawn_ahead_without_syncing(tiny_tokenizer):
    engine = FakeEngine(tiny_tokenizer.eos_token_id)
    src = _rollout_source(tiny_tokenizer, engine, who="teacher", G=1, gen_batch=4)
    draws = [src.draw(object()) for _ in range(3)]
    assert len(engine.calls) == 2 and engine.synced == []  # 4 rollouts per generate call: two steps each
    order = methods.Epochs(len(MANY), stream_seed("train", "x", 0, "prompts")).take(8)
    for k, st in enumerate(draws):
        assert st.origin == "teacher" and st.group == [0, 1]
        assert st.rows == [MANY[i] for i in order[2 * k : 2 * k + 2]]  # the prompt stream, in step order
    assert [len(p) for p, _ in engine.calls] == [4, 4]


def test_rollout_streams_differ_by_rank_and_prompts_are_sharded(tiny_tokenizer):
    engines = [FakeEngine(tiny_tokenizer.eos_token_id) for _ in range(3)]
    whole = _rollout_source(tiny_tokenizer, engines[0], prompts=4, G=2)
    ranks = [_rollout_source(tiny_tokenizer, engines[1 + r], shard=Shard(r, 2), prompts=4, G=2) for r in range(2)]
    st = whole.draw(None)
    parts = [src.draw(None) for src in ranks]
    step = [st.rows[i] for i in range(0, 8, 2)]  # the global step's 4 prompts
    assert [p.rows[::2] for p in parts] == [step[0::2], step[1::2]]  # whole prompt groups per rank
    seeds = [e.calls[0][1] for e in engines[1:]]
    assert seeds == [stream_seed("train", "x", 0, "rollouts", 0, r) for r in range(2)] and seeds[0] != seeds[1]
    assert parts[0].prefix_ids != parts[1].prefix_ids
    with pytest.raises(ValueError, match="prompts per step: 4 per step cannot be split evenly over 3"):
        _rollout_source(tiny_tokenizer, engines[0], shard=Shard(0, 3), prompts=4)


def test_cut_streams_differ_by_rank(tiny_tokenizer):
    from poststate.params import Continuation

    cuts = Continuation(cuts=2, cut_rule="uniform", length=4, temperature=0.0)

    def cut_lengths(rank):  # every rollout has a 10-token answer, whatever the seed: only the cut stream varies
        src = _rollout_source(tiny_tokenizer, FakeEngine(tiny_tokenizer.eos_token_id, fixed_len=10), shard=Shard(rank, 2),
                              prompts=8, G=1, cuts=cuts)
        return [len(y) for _ in range(3) for y in src.draw(None).prefix_ids]

    assert cut_lengths(0) == cut_lengths(0) and len(cut_lengths(0)) == 24
    assert cut_lengths(0) != cut_lengths(1)


def test_cut_points_distinct_inside_the_answer():
    rng = random.Random(0)
    for n in range(0, 12):
        for k in (1, 3, 5):
            cuts = methods.cut_points(n, k, "uniform", rng)
            assert cuts == sorted(set(cuts)) and len(cuts) == min(k, n + 1) and all(0 <= c <= n for c in cuts)
    assert methods.cut_points(2, 5, "uniform", rng) == [0, 1, 2]  # all of them when fewer than K
    assert methods.cut_points(10, 4, "stride", rng) == [0, 2, 5, 8]  # i * 11 // 4
    assert methods.cut_points(0, 3, "stride", rng) == [0]
    seen = {c for _ in range(200) for c in methods.cut_points(5, 2, "uniform", rng)}
    assert seen == set(range(6))  # every cut in [0, answer_len] is reachable
    assert methods.cut_points(10, 4, "uniform", random.Random(5)) == methods.cut_points(10, 4, "uniform", random.Random(5))
    with pytest.raises(ValueError, match="'zigzag'"):
        methods.cut_points(10, 4, "zigzag", rng)
    with pytest.raises(ValueError, match="got 0"):
        methods.cut_points(10, 0, "uniform", rng)


def test_stride_cuts_all_positions_when_fewer_than_k():
    rng = random.Random(0)
    assert methods.cut_points(2, 5, "stride", rng) == [0, 1, 2]
    for n in range(0, 12):
        for k in (1, 3, 5):
            assert len(methods.cut_points(n, k, "stride", rng)) == min(k, n + 1)


def test_cut_states_never_contain_the_terminator(tiny_tokenizer):
    from poststate.params import Continuation

    engine = FakeEngine(tiny_tokenizer.eos_token_id)
    src = _rollout_source(tiny_tokenizer, engine, prompts=4, G=1, cuts=Continuation(cuts=3, cut_rule="uniform", length=4, temperature=0.0))
    st = src.draw(None)
    prompts, seed = engine.calls[0]
    out = FakeEngine(tiny_tokenizer.eos_token_id).generate(prompts, None, seed)
    assert not st.all_prefixes and st.texts is None
    for g in range(4):
        ys = [y for y, gg in zip(st.prefix_ids, st.group) if gg == g]
        full, n = out.completion_ids[g], out.answer_lens[g]
        assert 1 <= len(ys) == min(3, n + 1) and len({len(y) for y in ys}) == len(ys)
        for y in ys:
            assert y == full[: len(y)] and len(y) <= n and tiny_tokenizer.eos_token_id not in y


# --------------------------------------------------------------------------- signals


def test_gold_tokens_supervise_every_answer_token(tiny_tokenizer):
    st = methods.DatasetStates(ROWS, tiny_tokenizer, 2, seed=0).draw(None)
    sup = methods.GoldTokens().supervise(st, None)
    for x, y, s, pos, plen in zip(st.prompt_ids, st.prefix_ids, sup.seqs, sup.positions, sup.prompt_lens):
        assert s == x + y and plen == len(x)
        assert pos == list(range(len(x) - 1, len(x) + len(y) - 1))
        assert [s[p + 1] for p in pos] == y  # targets: the gold tokens through EOS, no prompt token
    with pytest.raises(ValueError, match="all_prefixes"):
        methods.GoldTokens().supervise(States("learner", [[1]], [[2]], [{}], [0], False), None)


def test_continuation_signal_supervises_exactly_the_teacher_tokens(tiny_tokenizer):
    teacher = build_tiny_model(tiny_tokenizer, seed=1, init_std=0.5)
    states = States("learner", [[5, 6, 7], [8, 9]], [[10, 11], []], ROWS, [0, 1], all_prefixes=False)
    signal = methods.TeacherContinuation(teacher, tiny_tokenizer, opd_params().continuation, 4, ("t", 0), max_new_tokens=8)
    sup = signal.supervise(states, None)
    assert sup.kind == "tokens" and signal.calls == 1
    conts = []
    for x, y, s, pos in zip(states.prompt_ids, states.prefix_ids, sup.seqs, sup.positions):
        cont = s[len(x) + len(y):]
        conts.append(cont)
        assert s[: len(x) + len(y)] == x + y and 1 <= len(cont) <= 4
        assert pos == list(range(len(x) + len(y) - 1, len(s) - 1))  # exactly the states predicting teacher tokens
    # greedy (temperature 0): the continuation is the teacher's argmax, token by token
    for x, y, cont in zip(states.prompt_ids, states.prefix_ids, conts):
        ctx = x + y
        for tok in cont:
            with torch.no_grad():
                assert int(teacher(torch.tensor([ctx])).logits[0, -1].argmax()) == tok
            ctx = ctx + [tok]
    assert sup.stats["teacher_tokens"] == sum(map(len, conts)) == signal.generated_tokens


def test_distribution_signals_positions(tiny_tokenizer):
    teacher = object()
    cut = States("learner", [[5, 6, 7], [8, 9]], [[10, 11], []], ROWS, [0, 1], all_prefixes=False)
    sup = methods.TeacherDistribution(teacher).supervise(cut, None)
    assert sup.kind == "distribution" and sup.teacher is teacher
    assert sup.positions == [[4], [1]]  # the state x + y[:c] itself, at its last token
    whole = States("learner", [[5, 6, 7]], [[10, 11, 12]], ROWS[:1], [0], all_prefixes=True)
    sampled = methods.TeacherSampledLogp(teacher).supervise(whole, None)
    assert sampled.kind == "sampled_kl" and sampled.positions == [[2, 3, 4]]
    with pytest.raises(ValueError, match="all_prefixes"):
        methods.TeacherSampledLogp(teacher).supervise(cut, None)


def test_reward_scores_the_texts_and_gives_group_relative_advantages(tiny_tokenizer):
    from poststate import scoring

    assert methods.Reward(True).reward_fn is scoring.gsm8k_reward  # the eval's own scorer
    texts = [" so 3 + 4 = 7.\n#### 7", " #### 8", " 3 + 4 = 7.\n#### 7", " the answer is 7", " #### 9", " #### 6", " #### 5", " #### 4"]
    # the completion ids decode to something else: the reward must read `texts`, not the ids
    states = States("learner", [[5, 6]] * 8, [[7, 8, 9]] * 4 + [[7]] * 4, [ROWS[0]] * 8, [0] * 4 + [1] * 4, True, texts)
    sup = methods.Reward(True).supervise(states, None)
    s = (1 / 3) ** 0.5  # sample std of [1, 0, 1, 0]
    assert sup.kind == "reward"
    assert sup.adv == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4)] * 2 + [0.0] * 4, rel=1e-6)
    assert sup.stats == pytest.approx({"reward_mean": 0.25, "zero_spread_groups": 0.5, "completion_len": 2.0})
    assert sup.positions[0] == [1, 2, 3] and sup.seqs[0] == [5, 6, 7, 8, 9]
    mean_only = methods.Reward(False).supervise(states, None)
    assert mean_only.adv == pytest.approx([0.5, -0.5, 0.5, -0.5] + [0.0] * 4)
    with pytest.raises(ValueError, match="texts"):
        methods.Reward(True).supervise(States("learner", [[1]], [[2]], ROWS[:1], [0], True), None)


# --------------------------------------------------------------------------- PPO epochs


class KeepBatches:
    """A signal wrapper that keeps every Supervised it hands the loop."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def supervise(self, states, policy):
        sup = self.inner.supervise(states, policy)
        self.batches.append(sup)
        return sup


def test_ppo_epochs_reuse_the_batch_and_its_stored_pi_old(tiny_tokenizer):
    states = _ragged_states(len(tiny_tokenizer), with_texts=True)
    source = FixedSource(states)
    signal = KeepBatches(methods.Reward(True, lambda text, answer: float(len(text) % 2)))
    policy = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.3), rl_params().adapter)
    give_lora_weights(policy)
    initial = copy.deepcopy(policy)
    p = rl_params(inner_steps=2, lr=0.05, batch_size=3, max_len=12)
    cfg = LossConfig(kind="reward", clip_eps=p.clip_eps)
    snapshots, logged = [], []

    def log(step, metrics, dt=None):
        logged.append(dict(metrics))
        snapshots.append(copy.deepcopy(policy))  # the weights after this step's update

    result = train(policy, Method("rl", source, signal, cfg, reuse=p.inner_steps), p, 4, pad_id=0, progress=False, log=log)
    assert source.draws == 2 and len(signal.batches) == 2  # one draw per two optimizer steps
    assert result.steps == 4 and len(logged) == 4
    assert [m["clip_frac"] == 0 for m in logged] == [True, False, True, False]  # ratio 1 on a batch's first pass only
    assert logged[0]["lr"] != logged[1]["lr"]  # every reuse is its own optimizer (and scheduler) step
    # step 1 is the PPO loss of the step-0 weights against pi_old = the weights the batch was drawn with
    sup = signal.batches[0]
    total = 0.0
    for m in sup.micro_batches(p.batch_size, p.max_len, 0):
        m = m.to("cpu")  # a copy: the stored pi_old, not the loop's
        with torch.no_grad():
            values, _ = StateObjective(initial, LossConfig(kind="tokens")).state_values(m)
            m.old_logp_N = -values
            total += float(StateObjective(snapshots[0], cfg)(m)[0])
    assert logged[1]["loss"] == pytest.approx(total / sup.units("token_mean", p.max_len), rel=1e-5)
    assert logged[1]["loss"] != pytest.approx(logged[0]["loss"], rel=1e-3)


def test_rl_has_no_grad_accum():
    with pytest.raises(ValidationError, match="grad_accum"):
        rl_params(grad_accum=2)


# --------------------------------------------------------------------------- smoke runs, one per method


def _state_dict(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _smoke(model, method, p, steps=2):
    before = _state_dict(model)
    result, logged = run_train(model, method, p, steps)
    assert result.steps == steps == len(logged)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.states == sum(m["states"] for m in logged) > 0
    assert result.tokens == sum(m["tokens"] for m in logged) > result.states
    assert result.sample and all(s["origin"] == method.source.origin for s in result.sample)
    assert result.generated_tokens == getattr(method.source, "generated_tokens", 0) + getattr(method.signal, "generated_tokens", 0)
    return result, logged


@pytest.mark.parametrize("adapter", [LORA, {**LORA, "forward": "merged"}, {"kind": "full"}], ids=["lora", "lora_merged", "full"])
def test_sft_smoke(tiny_tokenizer, adapter):
    p = sft_params(adapter=adapter, batch_size=1, grad_accum=2)
    model = with_adapter(build_tiny_model(tiny_tokenizer), p.adapter)
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    if adapter["kind"] == "lora":
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert len(trainable) == len(list(model.parameters()))
    method = methods.sft_method("sft", ROWS, tiny_tokenizer, p, 0)
    result, _ = _smoke(model, method, p)
    # a step batch is batch_size x grad_accum = 2 rows; every gold token (through EOS) is a state
    assert [len(d) for d in method.source.drawn] == [2, 2]
    gold = {i: len(methods.encode_gold(tiny_tokenizer, ROWS[i])) for i in range(2)}
    assert result.states == sum(gold[i] for d in method.source.drawn for i in d) and result.generated_tokens == 0


@pytest.mark.parametrize(
    "over",
    [
        {},  # the paper's continuation signal
        {"signal": "one_step_kl", "kl": {"direction": "forward"}},
        {"signal": "token_kl"},
        {"signal": "token_kl", "kl": {"estimator": "sampled"}},
        {"states": "teacher"},  # the teacher-state control
    ],
    ids=["continuation", "one_step_kl", "token_kl_full", "token_kl_sampled", "teacher_states"],
)
def test_opd_smoke_each_signal(tiny_tokenizer, over):
    p = opd_params(**over)
    teacher = build_tiny_model(tiny_tokenizer, seed=1, init_std=0.5).requires_grad_(False)
    student = with_adapter(build_tiny_model(tiny_tokenizer, seed=0), p.adapter)
    method = methods.opd_method("opd", ROWS, tiny_tokenizer, teacher, p, seed=0)
    want = {"continuation": "tokens", "one_step_kl": "distribution", "token_kl": "distribution"}[p.signal]
    if p.kl.estimator == "sampled":
        want = "sampled_kl"
    assert method.loss.kind == want and method.loss.kl_direction == p.kl.direction
    assert method.source.origin == ("teacher" if p.states == "teacher" else "learner")
    result, logged = _smoke(student, method, p)
    assert result.generated_tokens > 0 and method.source.generated_tokens > 0
    if p.states == "teacher":
        assert method.source.engine.syncs == 0 and method.source.calls == 1  # 2 steps x 2 rollouts fill one batch of 4
    else:
        assert method.source.engine.syncs == 2 and method.source.calls == 2
    if want == "sampled_kl":
        assert all("kl_estimate" in m for m in logged)


def test_opd_sampled_forward_kl_is_rejected(tiny_tokenizer):
    p = opd_params(signal="token_kl", kl={"direction": "forward", "estimator": "sampled"})
    with pytest.raises(ValueError, match="reverse"):
        methods.opd_method("opd", ROWS, tiny_tokenizer, build_tiny_model(tiny_tokenizer), p, seed=0)


@pytest.mark.parametrize("over", [{}, {"loss_agg": "sequence_mean", "kl_coef": 0.1, "inner_steps": 2, "std_norm": False}],
                         ids=["token_mean", "sequence_mean_kl_ppo"])
def test_rl_smoke(tiny_tokenizer, over):
    p = rl_params(**over)
    policy = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.5), p.adapter)
    method = methods.rl_method("rl", ROWS, tiny_tokenizer, p, seed=0)
    assert method.reuse == p.inner_steps and method.loss.agg == p.loss_agg and method.loss.kl_coef == p.kl_coef
    method.signal.reward_fn = lambda text, answer: float(len(text) % 2 == 0)  # a reward with spread on a random model
    result, logged = _smoke(policy, method, p)
    assert all({"reward_mean", "entropy", "clip_frac"} <= m.keys() for m in logged)
    assert ("kl_ref" in logged[0]) == (p.kl_coef > 0)
    assert method.source.calls == 2 // p.inner_steps  # a reused batch is drawn once
    assert result.generated_tokens == method.source.generated_tokens > 0


def test_loop_stops_on_nan_loss(tiny_tokenizer):
    p = sft_params(adapter={"kind": "full"})
    model = build_tiny_model(tiny_tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="step 0"):
        train(model, methods.sft_method("sft", ROWS, tiny_tokenizer, p, 0), p, 2, pad_id=0, progress=False)


# --------------------------------------------------------------------------- the sampler follows the policy


def _lora_policy(tiny_tokenizer):
    from poststate.params import Adapter

    policy = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.5), Adapter(kind="lora", r=4, alpha=8))
    give_lora_weights(policy)
    return policy


def test_learner_rollouts_come_from_the_current_policy(tiny_tokenizer):
    p = rl_params()
    policy = _lora_policy(tiny_tokenizer)
    stream = ("train", "t", 7)
    new = lambda: methods.RolloutStates("learner", ROWS, tiny_tokenizer, p.rollout, 2, 3, stream, 6)
    source = new()
    first = source.draw(policy)
    assert new().draw(policy).prefix_ids == first.prefix_ids  # same stream, same weights
    with torch.no_grad():
        for n, w in policy.named_parameters():
            if "lora_B" in n:
                w.mul_(-3.0)
    moved = new().draw(policy)
    assert moved.prefix_ids != first.prefix_ids
    source.calls, source.epochs = 0, methods.Epochs(len(ROWS), stream_seed(*stream, "prompts"))  # rewind the stream
    assert source.draw(policy).prefix_ids == moved.prefix_ids  # the reused source re-synced to the new weights


def test_sampling_copy_is_the_policy_merged_and_follows_its_updates(tiny_tokenizer):
    from poststate.modeling import SamplingCopy

    policy = _lora_policy(tiny_tokenizer)
    base_before = {n: p.clone() for n, p in policy.named_parameters() if "lora_" not in n}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    sampler = SamplingCopy(policy)
    model = sampler.sync()
    assert model is not policy and not any("lora_" in n for n, _ in model.named_parameters())
    want = policy.eval()(input_ids=ids).logits
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)
    with policy.disable_adapter():
        assert not torch.allclose(policy(input_ids=ids).logits, want, atol=1e-3)  # the adapter matters
    with torch.no_grad():  # an optimizer step on the adapter
        for n, p in policy.named_parameters():
            if "lora_A" in n:
                p.mul_(-1.5)
    want = policy(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, want, atol=1e-3)  # stale until synced
    assert torch.allclose(sampler.sync()(input_ids=ids).logits, want, atol=1e-5)
    assert all(torch.equal(p, base_before[n]) for n, p in policy.named_parameters() if "lora_" not in n)


def test_sampling_copy_of_a_full_model_is_the_model_and_refuses_untracked_trainables(tiny_tokenizer):
    from poststate.modeling import SamplingCopy

    full = build_tiny_model(tiny_tokenizer)
    assert SamplingCopy(full).sync() is full
    policy = _lora_policy(tiny_tokenizer)
    policy.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="norm.weight"):
        SamplingCopy(policy)


def test_merged_lora_forward_is_peft_lora(tiny_tokenizer, tmp_path):
    from poststate.modeling import SamplingCopy
    from poststate.params import Adapter

    plain = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.1), Adapter(**LORA))
    give_lora_weights(plain)
    merged_lora = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.1), Adapter(**LORA, forward="merged"))
    merged_lora.load_state_dict(plain.state_dict())
    assert merged_lora.state_dict().keys() == plain.state_dict().keys()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    attn = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    want, got = plain(input_ids=ids, attention_mask=attn).logits, merged_lora(input_ids=ids, attention_mask=attn).logits
    assert torch.allclose(got, want, atol=1e-5)
    want.logsumexp(-1).sum().backward()
    got.logsumexp(-1).sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), merged_lora.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:  # float rounding differs (B A is formed first), relative to the gradient's scale
            assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max(), n
    with merged_lora.disable_adapter(), plain.disable_adapter():
        assert torch.equal(merged_lora(input_ids=ids).logits, plain(input_ids=ids).logits)  # the base model
    assert torch.allclose(SamplingCopy(merged_lora).sync()(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
    plain.save_pretrained(tmp_path / "plain")
    merged_lora.save_pretrained(tmp_path / "merged")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "merged" / f).read_bytes(), f


def test_merged_lora_forward_refuses_dropout():
    from poststate.params import Adapter

    with pytest.raises(ValidationError, match="dropout"):
        Adapter(kind="lora", dropout=0.1, forward="merged")


def test_lr_schedule_warms_up_from_the_first_step_then_is_transformers_cosine():
    import math

    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from poststate.loop import lr_schedule

    for steps, warmup, floor in ((24, 0, 0.0), (24, 3, 0.0), (700, 35, 0.1)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        hf = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps, min_lr_rate=floor)
        theirs = []
        for _ in range(steps):
            theirs.append(hf.get_last_lr()[0])
            opt.step()
            hf.step()
        ours = [lr_schedule(steps, warmup, floor)(t) for t in range(steps)]
        assert ours[warmup:] == pytest.approx(theirs[warmup:], abs=1e-12)  # the same cosine after warmup
        assert ours[:warmup] == pytest.approx([(t + 1) / (warmup + 1) for t in range(warmup)])
        assert ours[0] > 0 and (warmup == 0 or theirs[0] == 0.0)  # transformers' first step trains nothing
        assert math.isclose(max(ours), 1.0)
