"""Supervised fine-tuning: states from the dataset (gold prefixes), signal = gold next tokens.

Variants share the `sft` section of params.yaml and override keys per variant (`sft.mild`, `sft.stress`).
The stress run is the paper's degraded teacher (5 epochs, lr 5e-4, LoRA r64/a128 in the paper profile).
Validity gate: the held-out SFT rows' gold-token NLL, before and after (`poststate.gates`).

    python stages/sft.py mild           # writes models/sft_mild/s<seed>/ for every seed in params
"""

import math

import typer

from poststate import gates
from poststate.loop import make_accelerator, shard_of
from poststate.methods import sft_method
from poststate.modeling import load_model, load_tokenizer, resolve_dtype, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.runs import DATA, read_jsonl, run_dir, save_run, seed_everything, train_logged, write_compute, write_gate


def main(variant: str = typer.Argument(..., help="sft variant: mild | stress")) -> None:
    p = load_section("sft", variant)
    run, run_seeds = f"sft_{variant}", seeds(read_params())
    rows, heldout = read_jsonl(DATA / "gsm8k/sft.jsonl"), read_jsonl(DATA / "gsm8k/sft_heldout.jsonl")
    steps = math.ceil(len(rows) * p.epochs / (p.batch_size * p.grad_accum))
    acc = make_accelerator()
    echo = typer.echo if acc.is_main_process else (lambda *_: None)
    echo(f"sft@{variant}: {len(rows)} rows x {p.epochs} epochs = {steps} steps; adapter {p.adapter.kind}")
    tok = load_tokenizer(run_dir("base", None))
    for seed in run_seeds:
        seed_everything(seed)
        base = load_model(run_dir("base", None), dtype=resolve_dtype(p.dtype, acc.device), device=acc.device)
        model = with_adapter(base, p.adapter)
        before = gates.sft_nll(model, tok, heldout, p.max_len)
        method = sft_method(run, rows, tok, p, seed, shard_of(acc))
        result, timing = train_logged(run, seed, model, method, p, steps, pad_id=tok.pad_token_id, accelerator=acc)
        after = gates.sft_nll(model, tok, heldout, p.max_len)
        if acc.is_main_process:
            write_gate(run, seed, gates.record({"heldout_nll": {
                "better": "lower", "items": [f"sft_heldout/{i}" for i in range(len(heldout))], "before": before, "after": after}},
                primary="heldout_nll"))
            write_compute(run, seed, result, model, kind="sft")
            save_run(model, tok, run_dir(run, seed), kind=run, params=p.model_dump(mode="json"), seed=seed,
                     parents={"base": run_dir("base", None)}, data={"sft": DATA / "gsm8k/sft.jsonl"}, result=result,
                     extra={"states": {"source": "dataset", "count": result.states}})
        acc.wait_for_everyone()
        echo(f"  seed {seed}: loss {result.last['loss']:.4f} in {timing}; held-out NLL "
             f"{sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f}")


if __name__ == "__main__":
    typer.run(main)
