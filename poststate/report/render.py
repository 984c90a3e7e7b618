"""The report as markdown, from report.json alone (a pure function of it: the same report, the same bytes).

Sections: scoring choices; the Table 2 analog (the paper's values beside ours when `paper` is set); "Did
each method do its job?" (the validity gates); gains over base and OPD minus its teacher; drift, the noise
floor, forward KL and locality; P4's drift differences and retention contrast; compute accounting; the
interval widths with the first seed alone vs all seeds; flips; the verdicts with reason, rule and power.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from poststate.report.estimates import COLUMNS, RUN_LABELS, TABLE_CELLS
from poststate.report.rules import fmt, fmt_est

_CELLS = {  # table cell -> (header, digits)
    "gsm8k": ("GSM8K", 3),
    "truthfulqa": ("TruthfulQA", 3),
    "mmlu": ("MMLU", 3),
    "mmd_lexical": ("MMD (lexical)", 5),
    "forgetting": ("forgetting", 4),
    "retention": ("retention", 4),
}


def _label(run: str) -> str:
    return RUN_LABELS.get(run, run)


def _runs(report: Mapping[str, Any], section: Mapping[str, Any]) -> list[str]:
    """The runs of a section in the report's run order (report.json's keys are sorted on disk, so every
    loop follows meta.runs and lists: the markdown is the same from the report and from its JSON)."""
    return [r for r in report["meta"]["runs"] if r in section]


def _seeds(report: Mapping[str, Any], run: str, per_seed: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(s, per_seed[s]) for s in report["meta"]["seeds"].get(run, []) if s in per_seed]


def _sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _pct(p: float | None) -> str:
    return "—" if p is None else f"{p:.2f}"


def _p(p: float) -> str:
    return f"{p:.3f}"


def _scoring(report: Mapping[str, Any]) -> list[str]:
    meta = report["meta"]
    lines = ["## Scoring choices", ""]
    lines += [f"- {col} column: `{meta['columns'][col]}`" for col in COLUMNS]
    skip = {"runs", "seeds", "level", "columns", "intervals", "flops"}
    lines += [f"- {key}: `{meta[key]}`" for key in sorted(k for k in meta if k not in skip)]
    lines.append("- seeds: " + ", ".join(f"{_label(r)} {len(meta['seeds'][r]) if r != 'base' else 'one model'}" for r in meta["runs"]))
    lines.append(f"- intervals: {meta['level']:.0%}, {meta['intervals']}; every estimate in report.json states its "
                 "`design`")
    lines.append("- forgetting and retention: the paper's mean over TruthfulQA and MMLU of per-task values (base - run, "
                 "run / base), not a ratio of sums")
    return lines


def _table2(report: Mapping[str, Any]) -> list[str]:
    meta, paper = report["meta"], report["paper"]
    lines = ["## Table 2 analog", ""]
    lines.append("Each cell: mean [CI]" + (" (paper)" if paper is not None else "") + ". Intervals over seeds x items "
                 "(items only for a single seed and for the base); the paper reports one seed and no intervals.")
    lines += ["", "| run | seeds | " + " | ".join(_CELLS[c][0] for c in TABLE_CELLS) + " |",
              "|---|---|" + "---|" * len(TABLE_CELLS)]
    for run in meta["runs"]:
        cells = []
        for c in TABLE_CELLS:
            cell = fmt_est(report["table"][run][c], _CELLS[c][1])
            if paper is not None and paper.get(run, {}).get(c) is not None:
                cell += f" ({fmt(paper[run][c], _CELLS[c][1])})"
            cells.append(cell)
        n = "1" if run == "base" else str(len(meta["seeds"][run]))
        lines.append(f"| {_label(run)} | {n} | " + " | ".join(cells) + " |")
    return lines


def _gates(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Did each method do its job?", ""]
    lines.append("Each run's own objective on held-out items, measured before and after training (mean over seeds); "
                 "improvement = before - after when lower is better, after - before otherwise, per item, with its CI "
                 "over seeds x items; per seed its own items-only CI. A run is valid when its primary objective's "
                 "improvement CI lies above 0 on every seed (the pooled CI is shown, not required); a finding on an invalid "
                 "run is reported as "
                 "invalid.")
    lines += ["", "| run | objective | before → after | improvement [CI] | per seed | valid |", "|---|---|---|---|---|---|"]
    for run in _runs(report, report["gates"]):
        g = report["gates"][run]
        if g is None:
            lines.append(f"| {_label(run)} | — | — | — | — | no gate record |")
            continue
        for name in [g["primary"], *sorted(n for n in g["objectives"] if n != g["primary"])]:
            o, primary = g["objectives"][name], name == g["primary"]
            shown = name + ("" if primary else " (secondary)") + (f", = {_label(g['same_as'])}'s gate" if "same_as" in g else "")
            per_seed = "; ".join(f"s{s} {fmt_est(e, 4, signed=True)} {'pass' if e['passed'] else 'fail'}"
                                 + (f" ({e['dropped']} dropped)" if e["dropped"] else "") for s, e in _seeds(report, run, o["per_seed"]))
            valid = ("yes" if o["passed"] else "**no**") if primary else ("(yes)" if o["passed"] else "(no)")
            lines.append(f"| {_label(run)} | {shown} ({o['better']} is better) | {fmt(o['before'], 4)} → {fmt(o['after'], 4)} | "
                         f"{fmt_est(o['pooled'], 4, signed=True)} | {per_seed} | {valid} |")
    return lines


def _gains(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Gains over base", "", "Paired item differences run - base, over seeds x items.", "",
             "| run | " + " | ".join(_CELLS[c][0] for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for run in _runs(report, report["gains"]):
        g = report["gains"][run]
        lines.append(f"| {_label(run)} | " + " | ".join(fmt_est(g[c], 3, signed=True) for c in COLUMNS) + " |")
    if report.get("teacher_gap") is not None:
        lines += ["", "## OPD from the degraded teacher minus the teacher", "",
                  "Paired item differences opd_stress - teacher, seeds matched (OPD seed s learned from teacher seed s).", "",
                  "| benchmark | opd_stress − teacher |", "|---|---|"]
        lines += [f"| {_CELLS[c][0]} | {fmt_est(report['teacher_gap'][c], 3, signed=True)} |" for c in COLUMNS]
    return lines


def _drift(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Drift from the base, forward KL and locality", ""]
    lines.append("MMD²: the between-prompt U-statistic of each run's rollout states against the base's (drift "
                 "prompts i.i.d.), CI over seeds x drift prompts from its jackknife pseudo-values; p: each seed's "
                 "swap permutation test, and in brackets the Bonferroni combination over seeds, min(1, S min p), "
                 "valid under any dependence (every seed is compared with the same base sample). Forward KL(base ‖ "
                 "run) per token on the base's reference sequences. "
                 "Locality: the base's NLL of the tokens the run trained on minus its NLL of its own sample from the "
                 "same context (states nested in seeds).")
    lines += ["", "| run | MMD² lexical [CI] | p per seed [combined] | MMD² hidden [CI] | p per seed [combined] | forward KL [CI] | locality excess NLL [CI] |",
              "|---|---|---|---|---|---|---|"]
    for run in _runs(report, report["drift"]):
        d, cells = report["drift"][run], []
        for kind in ("mmd_lexical", "mmd_hidden"):
            est = d[kind]
            cells.append(fmt_est(est, 5, signed=True))
            cells.append("—" if est is None else ", ".join(_p(v["p_value"]) for _, v in _seeds(report, run, est["per_seed"]))
                         + f" [{_p(est['combined']['bonferroni_p'])}]")
        cells.append(fmt_est(d["kl_base_tuned"], 4))
        cells.append(fmt_est(d["locality"], 4, signed=True))
        lines.append(f"| {_label(run)} | " + " | ".join(cells) + " |")
    lines.append("")
    floor = report.get("floor") or {}
    for kind in ("mmd_lexical", "mmd_hidden"):
        est = floor.get(kind)
        if est is not None:
            lines.append(f"- noise floor ({kind}: the base against an independent second sample of itself): "
                         f"{fmt_est(est, 5, signed=True)}, p = {_p(est['p_value'])}; items only (drift prompts)")
    return lines


def _p4(report: Mapping[str, Any]) -> list[str]:
    p4 = report.get("p4")
    if p4 is None:
        return []
    v = report["verdicts"].get("P4", {})
    delta = v.get("delta")
    lines = ["## P4: drift differences and the retention contrast", ""]
    if delta is not None:
        lines.append(f"delta = max({report['rules']['drift_relative_margin']:g} x |mean lexical MMD| = "
                     f"{fmt(delta['relative'], 5)}, noise-floor resolution {fmt(delta['floor_resolution'], 5)}) = "
                     f"**{fmt(delta['delta'], 5)}** (set by the {'relative margin' if delta['source'] == 'relative' else 'noise floor'}).")
        lines.append("")
    lines += ["| contrast | estimate [CI] |", "|---|---|"]
    lines += [f"| lexical MMD² {k} | {fmt_est(p4['mmd_differences'][k], 5, signed=True)} |" for k in sorted(p4["mmd_differences"])]
    a, b = p4["retention_pair"]
    lines.append(f"| retention R({a}) − R({b}) (fixed in advance) | {fmt_est(p4['retention_difference'], 4, signed=True)} |")
    return lines


def _compute(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Compute", "", f"Mean over seeds of each run's counts; FLOPs estimated as {report['meta']['flops']}. "
             "The teacher is its stress-SFT run's model (no compute of its own); OPD's count excludes training its teacher.",
             "", "| run | kind | optimizer steps | training tokens | generated tokens | FLOPs training | FLOPs generation | FLOPs total |",
             "|---|---|---|---|---|---|---|---|"]
    for run in _runs(report, report["compute"]):
        c = report["compute"][run]
        m = c["mean"]
        lines.append(f"| {_label(run)} | {c['kind']} | {m['steps']:g} | {m['train_tokens']:g} | {m['generated_tokens']:g} | "
                     f"{_sci(m['flops_train'])} | {_sci(m['flops_generation'])} | {_sci(m['flops'])} |")
    return lines


def _widths(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Interval widths: the first seed alone vs all seeds", "",
             "Width (hi - lo) of each Table 2 cell's CI from the first seed alone (items only) and from all seeds "
             "(seeds x items).", "", "| run | seeds | " + " | ".join(_CELLS[c][0] for c in TABLE_CELLS) + " |",
             "|---|---|" + "---|" * len(TABLE_CELLS)]
    for run in _runs(report, report["widths"]):
        w, cells = report["widths"][run], []
        for c in TABLE_CELLS:
            one, every = w[c]["one_seed"], w[c]["all_seeds"]
            digits = _CELLS[c][1]
            cells.append("—" if one is None else f"{fmt(one, digits)} → {fmt(every, digits)}")
        seeds = "1 (one model)" if run == "base" else f"s{w['seed']} → {w['n_seeds']}"
        lines.append(f"| {_label(run)} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def _flips(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Flips vs base (mean over seeds)", "", "| run | benchmark | right→wrong | wrong→right | n |", "|---|---|---|---|---|"]
    for run in _runs(report, report["flips"]):
        for metric in sorted(report["flips"][run]):
            f = report["flips"][run][metric]
            lines.append(f"| {_label(run)} | {metric} | {f['right_to_wrong']:.1f} | {f['wrong_to_right']:.1f} | {f['n']} |")
    return lines


def _verdicts(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Verdicts", "", "Power: the probability that this design (the observed standard errors, the same "
             "interval multipliers) gives a CI on the claimed side when the truth is the paper's Table 2 effect; read "
             "an inconclusive verdict against it. Joint: the product over claims (treats them as independent).", ""]
    for finding in sorted(report["verdicts"]):
        v = report["verdicts"][finding]
        lines.append(f"- **{finding}** ({v['claim']}): **{v['verdict']}**. {v['reason']}.")
        lines.append(f"  - Rule: {v['rule']}.")
        if v["power"] is not None:
            parts = ", ".join(f"{c['name']} {_pct(c['power'])}" for c in v["claims"])
            lines.append(f"  - Power against {v['alternative']}: {parts}; joint {_pct(v['power']['joint'])}.")
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The whole report as markdown (every table; one entry per verdict with its reason, rule and power)."""
    sections = [
        ["# Table 2 analog: post-training is about states, not tokens"],
        _scoring(report), _table2(report), _gates(report), _gains(report), _drift(report), _p4(report),
        _compute(report), _widths(report), _flips(report), _verdicts(report),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
