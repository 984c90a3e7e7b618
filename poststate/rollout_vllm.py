"""`RolloutEngine` on vLLM (`vllm.LLM`), for on-policy rollouts on a CUDA GPU: `rollout.kind: vllm`.

Written against vLLM 0.33.0's source (the wheel's `vllm/`, read for this module; the lines relied on are
cited where they matter) and tested against a fake `vllm` module only: it has never run against a real
vLLM. docs/vllm.md says how to install it (a separate environment: vLLM pins torch 2.14) and what was and
was not tested.

Same contract as `rollout.HFRolloutEngine` (see `rollout.py`): a completion keeps its tokens through the
terminator (an EOS; or, for a stop string, the token that completes it), `answer_lens` counts the tokens
before the terminator, `texts` is the answer decoded with `skip_special_tokens=True` and cut before the
earliest stop string, `logprobs` is each kept token's log-prob under the distribution it was sampled from
(after temperature and top-p; greedy: the raw model distribution), `finished` is False only when
`max_new_tokens` ran out. The ids come from vLLM; the answer length and the text are computed from them by
`rollout.cut_completion`, the HF engine's own rule, so the two engines cannot drift apart on them.

What vLLM does, and how it maps (vLLM 0.33.0):
- Stopping (`v1/core/sched/utils.py:check_stop`): an EOS (`finish_reason "stop"`, `stop_reason None`) or a
  generation-config stop token (`stop_reason` = its id) is the last of `CompletionOutput.token_ids`. A stop
  string is matched in the detokenized text (`v1/engine/detokenizer.py:update`, `check_stop_strings`):
  `token_ids` keep the token that completes it (later tokens of the same step are dropped), `.text` is cut
  before it (`include_stop_str_in_output=False`) and `stop_reason` is the string. We decode with
  `skip_special_tokens=False` so that a stop string such as "<|im_end|>", a special token in Qwen3, is seen
  as the HF engine's stopping criterion sees it; `texts` are re-decoded here without special tokens.
- Log-probs: `logprobs=0` returns the sampled token's log-prob only (`SamplingParams.logprobs` docstring;
  `v1/sample/sampler.py:gather_logprobs`), one per output token. Which distribution is an ENGINE setting,
  `LLM(logprobs_mode="processed_logprobs")` (`config/model.py:ModelConfig.logprobs_mode`): after temperature
  and top-k/top-p (`v1/sample/ops/topk_topp_sampler.py:forward_native`); for an all-greedy batch, the
  log_softmax of the logits before temperature (`v1/sample/sampler.py:Sampler.sample`), the raw model
  distribution since no penalty or bias is set. The default, "raw_logprobs", would be the unprocessed one.
- Seeds: each request gets `seed = streams.stream_seed(seed, i)` for its index i in the call, a per-request
  torch.Generator in vLLM, so a row's sample does not depend on how vLLM batches it, up to floating-point
  differences between batch shapes, which `batch_invariant` removes (VLLM_BATCH_INVARIANT=1). The HF engine
  seeds per batch instead: the two engines draw different samples from the same distribution.
- Temperatures: vLLM raises 0 < T < 0.01 to 0.01 and rejects T > 2 (`sampling_params.py:__post_init__`,
  `_verify_args`); both are refused here, by name, rather than sampled at another temperature.

Weight sync (`sync(policy)`, before each draw of a learner's rollouts), bookkept in `syncs`,
`weights_version` and `draws` (one `Draw` per `generate`, naming the weights it sampled):
- "merged": the policy's LoRA adapter is folded into a plain copy (`modeling.SamplingCopy`, the HF engine's
  exact merge) whose parameters, under their HF names, are loaded into vLLM's model in place by vLLM's
  documented RL weight transfer (docs: training/weight_transfer; `examples/rl/rlhf_ipc.py`): backend "ipc"
  (CUDA IPC, trainer and vLLM on the same GPU), `WeightTransferTrainerFactory.trainer_init` +
  `ModuleSource` + `send_weights()` driving `LLM.start_weight_update / update_weights /
  finish_weight_update` (`entrypoints/rl/offline.py`); then the weights are labelled
  (`LLM.update_weight_version`), so every output's `weight_versions` names the weights that sampled it
  (checked), and the prefix cache, computed by the old weights, is reset.
- "lora": the adapter is saved to a fresh directory and served as `LoRARequest("policy-<n>", n, path)`, a
  new id per sync (vLLM caches adapters by id: `lora/request.py`), with `LLM(enable_lora=True,
  max_lora_rank=...)`; every output's `lora_request` is checked to be the current one.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from poststate.params import RolloutBackend
from poststate.rollout import Rollouts, SamplingParams, cut_completion
from poststate.streams import stream_seed

INSTALL_HINT = "pip install -r requirements-vllm.txt in a separate CUDA environment (docs/vllm.md)"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py: MaxLoRARanks
VLLM_MIN_TEMPERATURE = 1e-2  # vllm/sampling_params.py: _MAX_TEMP (0 < T < this is raised to it)
VLLM_MAX_TEMPERATURE = 2.0  # vllm/sampling_params.py: _verify_args
IPC_DEVICE_TYPE = "cuda"  # CUDA IPC shares GPU memory only (a test's fake transfer sets "cpu")
INITIAL_VERSION = "default"  # vLLM's label of the weights it loaded (vllm/v1/engine/core.py: _weight_version)


def import_vllm(module: str = "vllm"):
    """`vllm` (or one of its submodules), or an ImportError naming the param and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"RolloutBackend.kind = 'vllm' needs the vllm package ({module} failed to import: {e}); "
            f"{INSTALL_HINT}, or set kind: hf"
        ) from e


def lora_rank_bound(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of rank r."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    for bound in VLLM_LORA_RANKS:
        if r <= bound:
            return bound
    raise ValueError(f"LoRA rank r={r} exceeds vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


def llm_options(model: str | Path, backend: RolloutBackend, *, lora_rank: int | None = None, seed: int = 0) -> dict:
    """The keyword arguments of `vllm.LLM` for these settings (each an `LLM` or `EngineArgs` option)."""
    options: dict = dict(
        model=str(model),
        seed=seed,
        dtype=backend.dtype,
        gpu_memory_utilization=backend.gpu_memory_utilization,
        enforce_eager=backend.enforce_eager,
        logprobs_mode="processed_logprobs",  # the sampled distribution's log-probs, not the raw logits'
        generation_config="vllm",  # vLLM's neutral sampling defaults, not the model's generation_config.json
    )
    if backend.max_model_len is not None:
        options["max_model_len"] = backend.max_model_len
    if backend.max_num_seqs is not None:
        options["max_num_seqs"] = backend.max_num_seqs
    if backend.sync == "lora":
        options.update(enable_lora=True, max_lora_rank=lora_rank_bound(lora_rank), max_loras=1)
    else:
        options["weight_transfer_config"] = import_vllm("vllm.config").WeightTransferConfig(backend="ipc")
    return options


def vllm_requests(params: SamplingParams, seed: int, n: int) -> list:
    """One `vllm.SamplingParams` per prompt; request i is seeded by stream_seed(seed, i)."""
    t = params.temperature
    if 0 < t < VLLM_MIN_TEMPERATURE or t > VLLM_MAX_TEMPERATURE:
        raise ValueError(
            f"SamplingParams.temperature = {t}: vLLM samples 0 (greedy) or [{VLLM_MIN_TEMPERATURE}, "
            f"{VLLM_MAX_TEMPERATURE}] (it raises lower temperatures to {VLLM_MIN_TEMPERATURE}, rejects higher ones)"
        )
    vllm = import_vllm()
    return [
        vllm.SamplingParams(
            n=1,
            temperature=t,
            top_p=params.top_p,
            top_k=0,  # off, as in the HF engine
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop),
            include_stop_str_in_output=False,
            ignore_eos=False,
            seed=stream_seed(seed, i),
            logprobs=0,  # the sampled token's log-prob only
            detokenize=bool(params.stop),  # stop strings are matched in the detokenized text
            skip_special_tokens=False,  # ... with special tokens, as the HF stopping criterion sees them
        )
        for i in range(n)
    ]


def completion_row(c, tokenizer, stops: Sequence[str], i: int = 0) -> tuple[list[int], int, str, list[float], bool]:
    """(completion ids, answer length, text, log-probs, finished) of vLLM's `CompletionOutput` `c` for
    request i: the ids are vLLM's; the answer length and text follow `rollout.cut_completion` (pad = EOS:
    vLLM does not pad), which must end the completion where vLLM did, else this raises."""
    ids = [int(t) for t in c.token_ids]
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {i} ended with finish_reason={c.finish_reason!r} (stop_reason={c.stop_reason!r})")
    eos = tokenizer.eos_token_id
    finished = c.finish_reason == "stop"
    if finished and isinstance(c.stop_reason, int) and c.stop_reason != eos:
        # a stop token of the model's generation config (not our EOS): kept, like an EOS
        if not ids or ids[-1] != c.stop_reason:
            raise RuntimeError(f"vLLM request {i} stopped on token {c.stop_reason} that does not end it: {ids[-3:]}")
        body, answer_len, text, _ = cut_completion(ids[:-1], tokenizer, stops, eos, eos)
        if body != ids[:-1]:
            raise RuntimeError(f"vLLM request {i}: a stop string in {text!r} before its stop token {c.stop_reason}")
    else:
        kept, answer_len, text, ours = cut_completion(ids, tokenizer, stops, eos, eos)
        if kept != ids or ours != finished:
            raise RuntimeError(
                f"vLLM request {i} ended with finish_reason={c.finish_reason!r} stop_reason={c.stop_reason!r} "
                f"after {len(ids)} tokens, but the HF rule ends it after {len(kept)} (finished={ours}): "
                f"the two detokenizations disagree on {tokenizer.decode(ids)!r}"
            )
    if c.logprobs is None or len(c.logprobs) != len(ids):
        n = None if c.logprobs is None else len(c.logprobs)
        raise RuntimeError(f"vLLM request {i}: {n} log-prob positions for {len(ids)} tokens")
    logprobs = []
    for j, (t, pos) in enumerate(zip(ids, c.logprobs)):  # each position: {sampled token: Logprob} (+ top-k, k = 0)
        if pos is None or t not in pos:
            raise RuntimeError(f"vLLM request {i}: no log-prob for its token {t} at position {j}")
        logprobs.append(float(pos[t].logprob))
    return ids, answer_len, text, logprobs, finished


@dataclass(frozen=True)
class Draw:
    """One `generate` call: which weights sampled it."""

    weights_version: str  # "default" = the weights vLLM loaded; "policy-<n>" = the policy at the n-th sync
    lora_int_id: int | None  # the LoRARequest id it was served with (sync "lora"), else None
    prompts: int
    seed: int


class _LLMClient:
    """vLLM's four-method `VLLMWeightSyncClient` protocol (`distributed/weight_transfer/base.py`) over an
    in-process `vllm.LLM`, whose methods take `{"init_info": ...}` / `{"update_info": ...}` requests
    (`entrypoints/rl/offline.py:RLOfflineMixin`)."""

    def __init__(self, llm):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


class VLLMRolloutEngine:
    """`RolloutEngine` on `vllm.LLM` (see the module docstring for the mapping and the weight sync).

    `model` is what vLLM loads (a model directory or Hub id, with its tokenizer): the policy's starting
    weights for sync "merged" (every sync replaces them), its base model for sync "lora" (the adapters
    apply to it). `tokenizer` is the project's HF tokenizer of that model (answer lengths and texts);
    its EOS must be vLLM's. Sync "lora" needs `lora_rank` (the adapter's r, sizing vLLM's LoRA slots) and
    `work_dir` (adapter directories; only the latest is kept).
    """

    def __init__(
        self,
        model: str | Path,
        tokenizer,
        backend: RolloutBackend,
        *,
        lora_rank: int | None = None,
        work_dir: str | Path | None = None,
        seed: int = 0,
    ):
        if backend.kind != "vllm":
            raise ValueError(f"VLLMRolloutEngine needs RolloutBackend.kind = 'vllm', got {backend.kind!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer needs an eos token, got eos={tokenizer.eos_token!r}")
        if backend.sync == "lora" and (lora_rank is None or work_dir is None):
            raise ValueError(
                f"RolloutBackend.sync = 'lora' needs lora_rank and work_dir, got lora_rank={lora_rank!r} work_dir={work_dir!r}"
            )
        self.backend, self.tokenizer = backend, tokenizer
        self.work_dir = Path(work_dir) if work_dir is not None else None
        vllm = import_vllm()
        options = llm_options(model, backend, lora_rank=lora_rank, seed=seed)
        self.max_lora_rank = options.get("max_lora_rank")
        if backend.sync == "merged":
            # The IPC handles travel to vLLM's engine process pickled (examples/rl/rlhf_ipc.py sets the same).
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        if backend.batch_invariant:
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        self.llm = vllm.LLM(**options)
        theirs = self.llm.get_tokenizer().eos_token_id
        if theirs != tokenizer.eos_token_id:
            raise ValueError(f"vLLM's tokenizer for {model} has eos id {theirs}, ours {tokenizer.eos_token_id}")
        self.syncs = 0
        self.weights_version = INITIAL_VERSION
        self.lora_request = None  # the current LoRARequest (sync "lora")
        self.draws: list[Draw] = []
        self._copy = None  # SamplingCopy of the synced policy (sync "merged")
        self._sender = None  # vLLM's trainer-side weight transfer engine over that copy
        self._adapter_dir: Path | None = None

    # ------------------------------------------------------------------ weight sync

    def sync(self, policy) -> None:
        """Make the next draws sample `policy`'s current weights (see the module docstring)."""
        if self.backend.sync == "lora":
            self._sync_lora(policy)
        else:
            self._sync_merged(policy)

    def _sync_merged(self, policy) -> None:
        from poststate.modeling import SamplingCopy

        if self._copy is None or self._copy.policy is not policy:
            self._copy, self._sender = SamplingCopy(policy), None
        model = self._copy.sync()
        off = [n for n, p in model.named_parameters() if p.device.type != IPC_DEVICE_TYPE]
        if off:
            raise ValueError(
                f"RolloutBackend.sync = 'merged' sends the weights over CUDA IPC: the policy must be on the GPU, "
                f"but {off[:3]} are not (sync: lora saves the adapter to disk instead)"
            )
        if self._sender is None:
            wt = import_vllm("vllm.distributed.weight_transfer")
            ipc = import_vllm("vllm.distributed.weight_transfer.ipc_engine")
            self._sender = wt.WeightTransferTrainerFactory.trainer_init(
                ipc.IPCTrainerInitInfo(rank=0, packed=False), client=_LLMClient(self.llm), source=wt.ModuleSource(model)
            )
        self._sender.send_weights()  # start_weight_update, update_weights (every parameter), finish_weight_update
        version = f"policy-{self.syncs + 1}"
        self.llm.update_weight_version(version)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight sync (requests still running?)")
        self.syncs += 1
        self.weights_version = version

    def _sync_lora(self, policy) -> None:
        configs = getattr(policy, "peft_config", None)
        if not configs:
            raise ValueError(
                f"RolloutBackend.sync = 'lora' needs a peft LoRA policy, got {type(policy).__name__} without an "
                "adapter (full fine-tuning: use sync: merged)"
            )
        if len(configs) != 1:
            raise ValueError(f"RolloutBackend.sync = 'lora' serves one adapter, the policy has {sorted(configs)}")
        (cfg,) = configs.values()
        r = max([cfg.r, *(getattr(cfg, "rank_pattern", None) or {}).values()])
        if r > self.max_lora_rank:
            raise ValueError(f"the policy's LoRA rank r={r} exceeds the engine's max_lora_rank={self.max_lora_rank} (lora_rank)")
        if getattr(cfg, "use_dora", False) or getattr(cfg, "bias", "none") != "none" or getattr(cfg, "modules_to_save", None):
            raise ValueError("vLLM serves plain LoRA only: no DoRA, no bias, no modules_to_save (vllm/lora/peft_helper.py)")
        stray = [n for n, p in policy.named_parameters() if p.requires_grad and "lora_" not in n]
        if stray:
            raise ValueError(f"sync = 'lora' carries the adapter only, but these weights train too: {stray[:3]}")
        n = self.syncs + 1
        path = self.work_dir / f"adapter-{n:06d}"
        if path.exists():
            shutil.rmtree(path)
        policy.save_pretrained(str(path))
        lora = import_vllm("vllm.lora.request")
        self.lora_request = lora.LoRARequest(lora_name=f"policy-{n}", lora_int_id=n, lora_path=str(path))
        if self._adapter_dir is not None and self._adapter_dir.exists():
            shutil.rmtree(self._adapter_dir)  # vLLM loaded it for the last draw and is never asked for it again
        self._adapter_dir = path
        self.syncs = n
        self.weights_version = f"policy-{n}"

    # ------------------------------------------------------------------ sampling

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int) -> Rollouts:
        prompts = [list(p) for p in prompt_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        limit = self.backend.max_model_len or getattr(getattr(self.llm, "model_config", None), "max_model_len", None)
        longest = max((len(p) for p in prompts), default=0)
        if limit is not None and longest + params.max_new_tokens > limit:
            raise ValueError(
                f"longest prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds vLLM's "
                f"max_model_len ({limit}), where vLLM would cut the completion short as if by max_new_tokens"
            )
        requests = vllm_requests(params, seed, len(prompts))
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], requests, use_tqdm=False, lora_request=self.lora_request
        )
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        rows = [self._row(i, out, prompts[i], params) for i, out in enumerate(outputs)]
        self.draws.append(
            Draw(self.weights_version, None if self.lora_request is None else self.lora_request.lora_int_id, len(prompts), seed)
        )
        return Rollouts.from_rows(prompts, rows)

    def _row(self, i: int, out, prompt: list[int], params: SamplingParams) -> tuple[list[int], int, str, list[float], bool]:
        """Request i's `RequestOutput`, checked (its prompt, its weights) and mapped by `completion_row`."""
        if out.prompt_token_ids is not None and list(out.prompt_token_ids) != prompt:
            raise RuntimeError(f"vLLM output {i} belongs to another prompt (outputs out of order?)")
        if len(out.outputs) != 1:
            raise RuntimeError(f"vLLM output {i} has {len(out.outputs)} completions, expected 1")
        self._check_weights(i, out)
        return completion_row(out.outputs[0], self.tokenizer, params.stop, i)

    def _check_weights(self, i: int, out) -> None:
        """Every output was sampled by the weights this engine synced last."""
        served = getattr(out, "lora_request", None)
        want = None if self.lora_request is None else self.lora_request.lora_int_id
        got = None if served is None else served.lora_int_id
        if got != want:
            raise RuntimeError(f"vLLM output {i} was served by LoRA id {got}, the current adapter is {want}")
        spans = out.outputs[0].weight_versions if out.outputs else None
        if self.backend.sync == "merged" and spans:
            stale = [s.version for s in spans if s.version != self.weights_version]
            if stale:
                raise RuntimeError(f"vLLM output {i} was sampled by weights {stale}, the current are {self.weights_version!r}")
