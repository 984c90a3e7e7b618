"""Benchmark: wall-clock seconds of every stage of `dvc repro`, and the total.

    python perf/dag_time.py            # dvc repro -f: rerun every stage (the DAG from nothing, cache aside)
    python perf/dag_time.py --no-force # only what is out of date

Streams DVC's output as it runs, then prints one line per stage (from one "Running stage" line to the
next) and the total. This is how the tiny DAG's time in the README was measured. It reruns the
pipeline in this workspace, exactly as `dvc repro -f` does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import typer


def main(force: bool = typer.Option(True, help="dvc repro -f (every stage) or plain dvc repro")) -> None:
    cmd = ["dvc", "repro"] + (["-f"] if force else [])
    marks: list[tuple[float, str]] = []
    start = time.monotonic()
    # dvc and the stages' `python` from this interpreter's environment, activated or not
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if m := re.search(r"Running stage '([^']+)'", line):
                marks.append((time.monotonic(), m.group(1)))
    end = time.monotonic()
    if proc.returncode != 0:
        raise typer.Exit(proc.returncode)
    print("\nstage                 seconds")
    for (t, name), (t_next, _) in zip(marks, marks[1:] + [(end, "")]):
        print(f"{name:20s} {t_next - t:8.0f}")
    print(f"{'TOTAL':20s} {end - start:8.0f}   ({(end - start) / 60:.1f} min, {len(marks)} stages run)")


if __name__ == "__main__":
    typer.run(main)
