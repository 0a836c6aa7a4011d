"""The localization study's report: Markdown tables and a plot from ``localization.jsonl``
(re-rendered from the records alone: nothing is measured again)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import records as record_io
from .study import ABLATION_RATE, StudyConfig, run_specs


def _table(rows: list[dict], task: str, method: str, rate: float, field: str = "value") -> tuple[float, float, int]:
    values = [
        r[field]
        for r in rows
        if r["task"] == task and r["method"] == method and r["rate"] == rate and r["variant"] == "default"
    ]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values)), len(values)


def _flow_line(cfg: StudyConfig) -> str:
    """The flow every run shares, in one sentence."""
    flow = cfg.flow
    adapt = flow.adapt
    how = (
        "prompt tuning (frozen backbone; "
        if adapt.mode == "prompt"
        else f"fine-tuning (backbone, prompt and head; lr {adapt.lr or 'default'}; "
    )
    trains = "prompt + head" if flow.recovery.params == "prompt" else "every remaining weight"
    teacher = f", distillation {flow.recovery.distill:g}" if flow.recovery.distill else ""
    return (
        f"Model `{flow.model}`, adapted by {how}{adapt.prompt_length} soft tokens, {adapt.epochs} epochs on at most "
        f"{flow.data.max_train} training examples, max length {flow.data.max_length}), DoE and baselines on "
        f"{flow.prune.calib_examples} calibration examples, per-layer budget, then {flow.recovery.epochs} recovery "
        f"epoch(s) of {trains}{teacher} on {flow.recovery.max_examples or 'all training'} examples."
    )


def render(records_path: Path, out_dir: Path) -> Path:
    records = record_io.read_jsonl(records_path)
    header, rows = records[0], [r for r in records[1:] if r.get("kind") == "run"]
    dense = {r["task"]: r for r in records[1:] if r.get("kind") == "dense"}
    cfg = StudyConfig.from_json(header["config"])
    tasks = [t for t in cfg.tasks if t in dense]
    expected = len(run_specs(cfg))
    per_task = {t: sum(r["task"] == t for r in rows) for t in cfg.tasks}
    progress = ", ".join(f"{t}: {n}/{expected}" for t, n in per_task.items())
    lines = [
        "# Localization study: which neurons make a task expert?",
        "",
        _flow_line(cfg) + f" Values are x100 on the reporting split. Environment: {header['cpu']}, torch "
        f"{header['versions'].get('torch')}.",
        "",
        f"Runs recorded: {len(rows)} of {expected * len(cfg.tasks)} planned ({progress}).",
        "",
    ]
    for task in tasks:
        d = dense[task]
        lines += [
            f"## {task} — {d['metric']} on {d['split']} (n={d['split_size']})",
            "",
            f"Dense adapted model: **{100 * d['value']:.1f}**"
            + (
                f" (always answering the majority label '{d['majority']['label']}': "
                f"{100 * d['majority']['value']:.1f})."
                if "majority" in d
                else "."
            )
            + (f" Note: {' '.join(d['notes'])}" if d.get("notes") else ""),
            "",
            "| method | " + " | ".join(f"p={r:g}" for r in cfg.rates) + " |",
            "|---|" + "---:|" * len(cfg.rates),
        ]
        for method in cfg.methods:
            cells = []
            for rate in cfg.rates:
                mean, std, n = _table(rows, task, method, rate)
                before, _, _ = _table(rows, task, method, rate, "value_before_recovery")
                if n == 0:
                    cells.append("—")
                else:
                    spread = f" ±{100 * std:.1f}" if n > 1 else ""
                    cells.append(f"{100 * mean:.1f}{spread} ({100 * before:.1f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: after recovery (before recovery); random: mean ± std over seeds.", ""]
    lines += _averages(rows, dense, tasks, cfg) + _ablations(rows, dense, tasks) + _targets(rows, dense, tasks, cfg)
    notes = Path(records_path).with_name("localization.notes.md")
    if notes.is_file():  # hand-written: what was tried where a target is missed (kept beside the records)
        lines += notes.read_text(encoding="utf-8").rstrip().splitlines() + [""]
    plot = _plot(rows, dense, tasks, cfg, Path(out_dir))
    if plot:
        lines += ["## Plot", "", f"![metric vs pruning rate]({plot.name})", ""]
    path = Path(out_dir) / "localization.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _average(rows, tasks, method, rate, field: str = "value"):
    values = [_table(rows, t, method, rate, field)[0] for t in tasks]
    return float(np.mean(values)) if values and not any(np.isnan(values)) else float("nan")


def _averages(rows, dense, tasks, cfg) -> list[str]:
    if not tasks:
        return []
    lines = []
    for field, title in (("value", "after recovery"), ("value_before_recovery", "before recovery (pruning alone)")):
        lines += [
            f"## Average over {', '.join(tasks)}: {title}",
            "",
            "| method | " + " | ".join(f"p={r:g}" for r in cfg.rates) + " |",
            "|---|" + "---:|" * len(cfg.rates),
            "| dense | "
            + " | ".join(f"{100 * np.mean([dense[t]['value'] for t in tasks]):.1f}" for _ in cfg.rates)
            + " |",
        ]
        for method in cfg.methods:
            cells = [_average(rows, tasks, method, rate, field) for rate in cfg.rates]
            best = [max((_average(rows, tasks, m, rate, field), m) for m in cfg.methods)[1] for rate in cfg.rates]
            lines.append(
                f"| {method} | "
                + " | ".join(
                    "—" if np.isnan(c) else (f"**{100 * c:.1f}**" if b == method else f"{100 * c:.1f}")
                    for c, b in zip(cells, best)
                )
                + " |"
            )
        lines += ["", "Bold: the best method at that rate.", ""]
    return lines


def _ablations(rows, dense, tasks) -> list[str]:
    variants = sorted({r["variant"] for r in rows if r["variant"] != "default"})
    if not variants:
        return []
    lines = [
        f"## DoE ablations at p={ABLATION_RATE}",
        "",
        "| variant | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    base = []
    for task in tasks:
        mean, _, n = _table(rows, task, "doe", ABLATION_RATE)
        before, _, _ = _table(rows, task, "doe", ABLATION_RATE, "value_before_recovery")
        base.append(f"{100 * mean:.1f} ({100 * before:.1f})" if n else "—")
    lines.append(
        "| default (mean over tokens, per-layer, no folding, attribution on the adapted model, calib 256) | "
        + " | ".join(base)
        + " |"
    )
    for variant in variants:
        cells = []
        for task in tasks:
            match = [r for r in rows if r["task"] == task and r["variant"] == variant]
            cells.append(
                f"{100 * match[0]['value']:.1f} ({100 * match[0]['value_before_recovery']:.1f})" if match else "—"
            )
        label = VARIANT_LABELS.get(variant, variant)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", "Cells: after recovery (before recovery = the 'without recovery' ablation).", ""]


VARIANT_LABELS = {
    "no-prompt-tuning": "no-prompt-tuning (attribution on the un-adapted backbone; the adapted model is pruned)"
}


def _targets(rows, dense, tasks, cfg) -> list[str]:
    run_minutes = sum(r.get("seconds", 0.0) for r in rows) / 60
    lines = [
        "## Targets",
        "",
        f"(The {len(rows)} pruning runs took {run_minutes:.0f} min of compute in total, adaptation "
        "and calibration passes not included.)",
        "",
    ]
    lines += _target_lines(rows, dense, tasks, cfg)
    learned = [t for t in tasks if "majority" in dense[t] and dense[t]["value"] - dense[t]["majority"]["value"] >= 0.05]
    if learned and learned != tasks:
        lines += [
            "",
            f"On the tasks the dense model learned (at least 5 points above always answering the majority "
            f"label: {', '.join(learned)}):",
            "",
        ]
        lines += _target_lines(rows, dense, learned, cfg)
    return lines + [""]


def _target_lines(rows, dense, tasks, cfg) -> list[str]:
    lines = []
    if ABLATION_RATE in cfg.rates and tasks:
        gaps = {t: 100 * (dense[t]["value"] - _table(rows, t, "doe", ABLATION_RATE)[0]) for t in tasks}
        if not any(np.isnan(list(gaps.values()))):
            worst = max(gaps.values())
            lines.append(
                f"- DoE at p=0.65 within 1.0 point of dense on every task: "
                f"{'met' if worst <= 1.0 else 'missed'} (loss per task: "
                + ", ".join(f"{t} {g:+.1f}" for t, g in gaps.items())
                + ")"
            )
            mean_gap = float(np.mean(list(gaps.values())))
            lines.append(
                f"- within 0.5 on average: {'met' if mean_gap <= 0.5 else 'missed'} "
                f"(average loss {mean_gap:+.1f} points)"
            )
    for rate in (0.8, 0.9):
        if rate not in cfg.rates:
            continue
        doe = _average(rows, tasks, "doe", rate)
        others = {m: _average(rows, tasks, m, rate) for m in cfg.methods if m != "doe"}
        if not others or np.isnan(doe) or any(np.isnan(list(others.values()))):
            continue
        best = max(others, key=lambda name: others[name])
        lines.append(
            f"- DoE beats every baseline on the average at p={rate:g}: "
            f"{'met' if doe > others[best] else 'missed'} (DoE {100 * doe:.1f}, best baseline {best} "
            f"{100 * others[best]:.1f})"
        )
    return lines


def _plot(rows, dense, tasks, cfg, out_dir: Path) -> Path | None:
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(tasks))
    nrows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for method in cfg.methods:
            points = [(rate, *_table(rows, task, method, rate)[:2]) for rate in cfg.rates]
            points = [p for p in points if not np.isnan(p[1])]
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
        ax.axhline(100 * dense[task]["value"], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_title(f"{task} ({dense[task]['metric']}, n={dense[task]['split_size']})")
        ax.set_xlabel("pruning rate (share of FFN neurons removed)")
        ax.set_ylabel(f"{dense[task]['metric']} x100 after recovery")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "localization.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["render"]
