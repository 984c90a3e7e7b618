"""The base model every post-training run starts from.

tiny  (base.source=pretrain): train a digit-splitting byte-level BPE tokenizer on the corpus and pretrain a
      small Qwen3ForCausalLM with the same loop as post-training: (corpus states, gold tokens).
paper (base.source=hub):      resolve Qwen/Qwen3-0.6B-Base at a pinned revision and save it here.

    python stages/base.py               # writes models/base/
"""

import typer

from poststate.methods import CorpusStates, GoldTokens, Method
from poststate.modeling import tiny_qwen3, train_tokenizer, trainable_parameters
from poststate.params import load_section
from poststate.runs import DATA, run_dir, save_run, seed_everything, train_logged


def from_hub(p) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(p.hub.name, revision=p.hub.revision)
    tok = AutoTokenizer.from_pretrained(p.hub.name, revision=p.hub.revision)
    save_run(model, tok, run_dir("base", None), kind="base", params=p.model_dump(mode="json"), seed=p.seed,
             parents={}, data={}, extra={"hub": {"name": p.hub.name, "revision": p.hub.revision}})


def pretrain(p) -> None:
    seed_everything(p.seed)
    docs = (DATA / "corpus.txt").read_text().split("\n\n")
    tok = train_tokenizer(docs, p.model.vocab_size)
    ids = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    model = tiny_qwen3(p.model, tok, p.seed)
    n_train, n_total = trainable_parameters(model)
    typer.echo(f"corpus {len(docs)} docs, {len(ids)} tokens; vocab {len(tok)}; model {n_total / 1e6:.2f}M params")
    method = Method("pretrain", CorpusStates(ids, p.pretrain.seq_len, p.pretrain.batch_size, p.seed), GoldTokens(tok, p.pretrain.seq_len))
    result, timing = train_logged("base", p.seed, model, method, p.pretrain, p.pretrain.steps)
    model.eval()
    save_run(model, tok, run_dir("base", None), kind="base", params=p.model_dump(mode="json"), seed=p.seed,
             parents={}, data={"corpus": DATA / "corpus.txt"}, result=result,
             extra={"corpus_tokens": len(ids), "parameters": n_total})
    typer.echo(f"pretrained {result.steps} steps in {timing}, final loss {result.last['loss']:.3f}")


def main() -> None:
    p = load_section("base")
    from_hub(p) if p.source == "hub" else pretrain(p)


if __name__ == "__main__":
    typer.run(main)
