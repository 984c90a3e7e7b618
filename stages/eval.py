"""Evaluate one run (every seed) on GSM8K, TruthfulQA-MC and MMLU as lm-evaluation-harness defines them,
and measure its state drift from the base model.

Per seed: harness scores with stderr and n, per-item records (for flips), rollouts of the model on a fixed
prompt set (the paper's drift states), and, against the base: lexical and hidden-state MMD of prefix
states, forward KL(base || run) on base samples, and the base model's NLL of the states the run trained on.
The base's eval is also the drift reference: its rollouts, and the base's hidden features of their states
(`reference_hidden.npy`), which every other run's eval reads instead of computing them again.

An eval is a function of the model's files (weights, config, tokenizer) and of the eval params, data and
seed. `--same-as <run>` names a run whose model is expected to be the same one, as the tiny profile's
teacher is its stress SFT run: where every seed's model files match that run's byte for byte, its eval is
copied with a `reused.json` record, otherwise the run is evaluated. The heavy imports (torch,
transformers) are local to the functions that evaluate, so a reused eval loads neither.

    python stages/eval.py sft_mild                      # writes evals/sft_mild/ and metrics/eval/sft_mild.json
    python stages/eval.py teacher --same-as sft_stress  # the teacher's eval, reused where its model is that run's
"""

import filecmp
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import typer

from poststate.artifacts import atomic_dir, atomic_write_json
from poststate.params import load_section, read_params, seeds
from poststate.pool import map_tasks, workers_for
from poststate.runs import DATA, model_files, read_jsonl, run_dir, write_jsonl

EVALS = Path("evals")
REF_HIDDEN = "reference_hidden.npy"  # evals/base/: the base's hidden features of its reference states


def rollouts(model, tok, rows, p, batch_size: int, seed: int) -> list[dict]:
    """The drift prompt set's rollouts (sampled from the stream `seed`): prompt and completion ids and text."""
    from poststate.methods import encode_prompt
    from poststate.prompts import GSM8K_STOPS
    from poststate.rollout import HFRolloutEngine, SamplingParams

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


def same_model(a: Path, b: Path) -> bool:
    """The same model files, byte for byte (lineage aside), and the same training states to score."""
    if not (a.is_dir() and b.is_dir()):
        return False
    names = [f.name for f in model_files(a)]
    if names != [f.name for f in model_files(b)]:
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names) and train_states(a) == train_states(b)


def reuse_eval(run: str, same_as: str, run_seeds: list[int]) -> list[dict]:
    """Copy `same_as`'s eval of every seed into evals/<run>/ (with a reused.json record); its scores."""
    missing = [f for f in (EVALS / same_as / f"s{s}" / "scores.json" for s in run_seeds) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: not found - evaluate {same_as} first (dvc repro eval@{same_as})")
    per_seed = []
    with atomic_dir(EVALS / run) as tmp:
        for seed in run_seeds:
            src, out = EVALS / same_as / f"s{seed}", tmp / f"s{seed}"
            shutil.copytree(src, out)
            atomic_write_json(out / "reused.json", {
                "eval": src.as_posix(),
                "reason": f"{run_dir(run, seed).as_posix()} has the model files of {run_dir(same_as, seed).as_posix()}, byte for byte",
            })
            per_seed.append(json.loads((out / "scores.json").read_text()))
            typer.echo(f"{run} s{seed}: the same model as {same_as} s{seed}; its eval reused ({src})")
    return per_seed


EV = SimpleNamespace()  # what every seed's eval shares, set before the seed processes fork


def eval_seed(seed: int | None) -> dict:
    """Evaluate one seed's model (seed None: the base) into EV.out/s<seed>/; its flat scores."""
    from poststate.diagnostics import drift_record, flat, reference_hidden
    from poststate.evaluation import evaluate
    from poststate.modeling import load_model
    from poststate.streams import stream_seed

    p, run, tok = EV.p, EV.run, EV.tok
    base = load_model(run_dir("base", None), dtype=EV.dtype, device=EV.device).eval()
    model = base if run == "base" else load_model(run_dir(run, seed), merge=True, dtype=EV.dtype, device=EV.device).eval()
    scores, items = evaluate(model, tok, DATA, p.harness, seed=0)
    roll = rollouts(model, tok, EV.drift_rows, p.drift, p.harness.gen_batch_size, stream_seed("drift", "rollouts", run, seed))
    out = EV.out if seed is None else EV.out / f"s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if run == "base":  # the drift noise floor: the base against a second, independent sample of itself
        floor = rollouts(base, tok, EV.drift_rows, p.drift, p.harness.gen_batch_size, stream_seed("drift", "rollouts", "base", "floor"))
        ref_hidden = reference_hidden(base, tok, roll, p)
        np.save(out / REF_HIDDEN, ref_hidden)  # for every other run's eval: the same features of the same states
        record = drift_record(base, None, tok, roll, floor, [], p, ("base", "floor"), ref_hidden=ref_hidden)
        scores.update({f"{k}_floor": v for k, v in flat(record).items()})
    else:
        record = drift_record(base, model, tok, EV.reference, roll, train_states(run_dir(run, seed)), p, (run, seed),
                              ref_hidden=EV.ref_hidden)
        scores.update(flat(record))
    atomic_write_json(out / "scores.json", scores)
    atomic_write_json(out / "drift.json", record)
    write_jsonl(out / "items.jsonl", [{"benchmark": b, **r} for b, recs in items.items() for r in recs])
    write_jsonl(out / "rollouts.jsonl", roll)
    typer.echo(f"{run} s{seed}: " + ", ".join(f"{k}={scores[k]:.3f}" for k in ("gsm8k_strict", "truthfulqa_mc1", "mmlu_acc")))
    return scores


def evaluate_run(run: str, run_seeds: list[int | None]) -> list[dict]:
    """Evaluate every seed of a run into evals/<run>/ (on a CPU, seeds side by side: `poststate.pool`); the
    scores per seed. The base (seed None) is also the drift reference: its rollouts, and the noise floor."""
    import torch

    from poststate.modeling import load_tokenizer, resolve_dtype

    p = load_section("eval")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    EV.__dict__.update(p=p, run=run, device=device, dtype=resolve_dtype(p.dtype, device), tok=load_tokenizer(run_dir("base", None)),
                       drift_rows=read_jsonl(DATA / "gsm8k/test.jsonl")[: p.drift.prompts],
                       reference=None if run == "base" else read_jsonl(EVALS / "base" / "rollouts.jsonl"),
                       ref_hidden=None if run == "base" else np.load(EVALS / "base" / REF_HIDDEN))
    with atomic_dir(EVALS / run) as tmp:
        EV.out = tmp
        return map_tasks(eval_seed, run_seeds, workers_for(len(run_seeds), device))


def main(
    run: str = typer.Argument(..., help="run name, e.g. base, sft_mild, opd_stress"),
    same_as: str | None = typer.Option(None, "--same-as", help="reuse this run's eval where the model files are byte-identical to its own"),
) -> None:
    run_seeds = [None] if run == "base" else seeds(read_params())
    if same_as is not None and run == "base":
        raise typer.BadParameter("the base is the drift reference: it is always evaluated", param_hint="--same-as")
    if same_as is not None and all(same_model(run_dir(run, s), run_dir(same_as, s)) for s in run_seeds):
        per_seed = reuse_eval(run, same_as, run_seeds)
    else:
        per_seed = evaluate_run(run, run_seeds)
    summary = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
    summary["seeds"] = len(per_seed)
    atomic_write_json(Path("metrics/eval") / f"{run}.json", summary)


if __name__ == "__main__":
    typer.run(main)
