"""The paper's Table 2 from measured numbers, the diagnostics beyond it, and a rule-based verdict on
each finding (reproduced / not reproduced / inconclusive), never written by hand.

    python stages/report.py             # writes metrics/report.{md,json} and metrics/plots/*.png
"""

import csv
import json
from pathlib import Path

import typer

from poststate import report as rep
from poststate.artifacts import atomic_dir, atomic_write_json, atomic_write_text
from poststate.params import load_section, read_params
from poststate.runs import DATA, TRAIN_LOGS, read_jsonl

EVALS = Path("evals")
RUNS = ("base", "sft_mild", "sft_stress", "teacher", "opd_stress", "opd_mild", "opd_seqkd", "rl")


def load_run(run: str) -> tuple[dict, dict]:
    """scores[seed] and items[seed] of one evaluated run (base: a single seed, keyed 0)."""
    root = EVALS / run
    dirs = {0: root} if (root / "scores.json").exists() else {int(d.name[1:]): d for d in sorted(root.glob("s*"))}
    scores, items = {}, {}
    for seed, d in dirs.items():
        scores[seed] = json.loads((d / "scores.json").read_text())
        records: dict[str, list] = {}
        for r in read_jsonl(d / "items.jsonl"):
            records.setdefault(r["benchmark"], []).append(r)
        items[seed] = rep.item_scores(records)
    return scores, items


def curves(run: str) -> dict[str, list[float]]:
    out = {}
    for metric in ("loss", "reward_mean"):
        f = TRAIN_LOGS / run / "s0" / "plots" / "metrics" / f"{metric}.tsv"
        if f.exists():
            out[metric] = [float(row[metric]) for row in csv.DictReader(open(f), delimiter="\t")]
    return out


def main() -> None:
    p = load_section("report")
    raw = read_params()
    loaded = {run: load_run(run) for run in RUNS if (EVALS / run).exists()}
    meta = {
        "profile": raw.get("profile"),
        "mmlu_style": raw["eval"]["harness"]["mmlu_style"],
        "truthfulqa_preamble": raw["eval"]["harness"]["truthfulqa_preamble"],
        "gsm8k_fewshot": raw["eval"]["harness"]["gsm8k_fewshot"],
        "data": json.loads((DATA / "manifest.json").read_text())["source"],
    }
    base_scores = next(iter(loaded["base"][0].values()))
    # the drift noise floor: MMD between two independent samples of the base itself
    meta |= {f"{k}_noise_floor": round(base_scores[f"{k}_floor"], 6) for k in ("mmd_lexical", "mmd_hidden")}
    report = rep.build_report(
        {r: s for r, (s, _) in loaded.items()},
        {r: i for r, (_, i) in loaded.items()},
        p.rules,
        paper_rows=rep.PAPER_TABLE2 if p.paper_rows else None,
        meta=meta,
    )
    with atomic_dir(Path("metrics/plots")) as plots:
        rep.plot_gain_vs_retention(report, plots / "gain_vs_retention.png")
        rep.plot_drift_vs_forgetting(report, plots / "drift_vs_forgetting.png")
        rep.plot_training_curves({r: curves(r) for r in ["base", *RUNS[1:]] if r != "teacher"}, plots / "training_curves.png")
    atomic_write_json(Path("metrics/report.json"), report)
    atomic_write_text(Path("metrics/report.md"), rep.render_markdown(report))
    for finding, v in report["verdicts"].items():
        typer.echo(f"{finding}: {v['verdict']}")


if __name__ == "__main__":
    typer.run(main)
