"""States, signals and the one loop: masks, cut points, and a 2-step smoke run per method."""

import copy
import random

import pytest
import torch

from poststate import methods
from poststate.loop import NonFiniteLoss, train
from poststate.methods import States
from poststate.modeling import with_adapter
from poststate.params import Opd, Rl, Sft
from tests.conftest import build_tiny_model, give_lora_weights

ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "She sold 48 clips in April and half as many in May. How many clips?", "answer": "48 / 2 = <<48/2=24>>24, 48 + 24 = <<48+24=72>>72.\n#### 72"},
]
OPTIM = dict(lr=1e-2, batch_size=4, grad_accum=1, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, max_len=160)
LORA = {"kind": "lora", "r": 4, "alpha": 8}
ROLLOUT = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0}


def opd_params(**over) -> Opd:
    body = dict(OPTIM, adapter=LORA, signal="continuation", states="student", init="base", steps=2, prompts_per_step=2,
                rollout=ROLLOUT, continuation={"cuts": 2, "cut_rule": "uniform", "length": 4, "temperature": 0.0},
                kl={"direction": "reverse", "estimator": "full"})
    return Opd.model_validate(methods_merge(body, over))


def methods_merge(body, over):
    out = copy.deepcopy(body)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_pad_batch_marks_states_and_left_truncates():
    ids, attn, st = methods.pad_batch([[1, 2, 3, 4, 5], [6, 7]], [[1, 3], [0]], pad_id=0, max_len=4)
    assert ids.tolist() == [[2, 3, 4, 5], [6, 7, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert st.tolist() == [[1, 0, 1, 0], [1, 0, 0, 0]]  # position 1 -> 0 and 3 -> 2 after dropping one token


@pytest.mark.parametrize("rule,expect", [("stride", [0, 2, 5, 7]), ("uniform", None)])
def test_cut_points(rule, expect):
    cuts = methods.cut_points(10, 4, rule, random.Random(0))
    assert len(cuts) == 4 and all(0 <= c <= 10 for c in cuts) and cuts == sorted(cuts)
    if expect is not None:
        assert cuts == expect
    assert methods.cut_points(10, 4, rule, random.Random(0)) == cuts
    with pytest.raises(ValueError, match="zigzag"):
        methods.cut_points(10, 4, "zigzag", random.Random(0))


def test_continuation_signal_masks_exactly_the_teacher_tokens(tiny_tokenizer):
    teacher = build_tiny_model(tiny_tokenizer, seed=1, init_std=0.5)
    states = States("learner", [[5, 6, 7], [8, 9]], [[10, 11], []], ROWS, [0, 1], all_prefixes=False)
    p = opd_params().continuation
    signal = methods.TeacherContinuation(teacher, tiny_tokenizer, p, max_len=64, batch_size=2, seed=0, max_new_tokens=12)
    sup = signal.supervise(states, teacher)
    for b, (x, y) in enumerate(zip(states.prompt_ids, states.prefix_ids)):
        n = int(sup.attn_BT[b].sum())
        cont = sup.ids_BT[b, len(x) + len(y) : n].tolist()
        assert 1 <= len(cont) <= 4
        marked = sup.state_BT[b].nonzero().flatten().tolist()
        # the marked states are exactly those whose next token is a teacher token
        assert marked == list(range(len(x) + len(y) - 1, n - 1))
        assert sup.ids_BT[b, : len(x) + len(y)].tolist() == x + y


def test_gold_tokens_mark_every_answer_token(tiny_tokenizer):
    src = methods.DatasetStates(ROWS, tiny_tokenizer, batch_size=2, seed=0)
    st = src.draw(None)
    sup = methods.GoldTokens(tiny_tokenizer, max_len=256).supervise(st, None)
    for b, (x, y) in enumerate(zip(st.prompt_ids, st.prefix_ids)):
        marked = sup.state_BT[b].nonzero().flatten()
        assert marked.tolist() == list(range(len(x) - 1, len(x) + len(y) - 1))
        assert sup.ids_BT[b, marked + 1].tolist() == y  # targets are the gold tokens (+EOS), no prompt token
        assert y[-1] == tiny_tokenizer.eos_token_id


def _changed(before, model) -> bool:
    after = {k: v for k, v in model.state_dict().items()}
    return any(not torch.equal(before[k], after[k]) for k in before)


def _smoke(model, method, p, steps=2):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, method, p, steps, progress=False)
    assert result.steps == steps and result.states > 0
    assert torch.isfinite(torch.tensor(result.last["loss"]))
    assert _changed(before, model)
    return result


@pytest.mark.parametrize("adapter", [LORA, {**LORA, "forward": "merged"}, {"kind": "full"}], ids=["lora", "lora_merged", "full"])
def test_sft_smoke_lora_and_full(tiny_tokenizer, adapter):
    p = Sft.model_validate(dict(OPTIM, adapter=adapter, epochs=1, length_groups=2))
    model = with_adapter(build_tiny_model(tiny_tokenizer), p.adapter)
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    if adapter["kind"] == "lora":
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert len(trainable) == len(list(model.parameters()))
    _smoke(model, methods.sft_method("sft", ROWS, tiny_tokenizer, p, 0), p)


@pytest.mark.parametrize(
    "over",
    [
        {},  # the paper's continuation signal
        {"signal": "one_step_kl", "kl": {"direction": "forward"}},
        {"signal": "token_kl"},
        {"signal": "token_kl", "kl": {"estimator": "sampled"}},
        {"states": "teacher"},  # offline SeqKD control
    ],
    ids=["continuation", "one_step_kl", "token_kl_full", "token_kl_sampled", "seqkd"],
)
def test_opd_smoke_each_signal(tiny_tokenizer, over):
    p = opd_params(**over)
    teacher = build_tiny_model(tiny_tokenizer, seed=1, init_std=0.5).requires_grad_(False)
    student = with_adapter(build_tiny_model(tiny_tokenizer, seed=0), p.adapter)
    method = methods.opd_method("opd", ROWS, tiny_tokenizer, teacher, p, seed=0)
    assert method.source.origin == ("teacher" if over.get("states") == "teacher" else "learner")
    result = _smoke(student, method, p)
    assert all(s["origin"] == method.source.origin for s in result.sample)


def test_opd_sampled_forward_kl_is_rejected(tiny_tokenizer):
    p = opd_params(signal="token_kl", kl={"direction": "forward", "estimator": "sampled"})
    with pytest.raises(ValueError, match="reverse"):
        methods.opd_method("opd", ROWS, tiny_tokenizer, build_tiny_model(tiny_tokenizer), p, seed=0)


def rl_params(**over) -> Rl:
    body = dict(OPTIM, adapter=LORA, init="base", steps=2, prompts_per_step=2, group_size=4, rollout=ROLLOUT,
                std_norm=True, kl_coef=0.1, clip_eps=0.2, inner_steps=1)
    return Rl.model_validate({**body, **over})


@pytest.mark.parametrize("inner", [1, 2])
def test_rl_smoke(tiny_tokenizer, inner):
    p = rl_params(inner_steps=inner, length_groups=inner)  # inner 2: reused batches run as 2 length groups
    # reward 1 for even-length answers: a signal with spread on a random model
    policy = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.5), p.adapter)
    method = methods.rl_method("rl", ROWS, tiny_tokenizer, p, seed=0)
    method.signal.reward_fn = lambda text, answer: float(len(text) % 2 == 0)
    result = _smoke(policy, method, p)
    assert "reward_mean" in result.last and "kl_ref" in result.last and "entropy" in result.last
    assert method.source.calls == (2 if inner == 1 else 1)  # a reused batch is drawn once
    groups = method.signal._cache[1].length_groups(p.length_groups)  # pi_old, stored by the batch's first pass
    assert all(g.old_logp_BT is not None for g, _ in groups)


def test_rl_reward_is_the_eval_scorer(tiny_tokenizer):
    from poststate import scoring

    assert methods.Reward(tiny_tokenizer, 64, True, 0.0).reward_fn is scoring.gsm8k_reward
    for text, ok in [(" so 3 + 4 = 7.\n#### 7", 1.0), (" #### 8", 0.0), (" the answer is 7", 0.0)]:
        assert scoring.gsm8k_reward(text, ROWS[0]["answer"]) == ok == float(scoring.gsm8k_score(text, ROWS[0]["answer"]).strict)


def test_rollout_states_reproducible_under_seed(tiny_tokenizer):
    p = rl_params()
    model = build_tiny_model(tiny_tokenizer, init_std=0.5)
    draw = lambda: methods.RolloutStates("learner", ROWS, tiny_tokenizer, p.rollout, 2, 3, 7, 4).draw(model)
    a, b = draw(), draw()
    assert a.prefix_ids == b.prefix_ids and len(a.prefix_ids) == 6
    other = methods.RolloutStates("learner", ROWS, tiny_tokenizer, p.rollout, 2, 3, 8, 4).draw(model)
    assert other.prefix_ids != a.prefix_ids


def test_loop_stops_on_nan_loss(tiny_tokenizer):
    p = Sft.model_validate(dict(OPTIM, adapter={"kind": "full"}, epochs=1))
    model = build_tiny_model(tiny_tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    method = methods.sft_method("sft", ROWS, tiny_tokenizer, p, 0)
    with pytest.raises(NonFiniteLoss, match="step 0"):
        train(model, method, p, 2, progress=False)


def _lora_policy(tiny_tokenizer):
    from poststate.params import Adapter

    policy = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.5), Adapter(kind="lora", r=4, alpha=8))
    give_lora_weights(policy)
    return policy


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


def test_learner_rollouts_come_from_the_current_policy(tiny_tokenizer):
    p = rl_params()
    policy = _lora_policy(tiny_tokenizer)
    source = methods.RolloutStates("learner", ROWS, tiny_tokenizer, p.rollout, 2, 3, 7, 4)
    first = source.draw(policy)
    fresh = methods.RolloutStates("learner", ROWS, tiny_tokenizer, p.rollout, 2, 3, 7, 4)
    assert fresh.draw(policy).prefix_ids == first.prefix_ids  # same seed, same weights
    with torch.no_grad():
        for n, w in policy.named_parameters():
            if "lora_B" in n:
                w.mul_(-3.0)
    again = methods.RolloutStates("learner", ROWS, tiny_tokenizer, p.rollout, 2, 3, 7, 4)
    moved = again.draw(policy)
    source.calls, source.epochs, source.rng = 0, methods.Epochs(len(ROWS), 7), random.Random(7)  # rewind the reused source
    assert source.draw(policy).prefix_ids == moved.prefix_ids != first.prefix_ids  # a reused source re-syncs


# --------------------------------------------------------------------------- throughput options: same step


def _supervised(tiny_tokenizer, kind: str):
    """A real batch of each supervision kind, with rows of different lengths."""
    model = build_tiny_model(tiny_tokenizer, init_std=0.5)
    if kind == "tokens":
        rows = ROWS + [{"question": "Ann has 2 pens. How many?", "answer": "#### 2"}, {"question": "Bo has 5 cups and 1 more.", "answer": "5 + 1 = 6.\n#### 6"}]
        method = methods.sft_method("sft", rows, tiny_tokenizer, Sft.model_validate(dict(OPTIM, adapter=LORA, epochs=1)), 0)
    elif kind == "reward":
        method = methods.rl_method("rl", ROWS, tiny_tokenizer, rl_params(), seed=0)
        method.signal.reward_fn = lambda text, answer: float(len(text) % 2 == 0)
    else:
        over = {"distribution": {"signal": "token_kl"}, "sampled_kl": {"signal": "token_kl", "kl": {"estimator": "sampled"}}}[kind]
        teacher = build_tiny_model(tiny_tokenizer, seed=1, init_std=0.5).requires_grad_(False)
        method = methods.opd_method("opd", ROWS * 2, tiny_tokenizer, teacher, opd_params(prompts_per_step=4, **over), seed=0)
    policy = with_adapter(model, Sft.model_validate(dict(OPTIM, adapter=LORA, epochs=1)).adapter)
    give_lora_weights(policy)
    sup = method.signal.supervise(method.source.draw(policy), policy)
    assert sup.kind == kind
    return policy, sup, method.loss


def _loss_and_grads(policy, sup, cfg, k):
    policy.zero_grad(set_to_none=True)
    total, stats = 0.0, {}
    for group, weight in sup.length_groups(k):
        loss, st = methods.objective(policy(input_ids=group.ids_BT, attention_mask=group.attn_BT).logits, group, cfg)
        (loss * weight).backward()
        total += float(loss) * weight
        for name, v in st.items():
            stats[name] = stats.get(name, 0.0) + v * weight
    return total, stats, {n: q.grad.clone() for n, q in policy.named_parameters() if q.requires_grad}


@pytest.mark.parametrize("kind", ["tokens", "distribution", "sampled_kl", "reward"])
def test_length_groups_give_the_whole_batch_loss_and_gradient(tiny_tokenizer, kind):
    policy, sup, cfg = _supervised(tiny_tokenizer, kind)
    lengths = sup.attn_BT.sum(1)
    assert lengths.min() < lengths.max()  # a batch with padding to save
    whole = _loss_and_grads(policy, copy.deepcopy(sup), cfg, 1)
    for k in (2, 3):
        fresh = copy.deepcopy(sup)  # pi_old (reward) is stored per group: start from the batch as drawn
        groups = fresh.length_groups(k)
        assert len(groups) == k and abs(sum(w for _, w in groups) - 1.0) < 1e-9
        assert sum(g.ids_BT.numel() for g, _ in groups) < sup.ids_BT.numel()  # less padding forwarded
        rows = sorted(tuple(g.ids_BT[i, : int(g.attn_BT[i].sum())].tolist()) for g, _ in groups for i in range(len(g.ids_BT)))
        assert rows == sorted(tuple(sup.ids_BT[i, : int(sup.attn_BT[i].sum())].tolist()) for i in range(len(sup.ids_BT)))
        loss, stats, grads = _loss_and_grads(policy, fresh, cfg, k)
        assert loss == pytest.approx(whole[0], rel=1e-5, abs=1e-7)
        assert stats.keys() == whole[1].keys() and all(stats[s] == pytest.approx(whole[1][s], rel=1e-5, abs=1e-6) for s in stats)
        for name, g in grads.items():
            assert torch.allclose(g, whole[2][name], rtol=1e-4, atol=1e-7), name


def test_length_groups_are_kept_with_their_pi_old(tiny_tokenizer):
    policy, sup, cfg = _supervised(tiny_tokenizer, "reward")
    first = sup.length_groups(2)
    _loss_and_grads(policy, sup, cfg, 2)
    again = sup.length_groups(2)
    assert [g for g, _ in again] == [g for g, _ in first] and all(g.old_logp_BT is not None for g, _ in again)
    with torch.no_grad():  # a step: the reused batch's ratio is now taken against the stored pi_old
        for n, q in policy.named_parameters():
            if "lora_B" in n:
                q.mul_(3.0)
    assert _loss_and_grads(policy, sup, cfg, 2)[1]["clip_frac"] > 0


def test_merged_lora_forward_is_peft_lora(tiny_tokenizer, tmp_path):
    from poststate.modeling import SamplingCopy
    from poststate.params import Adapter

    plain = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.1), Adapter(**LORA))
    give_lora_weights(plain)
    merged = with_adapter(build_tiny_model(tiny_tokenizer, init_std=0.1), Adapter(**LORA, forward="merged"))
    merged.load_state_dict(plain.state_dict())
    assert merged.state_dict().keys() == plain.state_dict().keys()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    attn = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    want, got = plain(input_ids=ids, attention_mask=attn).logits, merged(input_ids=ids, attention_mask=attn).logits
    assert torch.allclose(got, want, atol=1e-5)
    want.logsumexp(-1).sum().backward()
    got.logsumexp(-1).sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), merged.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:  # float rounding differs (B A is formed first), relative to the gradient's scale
            assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max(), n
    with merged.disable_adapter(), plain.disable_adapter():
        assert torch.equal(merged(input_ids=ids).logits, plain(input_ids=ids).logits)  # the base model
    assert torch.allclose(SamplingCopy(merged).sync()(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
    plain.save_pretrained(tmp_path / "plain")
    merged.save_pretrained(tmp_path / "merged")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "merged" / f).read_bytes(), f


def test_merged_lora_forward_refuses_dropout():
    from pydantic import ValidationError

    from poststate.params import Adapter

    with pytest.raises(ValidationError, match="dropout"):
        Adapter(kind="lora", dropout=0.1, forward="merged")


def test_teacher_states_are_drawn_ahead_learner_states_each_step(tiny_tokenizer):
    p = rl_params()
    teacher = build_tiny_model(tiny_tokenizer, seed=1, init_std=0.5)
    rows = ROWS * 3  # 6 prompts: one epoch of the seeded shuffle
    ahead = methods.RolloutStates("teacher", rows, tiny_tokenizer, p.rollout, 2, 1, 7, batch_size=4, teacher=teacher)
    draws = [ahead.draw(None) for _ in range(3)]
    assert ahead.calls == 2  # 4 rollouts fill a generation batch: two steps per generate call
    order = methods.Epochs(len(rows), 7).take(6)
    for k, st in enumerate(draws):
        assert st.origin == "teacher" and st.group == [0, 1]
        assert st.rows == [rows[i] for i in order[2 * k : 2 * k + 2]]  # the prompt stream, in step order
    learner = methods.RolloutStates("learner", rows, tiny_tokenizer, p.rollout, 2, 1, 7, batch_size=4)
    for _ in range(3):
        learner.draw(build_tiny_model(tiny_tokenizer, init_std=0.5))
    assert learner.calls == 3
