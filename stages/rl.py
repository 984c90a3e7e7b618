"""On-policy RL, GRPO-style: states from the policy's own samples (G per prompt), signal = the
exact-answer reward computed by the GSM8K eval's own scorer, group-relative advantages.

    python stages/rl.py                 # writes models/rl/s<seed>/
"""

import typer

from poststate.methods import rl_method
from poststate.modeling import load_model, load_tokenizer, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.runs import DATA, read_jsonl, run_dir, save_run, seed_everything, train_logged


def main() -> None:
    p = load_section("rl")
    rows = read_jsonl(DATA / "gsm8k/prompts.jsonl")
    for seed in seeds(read_params()):
        seed_everything(seed)
        tok = load_tokenizer(run_dir("base", None))
        policy = with_adapter(load_model(run_dir("base", None)), p.adapter)
        method = rl_method("rl", rows, tok, p, seed)
        result, timing = train_logged("rl", seed, policy, method, p, p.steps)
        save_run(policy, tok, run_dir("rl", seed), kind="rl", params=p.model_dump(mode="json"), seed=seed,
                 parents={"base": run_dir("base", None)}, data={"prompts": DATA / "gsm8k/prompts.jsonl"}, result=result,
                 extra={"states": {"source": "learner", "count": result.states}})
        typer.echo(f"  seed {seed}: {timing}, reward {result.last.get('reward_mean', 0):.3f}")


if __name__ == "__main__":
    typer.run(main)
