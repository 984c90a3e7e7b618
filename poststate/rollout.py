"""Batched sampling with a KV cache: prompts in, completions (tokens, text, log-probs) out.

`RolloutEngine` is the interface every caller uses (OPD state sources, RL, GSM8K evaluation);
`HFRolloutEngine` implements it with `model.generate` over left-padded batches. A vLLM backend can
implement the same `generate(prompt_ids, params, seed) -> Rollouts` without changing callers.

A completion ends the way a generation ends, and the trained sequence ends the same way: at the model's
EOS (kept), at the earliest stop string (the tokens through the one that completes the stop string are
kept: where a 5-shot prompt teaches the model to end its answer by starting the next "Question:", that is
its act of stopping, and RL and OPD train it), or at `max_new_tokens` (then `finished` is False).
`answer_lens[i]` counts the completion tokens before the terminator (the EOS, or the first token that
overlaps the stop string): a state cut inside the answer never contains a terminator. `texts` is what a
scorer reads, as lm-evaluation-harness reads a generation: the completion decoded with
`skip_special_tokens=True`, cut before the earliest stop string.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, TemperatureLogitsWarper, TopPLogitsWarper

from poststate.streams import stream_seed


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0.0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings; the model's EOS always stops

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0.0 and self.top_p != 1.0:
            raise ValueError(f"SamplingParams.top_p={self.top_p} has no effect with temperature 0 (greedy)")
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be a tuple of non-empty strings, got {self.stop!r}")


@dataclass(frozen=True)
class Rollouts:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # generated tokens through the terminator (an EOS, or a stop string's tokens)
    answer_lens: list[int]  # completion tokens before the terminator (= len(completion_ids[i]) if unfinished)
    texts: list[str]  # the answer, decoded with skip_special_tokens=True, cut before the earliest stop string
    logprobs: list[list[float]]  # sampling log-prob of each kept completion token (see HFRolloutEngine)
    finished: list[bool]  # stopped by EOS or a stop string (not by max_new_tokens)

    @classmethod
    def from_rows(cls, prompt_ids: list[list[int]], rows: Sequence[tuple[list[int], int, str, list[float], bool]]) -> Rollouts:
        """From per-row (completion ids, answer length, text, log-probs, finished) tuples."""
        ids, lens, texts, logprobs, finished = (list(col) for col in zip(*rows)) if rows else ([], [], [], [], [])
        return cls(prompt_ids, ids, lens, texts, logprobs, finished)


class RolloutEngine(Protocol):
    """Samples completions. `sync(policy)` makes the next draws come from a live training policy's current
    weights (a plain HF model or a peft LoRA model); a fixed model (a teacher, an eval) never syncs."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int) -> Rollouts: ...

    def sync(self, policy) -> None: ...


def _earliest_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def cut_completion(
    generated: Sequence[int], tokenizer, stops: Sequence[str], eos_id: int, pad_id: int
) -> tuple[list[int], int, str, bool]:
    """(kept ids, answer length, text, finished) for one row of generated ids (pad-filled after it stopped).

    The row's body ends at its first EOS (with pad == EOS, a row stopped by a stop string is followed by
    pads, i.e. EOS ids). Stop strings are looked for in the body decoded with its special tokens, as a
    stopping criterion sees them. With a stop string at character c: the kept ids are the body through the
    token that completes the earliest stop string, the answer length the number of tokens whose text ends at
    or before c. Otherwise an emitted EOS is kept as the last id and the answer is the body. The text is
    the body decoded with skip_special_tokens=True and cut before the earliest stop string (the harness's
    decode-then-split). With pad != EOS, trailing pads of a row that stopped early are stripped.
    """
    ids = list(generated)
    ended_by_eos = eos_id in ids
    body = ids[: ids.index(eos_id)] if ended_by_eos else ids
    if not ended_by_eos and pad_id != eos_id:
        while body and body[-1] == pad_id:
            body.pop()
    text = tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    shown = _earliest_stop(text, stops)
    text = text if shown is None else text[:shown]
    full = _decode(tokenizer, body)
    cut = _earliest_stop(full, stops)
    if cut is not None:
        end = cut + min(len(s) for s in stops if full.find(s) == cut)
        lengths = [len(_decode(tokenizer, body[:k])) for k in range(len(body) + 1)]
        answer = max(k for k, n in enumerate(lengths) if n <= cut)
        kept = max(answer, next(k for k, n in enumerate(lengths) if n >= end))
        return body[:kept], answer, text, True
    if ended_by_eos:
        return body + [eos_id], len(body), text, True
    return body, len(body), text, False


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BT, attention_mask_BT) with every prompt right-aligned at T = the longest prompt."""
    T = max(len(p) for p in prompts)
    ids_BT = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_BT[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask_BT[i, T - len(p) :] = 1
    return ids_BT.to(device), mask_BT.to(device)


class HFRolloutEngine:
    """`RolloutEngine` on a Hugging Face causal LM (optionally peft-wrapped): a KV-cached decode loop.

    Each batch is left-padded and prefilled once; then one token per step for every unfinished row. A row
    that emits EOS or completes a stop string leaves the batch and its KV cache at once (`batch_select_indices`),
    so the steps of a batch cost what its unfinished rows cost - HF `generate` carries every finished row to
    the end of the batch. Greedy decoding gives `generate`'s tokens (tests/test_rollout.py compares them).
    Sampling (temperature > 0): transformers' temperature and top-p warpers, then a draw from the warped
    distribution; the recorded log-prob of each token is under exactly that distribution (greedy: the raw
    model log_softmax). No top-k, no repetition penalty.
    Seeding: each batch draws from its own `torch.Generator` seeded with stream_seed(seed, batch_index), so a
    sampled result depends on (seed, batch_size) and touches no global RNG; a greedy one depends on neither.
    Measured on the tiny base, 1 thread: 256 greedy GSM8K prompts 2.29 s with `generate`, 1.81-1.86 s here (the
    same 256 completions); 64 samples of 96 tokens 0.71-0.73 s vs 0.51-0.53 s.
    """

    def __init__(self, model, tokenizer, batch_size: int):
        """`model` may be None for an engine that samples a policy: `sync(policy)` before each draw."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer needs pad and eos tokens, got pad={tokenizer.pad_token!r} eos={tokenizer.eos_token!r}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._copy = None  # the SamplingCopy of a synced policy
        self.syncs = 0

    def sync(self, policy) -> None:
        """Sample from `policy`'s current weights, through a plain copy with the LoRA adapter folded in
        (`modeling.SamplingCopy`, re-synced here; a policy without an adapter is its own sampler)."""
        from poststate.modeling import SamplingCopy

        if self._copy is None or self._copy.policy is not policy:
            self._copy = SamplingCopy(policy)
        self.model = self._copy.sync()
        self.syncs += 1

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int) -> Rollouts:
        prompts = [list(p) for p in prompt_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        longest = max((len(p) for p in prompts), default=0)
        if max_pos is not None and longest + params.max_new_tokens > max_pos:
            raise ValueError(
                f"longest prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's max_position_embeddings ({max_pos})"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            rows: list[tuple[list[int], int, str, list[float], bool]] = []
            for b, start in enumerate(range(0, len(prompts), self.batch_size)):
                rows += self._generate_batch(prompts[start : start + self.batch_size], params, stream_seed(seed, b))
        finally:
            self.model.train(was_training)
        return Rollouts.from_rows(prompts, rows)

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, batch_seed: int
    ) -> list[tuple[list[int], int, str, list[float], bool]]:
        tok, model = self.tokenizer, self.model
        pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
        device = next(model.parameters()).device
        ids_BT, mask_BT = _left_pad(prompts, pad_id, device)
        warp = _warpers(params)
        gen = torch.Generator(device=device).manual_seed(batch_seed) if params.temperature > 0 else None
        tail = max((len(s.encode("utf-8")) for s in params.stop), default=0) + 1  # tokens that can hold a stop string
        cache = DynamicCache()
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        logits_BV = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT, use_cache=True,
                          logits_to_keep=1, **{_cache_kwarg_of(type(model)): cache}).logits[:, -1]
        rows = list(range(len(prompts)))  # the unfinished rows, in cache order
        pos_B = pos_BT[:, -1]
        generated: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        for step in range(params.max_new_tokens):
            scores_BV = warp(logits_BV.float())
            logp_BV = torch.log_softmax(scores_BV, dim=-1)
            if gen is None:
                next_B = logp_BV.argmax(-1)
            else:
                next_B = torch.multinomial(logp_BV.exp(), 1, generator=gen).squeeze(-1)
            chosen = logp_BV.gather(-1, next_B[:, None]).squeeze(-1).tolist()
            done = []
            for j, (r, t) in enumerate(zip(rows, next_B.tolist())):
                generated[r].append(t)
                logprobs[r].append(chosen[j])
                done.append(t == eos_id or (tail > 1 and _earliest_stop(
                    tok.decode(generated[r][-tail:], skip_special_tokens=False), params.stop) is not None))
            if step == params.max_new_tokens - 1 or all(done):
                break
            if any(done):  # drop finished rows from the batch and the cache
                keep = [j for j, d in enumerate(done) if not d]
                keep_K = torch.tensor(keep, device=device)
                cache.batch_select_indices(keep_K)
                rows, mask_BT, pos_B, next_B = [rows[j] for j in keep], mask_BT[keep_K], pos_B[keep_K], next_B[keep_K]
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones((len(rows), 1))], dim=-1)
            pos_B = pos_B + 1
            logits_BV = model(input_ids=next_B[:, None], attention_mask=mask_BT, position_ids=pos_B[:, None],
                              use_cache=True, logits_to_keep=1, **{_cache_kwarg_of(type(model)): cache}).logits[:, -1]
        out = []
        for ids, lps in zip(generated, logprobs):
            kept, answer_len, text, finished = cut_completion(ids, tok, params.stop, eos_id, pad_id)
            out.append((kept, answer_len, text, lps[: len(kept)], finished))
        return out


def _warpers(params: SamplingParams):
    """The sampling distribution's processors: temperature, then top-p (transformers' own warpers); greedy
    reads the raw logits."""
    if params.temperature == 0:
        return lambda scores_BV: scores_BV
    steps = []
    if params.temperature != 1.0:
        steps.append(TemperatureLogitsWarper(params.temperature))
    if params.top_p < 1.0:
        steps.append(TopPLogitsWarper(params.top_p))

    def apply(scores_BV):
        for w in steps:
            scores_BV = w(None, scores_BV)
        return scores_BV

    return apply


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); both are accepted for a while."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def make_engine(backend, model_path, tokenizer, batch_size: int, *, lora_rank: int | None = None, work_dir=None) -> RolloutEngine:
    """The engine a learner samples with, by `backend.kind` (params: `<section>.engine`): "hf" samples a
    synced adapter-merged copy of the policy in this process; "vllm" serves `model_path` (the base the
    policy started from) in vLLM and loads the policy's weights into it at every `sync`
    (`rollout_vllm.VLLMRolloutEngine`; a CUDA GPU and docs/vllm.md's environment)."""
    if backend.kind == "hf":
        return HFRolloutEngine(None, tokenizer, batch_size)
    if backend.kind == "vllm":
        from poststate.rollout_vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(model_path, tokenizer, backend, lora_rank=lora_rank, work_dir=work_dir)
    raise ValueError(f"rollout engine {backend.kind!r}: expected 'hf' or 'vllm'")
