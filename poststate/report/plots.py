"""The report's three plots, from report.json (and the training curves), as deterministic PNG bytes.

Each run has one fixed colour and marker (`STYLE`), identified in a legend beside the axes, so labels never
overlap however close the points lie; reference lines are legend entries too. Figures are drawn with
matplotlib's object API on the Agg canvas (no pyplot state) and saved without the Software/date tag, so
the same report gives the same bytes (with the same matplotlib and fonts).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from poststate.report.estimates import RUN_LABELS

STYLE: dict[str, tuple[str, str]] = {  # run -> (colour, marker)
    "sft_mild": ("#1f77b4", "o"),
    "sft_stress": ("#d62728", "s"),
    "teacher": ("#ff9896", "x"),
    "opd_stress": ("#2ca02c", "^"),
    "opd_mild": ("#98df8a", "v"),
    "opd_teacher_states": ("#9467bd", "D"),
    "rl": ("#ff7f0e", "P"),
}
_FALLBACK = ("#7f7f7f", "*")


def _wrap(label: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(label, width))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})


def _err(est: Mapping[str, Any]) -> tuple[float, list[list[float]]]:
    return est["mean"], [[est["mean"] - est["lo"]], [est["hi"] - est["mean"]]]


def _scatter(points: Sequence[tuple[str, Mapping, Mapping]], guides: Sequence[tuple[str, float, str]],
             xlabel: str, ylabel: str, title: str, path, band: tuple[float, float, str] | None = None) -> None:
    """One point per run with its CI bars in both directions, a legend (run markers, then guides) to the
    right of the axes; guides: ("v" | "h", position, legend label); band: (lo, hi, label) shaded in x."""
    fig = _figure(8.4, 4.6)
    ax = fig.add_axes((0.10, 0.12, 0.52, 0.78))
    if band is not None:
        ax.axvspan(band[0], band[1], color="#dddddd", zorder=0, label=band[2])
    for run, x_est, y_est in points:
        colour, marker = STYLE.get(run, _FALLBACK)
        x, xerr = _err(x_est)
        y, yerr = _err(y_est)
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt=marker, color=colour, ecolor=colour, elinewidth=1,
                    capsize=3, markersize=7, label=_wrap(RUN_LABELS.get(run, run)), zorder=3)
    for (kind, value, text), style in zip(guides, ("--", ":", "-.")):
        (ax.axvline if kind == "v" else ax.axhline)(value, color="grey", linestyle=style, linewidth=0.9, label=text, zorder=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    run_labels = [_wrap(RUN_LABELS.get(run, run)) for run, _, _ in points]
    order = sorted(range(len(labels)), key=lambda i: (labels[i] not in run_labels, i))  # runs first, then guides
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left", bbox_to_anchor=(1.02, 1.0),
              fontsize=8, frameon=False, borderaxespad=0.0, labelspacing=0.6)
    _save(fig, path)


def plot_gain_vs_retention(report: Mapping[str, Any], path) -> None:
    """PNG: mean retention (x) vs GSM8K gain over base (y), one point per post-trained run with CI bars;
    guides: no gain, the non-inferiority bound (1 - retention_margin) and the 'forgets' bound."""
    points = [(r, report["table"][r]["retention"], report["gains"][r]["gsm8k"]) for r in report["meta"]["runs"] if r != "base"]
    rules = report["rules"]
    guides = [
        ("h", 0.0, "no GSM8K gain"),
        ("v", 1.0 - rules["retention_margin"], f"keeps retention: {1.0 - rules['retention_margin']:g} (F1, F4)"),
        ("v", rules["retention_loss"], f"forgets: {rules['retention_loss']:g} (F2)"),
    ]
    _scatter(points, guides, "mean retention (TruthfulQA, MMLU)", "GSM8K gain over base", "Gain vs retention", path)


def plot_drift_vs_forgetting(report: Mapping[str, Any], path) -> None:
    """PNG: lexical MMD² to the base's rollout states (x) vs mean forgetting (y), one point per run that has
    an MMD; the noise floor's CI (the base against a second sample of itself) shaded."""
    points = [(r, report["table"][r]["mmd_lexical"], report["table"][r]["forgetting"])
              for r in report["meta"]["runs"] if r != "base" and report["table"][r]["mmd_lexical"] is not None]
    floor = (report.get("floor") or {}).get("mmd_lexical")
    band = None if floor is None else (floor["lo"], floor["hi"], "noise floor CI (base vs base)")
    _scatter(points, [("h", 0.0, "no forgetting")], "state drift: lexical MMD² to the base's rollout states",
             "mean forgetting (TruthfulQA, MMLU)", "Drift vs forgetting", path, band)


def plot_training_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path) -> None:
    """PNG: each run's training loss (first seed) against its step, one panel per run, and the RL reward;
    `curves[run][metric]` is the per-step series logged by DVCLive."""
    runs = [r for r in curves if curves[r].get("loss")]
    n = max(len(runs), 1)
    fig = _figure(2.6 * n, 2.6)
    for k, run in enumerate(runs):
        ax = fig.add_subplot(1, n, k + 1)
        ax.plot(curves[run]["loss"], lw=1, label="loss")
        if curves[run].get("reward_mean"):
            ax.plot(curves[run]["reward_mean"], lw=1, label="reward")
            ax.legend(fontsize=6)
        ax.set_title(_wrap(RUN_LABELS.get(run, run), 30), fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    _save(fig, path)
