"""Benchmark: what the paper profile (profiles/paper.yaml) costs on one GPU - GPU-hours and peak memory
per stage, all runs and seeds - and whether it meets the issue's targets (<= 3 H100-hours in all, every
stage <= 24 GB).

    python perf/paper_projection.py                      # CPU: reduced sizes + counted projection
    python perf/paper_projection.py --quick              # the same, smaller
    python perf/paper_projection.py --json out.json      # on a GPU: measured at full size (docs/performance.md)
    python perf/paper_projection.py --dry-run            # the GPU path's code on the CPU, reduced (figures meaningless)

The model is a random-init `Qwen3ForCausalLM` of Qwen3-0.6B-Base's exact shape (`qwen_tokenizer.
QWEN3_0_6B_BASE`: hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, vocab
151,936, tied embeddings, rope theta 1e6) with Qwen3's tokenizer, built offline. Nothing is downloaded.

What is measured and what is projected:
- On CUDA the units of work are measured at full size through poststate's own code, with each stage's
  models resident and `torch.cuda.max_memory_allocated` read per unit: one optimizer step of SFT mild and
  stress, OPD and RL at the profile's settings (`loop.train`, steps=2, the second timed; the teacher-state
  control is OPD's step with its rollouts replaced by its share of a 64-rollout teacher batch), a 64-rollout
  generation batch and a GSM8K 5-shot eval batch (`rollout.HFRolloutEngine`), a log-likelihood batch
  (`evaluation._score_groups`), activation bytes and the memory grid below. The
  totals multiply measured unit times by the profile's unit counts (printed); the work not run (gates,
  drift, the rest of an evaluation) is priced by `calibrate`: its counted work at the decode-step time and
  the training/forward MFU this run measured.
- On a CPU the same code runs at reduced sizes (a narrow 2-layer Qwen3 with the full vocabulary, short
  rollouts): that checks each method's path end to end and measures (a) peak activation memory per token per
  decoder layer at full width (no gradient checkpointing; with it, a layer's bf16 input is counted), (b) peak
  step memory of OPD and RL at two micro-batch sizes and two step-batch sizes (torch's CPU allocation events,
  via the profiler). Full-size time is projected from counted FLOPs and bytes with the GPU model printed
  (`Gpu`: datasheet peaks and stated assumptions); full-size memory is counted (weights, LoRA + AdamW, the
  measured activation bytes x tokens x layers, a logit chunk, the KV cache).
- `--dry-run` runs the CUDA path's code on the CPU at reduced sizes, to check it before GPU time is spent.

Generation is counted (and, with a random-init model, run) to max_new_tokens for every sequence: an upper
bound per sequence, and close to the truth per batch, since HF `generate` runs a batch until its last
sequence stops and one of 16-128 samples at temperature 1 is likely to run long.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, with poststate installed or not

import torch  # noqa: E402

from poststate.qwen_tokenizer import QWEN3_0_6B_BASE  # noqa: E402  (stdlib-only module)

GIB = 1024**3
PROFILE = ROOT / "profiles" / "paper.yaml"

# poststate.params defaults the profile leaves unset (Optim.dtype / gradient_checkpointing, Adapter, HubData)
OPTIM_DEFAULTS = {"dtype": "auto", "gradient_checkpointing": False}
ADAPTER_DEFAULTS = {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "forward": "adapter",
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
HELDOUT_DEFAULTS = {"prompts_heldout_size": 128, "sft_heldout_size": 200}
GATE_SAMPLES = {"opd": 2, "rl": 4}  # poststate.params Opd/Rl.gate_samples defaults, where a profile sets none

# Row counts of the datasets (the Hub cards; checked against a local copy when one is found)
DATASET_ROWS = {"gsm8k_train": 7473, "gsm8k_test": 1319, "truthfulqa": 817}

# Token lengths of the paper profile's texts under Qwen3's tokenizer, for a machine without the data or the
# tokenizer. Measured by `python perf/paper_projection.py --lengths-only` on ../shared/data (2026-12-01).
LENGTHS_MEASURED: dict[str, float] = {
    "gsm8k_train_rows": 7473, "gsm8k_test_rows": 1319, "truthfulqa_rows": 817,
    "gsm8k_prompt0_mean": 63.38, "gsm8k_prompt0_max": 215,  # 0-shot prompt (OPD/RL rollouts, SFT)
    "gsm8k_gold_mean": 122.71, "gsm8k_gold_max": 454,  # gold answer + EOS (SFT states)
    "gsm8k_prompt5_mean": 992.82, "gsm8k_prompt5_max": 1597,  # 5-shot eval prompt
    "tqa_row_mean": 236.38, "tqa_row_max": 418, "tqa_scored_mean": 74.65,  # packed MC1+MC2 row, scored tokens
    "mmlu_row_mean": 655.38, "mmlu_row_max": 2375,  # 5-shot letter prompt
}

# --------------------------------------------------------------------------- the profile


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_profile(path: Path) -> tuple[dict, str]:
    """(profile dict, where it came from). PyYAML is there wherever transformers is (its dependency)."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such profile (pass --profile)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data, str(path)


def _ns(d: Any) -> Any:
    return SimpleNamespace(**{k: _ns(v) for k, v in d.items()}) if isinstance(d, dict) else d


def need(d: dict, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(f"profile has no key {dotted!r} (missing {part!r})")
        cur = cur[part]
    return cur


def section(profile: dict, name: str, variant: str | None = None) -> SimpleNamespace:
    """A training section as `poststate.params` resolves it: variant keys override the section's shared
    keys (nested dicts merged), params.py's defaults fill what the profile leaves unset."""
    raw = need(profile, name)
    variants = {"sft": ("mild", "stress"), "opd": ("stress", "mild", "teacher_states")}.get(name, ())
    shared = {k: v for k, v in raw.items() if k not in variants}
    if variant is not None:
        if variant not in raw:
            raise KeyError(f"profile has no variant {name}.{variant}")
        shared = deep_merge(shared, raw[variant] or {})
    merged = deep_merge(OPTIM_DEFAULTS, shared)
    if name in GATE_SAMPLES:
        merged.setdefault("gate_samples", GATE_SAMPLES[name])
    merged["adapter"] = deep_merge(ADAPTER_DEFAULTS, shared.get("adapter", {}))
    return _ns(merged)


# --------------------------------------------------------------------------- the model: counts


@dataclass(frozen=True)
class Arch:
    """Qwen3 decoder shapes, and the parameter/FLOP/byte counts that follow from them."""

    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, shape: dict) -> Arch:
        return cls(shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"],
                   shape["num_key_value_heads"], shape["head_dim"], shape["vocab_size"])

    def modules(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_matmul(self) -> int:
        return sum(a * b for a, b in self.modules().values())

    def decoder_params(self) -> int:  # + norms (2 per layer, q/k norms, final)
        return self.layers * (self.layer_matmul() + 2 * self.hidden + 2 * self.head_dim) + self.hidden

    def head_params(self) -> int:  # tied: the embedding is the head
        return self.vocab * self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        return self.layers * sum(r * (a + b) for name, (a, b) in self.modules().items() if name in targets)

    def weight_bytes(self, nbytes: int = 2) -> int:
        return nbytes * (self.decoder_params() + self.head_params())

    def kv_bytes_per_token(self, nbytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * nbytes

    def fwd_flops(self, tokens: float, ctx: float, lora: int = 0) -> float:
        """Decoder forward: 2 FLOPs per weight per token (+ LoRA's), attention 4 * q_dim * ctx per token per layer
        (QK^T and AV over `ctx` attended positions on average)."""
        return 2 * tokens * (self.layers * self.layer_matmul() + lora) + 4 * tokens * self.layers * self.heads * self.head_dim * ctx

    def head_flops(self, positions: float) -> float:
        return 2 * positions * self.vocab * self.hidden


@dataclass(frozen=True)
class Gpu:
    """What turns counted FLOPs and bytes into seconds on a CPU run. Datasheet numbers are NVIDIA's H100 SXM
    figures (bf16 dense tensor-core peak, HBM3 bandwidth); the efficiencies and the decode-step floor are
    ASSUMPTIONS (a GPU run measures instead; `--mfu-train`, `--decode-floor-s`, ... override them)."""

    name: str = "H100 SXM"
    peak_flops: float = 989e12  # datasheet
    hbm_bytes_s: float = 3.35e12  # datasheet
    mfu_train: float = 0.30  # assumed: a 0.6B model, eager PyTorch, LoRA, micro-batches of 4-8k tokens
    mfu_fwd: float = 0.40  # assumed: prefill / log-likelihood forwards
    hbm_eff: float = 0.70  # assumed: share of peak bandwidth a decode step streams at
    decode_floor_s: float = 0.025  # assumed: host time per decode step of eager HF generate (28 layers, ~1k kernel launches)


@dataclass
class Counter:
    """Counted work of one unit: FLOPs in training, forward-only FLOPs, decode steps with their bytes."""

    train_flops: float = 0.0
    fwd_flops: float = 0.0
    decode_steps: float = 0.0
    decode_flops: float = 0.0
    decode_bytes: float = 0.0

    def add(self, other: Counter, times: float = 1.0) -> Counter:
        for k in asdict(self):
            setattr(self, k, getattr(self, k) + times * getattr(other, k))
        return self

    def seconds(self, g: Gpu) -> float:
        train = self.train_flops / (g.peak_flops * g.mfu_train)
        fwd = self.fwd_flops / (g.peak_flops * g.mfu_fwd)
        decode = max(self.decode_steps * g.decode_floor_s, self.decode_bytes / (g.hbm_bytes_s * g.hbm_eff),
                     self.decode_flops / (g.peak_flops * g.mfu_fwd))
        return train + fwd + decode


def chunk_states(vocab: int) -> int:
    from poststate.objective import LOGIT_BUDGET

    return max(1, LOGIT_BUDGET // vocab)


KV_PASSES = 3  # per decode step: attention reads K and V; DynamicCache's torch.cat append re-reads and re-writes them


def count_generate(a: Arch, batch: int, prompt: float, new: int, prompt_max: float | None = None) -> Counter:
    """One HF `generate` call: prefill of B left-padded prompts (to the longest), then `new` decode steps, each
    streaming the bf16 weights and KV_PASSES passes over the batch's KV cache; logits at the last position only."""
    P = prompt_max if prompt_max is not None else prompt
    c = Counter(fwd_flops=a.fwd_flops(batch * P, P / 2) + a.head_flops(batch))
    ctx = P + new / 2
    c.decode_steps = new
    c.decode_flops = new * (a.fwd_flops(batch, ctx) + a.head_flops(batch))
    c.decode_bytes = new * (a.weight_bytes() + KV_PASSES * batch * ctx * a.kv_bytes_per_token())
    return c


def count_train(a: Arch, seq_lens: list[float], states: float, micro: int, lora: int, ckpt: bool) -> Counter:
    """One optimizer step over sequences of the given lengths, micro-batches of `micro` rows sorted by length
    and padded to each micro-batch's longest (as `Supervised.micro_batches` cuts them), the LM head at
    `states` positions in chunks. Frozen base (LoRA): the backward pass computes input gradients (1x the
    forward's matmul FLOPs), LoRA weight gradients and attention's backward (2x its forward); gradient
    checkpointing recomputes the forward once more; more than one logit chunk per micro-batch recomputes the
    head's chunks."""
    lens = sorted(seq_lens, reverse=True)
    fl = 0.0
    n_micro = max(1, math.ceil(len(lens) / micro))
    per_micro_states = states / n_micro
    for i in range(0, len(lens), micro):
        grp = lens[i : i + micro]
        T = grp[0]
        toks = T * len(grp)
        fwd = a.fwd_flops(toks, T / 2, lora)
        attn = 4 * toks * a.layers * a.heads * a.head_dim * T / 2
        fl += fwd * (2 + (1 if ckpt else 0)) + attn + 2 * toks * lora
        head = a.head_flops(per_micro_states)
        fl += head * (2 + (1 if per_micro_states > chunk_states(a.vocab) else 0))
    return Counter(train_flops=fl)


# --------------------------------------------------------------------------- the profile's work, unit by unit


@dataclass
class Unit:
    """`count` units of one kind of work in a stage, each counted (`work`) and maybe measured (`measured_s`)."""

    stage: str
    what: str
    count: float
    work: Counter
    measured_s: float | None = None
    measured_peak_gib: float | None = None

    def seconds(self, g: Gpu) -> tuple[float, str]:
        if self.measured_s is not None:
            return self.count * self.measured_s, "measured"
        return self.count * self.work.seconds(g), "projected"


def uniform_prefix_lengths(n: int, answer: int, cuts: int, rng: random.Random) -> list[int]:
    """Prefix lengths of `n` rollouts' cut states (`methods.cut_points`, uniform rule) when every rollout's
    answer is `answer` tokens long."""
    return [c for _ in range(n) for c in sorted(rng.sample(range(answer + 1), min(cuts, answer + 1)))]


def inventory(profile: dict, L: dict[str, float], a: Arch) -> list[Unit]:
    """Every unit of work the paper profile's DAG runs, counted at full size, per stage, all seeds."""
    seeds = len(need(profile, "seeds"))
    hub = need(profile, "prepare.hub")
    heldout = {k: hub.get(k, v) for k, v in HELDOUT_DEFAULTS.items()}
    n_train = DATASET_ROWS["gsm8k_train"]
    n_sft = hub.get("sft_size") or n_train - hub["prompts_size"] - heldout["prompts_heldout_size"] - heldout["sft_heldout_size"]
    h = need(profile, "eval.harness")
    n_gsm = min(DATASET_ROWS["gsm8k_test"], h.get("gsm8k_limit") or 10**9, hub.get("gsm8k_test_limit") or 10**9)
    n_tqa = min(DATASET_ROWS["truthfulqa"], h.get("truthfulqa_limit") or 10**9, hub.get("truthfulqa_limit") or 10**9)
    n_mmlu = len(hub["mmlu_subjects"]) * hub["mmlu_per_subject"]
    P0, gold, P5 = L["gsm8k_prompt0_mean"], L["gsm8k_gold_mean"], L["gsm8k_prompt5_mean"]
    rng = random.Random(0)
    units: list[Unit] = []

    for v in ("mild", "stress"):
        p = section(profile, "sft", v)
        rows = p.batch_size * p.grad_accum
        steps = math.ceil(n_sft * p.epochs / rows)
        lora = a.lora_params(p.adapter.r, p.adapter.target_modules)
        step = count_train(a, [P0 + gold] * rows, rows * gold, p.batch_size, lora, p.gradient_checkpointing)
        units.append(Unit(f"sft@{v}", f"optimizer step ({rows} rows x {P0 + gold:.0f} tokens)", seeds * steps, step))
        gate = Counter(fwd_flops=a.fwd_flops(heldout["sft_heldout_size"] * (P0 + gold), (P0 + gold) / 2)
                       + a.head_flops(heldout["sft_heldout_size"] * gold))
        units.append(Unit(f"sft@{v}", f"validity gate (NLL of {heldout['sft_heldout_size']} held-out rows, before+after)", seeds * 2, gate))

    for v in ("stress", "mild", "teacher_states"):
        p = section(profile, "opd", v)
        new, Lc, K = p.rollout.max_new_tokens, p.continuation.length, p.continuation.cuts
        n = p.prompts_per_step
        lora = a.lora_params(p.adapter.r, p.adapter.target_modules)
        step = Counter()
        if p.states == "student":  # the student's rollouts, fresh each step
            for b in range(0, n, p.gen_batch_size):
                step.add(count_generate(a, min(p.gen_batch_size, n - b), P0, new))
        else:  # the teacher's, drawn a generation batch ahead (gen_batch_size // n steps per batch)
            ahead = max(1, p.gen_batch_size // n)
            step.add(count_generate(a, ahead * n, P0, new), 1 / ahead)
        prefixes = uniform_prefix_lengths(n, new, K, rng)
        ctxs = [P0 + x for x in prefixes]
        for b in range(0, len(ctxs), p.gen_batch_size):
            grp = ctxs[b : b + p.gen_batch_size]
            step.add(count_generate(a, len(grp), statistics.mean(grp), Lc, prompt_max=max(grp)))
        step.add(count_train(a, [c + Lc for c in ctxs], len(ctxs) * Lc, p.batch_size, lora, p.gradient_checkpointing))
        units.append(Unit(f"opd@{v}", f"optimizer step ({n} rollouts x {new} + {len(ctxs)} continuations x {Lc})", seeds * p.steps, step))
        # the gate (stages/opd.py): held-out states drawn once (gate_samples rollouts per prompt, the teacher's
        # continuation from each cut), scored before and after; OPD draws them again from the trained student
        # and scores them once more (its secondary objective)
        m = heldout["prompts_heldout_size"] * p.gate_samples
        draw = Counter()
        for b in range(0, m, p.gen_batch_size):
            draw.add(count_generate(a, min(p.gen_batch_size, m - b), P0, new))
        g_ctx = [P0 + x for x in uniform_prefix_lengths(m, new, K, rng)]
        for b in range(0, len(g_ctx), p.gen_batch_size):
            grp = g_ctx[b : b + p.gen_batch_size]
            draw.add(count_generate(a, len(grp), statistics.mean(grp), Lc, prompt_max=max(grp)))
        ce = Counter(fwd_flops=a.fwd_flops(sum(g_ctx) + len(g_ctx) * Lc, statistics.mean(g_ctx) / 2) + a.head_flops(len(g_ctx) * Lc))
        own = p.states == "student"
        units.append(Unit(f"opd@{v}", f"validity gate: held-out states ({m} rollouts, their continuations)" + (", twice" if own else ""),
                          seeds * (2 if own else 1), draw))
        units.append(Unit(f"opd@{v}", f"validity gate: CE of those states ({len(g_ctx)} states)", seeds * (3 if own else 2), ce))

    p = section(profile, "rl")
    n = p.prompts_per_step * p.group_size
    new = p.rollout.max_new_tokens
    lora = a.lora_params(p.adapter.r, p.adapter.target_modules)
    step = Counter()
    for b in range(0, n, p.gen_batch_size):
        step.add(count_generate(a, min(p.gen_batch_size, n - b), P0, new))
    step.add(count_train(a, [P0 + new] * n, n * new, p.batch_size, lora, p.gradient_checkpointing), 1.0)
    if p.kl_coef > 0:  # the reference pass (adapter disabled), forward only
        step.add(Counter(fwd_flops=a.fwd_flops(n * (P0 + new), (P0 + new) / 2) + a.head_flops(n * new)))
    units.append(Unit("rl", f"optimizer step ({n} rollouts x {new}, {math.ceil(n / p.batch_size)} micro-batches)", seeds * p.steps, step))
    m = heldout["prompts_heldout_size"]
    gate = Counter()
    for k in (m, m * p.gate_samples):  # greedy, then gate_samples per prompt at the rollout temperature
        for b in range(0, k, p.gen_batch_size):
            gate.add(count_generate(a, min(p.gen_batch_size, k - b), P0, new))
    # stages/rl.py: the base once ("before", the same initial policy for every seed), each seed after
    units.append(Unit("rl", f"validity gate ({m} greedy + {m * p.gate_samples} sampled rollouts; before once, after per seed)",
                      seeds + 1, gate))

    # evals: the base once (+ its noise-floor rollouts), then every trained run and the teacher, per seed
    e = need(profile, "eval")
    evals = 1 + seeds * 7  # sft_mild, sft_stress, teacher (a merged adapter: evaluated), opd x3, rl
    gb = h["gen_batch_size"]
    gsm = Counter()
    for b in range(0, n_gsm, gb):
        gsm.add(count_generate(a, min(gb, n_gsm - b), P5, h["gsm8k_max_new_tokens"], prompt_max=L["gsm8k_prompt5_max"] if b == 0 else P5))
    units.append(Unit("eval", f"GSM8K {n_gsm} x {h['gsm8k_fewshot']}-shot greedy, {h['gsm8k_max_new_tokens']} new tokens", evals, gsm))
    ll = Counter(fwd_flops=a.fwd_flops(n_tqa * L["tqa_row_mean"], L["tqa_row_mean"] / 2) + a.head_flops(n_tqa * L["tqa_scored_mean"])
                 + a.fwd_flops(n_mmlu * L["mmlu_row_mean"], L["mmlu_row_mean"] / 2) + a.head_flops(n_mmlu * 4))
    units.append(Unit("eval", f"log-likelihoods: TruthfulQA {n_tqa} items (MC1+MC2 packed), MMLU {n_mmlu} x 5-shot", evals, ll))
    d = e["drift"]
    dn, dnew = d["prompts"], d["rollout"]["max_new_tokens"]
    drift = Counter()
    for b in range(0, dn, gb):
        drift.add(count_generate(a, min(gb, dn - b), P0, dnew))
    states = 2 * dn * d["cuts"]  # hidden features of the reference's and the run's cut states, through the base
    drift.add(Counter(fwd_flops=a.fwd_flops(states * (P0 + dnew / 2), (P0 + dnew / 2) / 2)))
    drift.add(Counter(fwd_flops=2 * a.fwd_flops(dn * (P0 + dnew), (P0 + dnew) / 2) + 2 * a.head_flops(dn * dnew)))  # KL(base||run)
    loc = d["locality_states"]
    drift.add(Counter(fwd_flops=a.fwd_flops(loc * (P0 + dnew), (P0 + dnew) / 2) + a.head_flops(loc * dnew / 2)))
    for b in range(0, loc, gb):  # the base's own continuation of each trained state (RL's: up to max_new_tokens)
        drift.add(count_generate(a, min(gb, loc - b), P0 + dnew / 2, dnew))
    units.append(Unit("eval", f"drift: {dn} rollouts x {dnew}, hidden MMD, KL(base||run), locality of {loc} states", evals, drift))
    floor = Counter()
    for b in range(0, dn, gb):
        floor.add(count_generate(a, min(gb, dn - b), P0, dnew))
    units.append(Unit("eval", "the base's noise-floor rollouts (eval_base only)", 1, floor))
    return units


# --------------------------------------------------------------------------- lengths


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def find_data(explicit: Path | None) -> Path | None:
    """A directory laid out like ../shared/data (gsm8k/{train,test}.jsonl, truthfulqa/multiple_choice.jsonl,
    mmlu/{dev,test}.jsonl)."""
    for d in ([explicit] if explicit else [ROOT / "data" / "hub", ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]):
        if d is not None and (d / "gsm8k" / "train.jsonl").is_file():
            return d
    if explicit:
        raise FileNotFoundError(f"--data {explicit}: no gsm8k/train.jsonl there")
    return None


def measure_lengths(tok, data: Path, profile: dict) -> dict[str, float]:
    """Token lengths of the texts the paper profile trains and evaluates on, as poststate builds them."""
    from poststate import prompts

    enc = lambda texts: [len(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"]]  # noqa: E731
    h = need(profile, "eval.harness")
    train, test = read_jsonl(data / "gsm8k" / "train.jsonl"), read_jsonl(data / "gsm8k" / "test.jsonl")
    p0 = enc(prompts.gsm8k_prompt(r["question"], []) for r in train)
    gold = [n + 1 for n in enc(prompts.gsm8k_target(r["answer"]) for r in train)]  # + EOS
    shots = prompts.fewshot_indices(len(test), len(train), h["gsm8k_fewshot"], h["gsm8k_fewshot_seed"])
    p5 = enc(prompts.gsm8k_prompt(r["question"], [train[j] for j in idx]) for r, idx in zip(test, shots))
    tqa_rows, tqa_scored = [], []
    for r in read_jsonl(data / "truthfulqa" / "multiple_choice.jsonl"):
        ctx = enc([prompts.truthfulqa_prompt(r["question"], prompts.TRUTHFULQA_PREAMBLE)])[0]
        conts = list(dict.fromkeys(prompts.truthfulqa_continuations(r["mc1_targets"]["choices"] + r["mc2_targets"]["choices"])))
        lens = enc(conts)
        tqa_rows.append(ctx + sum(n - 1 for n in lens))
        tqa_scored.append(sum(lens))
    hub = need(profile, "prepare.hub")
    test_m, dev_m = read_jsonl(data / "mmlu" / "test.jsonl"), read_jsonl(data / "mmlu" / "dev.jsonl")
    rows_m = [r for s in hub["mmlu_subjects"] for r in [x for x in test_m if x["subject"] == s][: hub["mmlu_per_subject"]]]
    shots_m = {s: [x for x in dev_m if x["subject"] == s][: h["mmlu_fewshot"]] for s in hub["mmlu_subjects"]}
    mm = enc(prompts.mmlu_prompt(r, shots_m[r["subject"]], h["mmlu_style"]) for r in rows_m)
    return {
        "gsm8k_train_rows": len(train), "gsm8k_test_rows": len(test), "truthfulqa_rows": len(tqa_rows),
        "gsm8k_prompt0_mean": statistics.mean(p0), "gsm8k_prompt0_max": max(p0),
        "gsm8k_gold_mean": statistics.mean(gold), "gsm8k_gold_max": max(gold),
        "gsm8k_prompt5_mean": statistics.mean(p5), "gsm8k_prompt5_max": max(p5),
        "tqa_row_mean": statistics.mean(tqa_rows), "tqa_row_max": max(tqa_rows), "tqa_scored_mean": statistics.mean(tqa_scored),
        "mmlu_row_mean": statistics.mean(mm), "mmlu_row_max": max(mm),
    }


def synthetic_rows(n: int, question_tokens: int, answer_tokens: int, seed: int) -> list[dict]:
    """GSM8K-schema rows of roughly the given token lengths (common one-token words), for a machine without
    the data: the random-init model's cost depends on lengths only."""
    words = [" apples", " the", " has", " and", " more", " each", " she", " how", " many", " of", " day", " cost"]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = "".join(rng.choice(words) for _ in range(question_tokens - 1)).strip() + "?"
        a = "".join(rng.choice(words) for _ in range(answer_tokens - 6)).strip() + f"\n#### {rng.randint(2, 99)}"
        rows.append({"question": q, "answer": a})
    return rows


# --------------------------------------------------------------------------- building models


def load_tokenizer(path: Path | None):
    if path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from poststate.qwen_tokenizer import qwen3_tokenizer

    try:
        return qwen3_tokenizer()
    except ModuleNotFoundError as e:
        raise SystemExit(f"{e}\nOr pass --tokenizer DIR: a saved Qwen3 tokenizer (e.g. from `qwen3_tokenizer().save_pretrained(DIR)`)") from e


def build_model(shape: dict, dtype: torch.dtype, device: str, seed: int):
    """A random-init Qwen3ForCausalLM of Qwen3-0.6B-Base's architecture (`shape` overriding), made on `device`."""
    from transformers import Qwen3ForCausalLM

    from poststate.qwen_tokenizer import qwen3_config

    config = qwen3_config(**{k: v for k, v in shape.items() if k != "vocab_size"})
    config.vocab_size = shape.get("vocab_size", config.vocab_size)  # below the tokenizer's: activation measurements only
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    return model.eval()


def check_counts(a: Arch, profile: dict) -> None:
    """The counted parameters against a Qwen3ForCausalLM (and its LoRA) built on the meta device."""
    from transformers import Qwen3ForCausalLM

    from poststate.qwen_tokenizer import qwen3_config

    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config())
    built = sum(w.numel() for w in model.parameters())
    if built != a.decoder_params() + a.head_params():
        raise RuntimeError(f"Arch counts {a.decoder_params() + a.head_params()} parameters, Qwen3ForCausalLM has {built}")
    adapter = section(profile, "sft", "stress").adapter
    got = sum(w.numel() for n, w in lora(model, adapter).named_parameters() if "lora_" in n)
    if got != a.lora_params(adapter.r, adapter.target_modules):
        raise RuntimeError(f"Arch counts {a.lora_params(adapter.r, adapter.target_modules)} LoRA r{adapter.r} parameters, peft made {got}")


def lora(model, adapter):
    from poststate.modeling import with_adapter

    return with_adapter(model, adapter)


# --------------------------------------------------------------------------- measuring


class Clock:
    """Wall time of a block, synchronising CUDA; peak CUDA memory of it (reset before)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds = 0.0
        self.peak_gib: float | None = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / GIB
        self.seconds = time.perf_counter() - self.t
        return False


def cpu_peak_bytes(fn) -> tuple[int, Any]:
    """Peak bytes allocated by torch on the CPU while `fn` runs, above what was live when it started (the
    profiler's allocation events, summed in time order). Returns (peak, fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak, out


def train_steps(lm, method, p, steps: int, pad_id: int) -> tuple[list[float], Any]:
    """Seconds of each optimizer step of `loop.train` (its own per-step clock), and the TrainResult with
    `rollout_seconds` / `continuation_seconds`: the last step's generation time in the state source (rollouts)
    and in the signal (teacher continuations)."""
    from poststate.loop import train

    secs: list[float] = []
    gen: list[tuple[float, float]] = []

    def log(_step, _metrics, dt):
        secs.append(dt)
        gen.append((getattr(method.source, "gen_seconds", 0.0), getattr(method.signal, "gen_seconds", 0.0)))

    result = train(lm, method, p, steps, pad_id=pad_id, progress=False, log=log)
    prev = gen[-2] if len(gen) > 1 else (0.0, 0.0)
    result.rollout_seconds, result.continuation_seconds = gen[-1][0] - prev[0], gen[-1][1] - prev[1]
    return secs, result


def methods_for(profile: dict, tok, rows: list[dict], teacher, over: dict | None = None):
    """(name, params, method factory) of each training method the profile runs, params overridden by `over`."""
    from poststate.methods import opd_method, rl_method, sft_method

    over = over or {}

    def p_of(name, variant=None):
        p = section(profile, name, variant)
        for k, v in over.get(name, {}).items():
            target = p
            *parents, last = k.split(".")
            for part in parents:
                target = getattr(target, part)
            setattr(target, last, v)
        return p

    return {
        "sft@mild": (p_of("sft", "mild"), lambda p: sft_method("sft_mild", rows, tok, p, seed=0)),
        "sft@stress": (p_of("sft", "stress"), lambda p: sft_method("sft_stress", rows, tok, p, seed=0)),
        "opd@stress": (p_of("opd", "stress"), lambda p: opd_method("opd_stress", rows, tok, teacher, p, seed=0)),
        "opd@teacher_states": (p_of("opd", "teacher_states"), lambda p: opd_method("opd_teacher_states", rows, tok, teacher, p, seed=0)),
        "rl": (p_of("rl"), lambda p: rl_method("rl", rows, tok, p, seed=0)),
    }


def activation_bytes(shape: dict, tokens_T: int, rows: int, dropout: float, seed: int, device: str, variant: str = "lora") -> dict[str, float]:
    """Peak bytes of one forward+backward of `StateObjective` (token loss at every position) over a (rows, T)
    micro-batch without padding, with bf16 weights, fp32 LoRA (r 16) and bf16 autocast (the CUDA path's
    dtypes), at 1 and 2 decoder layers: the difference is one layer's bytes. Returned per token, per layer.
    CPU: torch's allocation events (profiler); CUDA: max_memory_allocated above the live set. `variant`
    (`--lora-probe`): "lora" (peft's fp32 adapter weights), "lora_bf16" (the adapter cast to bf16), "none"
    (no LoRA; the norms' weights train, so that a backward pass runs through every layer)."""
    from poststate.objective import LossConfig, Micro, StateObjective

    out = {}
    for layers in (1, 2):
        model = build_model({**shape, "num_hidden_layers": layers}, torch.bfloat16, device, seed)
        if variant == "none":
            lm = model.requires_grad_(False)
            for name, w in lm.named_parameters():
                w.requires_grad_("norm" in name)
        else:
            lm = lora(model, _ns({**ADAPTER_DEFAULTS, "r": 16, "alpha": 32, "dropout": dropout}))
            if variant == "lora_bf16":
                for name, w in lm.named_parameters():
                    if "lora_" in name:
                        w.data = w.data.to(torch.bfloat16)
        lm.train()
        obj = StateObjective(lm, LossConfig(kind="tokens"))
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, min(150_000, shape["vocab_size"]), (rows, tokens_T), generator=g)
        pos = torch.arange(rows * tokens_T).view(rows, tokens_T)[:, :-1].reshape(-1)
        micro = Micro(ids, torch.ones_like(ids), pos, ids.view(-1)[pos + 1], pos // tokens_T).to(device)

        step = functools.partial(_forward_backward, obj, micro, device)
        step()  # warm-up: lazily built buffers (rotary cache, autocast casts) out of the measurement
        lm.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            out[layers] = torch.cuda.max_memory_allocated() - start
        else:
            out[layers], _ = cpu_peak_bytes(step)
        del step, obj, lm, model
    return {"per_token_per_layer": (out[2] - out[1]) / (rows * tokens_T), "one_layer_peak": out[1], "two_layer_peak": out[2]}


def _forward_backward(obj, micro, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, _ = obj(micro)
    loss.backward()


def measure_activations(device: str, T: int, B: int) -> dict[str, float]:
    """Activation bytes per token per decoder layer without gradient checkpointing, for SFT's LoRA (dropout
    0.05: peft stores the dropped input too) and OPD/RL's (dropout 0). With checkpointing a layer keeps only
    its bf16 input (2 x hidden bytes per token; counted, not measured) and one layer is recomputed at a time."""
    # full width; on a CPU a 4096-token vocabulary: the head's share is the same at 1 and 2 layers and cancels
    full_width = {**{k: v for k, v in QWEN3_0_6B_BASE.items() if k != "num_hidden_layers"}, "vocab_size": 151_936 if device == "cuda" else 4096}
    print(f"\n{elapsed()} [measured, {device}] peak activation bytes per token per decoder layer at full width (hidden 1024; bf16 "
          f"weights, fp32 LoRA r16, bf16 autocast; {B} x {T} tokens; 2 layers minus 1)", flush=True)
    act: dict[str, float] = {}
    for key, dropout in (("sft", 0.05), ("opd", 0.0)):
        act[key] = activation_bytes(full_width, T, B, dropout, seed=0, device=device)["per_token_per_layer"]
        print(f"  LoRA dropout {dropout} ({key}): {act[key] / 1024:6.1f} KiB/token/layer", flush=True)
    act["rl"] = act["opd"]  # the same objective path (token log-probs at states) and dtypes, no dropout
    return act


def lora_probe(device: str, T: int, B: int) -> dict[str, float]:
    """Where the activation bytes come from: OPD's LoRA with peft's fp32 adapter weights, with the adapter
    cast to bf16, and without LoRA."""
    full_width = {**{k: v for k, v in QWEN3_0_6B_BASE.items() if k != "num_hidden_layers"}, "vocab_size": 151_936 if device == "cuda" else 4096}
    print(f"\n{elapsed()} [measured, {device}] activation bytes per token per layer by LoRA variant ({B} x {T} tokens)", flush=True)
    out = {}
    for variant, what in (("lora", "LoRA r16, peft's fp32 adapter weights"), ("lora_bf16", "LoRA r16, adapter cast to bf16"),
                          ("none", "no LoRA (norm weights trained)")):
        out[variant] = activation_bytes(full_width, T, B, 0.0, seed=0, device=device, variant=variant)["per_token_per_layer"]
        print(f"  {what:40s} {out[variant] / 1024:6.1f} KiB/token/layer", flush=True)
    return out


# --------------------------------------------------------------------------- memory projection (counted)


def project_memory(a: Arch, profile: dict, L: dict[str, float], act: dict[str, float]) -> dict[str, dict[str, float]]:
    """Peak GPU memory of each stage, counted (bytes): resident weights (bf16) and LoRA + AdamW state (fp32),
    plus the larger of the generation phase (KV cache of the generation batch at the longest prompt + new
    tokens, a few (B, V) float32 logit rows) and the training phase (the measured activation bytes per token
    per layer x the longest micro-batch's padded tokens x layers; with gradient checkpointing a layer's bf16
    input per layer plus one layer recomputed; one logit chunk's bf16 logits, float32 copy, log-softmax and
    gradient). `total` as the profile sets `gradient_checkpointing`, `total_ckpt` with it on."""
    w = a.weight_bytes()
    kv = a.kv_bytes_per_token()
    chunk = chunk_states(a.vocab)
    P0max, P5max = L["gsm8k_prompt0_max"], L["gsm8k_prompt5_max"]
    out: dict[str, dict[str, float]] = {}

    def lora_state(p):
        return 16 * a.lora_params(p.adapter.r, p.adapter.target_modules)  # fp32 param, grad, AdamW m and v

    def train_phase(p, T, states_per_micro, key, ckpt):
        per_tok = 2 * a.hidden * a.layers + act[key] if ckpt else act[key] * a.layers
        return per_tok * p.batch_size * T + min(states_per_micro, chunk) * a.vocab * (2 + 4 + 4 + 4)

    def gen_phase(B, T):
        return B * T * kv + 3 * B * a.vocab * 4

    def stage(name, weights, p, gen, T, states, key):
        out[name] = {"weights": weights, "lora+adam": lora_state(p) if p else 0.0}
        for suffix, ckpt in (("", p.gradient_checkpointing if p else False), ("_ckpt", True)):
            phase = max(gen, train_phase(p, T, states, key, ckpt) if p else 0.0)
            out[name]["phase" + suffix] = phase
            out[name]["total" + suffix] = weights + out[name]["lora+adam"] + phase

    for v in ("mild", "stress"):
        p = section(profile, "sft", v)
        stage(f"sft@{v}", w, p, 0.0, min(p.max_len, P0max + L["gsm8k_gold_max"]), p.batch_size * L["gsm8k_gold_mean"], "sft")
    for v in ("stress", "mild", "teacher_states"):
        p = section(profile, "opd", v)
        T = min(p.max_len, P0max + p.rollout.max_new_tokens + p.continuation.length)
        gen = max(gen_phase(min(p.gen_batch_size, p.prompts_per_step * (1 if p.states == "student" else p.gen_batch_size // p.prompts_per_step)),
                            P0max + p.rollout.max_new_tokens),
                  gen_phase(min(p.gen_batch_size, p.prompts_per_step * p.continuation.cuts), T))
        # the student, the frozen teacher and (student states) the student's merged sampling copy
        stage(f"opd@{v}", (3 if p.states == "student" else 2) * w, p, gen, T, p.batch_size * p.continuation.length, "opd")
    p = section(profile, "rl")
    T = min(p.max_len, P0max + p.rollout.max_new_tokens)
    stage("rl", 2 * w, p, gen_phase(min(p.gen_batch_size, p.prompts_per_step * p.group_size), T), T,
          p.batch_size * p.rollout.max_new_tokens, "rl")
    h = need(profile, "eval.harness")
    gsm = gen_phase(h["gen_batch_size"], P5max + h["gsm8k_max_new_tokens"])
    ll = h["ll_batch_size"] * L["tqa_scored_mean"] * a.vocab * (2 + 4 + 4)  # a batch's (B, K, V) logits, float copy, log-softmax
    stage("eval", 2 * w, None, max(gsm, ll), 0, 0, "")  # the base and the evaluated model
    return out


# --------------------------------------------------------------------------- the runs


T0 = time.perf_counter()


def elapsed() -> str:
    return f"[{time.perf_counter() - T0:4.0f} s]"


def reduced(quick: bool) -> tuple[dict, dict]:
    """The CPU runs' model shape (narrow, 2 layers, Qwen3's full vocabulary) and profile overrides (short
    rollouts and continuations, small step batches)."""
    small = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 32}
    new, cont = (8, 4) if quick else (24, 8)
    over = {
        "sft": {"batch_size": 2 if quick else 4, "grad_accum": 2, "max_len": 96},
        "opd": {"rollout.max_new_tokens": new, "prompts_per_step": 4, "batch_size": 4, "gen_batch_size": 8,
                "continuation.length": cont, "continuation.cuts": 2, "max_len": 160},
        "rl": {"rollout.max_new_tokens": new, "prompts_per_step": 2, "group_size": 4, "batch_size": 4, "gen_batch_size": 8, "max_len": 160},
    }
    return small, over


def run_cpu(args, profile: dict, L: dict[str, float], tok, rows: list[dict]) -> dict[str, Any]:
    """Reduced sizes on the CPU: each method's step through `loop.train`, activation bytes, memory vs micro-batch."""
    small, over = reduced(args.quick)
    out: dict[str, Any] = {"reduced_shape": small, "reduced_overrides": over, "steps": {}}
    teacher = build_model(small, torch.float32, "cpu", seed=1).requires_grad_(False)
    print(f"\n{elapsed()} [measured, CPU, reduced] one optimizer step of each method through loop.train (Qwen3 {small}, vocab "
          f"{QWEN3_0_6B_BASE['vocab_size']}; fp32; second of 2 steps)", flush=True)
    for name, (p, make) in methods_for(profile, tok, rows, teacher, over).items():
        lm = lora(build_model(small, torch.float32, "cpu", seed=0), p.adapter)
        secs, result = train_steps(lm, make(p), p, 2, tok.pad_token_id)
        out["steps"][name] = {"seconds": secs, "loss": result.last["loss"], "states": result.last["states"],
                              "tokens": result.last["tokens"], "generated_tokens": result.generated_tokens}
        print(f"  {name:20s} {secs[-1]:6.2f} s  loss {result.last['loss']:.3f}  states {result.last['states']:.0f}  "
              f"tokens {result.last['tokens']:.0f}  generated {result.generated_tokens}", flush=True)

    T, B = (64, 2) if args.quick else (128, 4)
    act = measure_activations("cpu", T, B)
    out["activation_bytes"] = act

    print(f"\n{elapsed()} [measured, CPU, reduced] peak torch CPU allocations of one optimizer step (loop.train, steps=1), "
          "the generation batch fixed", flush=True)
    out["micro_batch_memory"] = memory_vs_micro(profile, tok, rows, teacher, small, over, "cpu")
    return out


def memory_vs_micro(profile, tok, rows, teacher, shape, over, device: str) -> list[dict]:
    """Peak step memory of OPD and RL at two micro-batch sizes x two step-batch sizes, the generation batch
    fixed (CPU: torch's allocation events above the live set at the step's start; CUDA: max_memory_allocated,
    all resident models included)."""
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    settings = {
        "opd@stress": [(b, n) for n in ((8, 16) if cuda else (4, 8)) for b in ((8, 16) if cuda else (2, 4))],
        "rl": [(b, n) for n in ((8, 16) if cuda else (2, 4)) for b in ((8, 16) if cuda else (2, 4))],
    }
    table = []
    for name, grid in settings.items():
        sec = "opd" if name.startswith("opd") else "rl"
        for b, n in grid:
            o = copy.deepcopy(over)
            per_prompt = 1 if sec == "opd" else over.get("rl", {}).get("group_size", section(profile, "rl").group_size)
            o.setdefault(sec, {}).update({"batch_size": b, "prompts_per_step": n, "gen_batch_size": min(k for _, k in grid) * per_prompt})
            p, make = methods_for(profile, tok, rows, teacher, o)[name]
            lm = lora(build_model(shape, dtype, device, seed=0), p.adapter)
            method = make(p)
            if cuda:
                with Clock(True) as c:
                    train_steps(lm, method, p, 1, tok.pad_token_id)
                peak = c.peak_gib * GIB
            else:
                peak, _ = cpu_peak_bytes(functools.partial(train_steps, lm, method, p, 1, tok.pad_token_id))
            step = n * (p.continuation.cuts if sec == "opd" else p.group_size)
            table.append({"method": name, "micro_batch": b, "step_batch": step, "gen_batch": p.gen_batch_size, "peak_bytes": peak})
            print(f"  {name:12s} micro-batch {b:3d}  step batch {step:4d} sequences (generation batch {p.gen_batch_size}): "
                  f"peak {peak / 2**20:9.1f} MiB", flush=True)
            del lm, method
            if cuda:
                torch.cuda.empty_cache()
    for name in settings:
        rows_ = [r for r in table if r["method"] == name]
        micro, step = sorted({r["micro_batch"] for r in rows_}), sorted({r["step_batch"] for r in rows_})
        peak = {(r["micro_batch"], r["step_batch"]): r["peak_bytes"] for r in rows_}
        d_micro = statistics.mean(peak[micro[1], s] - peak[micro[0], s] for s in step)
        d_step = statistics.mean(peak[m, step[1]] - peak[m, step[0]] for m in micro)
        print(f"  {name}: micro-batch {micro[0]} -> {micro[1]} adds {d_micro / 2**20:+.1f} MiB; step batch {step[0]} -> {step[1]} "
              f"adds {d_step / 2**20:+.1f} MiB (means over the other setting)", flush=True)
    return table


def run_gpu(args, profile: dict, L: dict[str, float], tok, rows: list[dict], units: list[Unit], device: str = "cuda",
            shape: dict | None = None, over: dict | None = None) -> dict[str, Any]:
    """Full size on CUDA: the units measured (time and peak memory) with each stage's models resident; the
    measured times go into `units` (the rest is priced by `calibrate`). `--dry-run` runs this same code on
    the CPU at reduced sizes (`shape`, `over`), to check it before spending GPU time."""
    from poststate.prompts import GSM8K_STOPS, fewshot_indices, gsm8k_prompt
    from poststate.rollout import HFRolloutEngine, SamplingParams

    cuda = device == "cuda"
    shape, over = shape or {}, over or {}
    dtype = torch.bfloat16 if cuda else torch.float32
    out: dict[str, Any] = {"device_name": torch.cuda.get_device_name(0) if cuda else "CPU (dry run)", "steps": {}, "units": {}}
    teacher = build_model(shape, dtype, device, seed=1).requires_grad_(False)
    h = need(profile, "eval.harness")
    by: dict[str, tuple[float, float | None]] = {}
    print(f"\n{elapsed()} [measured, {device}] one optimizer step of each method through loop.train (steps=2, the second timed)", flush=True)
    for name, (p, make) in methods_for(profile, tok, rows, teacher, over).items():
        if name == "opd@teacher_states":  # its rollouts come a generation batch ahead: priced from opd@stress below
            continue
        teacher.to("cpu" if name.startswith("sft") else device)  # an SFT stage holds the student only
        if cuda:
            torch.cuda.empty_cache()
        lm = lora(build_model(shape, dtype, device, seed=0), p.adapter)
        method = make(p)
        with Clock(cuda) as c:
            secs, result = train_steps(lm, method, p, 2, tok.pad_token_id)
        gen = result.rollout_seconds + result.continuation_seconds
        out["steps"][name] = {"seconds": secs, "rollout_seconds": result.rollout_seconds, "continuation_seconds": result.continuation_seconds,
                              "peak_gib": c.peak_gib, "generated_tokens": result.generated_tokens, "tokens": result.last["tokens"],
                              "states": result.last["states"]}
        by[name] = (secs[-1], c.peak_gib)
        print(f"  {name:20s} {secs[-1]:7.2f} s (generation {gen:.2f} s)  peak {c.peak_gib or 0:6.2f} GiB  (tokens "
              f"{result.last['tokens']:.0f}, states {result.last['states']:.0f}, generated {result.generated_tokens} in 2 steps)", flush=True)
        del lm, method
        if cuda:
            torch.cuda.empty_cache()

    student = build_model(shape, dtype, device, seed=0)
    teacher.to(device)

    def timed_generate(model, prompts, sp, batch):
        HFRolloutEngine(model, tok, batch).generate(prompts[:4], SamplingParams(max_new_tokens=4, temperature=sp.temperature, stop=sp.stop), seed=1)
        with Clock(cuda) as c:
            r = HFRolloutEngine(model, tok, batch).generate(prompts, sp, seed=0)
        return c, statistics.mean(map(len, r.completion_ids))

    p_ts = section(profile, "opd", "teacher_states")
    new = over.get("opd", {}).get("rollout.max_new_tokens", p_ts.rollout.max_new_tokens)
    enc0 = [tok(gsm8k_prompt(r["question"], []), add_special_tokens=False)["input_ids"] for r in rows[: p_ts.gen_batch_size]]
    sp = SamplingParams(max_new_tokens=new, temperature=1.0, stop=GSM8K_STOPS)
    c64, mean_len = timed_generate(teacher, enc0, sp, p_ts.gen_batch_size)
    out["units"]["rollouts"] = {"batch": len(enc0), "new": new, "seconds": c64.seconds, "peak_gib": c64.peak_gib,
                                "mean_completion": mean_len, "prompt_mean": statistics.mean(map(len, enc0))}
    print(f"  generate {len(enc0)} rollouts x {new} (teacher states, drift): {c64.seconds:.2f} s, "
          f"mean completion {mean_len:.0f} tokens, peak {c64.peak_gib or 0:.2f} GiB", flush=True)
    shots = fewshot_indices(h["gen_batch_size"], len(rows), h["gsm8k_fewshot"], h["gsm8k_fewshot_seed"])
    enc5 = [tok(gsm8k_prompt(rows[i]["question"], [rows[j] for j in idx]), add_special_tokens=False)["input_ids"] for i, idx in enumerate(shots)]
    gnew = h["gsm8k_max_new_tokens"] if cuda else new
    spg = SamplingParams(max_new_tokens=gnew, temperature=0.0, stop=GSM8K_STOPS)
    cg, mean_g = timed_generate(student, enc5, spg, h["gen_batch_size"])
    out["units"]["gsm8k_batch"] = {"seconds": cg.seconds, "peak_gib": cg.peak_gib, "mean_completion": mean_g, "new": gnew,
                                   "prompt_mean": statistics.mean(map(len, enc5))}
    print(f"  GSM8K eval batch: {len(enc5)} x {h['gsm8k_fewshot']}-shot prompts (mean {statistics.mean(map(len, enc5)):.0f} tokens), "
          f"greedy {gnew}: {cg.seconds:.2f} s, mean completion {mean_g:.0f}, peak {cg.peak_gib or 0:.2f} GiB", flush=True)
    fwd = measure_ll(student, tok, h, L, device)
    out["units"]["ll_batch"] = fwd
    print(f"  log-likelihood batch ({fwd['how']}): {fwd['rows']} rows x {fwd['T']} tokens: {fwd['seconds']:.3f} s, "
          f"peak {fwd['peak_gib'] or 0:.2f} GiB", flush=True)
    del student
    if cuda:
        torch.cuda.empty_cache()

    print(f"\n{elapsed()} [measured, {device}] peak step memory vs micro-batch and step batch (rollouts of 64 tokens)", flush=True)
    mem_over = copy.deepcopy(over)
    for sec in ("opd", "rl"):
        mem_over.setdefault(sec, {}).setdefault("rollout.max_new_tokens", 64)
    out["micro_batch_memory"] = memory_vs_micro(profile, tok, rows, teacher, shape, mem_over, device)
    del teacher
    if cuda:
        torch.cuda.empty_cache()

    ahead = max(1, p_ts.gen_batch_size // p_ts.prompts_per_step)
    for u in units:
        if u.what.startswith("optimizer step"):
            u.measured_s, u.measured_peak_gib = by[{"opd@mild": "opd@stress", "opd@teacher_states": "opd@stress"}.get(u.stage, u.stage)]
            if u.stage == "opd@teacher_states":  # the student's rollouts each step -> a share of one teacher batch per `ahead` steps
                u.measured_s += c64.seconds / ahead - out["steps"]["opd@stress"]["rollout_seconds"]
        elif u.stage == "eval" and u.what.startswith("GSM8K"):
            u.measured_s = u.work.decode_steps / h["gsm8k_max_new_tokens"] * cg.seconds
            u.measured_peak_gib = cg.peak_gib
        elif u.stage == "eval" and u.what.startswith("log-likelihoods"):
            u.measured_peak_gib = fwd["peak_gib"]  # its time: calibrated (the batch's forward rate)
        elif u.stage == "eval" and u.what.startswith("drift"):
            u.measured_peak_gib = c64.peak_gib
    return out


def calibrate(g: Gpu, a: Arch, measured: dict, L: dict[str, float], profile: dict) -> Gpu:
    """The GPU model with its assumptions replaced by what a CUDA run measured: the decode-step time (a batch
    of rollouts: seconds / max_new_tokens, prefill included), the forward MFU (the log-likelihood batch) and
    the training MFU (the sft@mild step), each over this script's own FLOP count."""
    r = measured["units"]["rollouts"]
    decode_floor = r["seconds"] / r["new"]
    ll = measured["units"]["ll_batch"]
    fwd_flops = a.fwd_flops(ll["rows"] * ll["T"], ll["T"] / 2) + a.head_flops(ll["rows"] * ll["scored"])
    p = section(profile, "sft", "mild")
    rows = p.batch_size * p.grad_accum
    st = measured["steps"]["sft@mild"]
    tr = count_train(a, [st["tokens"] / rows] * rows, st["states"], p.batch_size, a.lora_params(p.adapter.r, p.adapter.target_modules),
                     p.gradient_checkpointing)
    return Gpu(name=measured["device_name"] + " (calibrated)", peak_flops=g.peak_flops, hbm_bytes_s=g.hbm_bytes_s,
               mfu_train=tr.train_flops / (st["seconds"][-1] * g.peak_flops), mfu_fwd=fwd_flops / (ll["seconds"] * g.peak_flops),
               hbm_eff=1.0, decode_floor_s=decode_floor)


def measure_ll(model, tok, h, L, device: str) -> dict[str, Any]:
    """One log-likelihood batch: `ll_batch_size` TruthfulQA-like groups of the data's mean packed length T and
    mean scored tokens K (a prefix and 10 continuations of K/10 tokens), scored by `evaluation._score_groups`
    (poststate.evaluation imports with torch and transformers alone)."""
    from poststate.evaluation import _score_groups

    B, T, K = h["ll_batch_size"], int(L["tqa_row_mean"]), int(L["tqa_scored_mean"])
    m = 10
    c = max(2, round(K / m))
    P = T - m * (c - 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150_000, (B, P + m * c), generator=g).tolist()
    how = "evaluation._score_groups"
    groups = [(r[:P], [r[P + c * j : P + c * (j + 1)] for j in range(m)]) for r in ids]

    def run():
        _score_groups(model, groups, tok.pad_token_id)

    run()
    with Clock(device == "cuda") as clock:
        run()
    return {"how": how, "rows": B, "T": T, "scored": m * c, "seconds": clock.seconds, "peak_gib": clock.peak_gib}


# --------------------------------------------------------------------------- the report


def report(units: list[Unit], g: Gpu, mem: dict[str, dict[str, float]], measured_gpu: dict | None, profile_src: str,
           L: dict[str, float], lengths_src: str) -> dict[str, Any]:
    by_stage: dict[str, float] = {}
    rows = []
    for u in units:
        secs, how = u.seconds(g)
        if how == "projected" and measured_gpu:
            how = "calibrated"  # counted work at the rates this CUDA run measured
        by_stage[u.stage] = by_stage.get(u.stage, 0.0) + secs
        bw_ms = u.work.decode_bytes / u.work.decode_steps / (g.hbm_bytes_s * g.hbm_eff) * 1e3 if u.work.decode_steps else None
        rows.append({"stage": u.stage, "what": u.what, "count": u.count, "unit_s": secs / u.count if u.count else 0.0,
                     "total_h": secs / 3600, "how": how, "measured_peak_gib": u.measured_peak_gib,
                     "decode_steps": u.work.decode_steps, "decode_bandwidth_ms": bw_ms})
    total_h = sum(by_stage.values()) / 3600
    print(f"\nprofile: {profile_src}; token lengths: {lengths_src}")
    print("  " + ", ".join(f"{k} {v:.0f}" for k, v in L.items() if k.endswith("mean")))
    print(f"\n{'stage':20s} {'unit of work':78s} {'count':>7s} {'s/unit':>8s} {'hours':>7s}  {'how':10s} decode steps/unit, "
          f"their bandwidth bound (ms/step)")
    for r in rows:
        dec = f"{r['decode_steps']:6.0f} x {r['decode_bandwidth_ms']:5.2f} ms" if r["decode_steps"] else ""
        print(f"{r['stage']:20s} {r['what'][:78]:78s} {r['count']:7.0f} {r['unit_s']:8.2f} {r['total_h']:7.3f}  {r['how']:10s} {dec}")
    print(f"\n{'stage':20s} {'GPU-hours':>10s}   (all seeds)")
    for s, v in by_stage.items():
        print(f"{s:20s} {v / 3600:10.3f}")
    print(f"{'TOTAL':20s} {total_h:10.3f}   target <= 3 H100-hours: {'MET' if total_h <= 3 else 'NOT MET'}")
    if measured_gpu:
        print(f"  measured on {measured_gpu['device_name']}; an H100 SXM has the same bf16 peak and 0.70x an H200's HBM "
              f"bandwidth: on an H100, memory-bound decode steps would take up to 1.43x as long")
        print(f"  calibrated rates for the work not measured directly: decode step {g.decode_floor_s * 1e3:.1f} ms "
              f"(batch of {measured_gpu['units']['rollouts']['batch']}), MFU train {g.mfu_train:.3f}, forward {g.mfu_fwd:.3f}")
    else:
        print(f"  GPU model ({g.name}): peak {g.peak_flops / 1e12:.0f} TFLOP/s, HBM {g.hbm_bytes_s / 1e12:.2f} TB/s (datasheet); "
              f"ASSUMED: MFU train {g.mfu_train}, forward {g.mfu_fwd}, HBM efficiency {g.hbm_eff}, decode-step floor "
              f"{g.decode_floor_s * 1e3:.0f} ms")
        for floor in (1e-9, 0.010, 0.040):
            alt = Gpu(**{**asdict(g), "decode_floor_s": floor})
            print(f"  sensitivity: decode-step floor {floor * 1e3:.0f} ms -> total {sum(u.seconds(alt)[0] for u in units) / 3600:.2f} h"
                  + (" (bandwidth and compute bounds only)" if floor < 1e-6 else ""))
    gen_h = sum(u.count * (Counter(decode_steps=u.work.decode_steps, decode_flops=u.work.decode_flops, decode_bytes=u.work.decode_bytes).seconds(g))
                for u in units) / 3600
    steps = sum(u.count * u.work.decode_steps for u in units)
    rest_h = total_h - gen_h
    print(f"  decode steps (HF generate): {steps:,.0f} in all, {gen_h:.2f} h of the total; the rest {rest_h:.2f} h"
          + ("" if measured_gpu else f"; 3 h is met at a decode step of <= {max(0.0, 3 - rest_h) * 3600 / steps * 1e3:.1f} ms"))
    print(f"\n{'stage':20s} {'peak GiB':>9s}   (counted: weights + LoRA/AdamW + the larger of the generation and training "
          f"phase; gradient checkpointing as the profile sets it, and with it on)")
    worst = 0.0
    for s, m in mem.items():
        meas = [u.measured_peak_gib for u in units if u.stage == s and u.measured_peak_gib]
        shown = max(meas) if meas else m["total"] / GIB
        worst = max(worst, shown)
        ck = f"; with gradient_checkpointing {m['total_ckpt'] / GIB:.2f}" if "total_ckpt" in m else ""
        print(f"{s:20s} {shown:9.2f}   {'measured' if meas else 'projected'}  (counted {m['total'] / GIB:.2f}: weights "
              f"{m['weights'] / GIB:.2f}, LoRA+AdamW {m['lora+adam'] / GIB:.2f}, phase {m['phase'] / GIB:.2f}{ck})")
    print(f"every stage <= 24 GB (22.35 GiB): {'MET' if worst <= 24e9 / GIB else 'NOT MET'} (largest {worst:.2f} GiB)")
    return {"stages_hours": {k: v / 3600 for k, v in by_stage.items()}, "total_hours": total_h, "units": rows,
            "memory_gib": {k: {kk: vv / GIB for kk, vv in v.items()} for k, v in mem.items()}, "largest_peak_gib": worst,
            "targets": {"total_le_3_h100_hours": total_h <= 3, "every_stage_le_24GB": worst <= 24e9 / GIB},
            "gpu_model": asdict(g), "decode_hours_counted": gen_h}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller CPU measurements")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    ap.add_argument("--profile", type=Path, default=PROFILE)
    ap.add_argument("--data", type=Path, help="a directory laid out like ../shared/data (default: data/hub, ../shared/data)")
    ap.add_argument("--tokenizer", type=Path, help="a saved Qwen3 tokenizer directory (default: built from qwen-tokenizer)")
    ap.add_argument("--lengths-only", action="store_true", help="print the measured token lengths and stop")
    ap.add_argument("--lora-probe", action="store_true", help="also measure activation bytes with the adapter in bf16 and without LoRA")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default on a CPU: 1; on CUDA: torch's)")
    ap.add_argument("--cpu", action="store_true", help="the CPU path even where CUDA is available")
    ap.add_argument("--dry-run", action="store_true", help="run the CUDA path's code on the CPU at reduced sizes (figures meaningless)")
    for k, v in asdict(Gpu()).items():
        if k != "name":
            ap.add_argument(f"--{k.replace('_', '-')}", type=float, default=v, help=f"GPU model: {k} (default {v})")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    profile, profile_src = load_profile(args.profile)
    cuda = torch.cuda.is_available() and not args.cpu
    if args.threads or not cuda:
        # on the shared 2-core machine 2 threads ran the reduced OPD step in 17 s against 2-3 s on 1 (contention)
        torch.set_num_threads(args.threads or 1)
    g = Gpu(**{k: getattr(args, k) for k in asdict(Gpu()) if k != "name"})
    for k, v in asdict(g).items():
        if k != "name" and not (v > 0 and (v <= 1 or k not in ("mfu_train", "mfu_fwd", "hbm_eff"))):
            raise SystemExit(f"--{k.replace('_', '-')} = {v}: must be > 0" + (" and <= 1" if k in ("mfu_train", "mfu_fwd", "hbm_eff") else ""))
    print(f"poststate paper-profile projection: torch {torch.__version__}, python {platform.python_version()}, "
          f"{'CUDA ' + torch.cuda.get_device_name(0) if cuda else 'CPU (' + str(torch.get_num_threads()) + ' threads)'}", flush=True)
    tok = load_tokenizer(args.tokenizer)
    print(f"{elapsed()} tokenizer ready", flush=True)
    data = None if args.quick and not args.data else find_data(args.data)
    if data is not None:
        L = measure_lengths(tok, data, profile)
        lengths_src = f"measured on {data} with Qwen3's tokenizer"
        for k, n in (("gsm8k_train", "gsm8k_train_rows"), ("gsm8k_test", "gsm8k_test_rows"), ("truthfulqa", "truthfulqa_rows")):
            if L[n] != DATASET_ROWS[k]:
                raise ValueError(f"{data}: {k} has {L[n]} rows, expected {DATASET_ROWS[k]}")
        rows = read_jsonl(data / "gsm8k" / "train.jsonl")[:512]
    else:
        if not LENGTHS_MEASURED:
            raise SystemExit("no data directory found (--data) and no LENGTHS_MEASURED constants")
        L = dict(LENGTHS_MEASURED)
        lengths_src = "LENGTHS_MEASURED (perf/paper_projection.py; measured on ../shared/data)"
        rows = synthetic_rows(512, int(L["gsm8k_prompt0_mean"]) - 5, int(L["gsm8k_gold_mean"]), seed=0)
    if args.lengths_only:
        print(json.dumps(L, indent=1))
        return 0
    a = Arch.of(QWEN3_0_6B_BASE)
    check_counts(a, profile)
    print(f"Qwen3-0.6B-Base shape: {QWEN3_0_6B_BASE}")
    print(f"  parameters: decoder {a.decoder_params() / 1e6:.1f}M + embedding/head (tied) {a.head_params() / 1e6:.1f}M; "
          f"bf16 weights {a.weight_bytes() / GIB:.2f} GiB; KV cache {a.kv_bytes_per_token() / 1024:.0f} KiB/token; "
          f"logit chunk {chunk_states(a.vocab)} states (counts checked against the model and its LoRA built on the meta device)", flush=True)
    units = inventory(profile, L, a)
    measured = None
    result: dict[str, Any] = {"profile": profile_src, "lengths": L, "lengths_source": lengths_src, "device": "cuda" if cuda else "cpu"}
    if cuda or args.dry_run:
        device = "cuda" if cuda else "cpu"
        shape, over = ({}, {}) if cuda else reduced(True)
        measured = run_gpu(args, profile, L, tok, rows, units, device, shape, over)
        act = measure_activations(device, 512, 4) if cuda else measure_activations(device, 64, 2)
        measured["activation_bytes"] = act
        result["gpu"] = measured
        g = calibrate(g, a, measured, L, profile)
    else:
        cpu = run_cpu(args, profile, L, tok, rows)
        result["cpu"] = cpu
        act = cpu["activation_bytes"]
    if args.lora_probe:
        result["lora_probe"] = lora_probe("cuda" if cuda else "cpu", 512 if cuda else 64, 4 if cuda else 2)
    mem = project_memory(a, profile, L, act)
    result["projection"] = report(units, g, mem, measured, profile_src, L, lengths_src)
    result["wall_seconds"] = time.perf_counter() - t0
    print(f"\n{elapsed()} done")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
