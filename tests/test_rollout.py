"""Rollout engine: how a completion ends (kept ids, answer length, text), greedy exactness and batch invariance,
seeded sampling streams, log-probs aligned with the kept ids."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model

from poststate.rollout import HFRolloutEngine, SamplingParams, cut_completion
from poststate.streams import stream_seed

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Question: Tom has", "A", "The following are multiple choice questions", "She sold 48 clips in April"]


@pytest.fixture(scope="module")
def peaked_model(tiny_tokenizer):
    # init_std 0.3: varied, peaked next-token distributions (the default init is nearly uniform)
    return build_tiny_model(tiny_tokenizer, seed=0, init_std=0.3)


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    ids = [tiny_tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in ids}) == len(ids)  # different lengths, so left padding is exercised
    return ids


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- cut_completion (pure)


def test_sampling_params_reject_bad_values():
    for kwargs in (
        dict(max_new_tokens=0),
        dict(max_new_tokens=4, temperature=-0.1),
        dict(max_new_tokens=4, top_p=0.0),
        dict(max_new_tokens=4, top_p=1.5),
        dict(max_new_tokens=4, temperature=0.0, top_p=0.9),
        dict(max_new_tokens=4, stop=("",)),
        dict(max_new_tokens=4, stop=["Question:"]),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def tok_specials(tiny_tokenizer_with_pad):
    """pad != EOS, plus two special tokens: <|im_end|> (a GSM8K stop string that is its own token) and <|x|>."""
    tok = copy.deepcopy(tiny_tokenizer_with_pad)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|x|>"]})
    return tok


def _ends(tok):
    return tok.eos_token_id, tok.pad_token_id


def test_cut_keeps_eos_and_strips_trailing_pads(tiny_tokenizer_with_pad):
    tok = tiny_tokenizer_with_pad
    eos, pad = _ends(tok)
    assert eos != pad
    body = _enc(tok, " has has")
    assert cut_completion(body + [eos, pad, pad], tok, (), eos, pad) == (body + [eos], 2, " has has", True)
    # unfinished (ran out of max_new_tokens): no terminator, the answer is the whole body
    assert cut_completion(body, tok, (), eos, pad) == (body, 2, " has has", False)
    assert cut_completion(body + [pad, pad], tok, (), eos, pad) == (body, 2, " has has", False)  # pads are not tokens of it


def test_cut_at_a_stop_string_keeps_its_tokens(tiny_tokenizer_with_pad):
    tok = tiny_tokenizer_with_pad
    eos, pad = _ends(tok)
    stops = ("Question:", "</s>")
    head = _enc(tok, "7 apples.\n")
    through = _enc(tok, "7 apples.\nQuestion:")
    ids = _enc(tok, "7 apples.\nQuestion: What")
    assert ids[: len(through)] == through and through[: len(head)] == head and len(through) - len(head) == 4  # Q uestio n :
    # kept: through the token that completes the stop string; answer: the tokens before it; text: cut before it
    assert cut_completion(ids + [pad], tok, stops, eos, pad) == (through, len(head), "7 apples.\n", True)
    # a stop string before an EOS: cut at the stop string, the EOS is not kept
    assert cut_completion(ids + [eos, pad], tok, stops, eos, pad) == (through, len(head), "7 apples.\n", True)
    # the earliest of two stop strings wins, whichever is listed first
    ids2 = _enc(tok, "a</s>b Question:")
    assert cut_completion(ids2, tok, stops, eos, pad) == (ids2[:5], 1, "a", True)  # a < / s >
    # a stop string at the very start: an empty answer, the stop string's tokens kept
    q = _enc(tok, "Question: x")
    assert cut_completion(q, tok, stops, eos, pad) == (q[:4], 0, "", True)


def test_cut_at_a_stop_string_inside_a_token(tiny_tokenizer_with_pad):
    tok = tiny_tokenizer_with_pad
    ids = _enc(tok, " has has")
    assert tok.convert_ids_to_tokens(ids) == ["Ġhas", "Ġhas"]
    # "s h" spans characters 3-5: the first token (" has", chars 0-3) ends after the stop string starts, so the
    # answer has no whole token; the second token completes the stop string and is kept; the text is " ha"
    assert cut_completion(ids, tok, ("s h",), *_ends(tok)) == (ids, 0, " ha", True)
    # a stop string ending inside a token: that token is the one completing it
    assert cut_completion(ids, tok, ("as h",), *_ends(tok)) == (ids, 0, " h", True)
    assert cut_completion(ids, tok, (" ha",), *_ends(tok)) == (ids[:1], 0, "", True)


def test_cut_at_a_special_token_stop_and_texts_skip_special_tokens(tok_specials):
    tok = tok_specials
    eos, pad = _ends(tok)
    im_end, x = tok.convert_tokens_to_ids(["<|im_end|>", "<|x|>"])
    body = _enc(tok, "7 apples.")
    stops = ("Question:", "<|im_end|>")
    # the stop string is one special token: kept as the terminator, absent from the text
    assert cut_completion(body + [im_end, pad, pad], tok, stops, eos, pad) == (body + [im_end], len(body), "7 apples.", True)
    # a special token that is no stop string: part of the completion, skipped in the text
    mid = body[:1] + [x] + body[1:]
    assert cut_completion(mid + [eos], tok, stops, eos, pad) == (mid + [eos], len(mid), "7 apples.", True)
    assert tok.decode(mid, skip_special_tokens=False) == "7<|x|> apples."


def test_cut_when_pad_is_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # the Qwen3-Base convention
    body = _enc(tok, "Answer: 7")
    assert cut_completion(body + [eos, eos, eos], tok, (), eos, eos) == (body + [eos], len(body), "Answer: 7", True)
    # stopped by a stop string, then pad (= EOS) filled: the pads are not an emitted EOS
    head = _enc(tok, " 7\n\n")
    ids = _enc(tok, " 7\n\nQuestion:")
    assert ids[: len(head)] == head
    assert cut_completion(ids + [eos, eos], tok, ("Question:",), eos, eos) == (ids, len(head), " 7\n\n", True)


# --------------------------------------------------------------------------- engine


def _forward_logits(model, prompt, completion):
    with torch.no_grad():
        logits_TV = model(torch.tensor([prompt + completion])).logits[0].float()
    return logits_TV[len(prompt) - 1 : len(prompt) - 1 + len(completion)]  # rows predicting each completion token


def test_greedy_logprobs_equal_a_full_forward(peaked_model, tiny_tokenizer, prompt_ids):
    out = HFRolloutEngine(peaked_model, tiny_tokenizer, 4).generate(prompt_ids, SamplingParams(24, 0.0), seed=0)
    for prompt, comp, lp in zip(prompt_ids, out.completion_ids, out.logprobs, strict=True):
        assert len(comp) == len(lp) == 24
        logp_NV = torch.log_softmax(_forward_logits(peaked_model, prompt, comp), dim=-1)
        assert comp == logp_NV.argmax(-1).tolist()  # greedy: each token is the argmax of the full forward
        ref = logp_NV.gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-5, rtol=0)
    assert out.prompt_ids == prompt_ids and out.finished == [False] * 4 and out.answer_lens == [24] * 4
    assert out.texts == [tiny_tokenizer.decode(c) for c in out.completion_ids]


def test_greedy_does_not_depend_on_batch_size(peaked_model, tiny_tokenizer, prompt_ids):
    # Observed in fp32 on CPU: identical tokens and texts; log-probs agree to ~5e-7 (left padding changes
    # the matmul shapes, not the math). A near-tie in the logits could flip an argmax; none occurs here.
    p = SamplingParams(32, 0.0)
    one = HFRolloutEngine(peaked_model, tiny_tokenizer, 1).generate(prompt_ids, p, seed=0)
    four = HFRolloutEngine(peaked_model, tiny_tokenizer, 4).generate(prompt_ids, p, seed=0)
    three = HFRolloutEngine(peaked_model, tiny_tokenizer, 3).generate(prompt_ids, p, seed=5)
    assert one.completion_ids == four.completion_ids == three.completion_ids
    assert one.texts == four.texts == three.texts
    assert len(set(map(tuple, one.completion_ids))) == 4  # the rows differ, so the check has teeth
    for a, b in zip(one.logprobs, four.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_logprobs_are_under_the_processed_distribution(
    peaked_model, tiny_tokenizer, prompt_ids
):
    p = SamplingParams(20, temperature=0.7, top_p=0.8)
    engine = HFRolloutEngine(peaked_model, tiny_tokenizer, 2)
    a = engine.generate(prompt_ids, p, seed=3)
    torch.rand(10)  # global RNG state in between must not matter
    b = engine.generate(prompt_ids, p, seed=3)
    c = engine.generate(prompt_ids, p, seed=4)
    assert a == b
    assert a.completion_ids != c.completion_ids
    for prompt, comp, lp in zip(prompt_ids, a.completion_ids, a.logprobs, strict=True):
        z_NV = _forward_logits(peaked_model, prompt, comp) / 0.7
        # top-p by hand: keep a token iff the probability mass strictly above it is < top_p
        probs_NV = torch.softmax(z_NV, -1)
        sorted_NV, order_NV = probs_NV.sort(-1, descending=True)
        above_NV = sorted_NV.cumsum(-1) - sorted_NV
        keep_NV = torch.zeros_like(probs_NV, dtype=torch.bool).scatter(-1, order_NV, above_NV < 0.8)
        logp_NV = torch.log_softmax(z_NV.masked_fill(~keep_NV, float("-inf")), -1)
        ref = logp_NV.gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
        assert torch.isfinite(ref).all()  # every sampled token was inside the nucleus
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=0)
        assert (keep_NV.sum(-1) < probs_NV.shape[-1]).any()  # top-p actually removed tokens


def test_sampled_streams_do_not_share_random_state(peaked_model, tiny_tokenizer, prompt_ids):
    # each batch is seeded from (seed, batch index) alone: another stream's draws in between, or other rows in
    # another batch, change nothing
    p = SamplingParams(16, temperature=1.0)
    engine = HFRolloutEngine(peaked_model, tiny_tokenizer, 2)
    a = engine.generate(prompt_ids, p, seed=stream_seed("train", "rl", 0, "rollouts", 0, 0))
    HFRolloutEngine(peaked_model, tiny_tokenizer, 3).generate(prompt_ids[::-1], p, seed=stream_seed("drift", "x", 0))
    b = engine.generate(prompt_ids, p, seed=stream_seed("train", "rl", 0, "rollouts", 0, 0))
    assert a == b
    other = engine.generate(prompt_ids[:2] + prompt_ids[:2], p, seed=stream_seed("train", "rl", 0, "rollouts", 0, 0))
    assert other.completion_ids[:2] == a.completion_ids[:2]  # batch 0 does not see what batch 1 holds
    rank1 = engine.generate(prompt_ids, p, seed=stream_seed("train", "rl", 0, "rollouts", 0, 1))
    assert rank1.completion_ids != a.completion_ids
    assert other.completion_ids[2:] != other.completion_ids[:2]  # batch 1's stream is not batch 0's


def test_stop_strings_cut_the_same_greedy_rollout(peaked_model, tiny_tokenizer, prompt_ids):
    tok = tiny_tokenizer
    free = HFRolloutEngine(peaked_model, tok, 4).generate(prompt_ids, SamplingParams(40, 0.0), seed=0)
    text0 = free.texts[0]
    k = next(i for i in range(4, len(text0) - 1) if text0[i : i + 2].isascii() and text0[i : i + 2].isalnum())
    stop = text0[k : k + 2]
    cut = HFRolloutEngine(peaked_model, tok, 4).generate(prompt_ids, SamplingParams(40, 0.0, stop=(stop,)), seed=0)
    assert stop not in "".join(cut.texts)
    assert cut.finished[0]
    for full_ids, full_text, full_lp, ids, n_ans, text, lp, fin in zip(
        free.completion_ids, free.texts, free.logprobs, cut.completion_ids, cut.answer_lens, cut.texts, cut.logprobs,
        cut.finished, strict=True,
    ):
        at = full_text.find(stop)
        assert text == (full_text if at < 0 else full_text[:at]) and fin == (at >= 0)
        chars = [len(tok.decode(full_ids[:n])) for n in range(len(full_ids) + 1)]
        if at >= 0:  # kept: through the token completing the stop string; answer: the tokens ending before it
            assert ids == full_ids[: next(n for n, c in enumerate(chars) if c >= at + len(stop))]
            assert n_ans == max(n for n, c in enumerate(chars) if c <= at) < len(ids)
        else:
            assert ids == full_ids and n_ans == len(ids)
        # the log-prob of every kept id, the terminator's included (up to float rounding: the batch shrinks as rows finish)
        assert lp == pytest.approx(full_lp[: len(ids)], abs=1e-5)
    # one row per batch: no batch to shrink, so the same log-probs bit for bit
    free1 = HFRolloutEngine(peaked_model, tok, 1).generate(prompt_ids, SamplingParams(40, 0.0), seed=0)
    cut1 = HFRolloutEngine(peaked_model, tok, 1).generate(prompt_ids, SamplingParams(40, 0.0, stop=(stop,)), seed=0)
    assert cut1.completion_ids == cut.completion_ids
    for full_lp, ids, lp in zip(free1.logprobs, cut1.completion_ids, cut1.logprobs, strict=True):
        assert lp == full_lp[: len(ids)]


def test_eos_is_kept_and_ends_the_row(peaked_model, tiny_tokenizer, prompt_ids):
    free = HFRolloutEngine(peaked_model, tiny_tokenizer, 4).generate(prompt_ids, SamplingParams(12, 0.0), seed=0)
    # make the 4th greedy token of row 0 the EOS: the model is unchanged, the tokenizer's EOS is redefined
    target = free.completion_ids[0][3]
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(target)
    assert tok.eos_token_id == target and tok.pad_token_id != target
    out = HFRolloutEngine(peaked_model, tok, 4).generate(prompt_ids, SamplingParams(12, 0.0), seed=0)
    rows = zip(free.completion_ids, free.logprobs, out.completion_ids, out.answer_lens, out.logprobs, out.finished, out.texts)
    for full, full_lp, ids, n_ans, lp, fin, text in rows:
        if target in full:
            e = full.index(target)
            assert ids == full[: e + 1] and fin and text == tok.decode(full[:e]) and n_ans == e
        else:
            assert ids == full and not fin and n_ans == len(full)
        assert lp == pytest.approx(full_lp[: len(ids)], abs=1e-5)  # the EOS's log-prob too
    assert out.completion_ids[0][-1] == target and len(out.completion_ids[0]) <= 4


def test_eval_mode_no_grad_and_mode_restored(peaked_model, tiny_tokenizer, prompt_ids):
    seen = []
    handle = peaked_model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    peaked_model.train()
    try:
        HFRolloutEngine(peaked_model, tiny_tokenizer, 4).generate(prompt_ids, SamplingParams(3, 0.0), seed=0)
        assert peaked_model.training
    finally:
        handle.remove()
        peaked_model.eval()
    assert seen and set(seen) == {(False, False)}


def test_too_long_for_the_model_fails_loudly(peaked_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        HFRolloutEngine(peaked_model, tiny_tokenizer, 2).generate([[5] * 250], SamplingParams(10, 0.0), seed=0)
    with pytest.raises(ValueError, match="empty"):
        HFRolloutEngine(peaked_model, tiny_tokenizer, 2).generate([[5], []], SamplingParams(10, 0.0), seed=0)


def test_peft_wrapped_model(peaked_model, tiny_tokenizer, prompt_ids):
    from peft import LoraConfig, get_peft_model

    base = HFRolloutEngine(peaked_model, tiny_tokenizer, 4).generate(prompt_ids, SamplingParams(10, 0.0), seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    wrapped = get_peft_model(copy.deepcopy(peaked_model), lora)  # LoRA B = 0: the same function
    wrapped.train()
    out = HFRolloutEngine(wrapped, tiny_tokenizer, 4).generate(prompt_ids, SamplingParams(10, 0.0), seed=0)
    assert out.completion_ids == base.completion_ids and wrapped.training


def test_greedy_equals_transformers_generate(peaked_model, tiny_tokenizer, prompt_ids):
    """The engine's own decode loop (rows leave the batch as they finish) draws generate's greedy tokens."""
    from poststate.rollout import _left_pad, cut_completion

    tok = tiny_tokenizer
    free = HFRolloutEngine(peaked_model, tok, 8).generate(prompt_ids, SamplingParams(24, 0.0), seed=0)
    stop = next(t[k : k + 2] for t in free.texts for k in range(3, len(t) - 2) if t[k : k + 2].isalnum())
    params = SamplingParams(24, 0.0, stop=(stop,))
    ours = HFRolloutEngine(peaked_model, tok, len(prompt_ids)).generate(prompt_ids, params, seed=0)
    assert any(ours.finished) and not all(ours.finished)  # rows leave the batch at different steps
    ids_BT, mask_BT = _left_pad(prompt_ids, tok.pad_token_id, "cpu")
    with torch.inference_mode():
        seq_BS = peaked_model.generate(input_ids=ids_BT, attention_mask=mask_BT, max_new_tokens=24, do_sample=False,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                       stop_strings=[stop], tokenizer=tok)
    for row, kept in zip(seq_BS[:, ids_BT.shape[1]:].tolist(), ours.completion_ids, strict=True):
        assert cut_completion(row, tok, (stop,), tok.eos_token_id, tok.pad_token_id)[0] == kept
