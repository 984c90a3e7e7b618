"""`objective.StateObjective`: a micro-batch's loss from hidden states gathered at the state positions.

The reference for every supervision kind is computed naively: the model's full (B, T, V) `model(...).logits`
over the padded micro-batch, the state positions and targets worked out here from the Supervised rows (not
from the Micro), the formulas written out. Chunking the LM head (a small `LOGIT_BUDGET`) must give the same
value and gradient, and no (B, T, V) tensor may be built.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from poststate import objective
from poststate.methods import Supervised
from poststate.modeling import with_adapter
from poststate.objective import LossConfig, StateObjective, row_values
from poststate.params import Adapter
from tests.conftest import build_tiny_model, give_lora_weights

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LEN = 16
PAD = 0
LENS, PROMPT_LENS = (14, 9, 22, 5), (4, 3, 6, 2)  # row 2 is longer than MAX_LEN: left-truncated by 6 tokens
ADV = [0.8, -1.2, 0.5, -0.3]
ATOL, RTOL = 1e-5, 1e-5


def make_sup(kind: str, vocab: int, end_states: bool = False) -> Supervised:
    """Rows of random ids; states predict every response token, and with `end_states` also the state at
    each row's last token (a one-step KL state: no target token)."""
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in LENS]
    positions = [list(range(p - 1, n - 1)) + ([n - 1] if end_states else []) for p, n in zip(PROMPT_LENS, LENS)]
    return Supervised(kind, seqs, positions, list(PROMPT_LENS), "test", adv=list(ADV) if kind == "reward" else None)


def expected_states(sup: Supervised, rows: list[int]) -> list[tuple[int, int, int | None, int]]:
    """(micro row r, position t in the truncated row, target id or None, batch row b) of every kept state,
    worked out from the Supervised rows: a row longer than MAX_LEN loses its first tokens, states shift
    with it and those that fall off are dropped."""
    out = []
    for r, b in enumerate(rows):
        seq, cut = sup.seqs[b], max(0, len(sup.seqs[b]) - MAX_LEN)
        for p in sup.positions[b]:
            if p - cut >= 0:
                out.append((r, p - cut, seq[p + 1] if p + 1 < len(seq) else None, b))
    return out


def naive(lm, sup: Supervised, micro, cfg: LossConfig, teacher=None, old_logp_N=None):
    """(loss sum, per-state values (N,), stats) from the full (B, T, V) logits of the padded micro-batch."""
    states = expected_states(sup, micro.rows)
    r_N = torch.tensor([s[0] for s in states])
    t_N = torch.tensor([s[1] for s in states])
    logits_BTV = lm(input_ids=micro.ids_BT, attention_mask=micro.attn_BT).logits
    logp_NV = torch.log_softmax(logits_BTV[r_N, t_N].float(), -1)
    stats = {}
    if cfg.kind in ("distribution", "sampled_kl"):
        with torch.no_grad():
            t_logits_BTV = teacher(input_ids=micro.ids_BT, attention_mask=micro.attn_BT).logits
        t_logp_NV = torch.log_softmax(t_logits_BTV[r_N, t_N].float(), -1)
    if cfg.kind == "distribution":
        if cfg.kl_direction == "forward":  # KL(teacher || student)
            values_N = (t_logp_NV.exp() * (t_logp_NV - logp_NV)).sum(-1)
        else:  # KL(student || teacher)
            values_N = (logp_NV.exp() * (logp_NV - t_logp_NV)).sum(-1)
    else:
        y_N = torch.tensor([s[2] for s in states])
        logp_N = logp_NV.gather(-1, y_N[:, None]).squeeze(-1)
        if cfg.kind == "tokens":
            values_N = -logp_N
        elif cfg.kind == "sampled_kl":
            k1_N = (logp_N - t_logp_NV.gather(-1, y_N[:, None]).squeeze(-1)).detach()
            values_N, stats["kl_estimate"] = k1_N * logp_N, k1_N.sum()
        else:  # reward: PPO-clipped ratio against pi_old (= this forward, detached, on a first pass)
            adv_N = torch.tensor([sup.adv[s[3]] for s in states])
            old_N = logp_N.detach() if old_logp_N is None else old_logp_N
            ratio_N = (logp_N - old_N).exp()
            clipped = ratio_N.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
            values_N = -torch.minimum(ratio_N * adv_N, clipped * adv_N)
            stats["clip_frac"] = ((ratio_N - 1).abs() > cfg.clip_eps).float().sum()
            stats["entropy"] = -(logp_NV.exp() * logp_NV).sum(-1).detach().sum()
            if cfg.kl_coef > 0:
                with torch.no_grad(), lm.disable_adapter():
                    ref_BTV = lm(input_ids=micro.ids_BT, attention_mask=micro.attn_BT).logits
                ref_N = torch.log_softmax(ref_BTV[r_N, t_N].float(), -1).gather(-1, y_N[:, None]).squeeze(-1)
                k3_N = (ref_N - logp_N).exp() - (ref_N - logp_N) - 1
                values_N = values_N + cfg.kl_coef * k3_N
                stats["kl_ref"] = k3_N.detach().sum()
    if cfg.agg == "token_mean":
        total = values_N.sum()
    else:
        total = sum(values_N[r_N == r].mean() for r in r_N.unique().tolist())
    return total, values_N, stats


def grads(lm) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad and p.grad is not None}
    lm.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    scale = max(float(g.abs().max()) for g in b.values())
    assert scale > 1e-3  # a gradient to compare
    for n in a:  # float summation order differs: ~5e-7 of the gradient's scale observed (fp32)
        assert float((a[n] - b[n]).abs().max()) <= 1e-5 * scale, n


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, seed=1, init_std=0.5).requires_grad_(False)


def lora_model(tokenizer):
    lm = with_adapter(build_tiny_model(tokenizer, seed=0, init_std=0.3), Adapter(kind="lora", r=4, alpha=8))
    give_lora_weights(lm)
    return lm


def full_model(tokenizer):
    return with_adapter(build_tiny_model(tokenizer, seed=0, init_std=0.3), Adapter(kind="full"))


# kind, LossConfig, model builder, end states (one-step KL states without a target token)
CASES = [
    ("tokens", LossConfig(kind="tokens"), full_model, False),
    ("tokens", LossConfig(kind="tokens", agg="sequence_mean"), lora_model, False),
    ("distribution", LossConfig(kind="distribution", kl_direction="forward"), lora_model, True),
    ("distribution", LossConfig(kind="distribution", kl_direction="reverse"), full_model, True),
    ("sampled_kl", LossConfig(kind="sampled_kl"), lora_model, False),
    ("reward", LossConfig(kind="reward", clip_eps=0.2), lora_model, False),
    ("reward", LossConfig(kind="reward", agg="sequence_mean", clip_eps=0.2, kl_coef=0.1), lora_model, False),
]
IDS = ["tokens-full", "tokens-seqmean-lora", "kl-forward", "kl-reverse-full", "sampled_kl", "reward", "reward-kl-seqmean"]


def _micro(sup):
    (micro,) = sup.micro_batches(8, MAX_LEN, PAD)  # all four rows in one micro-batch
    assert micro.rows == [2, 0, 1, 3]  # longest first (row 2 counts as MAX_LEN after truncation)
    return micro


def _old_logp(lm, sup, micro):
    """A pi_old from an earlier epoch: this model's log-probs, moved so that ratios leave [0.8, 1.2]."""
    with torch.no_grad():
        _, values_N, _ = naive(lm, sup, micro, LossConfig(kind="tokens"))
    return -values_N + 0.4 * torch.randn(values_N.shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind,cfg,build,end_states", CASES, ids=IDS)
def test_micro_batch_loss_is_the_naive_full_logits_reference(tiny_tokenizer, teacher, kind, cfg, build, end_states):
    lm = build(tiny_tokenizer)
    sup = make_sup(kind, len(tiny_tokenizer), end_states)
    micro = _micro(sup)
    states = expected_states(sup, micro.rows)
    assert len(states) < sum(len(p) for p in sup.positions)  # truncation dropped states
    for r, b in enumerate(micro.rows):  # the micro-batch holds the truncated rows, right-padded
        s = sup.seqs[b][-MAX_LEN:]
        assert micro.ids_BT[r, : len(s)].tolist() == s and int(micro.attn_BT[r].sum()) == len(s)
    old = _old_logp(lm, sup, micro) if kind == "reward" else None
    micro.old_logp_N = old
    t = teacher if kind in ("distribution", "sampled_kl") else None

    got, stats = StateObjective(lm, cfg)(micro, t)
    got.backward()
    g_got = grads(lm)
    want, values_N, want_stats = naive(lm, sup, micro, cfg, t, old)
    want.backward()
    want = want.detach()
    g_want = grads(lm)

    assert torch.isfinite(want) and abs(want.item()) > 1e-3
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert stats.keys() == want_stats.keys()
    for k in stats:
        torch.testing.assert_close(stats[k].float(), want_stats[k].float(), atol=ATOL, rtol=RTOL, msg=k)
    if kind == "reward":
        assert 0 < float(stats["clip_frac"]) < len(values_N)  # clipping on some states, not all
    assert_same_grads(g_got, g_want)


def test_reward_first_pass_stores_pi_old_and_is_reinforce(tiny_tokenizer):
    lm = lora_model(tiny_tokenizer)
    sup = make_sup("reward", len(tiny_tokenizer))
    micro = _micro(sup)
    assert micro.old_logp_N is None
    loss, stats = StateObjective(lm, LossConfig(kind="reward"))(micro)
    states = expected_states(sup, micro.rows)
    # ratio = 1 everywhere: the loss is -sum of each state's advantage, nothing clipped
    assert loss.item() == pytest.approx(-sum(ADV[s[3]] for s in states), rel=1e-6)
    assert float(stats["clip_frac"]) == 0.0
    _, values_N, _ = naive(lm, sup, micro, LossConfig(kind="tokens"))
    torch.testing.assert_close(micro.old_logp_N, -values_N.detach(), atol=1e-6, rtol=1e-6)
    assert not micro.old_logp_N.requires_grad


@pytest.mark.parametrize("kind,cfg,build,end_states", CASES, ids=IDS)
def test_chunked_head_equals_one_chunk(tiny_tokenizer, teacher, monkeypatch, kind, cfg, build, end_states):
    lm = build(tiny_tokenizer)
    sup = make_sup(kind, len(tiny_tokenizer), end_states)
    t = teacher if kind in ("distribution", "sampled_kl") else None
    old = _old_logp(lm, sup, _micro(sup)) if kind == "reward" else None

    def run():
        micro = _micro(make_sup(kind, len(tiny_tokenizer), end_states))
        micro.old_logp_N = old
        loss, stats = StateObjective(lm, cfg)(micro, t)
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in stats.items()}, grads(lm), len(micro.pos_N)

    whole = run()
    calls = []
    real = objective.checkpoint
    monkeypatch.setattr(objective, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(objective, "LOGIT_BUDGET", 3 * len(tiny_tokenizer))  # 3 states per chunk
    chunked = run()
    n = whole[3]
    assert len(calls) == -(-n // 3) > 1  # every chunk went through activation checkpointing
    torch.testing.assert_close(chunked[0], whole[0], atol=ATOL, rtol=RTOL)
    assert chunked[1].keys() == whole[1].keys()
    for k in whole[1]:
        torch.testing.assert_close(chunked[1][k], whole[1][k], atol=ATOL, rtol=RTOL, msg=k)
    assert_same_grads(chunked[2], whole[2])


def test_row_values_are_per_row_means_in_eval_mode(tiny_tokenizer, teacher):
    lm = lora_model(tiny_tokenizer)
    sup = make_sup("tokens", len(tiny_tokenizer))
    sup.positions[1] = []  # a row without states
    sup.positions[2] = [2, 3, 4]  # all before the truncation cut (6): dropped
    (micro,) = sup.micro_batches(8, MAX_LEN, PAD)
    lm.train()
    got = row_values(lm, micro, LossConfig(kind="tokens"))
    assert lm.training and not got.requires_grad and got.dtype == torch.float64
    with torch.no_grad():
        lm.eval()
        _, values_N, _ = naive(lm, sup, micro, LossConfig(kind="tokens"))
    states = expected_states(sup, micro.rows)
    for r, b in enumerate(micro.rows):
        mine = [v for v, s in zip(values_N.tolist(), states) if s[0] == r]
        if b in (1, 2):
            assert not mine and torch.isnan(got[r])
        else:
            assert mine and float(got[r]) == pytest.approx(sum(mine) / len(mine), rel=1e-5)
    # the distribution kind needs its teacher here too
    dist = make_sup("distribution", len(tiny_tokenizer), end_states=True)
    (dm,) = dist.micro_batches(8, MAX_LEN, PAD)
    kl_rows = row_values(lm, dm, LossConfig(kind="distribution", kl_direction="forward"), teacher)
    assert kl_rows.shape == (4,) and bool((kl_rows > 0).all())


class _VocabTensors(TorchDispatchMode):
    """Records the largest tensor with a vocabulary-sized last dimension that any op returns (forward and
    backward), except (H, V) views of the LM head's weight."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.largest = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.vocab and tuple(t.shape) != (self.hidden, self.vocab):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["tokens", "distribution"])
def test_no_full_vocabulary_tensor_for_the_micro_batch(tiny_tokenizer, teacher, kind):
    lm = lora_model(tiny_tokenizer)
    V = len(tiny_tokenizer)
    sup = make_sup(kind, V)
    sup.positions = [[p[-1]] for p in sup.positions]  # one state per row (cut-point states)
    micro = _micro(sup)
    B, T = micro.ids_BT.shape
    head_inputs = []
    hooks = [m.get_output_embeddings().register_forward_pre_hook(lambda m, a: head_inputs.append(tuple(a[0].shape)))
             for m in (lm.get_base_model(), teacher)]
    try:
        with _VocabTensors(V, 32) as sizes:
            loss, _ = StateObjective(lm, LossConfig(kind=kind))(micro, teacher if kind == "distribution" else None)
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert len(micro.pos_N) == B == 4
    assert head_inputs and all(shape == (B, 32) for shape in head_inputs)  # (N states, hidden), never (B, T, H)
    assert T >= 5 and sizes.largest == B * V  # (N, V) logits with N = B states: a 1/T of a (B, T, V) tensor


def test_bad_configurations_fail_naming_the_problem(tiny_tokenizer):
    sup = make_sup("tokens", len(tiny_tokenizer))
    micro = _micro(sup)
    full = full_model(tiny_tokenizer)
    with pytest.raises(ValueError, match="teacher"):
        StateObjective(full, LossConfig(kind="distribution"))(micro)
    with pytest.raises(ValueError, match="'tokenz'"):
        StateObjective(full, LossConfig(kind="tokenz"))(micro)
    reward = make_sup("reward", len(tiny_tokenizer))
    with pytest.raises(ValueError, match="kl_coef"):
        StateObjective(full, LossConfig(kind="reward", kl_coef=0.1))(_micro(reward))


def test_the_teacher_is_not_a_submodule(tiny_tokenizer, teacher):
    lm = lora_model(tiny_tokenizer)
    obj = StateObjective(lm, LossConfig(kind="distribution"))
    names = {n for n, _ in obj.named_parameters()}
    assert names == {"lm." + n for n, _ in lm.named_parameters()}
    assert not any(p is q for p in obj.parameters() for q in teacher.parameters())
