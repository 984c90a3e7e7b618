"""Every model a stage runs is on the trained model's device: the teacher, the RL reference (the policy
itself with its adapter disabled), the sampling copy, the gates' and the eval's models.

On this CPU-only machine no second device exists, so the test checks what would break on a GPU: every
model a stage loads is loaded with the stage's device passed explicitly (the accelerator's, or the
eval's), and models that score the same inputs refuse to run on different devices (a clear error instead
of a device-mismatch deep inside a matmul; checked with a model on the `meta` device).
"""

import json
from pathlib import Path

import pytest
import torch

from poststate import diagnostics, objective
from poststate.modeling import with_adapter
from poststate.params import Adapter
from tests.conftest import build_tiny_model, load_stage
from tests.test_distributed import _workspace



@pytest.fixture
def workspace(tmp_path, monkeypatch):
    ws = _workspace(tmp_path)
    import yaml

    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["opd"].update(steps=1, prompts_per_step=2, gen_batch_size=4, rollout={"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0},
                         continuation={"cuts": 1, "cut_rule": "uniform", "length": 4, "temperature": 0.0})
    params["rl"].update(steps=1)
    params["sft"]["epochs"] = 0.5
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(ws)
    return ws


def _record_loads(module, monkeypatch) -> list:
    calls = []
    real = module.load_model

    def load(path, *args, **kwargs):
        calls.append((str(path), kwargs.get("device")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, "load_model", load)
    return calls


def test_training_stages_load_every_model_on_the_accelerator_device(workspace, monkeypatch):
    devices = []
    for name, args in (("sft", ["mild"]), ("sft", ["stress"]), ("rl", []), ("opd", ["stress"])):
        module = load_stage(name)
        calls = _record_loads(module, monkeypatch)
        real_acc = module.make_accelerator

        def acc_factory(real_acc=real_acc):
            acc = real_acc()
            devices.append(acc.device)
            return acc

        monkeypatch.setattr(module, "make_accelerator", acc_factory)
        monkeypatch.setattr(module, "workers_for", lambda *a, **k: 1)  # in this process, where the loads are recorded
        if name == "opd":
            load_stage("teacher").main()
            module.main(*args, teacher=Path("models/teacher"))
        else:
            module.main(*args)
        assert calls, f"{name} loaded no model"
        assert all(dev is not None and torch.device(dev) == devices[-1] for _, dev in calls), (name, calls, devices[-1])
        if name == "opd":
            assert any(path.startswith("models/teacher") for path, _ in calls)  # the teacher, explicitly placed


def test_eval_loads_the_base_and_every_seed_on_one_device(workspace, monkeypatch):
    module = load_stage("eval")
    import poststate.modeling as modeling

    calls = []
    real = modeling.load_model
    monkeypatch.setattr(modeling, "load_model", lambda path, *a, **k: calls.append(k.get("device")) or real(path, *a, **k))
    load_stage("sft").main("mild")
    (workspace / "data/prepared/gsm8k/test.jsonl").write_text((workspace / "data/prepared/gsm8k/sft.jsonl").read_text())
    import poststate.evaluation as evaluation  # the benchmarks are not what this test is about: stub them

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: ({"gsm8k_strict": 0.0, "truthfulqa_mc1": 0.0, "mmlu_acc": 0.0}, {}))
    import yaml

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["eval"]["drift"].update(prompts=4, cuts=1, permutations=99, locality_states=4, rollout={"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0})
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    module.main("base", same_as=None)
    module.main("sft_mild", same_as=None)
    assert len(calls) >= 3 and all(d is not None for d in calls) and len({str(d) for d in calls}) == 1
    assert json.loads(Path("evals/sft_mild/s0/drift.json").read_text())["kl_base_tuned"]["mean"] >= 0


def test_models_on_different_devices_refuse_to_score_together(tiny_tokenizer):
    lm = with_adapter(build_tiny_model(tiny_tokenizer), Adapter(kind="lora", r=2, alpha=4))
    with torch.device("meta"):
        teacher = build_tiny_model(tiny_tokenizer)
    micro = objective.Micro(ids_BT=torch.tensor([[1, 2, 3]]), attn_BT=torch.ones(1, 3, dtype=torch.long),
                            pos_N=torch.tensor([0, 1]), target_N=torch.tensor([2, 3]), row_N=torch.tensor([0, 0]))
    obj = objective.StateObjective(lm, objective.LossConfig(kind="distribution"))
    with pytest.raises(ValueError, match="the teacher is on meta"):
        obj(micro, teacher)
    with pytest.raises(ValueError, match="the tuned model is on meta"):
        diagnostics.forward_kl(build_tiny_model(tiny_tokenizer), teacher.eval(), [[1, 2, 3]], [1], 4)

