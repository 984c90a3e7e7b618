"""Standard errors, confidence intervals and the bootstrap.

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

import math
from collections.abc import Callable, Mapping, Sequence
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


def t_quantile(q: float, df: float) -> float:
    """Inverse Student-t CDF, found by bisection on `t_cdf` to ~1e-12 (e.g. t_quantile(0.975, 1) = 12.706)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level q must lie in (0, 1), got {q!r}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


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


def bootstrap_ci(
    xs: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Percentile bootstrap: (stat(xs), lo, hi) with lo/hi the (1-level)/2 and (1+level)/2 quantiles
    of stat over n_boot resamples of xs with replacement, drawn from numpy default_rng(seed)."""
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    arr = np.asarray(xs, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D sample, got shape {arr.shape}")
    rng = np.random.default_rng(seed)
    idx_BN = rng.integers(0, arr.size, size=(n_boot, arr.size))  # (n_boot, n)
    boots = np.array([float(stat(arr[row])) for row in idx_BN])
    alpha = 1.0 - level
    lo, hi = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(stat(arr)), float(lo), float(hi)


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
