"""The one training loop: draw states s ~ q_k, get supervision z = S(s), step on loss(pi(.|s), z).

SFT, OPD, the teacher-state control and RL all run through `train`; they differ only in the `Method`.

One optimizer step = one *step batch* of states (SFT: batch_size x grad_accum rows; OPD: prompts_per_step
prompts x cuts; RL: prompts_per_step x group_size rollouts), all processes together. The step batch is cut
into micro-batches of at most `batch_size` sequences (the memory bound), gradients accumulate over them,
and the loss is the sum over the step's loss units divided by their number (token or sequence mean) -
counted over every process - so the step's loss and gradient do not depend on the micro-batching or on the
number of processes (up to float summation order). PPO epochs (`method.reuse` = inner_steps > 1) reuse one
step batch for that many consecutive optimizer steps; pi_old is stored by its first pass.

Data parallelism: the stages run unchanged under `torchrun` / `accelerate launch`. Each process draws its
shard of the step batch (`methods.Shard`), DDP averages gradients (so each process scales its loss by the
world size), the LR schedule advances once per optimizer step, step metrics are summed over processes, and
only the main process logs (the stages save on the main process only). The optimizer is built after
`accelerator.prepare` (FSDP flattens parameters there); a learner's rollouts sample from gathered full
weights (`gathered`). Precision: weights in `optim.dtype` ("auto": bf16 on CUDA, fp32 on a CPU), bf16
autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from poststate.methods import Method, Shard, Supervised
from poststate.objective import StateObjective
from poststate.trace import trace

if TYPE_CHECKING:  # params (pydantic) only for annotations: the core imports with torch, transformers, peft, accelerate
    from poststate.params import Optim


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; raised before the optimizer step, so no output is written."""


@dataclass
class TrainResult:
    steps: int
    states: int = 0  # training states (supervised positions) seen, all processes
    tokens: int = 0  # tokens forwarded in training, all processes (padding excluded)
    generated_tokens: int = 0  # tokens sampled by rollouts and teacher continuations (this process)
    seconds: float = 0.0
    gen_seconds: float = 0.0
    sample: list[dict[str, Any]] = field(default_factory=list)  # a sample of the states trained on
    last: dict[str, float] = field(default_factory=dict)


def make_accelerator() -> Accelerator:
    """One process, or one of several under torchrun / accelerate launch (DDP, FSDP via accelerate's
    config). Mixed precision bf16 on CUDA. Gradient accumulation is the loop's own (micro-batches)."""
    return Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no", step_scheduler_with_optimizer=False)


def lr_schedule(steps: int, warmup: int, min_lr_ratio: float) -> Callable[[int], float]:
    """The LR factor of optimizer step t = 0..steps-1: linear warmup counted from the first step,
    (t + 1) / (warmup + 1), then transformers' cosine decay to min_lr_ratio (as
    `get_cosine_with_min_lr_schedule_with_warmup` after its warmup). transformers' own warmup gives step 0 a
    factor of 0: the first step batch (a whole RL or OPD draw) would train nothing."""

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        progress = (t - warmup) / max(1, steps - warmup)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def shard_of(acc: Accelerator) -> Shard:
    return Shard(acc.process_index, acc.num_processes)


def _gather_context(acc: Accelerator, prepared) -> Callable[[], contextlib.AbstractContextManager]:
    """Full (unsharded) weights for sampling under FSDP; nothing to do otherwise."""
    if getattr(acc.state, "fsdp_plugin", None) is None:
        return contextlib.nullcontext
    from torch.distributed.fsdp import FullyShardedDataParallel

    return lambda: FullyShardedDataParallel.summon_full_params(prepared, writeback=False, rank0_only=False)


def train(
    lm,
    method: Method,
    optim: Optim,
    steps: int,
    *,
    pad_id: int,
    accelerator: Accelerator | None = None,
    log: Callable[[int, dict[str, float], float], None] | None = None,  # (step, metrics, step seconds)
    keep_states: int = 256,
    progress: bool = True,
) -> TrainResult:
    """Run `steps` optimizer steps of `method` on `lm` (in place; a peft model trains its adapter)."""
    acc = accelerator or make_accelerator()
    objective = StateObjective(lm, method.loss)
    if optim.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prepared = acc.prepare(objective)
    params = [p for p in prepared.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{method.name}: the model has no trainable parameters")
    opt = acc.prepare(torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(steps, math.ceil(optim.warmup_ratio * steps), optim.min_lr_ratio))
    prepared.train()
    policy = acc.unwrap_model(prepared).lm
    gathered = _gather_context(acc, prepared)
    teacher = getattr(method.signal, "teacher", None)
    device = acc.device
    # accelerate's autocast() on this CPU made fp32 steps ~20x slower: only for bf16 on a GPU
    cast = acc.autocast if acc.mixed_precision != "no" else contextlib.nullcontext
    result = TrainResult(steps=steps)
    per_step_keep = max(1, math.ceil(keep_states / steps))
    t_start = time.perf_counter()
    batch: Supervised | None = None
    micros: list = []
    bar = tqdm(
        range(steps),
        desc=method.name,
        disable=not progress or not acc.is_main_process,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
    )
    for step in bar:
        t0 = time.perf_counter()
        if batch is None or step % method.reuse == 0:
            batch = method.signal.supervise(method.source.draw(policy, gathered), policy)
            if len(result.sample) < keep_states:
                result.sample.extend(batch.sample(per_step_keep))
            micros = [m.to(device) for m in batch.micro_batches(optim.batch_size, optim.max_len, pad_id)]
            trace("draw", run=method.name, step=step, world=acc.num_processes,
                  seqs=[hashlib.sha1(str(s).encode()).hexdigest()[:12] for s in batch.seqs])
        local = torch.tensor([batch.units(method.loss.agg, optim.max_len),
                              sum(len(m.pos_N) for m in micros), sum(int(m.attn_BT.sum()) for m in micros)],
                             dtype=torch.float64, device=device)
        units, n_states, n_tokens = (acc.reduce(local, "sum") if acc.num_processes > 1 else local).tolist()
        if units == 0:
            raise ValueError(f"{method.name}: step {step} has no training states (every sequence truncated away?)")
        scale = acc.num_processes / units  # DDP averages gradients over processes
        sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), dtype=torch.float64, device=device)}
        for i, micro in enumerate(micros):
            # gradients are all-reduced once per step: on the last micro-batch only
            with contextlib.nullcontext() if i == len(micros) - 1 else acc.no_sync(prepared), cast():
                loss_sum, stats = prepared(micro, teacher)
                if not torch.isfinite(loss_sum):
                    raise NonFiniteLoss(f"{method.name}: non-finite loss {loss_sum.item()} at step {step} (micro-batch {i})")
                acc.backward(loss_sum * scale)
            sums["loss"] += loss_sum.detach().double()
            for k, v in stats.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.detach().double()
        grad_norm = acc.clip_grad_norm_(params, optim.max_grad_norm)
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            raise NonFiniteLoss(f"{method.name}: non-finite gradient norm at step {step}")
        opt.step()
        lr = sched.get_last_lr()[0]
        trace("step", run=method.name, step=step, lr=lr)
        sched.step()
        opt.zero_grad(set_to_none=True)
        names = sorted(sums)
        total = torch.stack([sums[k] for k in names])
        total = (acc.reduce(total, "sum") if acc.num_processes > 1 else total).tolist()
        reduced = dict(zip(names, total))
        dt = time.perf_counter() - t0
        result.tokens += int(n_tokens)
        result.states += int(n_states)
        metrics = {
            "loss": reduced.pop("loss") / units,
            **{k: v / n_states for k, v in reduced.items()},  # per-state statistics: means over states
            **batch.stats,
            "states": n_states,
            "tokens": n_tokens,
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        result.last = metrics
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        if log is not None and acc.is_main_process:
            log(step, metrics, dt)
    result.seconds = time.perf_counter() - t_start
    result.gen_seconds = getattr(method.source, "gen_seconds", 0.0) + getattr(method.signal, "gen_seconds", 0.0)
    result.generated_tokens = getattr(method.source, "generated_tokens", 0) + getattr(method.signal, "generated_tokens", 0)
    acc.wait_for_everyone()
    if optim.gradient_checkpointing:
        lm.gradient_checkpointing_disable()
    return result
