"""Evaluate one run (every seed) on GSM8K, TruthfulQA-MC and MMLU as lm-evaluation-harness defines them,
and measure its state drift from the base model.

Per seed: harness scores with stderr and n, per-item records (for flips), rollouts of the model on a fixed
prompt set (the paper's drift states), and, against the base: lexical and hidden-state MMD of prefix
states, forward KL(base || run) on base samples, and the base model's NLL of the states the run trained on.

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

import numpy as np
import typer

from poststate.artifacts import atomic_dir, atomic_write_json
from poststate.params import load_section, read_params, seeds
from poststate.runs import DATA, model_files, read_jsonl, run_dir, write_jsonl

EVALS = Path("evals")


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


def _pooled(sums: np.ndarray, counts: np.ndarray) -> dict:
    """A token-pooled mean (ratio of sums) over sequences, with its per-sequence pseudo-values."""
    from poststate.stats import ratio_pseudovalues

    return {"mean": float(sums.sum() / counts.sum()), "pseudo": ratio_pseudovalues(sums[None, :], counts)[0].tolist()}


def drift(base, model, tok, ref_roll: list[dict], roll: list[dict], states: list[dict], p, tag: tuple) -> dict:
    """Drift of one sample of rollouts (`roll`) from the base's reference sample (`ref_roll`), on the same
    prompts, and the locality of the states a run trained on. `tag` = (run, seed) names the random streams:
    every stream here is distinct from the reference's and from every training stream (`streams`)."""
    from poststate import diagnostics
    from poststate import drift as d
    from poststate.rollout import HFRolloutEngine, SamplingParams
    from poststate.streams import stream_seed

    q = p.drift
    out = {}
    ref_cut, run_cut = stream_seed("drift", "cuts", "base", "reference"), stream_seed("drift", "cuts", *tag)
    for kind in ("lexical", "hidden"):
        # lexical features read the generated part only: both samples answer the same prompts, whose words
        # would only dilute the kernel; hidden features read the whole state, through the base model
        prompts = (lambda rs: [""] * len(rs)) if kind == "lexical" else (lambda rs: [r["prompt"] for r in rs])
        xs, px = d.rollout_states(prompts(ref_roll), [r["completion"] for r in ref_roll], q.cuts, ref_cut)
        ys, py = d.rollout_states(prompts(roll), [r["completion"] for r in roll], q.cuts, run_cut)
        if kind == "lexical":
            X = d.lexical_features(xs, ngram=(1, q.ngram_max), dim=q.hash_dim)
            Y = d.lexical_features(ys, ngram=(1, q.ngram_max), dim=q.hash_dim)
        else:
            X = diagnostics.hidden_features(base, tok, xs, p.batch_size)
            Y = diagnostics.hidden_features(base, tok, ys, p.batch_size)
        out[f"mmd_{kind}"] = d.drift_test(X, px, Y, py, q.permutations, stream_seed("drift", "permutations", kind, *tag))
    if model is not None:
        seqs = [r["prompt_ids"] + r["completion_ids"] for r in ref_roll if r["completion_ids"]]
        out["kl_base_tuned"] = _pooled(*diagnostics.forward_kl(base, model, seqs, [len(r["prompt_ids"]) for r in ref_roll if r["completion_ids"]], p.batch_size))
    scored = [s for s in states if s["score_from"] < len(s["ids"])][: q.locality_states]
    if scored:
        # Locality where the loss was applied: the base's NLL of the tokens the run trained on, minus the
        # base's NLL of its own sample from the same context (of the same length): at temperature 1 the
        # latter is the base's entropy there, so a high-entropy context does not pose as a distant state.
        trained = diagnostics.token_nll(base, [s["ids"] for s in scored], [s["score_from"] for s in scored], p.batch_size)
        sp = SamplingParams(max_new_tokens=max(len(s["ids"]) - s["score_from"] for s in scored), temperature=1.0)
        own = HFRolloutEngine(base, tok, p.harness.gen_batch_size).generate(
            [s["ids"][: s["score_from"]] for s in scored], sp, seed=stream_seed("locality", *tag))
        own_nll = [-float(np.mean(lp[: len(s["ids"]) - s["score_from"]])) for lp, s in zip(own.logprobs, scored)]
        excess = (trained[0] / trained[1]) - np.asarray(own_nll)
        out["locality"] = {"excess": float(excess.mean()), "pseudo": excess.tolist(),
                           "trained_nll": float((trained[0] / trained[1]).mean()), "own_nll": float(np.mean(own_nll))}
    return out


def flat(drift_out: dict) -> dict[str, float]:
    """The flat numbers of a drift record (for scores.json and `dvc metrics diff`)."""
    out = {}
    for kind in ("lexical", "hidden"):
        t = drift_out[f"mmd_{kind}"]
        out |= {f"mmd_{kind}": t["mmd2"], f"mmd_{kind}_se": t["se"], f"mmd_{kind}_p": t["p_value"]}
    if "kl_base_tuned" in drift_out:
        out["kl_base_tuned"] = drift_out["kl_base_tuned"]["mean"]
    if "locality" in drift_out:
        out |= {"locality_excess_nll": drift_out["locality"]["excess"], "train_state_nll": drift_out["locality"]["trained_nll"]}
    return out


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


def evaluate_run(run: str, run_seeds: list[int | None]) -> list[dict]:
    """Evaluate every seed of a run into evals/<run>/; the scores per seed. The base (seed None) is also
    the drift reference: its rollouts, and the noise floor (the base against a second, independent sample
    of itself)."""
    from poststate.evaluation import evaluate
    from poststate.modeling import load_model, load_tokenizer, resolve_dtype
    from poststate.streams import stream_seed

    p = load_section("eval")
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    dtype = resolve_dtype(p.dtype, device)
    tok = load_tokenizer(run_dir("base", None))
    base = load_model(run_dir("base", None), dtype=dtype, device=device).eval()
    drift_rows = read_jsonl(DATA / "gsm8k/test.jsonl")[: p.drift.prompts]
    per_seed = []
    with atomic_dir(EVALS / run) as tmp:
        for seed in run_seeds:
            model = base if run == "base" else load_model(run_dir(run, seed), merge=True, dtype=dtype, device=device).eval()
            scores, items = evaluate(model, tok, DATA, p.harness, seed=0)
            roll = rollouts(model, tok, drift_rows, p.drift, p.harness.gen_batch_size, stream_seed("drift", "rollouts", run, seed))
            if run == "base":
                floor = rollouts(base, tok, drift_rows, p.drift, p.harness.gen_batch_size, stream_seed("drift", "rollouts", "base", "floor"))
                record = drift(base, None, tok, roll, floor, [], p, ("base", "floor"))
                scores.update({f"{k}_floor": v for k, v in flat(record).items()})
            else:
                ref = read_jsonl(EVALS / "base" / "rollouts.jsonl")
                record = drift(base, model, tok, ref, roll, train_states(run_dir(run, seed)), p, (run, seed))
                scores.update(flat(record))
            out = tmp if seed is None else tmp / f"s{seed}"
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "scores.json", scores)
            atomic_write_json(out / "drift.json", record)
            write_jsonl(out / "items.jsonl", [{"benchmark": b, **r} for b, recs in items.items() for r in recs])
            write_jsonl(out / "rollouts.jsonl", roll)
            per_seed.append(scores)
            typer.echo(f"{run} s{seed}: " + ", ".join(f"{k}={scores[k]:.3f}" for k in ("gsm8k_strict", "truthfulqa_mc1", "mmlu_acc")))
    return per_seed


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
