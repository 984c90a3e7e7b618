"""The base model every post-training run starts from.

tiny  (base.source=pretrain): train a digit-splitting byte-level BPE tokenizer on the corpus and pretrain a
      small Qwen3ForCausalLM with the same loop as post-training: (corpus states, gold tokens).
paper (base.source=hub):      Qwen/Qwen3-0.6B-Base at a pinned revision (resolved to its commit sha), or a
      local directory holding a saved model (base.hub.name: path), validated first; saved here.

    python stages/base.py               # writes models/base/
"""

import typer

from poststate.hub import BaseUnavailable, resolve
from poststate.params import load_section
from poststate.runs import DATA, TRAIN_LOGS, atomic_write_json, run_dir, save_run, seed_everything, train_logged, write_compute


def from_hub(p) -> None:
    """Save the base (a Hub model at its revision, resolved to a commit sha, or a local directory) as the
    models/base artifact, in its own dtype ("auto": Qwen3-0.6B-Base's bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(p.hub.name, p.hub.revision)  # fails within seconds, naming base.hub.name
    at = {"revision": source["sha"]} if source["source"] == "hub" else {}
    model = AutoModelForCausalLM.from_pretrained(p.hub.name, dtype="auto", **at)
    tok = AutoTokenizer.from_pretrained(p.hub.name, **at)
    save_run(model, tok, run_dir("base", None), kind="base", params=p.model_dump(mode="json"), seed=p.seed,
             parents={}, data={}, extra={"hub": source})
    atomic_write_json(TRAIN_LOGS / "base" / "source.json", source)  # no training curves: where the base came from
    typer.echo(f"base <- {p.hub.name} ({source['source']}" + (f", commit {source['sha']})" if source["sha"] else ")"))


def pretrain(p) -> None:
    from poststate.loop import make_accelerator, shard_of
    from poststate.methods import CorpusStates, GoldTokens, Method
    from poststate.modeling import tiny_qwen3, train_tokenizer, trainable_parameters

    acc = make_accelerator()
    seed_everything(p.seed)
    docs = (DATA / "corpus.txt").read_text().split("\n\n")
    tok = train_tokenizer(docs, p.model.vocab_size)
    ids = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    model = tiny_qwen3(p.model, tok, p.seed).to(acc.device)
    n_train, n_total = trainable_parameters(model)
    echo = typer.echo if acc.is_main_process else (lambda *_: None)
    echo(f"corpus {len(docs)} docs, {len(ids)} tokens; vocab {len(tok)}; model {n_total / 1e6:.2f}M params")
    rows_per_step = p.pretrain.batch_size * p.pretrain.grad_accum
    method = Method("pretrain", CorpusStates(ids, p.pretrain.seq_len, rows_per_step, p.seed, shard_of(acc)), GoldTokens())
    result, timing = train_logged("base", p.seed, model, method, p.pretrain, p.pretrain.steps, pad_id=tok.pad_token_id, accelerator=acc)
    model.eval()
    if acc.is_main_process:
        write_compute("base", p.seed, result, model, kind="pretrain")
        save_run(model, tok, run_dir("base", None), kind="base", params=p.model_dump(mode="json"), seed=p.seed,
                 parents={}, data={"corpus": DATA / "corpus.txt"}, result=result,
                 extra={"corpus_tokens": len(ids), "parameters": n_total})
    acc.wait_for_everyone()
    echo(f"pretrained {result.steps} steps in {timing}, final loss {result.last['loss']:.3f}")


def main() -> None:
    p = load_section("base")
    try:
        from_hub(p) if p.source == "hub" else pretrain(p)
    except BaseUnavailable as e:  # torch and transformers are imported only after the base is found
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None


if __name__ == "__main__":
    typer.run(main)
