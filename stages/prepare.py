"""Prepare the benchmark data (and, for the tiny profile, the pretraining corpus).

tiny  (prepare.source=synthetic): generate the seeded synthetic world in the Hub schemas.
paper (prepare.source=hub):       load openai/gsm8k, truthfulqa/truthful_qa, cais/mmlu at pinned
                                  revisions from the Hub, or from prepare.hub.local_dir.

    python stages/prepare.py            # writes data/prepared/
"""

import random
from pathlib import Path

import typer

from poststate.artifacts import atomic_dir, atomic_write_json, file_sha256
from poststate.params import HubData, load_section
from poststate.runs import DATA, write_jsonl


def write_hub(p: HubData, seed: int, out: Path) -> dict:
    from poststate.benchmarks import load_rows_with_source, select_mmlu, validate_rows

    local = Path(p.local_dir) if p.local_dir else None
    sources = {}
    for key, file in (("gsm8k_train", "gsm8k/train.jsonl"), ("gsm8k_test", "gsm8k/test.jsonl"),
                      ("truthfulqa", "truthfulqa/multiple_choice.jsonl"), ("mmlu_dev", "mmlu/dev.jsonl"), ("mmlu_test", "mmlu/test.jsonl")):
        sources[key] = load_rows_with_source(getattr(p, key), local, file)
    (train, _), (test, _), (tqa, _), (dev, _), (mmlu, _) = sources.values()
    for rows, schema, where in [(train, "gsm8k", "gsm8k train"), (test, "gsm8k", "gsm8k test"),
                                (tqa, "truthfulqa_mc", "truthfulqa"), (dev, "mmlu", "mmlu dev"), (mmlu, "mmlu", "mmlu test")]:
        validate_rows(rows, schema, where)
    # GSM8K train in a seeded order: the OPD/RL prompt set, its held-out prompts and the held-out SFT rows
    # (the validity gates' items), then SFT gets the rest. Few-shot pool = all of train, as in the harness
    # (its shots come from the train split).
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    cuts = [0, p.prompts_size, p.prompts_size + p.prompts_heldout_size,
            p.prompts_size + p.prompts_heldout_size + p.sft_heldout_size]
    prompts, prompts_heldout, sft_heldout = ([train[i] for i in order[a:b]] for a, b in zip(cuts, cuts[1:]))
    sft = [train[i] for i in order[cuts[-1] :]][: p.sft_size]
    splits = {
        "gsm8k/sft.jsonl": sft,
        "gsm8k/sft_heldout.jsonl": sft_heldout,
        "gsm8k/prompts.jsonl": prompts,
        "gsm8k/prompts_heldout.jsonl": prompts_heldout,
        "gsm8k/fewshot.jsonl": train,
        "gsm8k/test.jsonl": test[: p.gsm8k_test_limit],
        "truthfulqa/mc.jsonl": tqa[: p.truthfulqa_limit],
        "mmlu/dev.jsonl": select_mmlu(dev, p.mmlu_subjects, None),
        "mmlu/test.jsonl": select_mmlu(mmlu, p.mmlu_subjects, p.mmlu_per_subject),
    }
    for name, rows in splits.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / name, rows)
    (out / "corpus.txt").write_text("")  # the pretraining corpus: none, the base comes from the Hub
    return {"source": "hub", "datasets": p.model_dump(mode="json"), "resolved": {k: src for k, (_, src) in sources.items()}}


def write_synthetic(p, out: Path) -> dict:
    from poststate.world import generate_world, write_world

    world = generate_world(p)
    write_world(world, out)
    return {"source": "synthetic", "world": p.model_dump(mode="json")}


def main() -> None:
    p = load_section("prepare")
    with atomic_dir(DATA) as tmp:
        info = write_synthetic(p.world, tmp) if p.source == "synthetic" else write_hub(p.hub, p.seed, tmp)
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        info["files"] = {
            f.relative_to(tmp).as_posix(): {"sha256": file_sha256(f), "rows": sum(1 for _ in open(f)) if f.suffix == ".jsonl" else None}
            for f in files
        }
        atomic_write_json(tmp / "manifest.json", info)
    typer.echo("\n".join(f"{k}: {v['rows']} rows" for k, v in info["files"].items() if v["rows"] is not None))


if __name__ == "__main__":
    typer.run(main)
