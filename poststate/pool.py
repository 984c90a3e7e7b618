"""Training seeds side by side on a CPU: one forked process per seed, one torch thread each.

A tiny model's matrix products are too small to keep two threads busy (an SFT step of the tiny base:
0.29 s on 1 thread, 0.19 s on 2; a 16-row generation step: no faster on 2), so on a CPU with several seeds
each seed runs in its own process on one thread and the cores serve the seeds instead of splitting each
product. Every seed's computation is self-contained (its own random streams, its own outputs), so what a
seed produces does not depend on which process ran it or on how many ran at once; one thread or two give
the same bits for these models (checked: a training step's weights and sampled tokens, 1 vs 2 threads).

Not used (seeds run in order, in this process) on a GPU, under several data-parallel processes, or for
a single seed. Processes are forked after the stage has loaded its inputs but before torch has run
anything, so nothing is imported twice.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

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


def map_seeds(fn: Callable[[int], T], seeds: Sequence[int], workers: int) -> list[T]:
    """[fn(seed) for seed in seeds], in `workers` forked processes of one torch thread each when
    workers > 1 (results in seed order; a failing seed fails the call with its exception)."""
    if workers <= 1:
        return [fn(s) for s in seeds]
    with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread, maxtasksperchild=1) as pool:
        return pool.map(fn, list(seeds), chunksize=1)
