"""The localization study's plots (``localization.png``, ``localization_vs_baselines.png``), drawn from what
:mod:`doe_export.study_report` reads from the records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .uncertainty import Interval

if TYPE_CHECKING:
    from .study_report import Runs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, axes, path: Path) -> Path:
    """The legend on the first panel, then the figure written to ``path`` and closed."""
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metric_vs_rate(runs: Runs, out_dir: Path) -> Path | None:
    """Each task's metric after recovery against the rate, one line per method, the dense model dashed."""
    if not runs.tasks:
        return None
    plt = _pyplot()
    cols = min(3, len(runs.tasks))
    nrows = (len(runs.tasks) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, runs.tasks):
        for method in runs.methods:
            seeds = {rate: [r["value"] for r in runs.cell(task, method, rate)] for rate in runs.rates}
            points = [(rate, float(np.mean(v)), float(np.std(v))) for rate, v in seeds.items() if v]
            if points:
                xs, ys, es = zip(*points)
                ax.errorbar(
                    xs,
                    [100 * y for y in ys],
                    yerr=[100 * e for e in es],
                    marker="o",
                    capsize=2,
                    label=method,
                    linewidth=2.2 if method == "doe" else 1.0,
                )
        d = runs.dense[task]
        ax.axhline(100 * d["value"], color="black", linestyle="--", linewidth=1, label="dense")
        learned = "" if runs.learned[task] is not False else ", NOT LEARNED"
        ax.set_title(f"{task} ({d['metric']}, n={d['split_size']}{learned})")
        ax.set_xlabel("pruning rate (share of FFN neurons removed)")
        ax.set_ylabel(f"{d['metric']} x100 after recovery")
    for ax in list(axes.flat)[len(runs.tasks) :]:
        ax.axis("off")
    return _save(plt, fig, axes, out_dir / "localization.png")


def doe_against_baselines(
    table: dict[float, dict[str, dict[str, Interval]]], tasks: list[str], out_dir: Path
) -> Path | None:
    """One panel per rate: DoE minus each baseline (points, 95 % paired interval) on every task of ``tasks``.
    A marker right of the zero line is a DoE lead; an interval clear of the line is a win (left: a loss)."""
    rates = [rate for rate, rows in table.items() if any(rows.values())]
    if not rates or not tasks:
        return None
    plt = _pyplot()
    most = max(sum(1 for rows in table[rate].values() if rows) for rate in rates)
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 1.0 + 0.9 * most), squeeze=False)
    step = 0.8 / len(tasks)
    for ax, rate in zip(axes.flat, rates):
        baselines = [method for method, rows in table[rate].items() if rows]  # those run beside DoE at this rate
        for k, task in enumerate(tasks):
            ys, xs, below, above = [], [], [], []
            for row, method in enumerate(baselines):
                interval = table[rate][method].get(task)
                if interval is not None:
                    ys.append(row - 0.4 + step * (k + 0.5))
                    xs.append(100 * interval.value)
                    below.append(100 * (interval.value - interval.low))
                    above.append(100 * (interval.high - interval.value))
            if xs:
                ax.errorbar(xs, ys, xerr=[below, above], fmt="o", capsize=2, markersize=4, label=task)
        ax.axvline(0, color="black", linewidth=1)
        ax.set_yticks(range(len(baselines)), baselines)
        ax.set_ylim(most - 0.5, -0.5)  # the same row height in every panel, first baseline on top
        ax.set_title(f"DoE minus baseline, p={rate:g}")
        ax.set_xlabel("points after recovery (95% paired interval)")
    return _save(plt, fig, axes, out_dir / "localization_vs_baselines.png")


__all__ = ["doe_against_baselines", "metric_vs_rate"]
