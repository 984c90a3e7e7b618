"""Losses over *states*, state-major: every tensor here has one entry per training state.

A state s = ids[:t+1] of a training sequence is scored at one position; the model's logits there are
`logits_NV[n]` and, for token signals, the supervised next token is `target_N[n]` (`objective.py` gathers
the N states of a micro-batch out of the padded sequences, so no (B, T, V) tensor is ever built).
Every function returns per-state values (N,); `aggregate` turns them into the sum the loop normalises:
token mean (every state weighs the same) or sequence mean (every sequence weighs the same).
"""

from __future__ import annotations

from typing import Literal

import torch

Tensor = torch.Tensor
Agg = Literal["token_mean", "sequence_mean"]


def token_logp(logits_NV: Tensor, target_N: Tensor) -> Tensor:
    """log pi(target | s) per state, with a float32 log-softmax over the vocabulary."""
    logp_NV = torch.log_softmax(logits_NV.float(), dim=-1)
    return logp_NV.gather(-1, target_N[:, None]).squeeze(-1)


def kl(logp_p_NV: Tensor, logp_q_NV: Tensor) -> Tensor:
    """Full-vocabulary KL(p || q) = sum_v p(v) (log p(v) - log q(v)) per state, shape (N,)."""
    return (logp_p_NV.exp() * (logp_p_NV - logp_q_NV)).sum(-1)


def distill_kl(logits_NV: Tensor, teacher_logp_NV: Tensor, direction: str) -> Tensor:
    """KL(teacher || student) (forward) or KL(student || teacher) (reverse) per state: TRL's
    `generalized_jsd_loss` with beta = 0 (forward) or 1 (reverse), before its batch reduction."""
    student_NV = torch.log_softmax(logits_NV.float(), dim=-1)
    teacher_NV = teacher_logp_NV.float()
    if direction == "forward":
        return kl(teacher_NV, student_NV)
    if direction == "reverse":
        return kl(student_NV, teacher_NV)
    raise ValueError(f"KL direction {direction!r}: expected 'forward' or 'reverse'")


def sampled_reverse_kl(logp_N: Tensor, teacher_logp_N: Tensor) -> tuple[Tensor, Tensor]:
    """Sampled-token estimator of KL(student || teacher) on tokens the student sampled.

    Per token the estimate is k1 = log s(y) - log t(y), whose mean under y ~ s is the analytic KL. The
    surrogate sg(k1) * log s(y) has the KL's gradient (score function, since E_s[grad log s] = 0): on-policy
    distillation with per-token reward -k1 (GKD lambda=1, Thinking Machines' form).
    Returns per-state (surrogate, estimate).
    """
    k1_N = (logp_N - teacher_logp_N).detach()
    return k1_N * logp_N, k1_N


def grpo_advantages(rewards_PG: Tensor, std_norm: bool, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages for P prompts x G samples.
    # GRPO-style: adv = (r - mean_G r) / (std_G r + eps); mean baseline only when std_norm is False
    # (Dr. GRPO). std is the unbiased sample std over the group, eps = 1e-4, both as in TRL's GRPOTrainer.
    """
    if rewards_PG.ndim != 2 or rewards_PG.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, group>=2), got shape {tuple(rewards_PG.shape)}")
    adv_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if std_norm:
        adv_PG = adv_PG / (rewards_PG.std(dim=1, keepdim=True) + eps)
    return adv_PG


def k3(logp_N: Tensor, ref_logp_N: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per sampled token: exp(r) - r - 1, r = log ref - log pi."""
    r_N = ref_logp_N - logp_N
    return r_N.exp() - r_N - 1.0


def policy_gradient(logp_N: Tensor, old_logp_N: Tensor, adv_N: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """PPO-clipped policy-gradient loss per state, the sequence's advantage broadcast to its every token.
    # GRPO-style: loss_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A), rho_t = pi / pi_old; rho = 1 on
    # the first pass over a batch (plain REINFORCE with a group baseline). Per token this is TRL's
    # GRPOTrainer `per_token_loss` (beta = 0); its loss_type picks the aggregation (see `aggregate`).
    Returns per-state (loss, clipped indicator).
    """
    ratio_N = (logp_N - old_logp_N).exp()
    adv_N = adv_N.to(logp_N.dtype)
    surr_N = torch.minimum(ratio_N * adv_N, ratio_N.clamp(1 - clip_eps, 1 + clip_eps) * adv_N)
    clipped_N = ((ratio_N - 1).abs() > clip_eps).float()
    return -surr_N, clipped_N


def entropy(logits_NV: Tensor) -> Tensor:
    """Entropy of the model's next-token distribution per state (nats)."""
    logp_NV = torch.log_softmax(logits_NV.float(), dim=-1)
    return -(logp_NV.exp() * logp_NV).sum(-1)


def aggregate(values_N: Tensor, row_N: Tensor, n_rows: int, agg: Agg) -> Tensor:
    """The sum over loss units of a micro-batch, for the loop to divide by the step batch's unit count.

    token_mean: every state is a unit: sum_n v_n (TRL GRPO loss_type "dapo"/"bnpo": per-token mean over
    the batch). sequence_mean: every sequence with >= 1 state is a unit: sum_b (mean of v over b's states)
    (TRL loss_type "grpo": each sequence's token mean, then the mean over sequences).
    """
    if agg == "token_mean":
        return values_N.sum()
    if agg == "sequence_mean":
        sums_B = torch.zeros(n_rows, dtype=values_N.dtype, device=values_N.device).index_add(0, row_N, values_N)
        counts_B = torch.zeros(n_rows, dtype=values_N.dtype, device=values_N.device).index_add(0, row_N, torch.ones_like(values_N))
        return (sums_B / counts_B.clamp_min(1.0)).sum()
    raise ValueError(f"loss aggregation {agg!r}: expected 'token_mean' or 'sequence_mean'")


__all__ = [
    "aggregate",
    "distill_kl",
    "entropy",
    "grpo_advantages",
    "k3",
    "kl",
    "policy_gradient",
    "sampled_reverse_kl",
    "token_logp",
]
