"""End to end: the whole tiny DAG through `dvc repro` in a temporary copy of the repo, at a smaller size
(conftest's `published_repo`, shared with test_dvc_workflow.py).

Checks the metrics files, the report (every row; each verdict recomputed from report.json by its rule),
that a second `dvc repro` is a no-op, that a parameter change invalidates exactly the stages that depend
on it, and that re-running a stage with the same params reproduces report.json byte for byte.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from poststate import report as rep
from tests.conftest import sh

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["base", "sft_mild", "sft_stress", "teacher", "opd_stress", "opd_mild", "opd_teacher_states", "rl"]

@pytest.fixture(scope="module")
def repo(published_repo) -> Path:
    return published_repo


@pytest.mark.slow
def test_every_run_has_harness_metrics_with_stderr_and_n(repo):
    for run in RUNS:
        m = json.loads((repo / "metrics/eval" / f"{run}.json").read_text())
        for key in ("gsm8k_strict", "gsm8k_flexible", "truthfulqa_mc1", "truthfulqa_mc2", "mmlu_acc"):
            assert 0.0 <= m[key] <= 1.0 and m[f"{key}_stderr"] >= 0.0, (run, key)
        assert (m["gsm8k_n"], m["truthfulqa_n"], m["mmlu_n"]) == (24, 16, 24)
        if run != "base":
            assert {"mmd_lexical", "mmd_hidden", "kl_base_tuned", "train_state_nll"} <= set(m), run
        assert (repo / "models" / run / ("" if run == "base" else "s0") / "lineage.json").exists()


@pytest.mark.slow
def test_report_has_every_row_and_verdicts_follow_from_report_json(repo):
    md = (repo / "metrics/report.md").read_text()
    for run in RUNS:
        assert rep.RUN_LABELS[run] in md, run
    report = json.loads((repo / "metrics/report.json").read_text())
    rules = rep.ReportRules.model_validate(report["rules"])
    assert set(report["verdicts"]) == set(rep.FINDINGS)
    for finding, verdict in report["verdicts"].items():
        assert verdict["verdict"] in rep.VERDICTS
        if verdict["verdict"] == rep.INVALID:  # only when a run behind it failed its gate on some seed
            assert any(not report["gates"][run]["passed"] for run in rep.FINDING_RUNS[finding])
        assert rep.verdict_for(finding, report, rules) == verdict, finding
        assert f"{finding}" in md and verdict["verdict"] in md
    for png in ("gain_vs_retention", "drift_vs_forgetting", "training_curves"):
        assert (repo / "metrics/plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rl_measures_its_common_initial_policy_once_for_every_seed(repo):
    """Every RL seed starts from the base: one "before" on the gate's stream, every seed's "after" on it."""
    seeds = yaml.safe_load((repo / "params.yaml").read_text())["seeds"]
    gates = [json.loads((repo / "metrics/train/rl" / f"s{s}" / "gate.json").read_text())["objectives"] for s in seeds]
    assert len(seeds) >= 2
    for objective in ("reward_sampled", "reward_greedy"):
        assert all(g[objective]["before"] == gates[0][objective]["before"] for g in gates), objective


@pytest.mark.slow
def test_second_repro_is_a_noop(repo):
    out = sh(["dvc", "repro"], repo).stdout
    assert "Running stage" not in out, out


@pytest.mark.slow
def test_param_change_reruns_only_its_dependents(repo, tmp_path):
    """`-S sft.lr=...` semantics: sft@mild inherits lr and reruns with everything downstream of it;
    sft@stress overrides lr, so its resolved params are unchanged and nothing of its branch reruns.
    Runs in a copy of the repo (with its DVC cache), so the shared one needs no restoring rerun."""
    work = tmp_path / "repo"
    shutil.copytree(repo, work, symlinks=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["sft"]["lr"] = params["sft"]["lr"] / 2
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], work).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"resolve", "sft@mild", "opd@mild", "eval@sft_mild", "eval@opd_mild", "report"}, ran


@pytest.mark.slow
def test_rerun_with_same_params_gives_identical_report(repo):
    before = (repo / "metrics/report.json").read_bytes()
    sh(["dvc", "repro", "--force", "--downstream", "sft@mild"], repo)
    assert (repo / "metrics/report.json").read_bytes() == before
    assert "Running stage" not in sh(["dvc", "repro"], repo).stdout


def test_every_eval_of_a_run_depends_on_the_base_eval_it_reads():
    """eval.py reads evals/base/rollouts.jsonl (the drift reference) for every run but the base: DVC must
    know, or `dvc repro eval@<run>` could run before (or without) the base's eval."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "evals/base" in stages["eval_base"]["outs"] and stages["eval_base"]["cmd"] == "python stages/eval.py base"
    assert "base" not in stages["eval"]["foreach"] and "evals/base" in stages["eval"]["do"]["deps"]
    assert "evals/base" in stages["eval_teacher"]["deps"]
    assert sorted(["base", "teacher", *stages["eval"]["foreach"]]) == sorted(RUNS)


def test_the_teacher_eval_depends_on_the_run_whose_eval_it_may_reuse():
    """eval.py teacher --same-as sft_<source> reads that run's model and eval: both are declared deps."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["eval_teacher"]
    assert stage["cmd"] == "python stages/eval.py teacher --same-as sft_${teacher.source}"
    assert {"models/teacher", "models/sft_${teacher.source}", "evals/sft_${teacher.source}"} <= set(stage["deps"])
    assert stage["outs"] == ["evals/teacher"]
