"""On-policy RL, GRPO-style: states from the policy's own samples (G per prompt), signal = the
exact-answer reward computed by the GSM8K eval's own scorer, group-relative advantages.
Validity gate: the reward on held-out prompts, sampled at the rollout temperature and greedy, before and
after (`poststate.gates`). Every seed starts from the same policy (the base: LoRA's B starts at 0), so the
"before" is measured once, on the gate's one stream, and each seed's "after" draws on that same stream
(common random numbers). On a CPU the seeds train side by side, one process each, beside the "before"
(`poststate.pool`).

    python stages/rl.py                 # writes models/rl/s<seed>/
"""

from statistics import fmean
from types import SimpleNamespace

import typer

from poststate import gates
from poststate.loop import make_accelerator, shard_of
from poststate.methods import rl_method
from poststate.modeling import load_model, load_tokenizer, resolve_dtype, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.pool import map_tasks, workers_for
from poststate.runs import DATA, learner_engine, read_jsonl, run_dir, save_run, seed_everything, train_logged, write_compute, write_gate

RUN = SimpleNamespace()  # what every seed shares, set before the seed processes fork


STREAM = ("gate", "rl")  # the gate's one random stream: the base before, every seed's policy after


def measure(lm) -> dict[str, list[float]]:
    p = RUN.p
    return gates.rl_reward(lm, RUN.tok, RUN.heldout, p.rollout, p.gate_samples, p.gen_batch_size, STREAM)


def before_gate() -> dict[str, list[float]]:
    """The initial policy's held-out reward: the base's (a fresh LoRA adapter adds exactly 0)."""
    p, acc = RUN.p, RUN.acc
    return measure(load_model(run_dir("base", None), dtype=resolve_dtype(p.dtype, acc.device), device=acc.device).eval())


def train_seed(seed: int) -> tuple[dict[str, list[float]], str]:
    """Train one seed, save it; its held-out reward after training, and its timing line."""
    p, acc, tok = RUN.p, RUN.acc, RUN.tok
    seed_everything(seed)
    base = load_model(run_dir("base", None), dtype=resolve_dtype(p.dtype, acc.device), device=acc.device)
    policy = with_adapter(base, p.adapter)
    method = rl_method("rl", RUN.rows, tok, p, seed, shard_of(acc), engine=learner_engine(p, tok))
    result, timing = train_logged("rl", seed, policy, method, p, p.steps, pad_id=tok.pad_token_id, accelerator=acc,
                                  progress=RUN.workers == 1)
    after = measure(policy)
    if acc.is_main_process:
        write_compute("rl", seed, result, policy, kind="rl")
        save_run(policy, tok, run_dir("rl", seed), kind="rl", params=p.model_dump(mode="json"), seed=seed,
                 parents={"base": run_dir("base", None)}, data={"prompts": DATA / "gsm8k/prompts.jsonl"}, result=result,
                 extra={"states": {"source": "learner", "count": result.states}})
    acc.wait_for_everyone()
    return after, str(timing)


def task(which: int | None):
    """One unit of the stage's work: the "before" gate (None) or a seed."""
    return before_gate() if which is None else train_seed(which)


def main() -> None:
    p = load_section("rl")
    run_seeds = seeds(read_params())
    acc = make_accelerator()
    RUN.__dict__.update(p=p, acc=acc, tok=load_tokenizer(run_dir("base", None)), rows=read_jsonl(DATA / "gsm8k/prompts.jsonl"),
                        heldout=read_jsonl(DATA / "gsm8k/prompts_heldout.jsonl"),
                        workers=workers_for(1 + len(run_seeds), acc.device, acc.num_processes))
    echo = typer.echo if acc.is_main_process else (lambda *_: None)
    echo(f"rl: {p.steps} steps x {p.prompts_per_step} prompts x {p.group_size} samples; {len(run_seeds)} seeds and the 'before' gate, {RUN.workers} at a time")
    before, *per_seed = map_tasks(task, [None, *run_seeds], RUN.workers)
    items = [f"prompts_heldout/{i}" for i in range(len(RUN.heldout))]
    for seed, (after, timing) in zip(run_seeds, per_seed):
        if acc.is_main_process:
            write_gate("rl", seed, gates.record({k: {"better": "higher", "items": items, "before": before[k], "after": after[k]}
                                                 for k in before}, primary="reward_sampled"))
        echo(f"  seed {seed}: {timing}; held-out reward sampled {fmean(before['reward_sampled']):.3f} -> "
             f"{fmean(after['reward_sampled']):.3f}, greedy {fmean(before['reward_greedy']):.3f} -> {fmean(after['reward_greedy']):.3f}")


if __name__ == "__main__":
    typer.run(main)
