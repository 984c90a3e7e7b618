"""Tests for poststate.report: the paper's formulas, estimates with CIs, verdict rules, markdown, plots."""

import copy
import json

import pytest
from pydantic import ValidationError

from poststate.stats import flip_counts
from poststate.report import (
    PAPER_TABLE2,
    RUN_LABELS,
    ReportRules,
    all_verdicts,
    build_report,
    forgetting,
    item_scores,
    mean_forgetting,
    mean_retention,
    plot_drift_vs_forgetting,
    plot_gain_vs_retention,
    render_markdown,
    retention,
    verdict_f1,
    verdict_f2,
    verdict_f3,
    verdict_f4,
    verdict_for,
    verdict_p4,
)
from poststate.stats import binomial_stderr, normal_ci, paired_diff, paired_ratio, t_ci

RULES = ReportRules()

# ---------------------------------------------------------------- the paper's formulas


def test_paper_stress_row_retention_and_forgetting():
    base, post = {"truthfulqa": 0.300, "mmlu": 0.436}, {"truthfulqa": 0.245, "mmlu": 0.364}
    assert mean_retention(base, post) == pytest.approx(0.8258, abs=5e-5)
    assert mean_forgetting(base, post) == pytest.approx(0.0635, abs=1e-12)
    # the mean of per-task ratios, not the ratio of sums (which would be 0.8254)
    assert (0.245 + 0.364) / (0.300 + 0.436) == pytest.approx(0.8274, abs=5e-5)
    assert forgetting(0.300, 0.245) == pytest.approx(0.055)
    assert retention(0.436, 0.364) == pytest.approx(0.834862, abs=1e-6)


@pytest.mark.parametrize("run", ["sft_mild", "sft_stress", "opd_mild", "opd_stress", "rl", "teacher"])
def test_paper_table_rows_are_consistent_with_the_formulas(run):
    base, row = PAPER_TABLE2["base"], PAPER_TABLE2[run]
    assert mean_retention(base, row) == pytest.approx(row["retention"], abs=5e-5)
    assert mean_forgetting(base, row) == pytest.approx(row["forgetting"], abs=5e-5)


def test_retention_rejects_zero_base():
    with pytest.raises(ValueError, match="base score is 0"):
        retention(0.0, 0.3)


def test_rules_are_typed_frozen_and_checked():
    with pytest.raises(ValidationError, match="retention_kep"):
        ReportRules(retention_kep=0.9)
    with pytest.raises(ValidationError, match="level"):
        ReportRules(level=1.5)
    with pytest.raises(ValidationError, match="retention_loss=0.98"):
        ReportRules(retention_loss=0.98)
    with pytest.raises(ValidationError):
        RULES.level = 0.9
    assert ReportRules(truthfulqa_metric="truthfulqa_mc2").metric_for("truthfulqa") == "truthfulqa_mc2"
    assert "no forgetting" in ReportRules.model_fields["retention_keep"].description.lower()


def test_item_scores_from_evaluation_records():
    records = {
        "gsm8k": [{"id": "gsm8k/0", "correct": True, "flexible_correct": True}, {"id": "gsm8k/1", "correct": False, "flexible_correct": True}],
        "truthfulqa": [{"id": "truthfulqa/0", "correct": False, "mc2": 0.4}],
        "mmlu": [{"id": "mmlu/0", "correct": True}],
    }
    assert item_scores(records) == {
        "gsm8k_strict": {"gsm8k/0": 1.0, "gsm8k/1": 0.0},
        "gsm8k_flexible": {"gsm8k/0": 1.0, "gsm8k/1": 1.0},
        "truthfulqa_mc1": {"truthfulqa/0": 0.0},
        "truthfulqa_mc2": {"truthfulqa/0": 0.4},
        "mmlu_acc": {"mmlu/0": 1.0},
    }
    with pytest.raises(KeyError, match="mmlu"):
        item_scores({k: v for k, v in records.items() if k != "mmlu"})
    with pytest.raises(ValueError, match="duplicate item id 'mmlu/0'"):
        item_scores({**records, "mmlu": records["mmlu"] * 2})


# ---------------------------------------------------------------- verdict rules on hand-made numbers


def est(mean, lo, hi):
    return {"mean": mean, "lo": lo, "hi": hi, "n_seeds": 1, "ci": "test"}


def fragment(gains=None, retentions=None, teacher_gap=None, mmd=None, spread=None, runs=None):
    runs = runs or ["base", "sft_mild", "sft_stress", "teacher", "opd_stress", "opd_mild", "rl"]
    table = {r: {"retention": (retentions or {}).get(r), "mmd_lexical": (mmd or {}).get(r)} for r in runs}
    comparisons = {"gsm8k_gain": gains or {}}
    if teacher_gap is not None:
        comparisons["teacher_gap"] = teacher_gap
    if spread is not None:
        comparisons["p4_retention_spread"] = spread
    return {"meta": {"runs": runs}, "table": table, "comparisons": comparisons}


@pytest.mark.parametrize(
    "gain, ret, expected",
    [
        (est(0.06, 0.03, 0.09), est(1.00, 0.98, 1.02), "reproduced"),
        (est(0.06, 0.03, 0.09), est(0.97, 0.97, 0.99), "reproduced"),  # lower end exactly at keep
        (est(0.01, -0.02, 0.04), est(1.00, 0.98, 1.02), "inconclusive"),  # gain CI straddles 0
        (est(0.06, 0.03, 0.09), est(0.97, 0.95, 0.99), "inconclusive"),  # retention CI straddles 0.97
        (est(-0.03, -0.05, 0.0), est(1.00, 0.98, 1.02), "not reproduced"),  # gain CI at or below 0
        (est(0.06, 0.03, 0.09), est(0.93, 0.91, 0.96), "not reproduced"),  # retention below keep
        (est(0.01, -0.02, 0.04), est(0.93, 0.91, 0.96), "not reproduced"),  # one failure beats one straddle
        (est(0.06, None, None), est(1.00, 0.98, 1.02), "inconclusive"),  # no CI
    ],
)
def test_f1_and_f4_rules(gain, ret, expected):
    f1 = verdict_f1(fragment(gains={"sft_mild": gain}, retentions={"sft_mild": ret}), RULES)
    f4 = verdict_f4(fragment(gains={"rl": gain}, retentions={"rl": ret}), RULES)
    assert f1["verdict"] == expected and f4["verdict"] == expected
    assert "0.97" in f1["rule"] and f1["numbers"]["gsm8k_gain"] == gain


@pytest.mark.parametrize(
    "ret, gain, expected",
    [
        (est(0.83, 0.80, 0.86), est(-0.03, -0.05, -0.01), "reproduced"),
        (est(0.83, 0.80, 0.86), est(-0.03, -0.06, 0.01), "inconclusive"),  # gain CI straddles 0
        (est(0.90, 0.87, 0.93), est(-0.03, -0.05, -0.01), "inconclusive"),  # retention CI straddles 0.90
        (est(0.95, 0.92, 0.98), est(-0.03, -0.05, -0.01), "not reproduced"),  # retention above 0.90
        (est(0.83, 0.80, 0.86), est(0.05, 0.02, 0.08), "not reproduced"),  # it gains GSM8K
    ],
)
def test_f2_rule(ret, gain, expected):
    v = verdict_f2(fragment(gains={"sft_stress": gain}, retentions={"sft_stress": ret}), RULES)
    assert v["verdict"] == expected
    assert "0.9" in v["rule"]


@pytest.mark.parametrize(
    "gaps, expected",
    [
        ((est(0.05, 0.02, 0.08), est(0.03, 0.01, 0.05), est(0.06, 0.04, 0.08)), "reproduced"),
        ((est(0.05, 0.02, 0.08), est(0.01, -0.01, 0.03), est(0.06, 0.04, 0.08)), "inconclusive"),
        ((est(0.05, 0.02, 0.08), est(-0.03, -0.05, -0.01), est(0.06, 0.04, 0.08)), "not reproduced"),
    ],
)
def test_f3_rule(gaps, expected):
    report = fragment(teacher_gap=dict(zip(("gsm8k", "truthfulqa", "mmlu"), gaps)))
    assert verdict_f3(report, RULES)["verdict"] == expected


P4_MMD_SIMILAR = {"sft_stress": est(0.01093, None, None), "opd_stress": est(0.01092, None, None), "rl": est(0.01098, None, None)}


@pytest.mark.parametrize(
    "mmd, spread, expected",
    [
        (P4_MMD_SIMILAR, est(0.164, 0.12, 0.21), "reproduced"),
        (P4_MMD_SIMILAR, est(0.01, -0.01, 0.03), "inconclusive"),  # retention gap CI straddles
        (P4_MMD_SIMILAR, est(0.005, -0.005, 0.015), "not reproduced"),  # retention alike (CI < 0.02)
        ({**P4_MMD_SIMILAR, "rl": est(0.02, None, None)}, est(0.164, 0.12, 0.21), "not reproduced"),  # drift differs
        ({**P4_MMD_SIMILAR, "rl": None}, est(0.164, 0.12, 0.21), "inconclusive"),  # MMD not measured
    ],
)
def test_p4_rule(mmd, spread, expected):
    v = verdict_p4(fragment(mmd=mmd, spread={"runs": ["rl", "sft_stress"], **spread}), RULES)
    assert v["verdict"] == expected, v["reason"]
    if mmd["rl"] is not None:
        means = [m["mean"] for m in mmd.values()]
        assert v["numbers"]["mmd_relative_spread"] == pytest.approx((max(means) - min(means)) / (sum(means) / 3))


def test_missing_runs_are_inconclusive_not_a_crash():
    report = fragment(runs=["base", "sft_mild"], gains={"sft_mild": est(0.06, 0.03, 0.09)}, retentions={"sft_mild": est(1, 0.99, 1.01)})
    verdicts = all_verdicts(report, RULES)
    assert verdicts["F1"]["verdict"] == "reproduced"
    for finding in ("F2", "F3", "F4", "P4"):
        assert verdicts[finding]["verdict"] == "inconclusive"
        assert verdicts[finding]["reason"].startswith("run missing")
    assert "teacher" in verdicts["F3"]["reason"] and "rl" in verdicts["F4"]["reason"]
    with pytest.raises(KeyError, match="F9"):
        verdict_for("F9", report, RULES)


# ---------------------------------------------------------------- synthetic score tables through build_report

N = 1000
BASE_ONES = {"gsm8k_strict": 450, "gsm8k_flexible": 470, "truthfulqa_mc1": 300, "mmlu_acc": 440}
BENCH = {"gsm8k_strict": "gsm8k", "gsm8k_flexible": "gsm8k", "truthfulqa_mc1": "truthfulqa", "mmlu_acc": "mmlu"}


def _flip(bits, r2w, w2r):
    """Flip the first r2w ones to 0 and the first w2r zeros to 1 (deterministic)."""
    out = list(bits)
    ones = [i for i, b in enumerate(bits) if b][:r2w]
    zeros = [i for i, b in enumerate(bits) if not b][:w2r]
    for i in ones:
        out[i] = 0
    for i in zeros:
        out[i] = 1
    return out


BASE_BITS = {m: [1] * k + [0] * (N - k) for m, k in BASE_ONES.items()}


def _model(flips, extra=None, n=N):
    """(scores, items) of a model whose items are base's with (r2w, w2r) flips per metric."""
    scores, items = dict(extra or {}), {}
    for metric, base_bits in BASE_BITS.items():
        bits = _flip(base_bits[:n], *flips.get(metric, (0, 0)))
        items[metric] = {f"{BENCH[metric]}/{i}": float(b) for i, b in enumerate(bits)}
        scores[metric] = sum(bits) / n
        scores[f"{BENCH[metric]}_n"] = float(n)  # evaluation writes per-benchmark counts as floats
    mc2 = [0.1 + 0.5 * b for b in items["truthfulqa_mc1"].values()]
    items["truthfulqa_mc2"] = {k: v for k, v in zip(items["truthfulqa_mc1"], mc2)}
    scores["truthfulqa_mc2"] = sum(mc2) / n
    scores["truthfulqa_mc2_stderr"] = 0.01
    scores["gsm8k_noanswer"] = 0.05
    return scores, items


DIAG = {"mmd_hidden": 0.02, "kl_base_tuned": 0.1, "train_state_nll": 1.5}
SPECS = {
    "base": ({}, None),
    "sft_mild": ({"gsm8k_strict": (10, 90), "truthfulqa_mc1": (5, 5), "mmlu_acc": (5, 8)}, {"mmd_lexical": 0.00956, **DIAG}),
    "sft_stress": ({"gsm8k_strict": (40, 10), "truthfulqa_mc1": (60, 0), "mmlu_acc": (70, 0)}, {"mmd_lexical": 0.01093, **DIAG}),
    "teacher": ({"gsm8k_strict": (40, 10), "truthfulqa_mc1": (60, 0), "mmlu_acc": (70, 0)}, {"mmd_lexical": 0.01093, **DIAG}),
    "opd_stress": ({"gsm8k_strict": (10, 30), "truthfulqa_mc1": (15, 0), "mmlu_acc": (10, 0)}, {"mmd_lexical": 0.01092, **DIAG}),
    "opd_mild": ({"gsm8k_strict": (10, 70), "truthfulqa_mc1": (3, 0), "mmlu_acc": (1, 0)}, {"mmd_lexical": 0.0147, **DIAG}),
    "rl": ({"gsm8k_strict": (5, 40), "truthfulqa_mc1": (3, 3), "mmlu_acc": (2, 2)}, {"mmd_lexical": 0.01098, **DIAG}),
}


def _tables(specs=SPECS, seeds_of=None):
    scores, items = {}, {}
    for run, (flips, extra) in specs.items():
        for seed in (seeds_of or {}).get(run, [0]):
            s, it = _model(flips(seed) if callable(flips) else flips, extra)
            scores.setdefault(run, {})[seed] = s
            items.setdefault(run, {})[seed] = it
    return scores, items


@pytest.fixture(scope="module")
def single_seed_report():
    scores, items = _tables()
    return build_report(scores, items, RULES, PAPER_TABLE2, meta={"mmlu_style": "harness_0shot", "profile": "test"}), scores, items


def test_single_seed_report_numbers(single_seed_report):
    report, scores, items = single_seed_report
    z = normal_ci(0.0, 1.0, 0.95)[1]
    base = report["table"]["base"]["gsm8k"]
    assert base["mean"] == pytest.approx(0.45)
    assert base["hi"] - base["mean"] == pytest.approx(z * binomial_stderr(0.45, N))
    gain = report["comparisons"]["gsm8k_gain"]["sft_stress"]
    d, se = paired_diff(items["base"][0]["gsm8k_strict"], items["sft_stress"][0]["gsm8k_strict"])
    assert gain["mean"] == pytest.approx(-0.03) and d == pytest.approx(-0.03)
    assert (gain["lo"], gain["hi"]) == pytest.approx(normal_ci(-0.03, se))
    ret = report["table"]["sft_stress"]["retention"]
    assert ret["mean"] == pytest.approx((0.24 / 0.30 + 0.37 / 0.44) / 2)
    ses = [paired_ratio(items["sft_stress"][0][m], items["base"][0][m])[1] for m in ("truthfulqa_mc1", "mmlu_acc")]
    assert ret["hi"] - ret["mean"] == pytest.approx(z * (ses[0] ** 2 + ses[1] ** 2) ** 0.5 / 2)
    assert report["table"]["sft_stress"]["forgetting"]["mean"] == pytest.approx((0.06 + 0.07) / 2)
    assert report["table"]["sft_stress"]["mmd_lexical"] == {"mean": 0.01093, "lo": None, "hi": None, "n_seeds": 1, "ci": "none (one seed)"}
    assert report["diagnostics"]["rl"]["kl_base_tuned"]["mean"] == pytest.approx(0.1)
    flips = report["flips"]["sft_mild"]["mmlu_acc"]
    assert (flips["right_to_wrong"], flips["wrong_to_right"], flips["n"]) == (5, 8, N)
    gaps = report["comparisons"]["teacher_gap"]
    assert gaps["gsm8k"]["mean"] == pytest.approx(0.05) and gaps["mmlu"]["mean"] == pytest.approx(0.06)
    assert report["comparisons"]["p4_retention_spread"]["runs"] == ["rl", "sft_stress"]
    assert report["meta"]["mmlu_style"] == "harness_0shot"
    assert report["meta"]["columns"]["gsm8k"] == "gsm8k_strict"


def test_single_seed_report_verdicts_all_reproduced_and_recomputable(single_seed_report):
    report, _, _ = single_seed_report
    assert {f: v["verdict"] for f, v in report["verdicts"].items()} == {
        "F1": "reproduced",
        "F2": "reproduced",
        "F3": "reproduced",
        "F4": "reproduced",
        "P4": "reproduced",
    }
    loaded = json.loads(json.dumps(report, allow_nan=False))
    assert all_verdicts(loaded, ReportRules(**loaded["rules"])) == loaded["verdicts"]


def test_report_not_reproduced_and_inconclusive_from_score_tables():
    specs = dict(SPECS)
    # mild SFT that forgets: many TruthfulQA/MMLU right->wrong flips
    specs["sft_mild"] = ({"gsm8k_strict": (10, 90), "truthfulqa_mc1": (60, 0), "mmlu_acc": (60, 0)}, SPECS["sft_mild"][1])
    # RL with a small GSM8K gain whose CI straddles 0
    specs["rl"] = ({"gsm8k_strict": (10, 14), "truthfulqa_mc1": (3, 3), "mmlu_acc": (2, 2)}, SPECS["rl"][1])
    report = build_report(*_tables(specs), RULES)
    assert report["verdicts"]["F1"]["verdict"] == "not reproduced"
    assert report["verdicts"]["F4"]["verdict"] == "inconclusive"
    assert report["paper"] is None


def test_missing_runs_and_extra_runs_through_build_report():
    specs = {k: v for k, v in SPECS.items() if k not in ("teacher", "rl")}
    specs = {"opd_seqkd": SPECS["opd_mild"], **specs}  # an extra run is shown after the paper's runs
    report = build_report(*_tables(specs), RULES)
    assert report["meta"]["runs"] == ["base", "sft_mild", "sft_stress", "opd_stress", "opd_mild", "opd_seqkd"]
    assert "| offline SeqKD (control: teacher states) | 1 |" in render_markdown(report)
    for finding in ("F3", "F4", "P4"):
        assert report["verdicts"][finding]["verdict"] == "inconclusive"
        assert report["verdicts"][finding]["reason"].startswith("run missing")
    assert "teacher_gap" not in report["comparisons"]


def test_multi_seed_uses_t_across_seeds_and_pairs_teacher():
    seeds = [0, 1, 2]
    specs = dict(SPECS)
    specs["rl"] = (lambda s: {"gsm8k_strict": (5, 30 + 10 * s), "truthfulqa_mc1": (3 + s, 3), "mmlu_acc": (2, 2)}, SPECS["rl"][1])
    specs["opd_stress"] = (lambda s: {"gsm8k_strict": (10, 30 + 5 * s), "truthfulqa_mc1": (15, 0), "mmlu_acc": (10, 0)}, SPECS["opd_stress"][1])
    scores, items = _tables(specs, seeds_of={"rl": seeds, "opd_stress": seeds})
    report = build_report(scores, items, RULES)
    gains = [(25 + 10 * s) / N for s in seeds]
    g = report["comparisons"]["gsm8k_gain"]["rl"]
    assert (g["mean"], g["lo"], g["hi"]) == pytest.approx(t_ci(gains))
    assert g["n_seeds"] == 3 and g["ci"].startswith("t across 3")
    rets = [mean_retention({"truthfulqa": 0.3, "mmlu": 0.44}, {"truthfulqa": (300 - s) / N, "mmlu": 0.44}) for s in seeds]
    r = report["table"]["rl"]["retention"]
    assert (r["mean"], r["lo"], r["hi"]) == pytest.approx(t_ci(rets))
    # the single-seed teacher is shared by every opd_stress seed
    tg = report["comparisons"]["teacher_gap"]["gsm8k"]
    assert (tg["mean"], tg["lo"], tg["hi"]) == pytest.approx(t_ci([(470 + 5 * s - 420) / N for s in seeds]))
    assert report["meta"]["seeds"]["rl"] == ["0", "1", "2"]
    assert report["flips"]["rl"]["truthfulqa_mc1"]["right_to_wrong"] == pytest.approx(4.0)  # mean of 3, 4, 5


def test_build_report_fails_loudly_on_bad_inputs():
    scores, items = _tables()
    bad_items = copy.deepcopy(items)
    bad_items["sft_mild"][0]["mmlu_acc"]["mmlu/999"] = 1.0  # items no longer match the score
    with pytest.raises(ValueError, match="mean of items"):
        build_report(scores, bad_items, RULES)
    two_base = copy.deepcopy(scores)
    two_base["base"][1] = two_base["base"][0]
    with pytest.raises(ValueError, match="exactly one seed"):
        build_report(two_base, items, RULES)
    with pytest.raises(ValueError, match="reserved"):
        build_report(scores, items, RULES, meta={"runs": []})


def test_mc2_column_uses_the_evaluation_stderr():
    rules = ReportRules(truthfulqa_metric="truthfulqa_mc2")
    scores, items = _tables()
    report = build_report(scores, items, rules)
    tqa = report["table"]["base"]["truthfulqa"]
    assert tqa["mean"] == pytest.approx(0.1 + 0.5 * 0.3)
    assert (tqa["lo"], tqa["hi"]) == pytest.approx(normal_ci(0.25, 0.01))
    mc2_ret = [paired_ratio(items[r][0]["truthfulqa_mc2"], items["base"][0]["truthfulqa_mc2"])[0] for r in ("sft_stress",)]
    assert report["table"]["sft_stress"]["retention"]["mean"] == pytest.approx((mc2_ret[0] + 0.37 / 0.44) / 2)
    assert set(report["flips"]["sft_stress"]) == {"truthfulqa_mc1", "mmlu_acc"}  # flips need 0/1 items


def test_flip_counts_in_report_match_drift(single_seed_report):
    report, _, items = single_seed_report
    base = {k: v == 1.0 for k, v in items["base"][0]["truthfulqa_mc1"].items()}
    run = {k: v == 1.0 for k, v in items["sft_stress"][0]["truthfulqa_mc1"].items()}
    assert report["flips"]["sft_stress"]["truthfulqa_mc1"]["per_seed"]["0"] == flip_counts(base, run)


# ---------------------------------------------------------------- markdown and plots


def test_render_contains_rows_verdicts_and_scoring(single_seed_report):
    report, _, _ = single_seed_report
    md = render_markdown(report)
    for run in report["meta"]["runs"]:
        assert f"| {RUN_LABELS[run]} |" in md
    for finding in ("F1", "F2", "F3", "F4", "P4"):
        line = next(l for l in md.splitlines() if l.startswith(f"- **{finding}**"))
        assert "**reproduced**" in line and "Rule:" in line
    assert "mmlu_style: `harness_0shot`" in md
    assert "gsm8k column: `gsm8k_strict`" in md
    assert "0.450 [" in md and "(0.448)" in md  # ours with CI, the paper's beside it
    assert "0.01093 (0.01093)" in md
    assert "| sft_stress | truthfulqa_mc1 |" not in md  # labels, not ids
    assert "| stress SFT | truthfulqa_mc1 | 60 | 0 | 1000 |" in md
    assert "MMD (hidden)" in md and "forward KL" in md and "train-state NLL" in md


def test_plots_are_deterministic_pngs(single_seed_report, tmp_path):
    report, _, _ = single_seed_report
    for plot in (plot_gain_vs_retention, plot_drift_vs_forgetting):
        a, b = tmp_path / f"{plot.__name__}_a.png", tmp_path / f"{plot.__name__}_b.png"
        plot(report, a)
        plot(report, b)
        data = a.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert data == b.read_bytes()
        assert b"Software" not in data and b"matplotlib" not in data.lower()
