"""A stage's independent tasks side by side on a CPU: one forked process per task, one torch thread each.

The tasks are a stage's seeds (and, for RL, its "before" gate, measured once for every seed). A tiny
model's matrix products are too small to keep two threads busy (an SFT step of the tiny base: 0.29 s on 1
thread, 0.19 s on 2; a 16-row generation step: no faster on 2), so on a CPU each task runs in its own
process on one thread and the cores serve the tasks instead of splitting each product. Every task's
computation is self-contained (its own random streams, its own outputs), so what it produces does not
depend on which process ran it or on how many ran at once; one thread or two give the same bits for these
models (checked: a training step's weights and sampled tokens, 1 vs 2 threads).

Not used (tasks run in order, in this process) on a GPU, under several data-parallel processes, or for a
single task. Processes are forked after the stage has loaded its inputs but before torch has run
anything, so nothing is imported twice.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

A = TypeVar("A")
T = TypeVar("T")


def workers_for(n_tasks: int, device, num_processes: int = 1) -> int:
    """How many processes for a stage's independent tasks (its seeds, and for RL its "before" gate): one per
    task on a CPU (up to twice the core count: the tasks differ in length, and a core left idle by a short
    one is taken by the others), else 1."""
    import torch

    if n_tasks < 2 or num_processes > 1 or torch.device(device).type != "cpu":
        return 1
    return min(n_tasks, max(2, 2 * (os.cpu_count() or 1)))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def map_tasks(fn: Callable[[A], T], tasks: Sequence[A], workers: int) -> list[T]:
    """[fn(task) for task in tasks], in `workers` forked processes of one torch thread each when
    workers > 1 (results in task order; a failing task fails the call with its exception)."""
    if workers <= 1:
        return [fn(t) for t in tasks]
    with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread, maxtasksperchild=1) as pool:
        return pool.map(fn, list(tasks), chunksize=1)
