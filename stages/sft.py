"""Supervised fine-tuning: states from the dataset (gold prefixes), signal = gold next tokens.

Variants share the `sft` section of params.yaml and override keys per variant (`sft.mild`, `sft.stress`).
The stress run is the paper's degraded teacher (5 epochs, lr 5e-4, LoRA r64/a128 in the paper profile).

    python stages/sft.py mild           # writes models/sft_mild/s<seed>/ for every seed in params
"""

import math

import typer

from poststate.methods import sft_method
from poststate.modeling import load_model, load_tokenizer, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.runs import DATA, read_jsonl, run_dir, save_run, seed_everything, train_logged


def main(variant: str = typer.Argument(..., help="sft variant: mild | stress")) -> None:
    p = load_section("sft", variant)
    run_seeds = seeds(read_params())
    rows = read_jsonl(DATA / "gsm8k/sft.jsonl")
    steps = math.ceil(len(rows) * p.epochs / (p.batch_size * p.grad_accum))
    typer.echo(f"sft@{variant}: {len(rows)} rows x {p.epochs} epochs = {steps} steps; adapter {p.adapter.kind}")
    for seed in run_seeds:
        seed_everything(seed)
        tok = load_tokenizer(run_dir("base", None))
        model = with_adapter(load_model(run_dir("base", None)), p.adapter)
        method = sft_method(f"sft_{variant}", rows, tok, p, seed)
        result, timing = train_logged(f"sft_{variant}", seed, model, method, p, steps)
        save_run(model, tok, run_dir(f"sft_{variant}", seed), kind=f"sft_{variant}", params=p.model_dump(mode="json"),
                 seed=seed, parents={"base": run_dir("base", None)}, data={"sft": DATA / "gsm8k/sft.jsonl"}, result=result,
                 extra={"states": {"source": "dataset", "count": result.states}})
        typer.echo(f"  seed {seed}: loss {result.last['loss']:.4f} in {timing}")


if __name__ == "__main__":
    typer.run(main)
