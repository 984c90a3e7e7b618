"""Table tests for poststate.stats against hand-computed and published values."""

import math

import numpy as np
import pytest

from poststate.stats import (
    flip_counts,
    binomial_stderr,
    bootstrap_ci,
    mean_stderr,
    normal_ci,
    normal_quantile,
    paired_diff,
    paired_ratio,
    regularized_incomplete_beta,
    t_cdf,
    t_ci,
    t_quantile,
)


@pytest.mark.parametrize(
    "q, df, expected",
    [
        (0.975, 1, 12.7062),  # standard t table
        (0.975, 2, 4.3027),
        (0.975, 4, 2.7764),
        (0.975, 10, 2.2281),
        (0.975, 30, 2.0423),
        (0.95, 5, 2.0150),
        (0.995, 3, 5.8409),
        (0.025, 3, -3.1824),
        (0.5, 7, 0.0),
    ],
)
def test_t_quantile_matches_table(q, df, expected):
    assert t_quantile(q, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_closed_forms_and_normal_limit():
    # df = 1 is Cauchy: tan(pi (q - 1/2)); df = 2: (2q - 1) / sqrt(2 q (1 - q)).
    for q in (0.6, 0.9, 0.975):
        assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-9)
        assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(normal_quantile(0.975), abs=1e-5)
    assert normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert t_cdf(t_quantile(0.9, 6), 6) == pytest.approx(0.9, abs=1e-12)


def test_incomplete_beta_known_values():
    # I_x(1, 1) = x; I_x(a, 1) = x^a; I_0.5(a, a) = 0.5.
    assert regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3)
    assert regularized_incomplete_beta(3, 1, 0.4) == pytest.approx(0.4**3)
    assert regularized_incomplete_beta(2.5, 2.5, 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="x=1.5"):
        regularized_incomplete_beta(1, 1, 1.5)


def test_binomial_stderr_is_harness_mean_stderr():
    # 3 of 4 right: sqrt(0.75 * 0.25 / 3) = 0.25, the harness's sample-stddev / sqrt(n).
    assert binomial_stderr(0.75, 4) == pytest.approx(0.25)
    assert mean_stderr([1, 1, 1, 0]) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 2, size=57).astype(float)
    assert binomial_stderr(xs.mean(), xs.size) == pytest.approx(mean_stderr(xs))
    with pytest.raises(ValueError, match="n=1"):
        binomial_stderr(0.5, 1)
    with pytest.raises(ValueError, match="1.2"):
        binomial_stderr(1.2, 10)


def test_mean_stderr_hand_value():
    # xs = 1, 2, 3, 4: sample var = 5/3, stderr = sqrt(5/3 / 4)
    assert mean_stderr([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 12))
    with pytest.raises(ValueError, match="size >= 2"):
        mean_stderr([1.0])


def test_t_ci_hand_value_and_single_seed():
    mean, lo, hi = t_ci([0.50, 0.52, 0.54])
    half = 4.302653 * 0.02 / math.sqrt(3)  # s = 0.02
    assert mean == pytest.approx(0.52)
    assert (lo, hi) == pytest.approx((0.52 - half, 0.52 + half), abs=1e-6)
    x, lo1, hi1 = t_ci([0.7])
    assert x == 0.7 and math.isnan(lo1) and math.isnan(hi1)


def test_normal_ci():
    lo, hi = normal_ci(0.5, 0.1, level=0.95)
    assert (lo, hi) == pytest.approx((0.5 - 0.1959964, 0.5 + 0.1959964), abs=1e-6)


def test_paired_diff_hand_value_and_id_mismatch():
    a = {"q/0": 1.0, "q/1": 0.0, "q/2": 1.0, "q/3": 0.0}
    b = {"q/0": 1.0, "q/1": 1.0, "q/2": 0.0, "q/3": 1.0}
    mean, se = paired_diff(a, b)  # diffs 0, 1, -1, 1
    assert mean == pytest.approx(0.25)
    assert se == pytest.approx(np.std([0, 1, -1, 1], ddof=1) / 2)
    with pytest.raises(ValueError, match="q/3"):
        paired_diff(a, {k: v for k, v in b.items() if k != "q/3"})


def test_paired_ratio_hand_value_and_against_bootstrap():
    num = {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}
    den = {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}
    g, se = paired_ratio(num, den)
    # g = 0.5 / 0.75; z_i = (num_i - g den_i) / 0.75 = 4/9, 4/9, -8/9, 0
    assert g == pytest.approx(2 / 3)
    assert se == pytest.approx(np.std([4 / 9, 4 / 9, -8 / 9, 0.0], ddof=1) / 2)
    # a difference of ratios with a shared denominator
    sub = {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0}
    g2, _ = paired_ratio(num, den, sub)
    assert g2 == pytest.approx(0.25 / 0.75)
    # the delta-method stderr agrees with a paired item bootstrap on a larger sample
    rng = np.random.default_rng(1)
    base = rng.random(800) < 0.45
    post = np.where(rng.random(800) < 0.85, base, ~base)
    g3, se3 = paired_ratio(dict(enumerate(post.astype(float))), dict(enumerate(base.astype(float))))
    idx = np.random.default_rng(2).integers(0, 800, size=(2000, 800))
    boots = post[idx].mean(1) / base[idx].mean(1)
    assert se3 == pytest.approx(boots.std(), rel=0.1)


def test_bootstrap_ci_is_seeded_and_sane():
    xs = np.arange(20, dtype=float)
    a = bootstrap_ci(xs, n_boot=500, seed=3)
    b = bootstrap_ci(xs, n_boot=500, seed=3)
    c = bootstrap_ci(xs, n_boot=500, seed=4)
    assert a == b
    assert a != c
    point, lo, hi = a
    assert point == pytest.approx(9.5)
    assert lo < 9.5 < hi
    # the interval width is close to +-1.96 standard errors of the mean
    assert (hi - lo) / 2 == pytest.approx(1.96 * xs.std() / math.sqrt(20), rel=0.15)
    med = bootstrap_ci(xs, stat=np.median, n_boot=200, seed=0)
    assert med[0] == pytest.approx(9.5)


def test_flip_counts_small_table():
    base = {"m/0": True, "m/1": True, "m/2": False, "m/3": False, "m/4": True}
    run = {"m/0": True, "m/1": False, "m/2": True, "m/3": False, "m/4": False}
    assert flip_counts(base, run) == {"right_to_wrong": 2, "wrong_to_right": 1, "n": 5}
    with pytest.raises(ValueError, match="m/4"):
        flip_counts(base, {k: v for k, v in run.items() if k != "m/4"})
    with pytest.raises(ValueError, match="bool"):
        flip_counts(base, {**run, "m/0": 1.0})
