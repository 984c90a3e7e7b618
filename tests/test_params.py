"""params.yaml validation: both profiles load; bad values fail naming the key, before any output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from poststate.params import ParamsError, load_section, resolve_all, write_resolved

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["params.yaml", "profiles/paper.yaml", "rehearsal"])
def test_profiles_validate(name, tmp_path):
    if name == "rehearsal":  # profiles/rehearsal.yaml is an overlay on the paper profile
        from poststate.rehearsal import params

        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(), sort_keys=False))
    resolved = resolve_all(ROOT / name if name != "rehearsal" else tmp_path / "params.yaml")
    assert {"prepare", "base", "sft-mild", "sft-stress", "teacher", "opd-stress", "opd-mild", "opd-teacher_states", "rl", "eval", "report"} <= set(resolved)


def test_paper_profile_states_the_paper_settings():
    stress = load_section("sft", "stress", ROOT / "profiles/paper.yaml")
    assert (stress.epochs, stress.lr, stress.adapter.kind, stress.adapter.r, stress.adapter.alpha) == (5, 5e-4, "lora", 64, 128)
    base = load_section("base", None, ROOT / "profiles/paper.yaml")
    assert base.hub.name == "Qwen/Qwen3-0.6B-Base"
    ev = load_section("eval", None, ROOT / "profiles/paper.yaml").harness
    assert (ev.gsm8k_fewshot, ev.gsm8k_max_new_tokens, ev.truthfulqa_preamble, ev.mmlu_style) == (5, 256, "harness", "letter")


def test_variants_inherit_and_override():
    mild, stress = load_section("sft", "mild"), load_section("sft", "stress")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["sft"]
    assert mild.lr == raw["lr"] and mild.batch_size == stress.batch_size == raw["batch_size"]
    assert stress.epochs == raw["stress"]["epochs"]
    with pytest.raises(ParamsError, match="unknown variant sft@'wild'"):
        load_section("sft", "wild")


@pytest.mark.parametrize(
    "edit,named",
    [
        (lambda r: r["sft"].update(lr_typo=1e-3), r"sft\.mild\(merged\)\.lr_typo = 0\.001: Extra inputs"),
        (lambda r: r["sft"]["stress"].update(lr=-0.1), r"sft\.stress\(merged\)\.lr = -0\.1"),
        (lambda r: r["rl"].update(group_size="eight"), r"rl\.group_size = 'eight'"),
        (lambda r: r["opd"].update(signal="telepathy"), r"opd\.stress\(merged\)\.signal = 'telepathy'"),
        (lambda r: r.update(seeds=[0, 0]), r"seeds = \[0, 0\]: duplicate"),
        (lambda r: r.update(sedes=[0]), r"unknown top-level key\(s\) \['sedes'\]"),
        (lambda r: r["base"]["pretrain"].update(adapter={"kind": "lora"}), r"pretraining trains every weight"),
        (lambda r: r["rl"].update(grad_accum=2), r"rl\.grad_accum = 2: Extra inputs"),  # a step is the draw: no accumulation knob
        (lambda r: r["rl"].update(loss_agg="tokens"), r"rl\.loss_agg = 'tokens'"),
        (lambda r: r["rl"].update(engine={"kind": "sglang"}), r"rl\.engine\.kind = 'sglang'"),
        (lambda r: r["opd"].update(gen_batch_size=0), r"opd\.stress\(merged\)\.gen_batch_size = 0"),
        (lambda r: r["prepare"].update(source="hub", hub={**yaml.safe_load((ROOT / "profiles/paper.yaml").read_text())["prepare"]["hub"],
                                                          "local_dir": "../shared/data"}),
         r"local copies must live in data/hub/"),
    ],
)
def test_bad_params_name_key_and_value(tmp_path, edit, named):
    with pytest.raises(ParamsError, match=named):
        resolve_all(write(tmp_path, edit))


def test_resolve_stage_fails_before_writing(tmp_path):
    """The resolve stage exits non-zero naming the key and leaves resolved/ exactly as it was."""
    for f in ("params.yaml",):
        shutil.copy(ROOT / f, tmp_path / f)
    good = resolve_all(tmp_path / "params.yaml")
    write_resolved(good, tmp_path / "resolved")
    before = {p.name: p.read_bytes() for p in (tmp_path / "resolved").iterdir()}
    write(tmp_path, lambda r: r["sft"].update(lr=-1.0))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/resolve.py")], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "sft.mild(merged).lr = -1.0" in proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "resolved").iterdir()} == before


def test_resolved_files_change_only_where_effective_params_change(tmp_path):
    a = resolve_all(write(tmp_path, lambda r: None))
    b = resolve_all(write(tmp_path, lambda r: r["sft"].update(lr=3e-4)))
    changed = {k for k in a if json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True)}
    assert changed == {"sft-mild"}  # stress overrides lr, so its effective params are unchanged
