"""Losses against hand-computed values (state convention: state_BT[b, t] marks s = ids[b, :t+1])."""

import math

import pytest
import torch

from poststate import losses


def test_grpo_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mean_only = losses.grpo_advantages(r, std_norm=False)
    assert torch.allclose(mean_only, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75], [0.0] * 4]))
    normed = losses.grpo_advantages(r, std_norm=True, eps=0.0 + 1e-12)
    # group 0: sample std of [1,0,0,1] = sqrt(1/3); group 1: std of [1,1,1,0] = 0.5
    s0 = math.sqrt(1 / 3)
    assert normed[0].tolist() == pytest.approx([0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], rel=1e-5)
    assert normed[1].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], rel=1e-5)
    assert normed[2].tolist() == [0.0] * 4  # zero spread: no signal, no NaN


def test_grpo_advantages_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        losses.grpo_advantages(torch.ones(4), std_norm=True)


def test_forward_and_reverse_kl_on_two_known_distributions():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.9, 0.1])
    lp, lq = p.log()[None, None], q.log()[None, None]
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert losses.kl(lp, lq).item() == pytest.approx(fwd, rel=1e-6)
    assert losses.kl(lq, lp).item() == pytest.approx(rev, rel=1e-6)
    # distill_kl: teacher p, student logits = log q; forward = KL(p||q), reverse = KL(q||p)
    state = torch.ones(1, 1)
    assert losses.distill_kl(lq, lp, state, "forward").item() == pytest.approx(fwd, rel=1e-6)
    assert losses.distill_kl(lq, lp, state, "reverse").item() == pytest.approx(rev, rel=1e-6)
    with pytest.raises(ValueError, match="sideways"):
        losses.distill_kl(lq, lp, state, "sideways")


def test_sampled_token_estimator_mean_matches_analytic_kl():
    s = torch.tensor([0.7, 0.2, 0.1])
    t = torch.tensor([0.3, 0.3, 0.4])
    analytic = float((s * (s / t).log()).sum())
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(s, 200_000, replacement=True, generator=g)
    est = (s.log()[y] - t.log()[y]).mean().item()
    assert est == pytest.approx(analytic, abs=0.01)
    # and the function computes exactly that estimate on a batch of sampled tokens
    T = 50
    ids = torch.multinomial(s, T, replacement=True, generator=g)[None]
    logits = s.log().expand(1, T, 3).clone()
    t_logp = torch.zeros(1, T)
    t_logp[0, :-1] = t.log()[ids[0, 1:]]
    state = torch.ones(1, T)
    state[0, -1] = 0
    _, value = losses.sampled_reverse_kl(logits, ids, t_logp, state)
    expect = (s.log()[ids[0, 1:]] - t.log()[ids[0, 1:]]).mean().item()
    assert value.item() == pytest.approx(expect, rel=1e-5)


def test_cross_entropy_counts_only_marked_states():
    V = 4
    logits = torch.zeros(1, 3, V)
    logits[0, 0, 2] = 5.0  # state ids[:1] predicts token 2 confidently
    ids = torch.tensor([[1, 2, 3]])
    only_first = torch.tensor([[1, 0, 0]])
    expect = -torch.log_softmax(logits[0, 0], -1)[2].item()
    assert losses.cross_entropy(logits, ids, only_first).item() == pytest.approx(expect, rel=1e-6)
    both = torch.tensor([[1, 1, 0]])
    expect2 = (expect + math.log(V)) / 2
    assert losses.cross_entropy(logits, ids, both).item() == pytest.approx(expect2, rel=1e-6)


def test_policy_gradient_first_pass_is_reinforce_and_k3_is_zero_at_ref():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4))
    state = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logp = losses.next_token_logp(logits, ids).detach()
    adv = torch.tensor([1.0, -0.5])
    loss, stats = losses.policy_gradient(logits, ids, state, adv, logp, 0.2, logp, 0.1)
    # value: ratio = 1 so loss = -mean(adv) over states, k3 = 0 at the reference
    assert loss.item() == pytest.approx(-(adv[:, None] * state).sum().item() / state.sum().item(), rel=1e-6)
    assert stats["kl_ref"].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["clip_frac"].item() == 0.0
    loss.backward()
    assert logits.grad.abs().sum() > 0
    # a fresh batch carries no old log-probs: the objective takes pi_old from this very forward, detached
    # (the same value and gradient as passing them), and stores it on the batch for its reuse
    from poststate.methods import LossConfig, Supervised, objective

    stored_grad = logits.grad.clone()
    logits.grad = None
    sup = Supervised(ids, torch.ones_like(ids), state, "reward", adv_B=adv, ref_logp_BT=logp)
    again, _ = objective(logits, sup, LossConfig(clip_eps=0.2, kl_coef=0.1))
    again.backward()
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(logits.grad, stored_grad, atol=1e-7)
    assert torch.equal(sup.old_logp_BT, logp)
    moved = (logits.detach() + torch.randn(logits.shape)).requires_grad_(True)  # the policy after an inner step
    later, stats = objective(moved, sup, LossConfig(clip_eps=0.2, kl_coef=0.1))
    assert torch.equal(sup.old_logp_BT, logp) and stats["clip_frac"] > 0  # the ratio is against the stored pi_old


def test_k3_hand_value():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    r = math.log(0.25 / 0.5)
    assert losses.k3(logp, ref).item() == pytest.approx(math.exp(r) - r - 1, rel=1e-6)
