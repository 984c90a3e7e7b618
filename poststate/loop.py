"""The one training loop: draw states s ~ q_k, get supervision z = S(s), step on loss(pi(.|s), z).

SFT, OPD, SeqKD and RL all run through `train`; they differ only in the `Method` handed in.
Device placement, precision (fp32 on CPU, bf16 autocast on a GPU) and gradient accumulation go through
`accelerate`, so the same stage runs under `accelerate launch` without restructuring.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from poststate.methods import Method, States, objective
from poststate.params import Optim


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; raised before the optimizer step, so no output is written."""


@dataclass
class TrainResult:
    steps: int
    states: int = 0  # training states (supervised next-token positions) seen
    tokens: int = 0  # tokens forwarded
    seconds: float = 0.0
    sample: list[dict[str, Any]] = field(default_factory=list)  # a sample of the states trained on
    last: dict[str, float] = field(default_factory=dict)


def make_accelerator(grad_accum: int) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=grad_accum,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
    )


def _sample_states(states: States, k: int) -> list[dict[str, Any]]:
    """Keep up to k states of a batch (evenly spaced) for the locality diagnostic."""
    n = len(states.prompt_ids)
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})
    return [
        {"origin": states.origin, "prompt_ids": states.prompt_ids[i], "prefix_ids": states.prefix_ids[i]}
        for i in picks
    ]


def train(
    model,
    method: Method,
    optim: Optim,
    steps: int,
    *,
    accelerator: Accelerator | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    keep_states: int = 256,
    progress: bool = True,
) -> TrainResult:
    """Run `steps` optimizer steps of `method` on `model` (in place). Each optimizer step accumulates
    `optim.grad_accum` micro-batches, each a fresh draw of states (or the same draw `method.reuse` times)."""
    acc = accelerator or make_accelerator(optim.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{method.name}: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt,
        num_warmup_steps=math.ceil(optim.warmup_ratio * steps),
        num_training_steps=steps,
        min_lr_rate=optim.min_lr_ratio,
    )
    model, opt, sched = acc.prepare(model, opt, sched)
    model.train()
    policy = acc.unwrap_model(model)
    result = TrainResult(steps=steps)
    per_step_keep = max(1, math.ceil(keep_states / steps))
    t_start = time.perf_counter()
    states: States | None = None
    bar = tqdm(
        range(steps),
        desc=method.name,
        disable=not progress or not acc.is_main_process,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
    )
    for step in bar:
        t0 = time.perf_counter()
        totals: dict[str, float] = {"loss": 0.0, "tokens": 0.0, "states": 0.0}
        for micro in range(optim.grad_accum):
            if states is None or (step * optim.grad_accum + micro) % method.reuse == 0:
                states = method.source.draw(policy)
                if len(result.sample) < keep_states:
                    result.sample.extend(_sample_states(states, per_step_keep))
            sup = method.signal.supervise(states, policy)
            with acc.accumulate(model):
                loss, stats = 0.0, {}
                for group, weight in sup.length_groups(optim.length_groups):
                    # autocast only for bf16 on a GPU: accelerate's autocast() on this CPU made fp32 steps ~20x slower
                    with acc.autocast() if acc.mixed_precision != "no" else contextlib.nullcontext():
                        logits = model(
                            input_ids=group.ids_BT.to(acc.device), attention_mask=group.attn_BT.to(acc.device)
                        ).logits
                    group_loss, group_stats = objective(logits, group, method.loss)
                    if not torch.isfinite(group_loss):
                        raise NonFiniteLoss(
                            f"{method.name}: non-finite loss {group_loss.item()} at step {step} (micro-batch {micro})"
                        )
                    acc.backward(group_loss * weight)
                    loss += group_loss.detach() * weight
                    for k, v in group_stats.items():
                        stats[k] = stats.get(k, 0.0) + v * weight
                grad_norm = None
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(params, optim.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            totals["loss"] += loss.item() / optim.grad_accum
            totals["tokens"] += float(sup.attn_BT.sum())
            totals["states"] += float(sup.state_BT.sum())
            for k, v in {**sup.stats, **stats}.items():
                totals[k] = totals.get(k, 0.0) + v / optim.grad_accum
        dt = time.perf_counter() - t0
        result.tokens += int(totals["tokens"])
        result.states += int(totals["states"])
        metrics = {
            **totals,
            "lr": sched.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": totals["tokens"] / dt,
            "step_seconds": dt,
        }
        if not math.isfinite(metrics["grad_norm"]):
            raise NonFiniteLoss(f"{method.name}: non-finite gradient norm at step {step}")
        result.last = metrics
        # refresh=False: the postfix shows at the bar's own interval (a log file got every step otherwise)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        if log is not None:
            log(step, metrics)
    result.seconds = time.perf_counter() - t_start
    acc.wait_for_everyone()
    return result
