"""Supervised fine-tuning: states from the dataset (gold prefixes), signal = gold next tokens.

Variants share the `sft` section of params.yaml and override keys per variant (`sft.mild`, `sft.stress`).
The stress run is the paper's degraded teacher (5 epochs, lr 5e-4, LoRA r64/a128 in the paper profile).
Validity gate: the held-out SFT rows' gold-token NLL, before and after (`poststate.gates`). On a CPU the
seeds train side by side, one process each (`poststate.pool`).

    python stages/sft.py mild           # writes models/sft_mild/s<seed>/ for every seed in params
"""

import math
from types import SimpleNamespace

import typer

from poststate import gates
from poststate.loop import make_accelerator, shard_of
from poststate.methods import sft_method
from poststate.modeling import load_model, load_tokenizer, resolve_dtype, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.pool import map_tasks, workers_for
from poststate.runs import DATA, read_jsonl, run_dir, save_run, seed_everything, train_logged, write_compute, write_gate

RUN = SimpleNamespace()  # what every seed shares, set before the seed processes fork


def train_seed(seed: int) -> str:
    p, acc, tok = RUN.p, RUN.acc, RUN.tok
    seed_everything(seed)
    base = load_model(run_dir("base", None), dtype=resolve_dtype(p.dtype, acc.device), device=acc.device)
    model = with_adapter(base, p.adapter)
    before = gates.sft_nll(model, tok, RUN.heldout, p.max_len)
    method = sft_method(RUN.name, RUN.rows, tok, p, seed, shard_of(acc))
    result, timing = train_logged(RUN.name, seed, model, method, p, RUN.steps, pad_id=tok.pad_token_id,
                                  accelerator=acc, progress=RUN.workers == 1)
    after = gates.sft_nll(model, tok, RUN.heldout, p.max_len)
    if acc.is_main_process:
        items = [f"sft_heldout/{i}" for i in range(len(RUN.heldout))]
        write_gate(RUN.name, seed, gates.record(
            {"heldout_nll": {"better": "lower", "items": items, "before": before, "after": after}}, primary="heldout_nll"))
        write_compute(RUN.name, seed, result, model, kind="sft")
        save_run(model, tok, run_dir(RUN.name, seed), kind=RUN.name, params=p.model_dump(mode="json"), seed=seed,
                 parents={"base": run_dir("base", None)}, data={"sft": DATA / "gsm8k/sft.jsonl"}, result=result,
                 extra={"states": {"source": "dataset", "count": result.states}})
    acc.wait_for_everyone()
    return (f"  seed {seed}: loss {result.last['loss']:.4f} in {timing}; held-out NLL "
            f"{sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f}")


def main(variant: str = typer.Argument(..., help="sft variant: mild | stress")) -> None:
    p = load_section("sft", variant)
    run_seeds = seeds(read_params())
    rows, heldout = read_jsonl(DATA / "gsm8k/sft.jsonl"), read_jsonl(DATA / "gsm8k/sft_heldout.jsonl")
    steps = math.ceil(len(rows) * p.epochs / (p.batch_size * p.grad_accum))
    acc = make_accelerator()
    RUN.__dict__.update(p=p, name=f"sft_{variant}", rows=rows, heldout=heldout, steps=steps, acc=acc,
                        tok=load_tokenizer(run_dir("base", None)),
                        workers=workers_for(len(run_seeds), acc.device, acc.num_processes))
    echo = typer.echo if acc.is_main_process else (lambda *_: None)
    echo(f"sft@{variant}: {len(rows)} rows x {p.epochs} epochs = {steps} steps; adapter {p.adapter.kind}; "
         f"{len(run_seeds)} seeds, {RUN.workers} at a time")
    for line in map_tasks(train_seed, run_seeds, RUN.workers):
        echo(line)


if __name__ == "__main__":
    typer.run(main)
