"""On-policy distillation: states from the student's own rollouts, signal from a frozen teacher.

The paper's form (opd.signal=continuation): the student samples a rollout, K cut points are drawn in it,
from each prefix the teacher writes an L-token continuation, and the student is trained with
cross-entropy on the teacher's tokens. Variants: `stress` (the degraded teacher artifact), `mild` (the
mild SFT run as teacher), `teacher_states` (the same teacher and loss on the *teacher's* states: the
teacher-state control). Validity gate: the student's CE on the teacher's continuations from held-out
states of the kind it trained on, before and after (`poststate.gates`). On a CPU the seeds train side by
side, one process each (`poststate.pool`).

    python stages/opd.py stress --teacher models/teacher     # writes models/opd_stress/s<seed>/
"""

from pathlib import Path
from statistics import fmean
from types import SimpleNamespace

import typer

from poststate import gates
from poststate.loop import make_accelerator, shard_of
from poststate.methods import opd_method
from poststate.modeling import load_model, load_tokenizer, resolve_dtype, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.pool import map_tasks, workers_for
from poststate.runs import DATA, learner_engine, read_jsonl, run_dir, save_run, seed_everything, train_logged, write_compute, write_gate

RUN = SimpleNamespace()  # what every seed shares, set before the seed processes fork


def train_seed(seed: int) -> str:
    p, acc, tok, run, who = RUN.p, RUN.acc, RUN.tok, RUN.name, RUN.who
    seed_everything(seed)
    dtype = resolve_dtype(p.dtype, acc.device)
    teacher_dir = RUN.teacher / f"s{seed}"
    teacher = load_model(teacher_dir, merge=True, dtype=dtype, device=acc.device).eval().requires_grad_(False)
    student = with_adapter(load_model(run_dir("base", None), dtype=dtype, device=acc.device), p.adapter)
    # the held-out states of the kind it trains on, drawn once - from the initial student (= the base), or the
    # teacher for the control - and scored before and after: an exactly paired per-prompt difference
    stream, n = ("gate", run, seed), len(RUN.heldout)
    held = gates.opd_states(student, tok, RUN.heldout, teacher, p, who, p.gate_samples, stream)
    before = gates.opd_ce(student, tok, held, n, p.max_len)
    method = opd_method(run, RUN.rows, tok, teacher, p, seed, shard_of(acc),
                        engine=learner_engine(p, tok) if who == "learner" else None)
    result, timing = train_logged(run, seed, student, method, p, p.steps, pad_id=tok.pad_token_id, accelerator=acc,
                                  progress=RUN.workers == 1)
    after = gates.opd_ce(student, tok, held, n, p.max_len)
    items = [f"prompts_heldout/{i}" for i in range(n)]
    objectives = {"heldout_teacher_ce": {"better": "lower", "items": items, "before": before, "after": after}}
    if who == "learner":  # secondary: the trained student's own states now (common random numbers with `held`)
        own = gates.opd_ce(student, tok, gates.opd_states(student, tok, RUN.heldout, teacher, p, who, p.gate_samples, stream),
                           n, p.max_len)
        objectives["heldout_teacher_ce_own_states"] = {"better": "lower", "items": items, "before": before, "after": own}
    if acc.is_main_process:
        write_gate(run, seed, gates.record(objectives, primary="heldout_teacher_ce"))
        write_compute(run, seed, result, student, kind="opd")
        save_run(student, tok, run_dir(run, seed), kind=run, params=p.model_dump(mode="json"),
                 seed=seed, parents={"base": run_dir("base", None), "teacher": teacher_dir},
                 data={"prompts": DATA / "gsm8k/prompts.jsonl"}, result=result,
                 extra={"states": {"source": method.source.origin, "signal": p.signal, "count": result.states}})
    acc.wait_for_everyone()
    return f"  seed {seed}: {timing}, loss {result.last['loss']:.4f}; held-out teacher CE {fmean(before):.4f} -> {fmean(after):.4f}"


def main(
    variant: str = typer.Argument(..., help="opd variant: stress | mild | teacher_states"),
    teacher: Path = typer.Option(..., help="teacher run directory (holds s<seed>/ subdirectories)"),
) -> None:
    p = load_section("opd", variant)
    run_seeds = seeds(read_params())
    acc = make_accelerator()
    RUN.__dict__.update(p=p, name=f"opd_{variant}", acc=acc, tok=load_tokenizer(run_dir("base", None)), teacher=teacher,
                        who="learner" if p.states == "student" else "teacher",
                        rows=read_jsonl(DATA / "gsm8k/prompts.jsonl"), heldout=read_jsonl(DATA / "gsm8k/prompts_heldout.jsonl"),
                        workers=workers_for(len(run_seeds), acc.device, acc.num_processes))
    echo = typer.echo if acc.is_main_process else (lambda *_: None)
    echo(f"opd@{variant}: {p.steps} steps x {p.prompts_per_step} prompts, {p.states} states; {len(run_seeds)} seeds, {RUN.workers} at a time")
    for line in map_tasks(train_seed, run_seeds, RUN.workers):
        echo(line)


if __name__ == "__main__":
    typer.run(main)
