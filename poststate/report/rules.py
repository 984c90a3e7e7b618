"""The verdicts: one per finding of the paper, computed only from report.json and the rules.

Each claim is three-valued on its CI (the report's `level`): it *holds* when the whole CI lies on the
claimed side of its threshold, *fails* when the whole CI lies on the other side, and is undecided when
the CI straddles the threshold. A finding is "reproduced" when every claim holds, "not reproduced" when
one fails, "inconclusive" otherwise - unless a run behind it did not pass its validity gate (its own
primary objective improved on held-out items: improvement CI above 0 on every seed), which
makes the finding **invalid**, naming the run and its numbers, never "not reproduced".

Every claim carries its **power**: the probability that a rerun of this design (the observed standard
error and the interval's own multiplier m = half-width / se) gives a CI on the claimed side when the true
value is the paper's own Table 2 effect for that claim, `stats.power_at` with m in place of z (normal
approximation, se known: Phi(margin / se - m)). An "inconclusive" verdict is to be read against it. A
finding's joint power is the product of its claims' powers, which treats their estimates as independent
(an approximation: gain and retention of one run share its seeds). docs/report.md justifies every rule,
margin and alternative.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

from poststate.params import ReportRules
from poststate.report.estimates import COLUMNS, P4_RUNS
from poststate.stats import power_at

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, INVALID = "reproduced", "not reproduced", "inconclusive", "invalid"
VERDICTS: tuple[str, ...] = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, INVALID)
FINDINGS: dict[str, str] = {
    "F1": "mild SFT gains on GSM8K without forgetting",
    "F2": "stress SFT forgets (retention drops) and does not gain GSM8K over base",
    "F3": "OPD from the degraded teacher beats that teacher on GSM8K, TruthfulQA and MMLU",
    "F4": "light on-policy RL gains on GSM8K and keeps retention",
    "P4": "stress SFT, OPD-stress and RL have similar lexical drift but different retention",
}
# the runs whose validity gates a finding needs (F3's teacher is sft_stress's model: its gate)
FINDING_RUNS: dict[str, tuple[str, ...]] = {
    "F1": ("sft_mild",),
    "F2": ("sft_stress",),
    "F3": ("sft_stress", "opd_stress"),
    "F4": ("rl",),
    "P4": P4_RUNS,
}
# the runs whose numbers a finding's claims read
_NEEDED: dict[str, tuple[str, ...]] = {
    "F1": ("base", "sft_mild"),
    "F2": ("base", "sft_stress"),
    "F3": ("base", "sft_stress", "teacher", "opd_stress"),
    "F4": ("base", "rl"),
    "P4": ("base", *P4_RUNS),
}

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
# arXiv 2605.22731, Table 2 (single seed), keyed by our run names. The paper's degraded teacher *is* its
# stress-SFT checkpoint, so our `teacher` run is shown beside the same paper row.
PAPER_TABLE2: dict[str, dict[str, float | None]] = {run: dict(zip(_PAPER_KEYS, v)) for run, v in _PAPER_VALUES.items()}


def paper_gain(run: str, column: str = "gsm8k") -> float:
    """The paper's gain of a run over its base on one column (Table 2)."""
    return PAPER_TABLE2[run][column] - PAPER_TABLE2["base"][column]


# ---------------------------------------------------------------- formatting (shared with render)


def fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_est(est: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """'mean [lo, hi]' of an estimate, '—' when absent."""
    if est is None:
        return "—"
    return f"{fmt(est['mean'], digits, signed)} [{fmt(est['lo'], digits, signed)}, {fmt(est['hi'], digits, signed)}]"


# ---------------------------------------------------------------- claims


def claim_power(est: Mapping[str, Any] | None, op: str, threshold: float, alternative: float, level: float) -> float | None:
    """Power of a claim at the estimate's standard error and interval multiplier m (= est["t"]): the
    probability that a CI est -/+ m se lands on the claimed side of `threshold` when the truth is
    `alternative` (`stats.power_at` at the level whose normal quantile is m). op '>', '>=', '<=' as
    power_at; 'within' (|x| < threshold, both CI ends inside): P(-d + m se < est < d - m se) =
    max(0, power_at(<, d) + power_at(>, -d) - 1); 'differs' (P4 retention: CI above 0): as '>' 0.
    None without a positive se (no interval, or every value equal)."""
    if est is None or not est.get("se") or est.get("t") is None:
        return None
    se, m = float(est["se"]), float(est["t"])
    eq_level = 2.0 * NormalDist().cdf(m) - 1.0  # the level whose z is m (m = z_level for a pure item design)

    def one_sided(t: float, side: str) -> float:
        if eq_level < 1.0:
            return power_at(se, t, alternative, side, eq_level)
        # m above ~8.3 (e.g. t with 1 df): eq_level rounds to 1; power_at's formula with m itself
        margin = (alternative - t) if side in (">", ">=") else (t - alternative)
        return NormalDist().cdf(margin / se - m)

    if op == "within":
        return max(0.0, one_sided(threshold, "<") + one_sided(-threshold, ">") - 1.0)
    if op == "differs":
        return one_sided(0.0, ">")
    return one_sided(threshold, op)


def claim(
    name: str,
    est: Mapping[str, Any] | None,
    op: str,
    threshold: float,
    alternative: float,
    level: float,
    digits: int = 3,
    equivalence: float | None = None,
) -> dict[str, Any]:
    """Three-valued test of one claim on its CI, with its power against `alternative`.

    op '>' : holds if lo > t,  fails if hi <= t;
    op '>=': holds if lo >= t, fails if hi < t        (non-inferiority: t = 1 - margin);
    op '<=': holds if hi <= t, fails if lo > t;
    op 'within' (t = delta): holds if -t < lo and hi < t, fails if lo > t or hi < -t (entirely outside);
    op 'differs' (P4 retention, pair fixed): holds if lo > 0, fails if hi <= 0 or the CI lies within
        +-equivalence (alike); otherwise (the CI straddles) undecided.
    """
    out: dict[str, Any] = {"name": name, "op": op, "threshold": threshold, "alternative": alternative,
                           "estimate": None if est is None else {k: est[k] for k in ("mean", "lo", "hi", "se", "t", "n_seeds")}}
    if est is None:
        return out | {"outcome": None, "text": f"{name}: not available", "power": None}
    lo, hi = est["lo"], est["hi"]
    if op == ">":
        outcome = True if lo > threshold else False if hi <= threshold else None
    elif op == ">=":
        outcome = True if lo >= threshold else False if hi < threshold else None
    elif op == "<=":
        outcome = True if hi <= threshold else False if lo > threshold else None
    elif op == "within":
        outcome = True if (-threshold < lo and hi < threshold) else False if (lo > threshold or hi < -threshold) else None
    elif op == "differs":
        if equivalence is None:
            raise ValueError("claim: op 'differs' needs an equivalence margin")
        alike, reversed_ = -equivalence < lo and hi < equivalence, hi <= 0
        outcome = True if lo > 0 else False if (alike or reversed_) else None
    else:
        raise ValueError(f"claim: unknown op {op!r}")
    if op == "within":
        words = {True: f"within +-{threshold:.3g}", False: f"entirely outside +-{threshold:.3g}", None: f"CI crosses +-{threshold:.3g}"}
        text = f"{name} {fmt_est(est, digits, signed=True)}: {words[outcome]}"
    elif op == "differs":
        words = {True: "differ (CI above 0)", None: f"undecided (CI straddles 0, not within +-{equivalence:g})",
                 False: f"alike (CI within +-{equivalence:g})" if alike else "reversed (CI at or below 0)"}
        text = f"{name} {fmt_est(est, digits, signed=True)}: {words[outcome]}"
    else:
        word = {True: "holds", False: "fails", None: "CI straddles the threshold"}[outcome]
        text = f"{name} {fmt_est(est, digits)} {op} {threshold:g}: {word}"
    power = claim_power(est, op, threshold, alternative, level)
    return out | {"outcome": outcome, "text": text, "power": power}


def _combine(outcomes: Sequence[bool | None]) -> str:
    if any(o is False for o in outcomes):
        return NOT_REPRODUCED
    if all(o is True for o in outcomes):
        return REPRODUCED
    return INCONCLUSIVE


def _joint(powers: Sequence[float | None]) -> float | None:
    return None if any(p is None for p in powers) else math.prod(powers)


def _gate_problems(report: Mapping[str, Any], finding: str) -> list[str]:
    """Why the finding's runs are not valid (empty when every gate passed)."""
    problems = []
    for run in FINDING_RUNS[finding]:
        g = report["gates"].get(run)
        if g is None:
            problems.append(f"{run}: no gate record (its own objective was not measured)")
            continue
        if g["passed"]:
            continue
        o = g["objectives"][g["primary"]]
        per_seed = "; ".join(
            f"seed {s} {fmt_est(e, 4, signed=True)} {'pass' if e['passed'] else 'FAIL'}" for s, e in o["per_seed"].items()
        )
        problems.append(
            f"{run} did not pass its gate: held-out {g['primary']} ({o['better']} is better) {fmt(o['before'], 4)} -> "
            f"{fmt(o['after'], 4)}, improvement pooled {fmt_est(o['pooled'], 4, signed=True)}; per seed {per_seed}"
        )
    return problems


def _verdict(finding: str, report: Mapping[str, Any], rule: str, claims: Sequence[dict] | None, alternative: str,
             extra: dict | None = None) -> dict[str, Any]:
    """A finding's verdict: run missing -> inconclusive; a gate not passed -> invalid; else the claims."""
    absent = [r for r in _NEEDED[finding] if r not in report["meta"]["runs"]]
    base = {"finding": finding, "claim": FINDINGS[finding], "runs": list(FINDING_RUNS[finding]), "rule": rule,
            "alternative": alternative}
    if absent:
        return base | {"verdict": INCONCLUSIVE, "reason": f"run missing: {', '.join(absent)}", "claims": [],
                       "power": None}
    claims = list(claims or [])
    power = {"claims": {c["name"]: c["power"] for c in claims}, "joint": _joint([c["power"] for c in claims])}
    problems = _gate_problems(report, finding)
    if problems:
        return base | {"verdict": INVALID, "reason": "; ".join(problems), "claims": claims, "power": power} | (extra or {})
    verdict = _combine([c["outcome"] for c in claims])
    return base | {"verdict": verdict, "reason": "; ".join(c["text"] for c in claims), "claims": claims,
                   "power": power} | (extra or {})


def _gate_rule(finding: str) -> str:
    runs = ", ".join(FINDING_RUNS[finding])
    return (f"invalid unless {runs} passed the validity gate (primary held-out objective's improvement CI above 0 "
            "on every seed); ")


# ---------------------------------------------------------------- findings


def _gain_keeps(finding: str, run: str, report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    keep = rules.retention_keep
    rule = _gate_rule(finding) + (
        f"reproduced when the {rules.level:.0%} CI of {run}'s GSM8K gain over base lies above 0 and the CI of its "
        f"mean retention lies at or above {keep:g} (non-inferiority, margin {rules.retention_margin:g}); not "
        f"reproduced when the gain CI lies at or below 0 or the retention CI lies entirely below {keep:g}; "
        "otherwise inconclusive"
    )
    alt_gain, alt_ret = paper_gain(run), PAPER_TABLE2[run]["retention"]
    alternative = f"paper Table 2: GSM8K gain {alt_gain:+.3f}, retention {alt_ret:.4f}"
    if run not in report["meta"]["runs"]:
        return _verdict(finding, report, rule, None, alternative)
    claims = [
        claim("GSM8K gain", report["gains"][run]["gsm8k"], ">", 0.0, alt_gain, rules.level),
        claim("mean retention", report["table"][run]["retention"], ">=", keep, alt_ret, rules.level, 4),
    ]
    return _verdict(finding, report, rule, claims, alternative)


def verdict_f1(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """F1: mild SFT gains on GSM8K (gain CI > 0) without forgetting (retention CI >= 1 - margin)."""
    return _gain_keeps("F1", "sft_mild", report, rules)


def verdict_f4(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """F4: light RL gains on GSM8K (gain CI > 0) and keeps retention (retention CI >= 1 - margin)."""
    return _gain_keeps("F4", "rl", report, rules)


def verdict_f2(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """F2: stress SFT forgets (retention CI <= retention_loss) and does not gain GSM8K (gain CI <= 0)."""
    rule = _gate_rule("F2") + (
        f"reproduced when the {rules.level:.0%} CI of sft_stress's mean retention lies at or below "
        f"{rules.retention_loss:g} and the CI of its GSM8K gain over base lies at or below 0; not reproduced when "
        f"the retention CI lies above {rules.retention_loss:g} or the gain CI lies above 0; otherwise inconclusive"
    )
    alt_ret, alt_gain = PAPER_TABLE2["sft_stress"]["retention"], paper_gain("sft_stress")
    alternative = f"paper Table 2: retention {alt_ret:.4f}, GSM8K gain {alt_gain:+.3f}"
    if "sft_stress" not in report["meta"]["runs"]:
        return _verdict("F2", report, rule, None, alternative)
    claims = [
        claim("mean retention", report["table"]["sft_stress"]["retention"], "<=", rules.retention_loss, alt_ret, rules.level, 4),
        claim("GSM8K gain", report["gains"]["sft_stress"]["gsm8k"], "<=", 0.0, alt_gain, rules.level),
    ]
    return _verdict("F2", report, rule, claims, alternative)


def verdict_f3(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """F3: OPD from the degraded teacher beats the teacher on all three benchmarks (each gap CI > 0)."""
    rule = _gate_rule("F3") + (
        f"reproduced when the {rules.level:.0%} CI of opd_stress - teacher (paired items, seeds matched) lies "
        "above 0 on GSM8K, TruthfulQA and MMLU; not reproduced when any of the three CIs lies at or below 0; "
        "otherwise inconclusive"
    )
    alts = {c: PAPER_TABLE2["opd_stress"][c] - PAPER_TABLE2["sft_stress"][c] for c in COLUMNS}
    alternative = "paper Table 2: gaps " + ", ".join(f"{c} {v:+.3f}" for c, v in alts.items())
    gaps = report.get("teacher_gap")
    claims = None if gaps is None else [claim(f"{c} gap over teacher", gaps[c], ">", 0.0, alts[c], rules.level) for c in COLUMNS]
    return _verdict("F3", report, rule, claims, alternative)


def p4_delta(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any] | None:
    """P4's drift margin: delta = max(drift_relative_margin x |mean of the P4 runs' lexical MMD|, the noise
    floor's resolution max(|lo|, |hi|) of its CI): a difference the instrument cannot tell from 0 between
    two samples of ONE model cannot be called a difference. None when an MMD is missing."""
    means = [report["table"][r]["mmd_lexical"] for r in P4_RUNS]
    if any(m is None for m in means):
        return None
    center = sum(m["mean"] for m in means) / len(means)
    relative = rules.drift_relative_margin * abs(center)
    floor = (report.get("floor") or {}).get("mmd_lexical")
    resolution = max(abs(floor["lo"]), abs(floor["hi"])) if floor is not None else 0.0
    return {"delta": max(relative, resolution), "relative": relative, "mean_mmd": center, "floor_resolution": resolution,
            "source": "relative" if relative >= resolution else "noise floor"}


def verdict_p4(report: Mapping[str, Any], rules: ReportRules) -> dict[str, Any]:
    """P4: similar lexical drift (every pair's MMD-difference CI within +-delta) but different retention
    (the CI of R(pair[0]) - R(pair[1]) above 0, the pair fixed in advance in the rules)."""
    a, b = rules.p4_retention_pair
    rule = _gate_rule("P4") + (
        f"similar drift when, for every pair of {', '.join(P4_RUNS)}, the {rules.level:.0%} CI of the lexical-MMD "
        f"difference (paired over drift prompts and seeds) lies within +-delta, delta = max({rules.drift_relative_margin:g} "
        "x |mean lexical MMD of the three|, max(|lo|, |hi|) of the noise floor's CI); different drift when some "
        f"pair's CI lies entirely outside +-delta. Different retention when the CI of R({a}) - R({b}) lies above 0; "
        f"alike when it lies within +-{rules.retention_equivalence:g} (or at or below 0: the contrast reversed). "
        "Reproduced when drift is similar and retention differs; not reproduced when drift differs or retention "
        "is alike or reversed; otherwise inconclusive"
    )
    alt_ret = PAPER_TABLE2[a]["retention"] - PAPER_TABLE2[b]["retention"]
    alternative = f"paper Table 2: R({a}) - R({b}) = {alt_ret:+.4f}; every drift difference 0"
    p4 = report.get("p4")
    if p4 is None or any(r not in report["meta"]["runs"] for r in _NEEDED["P4"]):
        return _verdict("P4", report, rule, None, alternative)
    if p4["retention_pair"] != [a, b]:
        raise ValueError(f"report's P4 retention pair {p4['retention_pair']} != the rules' {[a, b]}: rebuild the report")
    delta = p4_delta(report, rules)
    if delta is None:
        pairs = [claim(f"lexical MMD {k}", None, "within", 0.0, 0.0, rules.level) for k in sorted(p4["mmd_differences"])]
    else:  # sorted: report.json's keys are sorted on disk, and the verdict must not depend on key order
        pairs = [claim(f"lexical MMD {k}", p4["mmd_differences"][k], "within", delta["delta"], 0.0, rules.level, 5)
                 for k in sorted(p4["mmd_differences"])]
    outcomes = [c["outcome"] for c in pairs]
    similar = True if all(o is True for o in outcomes) else False if any(o is False for o in outcomes) else None
    similar_claim = {
        "name": "similar drift", "op": "within (every pair)", "threshold": None if delta is None else delta["delta"],
        "alternative": 0.0, "estimate": None, "outcome": similar, "parts": pairs,
        "text": "similar drift: " + {True: "every pair within +-delta", False: "some pair entirely outside +-delta",
                                     None: "undecided"}[similar] + " (" + "; ".join(c["text"] for c in pairs) + ")",
        "power": _joint([c["power"] for c in pairs]),
    }
    retention = claim(f"retention R({a}) - R({b})", p4["retention_difference"], "differs", 0.0, alt_ret, rules.level, 4,
                      equivalence=rules.retention_equivalence)
    return _verdict("P4", report, rule, [similar_claim, retention], alternative, {"delta": delta})


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
