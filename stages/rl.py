"""On-policy RL, GRPO-style: states from the policy's own samples (G per prompt), signal = the
exact-answer reward computed by the GSM8K eval's own scorer, group-relative advantages.
Validity gate: the reward on held-out prompts, sampled at the rollout temperature and greedy, before and
after (`poststate.gates`). On a CPU the seeds train side by side, one process each (`poststate.pool`).

    python stages/rl.py                 # writes models/rl/s<seed>/
"""

from types import SimpleNamespace

import typer

from poststate import gates
from poststate.loop import make_accelerator, shard_of
from poststate.methods import rl_method
from poststate.modeling import load_model, load_tokenizer, resolve_dtype, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.pool import map_seeds, workers_for
from poststate.runs import DATA, learner_engine, read_jsonl, run_dir, save_run, seed_everything, train_logged, write_compute, write_gate

RUN = SimpleNamespace()  # what every seed shares, set before the seed processes fork


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def train_seed(seed: int) -> str:
    p, acc, tok, heldout = RUN.p, RUN.acc, RUN.tok, RUN.heldout
    seed_everything(seed)
    base = load_model(run_dir("base", None), dtype=resolve_dtype(p.dtype, acc.device), device=acc.device)
    policy = with_adapter(base, p.adapter)
    # before and after draw with common random numbers (one stream): a paired, unbiased per-prompt difference
    measure = lambda: gates.rl_reward(policy, tok, heldout, p.rollout, p.gate_samples, p.gen_batch_size, ("gate", "rl", seed))  # noqa: E731
    before = measure()
    method = rl_method("rl", RUN.rows, tok, p, seed, shard_of(acc), engine=learner_engine(p, tok))
    result, timing = train_logged("rl", seed, policy, method, p, p.steps, pad_id=tok.pad_token_id, accelerator=acc,
                                  progress=RUN.workers == 1)
    after = measure()
    if acc.is_main_process:
        items = [f"prompts_heldout/{i}" for i in range(len(heldout))]
        write_gate("rl", seed, gates.record({k: {"better": "higher", "items": items, "before": before[k], "after": after[k]}
                                             for k in before}, primary="reward_sampled"))
        write_compute("rl", seed, result, policy, kind="rl")
        save_run(policy, tok, run_dir("rl", seed), kind="rl", params=p.model_dump(mode="json"), seed=seed,
                 parents={"base": run_dir("base", None)}, data={"prompts": DATA / "gsm8k/prompts.jsonl"}, result=result,
                 extra={"states": {"source": "learner", "count": result.states}})
    acc.wait_for_everyone()
    return (f"  seed {seed}: {timing}; held-out reward sampled {mean(before['reward_sampled']):.3f} -> "
            f"{mean(after['reward_sampled']):.3f}, greedy {mean(before['reward_greedy']):.3f} -> {mean(after['reward_greedy']):.3f}")


def main() -> None:
    p = load_section("rl")
    run_seeds = seeds(read_params())
    acc = make_accelerator()
    RUN.__dict__.update(p=p, acc=acc, tok=load_tokenizer(run_dir("base", None)), rows=read_jsonl(DATA / "gsm8k/prompts.jsonl"),
                        heldout=read_jsonl(DATA / "gsm8k/prompts_heldout.jsonl"),
                        workers=workers_for(len(run_seeds), acc.device, acc.num_processes))
    echo = typer.echo if acc.is_main_process else (lambda *_: None)
    echo(f"rl: {p.steps} steps x {p.prompts_per_step} prompts x {p.group_size} samples; {len(run_seeds)} seeds, {RUN.workers} at a time")
    for line in map_seeds(train_seed, run_seeds, RUN.workers):
        echo(line)


if __name__ == "__main__":
    typer.run(main)
