"""Tokenizer, the tiny Qwen3, adapters, and loading any `models/<name>/` in one standard call."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

if TYPE_CHECKING:  # params (pydantic) only for annotations: the core imports with torch, transformers, peft, accelerate
    from poststate.params import Adapter, TinyModel


EOS = "<|endoftext|>"  # Qwen3-Base's EOS and pad token


def train_tokenizer(docs: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own pre-token, so numbers are spelled digit by digit
    (merged-digit BPE did not learn arithmetic at this scale). Byte-level: any text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False)


def tiny_qwen3(p: TinyModel, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialised Qwen3ForCausalLM (the paper model's architecture class) of the given size."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        head_dim=p.head_dim,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def is_hub_id(name: str) -> bool:
    """A Hugging Face Hub repo id ("org/name") that is not a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The weights' dtype: "auto" is bfloat16 on a CUDA device and float32 elsewhere (a CPU has no fast
    bf16 matmul here, and fp32 keeps the tiny profile byte-deterministic)."""
    kind = torch.device(device).type
    table = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name == "auto":
        return torch.bfloat16 if kind == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"dtype {name!r}: expected 'auto', 'fp32' or 'bf16'")
    return table[name]


def base_reference(adapter_dir: Path) -> Path | str:
    """Where an adapter's base model is: `base_model_name_or_path` of its adapter_config.json, a Hub id or
    a directory; a relative directory is taken relative to the repository root, found as the nearest
    ancestor of the adapter directory that holds dvc.yaml (so an adapter loads from any working directory)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    name = config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    if Path(name).is_absolute():
        return Path(name)
    for root in [Path(adapter_dir).resolve(), *Path(adapter_dir).resolve().parents]:
        if not (root / "dvc.yaml").exists():
            continue
        if (root / name / "config.json").exists():
            return root / name
        saved = root / "models" / "base" / "lineage.json"  # a Hub base this repository already saved
        if config.get("revision") and saved.exists():
            hub = json.loads(saved.read_text()).get("hub") or {}
            if hub.get("name") == name and hub.get("sha") == config["revision"]:
                return root / "models" / "base"
    if (Path(name) / "config.json").exists():
        return Path(name)
    return name  # a Hub id (peft's own loader would fetch it at config["revision"])


def load_model(path: Path, trainable: bool = False, merge: bool = False, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu"):
    """Load `models/<name>/` (or a Hub id / local base directory): a LoRA adapter directory is its base
    model plus the adapter (peft), anything else `AutoModelForCausalLM`. Weights in `dtype` on `device`
    (a trainable LoRA adapter stays fp32: peft upcasts adapter weights; the loop autocasts).
    `merge` folds a LoRA adapter into the weights (the same function, up to float rounding, without the
    adapter's extra matmuls per layer): for inference only (evaluation, a frozen teacher)."""
    if merge and trainable:
        raise ValueError("load_model: merge=True is for inference; a trainable model keeps its adapter")
    if is_adapter_dir(path):
        from peft import PeftModel

        ref = base_reference(path)
        revision = json.loads((Path(path) / "adapter_config.json").read_text()).get("revision") if isinstance(ref, str) else None
        base = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, **({"revision": revision} if revision else {}))
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
        if merge:
            model = model.merge_and_unload()
    else:
        if not (Path(path) / "config.json").exists() and not is_hub_id(str(path)):
            raise FileNotFoundError(f"{path}: no config.json or adapter_config.json - not a model directory")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)
    model.train(trainable)
    return model


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def with_adapter(model, adapter: Adapter):
    """Wrap a base model for training: LoRA through peft, or the model itself for full fine-tuning."""
    if adapter.kind == "full":
        model.train()
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        task_type="CAUSAL_LM",
    )
    if adapter.forward == "merged":
        # peft's documented hook for custom LoRA layers; the saved adapter is the same (same weights, same config)
        config._register_custom_module({torch.nn.Linear: merged_lora_linear()})
    model = get_peft_model(model, config)
    model.train()
    return model


@functools.cache
def merged_lora_linear() -> type:
    """peft's LoRA `Linear`, computing x (W + s B A)^T instead of x W^T + s (x A^T) B^T (`adapter.forward:
    merged`). Same parameters, state dict, merge and save; same function and gradients up to float
    rounding. Tiny base, SFT batches of 32, 2 CPU cores: 344 ms a step against peft's 409 (means of 3
    rounds, perf/train_step.py). `with_adapter` builds it only for plain LoRA without dropout (validated in
    `Adapter`); an adapter that is disabled or merged, several active adapters, or extra forward
    arguments take peft's own forward."""
    import torch.nn.functional as F
    from peft.tuners.lora import Linear

    class MergedLoraLinear(Linear):
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            names = [a for a in self.active_adapters if a in self.lora_A]
            if self.disable_adapters or self.merged or args or kwargs or len(names) != 1:
                return super().forward(x, *args, **kwargs)
            (a,) = names
            base = self.get_base_layer()
            return F.linear(x, base.weight + self.get_delta_weight(a), base.bias)

    return MergedLoraLinear


class SamplingCopy:
    """The policy as a sampler sees it: a plain copy with the LoRA adapter folded into its weights,
    re-synced from the live policy before each use (the weight sync that trainers with a separate
    inference engine do). Measured on the tiny base, 16 rollouts of 96 tokens: 0.91-1.26 s through the
    adapter, 0.64-0.91 s from this copy; a sync took 2-3 ms. A policy without an adapter (full
    fine-tuning) is its own sampler.

    The sync is exact: each copied weight is `W + delta` computed as peft's own merge computes it,
    from the policy's current (untouched) base weight W; the policy itself is never modified."""

    def __init__(self, policy):
        self.policy = policy
        if not hasattr(policy, "peft_config"):
            self.model, self._pairs = policy, []
            return
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        stray = [n for n, p in policy.named_parameters() if p.requires_grad and "lora_" not in n]
        if stray:
            raise ValueError(f"SamplingCopy syncs LoRA weights only, but these are trainable too: {stray[:3]}")
        layers = [(n, m) for n, m in policy.named_modules() if isinstance(m, LoraLayer)]
        odd = [n for n, m in layers if type(m) not in (LoraLinear, merged_lora_linear()) or m.lora_variant or any(m.lora_bias.values())]
        if odd:
            raise ValueError(f"SamplingCopy folds plain LoRA on Linear layers only, not {odd[:3]} (DoRA, bias, embedding...)")
        self.model = copy.deepcopy(policy).merge_and_unload().eval()
        self.model.requires_grad_(False)
        prefix = "base_model.model."
        self._pairs = [(m, self.model.get_submodule(n.removeprefix(prefix))) for n, m in layers]

    @torch.no_grad()
    def sync(self):
        """The copy with the policy's current weights (call after every optimizer step that matters)."""
        for lora, plain in self._pairs:
            plain.weight.copy_(lora.base_layer.weight)
            for name in lora.active_adapters:
                if name in lora.lora_A:
                    plain.weight.add_(lora.get_delta_weight(name))
        return self.model


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
