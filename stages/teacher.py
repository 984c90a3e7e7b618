"""The degraded teacher: a named, versioned artifact made from one SFT run (teacher.source; the paper
uses the stress run), with its LoRA adapter merged for fast inference.

    python stages/teacher.py            # writes models/teacher/s<seed>/
"""

import typer

from poststate.modeling import load_model, load_tokenizer
from poststate.params import load_section, read_params, seeds
from poststate.runs import run_dir, save_run


def main() -> None:
    p = load_section("teacher")
    for seed in seeds(read_params()):
        src = run_dir(f"sft_{p.source}", seed)
        model, tok = load_model(src), load_tokenizer(src)
        save_run(model, tok, run_dir("teacher", seed), kind="teacher", params=p.model_dump(mode="json"), seed=seed,
                 parents={f"sft_{p.source}": src}, data={}, merge=True)
        typer.echo(f"teacher s{seed} <- {src} (merged)")


if __name__ == "__main__":
    typer.run(main)
