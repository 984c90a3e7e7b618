"""Losses over *states*. Convention for every function here: `state_BT[b, t] = 1` marks the state
s = ids[b, :t+1] as a training state; its prediction is `logits[b, t]`, its next token is `ids[b, t+1]`.
Averages are over all marked states in the batch (token-level mean).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def next_token_logp(logits_BTV: Tensor, ids_BT: Tensor) -> Tensor:
    """log pi(ids[t+1] | ids[:t+1]) at every position t; the last position (no next token) is 0."""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    out_BT = torch.zeros(ids_BT.shape, dtype=logp_BTV.dtype, device=ids_BT.device)
    out_BT[:, :-1] = logp_BTV[:, :-1].gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
    return out_BT


def masked_mean(x_BT: Tensor, state_BT: Tensor) -> Tensor:
    w_BT = state_BT.to(x_BT.dtype)
    return (x_BT * w_BT).sum() / w_BT.sum().clamp_min(1.0)


def cross_entropy(logits_BTV: Tensor, ids_BT: Tensor, state_BT: Tensor) -> Tensor:
    """Token CE on the next token of every marked state: -mean log pi(ids[t+1] | s_t)."""
    return -masked_mean(next_token_logp(logits_BTV, ids_BT), state_BT)


def kl(logp_p_BTV: Tensor, logp_q_BTV: Tensor) -> Tensor:
    """Full-vocabulary KL(p || q) = sum_v p(v) (log p(v) - log q(v)) at each position, shape (B, T)."""
    return (logp_p_BTV.exp() * (logp_p_BTV - logp_q_BTV)).sum(-1)


def distill_kl(logits_BTV: Tensor, teacher_logp_BTV: Tensor, state_BT: Tensor, direction: str) -> Tensor:
    """Mean over marked states of KL(teacher || student) (forward) or KL(student || teacher) (reverse)."""
    student_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    teacher_BTV = teacher_logp_BTV.float()
    if direction == "forward":
        per_BT = kl(teacher_BTV, student_BTV)
    elif direction == "reverse":
        per_BT = kl(student_BTV, teacher_BTV)
    else:
        raise ValueError(f"KL direction {direction!r}: expected 'forward' or 'reverse'")
    return masked_mean(per_BT, state_BT)


def sampled_reverse_kl(logits_BTV: Tensor, ids_BT: Tensor, teacher_logp_BT: Tensor, state_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Sampled-token estimator of KL(student || teacher) on tokens the student sampled.

    Per token the estimate is k1 = log s(y) - log t(y), whose mean under y ~ s is the analytic KL. The
    surrogate loss mean(sg(k1) * log s(y)) has the KL's gradient (score function, since E_s[grad log s] = 0);
    this is on-policy distillation with per-token reward -k1 (GKD lambda=1, Thinking Machines' form).
    Returns (surrogate loss, KL estimate).
    """
    logp_BT = next_token_logp(logits_BTV, ids_BT)
    k1_BT = (logp_BT - teacher_logp_BT).detach()
    return masked_mean(k1_BT * logp_BT, state_BT), masked_mean(k1_BT, state_BT)


def grpo_advantages(rewards_PG: Tensor, std_norm: bool, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages for P prompts x G samples.
    # GRPO-style: adv = (r - mean_G r) / (std_G r + eps); mean baseline only when std_norm is False.
    std is the unbiased sample std over the group (as in DeepSeekMath's GRPO)."""
    if rewards_PG.ndim != 2 or rewards_PG.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, group>=2), got shape {tuple(rewards_PG.shape)}")
    adv_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if std_norm:
        adv_PG = adv_PG / (rewards_PG.std(dim=1, keepdim=True) + eps)
    return adv_PG


def k3(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per sampled token: exp(r) - r - 1, r = log ref - log pi."""
    r_BT = ref_logp_BT - logp_BT
    return r_BT.exp() - r_BT - 1.0


def policy_gradient(
    logits_BTV: Tensor,
    ids_BT: Tensor,
    state_BT: Tensor,
    adv_B: Tensor,
    old_logp_BT: Tensor,
    clip_eps: float,
    ref_logp_BT: Tensor | None,
    kl_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clipped policy gradient with sequence-level advantages broadcast to every completion token.
    # GRPO-style: loss = -mean_t min(rho_t A, clip(rho_t, 1-eps, 1+eps) A) + kl_coef * mean_t k3_t;
    # rho_t = pi/pi_old = 1 on the first pass over a batch (plain REINFORCE with a group baseline).
    """
    logp_BT = next_token_logp(logits_BTV, ids_BT)
    ratio_BT = (logp_BT - old_logp_BT).exp()
    adv_BT = adv_B[:, None].to(logp_BT.dtype)
    surr_BT = torch.minimum(ratio_BT * adv_BT, ratio_BT.clamp(1 - clip_eps, 1 + clip_eps) * adv_BT)
    loss = -masked_mean(surr_BT, state_BT)
    stats = {"clip_frac": masked_mean(((ratio_BT - 1).abs() > clip_eps).float(), state_BT).detach()}
    if ref_logp_BT is not None:
        kl_BT = k3(logp_BT, ref_logp_BT)
        stats["kl_ref"] = masked_mean(kl_BT, state_BT).detach()
        if kl_coef > 0:
            loss = loss + kl_coef * masked_mean(kl_BT, state_BT)
    return loss, stats


def entropy(logits_BTV: Tensor, state_BT: Tensor) -> Tensor:
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return masked_mean(-(logp_BTV.exp() * logp_BTV).sum(-1), state_BT)


__all__ = [
    "cross_entropy",
    "distill_kl",
    "entropy",
    "grpo_advantages",
    "k3",
    "kl",
    "masked_mean",
    "next_token_logp",
    "policy_gradient",
    "sampled_reverse_kl",
]
