"""The report: the Table 2 analog, the diagnostics beyond it, and a rule-based verdict on each finding.

Four rooms: `estimates` (every number with its interval and sampling design, from the loaded inputs),
`rules` (the verdicts, from report.json and the rules alone, with validity gates and power), `render`
(the markdown) and `plots` (the PNGs). `build_report` is estimates, then verdicts. docs/report.md states
every rule, margin and the interval design.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from poststate.params import ReportRules
from poststate.report.estimates import (
    COLUMNS,
    FLOPS_NOTE,
    GATE_SOURCE,
    P4_RUNS,
    RETENTION_COLUMNS,
    RUN_LABELS,
    RUNS,
    TABLE_CELLS,
    ReportInputs,
    estimate,
    flops,
    forgetting,
    improvement_values,
    interval,
    item_scores,
    mean_forgetting,
    mean_retention,
    retention,
)
from poststate.report.plots import plot_drift_vs_forgetting, plot_gain_vs_retention, plot_training_curves
from poststate.report.render import render_markdown
from poststate.report.rules import (
    FINDING_RUNS,
    FINDINGS,
    INCONCLUSIVE,
    INVALID,
    NOT_REPRODUCED,
    PAPER_TABLE2,
    REPRODUCED,
    VERDICTS,
    all_verdicts,
    claim,
    claim_power,
    p4_delta,
    verdict_for,
)


def build_report(
    inputs: ReportInputs,
    rules: ReportRules,
    paper_rows: Mapping[str, Mapping[str, float | None]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json: every estimate (`estimates.estimate`), then one verdict per finding computed from that
    report and the rules alone (`rules.all_verdicts`). JSON-serialisable; the same inputs, the same bytes."""
    report = estimate(inputs, rules, paper_rows, meta)
    report["verdicts"] = all_verdicts(report, rules)
    return report


__all__ = [
    "COLUMNS", "FINDINGS", "FINDING_RUNS", "FLOPS_NOTE", "GATE_SOURCE", "INCONCLUSIVE", "INVALID", "NOT_REPRODUCED",
    "P4_RUNS", "PAPER_TABLE2", "REPRODUCED", "RETENTION_COLUMNS", "RUNS", "RUN_LABELS", "ReportInputs", "ReportRules",
    "TABLE_CELLS", "VERDICTS", "all_verdicts", "build_report", "claim", "claim_power", "estimate", "flops", "forgetting",
    "improvement_values", "interval", "item_scores", "mean_forgetting", "mean_retention", "p4_delta",
    "plot_drift_vs_forgetting", "plot_gain_vs_retention", "plot_training_curves", "render_markdown", "retention",
    "verdict_for",
]
