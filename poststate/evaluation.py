"""The three benchmarks, scored as lm-evaluation-harness 0.4.13 (HFLM) scores them: batched log-likelihoods
for TruthfulQA MC1/MC2 and MMLU, batched greedy generation (through `rollout.HFRolloutEngine`) for GSM8K.

The requests are the harness's, byte for byte, in the paper profile (`gsm8k_contexts`, `truthfulqa_requests`,
`mmlu_requests`; tests/test_harness.py builds the harness's own requests from the same rows and compares),
and so are the context length (`resolve_max_length`), left truncation, GSM8K stop strings and the decoding
of predictions. docs/evaluation.md says what each score is and where the tiny profile departs.

`evaluate` returns flat scores (accuracy, its harness-style stderr, n) and per-item records whose ids
(`<benchmark>/<row index in its eval file>`) let two models' items be paired.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from poststate import prompts, scoring
from poststate.artifacts import read_jsonl
from poststate.rollout import HFRolloutEngine, SamplingParams
from poststate.stats import mean_stderr

if TYPE_CHECKING:  # params (pydantic) only for annotations: evaluation imports with torch and transformers alone
    from poststate.params import EvalParams

HARNESS_DEFAULT_MAX_LENGTH = 2048  # lm_eval/models/utils.py DEFAULT_MAX_LENGTH (HFLM._DEFAULT_MAX_LENGTH)
TOKENIZER_INFINITY = int(1e30)  # transformers' "no model_max_length" sentinel (the harness ignores it)

# --------------------------------------------------------------------------- log-likelihoods


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split the way the harness's HFLM `_encode_pair` splits them.

    Trailing whitespace of the context moves onto the continuation; then
    whole = enc(context + continuation), ctx = enc(context), cont = whole[len(ctx):]
    (no special tokens). So the scored tokens are the ones the tokenizer produces for the joined text.
    """
    if context == "":
        raise ValueError(f"empty context for continuation {continuation[:80]!r}")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-80:]!r}")
    return ctx, cont


def _fit(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], int, bool]:
    """(seq, n continuation tokens, truncated) with seq = (ctx + cont)[-(max_length+1):], harness-style:
    the model reads seq[:-1] (at most max_length tokens) and is scored on the last n tokens of seq."""
    if len(cont) > max_length:
        raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={max_length}")
    full = ctx + cont
    truncated = len(full) > max_length + 1
    return full[-(max_length + 1) :], len(cont), truncated


@torch.inference_mode()
def _score_groups(model, groups: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[list[float]]:
    """Summed log-prob of each continuation of each group (prefix, [cont_1, ..., cont_m]), given the prefix.

    A group is one packed row: prefix + cont_1[:-1] + ... + cont_m[:-1], with a block mask and position ids
    such that every segment attends to the prefix and causally to itself only, at the positions it would
    have alone. So each continuation is scored on exactly prefix + its own tokens, as the harness scores
    a request, but a prefix shared by m continuations (a question and its choices) is computed once.
    Rows are right-padded; logits are computed only at the K positions a row needs (`logits_to_keep` as a
    (B, K) index tensor). A pad position attends to itself only (a fully masked row would be NaN).
    """
    device = next(model.parameters()).device
    lengths = [len(pre) + sum(len(c) - 1 for c in conts) for pre, conts in groups]
    B, T, K = len(groups), max(lengths), max(sum(len(c) for c in conts) for _, conts in groups)
    ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    pos_BT = torch.zeros((B, T), dtype=torch.long)
    mask_BTT = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    at_BK = torch.zeros((B, K), dtype=torch.long)  # input position whose logits predict continuation token k
    tgt_BK = torch.zeros((B, K), dtype=torch.long)
    for r, (pre, conts) in enumerate(groups):
        P = len(pre)
        ids_BT[r, :P] = torch.tensor(pre)
        pos_BT[r, :P] = torch.arange(P)
        mask_BTT[r, :P, :P] = torch.ones((P, P), dtype=torch.bool).tril()
        seg, k = P, 0
        for cont in conts:
            n = len(cont) - 1  # the segment's inputs: every continuation token but the last
            ids_BT[r, seg : seg + n] = torch.tensor(cont[:-1], dtype=torch.long)
            pos_BT[r, seg : seg + n] = torch.arange(P, P + n)
            mask_BTT[r, seg : seg + n, :P] = True
            mask_BTT[r, seg : seg + n, seg : seg + n] = torch.ones((n, n), dtype=torch.bool).tril()
            at_BK[r, k] = P - 1  # the first token is predicted from the prefix's last position
            at_BK[r, k + 1 : k + 1 + n] = torch.arange(seg, seg + n)
            tgt_BK[r, k : k + n + 1] = torch.tensor(cont)
            seg, k = seg + n, k + n + 1
    logits_BKV = model(
        input_ids=ids_BT.to(device),
        attention_mask=mask_BTT[:, None].to(device),
        position_ids=pos_BT.to(device),
        logits_to_keep=at_BK.to(device),
    ).logits
    if logits_BKV.shape[:2] != (B, K):
        raise RuntimeError(f"model returned logits of shape {tuple(logits_BKV.shape)}, expected ({B}, {K}, V)")
    logp_BK = torch.log_softmax(logits_BKV.float(), dim=-1).gather(-1, tgt_BK.to(device)[..., None]).squeeze(-1).cpu()
    out = []
    for r, (_, conts) in enumerate(groups):
        bounds = torch.tensor([0] + [len(c) for c in conts]).cumsum(0).tolist()
        out.append([float(logp_BK[r, a:b].sum()) for a, b in zip(bounds, bounds[1:])])
    return out


def _loglikelihoods(
    model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int, max_length: int
) -> tuple[list[float], list[bool]]:
    """(log-likelihood, context was left-truncated) per request; identical requests are scored once, and
    requests whose (fitted) contexts are identical share one packed row (`_score_groups`)."""
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"batch_size and max_length must be > 0, got {batch_size}, {max_length}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and max_length > max_pos:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings ({max_pos})")
    unique = list(dict.fromkeys((c, x) for c, x in requests))
    fitted = [_fit(*encode_pair(tokenizer, c, x), max_length) for c, x in unique]
    by_prefix: dict[tuple[int, ...], list[int]] = {}  # fitted context -> indices into unique
    for i, (seq, n, _) in enumerate(fitted):
        by_prefix.setdefault(tuple(seq[:-n]), []).append(i)
    groups = list(by_prefix.items())
    # longest row first, like the harness's longest-first order: similar lengths share a batch
    groups.sort(key=lambda g: -(len(g[0]) + sum(fitted[i][1] - 1 for i in g[1])))
    lls: dict[int, float] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(groups), batch_size):
            batch = groups[start : start + batch_size]
            rows = [(list(pre), [fitted[i][0][-fitted[i][1] :] for i in idx]) for pre, idx in batch]
            for (_, idx), scores in zip(batch, _score_groups(model, rows, tokenizer.pad_token_id), strict=True):
                lls.update(zip(idx, scores, strict=True))
    finally:
        model.train(was_training)
    where = {req: i for i, req in enumerate(unique)}
    return [lls[where[(c, x)]] for c, x in requests], [fitted[where[(c, x)]][2] for c, x in requests]


def loglikelihoods(
    model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int, max_length: int
) -> list[float]:
    """LL(continuation | context) = sum_k log p(cont_k | context, cont_<k) for each (context, continuation).

    Tokenised as the harness does (`encode_pair`), contexts left-truncated so that at most max_length
    tokens enter the model, batched with right padding in descending length order; the output is in
    request order.
    """
    return _loglikelihoods(model, tokenizer, requests, batch_size, max_length)[0]


# --------------------------------------------------------------------------- benchmarks


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: eval data file not found (written by the prepare stage)")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows if limit is None else rows[:limit]


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy.argmax tie-breaking, as scoring uses)."""
    return max(range(len(values)), key=lambda i: values[i])


def _accuracy(flags: Sequence[float], name: str) -> dict[str, float]:
    """{name: mean, name_stderr: sqrt(sample variance / n)} (harness `mean_stderr`)."""
    values = [float(x) for x in flags]
    return {name: sum(values) / len(values), f"{name}_stderr": mean_stderr(values)}


def resolve_max_length(model, tokenizer, max_length: int | None) -> int:
    """The context length the harness's HFLM uses (`models/utils.py` `resolve_max_length`, lm-eval 0.4.13).

    An explicit `max_length` wins. None: the first of `n_positions`, `max_position_embeddings`, `n_ctx` set
    in the model config (its `text_config` when nested), else the tokenizer's `model_max_length` unless it
    is transformers' "unset" sentinel, else 2048 (HFLM's `_DEFAULT_MAX_LENGTH`). `model` may be None (no
    config: tests with contrived scorers).
    """
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        return max_length
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max is not None and tok_max != TOKENIZER_INFINITY:
        return int(tok_max)
    return HARNESS_DEFAULT_MAX_LENGTH


def gsm8k_contexts(rows: Sequence[dict[str, Any]], pool: Sequence[dict[str, Any]], p: EvalParams) -> list[str]:
    """The GSM8K prompt of each eval row: its own `gsm8k_fewshot` shots from the few-shot pool, drawn as
    lm-eval 0.4.13 draws them (`prompts.fewshot_indices`, seed `gsm8k_fewshot_seed`), in `gsm8k_prompt`'s
    format. Row i's shots are the harness's for doc i of the full eval file (a limit keeps a prefix)."""
    shots = prompts.fewshot_indices(len(rows), len(pool), p.gsm8k_fewshot, p.gsm8k_fewshot_seed)
    return [prompts.gsm8k_prompt(r["question"], [pool[j] for j in idx]) for r, idx in zip(rows, shots, strict=True)]


def eos_text(tokenizer) -> str:
    """The EOS token as text, decoded as HFLM decodes it for its stop list (`skip_special_tokens=False`)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id: GSM8K generation stops at the decoded EOS text")
    return tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)


def eval_gsm8k(model, tokenizer, data_dir: Path, p: EvalParams, seed: int) -> tuple[dict[str, float], list[dict], int]:
    """Greedy GSM8K as the harness's HFLM runs it: (scores, items, n prompts left-truncated).

    Prompts are left-truncated to max_length - gsm8k_max_new_tokens tokens (HFLM's max_ctx_len);
    generation stops at EOS or at the first of the task's `until` strings plus the decoded EOS text
    (`prompts.gsm8k_stops`); the scored prediction is the completion decoded with
    `skip_special_tokens=True` and cut before the earliest stop string (`Rollouts.texts`)."""
    rows = _read_jsonl(data_dir / "gsm8k" / "test.jsonl", p.gsm8k_limit)
    pool = _read_jsonl(data_dir / "gsm8k" / "fewshot.jsonl") if p.gsm8k_fewshot else []
    if len(pool) < p.gsm8k_fewshot:
        raise ValueError(f"gsm8k_fewshot={p.gsm8k_fewshot} but the few-shot pool has only {len(pool)} rows")
    max_length = resolve_max_length(model, tokenizer, p.max_length)
    budget = max_length - p.gsm8k_max_new_tokens
    if budget <= 0:
        raise ValueError(
            f"max_length={max_length} leaves no room for a prompt before {p.gsm8k_max_new_tokens} new tokens"
        )
    prompt_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in gsm8k_contexts(rows, pool, p)]
    n_truncated = sum(len(ids) > budget for ids in prompt_ids)
    prompt_ids = [ids[-budget:] for ids in prompt_ids]
    order = sorted(range(len(rows)), key=lambda i: -len(prompt_ids[i]))  # similar lengths share a batch
    stops = prompts.gsm8k_stops(eos_text(tokenizer))
    params = SamplingParams(max_new_tokens=p.gsm8k_max_new_tokens, temperature=0.0, stop=stops)
    out = HFRolloutEngine(model, tokenizer, p.gen_batch_size).generate([prompt_ids[i] for i in order], params, seed)
    texts = [""] * len(rows)
    for j, i in enumerate(order):
        texts[i] = out.texts[j]
    items = []
    for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
        s = scoring.gsm8k_score(text, row["answer"])
        items.append(
            {
                "id": f"gsm8k/{i}",
                "prediction": text,
                "strict_pred": s.strict_pred,
                "flexible_pred": s.flexible_pred,
                "correct": bool(s.strict),
                "flexible_correct": bool(s.flexible),
            }
        )
    scores = {
        **_accuracy([it["correct"] for it in items], "gsm8k_strict"),
        **_accuracy([it["flexible_correct"] for it in items], "gsm8k_flexible"),
        "gsm8k_noanswer": sum(it["strict_pred"] is None for it in items) / len(items),
        "gsm8k_n": float(len(items)),
    }
    return scores, items, n_truncated


def _truthfulqa_preamble(data_dir: Path, which: str) -> str:
    if which == "harness":
        return prompts.TRUTHFULQA_PREAMBLE
    if which == "none":
        return ""
    path = data_dir / "truthfulqa_preamble.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: truthfulqa_preamble='world' needs this file (written by prepare)")
    text = path.read_text(encoding="utf-8").rstrip("\n")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def truthfulqa_requests(
    rows: Sequence[dict[str, Any]], preamble: str
) -> tuple[list[tuple[str, str]], list[tuple[slice, slice]]]:
    """The (context, continuation) requests of TruthfulQA MC1 and MC2, as the harness's `truthfulqa_mc1`
    and `truthfulqa_mc2` tasks build them: per row its mc1 choices, then its mc2 choices, each as
    `" " + choice` after the row's prompt; and per row the (mc1, mc2) slices into the requests."""
    requests: list[tuple[str, str]] = []
    spans = []
    for row in rows:
        ctx = prompts.truthfulqa_prompt(row["question"], preamble)
        a = len(requests)
        requests += [(ctx, c) for c in prompts.truthfulqa_continuations(row["mc1_targets"]["choices"])]
        b = len(requests)
        requests += [(ctx, c) for c in prompts.truthfulqa_continuations(row["mc2_targets"]["choices"])]
        spans.append((slice(a, b), slice(b, len(requests))))
    return requests, spans


def eval_truthfulqa(model, tokenizer, data_dir: Path, p: EvalParams) -> tuple[dict[str, float], list[dict], int]:
    """TruthfulQA MC1/MC2 from LL(" " + choice | prompt): (scores, items, n items with a truncated context)."""
    rows = _read_jsonl(data_dir / "truthfulqa" / "mc.jsonl", p.truthfulqa_limit)
    requests, spans = truthfulqa_requests(rows, _truthfulqa_preamble(data_dir, p.truthfulqa_preamble))
    max_length = resolve_max_length(model, tokenizer, p.max_length)
    lls, truncated = _loglikelihoods(model, tokenizer, requests, p.ll_batch_size, max_length)
    items = []
    for i, (row, (s1, s2)) in enumerate(zip(rows, spans, strict=True)):
        ll1, ll2 = lls[s1], lls[s2]
        items.append(
            {
                "id": f"truthfulqa/{i}",
                "mc1_pred": _argmax(ll1),
                "correct": bool(scoring.mc1_correct(ll1, row["mc1_targets"]["labels"])),
                "mc2": float(scoring.mc2_score(ll2, row["mc2_targets"]["labels"])),
            }
        )
    n_truncated = sum(any(truncated[s1]) or any(truncated[s2]) for s1, s2 in spans)
    scores = {
        **_accuracy([it["correct"] for it in items], "truthfulqa_mc1"),
        **_accuracy([it["mc2"] for it in items], "truthfulqa_mc2"),
        "truthfulqa_n": float(len(items)),
    }
    return scores, items, n_truncated


def mmlu_requests(
    rows: Sequence[dict[str, Any]], dev: Sequence[dict[str, Any]], p: EvalParams
) -> tuple[list[tuple[str, str]], list[slice]]:
    """The (context, continuation) requests of MMLU (four per row) and each row's slice into them.

    Shots: the first `mmlu_fewshot` dev rows of the row's subject, in dev-file order (the harness's
    `first_n` sampler over the subject's dev split)."""
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for r in dev if p.mmlu_fewshot else []:
        by_subject.setdefault(r["subject"], []).append(r)
    requests: list[tuple[str, str]] = []
    spans = []
    for row in rows:
        shots = by_subject.get(row["subject"], [])[: p.mmlu_fewshot]
        if len(shots) < p.mmlu_fewshot:
            raise ValueError(
                f"mmlu_fewshot={p.mmlu_fewshot} but dev.jsonl has {len(shots)} rows of subject {row['subject']!r}"
            )
        ctx = prompts.mmlu_prompt(row, shots, p.mmlu_style)
        a = len(requests)
        requests += [(ctx, c) for c in prompts.mmlu_continuations(row, p.mmlu_style)]
        spans.append(slice(a, len(requests)))
    return requests, spans


def eval_mmlu(model, tokenizer, data_dir: Path, p: EvalParams) -> tuple[dict[str, float], list[dict], int]:
    """MMLU: argmax over the style's continuations, shots = the first k dev rows of the row's subject;
    micro-averaged accuracy. Returns (scores, items, n items with a truncated context)."""
    rows = _read_jsonl(data_dir / "mmlu" / "test.jsonl", p.mmlu_limit)
    dev = _read_jsonl(data_dir / "mmlu" / "dev.jsonl") if p.mmlu_fewshot else []
    requests, spans = mmlu_requests(rows, dev, p)
    max_length = resolve_max_length(model, tokenizer, p.max_length)
    lls, truncated = _loglikelihoods(model, tokenizer, requests, p.ll_batch_size, max_length)
    items = []
    for i, (row, s) in enumerate(zip(rows, spans, strict=True)):
        items.append(
            {
                "id": f"mmlu/{i}",
                "subject": row["subject"],
                "prediction": _argmax(lls[s]),
                "gold": row["answer"],
                "correct": bool(scoring.mmlu_correct(lls[s], row["answer"])),
            }
        )
    n_truncated = sum(any(truncated[s]) for s in spans)
    scores = {**_accuracy([it["correct"] for it in items], "mmlu_acc"), "mmlu_n": float(len(items))}
    return scores, items, n_truncated


def evaluate(
    model, tokenizer, data_dir: Path, p: EvalParams, seed: int = 0
) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """Run GSM8K, TruthfulQA MC and MMLU on `data_dir` (the prepared layout in docs/architecture.md).

    Returns (flat scores, {"gsm8k": items, "truthfulqa": items, "mmlu": items}); `n_truncated` counts
    eval items (GSM8K prompts, TruthfulQA/MMLU questions) whose context was left-truncated to fit
    max_length. `seed` only matters to the rollout engine's seeding (greedy decoding ignores it).
    """
    data_dir = Path(data_dir)
    g_scores, g_items, g_trunc = eval_gsm8k(model, tokenizer, data_dir, p, seed)
    t_scores, t_items, t_trunc = eval_truthfulqa(model, tokenizer, data_dir, p)
    m_scores, m_items, m_trunc = eval_mmlu(model, tokenizer, data_dir, p)
    scores = {**g_scores, **t_scores, **m_scores, "n_truncated": float(g_trunc + t_trunc + m_trunc)}
    return scores, {"gsm8k": g_items, "truthfulqa": t_items, "mmlu": m_items}
