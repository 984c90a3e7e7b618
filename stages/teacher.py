"""The degraded teacher: a named, versioned artifact made from one SFT run (teacher.source; the paper
uses the stress run), per seed.

The teacher is stored as its source's model files, as they are: a LoRA adapter stays an adapter (its
consumers merge it when they load it: `load_model(..., merge=True)`), a fully fine-tuned model stays that
model. No fp32 merged copy per seed (2.4 GB each for Qwen3-0.6B), no torch: the files are copied, with a
lineage record naming the source.

    python stages/teacher.py            # writes models/teacher/s<seed>/
"""

import shutil

import typer

from poststate.artifacts import atomic_dir, atomic_write_json, lineage
from poststate.params import load_section, read_params, seeds
from poststate.runs import model_files, run_dir


def main() -> None:
    p = load_section("teacher")
    for seed in seeds(read_params()):
        src, out = run_dir(f"sft_{p.source}", seed), run_dir("teacher", seed)
        if not (src / "config.json").exists() and not (src / "adapter_config.json").exists():
            raise FileNotFoundError(f"{src}: no config.json or adapter_config.json - not a model directory")
        record = dict(kind="teacher", params=p.model_dump(mode="json"), seed=seed, parents={f"sft_{p.source}": src}, data={})
        with atomic_dir(out) as tmp:
            for f in model_files(src):
                shutil.copy2(f, tmp / f.name)
            atomic_write_json(tmp / "lineage.json", lineage(**record))
        kind = "LoRA adapter" if (src / "adapter_config.json").exists() else "full model"
        typer.echo(f"teacher s{seed} <- {src} ({kind}: files copied)")


if __name__ == "__main__":
    typer.run(main)
