"""Table 2 analog, diagnostics, flips and the rule-based verdicts on the paper's findings.

Inputs are plain loaded data (pure functions, no file reading except the plots' outputs):
- `scores[run][seed]`: flat metrics of one evaluated model (`gsm8k_strict`, `truthfulqa_mc1`, `mmlu_acc`,
  ... with `<metric>_stderr` and the per-benchmark counts `gsm8k_n`, `truthfulqa_n`, `mmlu_n`, and
  diagnostics `mmd_lexical`, `mmd_hidden`, `kl_base_tuned`, `train_state_nll`, absent for base).
  Base has exactly one seed, used for every seed's comparison.
- `items[run][seed][metric] = {item_id: float}`: per-item scores keyed by the same metric names as in
  `scores` (1.0/0.0 for accuracies, a float for truthfulqa_mc2); `item_scores` builds it from the
  evaluation's per-item records.

Every number is a dict `{"mean", "lo", "hi", "n_seeds", "ci"}` (lo/hi None when no interval exists):
- >= 2 seeds (or seed pairs): Student-t interval of the per-seed values (spread across training seeds,
  on the fixed eval items);
- 1 seed: a Wald interval with an item-level stderr - binomial (harness convention) for an accuracy
  level, the evaluation's `<metric>_stderr` for mc2, a paired per-item stderr against the reference
  model for a difference, and the delta method on paired items for a retention ratio;
- diagnostics with one seed have no interval.

Forgetting and retention follow the paper: per retention task (TruthfulQA, MMLU) F = base - post and
R = post / base, and the table reports the mean of the per-task values (not a ratio of sums).
The verdict functions read only the returned report (and the rules), so they can be recomputed from
report.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any


from poststate.params import ReportRules
from poststate.stats import binomial_stderr, flip_counts, normal_ci, paired_diff, paired_ratio, t_ci

RUNS: tuple[str, ...] = ("base", "sft_mild", "sft_stress", "teacher", "opd_stress", "opd_mild", "rl")
RUN_LABELS: dict[str, str] = {
    "base": "base",
    "sft_mild": "mild SFT",
    "sft_stress": "stress SFT",
    "teacher": "degraded teacher (stress SFT)",
    "opd_stress": "OPD from stress SFT",
    "opd_mild": "OPD from mild SFT",
    "rl": "on-policy RL",
    "opd_seqkd": "offline SeqKD (control: teacher states)",
}
COLUMNS: tuple[str, ...] = ("gsm8k", "truthfulqa", "mmlu")
RETENTION_COLUMNS: tuple[str, ...] = ("truthfulqa", "mmlu")
DIAGNOSTICS: tuple[str, ...] = ("mmd_lexical", "mmd_hidden", "kl_base_tuned", "train_state_nll")
FLIP_METRICS: tuple[str, ...] = ("truthfulqa_mc1", "mmlu_acc")
BINARY_METRICS: frozenset[str] = frozenset({"gsm8k_strict", "gsm8k_flexible", "truthfulqa_mc1", "mmlu_acc"})
# metric -> (benchmark, field of `evaluation.evaluate`'s per-item records, scores key holding the item count)
ITEM_FIELDS: dict[str, tuple[str, str, str]] = {
    "gsm8k_strict": ("gsm8k", "correct", "gsm8k_n"),
    "gsm8k_flexible": ("gsm8k", "flexible_correct", "gsm8k_n"),
    "truthfulqa_mc1": ("truthfulqa", "correct", "truthfulqa_n"),
    "truthfulqa_mc2": ("truthfulqa", "mc2", "truthfulqa_n"),
    "mmlu_acc": ("mmlu", "correct", "mmlu_n"),
}
P4_RUNS: tuple[str, ...] = ("sft_stress", "opd_stress", "rl")
FINDINGS: dict[str, str] = {
    "F1": "mild SFT gains on GSM8K without forgetting",
    "F2": "stress SFT forgets (retention drops) and does not gain GSM8K over base",
    "F3": "OPD from the degraded teacher beats that teacher on GSM8K, TruthfulQA and MMLU",
    "F4": "light on-policy RL gains on GSM8K and keeps retention",
    "P4": "stress SFT, OPD-stress and RL have similar lexical drift but different retention",
}
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

_PAPER_KEYS = ("gsm8k", "truthfulqa", "mmlu", "mmd_lexical", "forgetting", "retention")
_PAPER_VALUES: dict[str, tuple[float | None, ...]] = {
    "base": (0.448, 0.300, 0.436, None, None, None),
    "sft_mild": (0.512, 0.295, 0.444, 0.00956, -0.0015, 1.0008),
    "sft_stress": (0.420, 0.245, 0.364, 0.01093, 0.0635, 0.8258),
    "teacher": (0.420, 0.245, 0.364, 0.01093, 0.0635, 0.8258),
    "opd_mild": (0.512, 0.290, 0.434, 0.01470, 0.0060, 0.9810),
    "opd_stress": (0.466, 0.275, 0.430, 0.01092, 0.0155, 0.9515),
    "rl": (0.472, 0.290, 0.442, 0.01098, 0.0020, 0.9902),
}
# arXiv 2605.22731, Table 2 (single seed), keyed by our run names. The paper's degraded teacher *is*
# its stress-SFT checkpoint, so our `teacher` run is shown beside the same paper row.
PAPER_TABLE2: dict[str, dict[str, float | None]] = {
    run: dict(zip(_PAPER_KEYS, values)) for run, values in _PAPER_VALUES.items()
}


# ---------------------------------------------------------------- the paper's formulas


def forgetting(score_base: float, score_post: float) -> float:
    """Forgetting on one retention task: F = score_base - score_post."""
    return score_base - score_post


def retention(score_base: float, score_post: float) -> float:
    """Retention ratio on one retention task: R = score_post / score_base."""
    if score_base == 0:
        raise ValueError("retention: the base score is 0, the ratio is undefined")
    return score_post / score_base


def mean_forgetting(
    base: Mapping[str, float], post: Mapping[str, float], tasks: Sequence[str] = RETENTION_COLUMNS
) -> float:
    """The table's forgetting: mean over retention tasks of score_base - score_post."""
    return sum(forgetting(base[t], post[t]) for t in tasks) / len(tasks)


def mean_retention(
    base: Mapping[str, float], post: Mapping[str, float], tasks: Sequence[str] = RETENTION_COLUMNS
) -> float:
    """The table's retention: mean over retention tasks of score_post / score_base (not a ratio of sums)."""
    return sum(retention(base[t], post[t]) for t in tasks) / len(tasks)


def item_scores(records: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per-metric item scores {metric: {item_id: float}} from one model's per-benchmark item records
    ({"gsm8k": [{"id", "correct", "flexible_correct", ...}], "truthfulqa": [{"id", "correct", "mc2"}],
    "mmlu": [{"id", "correct"}]}, as `evaluation.evaluate` returns them); see ITEM_FIELDS."""
    out: dict[str, dict[str, float]] = {}
    for metric, (bench, field, _) in ITEM_FIELDS.items():
        if bench not in records:
            raise KeyError(f"item records lack benchmark {bench!r} (have {sorted(records)})")
        table: dict[str, float] = {}
        for rec in records[bench]:
            if field not in rec:
                raise KeyError(f"{bench} item {rec.get('id')!r} has no field {field!r}")
            if rec["id"] in table:
                raise ValueError(f"duplicate item id {rec['id']!r} in {bench}")
            table[rec["id"]] = float(rec[field])
        out[metric] = table
    return out


# ---------------------------------------------------------------- estimates


def _estimate(
    values: Sequence[float], level: float, single: Callable[[], tuple[float, str]] | None
) -> dict[str, Any]:
    """Mean with a CI: t across >= 2 values; with one value a Wald CI from `single()` -> (stderr, method)."""
    if len(values) >= 2:
        mean, lo, hi = t_ci(values, level)
        return {"mean": mean, "lo": lo, "hi": hi, "n_seeds": len(values), "ci": f"t across {len(values)} seeds"}
    (value,) = values
    if single is None:
        return {"mean": float(value), "lo": None, "hi": None, "n_seeds": 1, "ci": "none (one seed)"}
    se, method = single()
    lo, hi = normal_ci(float(value), se, level)
    return {"mean": float(value), "lo": lo, "hi": hi, "n_seeds": 1, "ci": method}


def _seeds(scores: Mapping, run: str) -> list:
    seeds = sorted(scores[run], key=str)
    if not seeds:
        raise ValueError(f"run {run!r} has no seeds in scores")
    return seeds


def _score(scores: Mapping, run: str, seed: Hashable, key: str) -> float:
    row = scores[run][seed]
    if key not in row:
        raise KeyError(f"scores[{run!r}][{seed!r}] has no {key!r} (has {sorted(row)})")
    return float(row[key])


def _items(items: Mapping, scores: Mapping, run: str, seed: Hashable, metric: str) -> Mapping[Hashable, float]:
    """Per-item scores of one run/seed/metric, checked against the flat score (their mean)."""
    try:
        table = items[run][seed][metric]
    except KeyError as err:
        raise KeyError(f"items[{run!r}][{seed!r}] lacks {metric!r} (missing key {err})") from None
    if not table:
        raise ValueError(f"items[{run!r}][{seed!r}][{metric!r}] is empty")
    item_mean = sum(float(v) for v in table.values()) / len(table)
    flat = _score(scores, run, seed, metric)
    if abs(item_mean - flat) > 1e-6:
        raise ValueError(f"{run}/{seed}/{metric}: mean of items {item_mean:.6f} != score {flat:.6f}")
    return table


def _pairs(scores: Mapping, run_a: str, run_b: str) -> list[tuple[Hashable, Hashable]]:
    """Seed pairs (seed_a, seed_b) for a difference a - b: a single-seed side is shared by every pair,
    otherwise the seed sets must be equal and are matched by seed."""
    seeds_a, seeds_b = _seeds(scores, run_a), _seeds(scores, run_b)
    if len(seeds_b) == 1:
        return [(s, seeds_b[0]) for s in seeds_a]
    if len(seeds_a) == 1:
        return [(seeds_a[0], s) for s in seeds_b]
    if set(seeds_a) != set(seeds_b):
        raise ValueError(f"cannot pair seeds of {run_a!r} {seeds_a} with {run_b!r} {seeds_b}")
    return [(s, s) for s in seeds_a]


def _level_stderr(scores: Mapping, run: str, seed: Hashable, metric: str) -> tuple[float, str]:
    value = _score(scores, run, seed, metric)
    if metric in BINARY_METRICS:
        n = int(_score(scores, run, seed, ITEM_FIELDS[metric][2]))
        return binomial_stderr(value, n), f"binomial, n={n}"
    return _score(scores, run, seed, f"{metric}_stderr"), "item stderr from the evaluation"


def _combined_se(ses: Sequence[float]) -> float:
    """Stderr of the mean of independent per-task estimates: sqrt(sum se_t^2) / T."""
    return math.sqrt(sum(se * se for se in ses)) / len(ses)


def _level_row(scores, run, rules) -> dict[str, Any]:
    seeds = _seeds(scores, run)
    row = {}
    for c in COLUMNS:
        metric = rules.metric_for(c)
        values = [_score(scores, run, s, metric) for s in seeds]
        row[c] = _estimate(values, rules.level, lambda m=metric: _level_stderr(scores, run, seeds[0], m))
    return row


def _diagnostic(scores, run, key, level) -> dict[str, Any] | None:
    seeds = _seeds(scores, run)
    present = [s for s in seeds if key in scores[run][s]]
    if not present:
        return None
    if len(present) != len(seeds):
        raise KeyError(f"{key!r} is present for only some seeds of {run!r}: {present} of {seeds}")
    return _estimate([_score(scores, run, s, key) for s in seeds], level, None)


def _gap(scores, items, run_a, run_b, column, rules) -> dict[str, Any]:
    """Level difference a - b on one table column, seed-paired."""
    metric = rules.metric_for(column)
    pairs = _pairs(scores, run_a, run_b)
    values = [_score(scores, run_a, sa, metric) - _score(scores, run_b, sb, metric) for sa, sb in pairs]

    def single() -> tuple[float, str]:
        (sa, sb), = pairs
        _, se = paired_diff(_items(items, scores, run_b, sb, metric), _items(items, scores, run_a, sa, metric))
        return se, "paired items"

    return _estimate(values, rules.level, single)


def _retention_row(scores, items, run, rules) -> dict[str, dict[str, Any]]:
    """Mean forgetting and mean retention of a run against base, seed-paired with base's one seed."""
    pairs = _pairs(scores, run, "base")
    tasks = {c: rules.metric_for(c) for c in RETENTION_COLUMNS}
    base_lv = {c: _score(scores, "base", pairs[0][1], m) for c, m in tasks.items()}
    posts = [{c: _score(scores, run, s, m) for c, m in tasks.items()} for s, _ in pairs]

    def item_pairs():
        (s, b), = pairs
        return [(_items(items, scores, "base", b, m), _items(items, scores, run, s, m)) for m in tasks.values()]

    def forget_se() -> tuple[float, str]:
        return _combined_se([paired_diff(post, base)[1] for base, post in item_pairs()]), "paired items"

    def retain_se() -> tuple[float, str]:
        ses = [paired_ratio(post, base)[1] for base, post in item_pairs()]
        return _combined_se(ses), "delta method, paired items"

    return {
        "forgetting": _estimate([mean_forgetting(base_lv, p) for p in posts], rules.level, forget_se),
        "retention": _estimate([mean_retention(base_lv, p) for p in posts], rules.level, retain_se),
    }


def _retention_gap(scores, items, run_a, run_b, rules) -> dict[str, Any]:
    """Mean-retention difference R_a - R_b (both against base), seed-paired."""
    pairs = _pairs(scores, run_a, run_b)
    base_seed = _seeds(scores, "base")[0]
    tasks = {c: rules.metric_for(c) for c in RETENTION_COLUMNS}
    base_lv = {c: _score(scores, "base", base_seed, m) for c, m in tasks.items()}
    values = [
        mean_retention(base_lv, {c: _score(scores, run_a, sa, m) for c, m in tasks.items()})
        - mean_retention(base_lv, {c: _score(scores, run_b, sb, m) for c, m in tasks.items()})
        for sa, sb in pairs
    ]

    def single() -> tuple[float, str]:
        (sa, sb), = pairs
        ses = [
            paired_ratio(
                _items(items, scores, run_a, sa, m),
                _items(items, scores, "base", base_seed, m),
                _items(items, scores, run_b, sb, m),
            )[1]
            for m in tasks.values()
        ]
        return _combined_se(ses), "delta method, paired items"

    return _estimate(values, rules.level, single)


def _as_bool(table: Mapping[Hashable, float], where: str) -> dict[Hashable, bool]:
    out = {}
    for k, v in table.items():
        if float(v) not in (0.0, 1.0):
            raise ValueError(f"{where}: item {k!r} has score {v!r}, expected 0.0 or 1.0 for flip counts")
        out[k] = float(v) == 1.0
    return out


def _flips(scores, items, run) -> dict[str, dict[str, Any]]:
    base_seed = _seeds(scores, "base")[0]
    out = {}
    for metric in FLIP_METRICS:
        base = _as_bool(_items(items, scores, "base", base_seed, metric), f"base/{metric}")
        per_seed = {
            str(s): flip_counts(base, _as_bool(_items(items, scores, run, s, metric), f"{run}/{s}/{metric}"))
            for s in _seeds(scores, run)
        }
        out[metric] = {
            key: sum(c[key] for c in per_seed.values()) / len(per_seed) for key in ("right_to_wrong", "wrong_to_right")
        } | {"n": next(iter(per_seed.values()))["n"], "per_seed": per_seed}
    return out


# ---------------------------------------------------------------- the report


def build_report(
    scores: Mapping[str, Mapping[Hashable, Mapping[str, float]]],
    items: Mapping[str, Mapping[Hashable, Mapping[str, Mapping[Hashable, float]]]],
    rules: ReportRules,
    paper_rows: Mapping[str, Mapping[str, float | None]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Table 2 analog with CIs, diagnostics, flips vs base, comparisons and one verdict per finding.

    Runs absent from `scores` are left out (their verdicts say "run missing"); base is required and must
    have exactly one seed. `meta` (scoring choices such as `mmlu_style`) is copied into report["meta"].
    The result is JSON-serialisable.
    """
    if "base" not in scores:
        raise KeyError("build_report: scores has no 'base' run; every comparison is against base")
    if len(scores["base"]) != 1:
        raise ValueError(f"base must have exactly one seed, got {sorted(scores['base'], key=str)}")
    runs = [r for r in RUNS if r in scores] + sorted(r for r in scores if r not in RUNS)
    table: dict[str, dict[str, Any]] = {}
    diagnostics: dict[str, dict[str, Any]] = {}
    gains: dict[str, dict[str, Any]] = {}
    flips: dict[str, dict[str, Any]] = {}
    for run in runs:
        row = _level_row(scores, run, rules)
        if run == "base":
            row |= {"mmd_lexical": None, "forgetting": None, "retention": None}
        else:
            row["mmd_lexical"] = _diagnostic(scores, run, "mmd_lexical", rules.level)
            row |= _retention_row(scores, items, run, rules)
            diagnostics[run] = {k: _diagnostic(scores, run, k, rules.level) for k in DIAGNOSTICS if k != "mmd_lexical"}
            gains[run] = _gap(scores, items, run, "base", "gsm8k", rules)
            flips[run] = _flips(scores, items, run)
        table[run] = row
    comparisons: dict[str, Any] = {"gsm8k_gain": gains}
    if "opd_stress" in scores and "teacher" in scores:
        comparisons["teacher_gap"] = {c: _gap(scores, items, "opd_stress", "teacher", c, rules) for c in COLUMNS}
    if all(r in scores for r in P4_RUNS):
        ranked = sorted(P4_RUNS, key=lambda r: table[r]["retention"]["mean"])
        high, low = ranked[-1], ranked[0]
        comparisons["p4_retention_spread"] = {"runs": [high, low]} | _retention_gap(scores, items, high, low, rules)
    reserved = {"runs", "seeds", "level", "columns"}
    clash = reserved & set(meta or {})
    if clash:
        raise ValueError(f"meta keys {sorted(clash)} are reserved by the report")
    report: dict[str, Any] = {
        "meta": dict(meta or {})
        | {
            "runs": runs,
            "seeds": {r: [str(s) for s in _seeds(scores, r)] for r in runs},
            "level": rules.level,
            "columns": {c: rules.metric_for(c) for c in COLUMNS},
        },
        "rules": rules.model_dump(mode="json"),
        "table": table,
        "diagnostics": diagnostics,
        "flips": flips,
        "comparisons": comparisons,
        "paper": {r: dict(v) for r, v in paper_rows.items()} if paper_rows is not None else None,
    }
    report["verdicts"] = all_verdicts(report, rules)
    return report


# ---------------------------------------------------------------- verdicts (pure, from the report)


def _fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _fmt_est(est: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    if est is None:
        return "—"
    text = _fmt(est["mean"], digits, signed)
    if est["lo"] is not None:
        text += f" [{_fmt(est['lo'], digits, signed)}, {_fmt(est['hi'], digits, signed)}]"
    return text


def _claim(
    name: str, est: Mapping[str, Any] | None, op: str, threshold: float, digits: int = 3
) -> tuple[bool | None, str]:
    """Three-valued test of `est op threshold` on its CI.

    op ">"  : holds if lo > t,  fails if hi <= t;
    op ">=" : holds if lo >= t, fails if hi < t;
    op "<=" : holds if hi <= t, fails if lo > t; otherwise (CI straddles t) None.
    """
    if est is None:
        return None, f"{name}: not available"
    if est["lo"] is None:
        return None, f"{name} = {_fmt(est['mean'], digits)} has no CI"
    lo, hi = est["lo"], est["hi"]
    if op == ">":
        outcome = True if lo > threshold else False if hi <= threshold else None
    elif op == ">=":
        outcome = True if lo >= threshold else False if hi < threshold else None
    elif op == "<=":
        outcome = True if hi <= threshold else False if lo > threshold else None
    else:
        raise ValueError(f"unknown comparison {op!r}")
    word = {True: "holds", False: "fails", None: "CI straddles the threshold"}[outcome]
    return outcome, f"{name} {_fmt_est(est, digits)} {op} {threshold:g}: {word}"


def _combine(outcomes: Sequence[bool | None]) -> str:
    if any(o is False for o in outcomes):
        return NOT_REPRODUCED
    if all(o is True for o in outcomes):
        return REPRODUCED
    return INCONCLUSIVE


def _missing(report: Mapping[str, Any], finding: str, runs: Sequence[str], rule: str) -> dict[str, Any] | None:
    absent = [r for r in runs if r not in report["meta"]["runs"]]
    if not absent:
        return None
    return {
        "finding": finding,
        "claim": FINDINGS[finding],
        "verdict": INCONCLUSIVE,
        "reason": f"run missing: {', '.join(absent)}",
        "rule": rule,
        "numbers": {},
    }


def _verdict(finding: str, claims: Sequence[tuple[bool | None, str]], rule: str, numbers: dict) -> dict[str, Any]:
    return {
        "finding": finding,
        "claim": FINDINGS[finding],
        "verdict": _combine([c[0] for c in claims]),
        "reason": "; ".join(c[1] for c in claims),
        "rule": rule,
        "numbers": numbers,
    }


def _gain_keeps_verdict(finding: str, run: str, report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    rule = (
        f"reproduced when the {rules.level:.0%} CI of {run}'s GSM8K gain over base lies above 0 and the CI of "
        f"its mean retention lies at or above {rules.retention_keep}; not reproduced when the gain CI lies at "
        f"or below 0 or the retention CI lies below {rules.retention_keep}; otherwise inconclusive"
    )
    missing = _missing(report, finding, ["base", run], rule)
    if missing:
        return missing
    gain = report["comparisons"]["gsm8k_gain"][run]
    ret = report["table"][run]["retention"]
    claims = [_claim("GSM8K gain", gain, ">", 0.0), _claim("mean retention", ret, ">=", rules.retention_keep, 4)]
    return _verdict(finding, claims, rule, {"gsm8k_gain": gain, "retention": ret})


def verdict_f1(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """F1: mild SFT gains on GSM8K (gain CI > 0) without forgetting (retention CI >= retention_keep)."""
    return _gain_keeps_verdict("F1", "sft_mild", report, rules)


def verdict_f2(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """F2: stress SFT forgets (retention CI <= retention_loss) and does not gain GSM8K (gain CI <= 0)."""
    rule = (
        f"reproduced when the {rules.level:.0%} CI of sft_stress's mean retention lies at or below "
        f"{rules.retention_loss} and the CI of its GSM8K gain over base lies at or below 0; not reproduced "
        f"when the retention CI lies above {rules.retention_loss} or the gain CI lies above 0; otherwise "
        "inconclusive"
    )
    missing = _missing(report, "F2", ["base", "sft_stress"], rule)
    if missing:
        return missing
    gain = report["comparisons"]["gsm8k_gain"]["sft_stress"]
    ret = report["table"]["sft_stress"]["retention"]
    claims = [_claim("mean retention", ret, "<=", rules.retention_loss, 4), _claim("GSM8K gain", gain, "<=", 0.0)]
    return _verdict("F2", claims, rule, {"retention": ret, "gsm8k_gain": gain})


def verdict_f3(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """F3: OPD from the degraded teacher beats the teacher on all three benchmarks (each gap CI > 0)."""
    rule = (
        f"reproduced when the {rules.level:.0%} CI of opd_stress - teacher lies above 0 on GSM8K, TruthfulQA "
        "and MMLU; not reproduced when any of the three CIs lies at or below 0; otherwise inconclusive"
    )
    missing = _missing(report, "F3", ["opd_stress", "teacher"], rule)
    if missing:
        return missing
    gaps = report["comparisons"]["teacher_gap"]
    claims = [_claim(f"{c} gap over teacher", gaps[c], ">", 0.0) for c in COLUMNS]
    return _verdict("F3", claims, rule, {f"{c}_gap": gaps[c] for c in COLUMNS})


def verdict_f4(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """F4: light RL gains on GSM8K (gain CI > 0) and keeps retention (retention CI >= retention_keep)."""
    return _gain_keeps_verdict("F4", "rl", report, rules)


def verdict_p4(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """P4: similar lexical drift (relative spread of mean MMD <= drift_band) but different retention
    (CI of the largest mean-retention gap among the P4 runs excludes 0)."""
    rule = (
        f"reproduced when the lexical MMD of {', '.join(P4_RUNS)} (means over seeds) spans at most "
        f"{rules.drift_band:.0%} of their mean, (max - min) / mean, and the {rules.level:.0%} CI of the largest "
        "gap between their mean retentions lies above 0; not reproduced when the MMD spread exceeds the band "
        f"or that gap's CI lies below {rules.retention_equivalence}; otherwise inconclusive"
    )
    missing = _missing(report, "P4", ["base", *P4_RUNS], rule)
    if missing:
        return missing
    mmd = {r: report["table"][r]["mmd_lexical"] for r in P4_RUNS}
    spread = report["comparisons"]["p4_retention_spread"]
    claims: list[tuple[bool | None, str]] = []
    if any(v is None for v in mmd.values()):
        absent = [r for r, v in mmd.items() if v is None]
        claims.append((None, f"lexical MMD not available for {', '.join(absent)}"))
        rel = None
    else:
        means = [v["mean"] for v in mmd.values()]
        center = sum(means) / len(means)
        rel = (max(means) - min(means)) / abs(center) if center != 0 else math.inf
        similar = rel <= rules.drift_band
        word = "holds" if similar else "fails"
        claims.append((similar, f"lexical MMD relative spread {rel:.3f} <= {rules.drift_band:g}: {word}"))
    lo, hi = spread["lo"], spread["hi"]
    gap_name = f"retention gap {spread['runs'][0]} - {spread['runs'][1]}"
    if lo is None:
        claims.append((None, f"{gap_name} = {_fmt(spread['mean'], 4)} has no CI"))
    else:
        different = True if lo > 0 else False if hi < rules.retention_equivalence else None
        words = {
            True: "differs (CI above 0)",
            False: f"alike (CI below {rules.retention_equivalence:g})",
            None: "CI straddles",
        }
        claims.append((different, f"{gap_name} {_fmt_est(spread, 4)}: {words[different]}"))
    return _verdict("P4", claims, rule, {"mmd_lexical": mmd, "mmd_relative_spread": rel, "retention_gap": spread})


VERDICT_FUNCTIONS: dict[str, Callable[[Mapping[str, Any], ReportRules], dict[str, Any]]] = {
    "F1": verdict_f1,
    "F2": verdict_f2,
    "F3": verdict_f3,
    "F4": verdict_f4,
    "P4": verdict_p4,
}


def verdict_for(finding: str, report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """The verdict on one finding ('F1'..'F4', 'P4'), computed only from the report and the rules."""
    if finding not in VERDICT_FUNCTIONS:
        raise KeyError(f"unknown finding {finding!r}; expected one of {sorted(VERDICT_FUNCTIONS)}")
    return VERDICT_FUNCTIONS[finding](report, rules)


def all_verdicts(report: Mapping[str, Any], rules: ReportRules) -> dict[str, dict[str, Any]]:
    """Every finding's verdict, keyed by finding id."""
    return {f: verdict_for(f, report, rules) for f in VERDICT_FUNCTIONS}


# ---------------------------------------------------------------- markdown

_TABLE_COLUMNS = (
    ("gsm8k", "GSM8K", 3),
    ("truthfulqa", "TruthfulQA", 3),
    ("mmlu", "MMLU", 3),
    ("mmd_lexical", "MMD (lexical)", 5),
    ("forgetting", "forgetting", 4),
    ("retention", "retention", 4),
)


def render_markdown(report: Mapping[str, Any]) -> str:
    """Markdown: scoring choices, the Table 2 analog (paper numbers beside ours when present),
    diagnostics, the OPD-vs-teacher gaps, flips vs base and one line per verdict."""
    meta, paper = report["meta"], report["paper"]
    level = f"{meta['level']:.0%}"
    lines = ["# Table 2 analog: post-training is about states, not tokens", ""]
    lines.append("## Scoring choices")
    lines.append("")
    for col, metric in meta["columns"].items():
        lines.append(f"- {col} column: `{metric}`")
    for key in sorted(k for k in meta if k not in {"runs", "seeds", "level", "columns"}):
        lines.append(f"- {key}: `{meta[key]}`")
    lines.append(f"- seeds: " + ", ".join(f"{r} {len(s)}" for r, s in meta["seeds"].items()))
    lines.append(
        f"- intervals: {level}; Student-t across seeds when a run has >= 2 seeds, otherwise item-level "
        "(binomial for levels, paired items for differences, delta method for retention); base has one seed"
    )
    lines += ["", "## Table 2 analog", ""]
    if paper is not None:
        lines.append("Each cell: ours [CI] (paper). The paper reports one seed and no intervals.")
        lines.append("")
    lines.append("| run | seeds | " + " | ".join(h for _, h, _ in _TABLE_COLUMNS) + " |")
    lines.append("|---|---|" + "---|" * len(_TABLE_COLUMNS))
    for run in meta["runs"]:
        row = report["table"][run]
        cells = []
        for key, _, digits in _TABLE_COLUMNS:
            cell = _fmt_est(row[key], digits)
            if paper is not None and run in paper and paper[run].get(key) is not None:
                cell += f" ({_fmt(paper[run][key], digits)})"
            cells.append(cell)
        lines.append(f"| {RUN_LABELS.get(run, run)} | {len(meta['seeds'][run])} | " + " | ".join(cells) + " |")
    lines += ["", "## Diagnostics (vs base)", ""]
    lines.append("| run | GSM8K gain | MMD (hidden) | forward KL(base ‖ tuned) | train-state NLL (base) |")
    lines.append("|---|---|---|---|---|")
    for run, diag in report["diagnostics"].items():
        lines.append(
            f"| {RUN_LABELS.get(run, run)} | {_fmt_est(report['comparisons']['gsm8k_gain'][run], 3, signed=True)} | "
            f"{_fmt_est(diag['mmd_hidden'], 5)} | {_fmt_est(diag['kl_base_tuned'], 4)} | "
            f"{_fmt_est(diag['train_state_nll'], 3)} |"
        )
    if "teacher_gap" in report["comparisons"]:
        lines += ["", "## OPD from the degraded teacher minus the teacher", ""]
        lines.append("| benchmark | opd_stress − teacher |")
        lines.append("|---|---|")
        for col, est in report["comparisons"]["teacher_gap"].items():
            lines.append(f"| {col} | {_fmt_est(est, 3, signed=True)} |")
    lines += ["", "## Flips vs base (mean over seeds)", ""]
    lines.append("| run | benchmark | right→wrong | wrong→right | n |")
    lines.append("|---|---|---|---|---|")
    for run, per_metric in report["flips"].items():
        for metric, f in per_metric.items():
            lines.append(
                f"| {RUN_LABELS.get(run, run)} | {metric} | {f['right_to_wrong']:g} | "
                f"{f['wrong_to_right']:g} | {f['n']} |"
            )
    lines += ["", "## Verdicts", ""]
    for finding, v in report["verdicts"].items():
        lines.append(f"- **{finding}** ({v['claim']}): **{v['verdict']}**. {v['reason']}. Rule: {v['rule']}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _xy_err(est: Mapping[str, Any]) -> tuple[float, list[float]]:
    if est["lo"] is None:
        return est["mean"], [0.0, 0.0]
    return est["mean"], [est["mean"] - est["lo"], est["hi"] - est["mean"]]


def _scatter_png(
    points: list[tuple[str, Mapping, Mapping]], xlabel: str, ylabel: str, title: str, path, guides
) -> None:
    """One labelled point with CI bars per run; written without a Software/date tag, so bytes are stable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    placed: list[tuple[float, float]] = []
    for label, x_est, y_est in points:
        x, xerr = _xy_err(x_est)
        y, yerr = _xy_err(y_est)
        ax.errorbar([x], [y], xerr=[[xerr[0]], [xerr[1]]], yerr=[[yerr[0]], [yerr[1]]], fmt="o", capsize=3)
        stacked = sum(1 for px, py in placed if math.isclose(px, x) and math.isclose(py, y))
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5 - 11 * stacked), fontsize=8)
        placed.append((x, y))
    for kind, value, text in guides:  # dashed reference lines: ("v" | "h", position, label)
        if kind == "v":
            ax.axvline(value, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(text, (value, 0.01), xycoords=("data", "axes fraction"), fontsize=7, color="grey")
        else:
            ax.axhline(value, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(text, (0.01, value), xycoords=("axes fraction", "data"), fontsize=7, color="grey")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def plot_gain_vs_retention(report: Mapping[str, Any], path) -> None:
    """PNG: mean retention (x) vs GSM8K gain over base (y), one point per post-trained run with CI bars."""
    points = [
        (RUN_LABELS.get(run, run), report["table"][run]["retention"], report["comparisons"]["gsm8k_gain"][run])
        for run in report["meta"]["runs"]
        if run != "base"
    ]
    rules = report["rules"]
    guides = [
        ("h", 0.0, ""),
        ("v", rules["retention_keep"], "retention_keep"),
        ("v", rules["retention_loss"], "retention_loss"),
    ]
    _scatter_png(points, "mean retention (TruthfulQA, MMLU)", "GSM8K gain over base", "Gain vs retention", path, guides)


def plot_drift_vs_forgetting(report: Mapping[str, Any], path) -> None:
    """PNG: lexical MMD to base rollouts (x) vs mean forgetting (y), one point per run that has an MMD."""
    points = [
        (RUN_LABELS.get(run, run), report["table"][run]["mmd_lexical"], report["table"][run]["forgetting"])
        for run in report["meta"]["runs"]
        if run != "base" and report["table"][run]["mmd_lexical"] is not None
    ]
    xlabel = "state drift: lexical MMD to base rollouts (mmd_lexical)"
    ylabel = "mean forgetting (TruthfulQA, MMLU)"
    _scatter_png(points, xlabel, ylabel, "Drift vs forgetting", path, [("h", 0.0, "")])


def plot_training_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path) -> None:
    """PNG: the training loss of every method (seed 0) against its step, one panel per method, and the RL
    reward; `curves[run][metric]` is the per-step series logged by DVCLive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in curves if curves[r].get("loss")]
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(2.6 * max(len(runs), 1), 2.4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        ax.plot(curves[run]["loss"], lw=1, label="loss")
        if curves[run].get("reward_mean"):
            ax.plot(curves[run]["reward_mean"], lw=1, label="reward")
            ax.legend(fontsize=6)
        ax.set_title(RUN_LABELS.get(run, run), fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
