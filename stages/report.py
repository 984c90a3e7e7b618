"""The paper's Table 2 from measured numbers, the diagnostics beyond it, and a rule-based verdict on each
finding (reproduced / not reproduced / inconclusive, or invalid when a run did not do its own job), never
written by hand.

Reads, for every run and seed of params.yaml: evals/<run>/s<seed>/{scores.json, items.jsonl, drift.json}
(the base: evals/base/, one model, whose drift.json is the noise floor), metrics/train/<run>/s<seed>/
{gate.json, compute.json} (the teacher has neither: it is its stress-SFT run's model) and the training
curves; a missing file fails, naming it. Writes metrics/report.{md,json} and metrics/plots/*.png, each
atomically. The rules are `report.rules` in params.yaml (docs/report.md).

    python stages/report.py
"""

import csv
import json
from pathlib import Path

import typer

from poststate import report as rep
from poststate.artifacts import atomic_dir, atomic_write_json, atomic_write_text
from poststate.params import load_section, read_params, seeds
from poststate.runs import DATA, TRAIN_LOGS, read_jsonl

EVALS = Path("evals")
NO_TRAINING_RECORD = ("base", "teacher")  # no gate.json of their own (the base's compute.json is optional)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it: dvc repro)")
    return json.loads(path.read_text())


def load_eval(d: Path) -> tuple[dict, dict, dict]:
    """scores, per-metric item scores and the drift record of one evaluated model directory."""
    if not (d / "items.jsonl").is_file():
        raise FileNotFoundError(f"{d / 'items.jsonl'}: not found (run the stage that writes it: dvc repro)")
    records: dict[str, list] = {}
    for r in read_jsonl(d / "items.jsonl"):
        records.setdefault(r["benchmark"], []).append(r)
    return read_json(d / "scores.json"), rep.item_scores(records), read_json(d / "drift.json")


def load_inputs(run_seeds: list[int]) -> rep.ReportInputs:
    """Every input of the report (all runs of rep.RUNS, every seed); the base keyed by None."""
    scores, items, drift, gates, compute = {}, {}, {}, {}, {}
    for run in rep.RUNS:
        keys = [None] if run == "base" else run_seeds
        for seed in keys:
            d = EVALS / run if seed is None else EVALS / run / f"s{seed}"
            s, i, dr = load_eval(d)
            scores.setdefault(run, {})[seed], items.setdefault(run, {})[seed], drift.setdefault(run, {})[seed] = s, i, dr
            if run not in NO_TRAINING_RECORD:
                logs = TRAIN_LOGS / run / f"s{seed}"
                gates.setdefault(run, {})[seed] = read_json(logs / "gate.json")
                compute.setdefault(run, {})[seed] = read_json(logs / "compute.json")
    base_compute = sorted((TRAIN_LOGS / "base").glob("s*/compute.json"))
    if len(base_compute) == 1:
        compute["base"] = {None: read_json(base_compute[0])}
    return rep.ReportInputs(scores=scores, items=items, drift=drift, gates=gates, compute=compute)


def curves(run: str, seed: int | None) -> dict[str, list[float]]:
    """The per-step training loss (and RL reward) of one run's seed, from its DVCLive logs."""
    root = TRAIN_LOGS / run
    logs = root / f"s{seed}" if seed is not None else next(iter(sorted(root.glob("s*"))), root)
    out = {}
    for metric in ("loss", "reward_mean"):
        f = logs / "plots" / "metrics" / f"{metric}.tsv"
        if f.exists():
            with open(f) as fh:
                out[metric] = [float(row[metric]) for row in csv.DictReader(fh, delimiter="\t")]
    return out


def main() -> None:
    p = load_section("report")
    raw = read_params()
    run_seeds = seeds(raw)
    inputs = load_inputs(run_seeds)
    harness = raw["eval"]["harness"]
    meta = {
        "profile": raw.get("profile"),
        "mmlu_style": harness["mmlu_style"],
        "truthfulqa_preamble": harness["truthfulqa_preamble"],
        "gsm8k_fewshot": harness["gsm8k_fewshot"],
        "data": read_json(DATA / "manifest.json")["source"],
    }
    report = rep.build_report(inputs, p.rules, paper_rows=rep.PAPER_TABLE2 if p.paper_rows else None, meta=meta)
    with atomic_dir(Path("metrics/plots")) as plots:
        rep.plot_gain_vs_retention(report, plots / "gain_vs_retention.png")
        rep.plot_drift_vs_forgetting(report, plots / "drift_vs_forgetting.png")
        trained = [r for r in rep.RUNS if r != "teacher"]
        rep.plot_training_curves({r: curves(r, None if r == "base" else run_seeds[0]) for r in trained},
                                 plots / "training_curves.png")
    atomic_write_json(Path("metrics/report.json"), report)
    atomic_write_text(Path("metrics/report.md"), rep.render_markdown(report))
    for finding, v in report["verdicts"].items():
        typer.echo(f"{finding}: {v['verdict']}")


if __name__ == "__main__":
    typer.run(main)
