"""Benchmark: this machine's speed, as the milliseconds of one bare training step of the tiny base
architecture (forward, backward and AdamW on 32 x 128 random tokens, 2 torch threads). The pipeline's own
code is not involved, so it tells a slow machine from slow code: run it next to `perf/dag_time.py`.

    python perf/base_step.py --rounds 3
"""

from __future__ import annotations

import time

import torch
import typer

from poststate.modeling import load_tokenizer, tiny_qwen3
from poststate.params import load_section
from poststate.runs import run_dir


def main(rounds: int = 3, steps: int = 8, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    p = load_section("base")
    model = tiny_qwen3(p.model, load_tokenizer(run_dir("base", None)), 0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, p.model.vocab_size, (p.pretrain.batch_size, p.pretrain.seq_len), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), ids.view(-1)).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    for r in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        print(f"round {r}: {(time.perf_counter() - t) / steps * 1000:.0f} ms/step ({threads} threads)", flush=True)


if __name__ == "__main__":
    typer.run(main)
