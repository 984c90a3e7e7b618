"""Standard errors, confidence intervals, and intervals across training seeds scored on the same items.

`seed_item_interval` is the interval for a mean over training seeds of per-seed statistics that are
(linearised as) means over the same eval items for every seed: seeds and items crossed, variance from a
two-way random-effects ANOVA (docs/statistics.md). `ratio_pseudovalues` linearises a ratio (retention) for
it; `power_at` is the chance that such an interval settles a one-sided claim.

Conventions (matching EleutherAI lm-evaluation-harness, `lm_eval/api/metrics.py`):
the harness reports, for every mean-aggregated metric, `mean_stderr(xs) = sample_stddev(xs) / sqrt(n)`
with the Bessel-corrected `sample_stddev = sqrt(sum (x - mean)^2 / (n - 1))`. For 0/1 items
`sum (x - p)^2 = n p (1 - p)`, so the harness's accuracy stderr is `sqrt(p (1 - p) / (n - 1))`,
not the textbook `sqrt(p (1 - p) / n)`. We use the harness form everywhere so that our
stderrs equal the ones published next to harness scores.

scipy is not a dependency: Student-t quantiles come from a numeric inverse of the t CDF written
with the regularized incomplete beta function (Lentz continued fraction), normal quantiles from
`statistics.NormalDist`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Hashable

import numpy as np


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level!r}")


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy p over n 0/1 items, harness convention: sqrt(p (1 - p) / (n - 1)).

    Equals `mean_stderr` of n items of which a fraction p are 1 (Bessel-corrected sample variance).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"accuracy p must lie in [0, 1], got {p!r}")
    if int(n) != n or n < 2:
        raise ValueError(f"binomial_stderr needs an integer n >= 2, got n={n!r}")
    return math.sqrt(p * (1.0 - p) / (n - 1))


def mean_stderr(xs: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean of per-item scores: sqrt(sum (x - mean)^2 / (n - 1)) / sqrt(n)."""
    arr = np.asarray(xs, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"mean_stderr needs a 1-D sample of size >= 2, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("mean_stderr got non-finite values")
    return float(arr.std(ddof=1) / math.sqrt(arr.size))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps, max_iter = 1e-300, 1e-15, 500
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"incomplete beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete beta needs 0 <= x <= 1, got x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t CDF: F(t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0, and symmetry for t < 0."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def _t_pdf(t: float, df: float) -> float:
    """Student-t density."""
    log_c = math.lgamma((df + 1.0) / 2.0) - math.lgamma(df / 2.0) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1.0) / 2.0 * math.log1p(t * t / df))


def t_quantile(q: float, df: float) -> float:
    """Inverse Student-t CDF (e.g. t_quantile(0.975, 1) = 12.706), by Newton's method on `t_cdf` from the
    normal quantile: for q > 1/2 the CDF is concave on t > 0 and the normal quantile lies below the root,
    so the exact iterates increase monotonically to it; stopped when a step is below 1e-12 relative or
    negative (t_cdf's round-off, ~1e-14, reached). Above df = 1e7, where the incomplete beta loses
    precision, it returns the normal quantile (the two differ by < (z^3 + z) / (4 df) < 1e-6 there)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level q must lie in (0, 1), got {q!r}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    x = normal_quantile(q)
    if df > 1e7:
        return x
    for _ in range(500):
        step = (q - t_cdf(x, df)) / _t_pdf(x, df)
        if step <= 1e-12 * max(1.0, x):
            return x + max(step, 0.0)
        x += step
    raise RuntimeError(f"t_quantile did not converge for q={q}, df={df}")


@functools.lru_cache(maxsize=4096)
def _t_quantile_int(q: float, df: int) -> float:
    """t_quantile for the integer df of ANOVA mean squares, cached (simulations call it with few distinct df)."""
    return t_quantile(q, df)


def normal_quantile(q: float) -> float:
    """Inverse standard normal CDF (e.g. normal_quantile(0.975) = 1.95996)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level q must lie in (0, 1), got {q!r}")
    return NormalDist().inv_cdf(q)


def normal_ci(estimate: float, stderr: float, level: float = 0.95) -> tuple[float, float]:
    """Wald interval estimate -/+ z_{(1+level)/2} * stderr."""
    _check_level(level)
    if not stderr >= 0:
        raise ValueError(f"stderr must be >= 0, got {stderr!r}")
    half = normal_quantile(0.5 + level / 2.0) * stderr
    return estimate - half, estimate + half


def t_ci(xs: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Student-t interval across seeds: mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n), s with ddof=1.

    Returns (mean, lo, hi); for a single value returns (x, nan, nan) since no spread is observed.
    """
    _check_level(level)
    arr = np.asarray(xs, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"t_ci needs a non-empty 1-D sample, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"t_ci got non-finite values: {arr.tolist()}")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2.0, arr.size - 1) * mean_stderr(arr)
    return mean, mean - half, mean + half


def paired_diff(
    a_items: Mapping[Hashable, float], b_items: Mapping[Hashable, float]
) -> tuple[float, float]:
    """Paired per-item difference b - a: (mean_i (b_i - a_i), mean_stderr of the differences).

    Both mappings must hold exactly the same item ids.
    """
    if set(a_items) != set(b_items):
        only_a = sorted(map(str, set(a_items) - set(b_items)))[:5]
        only_b = sorted(map(str, set(b_items) - set(a_items)))[:5]
        raise ValueError(f"paired_diff: item ids differ (only in a: {only_a}, only in b: {only_b})")
    ids = sorted(a_items, key=str)
    d = np.array([float(b_items[i]) - float(a_items[i]) for i in ids], dtype=np.float64)
    return float(d.mean()), mean_stderr(d)


def paired_ratio(
    num_items: Mapping[Hashable, float],
    den_items: Mapping[Hashable, float],
    sub_items: Mapping[Hashable, float] | None = None,
) -> tuple[float, float]:
    """Delta-method estimate and stderr of g = (mean(num) - mean(sub)) / mean(den) over paired items.

    With sub absent (zeros) g is a retention ratio post/base. Linearising g around the means gives the
    per-item influence z_i = ((num_i - sub_i) - g * den_i) / mean(den); the stderr is mean_stderr(z).
    All mappings must hold the same item ids.
    """
    maps = [num_items, den_items] + ([sub_items] if sub_items is not None else [])
    ids = set(num_items)
    for m in maps[1:]:
        if set(m) != ids:
            raise ValueError("paired_ratio: item ids differ between the mappings")
    order = sorted(ids, key=str)
    num = np.array([float(num_items[i]) for i in order])
    den = np.array([float(den_items[i]) for i in order])
    sub = np.array([float(sub_items[i]) for i in order]) if sub_items is not None else np.zeros_like(num)
    den_mean = den.mean()
    if den_mean == 0:
        raise ValueError("paired_ratio: the denominator's mean is 0")
    g = (num.mean() - sub.mean()) / den_mean
    z = ((num - sub) - g * den) / den_mean
    return float(g), mean_stderr(z)


def _strata(strata: Sequence[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, float]]:
    """Validated (U_SI float64, weight) pairs with one seed count S across strata."""
    if isinstance(strata, (str, bytes)) or not isinstance(strata, Sequence) or len(strata) == 0:
        raise ValueError(f"strata must be a non-empty list of (U_SI, weight) pairs, got {strata!r:.80}")
    out: list[tuple[np.ndarray, float]] = []
    for t, entry in enumerate(strata):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ValueError(f"strata[{t}] must be a (U_SI, weight) pair, got {entry!r:.80}")
        U_SI = np.asarray(entry[0], dtype=np.float64)
        weight = entry[1]
        if U_SI.ndim != 2 or U_SI.shape[0] < 1 or U_SI.shape[1] < 2:
            raise ValueError(
                f"strata[{t}]: U_SI must be a (seeds, items) array with >= 2 items, got shape {U_SI.shape}"
            )
        if out and U_SI.shape[0] != out[0][0].shape[0]:
            raise ValueError(
                f"strata[{t}] has {U_SI.shape[0]} seeds but strata[0] has {out[0][0].shape[0]}: "
                "every stratum must hold the same training seeds, one row each"
            )
        if not np.all(np.isfinite(U_SI)):
            raise ValueError(f"strata[{t}]: U_SI has non-finite values")
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
            raise ValueError(f"strata[{t}]: weight must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight != 0):
            raise ValueError(f"strata[{t}]: weight must be finite and non-zero, got {weight!r}")
        out.append((U_SI, float(weight)))
    return out


def seed_item_interval(strata: Sequence[tuple[np.ndarray, float]], level: float = 0.95) -> dict:
    """Interval for theta = sum_t w_t mean(U_t) when every training seed is scored on the SAME items.

    strata: (U_SI, w) pairs, U_SI a (S seeds, I_t items) array of per-item values whose row mean is seed s's
    statistic in stratum t (0/1 scores for an accuracy; y_si - b_i for a paired difference; delta-method
    pseudo-values from `ratio_pseudovalues` for a ratio; jackknife pseudo-values for a drift MMD); rows are
    the same seeds, in the same order, in every stratum. theta_s = sum_t w_t mean_i U^t_si, and the
    estimate is mean_s theta_s.

    Sampling design: seeds and items are crossed, not nested - seeds are i.i.d. draws (training runs),
    each stratum's items i.i.d. draws from its benchmark's population, independent across strata.
    Two-way random-effects model per stratum, U_si = mu + a_s + b_i + e_si; the seed effects may be
    correlated across strata (one model per seed). The variance of the estimate (ANOVA, unbiased):

        Var = s^2(theta_s) / S + sum_t w_t^2 [ s^2(z^t_i) / I_t - MS^t_res / (I_t S) ],

    z^t_i = mean_s U^t_si, MS^t_res = sum (U_si - Ubar_s. - Ubar_.i + Ubar_..)^2 / ((S-1)(I_t-1)); the
    residual is inside both the seed and the item term, hence subtracted once. As components:
    residual_t = w_t^2 MS^t_res / (I_t S) (df (S-1)(I_t-1)), item_t = w_t^2 (s^2(z^t) - MS^t_res / S) / I_t
    (df I_t - 1), seed = s^2(theta_s) / S - sum_t residual_t (df S - 1); Var = seed + item + residual.
    Rule for negative estimates: a seed or item_t component below 0 (sampling noise; the true one is
    >= 0) is set to 0, the usual truncated ANOVA estimator, which can only widen the interval.

    Interval: mean -/+ t se with t^2 = sum_k t_k^2 v_k / sum_k v_k, v_k the components and t_k the
    (1+level)/2 quantile of Student's t with the component's df: each component is expanded by its own
    quantile (t = t_{S-1} when the seed component dominates, ~z when items do). Departure from the
    textbook Satterthwaite interval mean -/+ t_{df} se, df = Var^2 / sum_k (c_k MS_k)^2 / df_k over the mean
    squares actually used (returned as `df`): with S = 3 and a large seed component its estimated df rises
    exactly when s^2(theta_s) is small by chance; in the seed-heavy scenarios of docs/statistics.md
    (10,000 replications each) its 95% interval covered 0.926-0.943, this one 0.935-0.951.

    S = 1: the seed component is not identifiable; Var = sum_t w_t^2 s^2(U^t_1i) / I_t (item sampling
    only, df I_t - 1 per stratum), an interval for this one trained model's expected statistic over the
    item populations, not for the method (design "items only, conditional on the one training seed").
    A zero variance (every value equal) gives se 0, df and t None, and lo = hi = mean.

    Returns mean, se, t, df (Satterthwaite), lo, hi, level, n_seeds, n_items (sum over strata),
    items_per_stratum, components {seed, item, residual} (variances of the estimate; seed and residual None
    when S = 1), design.
    """
    _check_level(level)
    pairs = _strata(strata)
    S = pairs[0][0].shape[0]
    theta_S = np.zeros(S)
    for U_SI, w in pairs:
        theta_S += w * U_SI.mean(axis=1)
    mean = float(theta_S.mean())
    parts: list[tuple[float, float]] = []  # (variance component, df)
    ms_terms: list[tuple[float, float, float]] = []  # (coefficient, mean square, df) for Satterthwaite
    if S == 1:
        for U_SI, w in pairs:
            n_items = U_SI.shape[1]
            ms_terms.append((w * w / n_items, float(U_SI[0].var(ddof=1)), n_items - 1))
            parts.append((ms_terms[-1][0] * ms_terms[-1][1], n_items - 1))
        var = sum(v for v, _ in parts)
        components = {"seed": None, "item": var, "residual": None}
        design = "items only, conditional on the one training seed"
    else:
        s2_theta = float(theta_S.var(ddof=1))
        per_stratum = []
        for U_SI, w in pairs:
            n_items = U_SI.shape[1]
            resid_SI = U_SI - U_SI.mean(axis=1, keepdims=True) - U_SI.mean(axis=0, keepdims=True) + U_SI.mean()
            ms_res = float(np.sum(resid_SI * resid_SI) / ((S - 1) * (n_items - 1)))
            per_stratum.append((w * w, n_items, float(U_SI.mean(axis=0).var(ddof=1)), ms_res))
        residual = sum(w2 * ms_res / (n * S) for w2, n, _, ms_res in per_stratum)
        keep_seed = s2_theta / S - residual > 0
        seed = s2_theta / S - residual if keep_seed else 0.0
        parts.append((seed, S - 1))
        if keep_seed:
            ms_terms.append((1.0 / S, s2_theta, S - 1))
        item = 0.0
        for w2, n, s2_z, ms_res in per_stratum:
            item_t = max(w2 * (s2_z - ms_res / S) / n, 0.0)
            item += item_t
            parts += [(item_t, n - 1), (w2 * ms_res / (n * S), (S - 1) * (n - 1))]
            if item_t > 0:
                ms_terms.append((w2 / n, s2_z, n - 1))
            ms_terms.append((w2 / (n * S) * (1 - keep_seed - (item_t > 0)), ms_res, (S - 1) * (n - 1)))
        var = seed + item + residual
        components = {"seed": seed, "item": item, "residual": residual}
        design = (
            f"crossed seeds x items: {S} training seeds scored on the same items; "
            "two-way random-effects ANOVA variance of the grand mean"
        )
    se = math.sqrt(var)
    q = 0.5 + level / 2.0
    if var > 0:
        t = math.sqrt(sum(v * _t_quantile_int(q, df) ** 2 for v, df in parts if v > 0) / var)
        df: float | None = var * var / sum((c * ms) ** 2 / d for c, ms, d in ms_terms if c != 0 and ms > 0)
    else:
        t = df = None
    half = 0.0 if t is None else t * se
    return {
        "mean": mean,
        "se": se,
        "t": t,
        "df": df,
        "lo": mean - half,
        "hi": mean + half,
        "level": level,
        "n_seeds": S,
        "n_items": int(sum(U_SI.shape[1] for U_SI, _ in pairs)),
        "items_per_stratum": [int(U_SI.shape[1]) for U_SI, _ in pairs],
        "components": components,
        "design": design,
    }


def ratio_pseudovalues(num_SI: np.ndarray, den_I: np.ndarray) -> np.ndarray:
    """Delta-method pseudo-values of R_s = mean_i num_si / mean_i den_i, the denominator shared by every
    seed (retention: a post-trained seed's per-item scores over the base's on the same items): (S, I).

        u_si = R_s + (num_si - R_s den_i) / mean(den),

    so mean_i u_si = R_s exactly, and u_si - R_s is item i's influence on R_s (linearisation of the ratio
    around the means); feed them to `seed_item_interval` as one stratum.
    """
    num = np.asarray(num_SI, dtype=np.float64)
    den = np.asarray(den_I, dtype=np.float64)
    if num.ndim != 2 or den.ndim != 1 or num.shape[1] != den.shape[0] or den.shape[0] < 1:
        raise ValueError(f"ratio_pseudovalues: need num_SI (S, I) and den_I (I,), got {num.shape} and {den.shape}")
    if not (np.all(np.isfinite(num)) and np.all(np.isfinite(den))):
        raise ValueError("ratio_pseudovalues: non-finite values")
    den_mean = float(den.mean())
    if den_mean == 0:
        raise ValueError("ratio_pseudovalues: the denominator's mean is 0")
    R_S1 = num.mean(axis=1, keepdims=True) / den_mean
    return R_S1 + (num - R_S1 * den[None, :]) / den_mean


_CLAIM_OPS = (">", ">=", "<", "<=")


def power_at(se: float, threshold: float, alternative: float, op: str, level: float = 0.95) -> float:
    """Probability that the two-sided `level` interval estimate -/+ z se lands entirely on the claimed side
    of `threshold` (op '>' or '>=': lo above / at or above it; '<' or '<=': hi below / at or below it) when
    the true value is `alternative`. Normal approximation: the estimate ~ N(alternative, se^2) with se
    known, z = z_{(1+level)/2}; with a t interval of few df the true power is lower.
        '>', '>=': Phi((alternative - threshold) / se - z);   '<', '<=': Phi((threshold - alternative) / se - z).
    """
    _check_level(level)
    if op not in _CLAIM_OPS:
        raise ValueError(f"power_at: op must be one of {_CLAIM_OPS}, got {op!r}")
    for name, value in (("se", se), ("threshold", threshold), ("alternative", alternative)):
        if not math.isfinite(value):
            raise ValueError(f"power_at: {name} must be finite, got {value!r}")
    if not se > 0:
        raise ValueError(f"power_at: se must be > 0, got {se!r}")
    z = normal_quantile(0.5 + level / 2.0)
    margin = (alternative - threshold) if op in (">", ">=") else (threshold - alternative)
    return NormalDist().cdf(margin / se - z)


def flip_counts(base: Mapping[Hashable, bool], run: Mapping[Hashable, bool]) -> dict[str, int]:
    """Per-item flips between a base and a run on the same items: right_to_wrong (base right, run wrong),
    wrong_to_right (base wrong, run right), and n items."""
    if set(base) != set(run):
        only_base = sorted(map(str, set(base) - set(run)))[:5]
        only_run = sorted(map(str, set(run) - set(base)))[:5]
        raise ValueError(f"flip_counts: item ids differ (only in base: {only_base}, only in run: {only_run})")
    for name, table in (("base", base), ("run", run)):
        bad = [k for k, v in table.items() if not isinstance(v, (bool, np.bool_))]
        if bad:
            raise ValueError(f"flip_counts: {name} values must be bool, item {bad[0]!r} is {table[bad[0]]!r}")
    r2w = sum(1 for k in base if base[k] and not run[k])
    w2r = sum(1 for k in base if not base[k] and run[k])
    return {"right_to_wrong": r2w, "wrong_to_right": w2r, "n": len(base)}
