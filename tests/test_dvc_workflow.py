"""The DVC workflow a user sees: a fresh clone reproduces without touching git, and the preview
`python stages/resolve.py --dry -S ...` names exactly the stages `dvc exp run -S ...` then runs.

DVC cannot give that preview itself: `dvc status` and `dvc exp run --dry` run no command, so they compare
resolved/*.json as it is (not as `resolve` would rewrite it) and name `resolve` alone after a params change.
The slow tests share one setup: the tiny DAG at test_pipeline's size, reproduced and committed (the
published repo), then `git clone`d and reproduced there with the published repo's DVC cache (a fresh clone
with a DVC remote: the stages whose outputs are all cached are restored from the run cache, the others
run again).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from poststate.params import ParamsError, resolve_all, write_resolved
from tests.conftest import load_stage

ROOT = Path(__file__).resolve().parents[1]
SET = "sft.lr=3e-4"  # sft@mild inherits lr, sft@stress overrides it
RESOLVE = load_stage("resolve")  # stages/resolve.py, its functions called in-process


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`cmd` in `cwd` with this venv's dvc, importing `cwd`'s own poststate (not the editable install's)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert not check or proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def ran(dvc_stdout: str) -> set[str]:
    """Stages DVC ran, or restored from its run cache (a stage it ran before with the same inputs)."""
    return {line.split("'")[1] for line in dvc_stdout.splitlines()
            if line.startswith("Running stage") or (line.startswith("Stage '") and " is cached - skipping run" in line)}


def previewed(stdout: str) -> set[str]:
    return {line.split()[0] for line in stdout.splitlines() if line.startswith("  ")}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, published_repo) -> dict:
    base = tmp_path_factory.mktemp("dvc_workflow")  # (published_repo skips where git is missing)
    published, clone = published_repo, base / "clone"
    run(["git", "clone", "-q", str(published), str(clone)], base)
    for key, value in (("user.email", "t@t"), ("user.name", "t")):  # dvc exp run commits to refs/exps
        run(["git", "config", key, value], clone)
    run(["dvc", "config", "--local", "cache.dir", str(published / ".dvc/cache")], clone)
    out = {"repro": run(["dvc", "repro"], clone).stdout}
    out["porcelain"] = run(["git", "status", "--porcelain", "--untracked-files=all"], clone).stdout
    before = {p.name: p.read_bytes() for p in (clone / "resolved").iterdir()}
    out["preview_clean"] = run([sys.executable, "stages/resolve.py", "--dry"], clone).stdout
    out["preview"] = run([sys.executable, "stages/resolve.py", "--dry", "-S", SET], clone).stdout
    out["preview_wrote"] = run(["git", "status", "--porcelain"], clone).stdout != out["porcelain"] or before != {
        p.name: p.read_bytes() for p in (clone / "resolved").iterdir()}
    out["dry"] = run(["dvc", "exp", "run", "--dry", "--allow-missing", "-S", SET], clone, check=False)  # its test checks the exit
    out["dry_wrote"] = run(["git", "status", "--porcelain"], clone).stdout != out["porcelain"]
    out["exp"] = run(["dvc", "exp", "run", "-S", SET], clone).stdout
    return out


@pytest.mark.slow
def test_a_fresh_clone_reproduces_without_modifying_git(workflow):
    """Tracked outputs hold no wall-clock figure: the same params give the same bytes and dvc.lock."""
    assert workflow["porcelain"] == "", f"dvc repro in a fresh clone changed git:\n{workflow['porcelain']}"


@pytest.mark.slow
def test_the_preview_names_exactly_the_stages_dvc_exp_run_runs(workflow):
    assert "every stage is up to date" in workflow["preview_clean"], workflow["preview_clean"]
    preview, exp = previewed(workflow["preview"]), ran(workflow["exp"])
    assert "sft@mild" in preview and "sft@stress" not in preview, workflow["preview"]
    assert preview == exp, f"preview:\n{workflow['preview']}\ndvc exp run ran {sorted(exp)}"
    assert "resolved/sft-mild.json: lr " in workflow["preview"] and " -> 0.0003" in workflow["preview"]
    assert not workflow["preview_wrote"], "stages/resolve.py --dry wrote to the workspace"


@pytest.mark.slow
def test_dvc_exp_run_dry_exits_0_and_names_nothing_the_preview_does_not(workflow):
    """`--allow-missing`: a dry experiment runs in a git checkout without DVC's outputs. What it names is
    a subset of the preview (it runs no command, so it cannot see past `resolve`)."""
    dry = workflow["dry"]
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert ran(dry.stdout) and ran(dry.stdout) <= previewed(workflow["preview"]), dry.stdout
    assert not workflow["dry_wrote"]


def test_overrides_apply_as_dvc_exp_run_applies_them_and_leave_params_yaml_alone(tmp_path):
    resolve = RESOLVE
    before = (ROOT / "params.yaml").read_bytes()
    base = resolve_all(ROOT / "params.yaml")
    moved = resolve_all(resolve.overridden_params([SET], tmp_path, ROOT / "params.yaml"))
    assert moved["sft-mild"]["lr"] == 3e-4 and moved["sft-stress"] == base["sft-stress"]
    assert {k for k in base if base[k] != moved[k]} == {"sft-mild"}
    assert (ROOT / "params.yaml").read_bytes() == before
    with pytest.raises(ParamsError, match="sft.no_such_key"):
        resolve.overridden_params(["sft.no_such_key=1"], tmp_path, ROOT / "params.yaml")
    with pytest.raises(ParamsError, match="only params.yaml"):
        resolve.overridden_params(["other.yaml:x=1"], tmp_path, ROOT / "params.yaml")


def test_param_changes_names_the_stages_whose_resolved_file_moves_with_the_diff(tmp_path):
    resolve = RESOLVE
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    old = write_resolved(resolve_all(ROOT / "params.yaml"), tmp_path / "resolved")
    new_params = resolve.overridden_params([SET], tmp_path, ROOT / "params.yaml")
    new = write_resolved(resolve_all(new_params), dry_run=True)
    md5 = {key: hashlib.md5(text.encode()).hexdigest() for key, text in old.items()}
    lock = {"stages": {
        "resolve": {"params": {"params.yaml": {"sft": raw["sft"], "seeds": raw["seeds"]}}},
        "sft@mild": {"deps": [{"path": "stages/sft.py", "md5": "0"}, {"path": "resolved/sft-mild.json", "md5": md5["sft-mild"]}]},
        "sft@stress": {"deps": [{"path": "resolved/sft-stress.json", "md5": md5["sft-stress"]}]},
        "gone": {"deps": [{"path": "resolved/no-such.json", "md5": "0"}]},
    }}
    got = resolve.param_changes(new, yaml.safe_load(new_params.read_text()), lock, root=tmp_path)
    assert got == {"resolve": "params.yaml: sft",
                   "sft@mild": f"resolved/sft-mild.json: lr {raw['sft']['lr']} -> 0.0003",
                   "gone": "resolved/no-such.json: no such section or variant in params.yaml"}
    (tmp_path / "resolved/sft-mild.json").write_text("{}\n")  # not what dvc.lock recorded: no diff to show
    assert resolve.param_changes(new, raw, lock, root=tmp_path)["sft@mild"] == "resolved/sft-mild.json: effective params changed"
    assert resolve.param_changes(old, raw, lock, root=tmp_path) == {"gone": "resolved/no-such.json: no such section or variant in params.yaml"}


def test_other_changes_keeps_code_and_uncached_data_and_leaves_params_and_checkouts_out():
    status = {
        "resolve": [{"changed deps": {"params.yaml": {"sft": "modified"}}}],
        "sft@mild": [{"changed deps": {"resolved/sft-mild.json": "modified", "stages/sft.py": "modified"}}],
        "sft@stress": [{"changed deps": {"resolved/sft-stress.json": "modified", "models/base": "deleted"}}],
        "base": [{"changed deps": {"data/prepared/corpus.txt": "deleted"}}, {"changed outs": {"models/base": "deleted"}}],
        "rl": [{"changed outs": {"models/rl": "not in cache", "metrics/train/rl": "modified"}}, "always changed"],
        "report": [{"changed deps": {"params.yaml": {"report.rules": "new"}}}],
    }
    cached = {"data/prepared", "models/base", "models/rl"}  # metrics/train/rl is a cache: false out
    assert RESOLVE.other_changes(status, cached) == {
        "sft@mild": "stages/sft.py modified",
        "rl": "models/rl not in cache; metrics/train/rl modified; always changed",
        "report": "params.yaml: report.rules new",
    }


def test_plan_runs_everything_downstream_of_a_change_but_not_of_resolve():
    edges = [("prepare", "resolve"), ("base", "resolve"), ("base", "prepare"), ("sft@mild", "resolve"), ("sft@mild", "base"),
             ("sft@stress", "resolve"), ("sft@stress", "base"), ("eval@sft_mild", "sft@mild"), ("eval@sft_stress", "sft@stress"),
             ("report", "eval@sft_mild"), ("report", "eval@sft_stress"), ("report", "resolve")]
    order = ["resolve", "prepare", "base", "sft@mild", "sft@stress", "eval@sft_mild", "eval@sft_stress", "report"]
    plan = RESOLVE.plan(edges, order, {"sft@mild": "lr", "resolve": "params.yaml: sft"})
    assert plan == [("resolve", "params.yaml: sft"), ("sft@mild", "lr"), ("eval@sft_mild", "after sft@mild"),
                    ("report", "after eval@sft_mild")]
    assert RESOLVE.plan(edges, order, {}) == []
    assert [s for s, _ in RESOLVE.plan(edges, order, {"base": "code"})] == order[2:]


def test_write_resolved_dry_run_writes_nothing_and_a_run_leaves_only_current_sections(tmp_path):
    resolved = resolve_all(ROOT / "params.yaml")
    texts = write_resolved(resolved, tmp_path / "resolved", dry_run=True)
    assert not (tmp_path / "resolved").exists()
    assert texts["sft-mild"] == json.dumps(resolved["sft-mild"], indent=2, sort_keys=True) + "\n"
    (tmp_path / "resolved").mkdir()
    (tmp_path / "resolved/opd-retired.json").write_text("{}\n")
    assert write_resolved(resolved, tmp_path / "resolved") == texts
    assert {p.name: p.read_text() for p in (tmp_path / "resolved").iterdir()} == {f"{k}.json": t for k, t in texts.items()}


def test_set_param_without_dry_is_refused_before_writing(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run([sys.executable, str(ROOT / "stages/resolve.py"), "-S", SET], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "only with --dry" in proc.stderr, proc.stderr
    assert not (tmp_path / "resolved").exists()
