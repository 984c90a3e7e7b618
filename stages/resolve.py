"""Validate params.yaml as a whole and write each stage's effective params to resolved/<stage>.json.

Every later stage depends on its own resolved file, so DVC reruns exactly the stages whose effective
params changed: `dvc exp run -S sft.lr=3e-4` reruns sft@mild (which inherits `lr`) but not sft@stress
(which overrides it). A bad params file fails here, naming the key and value, before anything runs.

    python stages/resolve.py                         # the stage, as `dvc repro` runs it
    python stages/resolve.py --dry -S sft.lr=3e-4    # which stages `dvc exp run -S sft.lr=3e-4` would run

`--dry` is the preview DVC cannot give for this design. `dvc status`, `dvc repro --dry` and `dvc exp run
--dry` run no command, so they compare resolved/*.json as it is, not as this stage would rewrite it: after
a params edit they name `resolve` alone. And a dry run names only the stages whose own deps changed, never
the stages after them (`dvc exp run --dry` also needs `--allow-missing`: it runs in a git checkout without
DVC's outputs). `--dry` applies the `-S` overrides to a temporary copy of params.yaml with DVC's own code
(the syntax and semantics of `dvc exp run -S`), resolves it, compares each would-be resolved file with the
hash dvc.lock records, adds the stages `dvc status` finds changed for other reasons (code, data, an output
the DVC cache lacks: `dvc exp run` first checks out the outputs the cache holds), and prints them and every
stage downstream of them, in DVC's order, each with why. It writes nothing.

A listed stage is one DVC runs, or restores from its run cache where it ran it before with the same inputs
("is cached - skipping run"). What the preview cannot know: a downstream stage is listed because a stage
before it reruns, and DVC skips it if that rerun reproduces its outputs byte for byte. The DAG is
dvc.yaml's with the workspace's params: an override of a value dvc.yaml interpolates (`teacher.source`)
moves edges that the preview does not redraw.
"""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import typer

from poststate.params import PARAMS_FILE, ParamsError, resolve_all, write_resolved

RESOLVE = "resolve"  # this stage's name in dvc.yaml


def overridden_params(overrides: list[str], dest: Path, path: Path = PARAMS_FILE) -> Path:
    """A copy of `path` in `dest` with `dvc exp run -S` overrides applied by DVC (`sft.lr=3e-4`, `+x=1`, `~x`)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    by_file = to_path_overrides(overrides)
    if set(by_file) - {path.name}:
        raise ParamsError(f"-S {overrides}: only {path.name} can be overridden, not {sorted(set(by_file) - {path.name})}")
    copy = dest / path.name
    shutil.copyfile(path, copy)
    if by_file:
        try:
            apply_overrides(copy, by_file[path.name])
        except InvalidArgumentError as e:
            raise ParamsError(f"-S {overrides}: {e}: {e.__cause__}") from None
    return copy


def _flat(obj, prefix: str = "") -> dict[str, object]:
    if not isinstance(obj, dict):
        return {prefix: obj}
    return {k: v for key, sub in obj.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}


def param_changes(texts: dict[str, str], raw: dict, lock: dict, root: Path = Path(".")) -> dict[str, str]:
    """Stages whose params, as dvc.lock records them, would change -> why. `texts`: the would-be resolved
    files (write_resolved's texts); `raw`: the would-be params.yaml as DVC reads it; `lock`: dvc.lock."""
    stages = lock.get("stages", {})
    out: dict[str, str] = {}
    recorded = stages.get(RESOLVE, {}).get("params", {}).get(PARAMS_FILE.name, {})
    moved = [key for key in recorded if raw.get(key) != recorded[key]]
    if moved:
        out[RESOLVE] = f"{PARAMS_FILE.name}: {', '.join(moved)}"
    for name, entry in stages.items():
        for dep in entry.get("deps", []):
            path = Path(dep["path"])
            if path.parent.name != "resolved":
                continue
            text = texts.get(path.stem)
            if text is None:
                out[name] = f"{path}: no such section or variant in {PARAMS_FILE.name}"
            elif hashlib.md5(text.encode()).hexdigest() != dep.get("md5"):
                on_disk = root / path
                old = on_disk.read_text() if on_disk.is_file() else None
                if old is None or hashlib.md5(old.encode()).hexdigest() != dep.get("md5"):
                    out[name] = f"{path}: effective params changed"
                    continue
                before, after = _flat(json.loads(old)), _flat(json.loads(text))
                diff = [f"{k} {before.get(k, '-')} -> {after.get(k, '-')}" for k in sorted(set(before) | set(after))
                        if before.get(k, "-") != after.get(k, "-")]
                out[name] = f"{path}: {', '.join(diff)}"
    return out


def other_changes(status: dict, cached_outs: set[str]) -> dict[str, str]:
    """Stages `dvc status` finds changed for reasons --dry does not recompute (code, data, an output the DVC
    cache lacks, a stage not in dvc.lock) -> why. Left out: a modified params.yaml value or resolved/*.json
    (param_changes), and a DVC-cached output or a dep inside one that is only missing or modified in the
    workspace: `dvc exp run` first checks out every output the cache holds ("not in cache" is kept)."""

    def restored(path: str) -> bool:
        return any(p == Path(path) or p in Path(path).parents for p in map(Path, cached_outs))

    out: dict[str, str] = {}
    for name, entries in status.items():
        why: list[str] = []
        for entry in entries:
            if isinstance(entry, str):
                why.append(entry)
                continue
            for kind, paths in entry.items():
                for path, state in paths.items():
                    if isinstance(state, dict):  # a params file: {key: modified | new | deleted}
                        state = {k: v for k, v in state.items() if not (path == PARAMS_FILE.name and v == "modified")}
                        why += [f"{path}: {k} {v}" for k, v in state.items()]
                    elif kind == "changed deps" and Path(path).parent.name == "resolved" and state == "modified":
                        continue
                    elif state != "not in cache" and restored(path):
                        continue
                    else:
                        why.append(f"{path} {state}")
        if why:
            out[name] = "; ".join(why)
    return out


def plan(edges: list[tuple[str, str]], order: list[str], first: dict[str, str]) -> list[tuple[str, str]]:
    """(stage, why) for every stage that reruns, in `order` (upstream first): those in `first`, and every
    stage downstream of one of them. `edges` are DVC's (stage, a stage it depends on). resolve's downstream
    is not closed over: it is exactly the stages whose resolved file changes, already in `first`."""
    rerun = dict(first)
    for name in order:
        upstream = [u for s, u in edges if s == name and u in rerun and u != RESOLVE]
        if name not in rerun and upstream:
            rerun[name] = "after " + ", ".join(sorted(upstream, key=order.index))
    return [(name, rerun[name]) for name in order if name in rerun]


def preview(overrides: list[str]) -> list[tuple[str, str]]:
    """(stage, why) for what `dvc exp run -S <overrides>` would run (from the repo root); writes nothing."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.utils.serialize import load_yaml

    with tempfile.TemporaryDirectory() as tmp:
        params = overridden_params(overrides, Path(tmp))
        try:
            texts = write_resolved(resolve_all(params), dry_run=True)
        except ParamsError as e:
            raise ParamsError(str(e).replace(str(params), f"{PARAMS_FILE} with -S {overrides}")) from None
        raw = load_yaml(params)
    lock = load_yaml("dvc.lock") if Path("dvc.lock").exists() else {}
    with Repo(".") as repo:
        graph = repo.index.graph
        edges = [(a.addressing, b.addressing) for a, b in graph.edges]
        order = [s.addressing for s in nx.dfs_postorder_nodes(graph)]  # dvc repro's order (reproduce.plan_repro)
        cached = {out.def_path for stage in repo.index.stages for out in stage.outs if out.use_cache}
        first = other_changes(repo.status(), cached)
        for name, why in param_changes(texts, raw, lock).items():
            first[name] = f"{first[name]}; {why}" if name in first else why
    return plan(edges, order, first)


def main(
    dry: bool = typer.Option(False, "--dry", help="Print the stages `dvc exp run` would run (with the -S overrides), and why; write nothing."),
    set_param: list[str] = typer.Option(None, "--set-param", "-S", help="With --dry: a `dvc exp run -S` override."),
) -> None:
    """Validate params.yaml and write resolved/<stage>.json; with --dry, print the stages that would rerun."""
    overrides = list(set_param or [])
    try:
        if dry:
            steps = preview(overrides)
        elif overrides:
            raise ParamsError(f"-S {overrides}: only with --dry (a run reads params.yaml: `dvc exp run -S` sets it)")
        else:
            resolved = resolve_all()
    except ParamsError as e:
        typer.echo(f"invalid params:\n{e}", err=True)
        raise typer.Exit(code=2) from None
    if not dry:
        write_resolved(resolved)
        typer.echo(f"resolved {len(resolved)} param sections -> resolved/")
        return
    given = f"{PARAMS_FILE}" + "".join(f" -S {o}" for o in overrides)
    if not steps:
        typer.echo(f"{given}: every stage is up to date, none would run")
        return
    typer.echo(f"{given}: {len(steps)} stage(s) would run")
    for name, why in steps:
        typer.echo(f"  {name:<20} {why}")


if __name__ == "__main__":
    typer.run(main)
