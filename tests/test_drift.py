"""Tests for poststate.drift: MMD toy values, lexical features, prefix states, and the batched
model diagnostics (KL, NLL, hidden features) against unbatched loops on tiny random Qwen3 models."""

import math

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from poststate.drift import (
    forward_kl,
    hidden_features,
    lexical_features,
    median_bandwidth,
    mmd2_rbf,
    prefix_states,
    sequence_token_nll,
)

# ---------------------------------------------------------------- MMD


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


def test_mmd_identical_sets_zero_biased_and_same_distribution_near_zero():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4))
    assert mmd2_rbf(X, X, 1.3, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    A, B = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    C = rng.normal(loc=1.0, size=(300, 4))
    s = median_bandwidth(A, B)
    same = mmd2_rbf(A, B, s)
    shifted = mmd2_rbf(A, C, s)
    assert abs(same) < 0.01
    assert shifted > 20 * abs(same)


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


def test_prefix_states_word_boundaries_and_determinism():
    prompts = ["Q: 1+1?\nA:", "Q: hi\nA:", "P:"]
    completions = [" one plus one is two", " hello there", ""]
    states = prefix_states(prompts, completions, n_cuts=4, seed=7)
    assert len(states) == 12
    allowed0 = {prompts[0] + " one plus one is two"[:k] for k in (4, 9, 13, 16, 20)}
    assert set(states[:4]) <= allowed0
    assert set(states[4:8]) <= {"Q: hi\nA: hello", "Q: hi\nA: hello there"}
    assert states[8:] == ["P:"] * 4
    assert states == prefix_states(prompts, completions, n_cuts=4, seed=7)
    # rollout i's cuts depend on (seed, i) only: dropping later rollouts keeps the earlier states
    assert prefix_states(prompts[:2], completions[:2], 4, 7) == states[:8]
    assert prefix_states(prompts, completions, 4, 8) != states
    many = prefix_states(prompts[:1], completions[:1], n_cuts=200, seed=1)
    assert set(many) == allowed0  # every cut is reachable
    with pytest.raises(ValueError, match="2 prompts but 1"):
        prefix_states(prompts[:2], completions[:1], 1, 0)


# ---------------------------------------------------------------- model diagnostics on tiny Qwen3


def _tiny(seed: int) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init so the two models' distributions differ a lot
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return model


@pytest.fixture(scope="module")
def models():
    return _tiny(0), _tiny(1)


IDS = [[3, 7, 9, 11, 2, 5, 8], [4, 4, 1], [10, 20, 30, 40, 41], [6, 12]]
STARTS = [3, 1, 2, 1]


def _hand_kl(base, tuned, ids_list, starts):
    kls = []
    for ids, start in zip(ids_list, starts):
        for j in range(start, len(ids)):
            prefix = torch.tensor([ids[:j]])
            lp = torch.log_softmax(base(input_ids=prefix).logits[0, -1], -1)
            lq = torch.log_softmax(tuned(input_ids=prefix).logits[0, -1], -1)
            kls.append(float((lp.exp() * (lp - lq)).sum()))
    return float(np.mean(kls))


def _hand_nll(model, ids_list, starts):
    out = []
    for ids, start in zip(ids_list, starts):
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        out.append(-np.mean([float(logp[j - 1, ids[j]]) for j in range(start, len(ids))]))
    return np.array(out)


@torch.no_grad()
def test_forward_kl_zero_for_same_model_and_equals_hand_loop(models):
    a, b = models
    assert forward_kl(a, a, IDS, STARTS, batch_size=3) == pytest.approx(0.0, abs=1e-6)
    expected = _hand_kl(a, b, IDS, STARTS)
    assert expected > 0.05  # the two models really differ
    for bs in (1, 2, 4):
        assert forward_kl(a, b, IDS, STARTS, batch_size=bs) == pytest.approx(expected, rel=1e-4)


@torch.no_grad()
def test_sequence_token_nll_equals_unbatched(models):
    a, _ = models
    expected = _hand_nll(a, IDS, STARTS)
    for bs in (1, 3, 4):
        np.testing.assert_allclose(sequence_token_nll(a, IDS, STARTS, batch_size=bs), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="score_from=2"):
        sequence_token_nll(a, [[1, 2]], [2], batch_size=1)


def _word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>"] + [f"w{i}" for i in range(48)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


@torch.no_grad()
def test_hidden_features_mean_pool_and_padding_invariance(models):
    a, _ = models
    tok = _word_tokenizer()
    texts = ["w1 w2 w3 w4 w5", "w7", "w9 w10"]
    feats = hidden_features(a, tok, texts, batch_size=3, layer=-1)
    assert feats.shape == (3, 16)
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        hs = a(input_ids=ids, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(feats[i], hs[-1][0].mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            hidden_features(a, tok, [text], batch_size=1, layer=1)[0], hs[1][0].mean(0).numpy(), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_allclose(hidden_features(a, tok, texts, batch_size=1), feats, rtol=1e-4, atol=1e-5)


def test_model_diagnostics_require_eval_mode():
    m = _tiny(2)
    m.train()
    with pytest.raises(ValueError, match="training mode"):
        sequence_token_nll(m, IDS, STARTS, batch_size=2)
