"""Model-based drift diagnostics: hidden-state features, token NLL, forward KL(base || tuned).

All three run the decoder once per batch (right padding + attention mask, sequences sorted by length) and
apply the LM head only at the positions they score, in chunks (`objective.over_chunks`): no (B, T, V)
tensor, so they fit a 24 GB card at the paper profile's vocabulary (151,936) too.

- `hidden_features`: the base model as featuriser: mean over a text's tokens of the final (normed) hidden
  states, the features of the hidden-state MMD.
- `token_nll`: per sequence, the sum and count of -log p(ids[j] | ids[:j]) over its scored tokens: the
  locality of the tokens a method trained on, under the base model.
- `forward_kl`: per sequence, the sum and count of KL(base || tuned) over its scored states, on sequences
  sampled from the base (RL's Razor, arXiv 2509.04259: this KL on the target task predicted forgetting).
Per-sequence sums and counts let the caller pool tokens (ratio of sums) and give each prompt its own
pseudo-value for an interval over prompts and seeds (`stats.ratio_pseudovalues`).

`drift_record` puts them together for one model: its drift from the base's reference rollouts (lexical and
hidden-state MMD tests, forward KL) and the locality of the tokens it trained on; `flat` the flat numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from poststate import drift as d
from poststate.objective import causal_parts, over_chunks, same_device
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.stats import ratio_pseudovalues
from poststate.streams import stream_seed


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding stays small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def _padded(ids_list: Sequence[Sequence[int]], batch: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) (pad value 0, masked out) and the attention mask (B, T)."""
    T = max(len(ids_list[i]) for i in batch)
    ids_BT = torch.zeros((len(batch), T), dtype=torch.long)
    mask_BT = torch.zeros((len(batch), T), dtype=torch.long)
    for r, i in enumerate(batch):
        ids_BT[r, : len(ids_list[i])] = torch.as_tensor(list(ids_list[i]), dtype=torch.long)
        mask_BT[r, : len(ids_list[i])] = 1
    return ids_BT.to(device), mask_BT.to(device)


def _require_eval(model, name: str) -> None:
    if model.training:
        raise ValueError(f"{name} is in training mode (dropout active); call .eval() first")


def _check_scored(ids_list: Sequence[Sequence[int]], score_from: Sequence[int]) -> None:
    if len(ids_list) != len(score_from):
        raise ValueError(f"{len(ids_list)} sequences but {len(score_from)} score_from entries")
    for i, (ids, start) in enumerate(zip(ids_list, score_from)):
        if not 1 <= start < len(ids):
            raise ValueError(f"sequence {i}: score_from={start} must satisfy 1 <= score_from < len(ids)={len(ids)}")


def _scored(ids_list, score_from, batch, T: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions (row * T + t) of the states predicting each scored token, their targets, their rows."""
    pos, tgt, row = [], [], []
    for r, i in enumerate(batch):
        for t in range(score_from[i] - 1, len(ids_list[i]) - 1):
            pos.append(r * T + t)
            tgt.append(ids_list[i][t + 1])
            row.append(r)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return as_t(pos), as_t(tgt), as_t(row)


@torch.inference_mode()
def hidden_features(model, tokenizer, texts: Sequence[str], batch_size: int, max_length: int | None = None) -> np.ndarray:
    """Mean over a text's tokens of the model's final hidden states (after the final norm): (N, H) float32.
    Texts are tokenised with the tokenizer's defaults, truncated to max_length when given."""
    _require_eval(model, "model")
    if not texts:
        raise ValueError("hidden_features: no texts")
    ids_list = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)["input_ids"]
    if any(len(ids) == 0 for ids in ids_list):
        raise ValueError("hidden_features: a text tokenised to zero tokens")
    decoder, _ = causal_parts(model)
    device = next(model.parameters()).device
    out_NH: np.ndarray | None = None
    for batch in _batches([len(x) for x in ids_list], batch_size):
        ids_BT, mask_BT = _padded(ids_list, batch, device)
        hidden_BTH = decoder(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state.float()
        w_BT1 = mask_BT.unsqueeze(-1).float()
        pooled_BH = (hidden_BTH * w_BT1).sum(1) / w_BT1.sum(1)
        if out_NH is None:
            out_NH = np.zeros((len(ids_list), pooled_BH.shape[1]), dtype=np.float32)
        out_NH[batch] = pooled_BH.cpu().numpy()
    return out_NH


def _per_sequence(values_N: torch.Tensor, row_N: torch.Tensor, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    sums = torch.zeros(n_rows, dtype=torch.float64, device=values_N.device).index_add(0, row_N, values_N.double())
    counts = torch.zeros(n_rows, dtype=torch.float64, device=values_N.device).index_add(0, row_N, torch.ones_like(values_N, dtype=torch.float64))
    return sums.cpu().numpy(), counts.cpu().numpy()


@torch.inference_mode()
def token_nll(model, ids_list: Sequence[Sequence[int]], score_from: Sequence[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence i: (sum, count) of -log p(ids[j] | ids[:j]) over j in [score_from[i], len_i), float64.
    Log-softmax in float32."""
    _require_eval(model, "model")
    _check_scored(ids_list, score_from)
    decoder, head = causal_parts(model)
    device = next(model.parameters()).device
    sums, counts = np.zeros(len(ids_list)), np.zeros(len(ids_list))
    for batch in _batches([len(x) for x in ids_list], batch_size):
        ids_BT, mask_BT = _padded(ids_list, batch, device)
        pos_N, tgt_N, row_N = _scored(ids_list, score_from, batch, ids_BT.shape[1], device)
        h_NH = decoder(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state.flatten(0, 1).index_select(0, pos_N)
        (nll_N,) = over_chunks(lambda h, t: (-torch.log_softmax(head(h).float(), -1).gather(-1, t[:, None]).squeeze(-1),),
                               [h_NH, tgt_N], head.out_features)
        s, c = _per_sequence(nll_N, row_N, len(batch))
        sums[batch], counts[batch] = s, c
    return sums, counts


@torch.inference_mode()
def forward_kl(base, tuned, ids_list: Sequence[Sequence[int]], score_from: Sequence[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence i: (sum, count) over the states s = ids[:j], j in [score_from[i], len_i), of the
    full-vocabulary KL(base || tuned)(s) = sum_v p_base(v|s) (log p_base(v|s) - log p_tuned(v|s)).
    Meant for sequences sampled from the base model. Float32 log-softmax."""
    _require_eval(base, "base")
    _require_eval(tuned, "tuned")
    _check_scored(ids_list, score_from)
    same_device(base, tuned, "the tuned model")
    (b_dec, b_head), (t_dec, t_head) = causal_parts(base), causal_parts(tuned)
    if b_head.out_features != t_head.out_features:
        raise ValueError(f"forward_kl: vocabularies differ, base {b_head.out_features} vs tuned {t_head.out_features}")
    device = next(base.parameters()).device
    sums, counts = np.zeros(len(ids_list)), np.zeros(len(ids_list))
    for batch in _batches([len(x) for x in ids_list], batch_size):
        ids_BT, mask_BT = _padded(ids_list, batch, device)
        pos_N, _, row_N = _scored(ids_list, score_from, batch, ids_BT.shape[1], device)
        hb_NH = b_dec(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state.flatten(0, 1).index_select(0, pos_N)
        ht_NH = t_dec(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state.flatten(0, 1).index_select(0, pos_N)

        def kl_chunk(hb, ht):
            lb = torch.log_softmax(b_head(hb).float(), -1)
            lt = torch.log_softmax(t_head(ht).float(), -1)
            return ((lb.exp() * (lb - lt)).sum(-1),)

        (kl_N,) = over_chunks(kl_chunk, [hb_NH, ht_NH], b_head.out_features)
        s, c = _per_sequence(kl_N, row_N, len(batch))
        sums[batch], counts[batch] = s, c
    return sums, counts


# ---------------------------------------------------------------- a run's drift record


def _pooled(sums: np.ndarray, counts: np.ndarray) -> dict:
    """A token-pooled mean (ratio of sums) over sequences, with its per-sequence pseudo-values."""
    return {"mean": float(sums.sum() / counts.sum()), "pseudo": ratio_pseudovalues(sums[None, :], counts)[0].tolist()}


REF_CUTS = ("drift", "cuts", "base", "reference")  # the stream of the reference sample's cut points


def _states(roll: list[dict], kind: str, cuts: int, seed: int) -> tuple[list[str], np.ndarray]:
    # lexical features read the generated part only: both samples answer the same prompts, whose words
    # would only dilute the kernel; hidden features read the whole state, through the base model
    prompts = [""] * len(roll) if kind == "lexical" else [r["prompt"] for r in roll]
    return d.rollout_states(prompts, [r["completion"] for r in roll], cuts, seed)


def reference_hidden(base, tok, ref_roll: list[dict], p) -> np.ndarray:
    """The base's hidden features of the reference sample's states: the same array for every run and seed
    compared with that sample, so the base's eval computes it once and stores it (evals/base)."""
    xs, _ = _states(ref_roll, "hidden", p.drift.cuts, stream_seed(*REF_CUTS))
    return hidden_features(base, tok, xs, p.batch_size)


def drift_record(base, model, tok, ref_roll: list[dict], roll: list[dict], states: list[dict], p, tag: tuple,
                 ref_hidden: np.ndarray | None = None) -> dict:
    """Drift of one sample of rollouts (`roll`) from the base's reference sample (`ref_roll`), on the same
    prompts, and the locality of the states a run trained on. `tag` = (run, seed) names the random streams:
    every stream here is distinct from the reference's and from every training stream (`streams`).
    `ref_hidden`: `reference_hidden(base, tok, ref_roll, p)` when already computed."""
    q = p.drift
    out = {}
    ref_cut, run_cut = stream_seed(*REF_CUTS), stream_seed("drift", "cuts", *tag)
    for kind in ("lexical", "hidden"):
        xs, px = _states(ref_roll, kind, q.cuts, ref_cut)
        ys, py = _states(roll, kind, q.cuts, run_cut)
        if kind == "lexical":
            X = d.lexical_features(xs, ngram=(1, q.ngram_max), dim=q.hash_dim)
            Y = d.lexical_features(ys, ngram=(1, q.ngram_max), dim=q.hash_dim)
        else:
            X = reference_hidden(base, tok, ref_roll, p) if ref_hidden is None else ref_hidden
            if X.shape[0] != len(xs):
                raise ValueError(f"drift_record: ref_hidden has {X.shape[0]} rows for {len(xs)} reference states")
            Y = hidden_features(base, tok, ys, p.batch_size)
        out[f"mmd_{kind}"] = d.drift_test(X, px, Y, py, q.permutations, stream_seed("drift", "permutations", kind, *tag))
    if model is not None:
        seqs = [r["prompt_ids"] + r["completion_ids"] for r in ref_roll if r["completion_ids"]]
        out["kl_base_tuned"] = _pooled(*forward_kl(base, model, seqs, [len(r["prompt_ids"]) for r in ref_roll if r["completion_ids"]], p.batch_size))
    scored = [s for s in states if s["score_from"] < len(s["ids"])][: q.locality_states]
    if scored:
        # Locality where the loss was applied: the base's NLL of the tokens the run trained on, minus the
        # base's NLL of its own sample from the same context (of the same length): at temperature 1 the
        # latter is the base's entropy there, so a high-entropy context does not pose as a distant state.
        trained = token_nll(base, [s["ids"] for s in scored], [s["score_from"] for s in scored], p.batch_size)
        sp = SamplingParams(max_new_tokens=max(len(s["ids"]) - s["score_from"] for s in scored), temperature=1.0)
        own = HFRolloutEngine(base, tok, p.harness.gen_batch_size).generate(
            [s["ids"][: s["score_from"]] for s in scored], sp, seed=stream_seed("locality", *tag))
        own_nll = [-float(np.mean(lp[: len(s["ids"]) - s["score_from"]])) for lp, s in zip(own.logprobs, scored)]
        excess = (trained[0] / trained[1]) - np.asarray(own_nll)  # per state
        out["locality"] = {"excess": float(excess.mean()), "pseudo": excess.tolist(),
                           "trained_nll": float((trained[0] / trained[1]).mean()), "own_nll": float(np.mean(own_nll))}
    return out


def flat(drift_out: dict) -> dict[str, float]:
    """The flat numbers of a drift record (for scores.json and `dvc metrics diff`)."""
    out = {}
    for kind in ("lexical", "hidden"):
        t = drift_out[f"mmd_{kind}"]
        out |= {f"mmd_{kind}": t["mmd2"], f"mmd_{kind}_se": t["se"], f"mmd_{kind}_p": t["p_value"]}
    if "kl_base_tuned" in drift_out:
        out["kl_base_tuned"] = drift_out["kl_base_tuned"]["mean"]
    if "locality" in drift_out:
        out |= {"locality_excess_nll": drift_out["locality"]["excess"], "train_state_nll": drift_out["locality"]["trained_nll"]}
    return out
