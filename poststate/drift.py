"""State-drift diagnostics: MMD of prefix states (lexical and hidden-state), forward KL, locality.

The paper's drift number: sample rollouts from each model on a fixed prompt set, take prefix states,
featurise them with "lightweight lexical features" and report the RBF-kernel MMD to the base model's
rollout states. Features, bandwidth and estimator are not stated; ours, documented per function:

- states: `prefix_states` - per rollout, n_cuts states prompt + completion[:cut], the cut a word
  boundary drawn uniformly (so a state is an i.i.d. draw from the rollout's state-visitation
  distribution with t uniform over generated words);
- features: `lexical_features` - hashed word uni+bigram counts (blake2b hash), L2-normalised;
- bandwidth: `median_bandwidth` - the median pairwise distance of the pooled sample;
- estimator: `mmd2_rbf` - squared MMD, unbiased U-statistic by default.

Model-based diagnostics added by the follow-up: hidden-state MMD with the base model as featuriser
(`hidden_features`), the base model's NLL of the states a method trained on (`sequence_token_nll`),
and the forward KL(base || tuned) on base samples (`forward_kl`, RL's Razor, arXiv 2509.04259).
All model calls are batched (right padding + attention mask), with sequences sorted by length.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
import torch

_WORD_RE = re.compile(r"\S+")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------- states and lexical features


def prefix_states(prompts: Sequence[str], completions: Sequence[str], n_cuts: int, seed: int) -> list[str]:
    """Prefix states s = prompt + completion[:cut] of each rollout, n_cuts per rollout, rollout-major.

    Words are maximal runs of non-whitespace in the completion; the allowed cuts are the ends of its
    words (1..W words kept; the prompt-only state, identical for every model, is excluded). Each
    cut is drawn uniformly with replacement from numpy default_rng([seed, i]) for rollout i, so rollout
    i's states depend only on (seed, i) and its text. An empty completion gives the prompt alone.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prefix_states: {len(prompts)} prompts but {len(completions)} completions")
    if n_cuts < 1:
        raise ValueError(f"prefix_states: n_cuts must be >= 1, got {n_cuts}")
    states: list[str] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        word_ends = [m.end() for m in _WORD_RE.finditer(completion)]
        if not word_ends:
            states.extend([prompt] * n_cuts)
            continue
        rng = np.random.default_rng([seed, i])
        picks = rng.integers(0, len(word_ends), size=n_cuts)
        states.extend(prompt + completion[: word_ends[k]] for k in picks)
    return states


def _stable_hash(text: str) -> int:
    """64-bit blake2b hash of the UTF-8 text (stable across processes, unlike Python's hash)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def lexical_features(
    texts: Sequence[str], ngram: tuple[int, int] = (1, 2), dim: int = 4096, signed: bool = False
) -> np.ndarray:
    """Hashed n-gram count features, L2-normalised per row: (N, dim) float64.

    Tokens are lower-cased words and single punctuation marks (regex `\\w+|[^\\w\\s]`); every n-gram with
    ngram[0] <= n <= ngram[1] (tokens joined by a space) adds 1 (or a sign, when `signed`, from the hash's
    top bit) at column blake2b(ngram) mod dim. Rows are divided by their L2 norm; a text without
    tokens stays the zero vector.
    """
    n_lo, n_hi = ngram
    if not 1 <= n_lo <= n_hi:
        raise ValueError(f"lexical_features: ngram must satisfy 1 <= lo <= hi, got {ngram}")
    if dim < 1:
        raise ValueError(f"lexical_features: dim must be >= 1, got {dim}")
    feats_ND = np.zeros((len(texts), dim), dtype=np.float64)
    cache: dict[str, tuple[int, float]] = {}
    for row, text in enumerate(texts):
        tokens = _TOKEN_RE.findall(text.lower())
        for n in range(n_lo, n_hi + 1):
            for j in range(len(tokens) - n + 1):
                gram = " ".join(tokens[j : j + n])
                slot = cache.get(gram)
                if slot is None:
                    h = _stable_hash(gram)
                    slot = (h % dim, (-1.0 if h >> 63 else 1.0) if signed else 1.0)
                    cache[gram] = slot
                feats_ND[row, slot[0]] += slot[1]
    norms_N1 = np.linalg.norm(feats_ND, axis=1, keepdims=True)
    np.divide(feats_ND, norms_N1, out=feats_ND, where=norms_N1 > 0)
    return feats_ND


# ---------------------------------------------------------------- MMD


def _sq_dists(A_ND: np.ndarray, B_MD: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (N, M), clipped at 0."""
    a_N1 = np.sum(A_ND * A_ND, axis=1)[:, None]
    b_1M = np.sum(B_MD * B_MD, axis=1)[None, :]
    return np.maximum(a_N1 + b_1M - 2.0 * (A_ND @ B_MD.T), 0.0)


def _as_2d(X: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {arr.shape}")
    return arr


def median_bandwidth(X: np.ndarray, Y: np.ndarray) -> float:
    """Median heuristic: s = median of ||z_i - z_j|| over pairs i < j of the pooled sample Z = X u Y,
    excluding zero distances (duplicate states; below 1e-12 in squared distance, i.e. round-off)."""
    Z = np.concatenate([_as_2d(X, "X"), _as_2d(Y, "Y")], axis=0)
    if Z.shape[0] < 2:
        raise ValueError("median_bandwidth needs at least two points in the pooled sample")
    iu = np.triu_indices(Z.shape[0], k=1)
    d2 = _sq_dists(Z, Z)[iu]
    d2 = d2[d2 > 1e-12]
    if d2.size == 0:
        raise ValueError("median_bandwidth: all pooled points coincide, the bandwidth is undefined")
    return float(np.sqrt(np.median(d2)))


def mmd2_rbf(X: np.ndarray, Y: np.ndarray, bandwidth: float, unbiased: bool = True) -> float:
    """Squared MMD with the RBF kernel k(x, y) = exp(-||x - y||^2 / (2 s^2)), s = bandwidth.

    Unbiased U-statistic (Gretton et al. 2012, eq. 3), diagonals excluded:
        sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 sum_{i,j} k(x_i,y_j)/(mn)
    (can be slightly negative); biased V-statistic: the same with all pairs and means over m^2, n^2.
    """
    X = _as_2d(X, "X")
    Y = _as_2d(Y, "Y")
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"mmd2_rbf: feature dims differ, X {X.shape} vs Y {Y.shape}")
    if not bandwidth > 0:
        raise ValueError(f"mmd2_rbf: bandwidth must be > 0, got {bandwidth!r}")
    m, n = X.shape[0], Y.shape[0]
    min_size = 2 if unbiased else 1
    if m < min_size or n < min_size:
        raise ValueError(f"mmd2_rbf: need >= {min_size} points per sample (unbiased={unbiased}), got {m} and {n}")
    gamma = 1.0 / (2.0 * bandwidth * bandwidth)
    k_xx = np.exp(-gamma * _sq_dists(X, X))
    k_yy = np.exp(-gamma * _sq_dists(Y, Y))
    k_xy = np.exp(-gamma * _sq_dists(X, Y))
    if unbiased:
        term_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
        term_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    else:
        term_x = k_xx.mean()
        term_y = k_yy.mean()
    return float(term_x + term_y - 2.0 * k_xy.mean())


# ---------------------------------------------------------------- model-based diagnostics


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding stays small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _require_eval(model: torch.nn.Module, name: str) -> None:
    if model.training:
        raise ValueError(f"{name} is in training mode (dropout active); call .eval() first")


def _right_padded(ids_list: Sequence[Sequence[int]], batch: Sequence[int], device: torch.device):
    """Right-padded ids (B, T) (pad value 0, masked out) and attention mask (B, T)."""
    T = max(len(ids_list[i]) for i in batch)
    ids_BT = torch.zeros((len(batch), T), dtype=torch.long)
    mask_BT = torch.zeros((len(batch), T), dtype=torch.long)
    for r, i in enumerate(batch):
        seq = torch.as_tensor(list(ids_list[i]), dtype=torch.long)
        ids_BT[r, : seq.numel()] = seq
        mask_BT[r, : seq.numel()] = 1
    return ids_BT.to(device), mask_BT.to(device)


def _check_scored(ids_list: Sequence[Sequence[int]], score_from: Sequence[int]) -> None:
    if len(ids_list) != len(score_from):
        raise ValueError(f"{len(ids_list)} sequences but {len(score_from)} score_from entries")
    for i, (ids, start) in enumerate(zip(ids_list, score_from)):
        if not 1 <= start < len(ids):
            raise ValueError(
                f"sequence {i}: score_from={start} must satisfy 1 <= score_from < len(ids)={len(ids)}"
            )


def _scored_positions(mask_BT: torch.Tensor, starts_B: torch.Tensor) -> torch.Tensor:
    """Mask (B, T-1) of the positions p whose logits predict a scored token p + 1 >= score_from."""
    T = mask_BT.shape[1]
    pos_1T = torch.arange(T - 1, device=mask_BT.device)[None, :]
    return (pos_1T + 1 >= starts_B[:, None]) & (mask_BT[:, 1:] > 0)


@torch.inference_mode()
def hidden_features(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    layer: int = -1,
    max_length: int | None = None,
) -> np.ndarray:
    """Mean over non-pad tokens of hidden_states[layer] (output_hidden_states=True): (N, H) float32.

    hidden_states[0] is the embedding output, hidden_states[-1] the last layer (after the final norm
    in HF causal LMs). Texts are tokenised with the tokenizer's defaults (special tokens included),
    truncated to max_length when given, batched with right padding.
    """
    _require_eval(model, "model")
    if tokenizer.pad_token_id is None:
        raise ValueError("hidden_features: the tokenizer has no pad token")
    if not texts:
        raise ValueError("hidden_features: no texts")
    enc = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)
    ids_list = enc["input_ids"]
    if any(len(ids) == 0 for ids in ids_list):
        raise ValueError("hidden_features: a text tokenised to zero tokens")
    device = _model_device(model)
    out_NH: np.ndarray | None = None
    for batch in _length_sorted_batches([len(x) for x in ids_list], batch_size):
        ids_BT, mask_BT = _right_padded(ids_list, batch, device)
        hidden_BTH = model(input_ids=ids_BT, attention_mask=mask_BT, output_hidden_states=True).hidden_states[layer]
        w_BT1 = mask_BT.unsqueeze(-1).to(torch.float32)
        pooled_BH = (hidden_BTH.float() * w_BT1).sum(1) / w_BT1.sum(1)
        if out_NH is None:
            out_NH = np.zeros((len(ids_list), pooled_BH.shape[1]), dtype=np.float32)
        out_NH[batch] = pooled_BH.cpu().numpy()
    return out_NH


@torch.inference_mode()
def sequence_token_nll(
    model: torch.nn.Module,
    ids_list: Sequence[Sequence[int]],
    score_from: Sequence[int],
    batch_size: int,
) -> np.ndarray:
    """Per sequence i: mean over tokens j in [score_from[i], len_i) of -log p(ids[j] | ids[:j]): (N,) float64.

    Log-softmax in float32; batched with right padding (the pad positions are masked out).
    """
    _require_eval(model, "model")
    _check_scored(ids_list, score_from)
    device = _model_device(model)
    nll_N = np.zeros(len(ids_list), dtype=np.float64)
    for batch in _length_sorted_batches([len(x) for x in ids_list], batch_size):
        ids_BT, mask_BT = _right_padded(ids_list, batch, device)
        starts_B = torch.as_tensor([score_from[i] for i in batch], device=device)
        logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits
        logp_BTV = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
        tok_logp_BT = logp_BTV.gather(-1, ids_BT[:, 1:, None]).squeeze(-1)  # (B, T-1)
        scored_BT = _scored_positions(mask_BT, starts_B).to(torch.float32)
        nll_B = -(tok_logp_BT * scored_BT).sum(1) / scored_BT.sum(1)
        nll_N[batch] = nll_B.double().cpu().numpy()
    return nll_N


@torch.inference_mode()
def forward_kl(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    ids_list: Sequence[Sequence[int]],
    score_from: Sequence[int],
    batch_size: int,
) -> float:
    """Mean over all scored positions (pooled over sequences, token-weighted) of the full-vocabulary
    KL(base || tuned)(s) = sum_v p_base(v|s) (log p_base(v|s) - log p_tuned(v|s)), at the states
    s = ids[:j] for j in [score_from[i], len_i) (the states that predict the scored tokens).

    Meant for sequences sampled from the base model (RL's Razor, arXiv 2509.04259). Float32 log-softmax.
    """
    _require_eval(base, "base")
    _require_eval(tuned, "tuned")
    _check_scored(ids_list, score_from)
    dev_base, dev_tuned = _model_device(base), _model_device(tuned)
    total, count = 0.0, 0
    for batch in _length_sorted_batches([len(x) for x in ids_list], batch_size):
        ids_BT, mask_BT = _right_padded(ids_list, batch, dev_base)
        starts_B = torch.as_tensor([score_from[i] for i in batch], device=dev_base)
        logp_base_BTV = torch.log_softmax(
            base(input_ids=ids_BT, attention_mask=mask_BT).logits[:, :-1].float(), dim=-1
        )
        logits_tuned_BTV = tuned(input_ids=ids_BT.to(dev_tuned), attention_mask=mask_BT.to(dev_tuned)).logits
        logp_tuned_BTV = torch.log_softmax(logits_tuned_BTV[:, :-1].float(), dim=-1).to(dev_base)
        if logp_tuned_BTV.shape != logp_base_BTV.shape:
            raise ValueError(
                "forward_kl: vocabularies differ, "
                f"base {tuple(logp_base_BTV.shape)} vs tuned {tuple(logp_tuned_BTV.shape)}"
            )
        kl_BT = (logp_base_BTV.exp() * (logp_base_BTV - logp_tuned_BTV)).sum(-1)
        scored_BT = _scored_positions(mask_BT, starts_B)
        total += float(kl_BT[scored_BT].double().sum())
        count += int(scored_BT.sum())
    return total / count
