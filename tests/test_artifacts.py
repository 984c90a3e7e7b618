"""Atomic outputs, lineage, and model directories that reload by the standard call with the same logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poststate.artifacts import atomic_dir, tree_sha256
from poststate.loop import TrainResult
from poststate.modeling import load_model, with_adapter
from poststate.params import Adapter
from poststate.runs import save_run
from tests.conftest import build_tiny_model, give_lora_weights


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_text("v1")
    assert (out / "w.bin").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_text("half-written")
            raise RuntimeError("killed mid-save")
    assert (out / "w.bin").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dir left behind


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_saved_run_reloads_with_same_logits_and_lineage(tmp_path, monkeypatch, tiny_tokenizer, kind):
    monkeypatch.chdir(tmp_path)
    parent = tmp_path / "models" / "base"
    base = build_tiny_model(tiny_tokenizer, init_std=0.3)
    base.save_pretrained(parent)
    tiny_tokenizer.save_pretrained(parent)
    data = tmp_path / "sft.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    model = with_adapter(load_model(parent), Adapter(kind=kind, r=4, alpha=8))
    if kind == "lora":
        give_lora_weights(model)
    model.eval()
    ids = torch.tensor([tiny_tokenizer("Question: Tom has 3 apples")["input_ids"]])
    before = model(input_ids=ids).logits
    result = TrainResult(steps=2, states=10, tokens=20, seconds=1.0, sample=[{"origin": "dataset", "prompt_ids": [1], "prefix_ids": [2]}])
    out = tmp_path / "models" / "run" / "s3"
    save_run(model, tiny_tokenizer, out, kind="sft_test", params={"lr": 0.1}, seed=3,
             parents={"base": parent.relative_to(tmp_path)}, data={"sft": data.relative_to(tmp_path)}, result=result)
    assert (out / ("adapter_config.json" if kind == "lora" else "config.json")).exists()
    if kind == "lora":
        assert not (out / "model.safetensors").exists()  # adapters, not merged copies
    reloaded = load_model(out.relative_to(tmp_path)).eval()
    assert torch.allclose(reloaded(input_ids=ids).logits, before, atol=1e-5)
    merged = load_model(out.relative_to(tmp_path), merge=True).eval()  # what evaluation loads
    assert not hasattr(merged, "peft_config") and not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(input_ids=ids).logits, before, atol=1e-5)
    with pytest.raises(ValueError, match="inference"):
        load_model(out.relative_to(tmp_path), trainable=True, merge=True)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["seed"] == 3 and lineage["params"] == {"lr": 0.1} and lineage["kind"] == "sft_test"
    assert lineage["parents"]["base"] == {"path": "models/base", "sha256": tree_sha256(parent)}
    assert lineage["data"]["sft"]["sha256"] == tree_sha256(data)
    assert len(lineage["code_sha256"]) == 64 and lineage["training"]["states"] == 10
    assert [json.loads(l) for l in (out / "train_states.jsonl").read_text().splitlines()] == result.sample


SAVE_ADAPTER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.conftest import build_tiny_model, build_tiny_tokenizer
from poststate.modeling import with_adapter
from poststate.params import Adapter
from poststate.runs import save_run
tok = build_tiny_tokenizer()
model = with_adapter(build_tiny_model(tok), Adapter(kind="lora", r=4, alpha=8))
save_run(model, tok, Path(sys.argv[1]), kind="t", params={}, seed=0, parents={}, data={})
"""


@pytest.mark.slow  # two fresh processes (imports alone take ~8 s each)
def test_saved_adapter_has_the_same_bytes_under_any_hash_seed(tmp_path):
    """peft keeps target_modules in a set: without canonical ordering, adapter_config.json (and with
    it the DVC hash of every LoRA run) changed from one process to the next."""
    root = Path(__file__).resolve().parents[1]
    for hash_seed in ("1", "2"):  # two seeds that order peft's target_modules set differently
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", SAVE_ADAPTER, str(tmp_path / hash_seed), str(root)], env=env, check=True,
                       capture_output=True, cwd=tmp_path)
    files = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert "adapter_config.json" in files and files == sorted(p.name for p in (tmp_path / "2").iterdir())
    for name in files:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
