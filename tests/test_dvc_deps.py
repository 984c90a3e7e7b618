"""dvc.yaml declares every library module a stage runs: a change to any of them reruns the stage.

The modules a stage runs are found statically: every `poststate` import (top-level or inside a function) of
its script, followed transitively through the package. A module missing from a stage's deps would let
`dvc repro` keep an output that the current code would not produce.
"""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _module_path(name: str) -> Path:
    rel = Path(*name.split("."))
    return ROOT / (str(rel) + ".py") if (ROOT / (str(rel) + ".py")).exists() else ROOT / rel / "__init__.py"


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotation-only imports never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        # a relative import would be skipped below: none is allowed, so none is missed
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}:{node.lineno}: relative import"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "poststate":
            out.add(node.module)
            for alias in node.names:  # `from poststate import drift` imports a module
                if _module_path(f"{node.module}.{alias.name}").exists():
                    out.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "poststate"}
    return out


def closure(script: Path) -> set[str]:
    """Repository-relative paths of the poststate modules `script` runs (a package: its directory)."""
    seen, todo = set(), list(_imports(script))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [m for m in _imports(_module_path(name)) if m not in seen]
    paths = set()
    for name in seen - {"poststate"}:
        path = _module_path(name)
        paths.add((path.parent if path.name == "__init__.py" else path).relative_to(ROOT).as_posix())
    return paths


def test_every_stage_depends_on_the_modules_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = ROOT / body["cmd"].split()[1]
        assert closure(script), f"{name}: {script} imports no poststate module - the closure checks nothing"
        deps = {d if isinstance(d, str) else next(iter(d)) for d in body["deps"]}
        lacking = sorted(p for p in closure(script) if p not in deps and not any(p.startswith(d + "/") for d in deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml stages lack deps on modules they run: {missing}"
