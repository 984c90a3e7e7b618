"""What every training stage does around the loop: fixed paths, seeds, DVCLive curves, saving a run
with its lineage atomically."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poststate.artifacts import atomic_dir, atomic_write_json, lineage, read_jsonl, write_jsonl  # noqa: F401 (re-exported for stages)

if TYPE_CHECKING:
    from poststate.loop import TrainResult

DATA = Path("data/prepared")
MODELS = Path("models")
TRAIN_LOGS = Path("metrics/train")


def seed_everything(seed: int) -> None:
    import torch  # here, not at the top: stages that train nothing (prepare, teacher, report) never load torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dir(run: str, seed: int | None) -> Path:
    return MODELS / run if seed is None else MODELS / run / f"s{seed}"


def model_files(path: Path) -> list[Path]:
    """The files of a saved model (weights, config, tokenizer), without the run's own record of how it
    was made (`lineage.json`, the sample of training states) that `save_run` writes beside them."""
    return sorted(f for f in Path(path).iterdir() if f.is_file() and f.name not in ("lineage.json", "train_states.jsonl"))


def live(run: str, seed: int):
    """DVCLive logger for one run and seed; `dvcyaml=False` so it never rewrites dvc.yaml (the curves
    are declared there as plots), no Studio, no git commits of its own."""
    from dvclive import Live

    return Live(
        dir=str(TRAIN_LOGS / run / f"s{seed}"),
        dvcyaml=False,
        save_dvc_exp=False,
        report=None,
        monitor_system=False,
    )


def log_step(logger, step: int, metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        logger.log_metric(key, value, plot=True)
    logger.next_step()


def train_logged(run: str, seed: int, model, method, optim, steps: int) -> tuple[TrainResult, str]:
    """`loop.train` with DVCLive curves in `metrics/train/<run>/s<seed>/`. Wall-clock figures (training
    seconds, seconds spent generating rollouts and teacher continuations, their share) go to that run's
    DVCLive summary (`metrics.json`), not into the model artifact: the same params give the same bytes."""
    from poststate.loop import train

    with live(run, seed) as logger:
        result = train(model, method, optim, steps, log=lambda s, m: log_step(logger, s, m))
        gen = getattr(method.source, "gen_seconds", 0.0) + getattr(method.signal, "gen_seconds", 0.0)
        logger.summary.update(
            train_seconds=round(result.seconds, 2),
            generation_seconds=round(gen, 2),
            generation_share=round(gen / result.seconds, 4) if result.seconds > 0 else 0.0,
        )
    timing = f"{result.seconds:.0f}s" + (f" ({gen / result.seconds:.0%} generating)" if gen else "")
    return result, timing


def _canonical_adapter_config(path: Path) -> None:
    """peft writes `target_modules` from a set, in an order that depends on the process's string hash
    seed: sort it (peft reads it back as a set), so the same adapter has the same bytes in every run."""
    if not path.exists():
        return
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))  # peft's own layout


def save_run(
    model,
    tokenizer,
    out: Path,
    *,
    kind: str,
    params: dict[str, Any],
    seed: int | None,
    parents: dict[str, Path],
    data: dict[str, Path],
    result: TrainResult | None = None,
    extra: dict[str, Any] | None = None,
    merge: bool = False,
) -> None:
    """Save a model dir that loads in one standard call (LoRA adapters stay adapters unless `merge`),
    its tokenizer, `lineage.json`, and the sample of training states, atomically."""
    with atomic_dir(out) as tmp:
        to_save = model.merge_and_unload() if merge and hasattr(model, "merge_and_unload") else model
        to_save.save_pretrained(tmp)
        _canonical_adapter_config(tmp / "adapter_config.json")
        tokenizer.save_pretrained(tmp)
        info: dict[str, Any] = dict(extra or {})
        if result is not None:
            info["training"] = {
                "steps": result.steps,
                "states": result.states,
                "tokens": result.tokens,
            }
            write_jsonl(tmp / "train_states.jsonl", result.sample)
        atomic_write_json(tmp / "lineage.json", lineage(kind=kind, params=params, seed=seed, parents=parents, data=data, extra=info))
