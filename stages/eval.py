"""Evaluate one run (every seed) on GSM8K, TruthfulQA-MC and MMLU as lm-evaluation-harness defines them,
and measure its state drift from the base model.

Per seed: harness scores with stderr and n, per-item records (for flips), rollouts of the model on a fixed
prompt set (the paper's drift states), and, against the base: lexical and hidden-state MMD of prefix
states, forward KL(base || run) on base samples, and the base model's NLL of the states the run trained on.

    python stages/eval.py sft_mild      # writes evals/sft_mild/ and metrics/eval/sft_mild.json
"""

import json
from pathlib import Path

import numpy as np
import typer

from poststate import drift
from poststate.artifacts import atomic_dir, atomic_write_json
from poststate.evaluation import evaluate
from poststate.methods import encode_prompt
from poststate.modeling import load_model, load_tokenizer
from poststate.params import load_section, read_params, seeds
from poststate.prompts import GSM8K_STOPS
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.runs import DATA, read_jsonl, run_dir, write_jsonl

EVALS = Path("evals")


def rollouts(model, tok, rows, p, batch_size: int, seed: int) -> list[dict]:
    """The drift prompt set's rollouts (sampled, seeded): prompt and completion ids and text."""
    prompts = [encode_prompt(tok, r) for r in rows]
    sp = SamplingParams(max_new_tokens=p.rollout.max_new_tokens, temperature=p.rollout.temperature, top_p=p.rollout.top_p, stop=GSM8K_STOPS)
    out = HFRolloutEngine(model, tok, batch_size).generate(prompts, sp, seed=seed)
    return [
        {"prompt_ids": list(x), "completion_ids": list(y), "prompt": tok.decode(x), "completion": t}
        for x, y, t in zip(out.prompt_ids, out.completion_ids, out.texts)
    ]


def train_states(run_path: Path) -> list[dict]:
    """The sample of states a run trained on (a teacher has none of its own: use its SFT parent's)."""
    f = run_path / "train_states.jsonl"
    if f.exists():
        return read_jsonl(f)
    lineage = json.loads((run_path / "lineage.json").read_text())
    for parent in lineage.get("parents", {}).values():
        if (Path(parent["path"]) / "train_states.jsonl").exists():
            return read_jsonl(Path(parent["path"]) / "train_states.jsonl")
    return []


def diagnostics(base, model, tok, base_roll, roll, states, p, seed: int) -> dict[str, float]:
    """Drift of a run's rollout states from the base's, and the locality of its training states."""
    d = p.drift
    s_base = drift.prefix_states([r["prompt"] for r in base_roll], [r["completion"] for r in base_roll], d.cuts, seed)
    s_run = drift.prefix_states([r["prompt"] for r in roll], [r["completion"] for r in roll], d.cuts, seed)
    # Lexical features of the generated part of each state: both models answer the same prompts, so the
    # prompt's words are shared by construction and would only dilute the kernel (same cut points).
    g_base = drift.prefix_states([""] * len(base_roll), [r["completion"] for r in base_roll], d.cuts, seed)
    g_run = drift.prefix_states([""] * len(roll), [r["completion"] for r in roll], d.cuts, seed)
    X = drift.lexical_features(g_base, ngram=(1, d.ngram_max), dim=d.hash_dim)
    Y = drift.lexical_features(g_run, ngram=(1, d.ngram_max), dim=d.hash_dim)
    out = {"mmd_lexical": drift.mmd2_rbf(X, Y, drift.median_bandwidth(X, Y), unbiased=d.unbiased)}
    H_base = drift.hidden_features(base, tok, s_base, p.batch_size)
    H_run = drift.hidden_features(base, tok, s_run, p.batch_size)
    out["mmd_hidden"] = drift.mmd2_rbf(H_base, H_run, drift.median_bandwidth(H_base, H_run), unbiased=d.unbiased)
    ids = [r["prompt_ids"] + r["completion_ids"] for r in base_roll if r["completion_ids"]]
    starts = [len(r["prompt_ids"]) for r in base_roll if r["completion_ids"]]
    if model is not None:
        out["kl_base_tuned"] = drift.forward_kl(base, model, ids, starts, p.batch_size)
    scored = [s for s in states if s["prefix_ids"]][: d.locality_states]
    if scored:
        nll = drift.sequence_token_nll(base, [s["prompt_ids"] + s["prefix_ids"] for s in scored], [len(s["prompt_ids"]) for s in scored], p.batch_size)
        out["train_state_nll"] = float(np.mean(nll))
    return out


def main(run: str = typer.Argument(..., help="run name, e.g. base, sft_mild, opd_stress")) -> None:
    p = load_section("eval")
    tok = load_tokenizer(run_dir("base", None))
    base = load_model(run_dir("base", None)).eval()
    drift_rows = read_jsonl(DATA / "gsm8k/test.jsonl")[: p.drift.prompts]
    run_seeds = [None] if run == "base" else seeds(read_params())
    per_seed = []
    with atomic_dir(EVALS / run) as tmp:
        for seed in run_seeds:
            model = base if run == "base" else load_model(run_dir(run, seed), merge=True).eval()
            scores, items = evaluate(model, tok, DATA, p.harness, seed=seed or 0)
            roll = rollouts(model, tok, drift_rows, p.drift, p.harness.gen_batch_size, seed=seed or 0)
            if run == "base":
                # The drift noise floor: a second, independent sample of the base itself.
                floor = rollouts(base, tok, drift_rows, p.drift, p.harness.gen_batch_size, seed=1)
                scores.update({f"{k}_floor": v for k, v in diagnostics(base, None, tok, roll, floor, [], p, 0).items()})
            else:
                base_roll = read_jsonl(EVALS / "base" / "rollouts.jsonl")
                scores.update(diagnostics(base, model, tok, base_roll, roll, train_states(run_dir(run, seed)), p, seed))
            out = tmp if seed is None else tmp / f"s{seed}"
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "scores.json", scores)
            write_jsonl(out / "items.jsonl", [{"benchmark": b, **r} for b, recs in items.items() for r in recs])
            write_jsonl(out / "rollouts.jsonl", roll)
            per_seed.append(scores)
            typer.echo(f"{run} s{seed}: " + ", ".join(f"{k}={scores[k]:.3f}" for k in ("gsm8k_strict", "truthfulqa_mc1", "mmlu_acc")))
    summary = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
    summary["seeds"] = len(per_seed)
    atomic_write_json(Path("metrics/eval") / f"{run}.json", summary)


if __name__ == "__main__":
    typer.run(main)
