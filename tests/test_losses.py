"""Per-state losses: hand-computed tables, and TRL 1.16.0 as the oracle for the KL and GRPO losses.

Every function in `poststate.losses` takes one entry per training state (N,) or (N, V). The TRL oracles:
- forward / reverse KL: `trl.experimental.gkd.gkd_trainer.GKDTrainer.generalized_jsd_loss` (beta 0 / 1,
  temperature 1), called as it is;
- GRPO advantages: the lines of `GRPOTrainer._generate_and_score_completions` that compute them
  (trl/trainer/grpo_trainer.py, TRL 1.16.0, lines 2765-2787, multi_objective_aggregation
  "sum_then_normalize"), copied below with TRL's own `nanstd`, because TRL exposes no function for them;
- GRPO loss: TRL's own `GRPOTrainer._compute_loss`, called on a stub trainer (no model, no accelerator)
  whose `_get_per_token_logps_and_entropies` returns log-probs of the same logits through TRL's
  `selective_log_softmax`.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from poststate import losses

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits_of(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


# --------------------------------------------------------------------------- hand-computed tables


def test_token_logp_hand_values_and_float32():
    logits_NV = _logits_of([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]) + torch.tensor([[3.0], [-7.0]])  # a shift per row changes nothing
    got = losses.token_logp(logits_NV, torch.tensor([3, 0]))
    assert got.tolist() == pytest.approx([math.log(0.4), math.log(0.25)], rel=1e-6)
    # bf16 logits (these values are exact in bf16): the log-softmax runs in float32
    wide = torch.tensor([[0.0, 9.0, -3.0, 1.5]])
    got16 = losses.token_logp(wide.bfloat16(), torch.tensor([2]))
    assert got16.dtype == torch.float32
    assert got16.item() == pytest.approx(float(torch.log_softmax(wide, -1)[0, 2]), abs=1e-6)


def test_kl_hand_values():
    p, q = [0.5, 0.5], [0.9, 0.1]
    lp, lq = torch.tensor([p]).log(), torch.tensor([q]).log()
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p || q) = 0.5108
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(q || p) = 0.3681
    assert losses.kl(lp, lq).item() == pytest.approx(fwd, rel=1e-6)
    assert losses.kl(lq, lp).item() == pytest.approx(rev, rel=1e-6)
    assert losses.kl(lp, lp).item() == 0.0
    # per state: two states in, two values out
    both = losses.kl(torch.cat([lp, lq]), torch.cat([lq, lp]))
    assert both.shape == (2,) and both.tolist() == pytest.approx([fwd, rev], rel=1e-6)


def test_distill_kl_directions_and_bad_direction():
    teacher = torch.tensor([[0.5, 0.5]]).log()
    student_logits = torch.tensor([[0.9, 0.1]]).log() + 4.0  # logits: softmax removes the shift
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(teacher || student)
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(student || teacher)
    assert losses.distill_kl(student_logits, teacher, "forward").item() == pytest.approx(fwd, rel=1e-6)
    assert losses.distill_kl(student_logits, teacher, "reverse").item() == pytest.approx(rev, rel=1e-6)
    with pytest.raises(ValueError, match="'sideways'"):
        losses.distill_kl(student_logits, teacher, "sideways")


def test_sampled_reverse_kl_mean_is_the_analytic_kl():
    s = torch.tensor([0.7, 0.2, 0.1])
    t = torch.tensor([0.3, 0.3, 0.4])
    analytic = float((s * (s / t).log()).sum())  # 0.4189
    # Sampling design: 200,000 iid draws y ~ s from one seeded generator. k1(y) = log s(y) - log t(y) has
    # sd ~0.55 here, so the mean's SE is ~0.0012; the tolerance is ~4 SE.
    y = torch.multinomial(s, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    surrogate, estimate = losses.sampled_reverse_kl(s.log()[y], t.log()[y])
    assert estimate.shape == (200_000,)
    assert estimate.mean().item() == pytest.approx(analytic, abs=0.005)
    assert torch.equal(estimate, s.log()[y] - t.log()[y])
    assert torch.equal(surrogate, estimate * s.log()[y])


def test_sampled_reverse_kl_surrogate_has_the_kl_gradient_in_expectation():
    # E_{y~s}[grad (sg(k1(y)) * log s(y))] = grad KL(s || t): the score-function identity, computed exactly
    # by weighting every token y with s(y) (no sampling).
    logits_V = torch.tensor([1.0, -0.5, 0.3, 2.0], requires_grad=True)
    t_logp_V = torch.log_softmax(torch.tensor([0.2, 0.1, -1.0, 0.5]), -1)
    s_logp_V = torch.log_softmax(logits_V, -1)
    surrogate_V, _ = losses.sampled_reverse_kl(s_logp_V, t_logp_V)
    (g_est,) = torch.autograd.grad((s_logp_V.exp().detach() * surrogate_V).sum(), logits_V)
    (g_kl,) = torch.autograd.grad(losses.kl(torch.log_softmax(logits_V, -1)[None], t_logp_V[None]).sum(), logits_V)
    assert g_kl.abs().max() > 0.05
    torch.testing.assert_close(g_est, g_kl, atol=1e-6, rtol=1e-5)


def test_k3_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    # r = log ref - log pi: log 0.5, 0, log 2; k3 = e^r - r - 1
    want = [0.5 - math.log(0.5) - 1, 0.0, 2 - math.log(2) - 1]
    assert losses.k3(logp, ref).tolist() == pytest.approx(want, abs=1e-6)


# (ratio, advantage) -> (loss, clipped indicator, d loss / d logp), clip_eps = 0.2. The PPO surrogate is
# -min(rho A, clip(rho, 0.8, 1.2) A); where the clipped term is the minimum its gradient is 0.
PG_TABLE = [
    (1.0, 2.0, -2.0, 0.0, -2.0),  # rho = 1 (first pass): plain REINFORCE
    (1.5, 1.0, -1.2, 1.0, 0.0),  # above the range, A > 0: clipped, no gradient
    (1.5, -1.0, 1.5, 1.0, 1.5),  # above the range, A < 0: the unclipped term is the min, gradient flows
    (0.5, 1.0, -0.5, 1.0, -0.5),  # below the range, A > 0: unclipped term is the min
    (0.5, -1.0, 0.8, 1.0, 0.0),  # below the range, A < 0: clipped, no gradient
    (1.1, -1.0, 1.1, 0.0, 1.1),  # inside the range
]


def test_policy_gradient_clips_on_both_sides():
    ratio = torch.tensor([r[0] for r in PG_TABLE])
    adv = torch.tensor([r[1] for r in PG_TABLE])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7])
    logp = (old + ratio.log()).requires_grad_(True)
    loss_N, clipped_N = losses.policy_gradient(logp, old, adv, clip_eps=0.2)
    assert loss_N.tolist() == pytest.approx([r[2] for r in PG_TABLE], abs=1e-6)
    assert clipped_N.tolist() == [r[3] for r in PG_TABLE]
    (grad,) = torch.autograd.grad(loss_N.sum(), logp)
    assert grad.tolist() == pytest.approx([r[4] for r in PG_TABLE], abs=1e-6)


def test_entropy_hand_values():
    logits_NV = torch.stack([torch.zeros(4), _logits_of([[0.1, 0.2, 0.3, 0.4]])[0], torch.tensor([30.0, 0, 0, 0])])
    want = [math.log(4), -sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4)), 0.0]
    assert losses.entropy(logits_NV).tolist() == pytest.approx(want, abs=1e-6)


def test_aggregate_token_and_sequence_mean():
    values_N = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    row_N = torch.tensor([0, 0, 1, 2, 2])
    # token mean: every state is a unit -> the sum 15. sequence mean: rows 0, 1, 2 (row 3 has no state, it
    # adds 0): 1.5 + 3 + 4.5 = 9.
    assert losses.aggregate(values_N, row_N, 4, "token_mean").item() == 15.0
    assert losses.aggregate(values_N, row_N, 4, "sequence_mean").item() == 9.0
    with pytest.raises(ValueError, match="'median'"):
        losses.aggregate(values_N, row_N, 4, "median")


def test_grpo_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mean_only = losses.grpo_advantages(r, std_norm=False)
    assert mean_only.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75], [0.0] * 4]
    normed = losses.grpo_advantages(r, std_norm=True)  # eps = 1e-4
    s0 = math.sqrt(1 / 3)  # unbiased sample std of [1, 0, 0, 1]; of [1, 1, 1, 0] it is 0.5
    assert normed[0].tolist() == pytest.approx([x / (s0 + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)], rel=1e-6)
    assert normed[1].tolist() == pytest.approx([x / (0.5 + 1e-4) for x in (0.25, 0.25, 0.25, -0.75)], rel=1e-6)
    assert normed[2].tolist() == [0.0] * 4  # zero spread: no signal, no NaN


def test_grpo_advantages_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(4,\)"):
        losses.grpo_advantages(torch.ones(4), std_norm=True)
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        losses.grpo_advantages(torch.ones(3, 1), std_norm=True)


# --------------------------------------------------------------------------- TRL as the oracle


def _gkd():
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("direction,beta", [("forward", 0.0), ("reverse", 1.0)])
def test_distill_kl_is_trl_generalized_jsd(direction, beta):
    gjsd = _gkd()
    gen = torch.Generator().manual_seed(0)
    N, V = 7, 11
    student_NV = (2 * torch.randn(N, V, generator=gen)).requires_grad_(True)
    teacher_NV = 2 * torch.randn(N, V, generator=gen)
    teacher_logp_NV = torch.log_softmax(teacher_NV, -1)
    # per state: TRL's reduction "none" returns the elementwise terms; their sum over V is one state's KL
    ours_N = losses.distill_kl(student_NV, teacher_logp_NV, direction)
    trl_N = gjsd(student_NV[None], teacher_NV[None], beta=beta, temperature=1.0, reduction="none").sum(-1)[0]
    torch.testing.assert_close(ours_N, trl_N, atol=1e-6, rtol=1e-5)
    assert ours_N.min() > 0.05  # the distributions differ: a real comparison
    # token mean over the states TRL's labels keep (-100 = masked): our token_mean sum / units, value and gradient
    keep_N = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    labels = torch.where(keep_N, 3, -100)[None]
    row_N = torch.zeros(int(keep_N.sum()), dtype=torch.long)
    ours = losses.aggregate(ours_N[keep_N], row_N, 1, "token_mean") / keep_N.sum()
    theirs = gjsd(student_NV[None], teacher_NV[None], labels=labels, beta=beta, temperature=1.0, reduction="batchmean")
    (g_ours,) = torch.autograd.grad(ours, student_NV)
    (g_trl,) = torch.autograd.grad(theirs, student_NV)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_trl, atol=1e-7, rtol=1e-5)
    assert g_ours[~keep_N].abs().max() == 0 and g_ours[keep_N].abs().min() > 0


def _trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """trl/trainer/grpo_trainer.py (TRL 1.16.0) lines 2765-2787, `sum_then_normalize` with one reward function,
    verbatim but for the `num_generations > 1` branch it never leaves in training."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


@pytest.mark.parametrize("std_norm,scale_rewards", [(True, "group"), (False, "none")])
def test_grpo_advantages_are_trl_grpo_trainer(std_norm, scale_rewards):
    rewards_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.3, 2.0, -1.0, 0.5], [1.0, 1.0, 1.0, 0.0]])
    ours = losses.grpo_advantages(rewards_PG, std_norm=std_norm)
    theirs = _trl_advantages(rewards_PG.reshape(-1), 4, scale_rewards).view(4, 4)
    torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-6)
    assert ours.abs().max() > 0.5


def _trl_stub(loss_type: str, beta: float, clip_eps: float, logits_BTV: torch.Tensor):
    """A GRPOTrainer without __init__: only what `_compute_loss` reads (token-level importance sampling, no
    vLLM, no entropy bonus/mask, one process, no gradient accumulation). Its log-probs come from
    `logits_BTV` through TRL's own `selective_log_softmax` / `entropy_from_logits`."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    t = GRPOTrainer.__new__(GRPOTrainer)
    t.loss_type, t.beta, t.epsilon_low, t.epsilon_high = loss_type, beta, clip_eps, clip_eps
    t.importance_sampling_level, t.top_entropy_quantile, t.off_policy_mask_threshold = "token", 1.0, None
    t.use_vllm, t.vllm_importance_sampling_correction = False, False
    t.aux_loss_enabled, t._entropy_bonus_enabled = False, False
    t.model = torch.nn.Module()  # .training = True: "train" mode
    t.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    t.current_gradient_accumulation_steps = 1
    t.accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def per_token(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        ids_BT = input_ids[:, -logits_to_keep:]
        return selective_log_softmax(logits_BTV, ids_BT), entropy_from_logits(logits_BTV.detach()), None

    t._get_per_token_logps_and_entropies = per_token
    return t


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("agg,loss_type", [("sequence_mean", "grpo"), ("token_mean", "bnpo"), ("token_mean", "dapo")])
def test_grpo_loss_and_gradient_are_trl_compute_loss(agg, loss_type, beta):
    gen = torch.Generator().manual_seed(1)
    B, T, V, eps = 4, 6, 9, 0.2
    lens = [6, 3, 1, 4]  # completion lengths (every row has >= 1 state, as every rollout does)
    mask_BT = torch.tensor([[1] * n + [0] * (T - n) for n in lens])
    logits_BTV = (1.5 * torch.randn(B, T, V, generator=gen)).requires_grad_(True)
    ids_BT = torch.randint(0, V, (B, T), generator=gen)
    logp_BT = torch.log_softmax(logits_BTV.detach(), -1).gather(-1, ids_BT[..., None]).squeeze(-1)
    old_BT = logp_BT + 0.4 * torch.randn(B, T, generator=gen)  # pi_old of an earlier epoch: ratios leave [0.8, 1.2]
    ref_BT = logp_BT + 0.5 * torch.randn(B, T, generator=gen)
    adv_B = torch.tensor([1.3, -0.7, 0.4, -1.1])
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": ids_BT, "completion_mask": mask_BT, "advantages": adv_B,
        "old_per_token_logps": old_BT, "ref_per_token_logps": ref_BT, "num_items_in_batch": mask_BT.sum(),
    }
    theirs = _trl_stub(loss_type, beta, eps, logits_BTV)._compute_loss(None, inputs)
    (g_trl,) = torch.autograd.grad(theirs, logits_BTV)

    # ours: the masked positions as N states, row-major
    b_N, t_N = mask_BT.nonzero(as_tuple=True)
    logp_N = losses.token_logp(logits_BTV[b_N, t_N], ids_BT[b_N, t_N])
    values_N, clipped_N = losses.policy_gradient(logp_N, old_BT[b_N, t_N], adv_B[b_N], eps)
    values_N = values_N + beta * losses.k3(logp_N, ref_BT[b_N, t_N])
    units = len(b_N) if agg == "token_mean" else B
    ours = losses.aggregate(values_N, b_N, B, agg) / units
    (g_ours,) = torch.autograd.grad(ours, logits_BTV)
    assert 0 < clipped_N.mean() < 1  # some states clipped, some not
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_trl, atol=1e-7, rtol=1e-5)
    assert g_ours.abs().sum() > 0.1
