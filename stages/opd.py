"""On-policy distillation: states from the student's own rollouts, signal from a frozen teacher.

The paper's form (opd.signal=continuation): the student samples a rollout, K cut points are drawn in it,
from each prefix the teacher writes an L-token continuation, and the student is trained with
cross-entropy on the teacher's tokens. Variants: `stress` (the degraded teacher artifact), `mild` (the
mild SFT run as teacher), `seqkd` (the same teacher and loss on the *teacher's* states - the control).

    python stages/opd.py stress --teacher models/teacher     # writes models/opd_stress/s<seed>/
"""

from pathlib import Path

import typer

from poststate.loop import train
from poststate.methods import opd_method
from poststate.modeling import load_model, load_tokenizer, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.runs import DATA, live, log_step, read_jsonl, run_dir, save_run, seed_everything


def main(
    variant: str = typer.Argument(..., help="opd variant: stress | mild | seqkd"),
    teacher: Path = typer.Option(..., help="teacher run directory (holds s<seed>/ subdirectories)"),
) -> None:
    p = load_section("opd", variant)
    rows = read_jsonl(DATA / "gsm8k/prompts.jsonl")
    for seed in seeds(read_params()):
        seed_everything(seed)
        teacher_dir = teacher / f"s{seed}"
        tok = load_tokenizer(run_dir("base", None))
        teacher_model = load_model(teacher_dir, merge=True)
        teacher_model.eval().requires_grad_(False)
        student = with_adapter(load_model(run_dir("base", None)), p.adapter)
        method = opd_method(f"opd_{variant}", rows, tok, teacher_model, p, seed)
        with live(f"opd_{variant}", seed) as logger:
            result = train(student, method, p, p.steps, log=lambda s, m: log_step(logger, s, m))
        gen = method.source.gen_seconds + getattr(method.signal, "gen_seconds", 0.0)
        save_run(student, tok, run_dir(f"opd_{variant}", seed), kind=f"opd_{variant}", params=p.model_dump(mode="json"),
                 seed=seed, parents={"base": run_dir("base", None), "teacher": teacher_dir},
                 data={"prompts": DATA / "gsm8k/prompts.jsonl"}, result=result,
                 extra={"states": {"source": method.source.origin, "signal": p.signal, "count": result.states},
                        "generation_seconds": round(gen, 1)})
        typer.echo(f"  seed {seed}: {result.seconds:.0f}s ({gen / result.seconds:.0%} generating), loss {result.last['loss']:.4f}")


if __name__ == "__main__":
    typer.run(main)
