"""State-drift diagnostics: MMD of prefix states (lexical and hidden-state), forward KL, locality.

The paper's drift number: sample rollouts from each model on a fixed prompt set, take prefix states,
featurise them with "lightweight lexical features" and report the RBF-kernel MMD to the base model's
rollout states. Features, bandwidth and estimator are not stated; ours, documented per function:

- states: `rollout_states` - per rollout, up to n_cuts distinct word-end cuts drawn without
  replacement, with the prompt index of every state;
- features: `lexical_features` - hashed word uni+bigram counts (blake2b hash), L2-normalised;
- bandwidth: `median_bandwidth` - the median pairwise distance of the pooled sample;
- estimator: `drift_test` - the squared MMD as a U-statistic over pairs of *different* prompts
  (`prompt_pair_kernel`), its jackknife-over-prompts standard error (`jackknife_pseudovalues`) and a
  per-prompt swap permutation test (`swap_test`). The states of one rollout are nested prefixes of it and
  the two samples share their prompts, so states are not i.i.d. draws: an estimator that pairs states of
  the same prompt is biased (`mmd2_rbf`, the naive i.i.d. U-statistic, kept as the tests' reference).
  docs/statistics.md has the derivations and the simulations.

The model-based diagnostics (hidden-state features, token NLL, forward KL) are in `diagnostics.py`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np

_WORD_RE = re.compile(r"\S+")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------- states and lexical features


def rollout_states(
    prompts: Sequence[str], completions: Sequence[str], n_cuts: int, seed: int
) -> tuple[list[str], np.ndarray]:
    """Prefix states s = prompt + completion[:cut] of rollout i = (prompts[i], completions[i]), rollout-major,
    and the prompt index i of every state: (states, prompt_index_N int64).

    Words are maximal runs of non-whitespace in the completion; the allowed cuts are the ends of its W
    words (1..W words kept; the prompt-only state, identical for every model, is excluded). A rollout
    gives min(n_cuts, W) distinct states: when W > n_cuts, n_cuts cuts drawn uniformly *without*
    replacement (numpy default_rng([seed, i]).choice), listed in text order; otherwise every word end.
    An empty completion gives one state, the prompt alone ("" when the caller passes "" prompts to get
    the generated part only). Rollout i's cuts are a function of (seed, i, completions[i]) only, so the
    same seed cuts a completion the same way whatever prompt text it is joined to.

    Sampling design: given rollout i, each of its states is marginally uniform over its W word ends, and
    the mean over its states of any f(state) has expectation (1/W) sum_w f(s_w) (with or without
    subsampling). The states of one rollout are nested prefixes of one text, not independent draws.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"rollout_states: {len(prompts)} prompts but {len(completions)} completions")
    if isinstance(n_cuts, bool) or not isinstance(n_cuts, (int, np.integer)) or n_cuts < 1:
        raise ValueError(f"rollout_states: n_cuts must be an integer >= 1, got {n_cuts!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"rollout_states: seed must be an integer >= 0 (a stream_seed), got {seed!r}")
    states: list[str] = []
    index: list[int] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        word_ends = [m.end() for m in _WORD_RE.finditer(completion)]
        if not word_ends:
            picks: Sequence[int] = [-1]
        elif len(word_ends) <= n_cuts:
            picks = range(len(word_ends))
        else:
            picks = np.sort(np.random.default_rng([int(seed), i]).choice(len(word_ends), size=n_cuts, replace=False))
        states.extend(prompt if k < 0 else prompt + completion[: word_ends[k]] for k in picks)
        index.extend([i] * len(picks))
    return states, np.asarray(index, dtype=np.int64)


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


# ---------------------------------------------------------------- MMD between two samples of states


def _sq_dists(A_ND: np.ndarray, B_MD: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (N, M), clipped at 0."""
    a_N1 = np.sum(A_ND * A_ND, axis=1)[:, None]
    b_1M = np.sum(B_MD * B_MD, axis=1)[None, :]
    return np.maximum(a_N1 + b_1M - 2.0 * (A_ND @ B_MD.T), 0.0)


def _pooled_sq_dists(Z_nD: np.ndarray) -> np.ndarray:
    """Pairwise squared distances (n, n) within one sample. Rows with few nonzeros (hashed n-gram counts:
    under 5% of the entries nonzero) take their inner products row by row over each row's nonzero
    columns, ~D / nnz times fewer multiplications than the dense product; dense rows use Z Z^T."""
    n = Z_nD.shape[0]
    nonzero_nD = Z_nD != 0.0
    if np.count_nonzero(nonzero_nD) < 0.05 * Z_nD.size:
        used_U = np.flatnonzero(nonzero_nD.any(axis=0))
        Z_Un = np.ascontiguousarray(Z_nD[:, used_U].T)  # the columns in use, one contiguous row each
        row_of_D = np.zeros(Z_nD.shape[1], dtype=np.int64)
        row_of_D[used_U] = np.arange(used_U.size)
        gram_nn = np.empty((n, n))
        for i in range(n):
            cols = np.flatnonzero(nonzero_nD[i])
            gram_nn[i] = Z_nD[i, cols] @ Z_Un[row_of_D[cols]]
    else:
        gram_nn = Z_nD @ Z_nD.T
    sq_n = np.einsum("nd,nd->n", Z_nD, Z_nD)
    return np.maximum(sq_n[:, None] + sq_n[None, :] - 2.0 * gram_nn, 0.0)


def _as_2d(X: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite features (row {int(np.flatnonzero(~np.isfinite(arr).all(1))[0])})")
    return arr


def _median_distance(d2_NN: np.ndarray) -> float:
    """sqrt of the median squared distance over pairs i < j, zero distances (below 1e-12 squared) excluded."""
    d2 = d2_NN[np.triu_indices(d2_NN.shape[0], k=1)]
    d2 = d2[d2 > 1e-12]
    if d2.size == 0:
        raise ValueError("median_bandwidth: all pooled points coincide, the bandwidth is undefined")
    return float(np.sqrt(np.median(d2)))


def median_bandwidth(X: np.ndarray, Y: np.ndarray) -> float:
    """Median heuristic on the POOLED sample Z = X u Y: s = sqrt(median ||z_i - z_j||^2) over pairs i < j
    (the median distance when the number of pairs is odd), excluding zero distances (duplicate states;
    below 1e-12 in squared distance, i.e. round-off). Pooling makes s invariant to any exchange of states
    between X and Y, which the swap permutation test needs."""
    Z = np.concatenate([_as_2d(X, "X"), _as_2d(Y, "Y")], axis=0)
    if Z.shape[0] < 2:
        raise ValueError("median_bandwidth needs at least two points in the pooled sample")
    return _median_distance(_pooled_sq_dists(Z))


def mmd2_rbf(X: np.ndarray, Y: np.ndarray, bandwidth: float, unbiased: bool = True) -> float:
    """NAIVE squared MMD, RBF kernel k(x, y) = exp(-||x - y||^2 / (2 s^2)): every state an i.i.d. draw.

    Unbiased U-statistic of Gretton et al. 2012 (eq. 3), only the i = j pairs excluded:
        sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 sum_{i,j} k(x_i,y_j)/(mn);
    biased V-statistic: all pairs, means over m^2, n^2. NOT valid for rollout states: it pairs nested
    prefixes of one rollout (within X) and states of the same prompt (across X and Y), so it is biased
    when the two samples come from one distribution (docs/statistics.md). Kept as the reference the
    tests show that bias with; use `drift_test`.
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


def _prompt_index(p_N: np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(p_N)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one prompt index per state ({n}), got shape {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer prompt indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def prompt_pair_kernel(
    X_ND: np.ndarray, px_N: np.ndarray, Y_MD: np.ndarray, py_M: np.ndarray, bandwidth: float | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """The between-prompt kernel of the drift U-statistic: (h_PP, prompts_P, bandwidth).

    X_p, Y_p: the states (feature rows) of prompt p in sample X and in sample Y (px_N, py_M give each
    row's prompt index; both samples must cover the same prompts, any number of states each). With the
    RBF kernel k(x, y) = exp(-||x - y||^2 / (2 s^2)), s = `bandwidth` or, when None, `median_bandwidth`
    of the pooled sample, and kbar(A, B) the mean of k over the |A| x |B| pairs of two blocks,
        h(p, q) = kbar(X_p, X_q) + kbar(Y_p, Y_q) - kbar(X_p, Y_q) - kbar(Y_p, X_q)   (p != q),
    h_PP[p, p] = 0. h is symmetric; prompts_P are the sorted prompt indices, the order of h_PP's rows.
    """
    X_ND, Y_MD = _as_2d(X_ND, "X_ND"), _as_2d(Y_MD, "Y_MD")
    if X_ND.shape[1] != Y_MD.shape[1]:
        raise ValueError(f"prompt_pair_kernel: feature dims differ, X {X_ND.shape} vs Y {Y_MD.shape}")
    px_N = _prompt_index(px_N, X_ND.shape[0], "px_N")
    py_M = _prompt_index(py_M, Y_MD.shape[0], "py_M")
    prompts_P, block_x = np.unique(px_N, return_inverse=True)
    prompts_y, block_y = np.unique(py_M, return_inverse=True)
    if not np.array_equal(prompts_P, prompts_y):
        only_x = np.setdiff1d(prompts_P, prompts_y)[:5].tolist()
        only_y = np.setdiff1d(prompts_y, prompts_P)[:5].tolist()
        raise ValueError(
            f"prompt_pair_kernel: the samples cover different prompts (only in X: {only_x}, only in Y: {only_y})"
        )
    P = prompts_P.size
    if P < 2:
        raise ValueError(f"prompt_pair_kernel: needs >= 2 prompts, got {P}")
    if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"prompt_pair_kernel: bandwidth must be finite and > 0, got {bandwidth!r}")
    order_x, order_y = np.argsort(block_x, kind="stable"), np.argsort(block_y, kind="stable")
    Z_nD = np.concatenate([X_ND[order_x], Y_MD[order_y]], axis=0)  # rows grouped: X_0..X_{P-1}, Y_0..Y_{P-1}
    block_n = np.concatenate([block_x[order_x], P + block_y[order_y]])
    starts_B = np.flatnonzero(np.r_[True, block_n[1:] != block_n[:-1]])  # every one of the 2P blocks is non-empty
    sizes_B = np.diff(np.r_[starts_B, block_n.size]).astype(np.float64)
    d2_nn = _pooled_sq_dists(Z_nD)
    s = _median_distance(d2_nn) if bandwidth is None else float(bandwidth)
    k_nn = np.exp(d2_nn * (-1.0 / (2.0 * s * s)))
    kbar_BB = np.add.reduceat(np.add.reduceat(k_nn, starts_B, axis=0), starts_B, axis=1) / np.outer(sizes_B, sizes_B)
    xy_PP = kbar_BB[:P, P:]
    h_PP = kbar_BB[:P, :P] + kbar_BB[P:, P:] - xy_PP - xy_PP.T
    h_PP = 0.5 * (h_PP + h_PP.T)  # exact symmetry (the two triangles differ by summation order only)
    np.fill_diagonal(h_PP, 0.0)
    return h_PP, prompts_P, s


def _check_h(h_PP: np.ndarray, min_prompts: int) -> np.ndarray:
    h = np.asarray(h_PP, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] < min_prompts:
        raise ValueError(f"h_PP must be a square (P, P) matrix with P >= {min_prompts}, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("h_PP has non-finite entries")
    return h


def _swap_stats(h_PP: np.ndarray, signs_BP: np.ndarray) -> np.ndarray:
    """T(sigma) = sum_{p != q} sigma_p sigma_q h(p, q) / (P (P - 1)) per row sigma of signs_BP: (B,)."""
    P = h_PP.shape[0]
    return np.einsum("bp,bp->b", signs_BP @ h_PP, signs_BP) / (P * (P - 1))


def jackknife_pseudovalues(h_PP: np.ndarray) -> np.ndarray:
    """Leave-one-prompt-out jackknife pseudo-values of U = sum_{p != q} h(p, q) / (P (P - 1)): (P,).

    psi_p = P U - (P - 1) U_(-p), U_(-p) the same U-statistic without prompt p (needs P >= 3). For a
    U-statistic mean_p U_(-p) = U, so the jackknife's bias correction is zero: mean(psi) = U exactly (up to
    float rounding), and the jackknife variance of U is var(psi, ddof=1) / P. In closed form
    psi_p = U + 2 (P - 1) / (P - 2) * (hbar_p - U), hbar_p = mean_{q != p} h(p, q).
    """
    h = _check_h(h_PP, 3)
    P = h.shape[0]
    total = float(h.sum())
    u = total / (P * (P - 1))
    loo_P = (total - 2.0 * h.sum(axis=1)) / ((P - 1) * (P - 2))
    return P * u - (P - 1) * loo_P


def swap_test(h_PP: np.ndarray, n_perm: int, seed: int) -> float:
    """Permutation p-value of U = T(1) against H0 (both samples from one distribution), right-tailed.

    A permutation swaps X_p <-> Y_p independently per prompt (sign sigma_p = -1). Swapping one prompt's
    blocks flips the sign of h(p, q) for every q != p and leaves h(q, r) alone, so the permuted statistic
    is T(sigma) = sum_{p != q} sigma_p sigma_q h(p, q) / (P (P - 1)), with the kernel (and its pooled-sample
    bandwidth) unchanged: all n_perm statistics are one (n_perm, P) x (P, P) product. Valid because under
    H0, with independent random streams for the two samples, (X_p, Y_p) is exchangeable within each prompt
    and independent across prompts. p = (1 + #{b: T(sigma_b) >= U}) / (1 + n_perm), sigma_b uniform on
    {-1, +1}^P from numpy default_rng(seed); it lies in [1 / (1 + n_perm), 1] and P(p <= a) <= a under H0.
    """
    h = _check_h(h_PP, 2)
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise ValueError(f"swap_test: n_perm must be an integer >= 1, got {n_perm!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"swap_test: seed must be an integer >= 0 (a stream_seed), got {seed!r}")
    P = h.shape[0]
    signs_BP = np.random.default_rng(int(seed)).integers(0, 2, size=(int(n_perm), P)).astype(np.float64) * 2.0 - 1.0
    observed = _swap_stats(h, np.ones((1, P)))[0]
    return float((1 + np.count_nonzero(_swap_stats(h, signs_BP) >= observed)) / (1 + n_perm))


def drift_test(
    X_ND: np.ndarray,
    px_N: np.ndarray,
    Y_MD: np.ndarray,
    py_M: np.ndarray,
    n_perm: int,
    seed: int,
    bandwidth: float | None = None,
) -> dict:
    """Squared MMD between the state distributions of two samples of rollouts on the same prompts, with
    its jackknife standard error and a permutation p-value. Between-prompt U-statistic (our estimator; the
    paper does not state one):

        MMD^2_hat = U = (1 / (P (P - 1))) sum_{p != q} h(p, q),   h from `prompt_pair_kernel`.

    Target and proof of unbiasedness. Let the P prompts be i.i.d. draws from the prompt population and,
    given prompt p, the blocks X_p, Y_p come from the two models' rollouts and cuts; the blocks of
    different prompts are independent. Write nu_A for the empirical measure of a block A (each state weight
    1 / |A|); by `rollout_states`, E[nu_{X_p}] = mu_X, the law of a state drawn as: prompt from the
    population, rollout from model X, cut uniform over its word ends (likewise mu_Y). kbar(A, B) =
    integral of k over nu_A x nu_B is bilinear, so for p != q (nu_{X_p} independent of nu_{X_q}, of nu_{Y_q})
    E kbar(X_p, X_q) = E_{x, x' ~ mu_X iid} k(x, x'), E kbar(X_p, Y_q) = E_{x ~ mu_X, y ~ mu_Y} k(x, y),
    hence E h(p, q) = MMD^2(mu_X, mu_Y) and E U = MMD^2(mu_X, mu_Y): unbiased, with unequal state counts
    per prompt, for a fixed kernel. Pairs p = p (nested prefixes of one rollout; two rollouts of one
    prompt) never enter. With the data-dependent median bandwidth the estimate is unbiased given s.
    Under H0 (mu_X = mu_Y) E U = 0; U can be negative.

    Returns (JSON-serialisable): mmd2 (U), se (jackknife over prompts: sqrt(var(pseudo, ddof=1) / P);
    design: prompts i.i.d., the two models fixed), pseudo (the jackknife pseudo-values per prompt, in
    prompt order; their mean equals mmd2 exactly, a U-statistic's jackknife bias correction being zero, so
    they serve as per-item values for `stats.seed_item_interval` across training seeds), prompts (the
    prompt indices), p_value (`swap_test` with n_perm sign draws from `seed`), bandwidth, n_perm,
    n_states ([N, M]), estimator ("between-prompt U").
    """
    h_PP, prompts_P, s = prompt_pair_kernel(X_ND, px_N, Y_MD, py_M, bandwidth)
    if prompts_P.size < 3:
        raise ValueError(f"drift_test: the jackknife needs >= 3 prompts, got {prompts_P.size}")
    pseudo_P = jackknife_pseudovalues(h_PP)
    P = prompts_P.size
    return {
        "mmd2": float(h_PP.sum() / (P * (P - 1))),
        "se": float(math.sqrt(pseudo_P.var(ddof=1) / P)),
        "pseudo": [float(v) for v in pseudo_P],
        "prompts": [int(v) for v in prompts_P],
        "p_value": swap_test(h_PP, n_perm, seed),
        "bandwidth": s,
        "n_perm": int(n_perm),
        "n_states": [int(np.shape(X_ND)[0]), int(np.shape(Y_MD)[0])],
        "estimator": "between-prompt U",
    }
