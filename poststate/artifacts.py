"""Atomic outputs, content hashes and `lineage.json`.

Every output is built under a temporary sibling and renamed into place, so a killed stage never leaves a
half-written model or metrics file that looks complete, and a failing stage leaves the previous output
untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import poststate
from poststate.trace import trace

CODE_ROOTS = ("poststate", "stages")


def atomic_write_text(path: Path, text: str) -> None:
    trace("write", path=Path(path).as_posix())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file; a bad line fails naming the file and its 1-based line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}): {line[:120]!r}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final` in one rename.

    On an exception the temporary directory is removed and `final` (if any) is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trace("write", path=final.as_posix())
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over (relative path, file sha256) of every file under `root`, in sorted order."""
    root = Path(root)
    if root.is_file():
        return file_sha256(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in exclude and "__pycache__" not in p.parts:
            h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def code_revision(repo_root: Path | None = None) -> str:
    """Content hash of the library and stage sources: the same code gives the same id on any checkout,
    in a `dvc exp` temp dir too (a git sha would change bytes of otherwise identical models). The sources
    are those of the installed package (the repository holding `poststate/`), not of the working directory,
    so a stage run from anywhere records the code that ran."""
    repo_root = Path(poststate.__file__).resolve().parents[1] if repo_root is None else repo_root
    h = hashlib.sha256()
    for name in CODE_ROOTS:
        d = repo_root / name
        if d.exists():
            h.update(f"{name}:{tree_sha256(d)}\n".encode())
    return h.hexdigest()


def lineage(
    *,
    kind: str,
    params: dict[str, Any],
    seed: int | None,
    parents: dict[str, Path] | None = None,
    data: dict[str, Path] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What produced an artifact: its parents and data by content hash, the resolved params, the seed and
    the code. Written as `lineage.json` beside the weights."""
    return {
        "kind": kind,
        "poststate_version": poststate.__version__,
        "code_sha256": code_revision(),
        "seed": seed,
        "params": params,
        "parents": {k: {"path": p.as_posix(), "sha256": tree_sha256(p, exclude=())} for k, p in (parents or {}).items()},
        "data": {k: {"path": p.as_posix(), "sha256": tree_sha256(p)} for k, p in (data or {}).items()},
        **(extra or {}),
    }


# Keys `from_pretrained` records in a tokenizer's init kwargs about how it was loaded, not what it is;
# `save_pretrained` writes them back to tokenizer_config.json. `local_files_only` is True whenever
# HF_HUB_OFFLINE is set, `is_local` tells a Hub download from a directory: left in, they make the same
# tokenizer's bytes (and every model's DVC hash) depend on the environment it was loaded in.
TOKENIZER_LOAD_KEYS = ("local_files_only", "is_local", "cache_dir", "force_download", "proxies", "token",
                       "revision", "subfolder", "trust_remote_code", "_commit_hash", "_from_auto")


def save_tokenizer(tokenizer, out: Path) -> None:
    """`tokenizer.save_pretrained(out)`, then tokenizer_config.json rewritten without TOKENIZER_LOAD_KEYS
    (in transformers' own layout: indent 2, sorted keys, a final newline). The same tokenizer gives the same
    bytes whatever the environment (HF_HUB_OFFLINE, HF_HOME, the working directory) and wherever it was
    loaded from; it reloads the same, as `from_pretrained` sets those keys afresh on every load."""
    out = Path(out)
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in TOKENIZER_LOAD_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
