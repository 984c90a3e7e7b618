"""Benchmark: milliseconds per SFT training step (forward + backward of one step batch, no optimizer) on
real SFT rows of the tiny base (run `dvc repro base` first), for each way of computing the same step.
Variants alternate within each round in one process (this machine is noisy: compare within a run).

- full fine-tuning vs LoRA through peft's adapter forward vs LoRA with `adapter.forward: merged`;
- the step batch (`batch_size x grad_accum` rows) cut into micro-batches of 32, 16 or 8 rows: the same
  loss and gradient (the loop divides by the step's unit count), less padding per micro-batch.

    python perf/train_step.py --rounds 3
"""

from __future__ import annotations

import time

import torch
import typer

from poststate.methods import sft_method
from poststate.modeling import load_model, load_tokenizer, with_adapter
from poststate.objective import LossConfig, StateObjective
from poststate.params import load_section
from poststate.runs import DATA, read_jsonl, run_dir


def main(rounds: int = 3, steps: int = 8, micro: list[int] = typer.Option([32, 16, 8]), threads: int = 2) -> None:
    torch.set_num_threads(threads)
    p = load_section("sft", "mild")
    tok = load_tokenizer(run_dir("base", None))
    method = sft_method("bench", read_jsonl(DATA / "gsm8k/sft.jsonl"), tok, p, seed=0)
    load = lambda **update: with_adapter(load_model(run_dir("base", None), device="cpu"), p.adapter.model_copy(update=update))  # noqa: E731
    models = {"full": load(kind="full"), "lora adapter": load(forward="adapter"), "lora merged": load(forward="merged")}
    batches = [method.signal.supervise(method.source.draw(None), None) for _ in range(steps)]
    rows = len(batches[0].seqs)
    for size in micro:
        slots = sum(m.ids_BT.numel() for b in batches for m in b.micro_batches(size, p.max_len, tok.pad_token_id))
        real = sum(int(m.attn_BT.sum()) for b in batches for m in b.micro_batches(size, p.max_len, tok.pad_token_id))
        print(f"step batch {rows} rows, micro-batches of {size}: {slots} token slots forwarded, {1 - real / slots:.1%} padding")
    for r in range(rounds):
        for name, model in models.items():
            objective = StateObjective(model, LossConfig(kind="tokens"))
            for size in micro:
                t = time.perf_counter()
                for b in batches:
                    units = b.units("token_mean", p.max_len)
                    for m in b.micro_batches(size, p.max_len, tok.pad_token_id):
                        (objective(m)[0] / units).backward()
                    model.zero_grad(set_to_none=True)
                print(f"round {r}  {name:13s} micro-batch {size:3d}: {(time.perf_counter() - t) / steps * 1000:6.0f} ms/step", flush=True)


if __name__ == "__main__":
    typer.run(main)
