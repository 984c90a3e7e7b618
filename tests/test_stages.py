"""The stage scripts' own logic (the pipeline test runs them through dvc): the teacher stage's copy of an
adapter-free source, and the eval stage's reuse of an identical model's eval."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from poststate.modeling import load_model
from tests.conftest import load_stage



@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model, tiny_tokenizer) -> Path:
    """A repo-like cwd: params.yaml (seeds [0, 1]) and models/sft_stress/s<seed>/ saved the standard way."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profile": "tiny", "seeds": [0, 1], "teacher": {"source": "stress"}}))
    for seed in (0, 1):
        d = tmp_path / "models/sft_stress" / f"s{seed}"
        tiny_model.save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        (d / "lineage.json").write_text(json.dumps({"kind": "sft_stress", "seed": seed}))
        (d / "train_states.jsonl").write_text(json.dumps({"prompt_ids": [1, 2], "prefix_ids": [3]}) + "\n")
    return tmp_path


def test_teacher_of_an_adapter_free_run_is_its_files_with_a_lineage(workdir):
    load_stage("teacher").main()
    for seed in (0, 1):
        src, out = workdir / "models/sft_stress" / f"s{seed}", workdir / "models/teacher" / f"s{seed}"
        model_files = sorted(f.name for f in src.iterdir() if f.name not in ("lineage.json", "train_states.jsonl"))
        assert sorted(f.name for f in out.iterdir()) == sorted([*model_files, "lineage.json"])
        for name in model_files:
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
        lineage = json.loads((out / "lineage.json").read_text())
        assert lineage["kind"] == "teacher" and lineage["seed"] == seed
        assert lineage["parents"]["sft_stress"]["path"] == f"models/sft_stress/s{seed}"
    ids = torch.tensor([[1, 2, 3, 4]])
    teacher, source = load_model(workdir / "models/teacher/s0"), load_model(workdir / "models/sft_stress/s0")
    assert torch.equal(teacher(input_ids=ids).logits, source(input_ids=ids).logits)


def test_teacher_stage_refuses_a_source_that_is_no_model(workdir):
    for f in (workdir / "models/sft_stress/s0").glob("config.json"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="sft_stress/s0: no config.json"):
        load_stage("teacher").main()
    assert not (workdir / "models/teacher").exists()


def _fake_eval(root: Path, run: str, seed: int, score: float) -> None:
    d = root / "evals" / run / f"s{seed}"
    d.mkdir(parents=True)
    (d / "scores.json").write_text(json.dumps({"gsm8k_strict": score, "truthfulqa_mc1": 0.5, "mmlu_acc": 0.5}))
    (d / "items.jsonl").write_text('{"benchmark": "gsm8k", "id": "gsm8k/0", "correct": true}\n')
    (d / "rollouts.jsonl").write_text('{"completion": "x"}\n')


def test_same_model_compares_model_files_and_training_states(workdir):
    ev = load_stage("eval")
    load_stage("teacher").main()
    a, b = workdir / "models/teacher/s0", workdir / "models/sft_stress/s0"
    assert ev.same_model(a, b)  # lineage differs; the teacher's training states are its parent's
    assert not ev.same_model(a, workdir / "models/missing/s0")
    (a / "extra.txt").write_text("x")
    assert not ev.same_model(a, b)
    (a / "extra.txt").unlink()
    weights = a / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert not ev.same_model(a, b)


def test_eval_of_an_identical_model_is_reused_and_recorded(workdir, monkeypatch):
    ev = load_stage("eval")
    load_stage("teacher").main()
    for seed, score in ((0, 0.25), (1, 0.75)):
        _fake_eval(workdir, "sft_stress", seed, score)
    monkeypatch.setattr(ev, "evaluate_run", lambda *a: pytest.fail("an identical model was evaluated again"))
    ev.main("teacher", same_as="sft_stress")
    for seed in (0, 1):
        out, src = workdir / "evals/teacher" / f"s{seed}", workdir / "evals/sft_stress" / f"s{seed}"
        for name in ("scores.json", "items.jsonl", "rollouts.jsonl"):
            assert (out / name).read_bytes() == (src / name).read_bytes()
        assert json.loads((out / "reused.json").read_text())["eval"] == f"evals/sft_stress/s{seed}"
    summary = json.loads((workdir / "metrics/eval/teacher.json").read_text())
    assert summary["gsm8k_strict"] == 0.5 and summary["seeds"] == 2


def test_eval_of_a_different_model_is_not_reused(workdir, monkeypatch):
    ev = load_stage("eval")
    load_stage("teacher").main()
    for seed in (0, 1):
        _fake_eval(workdir, "sft_stress", seed, 0.25)
    (workdir / "models/teacher/s1/config.json").write_text("{}")  # one seed differs: every seed is evaluated
    calls = []
    monkeypatch.setattr(ev, "evaluate_run", lambda run, seeds: calls.append((run, seeds)) or [{"gsm8k_strict": 0.0}] * 2)
    ev.main("teacher", same_as="sft_stress")
    assert calls == [("teacher", [0, 1])]
    assert not (workdir / "evals/teacher").exists()


def test_eval_reuse_without_the_source_eval_fails_before_writing(workdir):
    ev = load_stage("eval")
    load_stage("teacher").main()
    _fake_eval(workdir, "sft_stress", 0, 0.25)  # s1 missing
    with pytest.raises(FileNotFoundError, match=r"evals/sft_stress/s1/scores.json.*eval@sft_stress"):
        ev.main("teacher", same_as="sft_stress")
    assert not (workdir / "evals/teacher").exists() and not (workdir / "metrics").exists()

