"""Tests for poststate.report: the paper's formulas, every interval against `stats.seed_item_interval` on the
same arrays, the verdict rules (three-valued, invalid on a failed gate, P4 with its fixed pair), power
against hand computation, the markdown, the plots and the stage, on synthetic inputs built here."""

from __future__ import annotations

import copy
import json
import math
from statistics import NormalDist

import numpy as np
import pytest
from pydantic import ValidationError

from poststate import report as rep
from poststate.report import estimates as est_mod
from poststate.report import rules as rules_mod
from poststate.report.render import render_markdown
from poststate.stats import power_at, ratio_pseudovalues, seed_item_interval

RULES = rep.ReportRules()
N_ITEMS = {"gsm8k": 300, "truthfulqa": 200, "mmlu": 300}
BASE_LEVELS = {"gsm8k": 0.30, "truthfulqa": 0.50, "mmlu": 0.60}
# run -> target accuracy per benchmark (the paper's pattern: every finding reproduces)
PAPER_LIKE = {
    "sft_mild": {"gsm8k": 0.40, "truthfulqa": 0.50, "mmlu": 0.60},
    "sft_stress": {"gsm8k": 0.24, "truthfulqa": 0.35, "mmlu": 0.45},
    "teacher": "sft_stress",
    "opd_stress": {"gsm8k": 0.33, "truthfulqa": 0.48, "mmlu": 0.58},
    "opd_mild": {"gsm8k": 0.38, "truthfulqa": 0.50, "mmlu": 0.59},
    "opd_teacher_states": {"gsm8k": 0.30, "truthfulqa": 0.47, "mmlu": 0.57},
    "rl": {"gsm8k": 0.37, "truthfulqa": 0.50, "mmlu": 0.60},
}
MMD = {"sft_mild": 0.004, "sft_stress": 0.010, "teacher": 0.010, "opd_stress": 0.0101, "opd_mild": 0.012,
       "opd_teacher_states": 0.006, "rl": 0.0099}
P = 48  # drift prompts


def _flip_to(rng, y: np.ndarray, target: int) -> np.ndarray:
    """Flip random items of a 0/1 vector until it has `target` ones."""
    y = y.copy()
    ones, zeros = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if target > len(ones):
        y[rng.choice(zeros, target - len(ones), replace=False)] = 1
    elif target < len(ones):
        y[rng.choice(ones, len(ones) - target, replace=False)] = 0
    return y


def _scores_from(items: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for metric, table in items.items():
        out[metric] = float(np.mean(list(table.values())))
    return out


def _drift_record(rng, mu: float, with_run: bool = True, n_loc: int = 40) -> dict:
    pseudo = mu + rng.normal(0, 0.002, P) + np.linspace(-0.001, 0.001, P)
    rec = {}
    for kind, scale in (("mmd_lexical", 1.0), ("mmd_hidden", 2.0)):
        ps = (pseudo * scale).tolist()
        rec[kind] = {"mmd2": float(np.mean(ps)), "se": float(np.std(ps, ddof=1) / math.sqrt(P)), "pseudo": ps,
                     "prompts": list(range(P)), "p_value": 0.001 if mu > 0.002 else 0.4, "bandwidth": 1.0, "n_perm": 999,
                     "n_states": [4 * P, 4 * P], "estimator": "between-prompt U"}
    if with_run:
        kl = (0.05 + 10 * mu + rng.normal(0, 0.01, 30)).tolist()
        rec["kl_base_tuned"] = {"mean": float(np.mean(kl)), "pseudo": kl}
        loc = (0.2 + rng.normal(0, 0.1, n_loc)).tolist()
        rec["locality"] = {"excess": float(np.mean(loc)), "pseudo": loc, "trained_nll": 1.5, "own_nll": 1.3}
    return rec


def _gate(rng, run: str, ok: bool) -> dict:
    if run == "rl":
        before = rng.integers(0, 2, 64).astype(float)
        after = np.clip(before + (rng.random(64) < (0.3 if ok else 0.0)), 0, 1)
        greedy_b = rng.integers(0, 2, 64).astype(float)
        objs = {"reward_sampled": {"better": "higher", "items": [f"prompts_heldout/{i}" for i in range(64)],
                                   "before": before.tolist(), "after": after.tolist()},
                "reward_greedy": {"better": "higher", "items": [f"prompts_heldout/{i}" for i in range(64)],
                                  "before": greedy_b.tolist(), "after": greedy_b.tolist()}}
        return {"primary": "reward_sampled", "objectives": objs}
    name = "heldout_nll" if run.startswith("sft") else "heldout_teacher_ce"
    before = 1.0 + rng.normal(0, 0.2, 80)
    after = before - (0.1 if ok else -0.02) + rng.normal(0, 0.05, 80)
    b, a = before.tolist(), after.tolist()
    if name == "heldout_teacher_ce":
        a[3] = float("nan")  # a prompt whose continuations were all empty: dropped, counted
    return {"primary": name, "objectives": {name: {"better": "lower", "items": [f"held/{i}" for i in range(80)],
                                                   "before": b, "after": a}}}


def make_inputs(seeds=(0, 1, 2), levels=None, failing_gate: tuple[str, int] | None = None, mmd=None,
                seed: int = 7) -> rep.ReportInputs:
    """Synthetic report inputs: items flipped from the base to exact target levels, with seed-specific churn;
    drift pseudo-values around the given MMDs; gates that pass (or fail on one run's seed)."""
    levels = levels or PAPER_LIKE
    mmd = mmd or MMD
    rng = np.random.default_rng(seed)
    base_bits = {b: _flip_to(rng, np.zeros(n, dtype=int), round(BASE_LEVELS[b] * n)) for b, n in N_ITEMS.items()}
    mc2_base = rng.random(N_ITEMS["truthfulqa"])

    def items_of(bits: dict[str, np.ndarray], mc2: np.ndarray) -> dict[str, dict[str, float]]:
        return {
            "gsm8k_strict": {f"gsm8k/{i}": float(v) for i, v in enumerate(bits["gsm8k"])},
            "gsm8k_flexible": {f"gsm8k/{i}": float(v) for i, v in enumerate(bits["gsm8k"])},
            "truthfulqa_mc1": {f"truthfulqa/{i}": float(v) for i, v in enumerate(bits["truthfulqa"])},
            "truthfulqa_mc2": {f"truthfulqa/{i}": float(v) for i, v in enumerate(mc2)},
            "mmlu_acc": {f"mmlu/{i}": float(v) for i, v in enumerate(bits["mmlu"])},
        }

    items = {"base": {None: items_of(base_bits, mc2_base)}}
    scores = {"base": {None: _scores_from(items["base"][None])}}
    drift = {"base": {None: _drift_record(rng, 0.0, with_run=False)}}
    gates, compute = {}, {}
    for run, target in levels.items():
        if isinstance(target, str):  # the teacher: a copy of its source run
            continue
        items[run], scores[run], drift[run] = {}, {}, {}
        for s in seeds:
            bits = {}
            for b, n in N_ITEMS.items():
                t = round(target[b] * n) + (s % 3) - 1  # seed-to-seed spread of one item either way
                y = _flip_to(rng, base_bits[b], t)
                churn = rng.choice(n, 6, replace=False)  # swap a few items, level unchanged
                ones, zeros = [i for i in churn if y[i] == 1][:2], [i for i in churn if y[i] == 0][:2]
                k = min(len(ones), len(zeros))
                y[ones[:k]], y[zeros[:k]] = 0, 1
                bits[b] = y
            mc2 = np.clip(mc2_base + rng.normal(0, 0.05, N_ITEMS["truthfulqa"]), 0, 1)
            items[run][s] = items_of(bits, mc2)
            drift[run][s] = _drift_record(rng, mmd[run])
            scores[run][s] = _scores_from(items[run][s])
            ok = failing_gate != (run, s)
            gates.setdefault(run, {})[s] = _gate(rng, run, ok)
            kind = "sft" if run.startswith("sft") else "rl" if run == "rl" else "opd"
            compute.setdefault(run, {})[s] = {"kind": kind, "steps": 10, "states": 100, "train_tokens": 1000,
                                              "generated_tokens": 0 if kind == "sft" else 500,
                                              "parameters": 1000, "trainable_parameters": 100}
    for run, source in levels.items():
        if isinstance(source, str):
            items[run], scores[run] = copy.deepcopy(items[source]), copy.deepcopy(scores[source])
            drift[run] = copy.deepcopy(drift[source])
    return rep.ReportInputs(scores=scores, items=items, drift=drift, gates=gates, compute=compute)


@pytest.fixture(scope="module")
def inputs() -> rep.ReportInputs:
    return make_inputs()


@pytest.fixture(scope="module")
def report(inputs) -> dict:
    return rep.build_report(inputs, RULES, paper_rows=rep.PAPER_TABLE2, meta={"profile": "test"})


def roundtrip(report: dict) -> dict:
    return json.loads(json.dumps(report, sort_keys=True, indent=2))


# ---------------------------------------------------------------- the paper's formulas, rules, items


def test_paper_stress_row_retention_and_forgetting():
    base, post = {"truthfulqa": 0.300, "mmlu": 0.436}, {"truthfulqa": 0.245, "mmlu": 0.364}
    assert rep.mean_retention(base, post) == pytest.approx(0.8258, abs=5e-5)
    assert rep.mean_forgetting(base, post) == pytest.approx(0.0635, abs=1e-12)
    assert (0.245 + 0.364) / (0.300 + 0.436) == pytest.approx(0.8274, abs=5e-5)  # a ratio of sums would differ
    with pytest.raises(ValueError, match="base score is 0"):
        rep.retention(0.0, 0.3)


@pytest.mark.parametrize("run", ["sft_mild", "sft_stress", "opd_mild", "opd_stress", "rl", "teacher"])
def test_paper_table_rows_are_consistent_with_the_formulas(run):
    base, row = rep.PAPER_TABLE2["base"], rep.PAPER_TABLE2[run]
    assert rep.mean_retention(base, row) == pytest.approx(row["retention"], abs=5e-5)
    assert rep.mean_forgetting(base, row) == pytest.approx(row["forgetting"], abs=5e-5)


def test_rules_are_typed_frozen_and_checked():
    with pytest.raises(ValidationError, match="retention_kep"):
        rep.ReportRules(retention_kep=0.9)
    with pytest.raises(ValidationError, match="drift_band"):
        rep.ReportRules(drift_band=0.25)  # removed: P4's drift rule is the +-delta equivalence now
    with pytest.raises(ValidationError, match="level"):
        rep.ReportRules(level=1.5)
    with pytest.raises(ValidationError, match="retention_loss=0.98"):
        rep.ReportRules(retention_loss=0.98)
    with pytest.raises(ValidationError, match="two different runs"):
        rep.ReportRules(p4_retention_pair=["rl", "rl"])
    with pytest.raises(ValidationError, match="p4_retention_pair"):
        rep.ReportRules(p4_retention_pair=["rl", "sft_mild"])
    with pytest.raises(ValidationError):
        RULES.level = 0.9
    assert RULES.retention_keep == pytest.approx(0.97)
    assert rep.ReportRules.model_validate(RULES.model_dump(mode="json")) == RULES


def test_item_scores_from_evaluation_records():
    records = {
        "gsm8k": [{"id": "gsm8k/0", "correct": True, "flexible_correct": True}, {"id": "gsm8k/1", "correct": False, "flexible_correct": True}],
        "truthfulqa": [{"id": "truthfulqa/0", "correct": False, "mc2": 0.4}],
        "mmlu": [{"id": "mmlu/0", "correct": True}],
    }
    assert rep.item_scores(records)["gsm8k_flexible"] == {"gsm8k/0": 1.0, "gsm8k/1": 1.0}
    assert rep.item_scores(records)["truthfulqa_mc2"] == {"truthfulqa/0": 0.4}
    with pytest.raises(KeyError, match="mmlu"):
        rep.item_scores({k: v for k, v in records.items() if k != "mmlu"})
    with pytest.raises(ValueError, match="duplicate item id 'mmlu/0'"):
        rep.item_scores({**records, "mmlu": records["mmlu"] * 2})


# ---------------------------------------------------------------- intervals = seed_item_interval on the same arrays


def _Y(inp, run, metric, seeds=(0, 1, 2)):
    ids = sorted(inp.items["base"][None][metric], key=str)
    return np.array([[inp.items[run][s][metric][i] for i in ids] for s in seeds])


def _b(inp, metric):
    return _Y(inp, "base", metric, seeds=(None,))[0]


def _same(est, ref):
    for key in ("mean", "lo", "hi", "se"):
        assert est[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), key
    assert est["n_seeds"] == ref["n_seeds"] and est["design"].endswith(ref["design"])


def test_levels_gains_gaps_forgetting_retention_are_seed_item_intervals(inputs, report):
    y, b = _Y(inputs, "sft_mild", "gsm8k_strict"), _b(inputs, "gsm8k_strict")
    _same(report["table"]["sft_mild"]["gsm8k"], seed_item_interval([(y, 1.0)]))
    _same(report["gains"]["sft_mild"]["gsm8k"], seed_item_interval([(y - b, 1.0)]))
    _same(report["table"]["base"]["mmlu"], seed_item_interval([(_b(inputs, "mmlu_acc")[None, :], 1.0)]))
    gap = _Y(inputs, "opd_stress", "mmlu_acc") - _Y(inputs, "teacher", "mmlu_acc")
    _same(report["teacher_gap"]["mmlu"], seed_item_interval([(gap, 1.0)]))
    tq, mm = ("truthfulqa_mc1", "mmlu_acc")
    forget = [(_b(inputs, m)[None, :] - _Y(inputs, "rl", m), 0.5) for m in (tq, mm)]
    _same(report["table"]["rl"]["forgetting"], seed_item_interval(forget))
    ret = [(ratio_pseudovalues(_Y(inputs, "rl", m), _b(inputs, m)), 0.5) for m in (tq, mm)]
    _same(report["table"]["rl"]["retention"], seed_item_interval(ret))
    # the estimate is the paper's mean of per-task ratios, averaged over seeds
    per_seed = [rep.mean_retention({"truthfulqa": _b(inputs, tq).mean(), "mmlu": _b(inputs, mm).mean()},
                                   {"truthfulqa": _Y(inputs, "rl", tq)[s].mean(), "mmlu": _Y(inputs, "rl", mm)[s].mean()})
                for s in range(3)]
    assert report["table"]["rl"]["retention"]["mean"] == pytest.approx(np.mean(per_seed), rel=1e-12)
    diff = [(ratio_pseudovalues(_Y(inputs, "rl", m), _b(inputs, m)) - ratio_pseudovalues(_Y(inputs, "sft_stress", m), _b(inputs, m)), 0.5)
            for m in (tq, mm)]
    _same(report["p4"]["retention_difference"], seed_item_interval(diff))


def test_the_truthfulqa_column_can_be_mc2(inputs):
    rules = rep.ReportRules(truthfulqa_metric="truthfulqa_mc2")
    got = est_mod.retention_interval(inputs, "opd_mild", rules)
    strata = [(ratio_pseudovalues(_Y(inputs, "opd_mild", m), _b(inputs, m)), 0.5) for m in ("truthfulqa_mc2", "mmlu_acc")]
    _same(got, seed_item_interval(strata))
    assert est_mod.level_interval(inputs, "base", "truthfulqa", rules)["mean"] == pytest.approx(_b(inputs, "truthfulqa_mc2").mean())


def test_drift_floor_kl_locality_are_seed_item_intervals(inputs, report):
    pseudo = np.array([inputs.drift["rl"][s]["mmd_lexical"]["pseudo"] for s in (0, 1, 2)])
    _same(report["table"]["rl"]["mmd_lexical"], seed_item_interval([(pseudo, 1.0)]))
    _same(report["drift"]["rl"]["mmd_lexical"], seed_item_interval([(pseudo, 1.0)]))
    other = np.array([inputs.drift["sft_stress"][s]["mmd_lexical"]["pseudo"] for s in (0, 1, 2)])
    _same(report["p4"]["mmd_differences"]["sft_stress - rl"], seed_item_interval([(other - pseudo, 1.0)]))
    floor = np.array([inputs.drift["base"][None]["mmd_hidden"]["pseudo"]])
    _same(report["floor"]["mmd_hidden"], seed_item_interval([(floor, 1.0)]))
    assert report["floor"]["mmd_hidden"]["design"].endswith("items only, conditional on the one training seed")
    kl = np.array([inputs.drift["rl"][s]["kl_base_tuned"]["pseudo"] for s in (0, 1, 2)])
    _same(report["drift"]["rl"]["kl_base_tuned"], seed_item_interval([(kl, 1.0)]))
    # locality: nested in seeds -> Student-t over the three seed means (df 2)
    means = [np.mean(inputs.drift["rl"][s]["locality"]["pseudo"]) for s in (0, 1, 2)]
    loc = report["drift"]["rl"]["locality"]
    half = 4.302652729911275 * np.std(means, ddof=1) / math.sqrt(3)
    assert (loc["mean"], loc["lo"], loc["hi"]) == pytest.approx((np.mean(means), np.mean(means) - half, np.mean(means) + half), rel=1e-9)
    assert "nested" in loc["design"] and loc["n_items"] == 120


def test_drift_per_seed_p_values_and_combined_statement(report):
    d = report["drift"]["rl"]["mmd_lexical"]
    assert [v["p_value"] for v in d["per_seed"].values()] == [0.001, 0.001, 0.001]
    assert d["combined"]["seeds_rejecting"] == 3 and d["combined"]["bonferroni_p"] == pytest.approx(0.003)
    assert "3 of 3 seeds reject" in d["combined"]["statement"]


def test_gates_per_seed_and_pooled_with_dropped_items(inputs, report):
    g = report["gates"]["opd_stress"]
    o = g["objectives"]["heldout_teacher_ce"]
    raw = [inputs.gates["opd_stress"][s]["objectives"]["heldout_teacher_ce"] for s in (0, 1, 2)]
    imp = np.array([np.array(r["before"]) - np.array(r["after"]) for r in raw])  # lower is better
    keep = np.all(np.isfinite(imp), axis=0)
    _same(o["pooled"], seed_item_interval([(imp[:, keep], 1.0)]))
    _same(o["per_seed"]["1"], seed_item_interval([(imp[1, np.isfinite(imp[1])][None, :], 1.0)]))
    assert o["pooled"]["dropped"] == 1 and o["per_seed"]["0"]["dropped"] == 1 and g["passed"] is True
    assert o["before"] == pytest.approx(np.mean([np.nanmean(np.where(np.isfinite(imp[s]), r["before"], np.nan)) for s, r in enumerate(raw)]))
    rl = report["gates"]["rl"]["objectives"]["reward_sampled"]
    r0 = inputs.gates["rl"][0]["objectives"]["reward_sampled"]
    assert rl["per_seed"]["0"]["mean"] == pytest.approx(np.mean(np.array(r0["after"]) - np.array(r0["before"])))  # higher is better
    assert report["gates"]["teacher"]["same_as"] == "sft_stress"
    assert report["gates"]["teacher"]["objectives"] == report["gates"]["sft_stress"]["objectives"]


def test_one_seed_is_items_only_and_widths_compare_with_all_seeds(inputs, report):
    single = rep.build_report(make_inputs(seeds=(0,)), RULES)
    for cell in ("gsm8k", "retention", "mmd_lexical"):
        assert single["table"]["rl"][cell]["design"].endswith("items only, conditional on the one training seed")
        assert single["widths"]["rl"][cell]["one_seed"] == single["widths"]["rl"][cell]["all_seeds"]
    one = est_mod.retention_interval(inputs, "rl", RULES, seeds=[0])
    w = report["widths"]["rl"]["retention"]
    assert w["one_seed"] == pytest.approx(one["hi"] - one["lo"], rel=1e-12)
    assert w["all_seeds"] == pytest.approx(report["table"]["rl"]["retention"]["hi"] - report["table"]["rl"]["retention"]["lo"])
    assert (report["widths"]["rl"]["seed"], report["widths"]["rl"]["n_seeds"]) == ("0", 3)
    assert "crossed seeds x items" in report["table"]["rl"]["retention"]["design"]


def test_compute_flops_by_hand(report):
    c = report["compute"]["opd_stress"]["mean"]
    assert c["flops_train"] == 1000 * (4 * 1000 + 2 * 100)
    assert c["flops_generation"] == 500 * 2 * 1000
    assert c["flops"] == c["flops_train"] + c["flops_generation"]
    assert "teacher" not in report["compute"]


def test_bad_inputs_fail_naming_the_problem(inputs):
    with pytest.raises(KeyError, match="'base'"):
        rep.build_report(rep.ReportInputs(scores={"rl": inputs.scores["rl"]}, items=inputs.items), RULES)
    bad = copy.deepcopy(inputs)
    del bad.items["rl"][1]["mmlu_acc"]["mmlu/7"]
    with pytest.raises(ValueError, match=r"rl/1/mmlu_acc: mean of items"):
        rep.build_report(bad, RULES)
    bad = copy.deepcopy(inputs)
    bad.drift["rl"][2]["mmd_lexical"]["prompts"] = list(range(1, P + 1))
    with pytest.raises(ValueError, match="drift rl/2/mmd_lexical: drift prompts differ"):
        rep.build_report(bad, RULES)
    bad = copy.deepcopy(inputs)
    bad.gates["rl"][1]["objectives"]["reward_sampled"]["items"][0] = "other/0"
    with pytest.raises(ValueError, match="gate rl/1/reward_sampled: items or direction differ"):
        rep.build_report(bad, RULES)
    bad = copy.deepcopy(inputs)
    bad.gates["sft_mild"][0]["objectives"]["heldout_nll"]["better"] = "smaller"
    with pytest.raises(ValueError, match="better = 'smaller'"):
        rep.build_report(bad, RULES)
    bad = copy.deepcopy(inputs)
    del bad.scores["teacher"][2], bad.items["teacher"][2]
    with pytest.raises(ValueError, match="cannot match the seeds of 'opd_stress'"):
        rep.build_report(bad, RULES)


# ---------------------------------------------------------------- verdicts from report.json


def test_paper_like_inputs_reproduce_every_finding_and_verdicts_recompute_from_json(report):
    assert {f: v["verdict"] for f, v in report["verdicts"].items()} == {f: rep.REPRODUCED for f in rep.FINDINGS}
    loaded = roundtrip(report)
    rules = rep.ReportRules.model_validate(loaded["rules"])
    for finding in rep.FINDINGS:
        assert rep.verdict_for(finding, loaded, rules) == loaded["verdicts"][finding], finding


def test_a_gate_failing_on_one_seed_makes_its_findings_invalid():
    report = rep.build_report(make_inputs(failing_gate=("rl", 1)), RULES)
    verdicts = {f: v["verdict"] for f, v in report["verdicts"].items()}
    assert verdicts == {"F1": rep.REPRODUCED, "F2": rep.REPRODUCED, "F3": rep.REPRODUCED, "F4": rep.INVALID, "P4": rep.INVALID}
    g = report["gates"]["rl"]["objectives"]["reward_sampled"]
    assert [e["passed"] for e in g["per_seed"].values()] == [True, False, True] and report["gates"]["rl"]["passed"] is False
    reason = report["verdicts"]["F4"]["reason"]
    assert "rl did not pass its gate" in reason and "seed 1" in reason and "FAIL" in reason
    assert rules_mod.fmt(g["per_seed"]["1"]["mean"], 4, signed=True) in reason
    # the claims and their power are still reported beside the invalid verdict
    assert report["verdicts"]["F4"]["claims"] and report["verdicts"]["F4"]["power"]["joint"] is not None


def test_a_gate_needs_every_seed_not_only_the_pooled_interval(inputs):
    """Seed 1's items are noisy enough that its own CI straddles 0 while the pooled CI lies above 0: not valid."""
    rng = np.random.default_rng(3)
    gates = {}
    for s, sd in ((0, 0.05), (1, 0.40), (2, 0.05)):
        imp = rng.normal(0, sd, 80)
        imp += 0.05 - imp.mean()  # every seed improves by exactly 0.05 on average
        before = 1.0 + rng.normal(0, 0.2, 80)
        gates[s] = {"primary": "heldout_nll", "objectives": {"heldout_nll": {
            "better": "lower", "items": [f"held/{i}" for i in range(80)], "before": before.tolist(), "after": (before - imp).tolist()}}}
    g = est_mod.gate_summary(rep.ReportInputs(scores=inputs.scores, items=inputs.items, gates={"sft_mild": gates}), "sft_mild", RULES)
    o = g["objectives"]["heldout_nll"]
    assert o["pooled"]["lo"] > 0 and o["pooled"]["passed"] is True
    assert [e["passed"] for e in o["per_seed"].values()] == [True, False, True]
    assert o["per_seed"]["1"]["mean"] == pytest.approx(0.05) and g["passed"] is False


def test_the_teachers_gate_is_its_source_runs():
    report = rep.build_report(make_inputs(failing_gate=("sft_stress", 0)), RULES)
    assert report["verdicts"]["F3"]["verdict"] == rep.INVALID and "sft_stress did not pass" in report["verdicts"]["F3"]["reason"]
    assert report["verdicts"]["F2"]["verdict"] == rep.INVALID and report["verdicts"]["F1"]["verdict"] == rep.REPRODUCED
    no_gates = copy.deepcopy(make_inputs())
    del no_gates.gates["sft_mild"]
    v = rep.build_report(no_gates, RULES)["verdicts"]["F1"]
    assert v["verdict"] == rep.INVALID and "sft_mild: no gate record" in v["reason"]


def test_findings_not_reproduced_when_the_pattern_is_absent():
    levels = copy.deepcopy(PAPER_LIKE)
    levels["sft_mild"] = {"gsm8k": 0.30, "truthfulqa": 0.40, "mmlu": 0.50}  # no gain, forgets
    levels["sft_stress"] = {"gsm8k": 0.40, "truthfulqa": 0.50, "mmlu": 0.60}  # gains, keeps
    levels["opd_stress"] = {"gsm8k": 0.30, "truthfulqa": 0.40, "mmlu": 0.50}  # below the (now good) teacher
    report = rep.build_report(make_inputs(levels=levels), RULES)
    verdicts = {f: v["verdict"] for f, v in report["verdicts"].items()}
    assert verdicts["F1"] == verdicts["F2"] == verdicts["F3"] == rep.NOT_REPRODUCED
    assert verdicts["P4"] == rep.NOT_REPRODUCED  # R(rl) - R(sft_stress) ~ 0: alike
    assert "alike" in report["verdicts"]["P4"]["reason"]


def est(mean, lo, hi, se=None, t=1.96):
    return {"mean": mean, "lo": lo, "hi": hi, "se": (hi - lo) / (2 * t) if se is None else se, "t": t, "n_seeds": 1}


@pytest.mark.parametrize(
    "op, ci, threshold, expected",
    [
        (">", (0.01, 0.03), 0.0, True), (">", (-0.01, 0.03), 0.0, None), (">", (-0.03, 0.0), 0.0, False),
        (">=", (0.97, 0.99), 0.97, True), (">=", (0.95, 0.99), 0.97, None), (">=", (0.90, 0.969), 0.97, False),
        ("<=", (0.80, 0.90), 0.90, True), ("<=", (0.85, 0.95), 0.90, None), ("<=", (0.91, 0.95), 0.90, False),
        ("within", (-0.002, 0.003), 0.004, True), ("within", (-0.002, 0.005), 0.004, None),
        ("within", (0.005, 0.009), 0.004, False), ("within", (-0.009, -0.0045), 0.004, False),
    ],
)
def test_claims_are_three_valued_on_the_ci(op, ci, threshold, expected):
    assert rules_mod.claim("x", est(sum(ci) / 2, *ci), op, threshold, 0.0, 0.95)["outcome"] is expected


@pytest.mark.parametrize(
    "ci, expected, word",
    [((0.05, 0.20), True, "differ"), ((-0.01, 0.015), False, "alike"), ((-0.10, -0.02), False, "reversed"),
     ((-0.05, 0.10), None, "undecided")],
)
def test_p4_retention_contrast(ci, expected, word):
    c = rules_mod.claim("R(rl) - R(sft_stress)", est(sum(ci) / 2, *ci), "differs", 0.0, 0.1644, 0.95, equivalence=0.02)
    assert c["outcome"] is expected and word in c["text"]


def _p4_fragment(diffs, ret, mmd_means=(0.010, 0.010, 0.010), floor=(-0.001, 0.001)):
    runs = ["base", "sft_stress", "opd_stress", "rl"]
    passed = {"passed": True}
    return {
        "meta": {"runs": runs},
        "table": {r: {"mmd_lexical": None if r == "base" else est(m, m - 0.001, m + 0.001)}
                  for r, m in zip(runs, (0.0, *mmd_means))},
        "floor": {"mmd_lexical": est(0.0, *floor)},
        "gates": {r: passed for r in runs[1:]},
        "p4": {"runs": runs[1:], "retention_pair": ["rl", "sft_stress"], "retention_difference": est(sum(ret) / 2, *ret),
               "mmd_differences": {k: est(sum(ci) / 2, *ci) for k, ci in
                                   zip(("sft_stress - opd_stress", "sft_stress - rl", "opd_stress - rl"), diffs)}},
    }


@pytest.mark.parametrize(
    "diffs, ret, expected",
    [
        ([(-0.001, 0.001)] * 3, (0.05, 0.2), rep.REPRODUCED),
        ([(-0.001, 0.001), (-0.001, 0.001), (0.004, 0.006)], (0.05, 0.2), rep.NOT_REPRODUCED),  # a pair drifts apart
        ([(-0.001, 0.001)] * 3, (-0.01, 0.01), rep.NOT_REPRODUCED),  # retention alike
        ([(-0.001, 0.001), (-0.001, 0.001), (-0.001, 0.003)], (0.05, 0.2), rep.INCONCLUSIVE),  # crosses +-delta
        ([(-0.001, 0.001)] * 3, (-0.05, 0.1), rep.INCONCLUSIVE),
    ],
)
def test_p4_rule(diffs, ret, expected):
    v = rep.verdict_for("P4", _p4_fragment(diffs, ret), RULES)
    assert v["verdict"] == expected, v["reason"]
    assert v["delta"]["delta"] == pytest.approx(0.0025) and v["delta"]["source"] == "relative"  # 0.25 x 0.010 > floor 0.001


def test_p4_delta_is_the_noise_floor_when_drift_is_below_it():
    frag = _p4_fragment([(-0.001, 0.001)] * 3, (0.05, 0.2), mmd_means=(0.001, 0.0, -0.001), floor=(-0.0015, 0.003))
    d = rep.p4_delta(frag, RULES)
    assert d == {"delta": 0.003, "relative": 0.0, "mean_mmd": 0.0, "floor_resolution": 0.003, "source": "noise floor"}
    assert rep.verdict_for("P4", frag, RULES)["verdict"] == rep.REPRODUCED


def test_p4_uses_the_pair_fixed_in_the_rules(inputs):
    rules = rep.ReportRules(p4_retention_pair=["opd_stress", "sft_stress"])
    report = rep.build_report(inputs, rules)
    tq, mm = "truthfulqa_mc1", "mmlu_acc"
    diff = [(ratio_pseudovalues(_Y(inputs, "opd_stress", m), _b(inputs, m)) - ratio_pseudovalues(_Y(inputs, "sft_stress", m), _b(inputs, m)), 0.5)
            for m in (tq, mm)]
    _same(report["p4"]["retention_difference"], seed_item_interval(diff))
    assert report["verdicts"]["P4"]["claims"][1]["name"] == "retention R(opd_stress) - R(sft_stress)"
    assert report["verdicts"]["P4"]["claims"][1]["alternative"] == pytest.approx(0.9515 - 0.8258)
    with pytest.raises(ValueError, match="retention pair"):
        rep.verdict_for("P4", report, RULES)  # a report built under another pair is not re-judged silently


def test_missing_runs_are_inconclusive_not_a_crash(inputs):
    partial = rep.ReportInputs(**{k: {r: v for r, v in getattr(inputs, k).items() if r in ("base", "sft_mild")}
                                  for k in ("scores", "items", "drift", "gates", "compute")})
    report = rep.build_report(partial, RULES)
    assert report["verdicts"]["F1"]["verdict"] == rep.REPRODUCED
    for f in ("F2", "F3", "F4", "P4"):
        assert report["verdicts"][f]["verdict"] == rep.INCONCLUSIVE and "run missing" in report["verdicts"][f]["reason"]


# ---------------------------------------------------------------- power


def test_power_against_hand_computation():
    Phi, z = NormalDist().cdf, NormalDist().inv_cdf(0.975)
    # F1 gain: se 0.02 at the pure-item multiplier z, paper effect 0.512 - 0.448
    e = est(0.05, 0.05 - z * 0.02, 0.05 + z * 0.02, se=0.02, t=z)
    assert rules_mod.claim_power(e, ">", 0.0, 0.064, 0.95) == pytest.approx(Phi(0.064 / 0.02 - z), abs=1e-9)
    assert rules_mod.claim_power(e, ">", 0.0, 0.064, 0.95) == pytest.approx(power_at(0.02, 0.0, 0.064, ">"), abs=1e-9)
    # non-inferiority at 0.97 against the paper's 1.0008, with a seed-dominated multiplier 4.303
    e = est(1.0, 0.9, 1.1, se=0.01, t=4.303)
    assert rules_mod.claim_power(e, ">=", 0.97, 1.0008, 0.95) == pytest.approx(Phi(0.0308 / 0.01 - 4.303), abs=1e-9)
    # F2's two '<=' claims
    assert rules_mod.claim_power(e, "<=", 0.90, 0.8258, 0.95) == pytest.approx(Phi(0.0742 / 0.01 - 4.303), abs=1e-9)
    # P4 drift: both CI ends inside +-delta when the truth is 0: 2 Phi(delta / se - m) - 1, and 0 when impossible
    e = est(0.0, -0.002, 0.002, se=0.001, t=z)
    assert rules_mod.claim_power(e, "within", 0.004, 0.0, 0.95) == pytest.approx(2 * Phi(4 - z) - 1, abs=1e-9)
    assert rules_mod.claim_power(e, "within", 0.0015, 0.0, 0.95) == 0.0
    # P4 retention contrast: a '>' 0 claim against the paper's 0.9902 - 0.8258
    assert rules_mod.claim_power(e, "differs", 0.0, 0.1644, 0.95) == pytest.approx(Phi(0.1644 / 0.001 - z), abs=1e-9)
    # a multiplier beyond float resolution of the equivalent level (t with 1 df = 12.7)
    e = est(0.1, 0.0, 0.2, se=0.005, t=12.706)
    assert rules_mod.claim_power(e, ">", 0.0, 0.064, 0.95) == pytest.approx(Phi(0.064 / 0.005 - 12.706), abs=1e-9)
    assert rules_mod.claim_power(est(0.1, 0.1, 0.1, se=0.0, t=None), ">", 0.0, 0.064, 0.95) is None


def test_reported_power_uses_the_observed_se_and_multiplier(report):
    v = report["verdicts"]["F1"]
    gain = report["gains"]["sft_mild"]["gsm8k"]
    expected = NormalDist().cdf((0.512 - 0.448) / gain["se"] - gain["t"])
    assert v["claims"][0]["power"] == pytest.approx(expected, abs=1e-9)
    assert v["power"]["joint"] == pytest.approx(v["claims"][0]["power"] * v["claims"][1]["power"])
    assert v["claims"][1]["alternative"] == 1.0008 and v["claims"][1]["threshold"] == pytest.approx(0.97)
    f3 = report["verdicts"]["F3"]["claims"]
    assert [c["alternative"] for c in f3] == pytest.approx([0.046, 0.030, 0.066])
    assert report["verdicts"]["F4"]["claims"][0]["alternative"] == pytest.approx(0.024)
    assert report["verdicts"]["F2"]["claims"][1]["alternative"] == pytest.approx(-0.028)


# ---------------------------------------------------------------- markdown, plots, stage


def test_markdown_has_every_table_and_is_a_function_of_report_json(report):
    md = render_markdown(report)
    for heading in ("## Scoring choices", "## Table 2 analog", "## Did each method do its job?", "## Gains over base",
                    "## OPD from the degraded teacher minus the teacher", "## Drift from the base, forward KL and locality",
                    "## P4: drift differences and the retention contrast", "## Compute",
                    "## Interval widths: the first seed alone vs all seeds", "## Flips vs base", "## Verdicts"):
        assert heading in md, heading
    for run in rep.RUNS:
        assert rep.RUN_LABELS[run] in md, run
    assert "teacher-state control (OPD's teacher and loss, teacher's states)" in md
    assert "(0.4480)" not in md and "(0.448)" in md  # the paper's values beside ours
    for finding, v in report["verdicts"].items():
        assert f"**{finding}**" in md and v["rule"] in md
    assert "noise floor (mmd_lexical" in md and "Power against paper Table 2" in md
    assert render_markdown(roundtrip(report)) == md


def test_plots_are_deterministic_pngs(report, tmp_path):
    for plot in (rep.plot_gain_vs_retention, rep.plot_drift_vs_forgetting):
        a, b = tmp_path / f"{plot.__name__}_a.png", tmp_path / f"{plot.__name__}_b.png"
        plot(report, a)
        plot(roundtrip(report), b)
        assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.read_bytes() == b.read_bytes()
    curves = {"sft_mild": {"loss": [2.0, 1.5, 1.2]}, "rl": {"loss": [0.5, 0.4], "reward_mean": [0.1, 0.3]}}
    rep.plot_training_curves(curves, tmp_path / "c1.png")
    rep.plot_training_curves(curves, tmp_path / "c2.png")
    assert (tmp_path / "c1.png").read_bytes() == (tmp_path / "c2.png").read_bytes()


def _write_tree(root, inputs: rep.ReportInputs, params_text: str) -> None:
    def dump(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    for run, per_seed in inputs.scores.items():
        for seed in per_seed:
            d = root / "evals" / run if seed is None else root / "evals" / run / f"s{seed}"
            dump(d / "scores.json", inputs.scores[run][seed])
            dump(d / "drift.json", inputs.drift[run][seed])
            rows = []
            for metric, (bench, key) in est_mod.ITEM_FIELDS.items():
                for i, v in inputs.items[run][seed][metric].items():
                    rows.append((bench, i, key, v))
            recs: dict[tuple, dict] = {}
            for bench, i, key, v in rows:
                recs.setdefault((bench, i), {"benchmark": bench, "id": i})[key] = v
            (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs.values()))
    for run, per_seed in inputs.gates.items():
        for seed in per_seed:
            dump(root / "metrics/train" / run / f"s{seed}" / "gate.json", inputs.gates[run][seed])
            dump(root / "metrics/train" / run / f"s{seed}" / "compute.json", inputs.compute[run][seed])
    dump(root / "data/prepared/manifest.json", {"source": "synthetic"})
    (root / "params.yaml").write_text(params_text)


def test_stage_writes_the_report_and_names_a_missing_file(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["seeds"] = [0, 1, 2]
    _write_tree(tmp_path, make_inputs(), yaml.safe_dump(params, sort_keys=False))
    spec = importlib.util.spec_from_file_location("report_stage", repo / "stages/report.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(tmp_path)
    stage.main()
    written = json.loads((tmp_path / "metrics/report.json").read_text())
    assert {f: v["verdict"] for f, v in written["verdicts"].items()} == {f: rep.REPRODUCED for f in rep.FINDINGS}
    assert (tmp_path / "metrics/report.md").read_text() == render_markdown(written)
    assert sorted(p.name for p in (tmp_path / "metrics/plots").iterdir()) == [
        "drift_vs_forgetting.png", "gain_vs_retention.png", "training_curves.png"]
    (tmp_path / "metrics/train/opd_mild/s2/compute.json").unlink()
    with pytest.raises(FileNotFoundError, match="metrics/train/opd_mild/s2/compute.json"):
        stage.main()
