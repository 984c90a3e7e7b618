"""The report's numbers: every estimate with its interval and its sampling design, from plain loaded data.

Inputs (`ReportInputs`; `stages/report.py` reads them from the files named here), keyed run -> seed; the
base has exactly one entry (it is one model, not a training seed):
- scores[run][seed]: the flat `scores.json` of one evaluated model (harness scores, `_stderr`, `_n`, ...).
- items[run][seed][metric] = {item_id: float}: per-item scores (`item_scores` builds them from
  `items.jsonl`); 0/1 for accuracies, a float for truthfulqa_mc2. Each table's mean must equal the flat
  score (checked).
- drift[run][seed]: `drift.json` - {"mmd_lexical" | "mmd_hidden": `drift.drift_test` dict (mmd2, se, pseudo
  per drift prompt, prompts, p_value, ...), "kl_base_tuned": {"mean", "pseudo" per base-sample sequence},
  "locality": {"excess", "pseudo" per scored training state, "trained_nll", "own_nll"}}; the base's is the
  noise floor (the base against an independent second sample of itself; no KL, no locality).
- gates[run][seed]: `gate.json` (`gates.record`); the teacher has none of its own (`GATE_SOURCE`).
- compute[run][seed]: `compute.json` (`runs.write_compute`).

Interval design. Every interval is `stats.seed_item_interval` on per-item values U_SI (S training seeds x
I items), the seeds scored on the SAME items (crossed, not nested): 0/1 scores for a level; y_si - b_i for
a gain over the one base model; run_a - run_b item differences, seeds matched by seed number, for a gap;
`stats.ratio_pseudovalues` for a retention ratio; the drift test's jackknife pseudo-values per drift prompt
for an MMD (every seed's rollouts answer the same prompts and are compared with the same base sample);
the KL's ratio pseudo-values per base-sample sequence (the same sequences for every seed). Forgetting and
retention are two strata, TruthfulQA and MMLU, weight 1/2 each (the paper's mean of per-task values, not a
ratio of sums). With one seed the interval is items only, conditional on that seed, and its `design` says
so. One departure: the locality's training states are the run's own, different for every seed (nested in
seeds), so its interval is Student-t over the S seed means (the same function on the (1, S) row of seed
means; items only with one seed). Each estimate is a dict: mean, lo, hi, se, t (the interval's multiplier,
half-width / se), df, n_seeds, n_items, components {seed, item, residual}, design (what it is and how it
was sampled).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from poststate.params import ReportRules
from poststate.stats import flip_counts, ratio_pseudovalues, seed_item_interval

RUNS: tuple[str, ...] = (
    "base", "sft_mild", "sft_stress", "teacher", "opd_stress", "opd_mild", "opd_teacher_states", "rl",
)
RUN_LABELS: dict[str, str] = {
    "base": "base",
    "sft_mild": "mild SFT",
    "sft_stress": "stress SFT",
    "teacher": "degraded teacher (stress SFT)",
    "opd_stress": "OPD from stress SFT",
    "opd_mild": "OPD from mild SFT",
    "opd_teacher_states": "teacher-state control (OPD's teacher and loss, teacher's states)",
    "rl": "on-policy RL",
}
COLUMNS: tuple[str, ...] = ("gsm8k", "truthfulqa", "mmlu")
RETENTION_COLUMNS: tuple[str, ...] = ("truthfulqa", "mmlu")
TABLE_CELLS: tuple[str, ...] = ("gsm8k", "truthfulqa", "mmlu", "mmd_lexical", "forgetting", "retention")
DRIFT_KINDS: tuple[str, ...] = ("mmd_lexical", "mmd_hidden")
FLIP_METRICS: tuple[str, ...] = ("truthfulqa_mc1", "mmlu_acc")
P4_RUNS: tuple[str, ...] = ("sft_stress", "opd_stress", "rl")
GATE_SOURCE: dict[str, str] = {"teacher": "sft_stress"}  # the teacher IS its source SFT run's model (lineage)
# metric -> (benchmark, field of `evaluation.evaluate`'s per-item records)
ITEM_FIELDS: dict[str, tuple[str, str]] = {
    "gsm8k_strict": ("gsm8k", "correct"),
    "gsm8k_flexible": ("gsm8k", "flexible_correct"),
    "truthfulqa_mc1": ("truthfulqa", "correct"),
    "truthfulqa_mc2": ("truthfulqa", "mc2"),
    "mmlu_acc": ("mmlu", "correct"),
}
# FLOPs per token, as estimated here (docs/report.md): training forward 2N + backward 2N (activation
# gradients through every layer) + 2 N_trainable (weight gradients); generation (rollouts, teacher
# continuations) 2N per generated token with a KV cache; prefill of prompts and the gates/evals excluded.
FLOPS_NOTE = (
    "training (4N + 2N_trainable) x training tokens + generation 2N x generated tokens (rollouts and teacher "
    "continuations; N = the run's parameter count); prompt prefill, the gates and the evals excluded"
)


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report reads, keyed run -> seed (see the module docstring)."""

    scores: Mapping[str, Mapping[Hashable, Mapping[str, float]]]
    items: Mapping[str, Mapping[Hashable, Mapping[str, Mapping[Hashable, float]]]]
    drift: Mapping[str, Mapping[Hashable, Mapping[str, Any]]] = field(default_factory=dict)
    gates: Mapping[str, Mapping[Hashable, Mapping[str, Any]]] = field(default_factory=dict)
    compute: Mapping[str, Mapping[Hashable, Mapping[str, Any]]] = field(default_factory=dict)


# ---------------------------------------------------------------- the paper's formulas


def forgetting(score_base: float, score_post: float) -> float:
    """Forgetting on one retention task: F = score_base - score_post."""
    return score_base - score_post


def retention(score_base: float, score_post: float) -> float:
    """Retention ratio on one retention task: R = score_post / score_base."""
    if score_base == 0:
        raise ValueError("retention: the base score is 0, the ratio is undefined")
    return score_post / score_base


def mean_forgetting(base: Mapping[str, float], post: Mapping[str, float], tasks: Sequence[str] = RETENTION_COLUMNS) -> float:
    """The table's forgetting: mean over retention tasks of score_base - score_post."""
    return sum(forgetting(base[t], post[t]) for t in tasks) / len(tasks)


def mean_retention(base: Mapping[str, float], post: Mapping[str, float], tasks: Sequence[str] = RETENTION_COLUMNS) -> float:
    """The table's retention: mean over retention tasks of score_post / score_base (not a ratio of sums)."""
    return sum(retention(base[t], post[t]) for t in tasks) / len(tasks)


def item_scores(records: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per-metric item scores {metric: {item_id: float}} from one model's per-benchmark item records
    ({"gsm8k": [{"id", "correct", "flexible_correct", ...}], "truthfulqa": [{"id", "correct", "mc2"}],
    "mmlu": [{"id", "correct"}]}, as `evaluation.evaluate` returns them); see ITEM_FIELDS."""
    out: dict[str, dict[str, float]] = {}
    for metric, (bench, key) in ITEM_FIELDS.items():
        if bench not in records:
            raise KeyError(f"item records lack benchmark {bench!r} (have {sorted(records)})")
        table: dict[str, float] = {}
        for rec in records[bench]:
            if key not in rec:
                raise KeyError(f"{bench} item {rec.get('id')!r} has no field {key!r}")
            if rec["id"] in table:
                raise ValueError(f"duplicate item id {rec['id']!r} in {bench}")
            table[rec["id"]] = float(rec[key])
        out[metric] = table
    return out


# ---------------------------------------------------------------- intervals


def interval(strata: Sequence[tuple[np.ndarray, float]], level: float, what: str) -> dict[str, Any]:
    """`stats.seed_item_interval` on (U_SI, weight) strata, as a JSON-ready estimate whose `design` says
    what the number is (`what`) and how it was sampled (the interval's own design sentence)."""
    r = seed_item_interval([(np.asarray(U, dtype=np.float64), w) for U, w in strata], level)
    return {
        "mean": r["mean"], "lo": r["lo"], "hi": r["hi"], "se": r["se"], "t": r["t"], "df": r["df"],
        "n_seeds": r["n_seeds"], "n_items": r["n_items"], "components": r["components"],
        "design": f"{what}; {r['design']}",
    }


def _sorted(seeds) -> list:
    seeds = list(seeds)
    return sorted(seeds) if all(isinstance(s, int) for s in seeds) else sorted(seeds, key=str)


def run_seeds(inp: ReportInputs, run: str) -> list:
    """The run's seeds in order (the base: its one entry)."""
    if run not in inp.scores:
        raise KeyError(f"no scores for run {run!r} (have {sorted(inp.scores)})")
    seeds = _sorted(inp.scores[run])
    if not seeds:
        raise ValueError(f"run {run!r} has no seeds in scores")
    return seeds


def _base_seed(inp: ReportInputs) -> Hashable:
    (seed,) = run_seeds(inp, "base")
    return seed


def _table(inp: ReportInputs, run: str, seed: Hashable, metric: str) -> Mapping[Hashable, float]:
    """One run/seed/metric's item scores, checked against the flat score (their mean)."""
    try:
        table = inp.items[run][seed][metric]
    except KeyError as err:
        raise KeyError(f"items[{run!r}][{seed!r}] lacks {metric!r} (missing key {err})") from None
    if len(table) < 2:
        raise ValueError(f"items[{run!r}][{seed!r}][{metric!r}] has {len(table)} items; an interval needs >= 2")
    row = inp.scores[run][seed]
    if metric not in row:
        raise KeyError(f"scores[{run!r}][{seed!r}] has no {metric!r} (has {sorted(row)})")
    item_mean = sum(float(v) for v in table.values()) / len(table)
    if abs(item_mean - float(row[metric])) > 1e-6:
        raise ValueError(f"{run}/{seed}/{metric}: mean of items {item_mean:.6f} != score {float(row[metric]):.6f}")
    return table


def _ids(inp: ReportInputs, metric: str) -> list[Hashable]:
    """The items of a metric in a fixed order (the base's item ids, sorted as text)."""
    return sorted(_table(inp, "base", _base_seed(inp), metric), key=str)


def item_matrix(inp: ReportInputs, run: str, seeds: Sequence[Hashable], metric: str) -> np.ndarray:
    """(S, I) item scores of a run's seeds on the base's items, in `_ids` order (the same ids required)."""
    ids = _ids(inp, metric)
    rows = []
    for seed in seeds:
        table = _table(inp, run, seed, metric)
        if set(table) != set(ids):
            only_run = sorted(map(str, set(table) - set(ids)))[:5]
            only_base = sorted(map(str, set(ids) - set(table)))[:5]
            raise ValueError(f"{run}/{seed}/{metric}: item ids differ from the base's (only in run: {only_run}, only in base: {only_base})")
        rows.append([float(table[i]) for i in ids])
    return np.asarray(rows, dtype=np.float64)


def base_vector(inp: ReportInputs, metric: str) -> np.ndarray:
    """(I,) the base's item scores in `_ids` order."""
    return item_matrix(inp, "base", [_base_seed(inp)], metric)[0]


def _matched(inp: ReportInputs, run_a: str, run_b: str, seeds: Sequence[Hashable] | None) -> list[Hashable]:
    """The seeds of a seed-matched comparison a vs b (the same training seed numbers on both sides)."""
    seeds_a, seeds_b = run_seeds(inp, run_a), run_seeds(inp, run_b)
    if seeds_a != seeds_b:
        raise ValueError(f"cannot match the seeds of {run_a!r} {seeds_a} with {run_b!r} {seeds_b}")
    return list(seeds if seeds is not None else seeds_a)


def level_interval(inp: ReportInputs, run: str, column: str, rules: ReportRules, seeds=None) -> dict[str, Any]:
    """A table level: the run's mean item score on one column's metric."""
    metric = rules.metric_for(column)
    Y_SI = item_matrix(inp, run, seeds or run_seeds(inp, run), metric)
    return interval([(Y_SI, 1.0)], rules.level, f"{metric} of {run}, mean of per-item scores")


def gain_interval(inp: ReportInputs, run: str, column: str, rules: ReportRules, seeds=None) -> dict[str, Any]:
    """Gain over base on one column: paired item differences y_si - b_i (the base is one fixed model)."""
    metric = rules.metric_for(column)
    D_SI = item_matrix(inp, run, seeds or run_seeds(inp, run), metric) - base_vector(inp, metric)[None, :]
    return interval([(D_SI, 1.0)], rules.level, f"{metric} gain {run} - base, paired item differences")


def gap_interval(inp: ReportInputs, run_a: str, run_b: str, column: str, rules: ReportRules, seeds=None) -> dict[str, Any]:
    """Level difference a - b on one column: paired item differences, seeds matched by number (OPD seed s
    learned from teacher seed s)."""
    metric = rules.metric_for(column)
    seeds = _matched(inp, run_a, run_b, seeds)
    D_SI = item_matrix(inp, run_a, seeds, metric) - item_matrix(inp, run_b, seeds, metric)
    return interval([(D_SI, 1.0)], rules.level, f"{metric} gap {run_a} - {run_b}, paired item differences, seeds matched")


def forgetting_interval(inp: ReportInputs, run: str, rules: ReportRules, seeds=None) -> dict[str, Any]:
    """Mean forgetting: two strata (TruthfulQA, MMLU), weight 1/2, of paired item differences b_i - y_si."""
    seeds = seeds or run_seeds(inp, run)
    strata = []
    for c in RETENTION_COLUMNS:
        m = rules.metric_for(c)
        strata.append((base_vector(inp, m)[None, :] - item_matrix(inp, run, seeds, m), 0.5))
    return interval(strata, rules.level, f"mean forgetting of {run} (base - run, TruthfulQA and MMLU, weight 1/2 each), paired items")


def _retention_strata(inp: ReportInputs, run: str, seeds, rules: ReportRules) -> list[np.ndarray]:
    return [ratio_pseudovalues(item_matrix(inp, run, seeds, rules.metric_for(c)), base_vector(inp, rules.metric_for(c)))
            for c in RETENTION_COLUMNS]


def retention_interval(inp: ReportInputs, run: str, rules: ReportRules, seeds=None) -> dict[str, Any]:
    """Mean retention: two strata (TruthfulQA, MMLU), weight 1/2, of the ratio post / base on paired items,
    as delta-method pseudo-values (`stats.ratio_pseudovalues`; their row means are the per-seed ratios)."""
    strata = _retention_strata(inp, run, seeds or run_seeds(inp, run), rules)
    return interval([(U, 0.5) for U in strata], rules.level,
                    f"mean retention of {run} (run / base, TruthfulQA and MMLU, weight 1/2 each), delta-method pseudo-values per item")


def retention_difference(inp: ReportInputs, run_a: str, run_b: str, rules: ReportRules, seeds=None) -> dict[str, Any]:
    """R(a) - R(b), both against the base: per stratum the difference of the two runs' ratio pseudo-values,
    seeds matched by number."""
    seeds = _matched(inp, run_a, run_b, seeds)
    pairs = zip(_retention_strata(inp, run_a, seeds, rules), _retention_strata(inp, run_b, seeds, rules))
    return interval([(Ua - Ub, 0.5) for Ua, Ub in pairs], rules.level,
                    f"mean retention {run_a} - {run_b} (both against base), paired items, seeds matched")


# ---------------------------------------------------------------- drift


def _drift_record(inp: ReportInputs, run: str, seed: Hashable, key: str) -> Mapping[str, Any] | None:
    rec = inp.drift.get(run, {}).get(seed)
    if rec is None:
        return None
    return rec.get(key)


def _pseudo_matrix(inp: ReportInputs, run: str, seeds: Sequence[Hashable], kind: str) -> np.ndarray | None:
    """(S, P) jackknife pseudo-values per drift prompt, the same prompts for every seed (checked)."""
    recs = [_drift_record(inp, run, s, kind) for s in seeds]
    if all(r is None for r in recs):
        return None
    missing = [s for s, r in zip(seeds, recs) if r is None]
    if missing:
        raise KeyError(f"drift[{run!r}] lacks {kind!r} for seeds {missing} of {list(seeds)}")
    prompts = recs[0]["prompts"]
    for s, r in zip(seeds, recs):
        if r["prompts"] != prompts:
            raise ValueError(f"drift {run}/{s}/{kind}: drift prompts differ from seed {seeds[0]}'s")
        if len(r["pseudo"]) != len(prompts):
            raise ValueError(f"drift {run}/{s}/{kind}: {len(r['pseudo'])} pseudo-values for {len(prompts)} prompts")
        if abs(float(np.mean(r["pseudo"])) - float(r["mmd2"])) > 1e-9 * max(1.0, abs(float(r["mmd2"])) * len(prompts)):
            raise ValueError(f"drift {run}/{s}/{kind}: the pseudo-values' mean {np.mean(r['pseudo'])!r} != mmd2 {r['mmd2']!r}")
    return np.asarray([r["pseudo"] for r in recs], dtype=np.float64)


def drift_interval(inp: ReportInputs, run: str, kind: str, rules: ReportRules, seeds=None) -> dict[str, Any] | None:
    """A run's MMD^2 to the base's rollout states over seeds x drift prompts (None without drift records),
    with each seed's own permutation p-value and a combined statement."""
    seeds = seeds or run_seeds(inp, run)
    U_SP = _pseudo_matrix(inp, run, seeds, kind)
    if U_SP is None:
        return None
    est = interval([(U_SP, 1.0)], rules.level, f"{kind} MMD^2 of {run} to the base's rollout states, jackknife pseudo-values per drift prompt")
    alpha = 1.0 - rules.level
    per_seed = {}
    for s in seeds:
        r = _drift_record(inp, run, s, kind)
        per_seed[str(s)] = {"mmd2": float(r["mmd2"]), "se": float(r["se"]), "p_value": float(r["p_value"])}
    ps = [v["p_value"] for v in per_seed.values()]
    k, S = sum(p <= alpha for p in ps), len(ps)
    bonferroni = min(1.0, S * min(ps))
    est["per_seed"] = per_seed
    est["combined"] = {
        "alpha": alpha, "seeds_rejecting": k, "n_seeds": S, "bonferroni_p": bonferroni,
        "statement": (
            f"{k} of {S} seeds reject 'the same state distribution as the base' at alpha {alpha:.2g} (swap permutation "
            f"test per seed); Bonferroni over seeds p = {bonferroni:.3g} (valid under any dependence: every seed "
            "is compared with the same base sample)"
        ),
    }
    return est


def drift_difference(inp: ReportInputs, run_a: str, run_b: str, kind: str, rules: ReportRules, seeds=None) -> dict[str, Any] | None:
    """MMD^2(a) - MMD^2(b): pseudo-value differences paired per drift prompt (both against the same base
    sample) and per seed number."""
    seeds = _matched(inp, run_a, run_b, seeds)
    A_SP, B_SP = _pseudo_matrix(inp, run_a, seeds, kind), _pseudo_matrix(inp, run_b, seeds, kind)
    if A_SP is None or B_SP is None:
        return None
    if A_SP.shape != B_SP.shape:
        raise ValueError(f"{kind}: {run_a} has {A_SP.shape[1]} drift prompts, {run_b} {B_SP.shape[1]}")
    for s in seeds:
        if _drift_record(inp, run_a, s, kind)["prompts"] != _drift_record(inp, run_b, s, kind)["prompts"]:
            raise ValueError(f"{kind}: the drift prompts of {run_a} and {run_b} differ")
    return interval([(A_SP - B_SP, 1.0)], rules.level,
                    f"{kind} MMD^2 {run_a} - {run_b}, paired per drift prompt, seeds matched")


def floor_interval(inp: ReportInputs, kind: str, rules: ReportRules) -> dict[str, Any] | None:
    """The noise floor: MMD^2 of the base against an independent second sample of itself (items only: the
    drift prompts), with its p-value. Its CI is the drift instrument's resolution."""
    rec = _drift_record(inp, "base", _base_seed(inp), kind)
    if rec is None:
        return None
    est = interval([(np.asarray([rec["pseudo"]], dtype=np.float64), 1.0)], rules.level,
                   f"{kind} MMD^2 of the base against a second independent sample of itself (noise floor), jackknife pseudo-values per drift prompt")
    est["p_value"] = float(rec["p_value"])
    return est


def kl_interval(inp: ReportInputs, run: str, rules: ReportRules, seeds=None) -> dict[str, Any] | None:
    """Forward KL(base || run) per token on the base's reference sequences: ratio pseudo-values per
    sequence (token-pooled mean), the same sequences for every seed."""
    seeds = seeds or run_seeds(inp, run)
    recs = [_drift_record(inp, run, s, "kl_base_tuned") for s in seeds]
    if all(r is None for r in recs):
        return None
    if any(r is None for r in recs) or len({len(r["pseudo"]) for r in recs}) != 1:
        raise ValueError(f"drift[{run!r}] kl_base_tuned: missing for some seeds or of unequal lengths")
    return interval([(np.asarray([r["pseudo"] for r in recs]), 1.0)], rules.level,
                    f"forward KL(base || {run}) per token on the base's reference sequences, ratio pseudo-values per sequence")


def locality_interval(inp: ReportInputs, run: str, rules: ReportRules, seeds=None) -> dict[str, Any] | None:
    """Locality of the training states: the base's NLL of the trained tokens minus its NLL of its own sample
    from the same context, per scored training state. The states are the run's own, different for every
    seed (nested in seeds): one seed -> items only over its states; S >= 2 -> Student-t over the S seed
    means (`seed_item_interval` on the (1, S) row of seed means: df S - 1)."""
    seeds = seeds or run_seeds(inp, run)
    recs = [_drift_record(inp, run, s, "locality") for s in seeds]
    if all(r is None for r in recs):
        return None
    if any(r is None for r in recs):
        raise KeyError(f"drift[{run!r}] has locality for only some seeds of {list(seeds)}")
    what = f"locality of {run}'s training states: base NLL of trained tokens - of its own sample, per state"
    if len(seeds) == 1:
        est = interval([(np.asarray([recs[0]["pseudo"]]), 1.0)], rules.level, what)
    else:
        means = np.asarray([[float(np.mean(r["pseudo"])) for r in recs]])
        est = interval([(means, 1.0)], rules.level, what)
        est["design"] = (
            f"{what}; nested: each seed trained on its own states, so the {len(seeds)} seed means are the "
            f"independent units (Student-t, df {len(seeds) - 1})"
        )
        est["n_seeds"], est["n_items"] = len(seeds), int(sum(len(r["pseudo"]) for r in recs))
        est["components"] = {"seed": est["components"]["item"], "item": None, "residual": None}
    est["trained_nll"] = float(np.mean([r["trained_nll"] for r in recs]))
    est["own_nll"] = float(np.mean([r["own_nll"] for r in recs]))
    est["design"] += "; trained_nll and own_nll (its two terms): means over seeds, no interval"
    return est


# ---------------------------------------------------------------- validity gates


def improvement_values(objective: Mapping[str, Any]) -> np.ndarray:
    """Per item, how much the objective improved: before - after when lower is better, after - before
    when higher is (the same definition as `gates.improvement`). NaN where either side is NaN."""
    if objective.get("better") not in ("lower", "higher"):
        raise ValueError(f"gate objective: better = {objective.get('better')!r}, expected 'lower' or 'higher'")
    before = np.asarray(objective["before"], dtype=np.float64)
    after = np.asarray(objective["after"], dtype=np.float64)
    if before.shape != after.shape or before.shape != (len(objective["items"]),):
        raise ValueError(f"gate objective: {len(objective['items'])} items, {before.shape} before, {after.shape} after")
    return after - before if objective["better"] == "higher" else before - after


def gate_summary(inp: ReportInputs, run: str, rules: ReportRules) -> dict[str, Any] | None:
    """Did the run do its job? Per objective: each seed's improvement with its own items-only CI and the
    seed x item pooled CI (items NaN on any seed dropped, counted). The run passes when its primary
    objective's CI lies above 0 on EVERY seed: each seed is one run of the method, and the findings pool
    exactly these runs. The pooled CI (which, with few seeds, carries a t multiplier of 4.3 for 3 seeds and
    12.7 for 2 on the seed component) is reported beside it, not required. None without gate records."""
    per_seed = inp.gates.get(run)
    if not per_seed:
        return None
    seeds = _sorted(per_seed)
    first = per_seed[seeds[0]]
    primary = first["primary"]
    for s in seeds:
        if per_seed[s]["primary"] != primary or set(per_seed[s]["objectives"]) != set(first["objectives"]):
            raise ValueError(f"gate {run}/{s}: primary or objectives differ from seed {seeds[0]}'s")
    if primary not in first["objectives"]:
        raise KeyError(f"gate {run}: primary objective {primary!r} not among {sorted(first['objectives'])}")
    objectives = {}
    for name in first["objectives"]:
        obs = [per_seed[s]["objectives"][name] for s in seeds]
        rows = []
        for s, o in zip(seeds, obs):
            try:
                rows.append(improvement_values(o))
            except ValueError as err:
                raise ValueError(f"gate {run}/{s}/{name}: {err}") from None
            if list(o["items"]) != list(obs[0]["items"]) or o["better"] != obs[0]["better"]:
                raise ValueError(f"gate {run}/{s}/{name}: items or direction differ from seed {seeds[0]}'s")
        imp_SI = np.asarray(rows)  # (S, I) per-item improvement, items in the gate's order
        what = f"{run}'s held-out {name} improvement per item ({obs[0]['better']} is better)"
        seeds_out, ok = {}, []
        for k, (s, o) in enumerate(zip(seeds, obs)):
            keep = np.isfinite(imp_SI[k])
            if keep.sum() < 2:
                raise ValueError(f"gate {run}/{s}/{name}: {int(keep.sum())} items with finite before and after; need >= 2")
            est = interval([(imp_SI[k, keep][None, :], 1.0)], rules.level, what)
            est |= {"before": float(np.asarray(o["before"], dtype=np.float64)[keep].mean()),
                    "after": float(np.asarray(o["after"], dtype=np.float64)[keep].mean()),
                    "dropped": int((~keep).sum()), "passed": bool(est["lo"] > 0)}
            seeds_out[str(s)] = est
            ok.append(est["passed"])
        keep_I = np.all(np.isfinite(imp_SI), axis=0)
        if keep_I.sum() < 2:
            raise ValueError(f"gate {run}/{name}: {int(keep_I.sum())} items finite on every seed; need >= 2")
        pooled = interval([(imp_SI[:, keep_I], 1.0)], rules.level, what)
        pooled |= {"dropped": int((~keep_I).sum()), "passed": bool(pooled["lo"] > 0)}
        objectives[name] = {
            "better": obs[0]["better"],
            "before": float(np.mean([v["before"] for v in seeds_out.values()])),
            "after": float(np.mean([v["after"] for v in seeds_out.values()])),
            "per_seed": seeds_out,
            "pooled": pooled,
            "passed": all(ok),
        }
    return {"primary": primary, "seeds": [str(s) for s in seeds], "objectives": objectives,
            "passed": objectives[primary]["passed"]}


# ---------------------------------------------------------------- compute, flips


def flops(c: Mapping[str, Any]) -> dict[str, float]:
    """FLOPs of one training run from its compute.json (FLOPS_NOTE)."""
    for key in ("train_tokens", "generated_tokens", "parameters", "trainable_parameters", "steps"):
        if key not in c:
            raise KeyError(f"compute record lacks {key!r} (has {sorted(c)})")
    n, n_train = float(c["parameters"]), float(c["trainable_parameters"])
    train = float(c["train_tokens"]) * (4.0 * n + 2.0 * n_train)
    gen = float(c["generated_tokens"]) * 2.0 * n
    return {"flops_train": train, "flops_generation": gen, "flops": train + gen}


def compute_summary(inp: ReportInputs, run: str) -> dict[str, Any] | None:
    """Compute accounting of one run: counts and FLOPs per seed and their mean over seeds."""
    per_seed = inp.compute.get(run)
    if not per_seed:
        return None
    seeds = _sorted(per_seed)
    rows = {str(s): {k: per_seed[s][k] for k in ("kind", "steps", "states", "train_tokens", "generated_tokens",
                                                  "parameters", "trainable_parameters") if k in per_seed[s]}
            | flops(per_seed[s]) for s in seeds}
    keys = ("steps", "train_tokens", "generated_tokens", "flops_train", "flops_generation", "flops")
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
    return {"kind": per_seed[seeds[0]].get("kind"), "per_seed": rows, "mean": mean,
            "design": f"counts per seed (deterministic), mean over {len(seeds)} seed(s); FLOPs: {FLOPS_NOTE}"}


def _as_bool(table: Mapping[Hashable, float], where: str) -> dict[Hashable, bool]:
    out = {}
    for k, v in table.items():
        if float(v) not in (0.0, 1.0):
            raise ValueError(f"{where}: item {k!r} has score {v!r}, expected 0.0 or 1.0 for flip counts")
        out[k] = float(v) == 1.0
    return out


def flips(inp: ReportInputs, run: str) -> dict[str, dict[str, Any]]:
    """Per retention accuracy: right->wrong and wrong->right item counts against the base, per seed and
    their mean over seeds (counts, no interval)."""
    out = {}
    b = _base_seed(inp)
    for metric in FLIP_METRICS:
        base = _as_bool(_table(inp, "base", b, metric), f"base/{metric}")
        per_seed = {str(s): flip_counts(base, _as_bool(_table(inp, run, s, metric), f"{run}/{s}/{metric}"))
                    for s in run_seeds(inp, run)}
        out[metric] = {key: float(np.mean([c[key] for c in per_seed.values()])) for key in ("right_to_wrong", "wrong_to_right")}
        out[metric] |= {"n": next(iter(per_seed.values()))["n"], "per_seed": per_seed,
                        "design": "item counts per seed against the one base model on the same items; mean over seeds, no interval"}
    return out


# ---------------------------------------------------------------- the report's body


def table_row(inp: ReportInputs, run: str, rules: ReportRules, seeds=None) -> dict[str, Any]:
    """One Table 2 row: levels, lexical MMD, forgetting, retention (drift and retention None for the base)."""
    row: dict[str, Any] = {c: level_interval(inp, run, c, rules, seeds) for c in COLUMNS}
    if run == "base":
        return row | {"mmd_lexical": None, "forgetting": None, "retention": None}
    row["mmd_lexical"] = drift_interval(inp, run, "mmd_lexical", rules, seeds)
    if row["mmd_lexical"] is not None:
        row["mmd_lexical"] = {k: v for k, v in row["mmd_lexical"].items() if k not in ("per_seed", "combined")}
    row["forgetting"] = forgetting_interval(inp, run, rules, seeds)
    row["retention"] = retention_interval(inp, run, rules, seeds)
    return row


def _width(est: Mapping[str, Any] | None) -> float | None:
    return None if est is None else float(est["hi"] - est["lo"])


def estimate(
    inp: ReportInputs,
    rules: ReportRules,
    paper_rows: Mapping[str, Mapping[str, float | None]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every estimate of the report (no verdicts): JSON-serialisable, deterministic in its inputs.

    Runs absent from `inp.scores` are left out (their verdicts say "run missing"); the base is required
    and has exactly one entry. `meta` (scoring choices) is copied into report["meta"]."""
    if "base" not in inp.scores:
        raise KeyError("scores has no 'base' run; every comparison is against the base")
    if len(inp.scores["base"]) != 1:
        raise ValueError(f"the base must have exactly one entry, got {_sorted(inp.scores['base'])}")
    reserved = {"runs", "seeds", "level", "columns", "flops", "intervals"}
    clash = reserved & set(meta or {})
    if clash:
        raise ValueError(f"meta keys {sorted(clash)} are reserved by the report")
    runs = [r for r in RUNS if r in inp.scores] + sorted(r for r in inp.scores if r not in RUNS)
    trained = [r for r in runs if r != "base"]
    table = {r: table_row(inp, r, rules) for r in runs}
    widths = {}
    for r in runs:
        seeds = run_seeds(inp, r)
        one = table_row(inp, r, rules, seeds[:1]) if len(seeds) > 1 else table[r]
        widths[r] = {c: {"one_seed": _width(one[c]), "all_seeds": _width(table[r][c])} for c in TABLE_CELLS}
        widths[r]["seed"], widths[r]["n_seeds"] = ("-" if r == "base" else str(seeds[0])), len(seeds)
        widths[r]["design"] = "hi - lo of the cell's interval: the first seed alone (items only) vs all seeds (seeds x items)"
    drift = {
        r: {k: drift_interval(inp, r, k, rules) for k in DRIFT_KINDS}
        | {"kl_base_tuned": kl_interval(inp, r, rules), "locality": locality_interval(inp, r, rules)}
        for r in trained
    }
    floor = {k: floor_interval(inp, k, rules) for k in DRIFT_KINDS}
    p4 = None
    if all(r in inp.scores for r in P4_RUNS):
        pair = list(rules.p4_retention_pair)
        pairs = [(a, b) for i, a in enumerate(P4_RUNS) for b in P4_RUNS[i + 1:]]
        p4 = {
            "runs": list(P4_RUNS),
            "mmd_differences": {f"{a} - {b}": drift_difference(inp, a, b, "mmd_lexical", rules) for a, b in pairs},
            "retention_pair": pair,
            "retention_difference": retention_difference(inp, pair[0], pair[1], rules),
        }
    gates = {r: gate_summary(inp, GATE_SOURCE.get(r, r), rules) for r in trained}
    for r, source in GATE_SOURCE.items():
        if gates.get(r) is not None:
            gates[r] = gates[r] | {"same_as": source}
    return {
        "meta": dict(meta or {}) | {
            "runs": runs,
            "seeds": {r: ["-"] if r == "base" else [str(s) for s in run_seeds(inp, r)] for r in runs},
            "level": rules.level,
            "columns": {c: rules.metric_for(c) for c in COLUMNS},
            "intervals": (
                "stats.seed_item_interval: seeds x items crossed (the same eval items, drift prompts and base "
                "sequences for every training seed), two-way random-effects ANOVA variance; items only, "
                "conditional on the model, with one seed; locality nested in seeds (t over seed means)"
            ),
            "flops": FLOPS_NOTE,
        },
        "rules": rules.model_dump(mode="json"),
        "table": table,
        "gains": {r: {c: gain_interval(inp, r, c, rules) for c in COLUMNS} for r in trained},
        "teacher_gap": ({c: gap_interval(inp, "opd_stress", "teacher", c, rules) for c in COLUMNS}
                        if "opd_stress" in inp.scores and "teacher" in inp.scores else None),
        "drift": drift,
        "floor": floor,
        "p4": p4,
        "gates": gates,
        "compute": {r: c for r in runs if (c := compute_summary(inp, r)) is not None},
        "widths": widths,
        "flips": {r: flips(inp, r) for r in trained},
        "paper": {r: dict(v) for r, v in paper_rows.items()} if paper_rows is not None else None,
    }
