"""The degraded teacher: a named, versioned artifact made from one SFT run (teacher.source; the paper
uses the stress run), with its LoRA adapter merged for fast inference.

    python stages/teacher.py            # writes models/teacher/s<seed>/

A source without an adapter (the tiny profile's full fine-tuning) is already a merged model: its files
are copied as they are (the bytes `save_pretrained` would write again), without loading torch.
"""

import shutil

import typer

from poststate.artifacts import atomic_dir, atomic_write_json, lineage
from poststate.params import load_section, read_params, seeds
from poststate.runs import model_files, run_dir, save_run


def main() -> None:
    p = load_section("teacher")
    for seed in seeds(read_params()):
        src, out = run_dir(f"sft_{p.source}", seed), run_dir("teacher", seed)
        record = dict(kind="teacher", params=p.model_dump(mode="json"), seed=seed, parents={f"sft_{p.source}": src}, data={})
        if (src / "adapter_config.json").exists():
            from poststate.modeling import load_model, load_tokenizer  # torch and peft: only to merge an adapter

            save_run(load_model(src), load_tokenizer(src), out, **record, merge=True)
            how = "adapter merged"
        else:
            if not (src / "config.json").exists():
                raise FileNotFoundError(f"{src}: no config.json or adapter_config.json - not a model directory")
            with atomic_dir(out) as tmp:
                for f in model_files(src):
                    shutil.copy2(f, tmp / f.name)
                atomic_write_json(tmp / "lineage.json", lineage(**record))
            how = "no adapter: files copied"
        typer.echo(f"teacher s{seed} <- {src} ({how})")


if __name__ == "__main__":
    typer.run(main)
