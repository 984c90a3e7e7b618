"""What every training stage does around the loop: fixed paths, seeds, DVCLive curves, saving a run
with its lineage atomically."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poststate.artifacts import atomic_dir, atomic_write_json, lineage, read_jsonl, save_tokenizer, write_jsonl  # noqa: F401 (re-exported for stages)

if TYPE_CHECKING:
    from poststate.loop import TrainResult

DATA = Path("data/prepared")
MODELS = Path("models")
TRAIN_LOGS = Path("metrics/train")
TIMINGS = Path("timings")  # wall-clock figures: untracked (gitignored), never a DVC out
WORK = Path(".work")  # transient engine files (vLLM's served adapters): untracked


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


def train_logged(run: str, seed: int, lm, method, optim, steps: int, *, pad_id: int, accelerator,
                 progress: bool = True) -> tuple[TrainResult, str]:
    """`loop.train` with DVCLive curves of the science (loss, lr, rewards, ...) in the tracked
    `metrics/train/<run>/s<seed>/`, and the wall-clock figures (seconds per step, generation seconds,
    tokens per second) in the untracked `timings/<run>/s<seed>.json`: the same params give the same
    tracked bytes, so a rerun leaves git and dvc.lock as they were. Logs on the main process only."""
    from poststate.loop import train

    main = accelerator.is_main_process
    step_seconds: list[float] = []

    def log(step: int, metrics: dict[str, float], seconds: float) -> None:
        log_step(logger, step, metrics)
        step_seconds.append(round(seconds, 4))

    with live(run, seed) if main else contextlib.nullcontext() as logger:
        result = train(lm, method, optim, steps, pad_id=pad_id, accelerator=accelerator, log=log, progress=progress)
    if main:
        share = result.gen_seconds / result.seconds if result.seconds > 0 else 0.0
        atomic_write_json(TIMINGS / run / f"s{seed}.json", {
            "train_seconds": round(result.seconds, 2),
            "generation_seconds": round(result.gen_seconds, 2),
            "generation_share": round(share, 4),
            "tokens_per_second": round(result.tokens / result.seconds, 1) if result.seconds > 0 else None,
            "step_seconds": step_seconds,
            "processes": accelerator.num_processes,
        })
    timing = f"{result.seconds:.0f}s" + (f" ({result.gen_seconds / result.seconds:.0%} generating)" if result.gen_seconds else "")
    return result, timing


def learner_engine(p, tokenizer):
    """The engine that samples a learner's rollouts (params `<section>.engine`: hf | vllm); vLLM serves the
    base the learner started from and keeps its per-sync adapters in the untracked `.work/vllm/`."""
    from poststate.rollout import make_engine

    lora_rank = p.adapter.r if p.adapter.kind == "lora" else None
    return make_engine(p.engine, run_dir("base", None), tokenizer, p.gen_batch_size, lora_rank=lora_rank, work_dir=WORK / "vllm")


def write_compute(run: str, seed: int, result: TrainResult, model, kind: str) -> None:
    """Compute accounting (counts, deterministic): optimizer steps, training states, tokens forwarded in
    training, tokens sampled (rollouts, teacher continuations), parameters (all / trainable). The report
    turns them into FLOPs."""
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    atomic_write_json(TRAIN_LOGS / run / f"s{seed}" / "compute.json", {
        "kind": kind, "steps": result.steps, "states": result.states, "train_tokens": result.tokens,
        "generated_tokens": result.generated_tokens, "parameters": n_total, "trainable_parameters": n_train,
    })


def write_gate(run: str, seed: int, gate: dict[str, Any]) -> None:
    """The run's validity gate (poststate.gates.record) beside its training curves."""
    atomic_write_json(TRAIN_LOGS / run / f"s{seed}" / "gate.json", gate)


def _canonical_adapter_config(path: Path) -> None:
    """peft writes `target_modules` from a set, in an order that depends on the process's string hash
    seed: sort it (peft reads it back as a set), so the same adapter has the same bytes in every run.
    When the base came from the Hub, the config names it by repo id and commit sha (it then loads with
    `AutoPeftModelForCausalLM.from_pretrained` from any working directory); a local base stays the
    repository-relative `models/base` (`modeling.base_reference` resolves it from any directory)."""
    if not path.exists():
        return
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    base_lineage = MODELS / "base" / "lineage.json"
    hub = json.loads(base_lineage.read_text()).get("hub") if base_lineage.exists() else None
    if config.get("base_model_name_or_path") == run_dir("base", None).as_posix() and hub and hub.get("source") == "hub":
        config["base_model_name_or_path"], config["revision"] = hub["name"], hub["sha"]
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
        save_tokenizer(tokenizer, tmp)  # without the load-time keys (HF_HUB_OFFLINE) transformers writes back
        info: dict[str, Any] = dict(extra or {})
        if result is not None:
            info["training"] = {
                "steps": result.steps,
                "states": result.states,
                "tokens": result.tokens,
            }
            write_jsonl(tmp / "train_states.jsonl", result.sample)
        atomic_write_json(tmp / "lineage.json", lineage(kind=kind, params=params, seed=seed, parents=parents, data=data, extra=info))
