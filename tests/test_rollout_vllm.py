"""VLLMRolloutEngine against a fake `vllm` (real vLLM needs CUDA and its own environment: docs/vllm.md).

The fake stands in for vLLM 0.33.0 as its source reads (the lines are cited in `poststate/rollout_vllm.py`):
`LLM.generate` runs a "model" one token at a time and ends each request as vLLM's scheduler and detokenizer
do (EOS or a stop token kept and left out of the text; a stop string matched in the text decoded with the
request's `skip_special_tokens`, tokens kept through the one that completes it, text cut before it;
`max_tokens`), with one sampled-token log-prob dict per output token. Its "model" is either a script (token
lists per prompt) or a tiny HF model run without a KV cache, whose weights the weight-transfer calls
overwrite by name and whose LoRA requests load the adapter directory, as vLLM's would. Unknown keyword
arguments to `LLM` or `SamplingParams` fail, so a misspelt vLLM option fails here too. What the fake cannot
show: that real vLLM behaves as its source reads.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from conftest import build_tiny_model, give_lora_weights

from poststate import rollout_vllm
from poststate.params import RolloutBackend
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.rollout_vllm import VLLMRolloutEngine, lora_rank_bound
from poststate.streams import stream_seed

PROMPTS = ["Question: Tom has", "A", "The following are multiple choice questions", "She sold 48 clips in April",
           "Q: What is", "Answer: Tom"]

# vLLM 0.33.0's SamplingParams fields (vllm/sampling_params.py) and the LLM/EngineArgs options this engine may pass
SAMPLING_FIELDS = {
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "watermarking", "top_p",
    "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "prompt_logprob_token_ids", "prompt_logprob_start", "logprob_token_ids", "flat_logprobs",
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "output_kind", "stream_interval", "skip_clone", "structured_outputs", "logit_bias", "allowed_token_ids",
    "extra_args", "bad_words", "skip_reading_prefix_cache", "thinking_token_budget", "repetition_detection",
    "routed_experts_prompt_start", "trace_decode_token_ids",
}
LLM_OPTIONS = {
    "model", "seed", "dtype", "gpu_memory_utilization", "enforce_eager", "logprobs_mode", "generation_config",
    "max_model_len", "max_num_seqs", "enable_lora", "max_lora_rank", "max_loras", "weight_transfer_config",
}


def script_logprob(j: int) -> float:
    return -(j + 1) / 8  # distinct per position: a misaligned log-prob shows


# --------------------------------------------------------------------------- the fake vllm


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class WeightVersionSpan:
    version: str
    start: int
    end: int


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    weight_versions: list[WeightVersionSpan] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: object = None


class FakeSamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"vllm.SamplingParams has no field(s) {sorted(unknown)}")
        self.temperature, self.top_p, self.top_k, self.max_tokens, self.seed = 1.0, 1.0, 0, 16, None
        self.stop, self.stop_token_ids, self.logprobs, self.detokenize = [], [], None, True
        self.skip_special_tokens, self.include_stop_str_in_output = True, False
        self.__dict__.update(kwargs)


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")


@dataclass
class WeightTransferConfig:
    backend: str = "nccl"


@dataclass
class IPCTrainerInitInfo:
    rank: int
    packed: bool = False
    backend = "ipc"


class ModuleSource:
    def __init__(self, module):
        self.module = module

    def iter_full(self):
        yield from self.module.named_parameters()


class FakeTrainerEngine:
    """vllm/distributed/weight_transfer/ipc_engine.py's trainer side, with tensors for IPC handles."""

    def __init__(self, init_info, client, source):
        self.client, self.source = client, source
        client.init_weight_transfer_engine({"packed": init_info.packed})

    def send_weights(self):
        self.client.start_weight_update()
        pairs = [(n, t.detach().clone()) for n, t in self.source.iter_full()]
        self.client.update_weights(
            {"names": [n for n, _ in pairs], "dtype_names": [str(t.dtype).split(".")[-1] for _, t in pairs],
             "shapes": [list(t.shape) for _, t in pairs], "tensors": [t for _, t in pairs]}
        )
        self.client.finish_weight_update()


class WeightTransferTrainerFactory:
    @classmethod
    def trainer_init(cls, init_info, *, client, source=None):
        assert init_info.backend == "ipc" and init_info.rank == 0
        return FakeTrainerEngine(init_info, client, source)


class ScriptedModel:
    """Emits `script[prompt]` token by token (then the last token forever), log-prob `script_logprob(j)`."""

    def __init__(self, script: dict[tuple[int, ...], list[int]]):
        self.script = script

    def stream(self, prompt, sp, lora_request):
        toks = self.script[tuple(prompt)]
        for j in range(10_000):
            yield toks[min(j, len(toks) - 1)], script_logprob(j)


class TinyHFModel:
    """A tiny HF model as vLLM's model: load_weights by name, LoRA adapters loaded from their directory."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()
        self.loaded: list[list[str]] = []  # names of each weight update
        self.adapters: dict[int, torch.nn.Module] = {}  # lora_int_id -> merged model (vLLM caches by id)

    def load_weights(self, names, tensors):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in zip(names, tensors):
                params[n].copy_(t)  # KeyError: a name vLLM's model would not know
        self.loaded.append(list(names))

    def _for(self, lora_request):
        if lora_request is None:
            return self.model
        if lora_request.lora_int_id not in self.adapters:
            from peft import PeftModel

            peft = PeftModel.from_pretrained(copy.deepcopy(self.model), lora_request.lora_path)
            self.adapters[lora_request.lora_int_id] = peft.merge_and_unload().eval()
        return self.adapters[lora_request.lora_int_id]

    @torch.no_grad()
    def stream(self, prompt, sp, lora_request):
        model = self._for(lora_request)
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
        ids = list(prompt)
        while True:
            logits_V = model(torch.tensor([ids])).logits[0, -1].float()
            if sp.temperature < 1e-5:  # greedy: the raw distribution
                logp_V = torch.log_softmax(logits_V, -1)
                tok = int(logp_V.argmax())
            else:  # processed: temperature, then top-p
                logits_V = logits_V / sp.temperature
                probs_sorted, order = torch.softmax(logits_V, -1).sort(descending=True)
                drop = (probs_sorted.cumsum(-1) - probs_sorted) >= sp.top_p
                logits_V[order[drop]] = float("-inf")
                logp_V = torch.log_softmax(logits_V, -1)
                tok = int(torch.multinomial(logp_V.exp(), 1, generator=gen))
            yield tok, float(logp_V[tok])
            ids.append(tok)


@dataclass
class FakeState:
    model: object = None
    tokenizer: object = None
    extra_stop_token_ids: tuple[int, ...] = ()  # what a generation_config.json adds (input_processor.py)
    llms: list = field(default_factory=list)


class FakeLLM:
    state: FakeState

    def __init__(self, model: str, **kwargs):
        unknown = set(kwargs) - LLM_OPTIONS
        if unknown:
            raise TypeError(f"vllm.LLM got unknown option(s) {sorted(unknown)}")
        self.path, self.kwargs = model, kwargs
        self.requests: list[tuple[list, list, object]] = []
        self.calls: list[tuple] = []  # weight-transfer and cache calls, in order
        self.weight_version = "default"
        self.model_config = types.SimpleNamespace(max_model_len=kwargs.get("max_model_len", 256))
        self.state.llms.append(self)

    def get_tokenizer(self):
        return self.state.tokenizer

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        if lora_request is not None and not self.kwargs.get("enable_lora"):
            raise ValueError("LoRA is not enabled")
        self.requests.append((prompts, sampling_params, lora_request))
        return [
            RequestOutput(str(i), None, list(p["prompt_token_ids"]), [self._complete(p["prompt_token_ids"], sp, lora_request)], True, lora_request)
            for i, (p, sp) in enumerate(zip(prompts, sampling_params))
        ]

    def _complete(self, prompt, sp, lora_request) -> CompletionOutput:
        tok = self.state.tokenizer
        ids, lps, finish, reason, text = [], [], None, None, ""
        for t, lp in self.state.model.stream(prompt, sp, lora_request):
            ids.append(t)
            lps.append({t: Logprob(lp, rank=1)})
            # engine core, v1/core/sched/utils.py:check_stop
            if t == tok.eos_token_id:
                finish = "stop"
            elif t in [*sp.stop_token_ids, *self.state.extra_stop_token_ids]:
                finish, reason = "stop", t
            elif len(ids) >= sp.max_tokens:
                finish = "length"
            # detokenizer, v1/engine/detokenizer.py:update (a stop-terminated last token is not rendered)
            if sp.detokenize:
                shown = ids[:-1] if finish == "stop" else ids
                text = tok.decode(shown, skip_special_tokens=sp.skip_special_tokens, clean_up_tokenization_spaces=False)
                hits = sorted((text.find(s) + len(s), k, s) for k, s in enumerate(sp.stop) if s in text)
                if hits and finish != "stop":
                    _, _, s = hits[0]
                    finish, reason, text = "stop", s, text[: text.find(s)]
            if finish:
                break
        spans = [WeightVersionSpan(self.weight_version, 0, len(ids))]
        return CompletionOutput(0, text, ids, sum(x[t].logprob for x, t in zip(lps, ids)), lps, finish, reason, spans)

    # entrypoints/rl/offline.py:RLOfflineMixin
    def _transfer(self):
        if self.kwargs.get("weight_transfer_config") is None:
            raise RuntimeError("weight transfer not configured")

    def init_weight_transfer_engine(self, request):
        self._transfer()
        self.calls.append(("init", request["init_info"]))

    def start_weight_update(self):
        self._transfer()
        self.calls.append(("start",))

    def update_weights(self, request):
        info = request["update_info"]
        self.calls.append(("update", list(info["names"])))
        self.state.model.load_weights(info["names"], info["tensors"])

    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish", weight_version))
        if weight_version is not None:
            self.weight_version = weight_version

    def update_weight_version(self, new_version):
        self.calls.append(("version", new_version))
        self.weight_version = new_version

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache",))
        return True


@pytest.fixture
def fake_vllm(monkeypatch, tiny_tokenizer):
    """Installs the fake as `vllm` (and the submodules the engine imports); yields its shared state."""
    state = FakeState(tokenizer=tiny_tokenizer)
    FakeLLM.state = state
    mods = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.config", "vllm.lora", "vllm.lora.request", "vllm.distributed", "vllm.distributed.weight_transfer",
        "vllm.distributed.weight_transfer.ipc_engine")}
    mods["vllm"].LLM, mods["vllm"].SamplingParams = FakeLLM, FakeSamplingParams
    mods["vllm.config"].WeightTransferConfig = WeightTransferConfig
    mods["vllm.lora.request"].LoRARequest = LoRARequest
    wt = mods["vllm.distributed.weight_transfer"]
    wt.ModuleSource, wt.WeightTransferTrainerFactory = ModuleSource, WeightTransferTrainerFactory
    mods["vllm.distributed.weight_transfer.ipc_engine"].IPCTrainerInitInfo = IPCTrainerInitInfo
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    return state


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run hundreds of forwards of a 20k-parameter model, which threads do not speed up; on this
    busy 2-core machine torch's two threads made the file take 230 s, one thread 4.7 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def backend(**kw) -> RolloutBackend:
    return RolloutBackend(kind="vllm", **kw)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- params, import, construction


def test_backend_params_default_to_hf_and_reject_bad_values_by_name():
    assert RolloutBackend().kind == "hf"
    for bad, key in ((dict(kind="vlm"), "kind"), (dict(sync="adapter"), "sync"), (dict(gpu_memory_utilization=1.2), "gpu_memory_utilization"),
                     (dict(max_model_len=0), "max_model_len"), (dict(dtype="fp8"), "dtype"), (dict(tensor_parallel=2), "tensor_parallel")):
        with pytest.raises(ValueError, match=key):
            RolloutBackend(**bad)


def test_missing_vllm_names_the_param_and_the_install(monkeypatch, tiny_tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"RolloutBackend.kind = 'vllm'.*requirements-vllm.txt"):
        VLLMRolloutEngine("models/base", tiny_tokenizer, backend())
    with pytest.raises(ValueError, match="kind = 'vllm'"):
        VLLMRolloutEngine("models/base", tiny_tokenizer, RolloutBackend(kind="hf"))


def test_llm_options_merged_and_lora(fake_vllm, tiny_tokenizer, tmp_path):
    import os

    VLLMRolloutEngine("models/base", tiny_tokenizer, backend(max_model_len=512, max_num_seqs=64), seed=3)
    kw = fake_vllm.llms[-1].kwargs
    assert fake_vllm.llms[-1].path == "models/base"
    assert kw["logprobs_mode"] == "processed_logprobs"  # the sampled distribution's log-probs
    assert kw["weight_transfer_config"].backend == "ipc" and "enable_lora" not in kw
    assert (kw["seed"], kw["max_model_len"], kw["max_num_seqs"], kw["gpu_memory_utilization"]) == (3, 512, 64, 0.5)
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    VLLMRolloutEngine("models/base", tiny_tokenizer, backend(sync="lora"), lora_rank=4, work_dir=tmp_path)
    kw = fake_vllm.llms[-1].kwargs
    assert (kw["enable_lora"], kw["max_lora_rank"], kw["max_loras"]) == (True, 8, 1)
    assert "weight_transfer_config" not in kw and "max_model_len" not in kw
    with pytest.raises(ValueError, match="lora_rank and work_dir"):
        VLLMRolloutEngine("models/base", tiny_tokenizer, backend(sync="lora"))
    fake_vllm.tokenizer = types.SimpleNamespace(eos_token_id=999)
    with pytest.raises(ValueError, match="eos id 999"):
        VLLMRolloutEngine("models/base", tiny_tokenizer, backend())


def test_lora_rank_bound_is_the_smallest_allowed_slot():
    assert [lora_rank_bound(r) for r in (1, 2, 8, 9, 64, 65, 512)] == [1, 8, 8, 16, 64, 128, 512]
    for r in (0, 513):
        with pytest.raises(ValueError):
            lora_rank_bound(r)


# --------------------------------------------------------------------------- request and output mapping


def test_request_mapping(fake_vllm, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = [enc(tok, p) for p in PROMPTS[:3]]
    fake_vllm.model = ScriptedModel({tuple(p): enc(tok, " has") for p in prompts})
    engine = VLLMRolloutEngine("m", tok, backend())
    engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, stop=("Question:", "#")), seed=11)
    sent, requests, lora = fake_vllm.llms[-1].requests[-1]
    assert sent == [{"prompt_token_ids": p} for p in prompts] and lora is None
    for i, sp in enumerate(requests):
        assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.max_tokens) == (0.7, 0.9, 0, 0.0, 5)
        assert sp.stop == ["Question:", "#"] and sp.include_stop_str_in_output is False
        assert sp.seed == stream_seed(11, i)  # one stream per request
        assert sp.logprobs == 0  # the sampled token's log-prob only
        assert sp.detokenize is True and sp.skip_special_tokens is False  # stop strings see special tokens
        assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty, sp.ignore_eos) == (1.0, 0.0, 0.0, False)
    engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0), seed=11)
    requests = fake_vllm.llms[-1].requests[-1][1]
    assert all(sp.temperature == 0.0 and sp.top_p == 1.0 and sp.stop == [] and sp.detokenize is False for sp in requests)
    for t in (0.005, 2.5):  # vLLM would sample at 0.01 / reject: refused by name
        with pytest.raises(ValueError, match="temperature"):
            engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=t), seed=0)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * 250], SamplingParams(max_new_tokens=7, temperature=0.0), seed=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([prompts[0], []], SamplingParams(max_new_tokens=5), seed=0)


def test_stop_handling_and_logprob_alignment(fake_vllm, tiny_tokenizer_with_pad):
    tok = tiny_tokenizer_with_pad  # "<pad>" is a special token other than EOS: the "<|im_end|>" case
    fake_vllm.tokenizer = tok
    eos, special = tok.eos_token_id, tok.pad_token_id
    body = enc(tok, " Tom has 3 apples and buys 4 more")
    pieces = [tok.decode([t]) for t in body]
    # a stop string that starts inside token j (2+ characters) and ends inside token j + 1
    j = next(k for k in range(1, len(body) - 1) if len(pieces[k]) >= 2 and pieces[k + 1])
    stop = pieces[j][1:] + pieces[j + 1][0]
    assert stop not in tok.decode(body[: j + 1])[:-1]  # it first completes at token j + 1
    other = enc(tok, " Paris is the capital of France")  # the other rows' text: no stop string in it
    assert stop not in tok.decode(other + [other[1]] * 12)
    p = [enc(tok, x) for x in ("Question:", "A", "Q: What", "She sold", "Answer:")]
    fake_vllm.model = ScriptedModel({
        tuple(p[0]): other[:3] + [eos],  # EOS after 3 tokens
        tuple(p[1]): body,  # the stop string, mid-token
        tuple(p[2]): other[:2],  # unfinished: repeats its last token until max_new_tokens
        tuple(p[3]): other[:2] + [special] + other[2:],  # "<pad>", a special token, is a stop string
        tuple(p[4]): other[:4] + [7],  # token 7: a generation-config stop token
    })
    fake_vllm.extra_stop_token_ids = (7,)
    engine = VLLMRolloutEngine("m", tok, backend())
    out = engine.generate(p, SamplingParams(max_new_tokens=12, temperature=0.0, stop=(stop, "<pad>")), seed=0)
    unfinished = other[:2] + [other[1]] * 10
    assert out.completion_ids == [other[:3] + [eos], body[: j + 2], unfinished, other[:2] + [special], other[:4] + [7]]
    assert out.answer_lens == [3, j, 12, 2, 4]
    assert out.texts == [tok.decode(other[:3]), tok.decode(body[:j]) + pieces[j][0], tok.decode(unfinished),
                         tok.decode(other[:2]), tok.decode(other[:4])]
    assert out.finished == [True, True, False, True, True]
    assert out.prompt_ids == p
    assert out.logprobs == [[script_logprob(k) for k in range(len(c))] for c in out.completion_ids]


def test_log_probs_missing_for_a_token_fail_loudly(fake_vllm, tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    prompt = enc(tok, "Answer:")
    fake_vllm.model = ScriptedModel({tuple(prompt): enc(tok, " Tom has")})
    engine = VLLMRolloutEngine("m", tok, backend())
    complete = FakeLLM._complete

    def short(self, *a):
        c = complete(self, *a)
        c.logprobs = c.logprobs[:-1]
        return c

    monkeypatch.setattr(FakeLLM, "_complete", short)
    with pytest.raises(RuntimeError, match="log-prob positions"):
        engine.generate([prompt], SamplingParams(max_new_tokens=4), seed=0)


def test_seeded_sampling_is_a_function_of_the_seed(fake_vllm, tiny_tokenizer):
    tok = tiny_tokenizer
    fake_vllm.model = TinyHFModel(build_tiny_model(tok, seed=0, init_std=0.3))
    prompts = [enc(tok, x) for x in PROMPTS]
    engine = VLLMRolloutEngine("m", tok, backend())
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.95)
    a, b, c = (engine.generate(prompts, params, seed=s) for s in (5, 5, 6))
    assert a == b
    assert a.completion_ids != c.completion_ids
    assert [e.seed for e in engine.draws] == [5, 5, 6]
    seeds = [[sp.seed for sp in r[1]] for r in fake_vllm.llms[-1].requests]
    assert seeds[0] == seeds[1] == [stream_seed(5, i) for i in range(len(prompts))] and seeds[2][0] == stream_seed(6, 0)


# --------------------------------------------------------------------------- the two engines agree


def test_hf_and_vllm_engines_give_the_same_rollouts_for_the_same_tokens(fake_vllm, tiny_tokenizer):
    """Greedy, so both engines emit the same tokens: every field must then agree (log-probs up to float)."""
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    model = build_tiny_model(tok, seed=0, init_std=0.3)
    prompts = [enc(tok, x) for x in PROMPTS]
    free = SamplingParams(max_new_tokens=16, temperature=0.0)
    raw = HFRolloutEngine(model, tok, 8).generate(prompts, free, seed=0)
    with torch.no_grad():  # EOS's logit: twice that of row 1's third token, so that rows end by EOS (checked below)
        model.lm_head.weight[eos] = 2 * model.lm_head.weight[raw.completion_ids[1][2]]
    raw = HFRolloutEngine(model, tok, 8).generate(prompts, free, seed=0)
    r = next(i for i, c in enumerate(raw.completion_ids) if c[-1] != eos)
    pieces = [tok.decode([t]) for t in raw.completion_ids[r]]

    def ok(s):
        return s.isascii() and s.isprintable()

    j = next(k for k in range(1, len(pieces) - 1) if len(pieces[k]) >= 2 and ok(pieces[k]) and pieces[k + 1] and ok(pieces[k + 1]))
    stop = pieces[j][1:] + pieces[j + 1][0]  # starts inside a token
    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop=(stop,))
    hf = HFRolloutEngine(model, tok, 8).generate(prompts, params, seed=0)
    fake_vllm.model = TinyHFModel(model)
    vl = VLLMRolloutEngine("m", tok, backend()).generate(prompts, params, seed=0)
    kinds = {("eos" if c[-1] == eos else "stop") if f else "length" for c, f in zip(hf.completion_ids, hf.finished)}
    assert kinds == {"eos", "stop", "length"}, kinds  # every way of ending is compared
    assert hf.answer_lens[r] < len(hf.completion_ids[r])  # row r: the stop string's tokens are kept, not answer
    assert vl.prompt_ids == hf.prompt_ids
    assert vl.completion_ids == hf.completion_ids
    assert vl.answer_lens == hf.answer_lens
    assert vl.texts == hf.texts
    assert vl.finished == hf.finished
    for a, b in zip(vl.logprobs, hf.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


# --------------------------------------------------------------------------- weight sync


def lora_policy(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    policy = get_peft_model(copy.deepcopy(model), cfg)
    give_lora_weights(policy)
    return policy


def train_step(policy, seed: int) -> None:
    """Stands in for an optimizer step: new LoRA weights."""
    torch.manual_seed(seed)
    give_lora_weights(policy)


def test_merged_sync_loads_every_weight_by_name_and_the_next_draw_uses_it(fake_vllm, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(rollout_vllm, "IPC_DEVICE_TYPE", "cpu")  # the fake moves CPU tensors
    tok = tiny_tokenizer
    base = build_tiny_model(tok, seed=0, init_std=0.3)
    policy = lora_policy(base)
    fake_vllm.model = vmodel = TinyHFModel(base)
    engine = VLLMRolloutEngine("models/base", tok, backend())
    reference = HFRolloutEngine(None, tok, 8)
    prompts = [enc(tok, x) for x in PROMPTS]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)

    before = engine.generate(prompts, params, seed=0)  # no sync yet: the weights vLLM loaded
    plain = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    engine.sync(policy)
    assert [set(names) for names in vmodel.loaded] == [set(plain)]  # every weight, under its HF name, once
    for n, p in vmodel.model.named_parameters():
        assert torch.allclose(p, plain[n], atol=1e-6), n
    llm = fake_vllm.llms[-1]
    assert [c[0] for c in llm.calls] == ["init", "start", "update", "finish", "version", "reset_prefix_cache"]
    assert (engine.syncs, engine.weights_version) == (1, "policy-1")
    after = engine.generate(prompts, params, seed=0)
    reference.sync(policy)
    assert after.completion_ids == reference.generate(prompts, params, seed=0).completion_ids
    assert after.completion_ids != before.completion_ids  # the adapter changes the greedy samples

    train_step(policy, seed=1)
    engine.sync(policy)
    reference.sync(policy)
    again = engine.generate(prompts, params, seed=0)
    assert again.completion_ids == reference.generate(prompts, params, seed=0).completion_ids
    assert again.completion_ids != after.completion_ids
    assert [c[0] for c in llm.calls].count("init") == 1  # one transfer engine, reused
    assert [(d.weights_version, d.lora_int_id) for d in engine.draws] == [("default", None), ("policy-1", None), ("policy-2", None)]

    monkeypatch.setattr(FakeLLM, "update_weight_version", lambda self, v: None)  # vLLM still labels the old weights
    engine.sync(policy)
    with pytest.raises(RuntimeError, match="sampled by weights"):
        engine.generate(prompts, params, seed=0)


def test_merged_sync_needs_the_policy_on_the_gpu(fake_vllm, tiny_tokenizer):
    engine = VLLMRolloutEngine("models/base", tiny_tokenizer, backend())
    with pytest.raises(ValueError, match="sync = 'merged'.*on the GPU"):
        engine.sync(lora_policy(build_tiny_model(tiny_tokenizer)))


def test_lora_sync_serves_a_new_adapter_id_per_sync(fake_vllm, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    base = build_tiny_model(tok, seed=0, init_std=0.3)
    policy = lora_policy(base)
    fake_vllm.model = TinyHFModel(base)
    engine = VLLMRolloutEngine("models/base", tok, backend(sync="lora"), lora_rank=4, work_dir=tmp_path)
    reference = HFRolloutEngine(None, tok, 8)
    prompts = [enc(tok, x) for x in PROMPTS]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)

    engine.generate(prompts, params, seed=0)
    ids = []
    for step in range(2):
        train_step(policy, seed=step)
        engine.sync(policy)
        reference.sync(policy)
        ids.append(engine.lora_request.lora_int_id)
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"adapter-{step + 1:06d}"]  # only the latest is kept
        out = engine.generate(prompts, params, seed=0)
        assert out.completion_ids == reference.generate(prompts, params, seed=0).completion_ids
    assert ids == [1, 2]
    assert [None if r[2] is None else r[2].lora_int_id for r in fake_vllm.llms[-1].requests] == [None, 1, 2]
    assert [(d.weights_version, d.lora_int_id) for d in engine.draws] == [("default", None), ("policy-1", 1), ("policy-2", 2)]
    assert sorted(fake_vllm.model.adapters) == [1, 2]  # vLLM loaded each adapter once, by its id

    with pytest.raises(ValueError, match="full fine-tuning: use sync: merged"):
        engine.sync(base)
    from peft import LoraConfig, get_peft_model

    wide = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="r=16 exceeds"):
        engine.sync(wide)


# --------------------------------------------------------------------------- against the real vllm package
# These run only where vllm 0.33.0 imports (the environment of docs/vllm.md; no GPU needed): they check the
# engine's vLLM calls against the real classes, and the fake's way of ending requests against vLLM's own
# output processing (detokenizer, stop strings, log-prob lists). The engine core's `check_stop` (EOS, stop
# token, max_tokens) is emulated as its source reads: no model runs.


@pytest.fixture
def real_vllm():
    return pytest.importorskip("vllm.v1.engine.output_processor", reason="vllm is not installed (docs/vllm.md)")


def test_real_vllm_accepts_the_engine_requests_and_options(real_vllm):
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams as VSP
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    assert vllm.__version__ == "0.33.0"
    for params in (SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9, stop=("Question:", "<|im_end|>")),
                   SamplingParams(max_new_tokens=32, temperature=0.0)):
        for i, sp in enumerate(rollout_vllm.vllm_requests(params, seed=12345, n=3)):
            assert isinstance(sp, VSP) and (sp.seed, sp.logprobs, sp.top_k, sp.top_p) == (stream_seed(12345, i), 0, 0, params.top_p)
            assert MsgpackDecoder(VSP).decode(MsgpackEncoder().encode(sp)).seed == sp.seed  # to the engine core, 63 bits
    for sync in ("merged", "lora"):
        args = EngineArgs(**rollout_vllm.llm_options("Qwen/Qwen3-0.6B-Base", backend(sync=sync, max_model_len=2048), lora_rank=4))
        assert args.logprobs_mode == "processed_logprobs" and args.generation_config == "vllm"


def test_real_vllm_output_processor_ends_requests_as_the_fake_does(real_vllm, tiny_tokenizer_with_pad, tmp_path):
    import numpy as np
    from vllm.sampling_params import RequestOutputKind
    from vllm.tokenizers import get_tokenizer
    from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
    from vllm.v1.outputs import LogprobsLists

    tok = tiny_tokenizer_with_pad
    tok.save_pretrained(tmp_path)
    eos, special = tok.eos_token_id, tok.pad_token_id
    body = enc(tok, " Tom has 3 apples and buys 4 more")
    pieces = [tok.decode([t]) for t in body]
    j = next(k for k in range(1, len(body) - 1) if len(pieces[k]) >= 2 and pieces[k + 1])
    other = enc(tok, " Paris is the capital of France")
    prompts = [enc(tok, x) for x in ("Question:", "A", "Q: What", "She sold", "Answer:")]
    model = ScriptedModel({tuple(prompts[0]): other[:3] + [eos], tuple(prompts[1]): body, tuple(prompts[2]): other[:2],
                           tuple(prompts[3]): other[:2] + [special] + other[2:], tuple(prompts[4]): other[:4] + [7]})
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop=(pieces[j][1:] + pieces[j + 1][0], "<pad>"))
    requests = rollout_vllm.vllm_requests(params, seed=0, n=len(prompts))

    proc = real_vllm.OutputProcessor(get_tokenizer(str(tmp_path)), log_stats=False)
    real = []
    for i, (prompt, sp) in enumerate(zip(prompts, requests)):
        sp = sp.clone()
        sp.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate sets it
        sp.update_from_generation_config({"eos_token_id": [eos, 7]}, eos)  # token 7: a generation-config stop token
        proc.add_request(EngineCoreRequest(str(i), list(prompt), None, sp, None, 0.0, None, None, None, external_req_id=str(i)), None)
        for n, (t, lp) in enumerate(model.stream(prompt, sp, None), start=1):
            finish, reason = None, None  # v1/core/sched/utils.py:check_stop
            if t == eos:
                finish = FinishReason.STOP
            elif t in sp.stop_token_ids:
                finish, reason = FinishReason.STOP, t
            elif n >= sp.max_tokens:
                finish = FinishReason.LENGTH
            lists = LogprobsLists(np.array([[t]]), np.array([[lp]], dtype=np.float32), np.array([1]))
            done = proc.process_outputs([EngineCoreOutput(str(i), [t], lists, finish_reason=finish, stop_reason=reason)],
                                        weight_version="default").request_outputs
            if done:
                real.append(done[0])
                break
    FakeLLM.state = FakeState(model=model, tokenizer=tok, extra_stop_token_ids=(7,))
    fake = FakeLLM("m").generate([{"prompt_token_ids": p} for p in prompts], [FakeSamplingParams(**{
        k: getattr(sp, k) for k in ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "logprobs", "detokenize",
                                    "skip_special_tokens", "include_stop_str_in_output")}) for sp in requests])
    for r, f in zip(real, fake, strict=True):
        rc, fc = r.outputs[0], f.outputs[0]
        assert (list(rc.token_ids), rc.text, rc.finish_reason, rc.stop_reason) == (fc.token_ids, fc.text, fc.finish_reason, fc.stop_reason)
        assert [(s.version, s.start, s.end) for s in rc.weight_versions] == [(s.version, s.start, s.end) for s in fc.weight_versions]
    rows = [rollout_vllm.completion_row(r.outputs[0], tok, params.stop, i) for i, r in enumerate(real)]
    assert [r[0] for r in rows] == [other[:3] + [eos], body[: j + 2], other[:2] + [other[1]] * 10, other[:2] + [special], other[:4] + [7]]
    assert [r[1] for r in rows] == [3, j, 12, 2, 4]
    assert [r[3] for r in rows] == [[pytest.approx(script_logprob(k)) for k in range(len(r[0]))] for r in rows]


def test_real_vllm_processed_logprobs_are_the_hf_engines(real_vllm):
    """vLLM's temperature + top-p (TopKTopPSampler.forward_native) keeps the same tokens as the HF engine's
    warpers, with the same log-probs: the `logprobs` of the two engines mean the same."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits_BV = torch.randn(8, 320, generator=g) * float(0.5 + 3 * torch.rand(1, generator=g))
        t, p = float(0.3 + 1.2 * torch.rand(1, generator=g)), float(0.5 + 0.5 * torch.rand(1, generator=g))
        hf_BV = torch.log_softmax(TopPLogitsWarper(p)(None, TemperatureLogitsWarper(t)(None, logits_BV.clone())), -1)
        vl_BV = torch.log_softmax(apply_top_k_top_p(logits_BV.clone() / t, None, torch.full((8,), p)), -1)
        assert torch.equal(torch.isfinite(hf_BV), torch.isfinite(vl_BV))
        assert torch.allclose(hf_BV[torch.isfinite(hf_BV)], vl_BV[torch.isfinite(vl_BV)], atol=1e-5)
