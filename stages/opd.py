"""On-policy distillation: states from the student's own rollouts, signal from a frozen teacher.

The paper's form (opd.signal=continuation): the student samples a rollout, K cut points are drawn in it,
from each prefix the teacher writes an L-token continuation, and the student is trained with
cross-entropy on the teacher's tokens. Variants: `stress` (the degraded teacher artifact), `mild` (the
mild SFT run as teacher), `seqkd` (the same teacher and loss on the *teacher's* states - the control).

    python stages/opd.py stress --teacher models/teacher     # writes models/opd_stress/s<seed>/
"""

from pathlib import Path

import typer

from poststate.methods import opd_method
from poststate.modeling import load_model, load_tokenizer, with_adapter
from poststate.params import load_section, read_params, seeds
from poststate.runs import DATA, read_jsonl, run_dir, save_run, seed_everything, train_logged


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
        result, timing = train_logged(f"opd_{variant}", seed, student, method, p, p.steps)
        save_run(student, tok, run_dir(f"opd_{variant}", seed), kind=f"opd_{variant}", params=p.model_dump(mode="json"),
                 seed=seed, parents={"base": run_dir("base", None), "teacher": teacher_dir},
                 data={"prompts": DATA / "gsm8k/prompts.jsonl"}, result=result,
                 extra={"states": {"source": method.source.origin, "signal": p.signal, "count": result.states}})
        typer.echo(f"  seed {seed}: {timing}, loss {result.last['loss']:.4f}")


if __name__ == "__main__":
    typer.run(main)
