"""Model-based drift diagnostics (poststate.diagnostics) against unbatched hand loops on tiny Qwen3s:
forward KL(base || tuned), token NLL, hidden-state features; each returns per-sequence values."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from poststate.diagnostics import drift_record, forward_kl, hidden_features, reference_hidden, token_nll
from tests.conftest import build_tiny_model



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
    same_sums, counts = forward_kl(a, a, IDS, STARTS, batch_size=3)
    assert same_sums.sum() == pytest.approx(0.0, abs=1e-5)
    assert counts.tolist() == [len(ids) - s for ids, s in zip(IDS, STARTS)]
    expected = _hand_kl(a, b, IDS, STARTS)
    assert expected > 0.05  # the two models really differ
    for bs in (1, 2, 4):
        sums, counts = forward_kl(a, b, IDS, STARTS, batch_size=bs)
        assert sums.sum() / counts.sum() == pytest.approx(expected, rel=1e-4)


@torch.no_grad()
def test_token_nll_equals_unbatched(models):
    a, _ = models
    expected = _hand_nll(a, IDS, STARTS)
    for bs in (1, 3, 4):
        sums, counts = token_nll(a, IDS, STARTS, batch_size=bs)
        np.testing.assert_allclose(sums / counts, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="score_from=2"):
        token_nll(a, [[1, 2]], [2], batch_size=1)


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
    feats = hidden_features(a, tok, texts, batch_size=3)
    assert feats.shape == (3, 16)
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        hs = a(input_ids=ids, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(feats[i], hs[-1][0].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hidden_features(a, tok, texts, batch_size=1), feats, rtol=1e-4, atol=1e-5)


def test_model_diagnostics_require_eval_mode():
    m = _tiny(2)
    m.train()
    with pytest.raises(ValueError, match="training mode"):
        token_nll(m, IDS, STARTS, batch_size=2)


def test_drift_record_with_the_stored_reference_features_is_the_same_record(tiny_tokenizer):
    """The base's eval stores reference_hidden() once (evals/base/reference_hidden.npy); a run's eval that
    passes it gets the record it would compute itself, number for number; a stale array is refused."""
    tok = tiny_tokenizer
    base = build_tiny_model(tok, seed=0, init_std=0.5)
    words = "Tom has 3 apples and buys 4 more apples so he has 7 apples".split()
    ref = [{"prompt": f"Question: {i}", "completion": " ".join(words[i % 3: 8 + i % 4])} for i in range(6)]
    roll = [{"prompt": f"Question: {i}", "completion": " ".join(words[(i + 1) % 3: 9])} for i in range(6)]
    p = SimpleNamespace(drift=SimpleNamespace(cuts=3, ngram_max=2, hash_dim=256, permutations=19, locality_states=0), batch_size=4)
    n = len(ref) * p.drift.cuts  # every completion has more words than cuts: K states each
    fresh = drift_record(base, None, tok, ref, roll, [], p, ("test", 0))
    stored = reference_hidden(base, tok, ref, p)
    assert stored.shape == (n, base.config.hidden_size)
    assert drift_record(base, None, tok, ref, roll, [], p, ("test", 0), ref_hidden=stored) == fresh
    with pytest.raises(ValueError, match=f"ref_hidden has {n - 1} rows for {n} reference states"):
        drift_record(base, None, tok, ref, roll, [], p, ("test", 0), ref_hidden=stored[:-1])
