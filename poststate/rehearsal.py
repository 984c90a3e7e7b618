"""The paper profile's scale rehearsal on a CPU: its own dvc.yaml stages through `dvc repro`, end to end.

    python -m poststate.rehearsal /tmp/rehearsal            # build the workspace and run dvc repro there
    python -m poststate.rehearsal /tmp/rehearsal --no-run   # only build it

The workspace is a copy of this repository's files (no results), with params.yaml = profiles/paper.yaml
merged with profiles/rehearsal.yaml (fewer steps and items), the real benchmark rows linked into data/hub
from a local copy in the Hub schemas (default ../shared/data), and as the base a random-init Qwen3 with
Qwen3's real tokenizer and vocabulary (151,936) at the reduced shape SHAPE. Every paper-profile code path
runs: the Hub-schema loaders, the base from a local directory, 5-shot GSM8K with the harness's shots,
letter-scored 5-shot MMLU, the TruthfulQA preamble, LoRA SFT, the LoRA teacher merged at load, OPD and its
teacher-state control, RL, the evals, drift and the report. The numbers it produces mean nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 32, "intermediate_size": 128}
DATASETS = ("gsm8k", "truthfulqa", "mmlu")
SKIP = ("metrics/", "evals/", "models/", "timings/", "data/prepared")


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def params() -> dict:
    """profiles/paper.yaml with profiles/rehearsal.yaml's overrides."""
    paper = yaml.safe_load((ROOT / "profiles/paper.yaml").read_text())
    return merge(paper, yaml.safe_load((ROOT / "profiles/rehearsal.yaml").read_text()))


def build(dest: Path, data: Path) -> Path:
    """A fresh rehearsal workspace at `dest` (a git repository, so that DVC runs as in a clone)."""
    from poststate.qwen_tokenizer import save_random_qwen3

    missing = [d for d in DATASETS if not (data / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"{data}: no {', '.join(missing)} (a local copy in the Hub schemas, like ../shared/data)")
    if dest.exists():
        raise FileExistsError(f"{dest} exists: the rehearsal builds a fresh workspace")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in listed.stdout.split():
        if (ROOT / rel).is_file() and not rel.startswith(SKIP) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(params(), sort_keys=False))
    for d in DATASETS:  # the local copies are prepare's declared input (dvc.yaml: data/hub)
        shutil.copytree(data / d, dest / "data/hub" / d)
    save_random_qwen3(dest / "rehearsal_base", seed=0, **SHAPE)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=rehearsal@poststate", "-c", "user.name=rehearsal", "commit", "-qm", "rehearsal"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def repro(dest: Path) -> subprocess.CompletedProcess:
    """`dvc repro` in the workspace with this interpreter's environment (its dvc and python)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["dvc", "repro"], cwd=dest, env=env, capture_output=True, text=True)


def main(
    dest: Path = typer.Argument(..., help="a new directory for the rehearsal workspace"),
    data: Path = typer.Option(ROOT.parent / "shared" / "data", help="local copies of the benchmarks in the Hub schemas"),
    run: bool = typer.Option(True, help="run dvc repro after building"),
) -> None:
    build(dest, data)
    typer.echo(f"rehearsal workspace: {dest}")
    if run:
        proc = repro(dest)
        typer.echo(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise typer.Exit(proc.returncode)


if __name__ == "__main__":
    typer.run(main)
