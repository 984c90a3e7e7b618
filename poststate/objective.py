"""The loss of one micro-batch of states, as a module the loop (and DDP/FSDP) wraps.

`StateObjective(lm)` holds the causal LM being trained (a plain HF model or a peft LoRA model). Its
forward takes a `Micro` (padded sequences and the flat positions of their states) and returns the SUM of
the loss over the micro-batch's loss units plus sums of per-state statistics; the loop divides by the step
batch's unit count (all ranks together), so the step's loss and gradient do not depend on how the step
batch is cut into micro-batches or spread over processes.

Memory: the decoder runs once over the padded micro-batch; the LM head is applied only at the state
positions, in chunks of at most `LOGIT_BUDGET` logits (each chunk recomputed in the backward pass when
there is more than one), so no (B, T, V) tensor and at most one (chunk, V) float32 block exist at a time.
A frozen teacher's (or the LoRA reference's) hidden states are computed without gradients at the same
positions and go through their head inside the same chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from poststate import losses

Tensor = torch.Tensor
LOGIT_BUDGET = 1 << 26  # logits (float32: 256 MB) per chunk of states


@dataclass(frozen=True)
class LossConfig:
    kind: str = "tokens"  # tokens | distribution | sampled_kl | reward
    agg: losses.Agg = "token_mean"
    kl_direction: str = "reverse"
    clip_eps: float = 0.2
    kl_coef: float = 0.0


@dataclass
class Micro:
    """A padded micro-batch: rows of token ids and the flat positions (row * T + t) of their states.
    The state at t predicts ids[row, t + 1] = target_N[n]."""

    ids_BT: Tensor
    attn_BT: Tensor
    pos_N: Tensor  # flat state positions, row-major
    target_N: Tensor
    row_N: Tensor  # the row of each state
    adv_N: Tensor | None = None  # reward: the row's advantage at each of its states
    old_logp_N: Tensor | None = None  # pi_old at each state, stored by the first pass (PPO epochs)
    rows: list[int] | None = None  # which rows of the step batch these are, in order

    @property
    def n_rows(self) -> int:
        return self.ids_BT.shape[0]

    def to(self, device) -> Micro:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Micro(**moved)


def causal_parts(lm) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, head) of a causal LM: the transformer body (returning the final normed hidden states) and
    the output projection. A peft model is unwrapped to the model its adapters are injected into."""
    causal = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return causal.get_decoder(), causal.get_output_embeddings()


def same_device(model, other, what: str) -> None:
    """Fail clearly (not deep inside a matmul) when a model that scores the same inputs sits elsewhere."""
    a, b = next(model.parameters()).device, next(other.parameters()).device
    if a != b:
        raise ValueError(f"{what} is on {b} but the model it is compared with is on {a}: load it on the same device")


def state_hidden(lm, micro: Micro) -> Tensor:
    """Final hidden states at the micro-batch's state positions: (N, H)."""
    decoder, _ = causal_parts(lm)
    hidden_BTH = decoder(input_ids=micro.ids_BT, attention_mask=micro.attn_BT).last_hidden_state
    return hidden_BTH.flatten(0, 1).index_select(0, micro.pos_N)


def chunk_size(vocab: int) -> int:
    return max(1, LOGIT_BUDGET // vocab)


def over_chunks(fn: Callable[..., tuple[Tensor, ...]], tensors: list[Tensor], vocab: int) -> tuple[Tensor, ...]:
    """Apply `fn` (per-state tensors in, per-state tensors out) to consecutive chunks of states and
    concatenate; with more than one chunk, each is recomputed in the backward pass (activation
    checkpointing), so only one chunk's logits are alive at a time."""
    n = tensors[0].shape[0]
    size = chunk_size(vocab)
    if n <= size:
        return fn(*tensors)
    outs = []
    for start in range(0, n, size):
        part = [t[start : start + size] for t in tensors]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if torch.is_grad_enabled() else fn(*part))
    return tuple(torch.cat(cols) for cols in zip(*outs))


class StateObjective(torch.nn.Module):
    """forward(micro, teacher=None) -> (loss sum over units, {stat: sum over states}). `teacher` is a
    frozen model for the distribution signals (never a submodule: DDP/FSDP must not wrap it)."""

    def __init__(self, lm, cfg: LossConfig):
        super().__init__()
        self.lm = lm
        self.cfg = cfg

    def forward(self, micro: Micro, teacher=None) -> tuple[Tensor, dict[str, Tensor]]:
        values_N, stats = self.state_values(micro, teacher)
        return losses.aggregate(values_N, micro.row_N, micro.n_rows, self.cfg.agg), stats

    def state_values(self, micro: Micro, teacher=None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss value at every state (N,) and sums of per-state statistics."""
        cfg = self.cfg
        _, head = causal_parts(self.lm)
        h_NH = state_hidden(self.lm, micro)
        vocab = head.out_features
        if cfg.kind == "tokens":
            (logp_N,) = over_chunks(lambda h, t: (losses.token_logp(head(h), t),), [h_NH, micro.target_N], vocab)
            values_N, stats = -logp_N, {}
        elif cfg.kind in ("distribution", "sampled_kl"):
            if teacher is None:
                raise ValueError(f"{cfg.kind} supervision needs the teacher model")
            same_device(self.lm, teacher, "the teacher")
            with torch.no_grad():
                t_NH = state_hidden(teacher, micro)
            _, t_head = causal_parts(teacher)
            if cfg.kind == "distribution":
                def kl_chunk(h, th):
                    t_logp = torch.log_softmax(t_head(th).float(), dim=-1).detach()
                    return (losses.distill_kl(head(h), t_logp, cfg.kl_direction),)

                (values_N,) = over_chunks(kl_chunk, [h_NH, t_NH], vocab)
                stats = {}
            else:
                def sampled_chunk(h, th, t):
                    t_logp = losses.token_logp(t_head(th), t).detach()
                    return losses.sampled_reverse_kl(losses.token_logp(head(h), t), t_logp)

                values_N, k1_N = over_chunks(sampled_chunk, [h_NH, t_NH, micro.target_N], vocab)
                stats = {"kl_estimate": k1_N.detach().sum()}
        elif cfg.kind == "reward":
            def pg_chunk(h, t):
                logits = head(h)
                return losses.token_logp(logits, t), losses.entropy(logits.detach())

            logp_N, ent_N = over_chunks(pg_chunk, [h_NH, micro.target_N], vocab)
            if micro.old_logp_N is None:  # the first pass over this batch: pi_old is this very forward
                micro.old_logp_N = logp_N.detach()
            values_N, clipped_N = losses.policy_gradient(logp_N, micro.old_logp_N.to(logp_N.device), micro.adv_N, cfg.clip_eps)
            stats = {"clip_frac": clipped_N.sum(), "entropy": ent_N.sum()}
            if cfg.kl_coef > 0:
                if not hasattr(self.lm, "disable_adapter"):
                    raise ValueError("rl.kl_coef > 0 needs a LoRA policy (the reference is the adapter-free base)")
                with torch.no_grad(), self.lm.disable_adapter():
                    r_NH = state_hidden(self.lm, micro)
                    (ref_N,) = over_chunks(lambda h, t: (losses.token_logp(head(h), t),), [r_NH, micro.target_N], vocab)
                kl_N = losses.k3(logp_N, ref_N)
                values_N = values_N + cfg.kl_coef * kl_N
                stats["kl_ref"] = kl_N.detach().sum()
        else:
            raise ValueError(f"unknown supervision kind {cfg.kind!r}")
        return values_N, stats


@torch.no_grad()
def row_values(lm, micro: Micro, cfg: LossConfig, teacher=None) -> Tensor:
    """Per-row mean of the per-state loss values (no gradient, eval mode): the held-out measurement the
    validity gates take with the method's own loss. Rows without states are NaN."""
    was = lm.training
    lm.eval()
    try:
        values_N, _ = StateObjective(lm, cfg).state_values(micro, teacher)
    finally:
        lm.train(was)
    values_N = values_N.double()
    sums_B = torch.zeros(micro.n_rows, dtype=values_N.dtype, device=values_N.device).index_add(0, micro.row_N, values_N)
    counts_B = torch.zeros_like(sums_B).index_add(0, micro.row_N, torch.ones_like(values_N))
    return sums_B / counts_B


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on CUDA when the weights are bf16; nothing on a CPU."""
    if torch.device(device).type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
