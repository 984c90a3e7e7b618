"""Data parallelism on 2 CPU processes (torchrun + gloo, accelerate's MULTI_CPU): the SFT and RL stages run
unchanged, and against a 1-process run of the same params

- the two ranks trained on disjoint data whose union is the 1-process run's step batch (SFT: rows; RL:
  prompts, so a prompt's whole group stays on one rank),
- the LR at every optimizer step equals the 1-process run's (the scheduler advances once per step),
- exactly one process wrote the model, the metrics and the gate (the trace of every other rank has no write),
- SFT, whose global step batch is the same rows either way, ends with the same weights within
  `WEIGHT_TOL` (the gradient is the same sum; only the float order of DDP's all-reduce differs).

The trace comes from `poststate.trace` (POSTSTATE_TRACE_DIR): each process logs its draws, LRs and writes.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_TOL = 1e-6  # max |w_2proc - w_1proc| of the LoRA weights after the SFT run (fp32; observed ~1e-9)
ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
         "answer": f"Tom has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a in range(2, 8) for b in range(3, 7)]

pytestmark = pytest.mark.slow


def _workspace(dest: Path) -> Path:
    """A minimal stage workspace: a tiny random base, GSM8K-format rows, small params."""
    (dest / "data/prepared/gsm8k").mkdir(parents=True)
    (dest / "dvc.yaml").write_text("stages: {}\n")
    for name, rows in {"sft": ROWS[:16], "sft_heldout": ROWS[16:20], "prompts": ROWS[:16], "prompts_heldout": ROWS[20:24]}.items():
        (dest / f"data/prepared/gsm8k/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, seed=0, init_std=0.2).save_pretrained(dest / "models/base")
    tok.save_pretrained(dest / "models/base")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seeds"] = [0]
    params["sft"].update(epochs=2, batch_size=4, grad_accum=2)  # 16 rows / 8 per step x 2 epochs = 4 steps
    params["sft"]["adapter"]["kind"] = "lora"
    params["rl"].update(steps=3, prompts_per_step=4, group_size=2, batch_size=4, gen_batch_size=8, gate_samples=1,
                        rollout={"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _run(ws: Path, stage: list[str], procs: int) -> dict[int, list[dict]]:
    env = {**os.environ, "POSTSTATE_TRACE_DIR": str(ws / "trace"), "ACCELERATE_USE_CPU": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    shutil.rmtree(ws / "trace", ignore_errors=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(ROOT / "stages" / stage[0]), *stage[1:]], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {int(f.stem[4:]): [json.loads(line) for line in f.read_text().splitlines()] for f in (ws / "trace").glob("rank*.jsonl")}


def _events(trace: dict[int, list[dict]], rank: int, event: str) -> list[dict]:
    return [e for e in trace.get(rank, []) if e["event"] == event]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for procs in (1, 2):
        ws = _workspace(tmp_path_factory.mktemp(f"p{procs}"))
        out[procs] = {"ws": ws, "sft": _run(ws, ["sft.py", "mild"], procs), "rl": _run(ws, ["rl.py"], procs)}
    return out


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_ranks_draw_disjoint_shards_of_the_one_process_batch(runs, stage):
    one, two = runs[1][stage], runs[2][stage]
    assert set(two) == {0, 1}
    steps = _events(one, 0, "draw")
    assert steps and all(e["world"] == 1 for e in steps)
    for step, whole in enumerate(steps):
        r0, r1 = _events(two, 0, "draw")[step], _events(two, 1, "draw")[step]
        assert r0["world"] == r1["world"] == 2
        assert r0["seqs"] and r1["seqs"]
        if stage == "sft":  # rows: the ranks' shards partition the 1-process step batch
            assert not set(r0["seqs"]) & set(r1["seqs"])
            assert sorted(r0["seqs"] + r1["seqs"]) == sorted(whole["seqs"])
        else:  # rollouts are sampled per rank (own streams): compare the prompts, not the samples
            assert len(r0["seqs"]) + len(r1["seqs"]) == len(whole["seqs"])


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_lr_at_every_step_equals_the_one_process_run(runs, stage):
    lrs = lambda trace, rank: [e["lr"] for e in _events(trace, rank, "step")]  # noqa: E731
    one = lrs(runs[1][stage], 0)
    assert len(one) >= 3 and len(set(one)) > 1
    assert lrs(runs[2][stage], 0) == one
    assert lrs(runs[2][stage], 1) == one


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_exactly_one_process_writes(runs, stage):
    trace = runs[2][stage]
    writes = _events(trace, 0, "write")
    assert not _events(trace, 1, "write")
    paths = {e["path"] for e in writes}
    run = "sft_mild" if stage == "sft" else "rl"
    assert f"models/{run}/s0" in paths
    assert f"metrics/train/{run}/s0/gate.json" in paths
    assert f"metrics/train/{run}/s0/compute.json" in paths


def test_rl_ranks_hold_whole_prompt_groups(runs):
    two = runs[2]["rl"]
    for rank in (0, 1):
        for draw in _events(two, rank, "draw"):
            assert len(draw["seqs"]) == 2 * 2  # 4 prompts per step / 2 ranks x group_size 2


def test_sft_weights_equal_the_one_process_run(runs):
    a = load_file(runs[1]["ws"] / "models/sft_mild/s0/adapter_model.safetensors")
    b = load_file(runs[2]["ws"] / "models/sft_mild/s0/adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert moved > 1e-4  # the run trained (LoRA B starts at 0)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= WEIGHT_TOL, f"2-process weights differ from 1-process by {diff:.3g}"
