"""Benchmark: seconds per training step on real SFT batches of the tiny base (run `dvc repro base` first),
for each way of computing the same step. Variants alternate within each round in one process (this
machine is noisy: compare within a run).

- full fine-tuning vs LoRA through peft's adapter forward vs LoRA with `adapter.forward: merged`;
- each with the batch run whole (`length_groups: 1`) or as 2 or 4 length-sorted groups.

    python perf/train_step.py --rounds 3
"""

from __future__ import annotations

import time

import torch
import typer

from poststate.losses import cross_entropy
from poststate.methods import sft_method
from poststate.modeling import load_model, load_tokenizer, with_adapter
from poststate.params import load_section
from poststate.runs import DATA, read_jsonl, run_dir


def main(rounds: int = 3, batches: int = 8, groups: list[int] = typer.Option([1, 2, 4])) -> None:
    p = load_section("sft", "mild")
    tok = load_tokenizer(run_dir("base", None))
    method = sft_method("bench", read_jsonl(DATA / "gsm8k/sft.jsonl"), tok, p, seed=0)
    models = {
        "full": with_adapter(load_model(run_dir("base", None)), p.adapter.model_copy(update={"kind": "full"})),
        "lora adapter": with_adapter(load_model(run_dir("base", None)), p.adapter.model_copy(update={"forward": "adapter"})),
        "lora merged": with_adapter(load_model(run_dir("base", None)), p.adapter.model_copy(update={"forward": "merged"})),
    }
    sups = [method.signal.supervise(method.source.draw(None), None) for _ in range(batches)]
    real = sum(int(s.attn_BT.sum()) for s in sups)
    print(f"{batches} SFT batches of {p.batch_size}: {real} tokens, {1 - real / sum(s.ids_BT.numel() for s in sups):.1%} padding")
    for k in groups:
        padded = sum(g.ids_BT.numel() for s in sups for g, _ in s.length_groups(k))
        print(f"  length_groups={k}: {padded} token slots forwarded")
    for r in range(rounds):
        for name, model in models.items():
            for k in groups:
                t = time.perf_counter()
                for s in sups:
                    for g, w in s.length_groups(k):
                        (cross_entropy(model(input_ids=g.ids_BT, attention_mask=g.attn_BT).logits, g.ids_BT, g.state_BT) * w).backward()
                    model.zero_grad(set_to_none=True)
                print(f"round {r}  {name:13s} length_groups={k}: {(time.perf_counter() - t) / batches * 1000:6.0f} ms/step", flush=True)


if __name__ == "__main__":
    typer.run(main)
