"""Benchmark: rollout time of the on-policy state sources' sampler, on the tiny base (run `dvc repro base`
first). Prints seconds per round for each variant, alternating in one process (this machine is noisy:
compare within a run).

- LoRA policy through its adapter vs its `SamplingCopy` (the adapter merged, synced each draw);
- `torch.no_grad` vs `torch.inference_mode` around generation (the engine uses inference_mode).

    python perf/rollout.py --rounds 3
"""

from __future__ import annotations

import time

import torch
import typer

from poststate.methods import encode_prompt
from poststate.modeling import SamplingCopy, load_model, load_tokenizer, with_adapter
from poststate.params import load_section
from poststate.prompts import GSM8K_STOPS
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.runs import DATA, read_jsonl, run_dir


def main(rounds: int = 3, prompts: int = 16, max_new_tokens: int = 96) -> None:
    tok = load_tokenizer(run_dir("base", None))
    policy = with_adapter(load_model(run_dir("base", None)), load_section("opd").adapter)
    with torch.no_grad():  # a trained adapter is not a no-op: give lora_B small weights
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    ids = [encode_prompt(tok, r) for r in read_jsonl(DATA / "gsm8k/prompts.jsonl")[:prompts]]
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop=GSM8K_STOPS)
    sampler = SamplingCopy(policy)
    t = time.perf_counter()
    for _ in range(10):
        sampler.sync()
    print(f"SamplingCopy.sync: {(time.perf_counter() - t) / 10 * 1000:.1f} ms")
    raw = HFRolloutEngine._generate_batch.__wrapped__  # without its inference_mode decorator
    variants = {
        "adapter (inference_mode)": lambda: HFRolloutEngine(policy, tok, prompts).generate(ids, sp, seed=0),
        "merged copy (inference_mode)": lambda: HFRolloutEngine(sampler.sync(), tok, prompts).generate(ids, sp, seed=0),
        "merged copy (no_grad)": lambda: _under(torch.no_grad, raw, HFRolloutEngine(sampler.model, tok, prompts), ids, sp),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:30s} " + " ".join(f"{x:.2f}" for x in ts) + f"  s ({prompts} rollouts x <= {max_new_tokens} tokens)")


def _under(ctx, raw, engine, ids, sp):
    engine.model.eval()
    with ctx():
        return raw(engine, ids, sp, 0)


if __name__ == "__main__":
    typer.run(main)
