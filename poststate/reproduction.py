"""CI reproduction check: after `dvc repro` from nothing, compare every metrics file with the committed
one (git HEAD) and fail when a metric moved beyond tolerance or `dvc status` is not clean.

    python -m poststate.reproduction          # exit 1 with the diff when the science changed

Tolerances (stated here and in the README): accuracy-type metrics (values in [0, 1] with a `_n` or
`_stderr` sibling) may move by ABS_TOL; every other number by REL_TOL relative (floor FLOOR). On the same
machine the pipeline is byte-deterministic, so any move means the code or its environment changed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ABS_TOL = 0.01
REL_TOL = 0.10
FLOOR = 1e-4
METRICS = Path("metrics")


def _flat(obj, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    elif isinstance(obj, (int, float)):
        out[prefix[:-1]] = float(obj)
    return out


def compare(committed: dict[str, float], now: dict[str, float]) -> list[str]:
    """Lines naming each metric that appeared, vanished or moved beyond tolerance."""
    bad = []
    for key in sorted(set(committed) | set(now)):
        if key not in now or key not in committed:
            bad.append(f"{key}: {'missing now' if key not in now else 'new'}")
            continue
        a, b = committed[key], now[key]
        if math.isnan(a) and math.isnan(b):
            continue
        leaf = key.rsplit(".", 1)[-1]
        is_acc = 0 <= a <= 1 and not leaf.startswith(("mmd", "kl", "train_state"))
        tol = ABS_TOL if is_acc else max(REL_TOL * abs(a), FLOOR)
        if not abs(a - b) <= tol:
            bad.append(f"{key}: {a:.6g} -> {b:.6g} (tolerance {tol:.3g})")
    return bad


def main() -> int:
    failures = []
    files = sorted(p for p in METRICS.rglob("*.json") if "train" not in p.parts)
    for path in files:
        shown = subprocess.run(["git", "show", f"HEAD:{path.as_posix()}"], capture_output=True, text=True)
        if shown.returncode != 0:
            failures.append(f"{path}: not committed")
            continue
        for line in compare(_flat(json.loads(shown.stdout)), _flat(json.loads(path.read_text()))):
            failures.append(f"{path}: {line}")
    status = subprocess.run(["dvc", "status", "--quiet"], capture_output=True, text=True)
    if status.returncode != 0:
        failures.append("dvc status is not clean:\n" + status.stdout + status.stderr)
    print(subprocess.run(["dvc", "metrics", "diff", "HEAD", "--all"], capture_output=True, text=True).stdout[:20000])
    if failures:
        print(f"REPRODUCTION CHECK FAILED ({len(failures)}):\n" + "\n".join(failures))
        return 1
    print(f"reproduction check passed: {len(files)} metrics files match the committed ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
