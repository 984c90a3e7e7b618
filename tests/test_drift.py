"""Tests for poststate.drift: rollout states, lexical features, the between-prompt MMD U-statistic (hand
values, jackknife, swap permutation test), a simulation of the eval's drift design (identical
distributions: mean ~0 and the nominal false-positive rate; a planted shift: detected; the naive
i.i.d. estimator: biased), and the batched model diagnostics (KL, NLL, hidden features) against
unbatched loops on tiny random Qwen3 models."""

import math

import numpy as np
import pytest

from poststate.drift import (
    drift_test,
    jackknife_pseudovalues,
    lexical_features,
    median_bandwidth,
    mmd2_rbf,
    prompt_pair_kernel,
    rollout_states,
    swap_test,
)

# ---------------------------------------------------------------- naive MMD (the reference the bias is shown with)


def test_mmd_biased_toy_pair_by_hand():
    s = 0.7
    X, Y = np.array([[0.0]]), np.array([[1.0]])
    assert mmd2_rbf(X, Y, s, unbiased=False) == pytest.approx(2 - 2 * math.exp(-1 / (2 * s * s)))


def test_mmd_unbiased_two_point_sets_by_hand():
    # X = {0, 1}, Y = {3, 5}, s = 1: U-stat = k(0,1) + k(3,5) - 2 * mean of the 4 cross terms
    k = lambda d: math.exp(-d * d / 2)  # noqa: E731
    expected = k(1) + k(2) - 0.5 * (k(3) + k(5) + k(2) + k(4))
    X, Y = np.array([[0.0], [1.0]]), np.array([[3.0], [5.0]])
    assert mmd2_rbf(X, Y, 1.0, unbiased=True) == pytest.approx(expected)


def test_median_bandwidth_by_hand_excludes_zeros():
    # pooled points 0, 0, 1, 3: nonzero distances 1, 3, 1, 3, 2 -> median 2
    X, Y = np.array([[0.0], [0.0]]), np.array([[1.0], [3.0]])
    assert median_bandwidth(X, Y) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="coincide"):
        median_bandwidth(np.zeros((2, 3)), np.zeros((1, 3)))


def test_mmd_rejects_bad_bandwidth_and_dims():
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2_rbf(np.zeros((2, 1)), np.ones((2, 1)), 0.0)
    with pytest.raises(ValueError, match="dims differ"):
        mmd2_rbf(np.zeros((2, 1)), np.ones((2, 2)), 1.0)


# ---------------------------------------------------------------- between-prompt U-statistic, by hand


def _k(a: float, b: float, s: float = 1.0) -> float:
    return math.exp(-((a - b) ** 2) / (2 * s * s))


def _kbar(A, B) -> float:
    return float(np.mean([_k(a, b) for a in A for b in B]))


# three prompts, 1-D features, unequal state counts per prompt and sample
X_BLOCKS = {0: [0.0], 1: [1.0, 2.0], 2: [4.0]}
Y_BLOCKS = {0: [0.5, 1.5], 1: [3.0], 2: [4.0, 5.0, 6.0]}


def _flat(blocks):
    feats = np.array([[v] for p in sorted(blocks) for v in blocks[p]])
    index = np.array([p for p in sorted(blocks) for _ in blocks[p]])
    return feats, index


def _hand_h(p, q):
    Xp, Xq, Yp, Yq = X_BLOCKS[p], X_BLOCKS[q], Y_BLOCKS[p], Y_BLOCKS[q]
    return _kbar(Xp, Xq) + _kbar(Yp, Yq) - _kbar(Xp, Yq) - _kbar(Yp, Xq)


def test_prompt_pair_u_statistic_by_hand():
    X, px = _flat(X_BLOCKS)
    Y, py = _flat(Y_BLOCKS)
    # shuffle the rows: blocks are found by prompt index, not by position
    perm = np.random.default_rng(0).permutation(len(Y))
    h, prompts, s = prompt_pair_kernel(X, px, Y[perm], py[perm], bandwidth=1.0)
    assert prompts.tolist() == [0, 1, 2] and s == 1.0
    for p in range(3):
        assert h[p, p] == 0.0
        for q in range(3):
            if p != q:
                assert h[p, q] == pytest.approx(_hand_h(p, q), abs=1e-12)
    u = sum(_hand_h(p, q) for p in range(3) for q in range(3) if p != q) / 6
    out = drift_test(X, px, Y, py, n_perm=10, seed=0, bandwidth=1.0)
    assert out["mmd2"] == pytest.approx(u, abs=1e-12)
    assert out["estimator"] == "between-prompt U" and out["prompts"] == [0, 1, 2] and out["n_states"] == [4, 6]
    # default bandwidth: the pooled-sample median
    assert drift_test(X, px, Y, py, 10, 0)["bandwidth"] == pytest.approx(median_bandwidth(X, Y))


def test_prompt_pair_kernel_sparse_rows_by_brute_force():
    # hashed n-gram rows are ~1% nonzero and take the row-by-row inner products; 40 constant columns (the
    # same distances) push the density over 5% and into the dense product: both equal a brute-force loop
    rng = np.random.default_rng(4)
    P = 5
    px, py = np.repeat(np.arange(P), 3), np.r_[np.arange(P), np.arange(P)]
    X = np.where(rng.random((px.size, 600)) < 0.01, rng.random((px.size, 600)), 0.0)
    Y = np.where(rng.random((py.size, 600)) < 0.01, rng.random((py.size, 600)), 0.0)
    h_sparse, _, s = prompt_pair_kernel(X, px, Y, py)
    pad = lambda A: np.hstack([A, np.ones((A.shape[0], 40))])  # noqa: E731
    h_dense, _, s_dense = prompt_pair_kernel(pad(X), px, pad(Y), py)
    kbar = lambda A, B: np.mean([math.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for a in A for b in B])  # noqa: E731
    brute = np.zeros((P, P))
    for p in range(P):
        for q in range(P):
            if p != q:
                Xp, Xq, Yp, Yq = X[px == p], X[px == q], Y[py == p], Y[py == q]
                brute[p, q] = kbar(Xp, Xq) + kbar(Yp, Yq) - kbar(Xp, Yq) - kbar(Yp, Xq)
    assert s_dense == pytest.approx(s, rel=1e-12)
    np.testing.assert_allclose(h_sparse, brute, atol=1e-12)
    np.testing.assert_allclose(h_dense, brute, atol=1e-12)


def test_jackknife_pseudovalues_by_hand():
    h = np.array([[0.0, 1.0, 2.0, 0.0], [1.0, 0.0, 3.0, -1.0], [2.0, 3.0, 0.0, 4.0], [0.0, -1.0, 4.0, 0.0]])
    # U = (2 / 12) * (1 + 2 + 0 + 3 - 1 + 4) = 1.5; leave-one-out U on 3 prompts = mean of its 3 pairs
    loo = np.array([(3 - 1 + 4) / 3, (2 + 0 + 4) / 3, (1 + 0 - 1) / 3, (1 + 2 + 3) / 3])
    expected = 4 * 1.5 - 3 * loo
    np.testing.assert_allclose(jackknife_pseudovalues(h), expected, atol=1e-12)
    np.testing.assert_allclose(expected, [0.0, 0.0, 6.0, 0.0])  # hand: 6 - 3 * (2, 2, 0, 2)
    assert jackknife_pseudovalues(h).mean() == pytest.approx(1.5)  # a U-statistic: zero bias correction
    # drift_test's se is the jackknife se, sqrt(var(pseudo, ddof=1) / P), from the same pseudo-values
    X, px = _flat(X_BLOCKS)
    Y, py = _flat(Y_BLOCKS)
    out = drift_test(X, px, Y, py, 10, 0, bandwidth=1.0)
    pseudo = np.array(out["pseudo"])
    assert pseudo.mean() == pytest.approx(out["mmd2"], abs=1e-12)
    assert out["se"] == pytest.approx(math.sqrt(pseudo.var(ddof=1) / 3))
    with pytest.raises(ValueError, match="P >= 3"):
        jackknife_pseudovalues(np.zeros((2, 2)))


def test_swap_statistic_equals_recomputation_on_swapped_samples():
    # T(sigma) = sum sigma_p sigma_q h(p, q) / (P (P-1)) must equal the U-statistic of the samples with
    # X_p <-> Y_p exchanged where sigma_p = -1 (same bandwidth)
    rng = np.random.default_rng(3)
    P = 6
    px = np.r_[np.arange(P), rng.integers(0, P, 10)]
    py = np.r_[np.arange(P), rng.integers(0, P, 7)]
    X, Y = rng.normal(size=(px.size, 3)), rng.normal(size=(py.size, 3)) + 0.5
    h, _, s = prompt_pair_kernel(X, px, Y, py)
    sigma = np.array([1, -1, -1, 1, -1, 1])
    swap = np.isin(px, np.flatnonzero(sigma < 0)), np.isin(py, np.flatnonzero(sigma < 0))
    X2 = np.concatenate([X[~swap[0]], Y[swap[1]]])
    px2 = np.concatenate([px[~swap[0]], py[swap[1]]])
    Y2 = np.concatenate([Y[~swap[1]], X[swap[0]]])
    py2 = np.concatenate([py[~swap[1]], px[swap[0]]])
    h2, _, _ = prompt_pair_kernel(X2, px2, Y2, py2, bandwidth=s)
    assert h2.sum() == pytest.approx(sigma @ h @ sigma, abs=1e-12)
    assert median_bandwidth(X2, Y2) == pytest.approx(s)  # the pooled bandwidth is swap-invariant


def test_swap_test_p_value_bounds_and_seeding():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    h = a + a.T
    np.fill_diagonal(h, 0.0)
    p = swap_test(h, 99, seed=5)
    assert 1 / 100 <= p <= 1 and p == swap_test(h, 99, seed=5)
    assert round(p * 100) == p * 100  # a multiple of 1 / (1 + n_perm)
    assert swap_test(np.zeros((5, 5)), 49, 0) == 1.0  # every permuted statistic ties the observed one
    # a block structure only sigma = +-1 reproduces: the smallest attainable p-value
    assert swap_test(np.ones((12, 12)) - np.eye(12), 199, 1) == pytest.approx(1 / 200)
    with pytest.raises(ValueError, match="n_perm"):
        swap_test(h, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        swap_test(h, 10, -1)


def test_drift_test_rejects_bad_input():
    X, px = _flat(X_BLOCKS)
    Y, py = _flat(Y_BLOCKS)
    with pytest.raises(ValueError, match=r"only in X: \[2\]"):
        drift_test(X, px, Y[py < 2], py[py < 2], 10, 0)
    with pytest.raises(ValueError, match="dims differ"):
        drift_test(X, px, np.ones((6, 2)), py, 10, 0)
    with pytest.raises(ValueError, match="py_M"):
        drift_test(X, px, Y, py[:-1], 10, 0)
    with pytest.raises(ValueError, match=">= 3 prompts"):
        drift_test(X[px < 2], px[px < 2], Y[py < 2], py[py < 2], 10, 0)
    with pytest.raises(ValueError, match="non-finite"):
        drift_test(np.where(px[:, None] == 0, np.nan, X), px, Y, py, 10, 0)


# ---------------------------------------------------------------- the eval's drift design, simulated
#
# 48 prompts, one rollout per prompt and model, 4 word-end cuts per rollout (`rollout_states`, so the states
# of a rollout are nested prefixes). Synthetic rollouts: a completion of 0-15 words, each word from a
# prompt-dependent distribution (half the mass on 20 common words, half on the prompt's 8 topic words out
# of 60). Lexical variant: the real `lexical_features` of the generated part (as the eval featurises it);
# dense variant, standing in for the base model's mean-pooled hidden states: the mean of fixed random
# 16-d word embeddings over the whole state, the prompt's own words included (shared by both samples).
# Shift: in sample Y each word is replaced with probability SHIFT by one extra word type.

P, K = 48, 4
COMMON = [f"c{i}" for i in range(20)]
TOPIC_POOL = [f"t{i}" for i in range(60)]
SHIFT = {"lexical": 0.08, "dense": 0.15}  # ~85-90% power: detected, not trivially


class World:
    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.vocab = np.array(COMMON + TOPIC_POOL + ["zz"])
        self.probs = np.zeros((P, self.vocab.size))
        for p in range(P):
            self.probs[p, :20] = 0.5 / 20
            self.probs[p, 20 + rng.choice(60, size=8, replace=False)] = 0.5 / 8
        self.prompts = [f"q{p}a q{p}b" for p in range(P)]
        self.emb = {w: rng.normal(size=16) for w in list(self.vocab) + [f"q{p}{c}" for p in range(P) for c in "ab"]}

    def completions(self, rng, shift: float) -> list[str]:
        out = []
        for p in range(P):
            words = rng.choice(self.vocab, size=int(rng.integers(0, 16)), p=self.probs[p])
            words[rng.random(words.size) < shift] = "zz"
            out.append("".join(" " + w for w in words))
        return out

    def dense(self, states: list[str]) -> np.ndarray:
        return np.array([np.mean([self.emb[w] for w in s.split()], axis=0) for s in states])


def _simulate(kind: str, shift: float, reps: int, seed: int, naive: int = 0) -> dict:
    """reps independent replications of the drift eval under (shift = 0) H0 or a planted shift:
    drift_test's estimates and p-values, and the naive mmd2_rbf on the first `naive` replications."""
    world = World(0)
    rng = np.random.default_rng(seed)
    est, p_values, naive_est = [], [], []
    for r in range(reps):
        samples = []
        for sh in (0.0, shift):
            gen, index = rollout_states([""] * P, world.completions(rng, sh), K, seed=10_000 + r)
            if kind == "lexical":
                feats = lexical_features(gen, ngram=(1, 2), dim=4096)
            else:  # whole states: the prompt's words, then the same cuts of the generated part
                feats = world.dense([world.prompts[i] + g for i, g in zip(index, gen)])
            samples.append((feats, index))
        (X, px), (Y, py) = samples
        out = drift_test(X, px, Y, py, n_perm=199, seed=r)
        est.append(out["mmd2"])
        p_values.append(out["p_value"])
        if r < naive:
            used = np.any(X != 0, axis=0) | np.any(Y != 0, axis=0)  # all-zero columns: distances unchanged
            naive_est.append(mmd2_rbf(X[:, used], Y[:, used], out["bandwidth"]))
    return {"est": np.array(est), "p": np.array(p_values), "naive": np.array(naive_est)}


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


@pytest.fixture(scope="module", params=["lexical", "dense"])
def null_sim(request):
    return request.param, _simulate(request.param, 0.0, reps=300, seed=1, naive=100)


def test_drift_estimate_is_unbiased_under_identical_distributions(null_sim):
    kind, sim = null_sim
    mean, se = _mean_se(sim["est"])
    assert abs(mean) <= 2 * se, f"{kind}: mean {mean:.2e} over {sim['est'].size} replications, se {se:.2e}"


def test_naive_iid_estimator_is_biased_under_the_same_design(null_sim):
    # The regression guarded against: the i.i.d. U-statistic pairs nested prefixes of one rollout and
    # states of one prompt, so with ONE distribution its mean is many standard errors from 0.
    kind, sim = null_sim
    mean, se = _mean_se(sim["naive"])
    assert abs(mean) > 8 * se, f"{kind}: naive mean {mean:.2e}, se {se:.2e}"


def test_swap_test_false_positive_rate_is_nominal(null_sim):
    kind, sim = null_sim
    rate = float(np.mean(sim["p"] <= 0.05))
    assert rate <= 0.07, f"{kind}: {rate:.3f} of {sim['p'].size} H0 replications rejected at 0.05"
    assert 0.3 <= sim["p"].mean() <= 0.7  # p-values are ~uniform under H0, not piled up at 1


@pytest.mark.parametrize("kind", ["lexical", "dense"])
def test_planted_shift_is_detected(kind):
    sim = _simulate(kind, SHIFT[kind], reps=100, seed=2)
    power = float(np.mean(sim["p"] <= 0.05))
    assert power >= 0.8, f"{kind}: shift {SHIFT[kind]} detected in {power:.2f} of 100 replications"
    assert np.mean(sim["est"]) > 0


# ---------------------------------------------------------------- lexical features and states


def test_lexical_features_counts_normalised_and_stable():
    F = lexical_features(["a b a", "", "A B a"], ngram=(1, 2), dim=1 << 20)
    # "a b a": unigrams a x2, b x1; bigrams "a b", "b a" -> counts (2, 1, 1, 1), norm sqrt(7)
    assert sorted(F[0][F[0] > 0] * math.sqrt(7)) == pytest.approx([1, 1, 1, 2])
    assert np.all(F[1] == 0)  # no tokens: zero row
    assert np.array_equal(F[0], F[2])  # lower-cased
    assert np.linalg.norm(F[0]) == pytest.approx(1.0)
    # a fixed hash (blake2b, not Python's salted hash): the columns are pinned across processes
    G = lexical_features(["a", "the cat"], ngram=(1, 2), dim=4096)
    assert G.shape == (2, 4096)
    assert np.flatnonzero(G[0]).tolist() == [2112]
    assert np.flatnonzero(G[1]).tolist() == [1843, 2654, 3032]


def test_lexical_features_signed_and_unigram_only():
    U = lexical_features(["x y"], ngram=(1, 1), dim=1 << 20)
    assert np.count_nonzero(U) == 2
    S = lexical_features(["x y z w v u"], ngram=(1, 1), dim=1 << 20, signed=True)
    assert set(np.sign(S[S != 0])) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="ngram"):
        lexical_features(["x"], ngram=(2, 1))


def test_rollout_states_distinct_cuts_without_replacement():
    prompts = ["Q: 1+1?\nA:", "Q: hi\nA:", "P:", "R:"]
    completions = [" one plus one is two", " hello there", "", "  x  "]
    states, index = rollout_states(prompts, completions, n_cuts=4, seed=7)
    assert index.dtype == np.int64 and index.tolist() == [0] * 4 + [1, 1, 2, 3]
    # rollout 0 has 5 word ends > 4 cuts: 4 distinct states among them, in text order
    allowed0 = [prompts[0] + " one plus one is two"[:k] for k in (4, 9, 13, 16, 20)]
    assert len(set(states[:4])) == 4 and set(states[:4]) <= set(allowed0)
    assert states[:4] == sorted(states[:4], key=len)
    # fewer words than cuts: every word end once; empty completion: the prompt alone, once
    assert states[4:6] == ["Q: hi\nA: hello", "Q: hi\nA: hello there"]
    assert states[6] == "P:" and states[7] == "R:  x"
    again = rollout_states(prompts, completions, 4, 7)
    assert again[0] == states and again[1].tolist() == index.tolist()
    # rollout i's cuts depend on (seed, i, its completion) only: dropping later rollouts or changing the
    # prompt text keeps them; "" prompts give the generated parts cut at the same places
    assert rollout_states(prompts[:2], completions[:2], 4, 7)[0] == states[:6]
    gen, _ = rollout_states([""] * 4, completions, 4, 7)
    assert [prompts[i] + g for i, g in zip(index, gen)] == states
    seen = {s for seed in range(40) for s in rollout_states(prompts[:1], completions[:1], 4, seed)[0]}
    assert seen == set(allowed0)  # every cut is reachable
    assert any(rollout_states(prompts[:1], completions[:1], 4, s)[0] != states[:4] for s in range(8, 12))
    with pytest.raises(ValueError, match="2 prompts but 1"):
        rollout_states(prompts[:2], completions[:1], 1, 0)
    with pytest.raises(ValueError, match="n_cuts"):
        rollout_states(prompts, completions, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        rollout_states(prompts, completions, 2, -3)
