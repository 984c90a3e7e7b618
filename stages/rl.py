"""On-policy RL, GRPO-style: states from the policy's own samples (G per prompt), signal = the
exact-answer reward computed by the GSM8K eval's own scorer, group-relative advantages.

    python stages/rl.py                 # writes models/rl/s<seed>/
"""

import typer

from poststate.loop import train
from poststate.methods import rl_method
from poststate.modeling import load_model, load_tokenizer, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.runs import DATA, live, log_step, read_jsonl, run_dir, save_run, seed_everything


def main() -> None:
    p = load_section("rl")
    rows = read_jsonl(DATA / "gsm8k/prompts.jsonl")
    for seed in seeds(read_params()):
        seed_everything(seed)
        tok = load_tokenizer(run_dir("base", None))
        policy = with_adapter(load_model(run_dir("base", None)), p.adapter)
        method = rl_method("rl", rows, tok, p, seed)
        with live("rl", seed) as logger:
            result = train(policy, method, p, p.steps, log=lambda s, m: log_step(logger, s, m))
        gen = method.source.gen_seconds
        save_run(policy, tok, run_dir("rl", seed), kind="rl", params=p.model_dump(mode="json"), seed=seed,
                 parents={"base": run_dir("base", None)}, data={"prompts": DATA / "gsm8k/prompts.jsonl"}, result=result,
                 extra={"states": {"source": "learner", "count": result.states}, "generation_seconds": round(gen, 1)})
        typer.echo(f"  seed {seed}: {result.seconds:.0f}s ({gen / result.seconds:.0%} generating), reward {result.last.get('reward_mean', 0):.3f}")


if __name__ == "__main__":
    typer.run(main)
