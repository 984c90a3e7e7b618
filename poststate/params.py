"""Typed, frozen views of `params.yaml`, the only home of hyperparameters.

Each stage loads its own section once (`load_section`). Unknown keys, wrong types, out-of-range values
and unknown variant names fail before anything is written, with the key path and the bad value named:

    params.yaml: sft.stress.lr = -0.1: Input should be greater than 0

Variants (`sft.mild`, `opd.teacher_states`, ...) are override blocks inside a section: a key a variant does not
set is inherited from the section, so `dvc exp run -S sft.lr=...` changes every variant without its own
`lr`. `resolve_all` writes each stage's *effective* params to `resolved/`, which is what the stages
depend on in `dvc.yaml`; a change that leaves a variant's effective params unchanged does not rerun it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from poststate.world import WorldParams

PARAMS_FILE = Path("params.yaml")
RESOLVED_DIR = Path("resolved")


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ParamsError(ValueError):
    """A params file failed validation; the message names the file, the key path and the bad value."""


# --------------------------------------------------------------------------- prepare / base


class HubDataset(BaseModel):
    """One split of a Hub dataset. The paper profile should pin `revision` to a commit sha (not `main`),
    so that a rerun reads the same rows; a tag or branch name is accepted but can move."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(min_length=1)  # e.g. "openai/gsm8k"
    name: str = Field(min_length=1)  # config, e.g. "main"
    split: str = Field(min_length=1)  # e.g. "test"
    revision: str = Field(min_length=1)  # commit sha (preferred) or tag




class HubData(Strict):
    """Paper profile: the three benchmarks from the Hub (pinned) or from a local copy in the same schema."""

    local_dir: str | None = None  # None = the Hub; else data/hub (or inside it): local copies, declared in dvc.yaml
    gsm8k_train: HubDataset
    gsm8k_test: HubDataset
    truthfulqa: HubDataset
    mmlu_test: HubDataset
    mmlu_dev: HubDataset
    mmlu_subjects: list[str] = Field(min_length=1)  # the paper's "selected MMLU subset", named
    mmlu_per_subject: int | None = Field(default=None, gt=0)  # None = every test row of those subjects
    gsm8k_test_limit: int | None = Field(default=None, gt=0)
    truthfulqa_limit: int | None = Field(default=None, gt=0)
    sft_size: int | None = Field(default=None, gt=0)  # GSM8K train rows for SFT (None = all not held out)
    prompts_size: int = Field(gt=0)  # GSM8K train rows held out as the OPD/RL prompt set
    prompts_heldout_size: int = Field(default=128, ge=2)  # more train rows: held-out OPD/RL prompts (gates)
    sft_heldout_size: int = Field(default=200, ge=2)  # more train rows: held-out SFT rows (the SFT gate)


LOCAL_DATA = "data/hub"  # the one local-copy location dvc.yaml declares as prepare's input


class PrepareParams(Strict):
    source: Literal["synthetic", "hub"]
    seed: int = Field(ge=0)
    world: WorldParams | None = None
    hub: HubData | None = None

    @model_validator(mode="after")
    def _source_has_its_block(self) -> PrepareParams:
        block = {"synthetic": "world", "hub": "hub"}[self.source]
        if getattr(self, block) is None:
            raise ValueError(f"source={self.source!r} needs a prepare.{block} block")
        local = self.hub.local_dir if self.hub is not None else None
        if local is not None and Path(local).as_posix() != LOCAL_DATA and LOCAL_DATA not in Path(local).parents:
            raise ValueError(f"hub.local_dir = {local!r}: local copies must live in {LOCAL_DATA}/ (copy or symlink them "
                             f"there; dvc.yaml declares it as prepare's input, so lineage covers them)")
        return self


class TinyModel(Strict):
    """Qwen3 architecture, sized for a CPU (the paper model's class, Qwen3ForCausalLM)."""

    vocab_size: int = Field(gt=64)
    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)


class HubModel(Strict):
    """The base: a Hub repo id at a revision (resolved to its commit sha in lineage.json), or a local
    directory holding a saved model (config.json, weights, tokenizer), e.g. for a machine without the Hub."""

    name: str = Field(min_length=1)  # "Qwen/Qwen3-0.6B-Base", or a directory such as "/data/qwen3-0.6b-base"
    revision: str = Field(min_length=1)  # a commit sha for exact reproduction; ignored for a local directory


class BaseParams(Strict):
    source: Literal["pretrain", "hub"]
    seed: int = Field(ge=0)
    model: TinyModel | None = None
    pretrain: Pretrain | None = None
    hub: HubModel | None = None

    @model_validator(mode="after")
    def _source_has_its_block(self) -> BaseParams:
        need = {"pretrain": ("model", "pretrain"), "hub": ("hub",)}[self.source]
        for block in need:
            if getattr(self, block) is None:
                raise ValueError(f"source={self.source!r} needs a base.{block} block")
        return self


# --------------------------------------------------------------------------- post-training


class Adapter(Strict):
    kind: Literal["lora", "full"]
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )
    # How a LoRA layer computes in training; the same function and gradient either way (throughput only).
    # "adapter": peft's x W^T + s (x A^T) B^T. "merged": x (W + s B A)^T, two big matmuls instead of four
    # skinny ones: faster for a small model on a CPU, but it pays the full weight-gradient matmul that
    # LoRA otherwise saves (more FLOPs on a GPU). Needs dropout 0 (dropout acts on the adapter branch only).
    forward: Literal["adapter", "merged"] = "adapter"

    @model_validator(mode="after")
    def _merged_needs_no_dropout(self) -> Adapter:
        if self.forward == "merged" and self.dropout > 0:
            raise ValueError(f"adapter.forward = 'merged' needs adapter.dropout = 0, got {self.dropout}")
        return self


class Optim(Strict):
    """What every training run shares: AdamW, linear warmup + cosine decay, clipping, micro-batching.

    One optimizer step trains on one step batch (see each method); `batch_size` is the training
    micro-batch, the most sequences one forward/backward holds (the memory bound, not a hyperparameter of
    the method: the step's loss and gradient are the same for any micro-batching)."""

    lr: float = Field(gt=0)
    batch_size: int = Field(gt=0)  # sequences per training micro-batch
    warmup_ratio: float = Field(ge=0, lt=1)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    max_len: int = Field(gt=8)  # longest training sequence in tokens (longer ones are left-truncated)
    adapter: Adapter
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # weights: auto = bf16 on CUDA, fp32 on a CPU
    gradient_checkpointing: bool = False  # recompute decoder activations in the backward pass (memory)


class Pretrain(Optim):
    """The tiny base's pretraining: the same loop with (corpus states, gold tokens); full training.
    A step batch is batch_size x grad_accum windows of seq_len tokens."""

    grad_accum: int = Field(default=1, gt=0)
    steps: int = Field(gt=0)
    seq_len: int = Field(gt=8)  # tokens per packed corpus chunk

    @model_validator(mode="after")
    def _full(self) -> Pretrain:
        if self.adapter.kind != "full":
            raise ValueError(f"adapter.kind = {self.adapter.kind!r}: pretraining trains every weight ('full')")
        return self


class Sampling(Strict):
    max_new_tokens: int = Field(gt=0)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)


class RolloutBackend(Strict):
    """Which engine samples on-policy rollouts: "hf" (`rollout.HFRolloutEngine`, any device) or "vllm"
    (`rollout_vllm.VLLMRolloutEngine`: a CUDA GPU and the separate environment of docs/vllm.md). The other
    keys are vLLM's; "hf" ignores them."""

    kind: Literal["hf", "vllm"] = "hf"
    # How a draw gets the policy's current weights. "merged": the adapter folded into the weights, loaded in
    # place over CUDA IPC (the policy on the same GPU; full fine-tuning too). "lora": the adapter saved to
    # disk and served as a new vLLM LoRARequest per sync (a peft LoRA policy only).
    sync: Literal["merged", "lora"] = "merged"
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)  # vLLM's share of the GPU; the trainer shares it
    max_model_len: int | None = Field(default=None, gt=0)  # prompt + completion tokens; None = the model's limit
    max_num_seqs: int | None = Field(default=None, gt=0)  # sequences vLLM decodes at once; None = vLLM's default
    enforce_eager: bool = False  # True: no CUDA graphs (faster start, slower decoding)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # vLLM's weights ("auto": the config's)
    batch_invariant: bool = False  # VLLM_BATCH_INVARIANT=1: a row's sample does not depend on its batch mates


class Sft(Optim):
    """A step batch is batch_size x grad_accum dataset rows."""

    grad_accum: int = Field(default=1, gt=0)
    epochs: float = Field(gt=0)


class Continuation(Strict):
    """The paper's OPD signal: the frozen teacher writes an L-token continuation from each state."""

    cuts: int = Field(gt=0)  # K cut points per rollout
    cut_rule: Literal["uniform", "stride"]  # uniform: K positions drawn in [0, len]; stride: evenly spaced
    length: int | Literal["full"]  # L tokens (1 = one step; "full" = until a stop string / EOS)
    temperature: float = Field(ge=0)  # teacher's sampling temperature (0 = greedy)


class KL(Strict):
    direction: Literal["forward", "reverse"]  # forward = KL(teacher||student), reverse = KL(student||teacher)
    estimator: Literal["full", "sampled"]  # full vocabulary, or the sampled-token (single-sample) estimator


class Opd(Optim):
    """A step batch is prompts_per_step rollouts x up to `continuation.cuts` states each."""

    signal: Literal["continuation", "one_step_kl", "token_kl"]
    states: Literal["student", "teacher"]  # teacher = the teacher-state control (the teacher's own rollouts)
    init: Literal["base"]  # student/policy init (the paper's natural reading; adapters stack on models/base)
    steps: int = Field(gt=0)
    prompts_per_step: int = Field(gt=0)
    gen_batch_size: int = Field(gt=0)  # rollouts / teacher continuations per generation batch
    engine: RolloutBackend = RolloutBackend()  # what samples the student's rollouts (hf | vllm)
    gate_samples: int = Field(default=2, gt=0)  # held-out rollouts per prompt for the validity gate's states
    rollout: Sampling
    continuation: Continuation
    kl: KL


class Rl(Optim):
    """A step batch is prompts_per_step x group_size rollouts; `inner_steps` > 1 makes that many PPO epochs
    (consecutive optimizer steps) over each drawn step batch, with the clipped ratio against pi_old."""

    init: Literal["base"]  # student/policy init (the paper's natural reading; adapters stack on models/base)
    steps: int = Field(gt=0)
    prompts_per_step: int = Field(gt=0)
    group_size: int = Field(gt=1)  # G samples per prompt
    gen_batch_size: int = Field(gt=0)  # rollouts per generation batch (one step's draw: ideally all of it)
    engine: RolloutBackend = RolloutBackend()  # what samples the policy's rollouts (hf | vllm)
    loss_agg: Literal["token_mean", "sequence_mean"]  # TRL GRPO loss_type "dapo"/"bnpo" vs "grpo"
    gate_samples: int = Field(default=4, gt=0)  # held-out samples per prompt for the sampled-reward gate
    rollout: Sampling
    std_norm: bool  # GRPO: divide advantages by the group std (False = mean baseline only, Dr.GRPO-style)
    kl_coef: float = Field(ge=0)  # KL to the initial policy (k3 estimator); 0 = no penalty
    clip_eps: float = Field(gt=0)  # PPO clip, active from the second epoch over a step batch (inner_steps > 1)
    inner_steps: int = Field(gt=0)  # PPO epochs per drawn step batch


class TeacherParams(Strict):
    source: Literal["stress", "mild"]  # which SFT run the `teacher` artifact is (paper: the stress run)


class Drift(Strict):
    """State-drift diagnostics (report's MMD, hidden MMD, forward KL, training-state locality)."""

    prompts: int = Field(gt=1)  # fixed prompt set: the first N GSM8K test questions
    cuts: int = Field(gt=0)  # prefix states per rollout
    rollout: Sampling
    ngram_max: int = Field(ge=1)
    hash_dim: int = Field(gt=0)
    permutations: int = Field(ge=99)  # per-prompt swap permutations of the drift test's p-value
    locality_states: int = Field(gt=0)  # training states scored for locality


Limit = Annotated[int, Field(ge=2)] | None  # first N rows of the eval file; None = all. A stderr needs N >= 2


class EvalParams(BaseModel):
    """Benchmark settings; the comment on each field gives the lm-evaluation-harness value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gsm8k_fewshot: int = Field(ge=0)  # harness gsm8k: 5, drawn per item from the few-shot pool (prompts.fewshot_indices)
    gsm8k_fewshot_seed: int = 1234  # harness: 1234 (simple_evaluate's fewshot_random_seed), one Random for all items
    gsm8k_limit: Limit  # harness: None (all 1319 test rows)
    gsm8k_max_new_tokens: int = Field(gt=0)  # harness: 256 (HFLM max_gen_toks)
    truthfulqa_preamble: Literal["harness", "world", "none"]  # harness: "harness" (the six-question Q/A preamble)
    truthfulqa_limit: Limit  # harness: None (all 817 rows)
    mmlu_style: Literal["letter", "continuation"]  # harness `mmlu`: "letter"; `mmlu_continuation`: "continuation"
    mmlu_fewshot: int = Field(ge=0)  # harness mmlu yaml: 0; original paper / old Open LLM Leaderboard: 5
    mmlu_limit: Limit  # harness: None (all 14042 test rows, or the prepared subset)
    gen_batch_size: int = Field(gt=0)  # harness: --batch_size (throughput only; greedy output does not depend on it)
    ll_batch_size: int = Field(gt=0)  # packed rows per forward, one per distinct context (throughput only)
    # harness HFLM: None = the model config's max_position_embeddings (2048 when it has none); contexts longer
    # than max_length (GSM8K: max_length - gsm8k_max_new_tokens) are left-truncated, as the harness does
    max_length: Annotated[int, Field(gt=0)] | None

    @model_validator(mode="after")
    def _room_for_a_gsm8k_prompt(self) -> EvalParams:
        if self.max_length is not None and self.max_length <= self.gsm8k_max_new_tokens:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for a GSM8K prompt before "
                f"gsm8k_max_new_tokens={self.gsm8k_max_new_tokens} new tokens (harness: max_ctx_len must be > 0)"
            )
        return self


class ReportRules(BaseModel):
    """Thresholds, margins, the fixed P4 contrast and the metric choices that decide the verdicts
    (`poststate/report/rules.py`; docs/report.md justifies every value). Each claim is three-valued on its
    `level` CI: it holds when the whole CI lies on the claimed side of its threshold, fails when the whole
    CI lies on the other side, and is undecided when the CI straddles it. A finding whose run did not pass
    its validity gate is "invalid", whatever its CIs say."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    level: float = Field(0.95, gt=0.0, lt=1.0)
    """Confidence level of every interval in the report (and of the gates)."""
    gsm8k_metric: Literal["gsm8k_strict", "gsm8k_flexible"] = "gsm8k_strict"
    """Which GSM8K score is the table's GSM8K column (harness strict-match by default)."""
    truthfulqa_metric: Literal["truthfulqa_mc1", "truthfulqa_mc2"] = "truthfulqa_mc1"
    """Which TruthfulQA score is the table's TruthfulQA column (and a retention task)."""
    mmlu_metric: Literal["mmlu_acc"] = "mmlu_acc"
    """The table's MMLU column (micro-averaged accuracy over the selected subset)."""
    retention_margin: float = Field(0.03, gt=0.0, lt=1.0)
    """Non-inferiority margin of 'no forgetting' / 'keeps retention' (F1, F4): holds when the CI of mean
    retention lies at or above 1 - margin, fails when it lies entirely below 1 - margin."""
    retention_loss: float = Field(0.90, gt=0.0, lt=1.0)
    """'Forgets' (F2): holds when the CI of mean retention lies at or below this, fails when it lies
    entirely above it."""
    drift_relative_margin: float = Field(0.25, gt=0.0)
    """'Similar drift' (P4), relative part of the margin: delta = max(this x |mean lexical MMD of the P4
    runs|, the noise floor's resolution max(|lo|, |hi|) of its CI); two runs drift alike when the CI of
    their lexical-MMD difference lies within +-delta, differently when it lies entirely outside."""
    retention_equivalence: float = Field(0.02, gt=0.0, lt=1.0)
    """'Alike retention' (P4): the CI of R(pair[0]) - R(pair[1]) lies within +-this."""
    p4_retention_pair: tuple[Literal["sft_stress", "opd_stress", "rl"], Literal["sft_stress", "opd_stress", "rl"]] = (
        "rl",
        "sft_stress",
    )
    """P4's retention contrast, fixed in advance (the paper's: RL 0.9902 vs stress SFT 0.8258): 'different
    retention' when the CI of R(pair[0]) - R(pair[1]) lies above 0."""

    @model_validator(mode="after")
    def _consistent(self) -> ReportRules:
        if not self.retention_loss < 1.0 - self.retention_margin:
            raise ValueError(
                f"retention_loss={self.retention_loss} must be below 1 - retention_margin = "
                f"{1.0 - self.retention_margin:g}"
            )
        if self.p4_retention_pair[0] == self.p4_retention_pair[1]:
            raise ValueError(f"p4_retention_pair={list(self.p4_retention_pair)} must name two different runs")
        return self

    @property
    def retention_keep(self) -> float:
        """The non-inferiority bound of mean retention: 1 - retention_margin."""
        return 1.0 - self.retention_margin

    def metric_for(self, column: str) -> str:
        """The scores key behind a table column ('gsm8k', 'truthfulqa', 'mmlu')."""
        table = {"gsm8k": self.gsm8k_metric, "truthfulqa": self.truthfulqa_metric, "mmlu": self.mmlu_metric}
        if column not in table:
            raise KeyError(f"unknown table column {column!r}; expected one of {sorted(table)}")
        return table[column]


class EvalSection(Strict):
    harness: EvalParams
    drift: Drift
    batch_size: int = Field(gt=0)  # diagnostics batch size
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # every eval model's weights: auto = bf16 on CUDA, fp32 on a CPU


class ReportParams(Strict):
    rules: ReportRules
    paper_rows: bool  # print the paper's Table 2 beside ours


# --------------------------------------------------------------------------- loading

SECTIONS: dict[str, type[Strict]] = {
    "prepare": PrepareParams,
    "base": BaseParams,
    "sft": Sft,
    "teacher": TeacherParams,
    "opd": Opd,
    "rl": Rl,
    "eval": EvalSection,
    "report": ReportParams,
}
VARIANTS: dict[str, tuple[str, ...]] = {"sft": ("mild", "stress"), "opd": ("stress", "mild", "teacher_states")}
TOP_LEVEL = {"profile", "seeds", "launcher", *SECTIONS}
LAUNCHERS = ("python", "python3", "torchrun", "accelerate")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format(err: ValidationError, where: str, raw: dict[str, Any]) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if p not in ("function-after",))
        bad = e.get("input")
        shown = "<missing>" if e["type"] == "missing" else repr(bad)
        lines.append(f"{where}.{path} = {shown}: {e['msg']}" if path else f"{where}: {e['msg']}")
    return "\n".join(lines)


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: not found (run from the repository root)") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise ParamsError(f"{path}: unknown top-level key(s) {unknown}; known: {sorted(TOP_LEVEL)}")
    return raw


def launcher(raw: dict[str, Any], path: Path = PARAMS_FILE) -> str:
    """The command the training stages run under (dvc.yaml: `${launcher} stages/sft.py ...`): `python`, or a
    data-parallel launcher (`torchrun --nproc_per_node 2`, `accelerate launch --num_processes 8`), optionally
    after VAR=value environment assignments (`ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2`)."""
    value = raw.get("launcher", "python")
    words = value.split() if isinstance(value, str) else []
    program = next((w for w in words if "=" not in w), None)
    if program not in LAUNCHERS:
        raise ParamsError(f"{path}: launcher = {value!r}: expected a command starting with one of {list(LAUNCHERS)} "
                          "(after optional VAR=value assignments)")
    return value


def seeds(raw: dict[str, Any], path: Path = PARAMS_FILE) -> list[int]:
    value = raw.get("seeds")
    if not (isinstance(value, list) and value and all(isinstance(s, int) and s >= 0 for s in value)):
        raise ParamsError(f"{path}: seeds = {value!r}: expected a non-empty list of non-negative integers")
    if len(set(value)) != len(value):
        raise ParamsError(f"{path}: seeds = {value!r}: duplicate seeds")
    return list(value)


def load_section(section: str, variant: str | None = None, path: Path = PARAMS_FILE) -> Any:
    """Validate and return one section (with a variant's overrides merged in) as a frozen model."""
    raw = read_params(path)
    if section not in SECTIONS:
        raise ParamsError(f"unknown section {section!r}; known: {sorted(SECTIONS)}")
    if section not in raw or not isinstance(raw[section], dict):
        raise ParamsError(f"{path}: section {section!r} missing or not a mapping")
    body = dict(raw[section])
    variants = VARIANTS.get(section, ())
    blocks = {v: body.pop(v, None) for v in variants}
    for v, block in blocks.items():
        if block is None:
            raise ParamsError(f"{path}: {section}.{v} missing (use {{}} for no overrides)")
        if not isinstance(block, dict):
            raise ParamsError(f"{path}: {section}.{v} = {block!r}: expected a mapping of overrides")
    if variant is not None and variant not in variants:
        raise ParamsError(f"unknown variant {section}@{variant!r}; known: {list(variants)}")
    where = f"{path}: {section}"
    if variant is not None:
        body = _deep_merge(body, blocks[variant])
        where = f"{path}: {section}.{variant}(merged)"
    try:
        return SECTIONS[section].model_validate(body)
    except ValidationError as e:
        raise ParamsError(_format(e, where, body)) from None


def resolve_all(path: Path = PARAMS_FILE) -> dict[str, dict[str, Any]]:
    """Every stage's effective params, keyed `section` or `section-variant`; validates the whole file."""
    raw = read_params(path)
    out: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    run_seeds = None
    try:
        run_seeds = seeds(raw, path)
    except ParamsError as e:
        errors.append(str(e))
    try:
        launcher(raw, path)
    except ParamsError as e:
        errors.append(str(e))
    for section in SECTIONS:
        for variant in VARIANTS.get(section, (None,)):
            key = section if variant is None else f"{section}-{variant}"
            try:
                out[key] = load_section(section, variant, path).model_dump(mode="json")
            except ParamsError as e:
                errors.append(str(e))
    if errors:
        raise ParamsError("\n".join(errors))
    for key in out:
        if key.split("-")[0] in {"sft", "opd", "rl", "teacher", "eval", "report"}:
            out[key] = {"seeds": run_seeds, **out[key]}
    out["profile"] = {"profile": raw.get("profile")}
    return out


def write_resolved(resolved: dict[str, dict[str, Any]], out_dir: Path = RESOLVED_DIR, dry_run: bool = False) -> dict[str, str]:
    """Write resolved/<key>.json atomically and return each file's text, the bytes DVC hashes.

    Only files whose content changed are touched, and any other resolved/*.json is removed (a section or
    variant that no longer exists): `dvc repro` empties the out before the stage runs, so a run by hand
    leaves what DVC leaves. dry_run=True writes and removes nothing (`stages/resolve.py --dry` compares the
    texts with the hashes in dvc.lock)."""
    texts = {key: json.dumps(body, indent=2, sort_keys=True) + "\n" for key, body in resolved.items()}
    if dry_run:
        return texts
    from poststate.artifacts import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    for key, text in texts.items():
        target = out_dir / f"{key}.json"
        if not target.exists() or target.read_text() != text:
            atomic_write_text(target, text)
    for stale in sorted(set(out_dir.glob("*.json")) - {out_dir / f"{key}.json" for key in texts}):
        stale.unlink()
    return texts
