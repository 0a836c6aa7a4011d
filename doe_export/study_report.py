"""The localization study's report: Markdown tables and plots from ``localization.jsonl``
(re-rendered from the records alone: nothing is measured again).

Runs that carry their test predictions (every run since the study moved to the shipped flow) are paired
item by item: each figure against the dense model, and DoE against each baseline, comes with a 95 %
paired bootstrap interval, and a comparison is a *win* or a *loss* only where its interval excludes 0
(otherwise a *tie*). Averages over tasks resample each task's items independently. Tasks whose dense
model is not shown to beat the majority answer are flagged and left out of every pruning verdict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import records as record_io
from . import study_plots
from .augment import DEFAULT_SHARE
from .study import ABLATION_RATE, AUGMENT_COPIES, HIDDEN_DISTILL_WEIGHT, METHODS, MORE_DATA, StudyConfig
from .uncertainty import (
    DISAGREEMENT_PRIOR,
    Interval,
    average_interval,
    dev_items_for,
    disagreement,
    majority_interval,
    metric_factor,
    resampled_differences,
)

SEED = 0  # bootstrap seed of every interval in the report
TARGET_RATE = 0.65  # the paper's rate; the study's targets are read there
TARGET_LOSS = 0.01  # the "within 1 point of dense", in metric units
MIN_SEEDS = 3  # seeds a tie should have before it is called one


class Runs:
    """The records of one study, indexed for the report."""

    def __init__(self, records: list[dict]):
        self.header = records[0]
        self.cfg = StudyConfig.from_json(self.header["config"])
        self.rows = [r for r in records[1:] if r.get("kind") == "run"]
        self.dense = {r["task"]: r for r in records[1:] if r.get("kind") == "dense"}
        self.tasks = [t for t in self.cfg.tasks if t in self.dense]
        self.rates = sorted({r["rate"] for r in self.rows if r["variant"] == "default"} | set(self.cfg.rates))
        present = {r["method"] for r in self.rows}
        self.methods = [m for m in METHODS if m in present or m in self.cfg.methods]
        self.learned = {t: self._learned(t) for t in self.tasks}
        self._doe_minus: dict[tuple[str, str, float], tuple[float, np.ndarray, int] | None] = {}

    def cell(self, task: str, method: str, rate: float) -> list[dict]:
        return [
            r
            for r in self.rows
            if r["task"] == task and r["method"] == method and r["rate"] == rate and r["variant"] == "default"
        ]

    def mean(self, task: str, method: str, rate: float, field: str = "value") -> float:
        values = [r[field] for r in self.cell(task, method, rate)]
        return float(np.mean(values)) if values else float("nan")

    def labels(self, task: str) -> list[int] | None:
        return self.dense[task].get("labels")

    def paired(self, task: str, base: list[dict], other: list[dict]) -> tuple[float, np.ndarray, int] | None:
        """``other``'s metric (mean over its runs) minus ``base``'s, resampled over the test items; None where a
        run lacks predictions (records from before the study kept them)."""
        labels = self.labels(task)
        if not labels or not base or not other or not all(r.get("preds") for r in (*base, *other)):
            return None
        value, spread = resampled_differences(
            self.dense[task]["metric"], labels, [r["preds"] for r in base], [r["preds"] for r in other], seed=SEED
        )
        return value, spread, len(labels)

    def against_dense(self, task: str, method: str, rate: float) -> Interval | None:
        return self.minus_dense(task, self.cell(task, method, rate))

    def minus_dense(self, task: str, runs: list[dict]) -> Interval | None:
        """``runs`` (mean over them) minus the dense model, paired over the test items."""
        part = self.paired(task, [self.dense[task]], runs)
        return None if part is None else average_interval([part], seed=SEED)

    def variant(self, task: str, variant: str) -> list[dict]:
        """DoE's runs of an ablation ``variant`` at ABLATION_RATE ("default": DoE's own runs there)."""
        if variant == "default":
            return self.cell(task, "doe", ABLATION_RATE)
        return [r for r in self.rows if r["task"] == task and r["variant"] == variant]

    def doe_minus(self, task: str, method: str, rate: float) -> tuple[float, np.ndarray, int] | None:
        """DoE minus ``method`` at ``rate``, paired on the seeds both have (all runs of each where none match);
        resampled once per cell (the tables, the seed list and the plot all read it)."""
        key = (task, method, rate)
        if key not in self._doe_minus:
            self._doe_minus[key] = self._resampled_doe_minus(task, method, rate)
        return self._doe_minus[key]

    def _resampled_doe_minus(self, task: str, method: str, rate: float) -> tuple[float, np.ndarray, int] | None:
        return self.paired(task, *reversed(self._compared_runs(task, method, rate)))

    def _compared_runs(self, task: str, method: str, rate: float) -> tuple[list[dict], list[dict]]:
        """DoE's runs and ``method``'s that ``doe_minus`` compares: those on the seeds both have, except for
        random (whose seeds draw other neurons) or where no seed is shared."""
        doe, other = self.cell(task, "doe", rate), self.cell(task, method, rate)
        shared = _on_shared_seeds(doe, other)
        return shared if shared[0] and method != "random" else (doe, other)

    def compared_seeds(self, task: str, method: str, rate: float) -> int:
        """How many runs a side the comparison of DoE with ``method`` rests on (the fewer of the two)."""
        return min(len(runs) for runs in self._compared_runs(task, method, rate))

    def _learned(self, task: str) -> bool | None:
        """Whether the dense model beats always answering the majority test label (None: not known)."""
        dense, labels = self.dense[task], self.labels(task)
        if labels and dense.get("preds"):
            return majority_interval(dense["metric"], labels, dense["preds"], seed=SEED).low > 0
        if "majority" in dense:  # older records: 5 points above the majority answer
            return dense["value"] - dense["majority"]["value"] >= 0.05
        return None

    @property
    def learned_tasks(self) -> list[str]:
        return [t for t in self.tasks if self.learned[t] is not False]


def _on_shared_seeds(a: list[dict], b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The runs of ``a`` and of ``b`` on the seeds both have (the pairs a paired comparison is made of)."""
    shared = {r["seed"] for r in a} & {r["seed"] for r in b}
    return [r for r in a if r["seed"] in shared], [r for r in b if r["seed"] in shared]


def _seeds_cell(rows: list[dict]) -> str:
    """Runs of one setting as a table cell: after recovery (mean ± std over seeds) and before recovery."""
    values = [r["value"] for r in rows]
    spread = f" ±{100 * np.std(values):.1f} ({len(values)} seeds)" if len(values) > 1 else ""
    return f"{100 * np.mean(values):.1f}{spread} ({100 * np.mean([r['value_before_recovery'] for r in rows]):.1f})"


def _verdict(interval: Interval) -> str:
    if interval.low > 0:
        return "win"
    return "loss" if interval.high < 0 else "tie"


def _flow_line(cfg: StudyConfig) -> str:
    """The flow every run shares, in one sentence."""
    flow = cfg.flow
    adapt = flow.adapt
    if adapt.mode == "prompt":
        how = f"prompt tuning (frozen backbone; {adapt.prompt_length} soft tokens, "
    else:
        prompt = f"{adapt.prompt_length} soft tokens" if adapt.prompt_length else "no soft prompt"
        how = f"fine-tuning (every weight; {prompt}; lr {adapt.lr or 'default'}, "
    trains = "prompt + head" if flow.recovery.params == "prompt" else "every remaining weight"
    teacher = (
        f", distillation {flow.recovery.distill:g} at T={flow.recovery.temperature:g}" if flow.recovery.distill else ""
    )
    if flow.recovery.hidden_distill:
        teacher += f", hidden-state distillation {flow.recovery.hidden_distill:g}"
    sizes = ", ".join(f"{t} {'all' if n is None else n}" for t, n in cfg.train_sizes.items() if t in cfg.tasks)
    align = (
        "widths as the rate gives them" if flow.prune.round_to == 1 else "kept widths aligned as doe build aligns them"
    )
    return (
        f"Model `{flow.model}`, adapted by {how}{adapt.epochs} epochs on at most {flow.data.max_train} training "
        f"examples{f' ({sizes})' if sizes else ''}, max length {flow.data.max_length}), DoE and baselines on "
        f"{flow.prune.calib_examples} calibration examples, per-layer budget, {align}, then {flow.recovery.epochs} "
        f"recovery epoch(s) of {trains}{teacher} on {flow.recovery.max_examples or 'the whole training'} examples"
        f"{', best dev epoch kept' if flow.recovery.select_on_dev else ''}."
    )


def render(records_path: Path, out_dir: Path) -> Path:
    runs = Runs(record_io.read_jsonl(records_path))
    header = runs.header
    lines = [
        "# Localization study: which neurons make a task expert?",
        "",
        _flow_line(runs.cfg) + f" Values are x100 on the reporting split. Environment: {header['cpu']}, torch "
        f"{header['versions'].get('torch')}.",
        "",
        f"Runs recorded: {len(runs.rows)} ("
        + ", ".join(f"{t}: {sum(r['task'] == t for r in runs.rows)}" for t in runs.cfg.tasks)
        + f"); {sum(r.get('seconds', 0.0) for r in runs.rows) / 60:.0f} min of compute, adaptation and "
        "calibration passes not included.",
        "",
    ]
    for task in runs.tasks:
        lines += _task_section(runs, task)
    lines += _comparisons(runs) + _averages(runs) + _targets(runs) + _disagreements(runs) + _ablations(runs)
    notes = Path(records_path).with_name("localization.notes.md")
    if notes.is_file():  # hand-written: what was tried where a target is missed (kept beside the records)
        lines += notes.read_text(encoding="utf-8").rstrip().splitlines() + [""]
    plots = [study_plots.metric_vs_rate(runs, Path(out_dir)), _comparison_plot(runs, Path(out_dir))]
    if any(plots):
        lines += ["## Plots", ""] + [f"![{plot.stem}]({plot.name})" for plot in plots if plot] + [""]
    path = Path(out_dir) / "localization.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _task_section(runs: Runs, task: str) -> list[str]:
    d = runs.dense[task]
    learned = runs.learned[task]
    flag = "" if learned is not False else " **Not learned**: its runs are no pruning result and no verdict uses them."
    lines = [
        f"## {task} — {d['metric']} on {d['split']} (n={d['split_size']})",
        "",
        f"Dense model: **{100 * d['value']:.1f}**"
        + (f", trained on {d['train_size']} examples" if "train_size" in d else "")
        + (
            f" (always answering the majority label '{d['majority']['label']}': {100 * d['majority']['value']:.1f})."
            if "majority" in d
            else "."
        )
        + flag
        + (f" Note: {' '.join(d['notes'])}" if d.get("notes") else ""),
        "",
        "| method | " + " | ".join(f"p={r:g}" for r in runs.rates) + " |",
        "|---|" + "---:|" * len(runs.rates),
    ]
    for method in runs.methods:
        cells = []
        for rate in runs.rates:
            cell = runs.cell(task, method, rate)
            cells.append(_seeds_cell(cell) if cell else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    doe = [runs.against_dense(task, "doe", rate) for rate in runs.rates]
    if any(doe):
        lines.append("| DoE − dense, 95% CI | " + " | ".join(iv.points() if iv else "—" for iv in doe) + " |")
    return lines + ["", "Cells: after recovery (before recovery); several seeds: mean ± std.", ""]


def _comparisons(runs: Runs) -> list[str]:
    """DoE against each baseline, per rate and task, with the paired interval and a win/tie/loss verdict (tasks
    the dense model did not learn are shown, marked, and left out of the tally and the average)."""
    learned = runs.learned_tasks
    baselines = [m for m in runs.methods if m != "doe"]
    if not baselines or not any(runs.labels(t) for t in runs.tasks):
        return []
    lines = [
        "## DoE against each baseline",
        "",
        "DoE minus the baseline after recovery, points, with its 95% paired bootstrap interval; **win** / *loss*"
        " where the interval excludes 0, tie otherwise. The average and the tally count only the tasks the dense"
        " model learned.",
        "",
    ]
    heads = [t if t in learned else f"{t} (not learned)" for t in runs.tasks]
    tally: dict[str, int] = {"win": 0, "tie": 0, "loss": 0}
    for rate in runs.rates:
        lines += [f"### p={rate:g}", ""]
        ran = [m for m in baselines if any(runs.doe_minus(t, m, rate) for t in runs.tasks)]
        if not ran:
            lines += ["No baseline has a run beside DoE's at this rate yet.", ""]
            continue
        lines += ["| baseline | " + " | ".join(heads) + " | average |", "|---|" + "---:|" * (len(heads) + 1)]
        for method in ran:
            parts = {t: runs.doe_minus(t, method, rate) for t in runs.tasks}
            cells = []
            for task, part in parts.items():
                interval = None if part is None else average_interval([part], seed=SEED)
                if interval is not None and task in learned:
                    tally[_verdict(interval)] += 1
                cells.append("—" if interval is None else _marked(interval))
            complete = [p for t, p in parts.items() if p is not None and t in learned]
            without = [t for t in learned if parts[t] is None]
            average = _marked(average_interval(complete, seed=SEED)) if complete else "—"
            average += f" (without {', '.join(without)})" if complete and without else ""
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {average} |")
        missing = [m for m in baselines if m not in ran]
        lines += ["", f"Not run beside DoE at this rate: {', '.join(missing)}.", ""] if missing else [""]
    lines += [
        f"Over all {sum(tally.values())} task × rate × baseline comparisons on learned tasks: DoE wins "
        f"{tally['win']}, ties {tally['tie']}, loses {tally['loss']}.",
        "",
    ]
    return lines + _seed_needs(runs, learned, baselines)


def _marked(interval: Interval) -> str:
    verdict = _verdict(interval)
    text = interval.points()
    return f"**{text}**" if verdict == "win" else (f"*{text}*" if verdict == "loss" else text)


def _seed_needs(runs: Runs, tasks: list[str], baselines: list[str]) -> list[str]:
    """Ties decided on fewer than MIN_SEEDS runs of either side: where more seeds would tell."""
    short = []
    for rate in runs.rates:
        for task in tasks:
            ties = [
                f"{m} ({seeds})"
                for m in baselines
                if (part := runs.doe_minus(task, m, rate)) is not None
                and _verdict(average_interval([part], seed=SEED)) == "tie"
                and (seeds := runs.compared_seeds(task, m, rate)) < MIN_SEEDS
            ]
            if ties:
                short.append(f"{task} p={rate:g}: tied with {', '.join(ties)}")
    if not short:
        return []
    return [
        f"Ties resting on fewer than {MIN_SEEDS} seeds a side, the seeds in brackets (`doe study localization "
        f"--seeds 0,1,2 --tasks T --rates P --methods doe,M` adds them): {'; '.join(short)}.",
        "",
    ]


def _averages(runs: Runs) -> list[str]:
    tasks = runs.learned_tasks
    if not tasks:
        return []
    # each rate's column averages the learned tasks DoE ran on at that rate (all of them where it ran on none),
    # so the methods in a column share their tasks; a method missing one of them gets a dash
    at_rate = {r: [t for t in tasks if runs.cell(t, "doe", r)] or tasks for r in runs.rates}
    narrower = [
        f"p={r:g} without {', '.join(t for t in tasks if t not in at_rate[r])}"
        for r in runs.rates
        if len(at_rate[r]) < len(tasks)
    ]
    lines = []
    for field, title in (("value", "after recovery"), ("value_before_recovery", "before recovery (pruning alone)")):
        means = {(m, r): _task_mean(runs, at_rate[r], m, r, field) for m in runs.methods for r in runs.rates}
        lines += [
            f"## Average over {', '.join(tasks)}: {title}",
            "",
            "| method | " + " | ".join(f"p={r:g}" for r in runs.rates) + " |",
            "|---|" + "---:|" * len(runs.rates),
            "| dense | "
            + " | ".join(f"{100 * np.mean([runs.dense[t]['value'] for t in at_rate[r]]):.1f}" for r in runs.rates)
            + " |",
        ]
        for method in runs.methods:
            cells = []
            for rate in runs.rates:
                value = means[(method, rate)]
                best = (
                    max(v for (m, r), v in means.items() if r == rate and not np.isnan(v))
                    if not np.isnan(value)
                    else None
                )
                cells.append(
                    "—" if np.isnan(value) else (f"**{100 * value:.1f}**" if value == best else f"{100 * value:.1f}")
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Bold: the best method at that rate. Tasks weigh equally (GLUE's average)"
            + (f"; {'; '.join(narrower)} (DoE has no runs there)." if narrower else "."),
            "",
        ]
    return lines


def _task_mean(runs: Runs, tasks: list[str], method: str, rate: float, field: str = "value") -> float:
    values = [runs.mean(t, method, rate, field) for t in tasks]
    return float(np.mean(values)) if values and not any(np.isnan(values)) else float("nan")


def _targets(runs: Runs) -> list[str]:
    tasks = runs.learned_tasks
    lines = ["## Targets", ""]
    unlearned = [t for t in runs.tasks if runs.learned[t] is False]
    if unlearned:
        lines += [f"Left out (dense model not learned): {', '.join(unlearned)}.", ""]
    if TARGET_RATE not in runs.rates or not tasks:
        return lines + [f"No runs at p={TARGET_RATE:g} yet.", ""]
    losses = {t: runs.against_dense(t, "doe", TARGET_RATE) for t in tasks}
    if all(losses.values()):
        verdicts = {t: iv.verdict(TARGET_LOSS) for t, iv in losses.items() if iv}
        lines.append(
            f"- DoE at p={TARGET_RATE:g} within 1 point of dense: "
            + ", ".join(f"{t} {iv.points()} {verdicts[t]}" for t, iv in losses.items() if iv)
        )
    doe = _task_mean(runs, tasks, "doe", TARGET_RATE)
    others = {m: _task_mean(runs, tasks, m, TARGET_RATE) for m in runs.methods if m != "doe"}
    others = {m: v for m, v in others.items() if not np.isnan(v)}
    if others and not np.isnan(doe):
        best = max(others, key=lambda m: others[m])
        parts = [runs.doe_minus(t, best, TARGET_RATE) for t in tasks]
        interval = average_interval([p for p in parts if p], seed=SEED) if all(parts) else None
        met = "met" if doe >= others[best] else "missed"
        lines.append(
            f"- DoE's average over {len(tasks)} tasks at p={TARGET_RATE:g} at least the best baseline's: {met} (DoE "
            f"{100 * doe:.1f}, best baseline {best} {100 * others[best]:.1f}"
            + (f"; DoE − {best} {interval.points()}, a {_verdict(interval)}" if interval else "")
            + ")"
        )
    return lines + [""]


BUDGET_POINTS = 1.0  # the --max-loss budget whose dev size the disagreement table shows


def _disagreements(runs: Runs) -> list[str]:
    """How many test answers DoE's experts change against the dense model, per learned task and rate: what
    `doe build --max-loss` sizes its dev split by (it assumes DISAGREEMENT_PRIOR), measured."""
    tasks = [t for t in runs.learned_tasks if runs.dense[t].get("preds") and runs.labels(t)]
    shares = {
        (t, rate): [
            disagreement(runs.dense[t]["preds"], r["preds"]) for r in runs.cell(t, "doe", rate) if r.get("preds")
        ]
        for t in tasks
        for rate in runs.rates
    }
    if not any(shares.values()):
        return []
    read_at = TARGET_RATE if TARGET_RATE in runs.rates else runs.rates[0]
    budget = f"{BUDGET_POINTS:g} point{'s' if BUDGET_POINTS != 1 else ''}"
    lines = [
        "## How many answers DoE's experts change",
        "",
        "Test items on which DoE's expert (after recovery) answers otherwise than the dense model, per cent: mean "
        "over seeds (lowest–highest). `doe build --max-loss` sizes its dev split for experts that change "
        f"{100 * DISAGREEMENT_PRIOR:g} % of the answers; the last column is the dev items a {BUDGET_POINTS:g}-point budget needs "
        f"at the share measured at p={read_at:g} (and at the assumed {100 * DISAGREEMENT_PRIOR:g} %), for the "
        "task's metric. Beside them, for scale: the share of test items the dense model itself gets wrong.",
        "",
        "| task | dense wrong | " + " | ".join(f"p={r:g}" for r in runs.rates) + f" | dev items for {budget} |",
        "|---|" + "---:|" * (len(runs.rates) + 2),
    ]
    measured: dict[str, float] = {}  # task: mean share at read_at, where DoE ran there
    for task in tasks:
        labels = runs.labels(task) or []
        wrong = disagreement(labels, runs.dense[task]["preds"])
        cells = [f"{100 * wrong:.1f}"] + [_share_cell(shares[task, rate]) for rate in runs.rates]
        factor = metric_factor(runs.dense[task]["metric"], labels, seed=SEED)
        prior = dev_items_for(BUDGET_POINTS, DISAGREEMENT_PRIOR, factor)
        if shares[task, read_at]:
            measured[task] = float(np.mean(shares[task, read_at]))
            cells.append(f"{dev_items_for(BUDGET_POINTS, measured[task], factor):,} ({prior:,})")
        else:
            cells.append(f"— ({prior:,})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    above = [t for t, share in measured.items() if share > DISAGREEMENT_PRIOR]
    if measured:
        lines += [
            "",
            f"At p={read_at:g} the experts change more answers than the assumed {100 * DISAGREEMENT_PRIOR:g} % on "
            f"{len(above)} of {len(measured)} tasks" + (f" ({', '.join(above)})" if above else "") + ".",
        ]
    return lines + [""]


def _share_cell(shares: list[float]) -> str:
    if not shares:
        return "—"
    mean = 100 * float(np.mean(shares))
    return f"{mean:.1f}" if len(shares) == 1 else f"{mean:.1f} ({100 * min(shares):.1f}–{100 * max(shares):.1f})"


def _ablations(runs: Runs) -> list[str]:
    variants = sorted({r["variant"] for r in runs.rows if r["variant"] != "default"})
    if not variants:
        return []
    tasks = runs.tasks
    lines = [
        f"## DoE ablations at p={ABLATION_RATE}",
        "",
        "| variant | " + " | ".join(tasks) + " | average − default |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    base = [_seeds_cell(rows) if (rows := runs.variant(t, "default")) else "—" for t in tasks]
    lines.append(
        "| default (mean over tokens, per-layer, no folding, attribution on the adapted model, calib "
        f"{runs.cfg.flow.prune.calib_examples}) | " + " | ".join(base) + " | |"
    )
    learned = runs.learned_tasks
    for variant in variants:
        cells, parts, averaged = [], [], []
        for task in tasks:
            match = runs.variant(task, variant)
            if not match:
                cells.append("—")
                continue
            cell = _seeds_cell(match)
            part = runs.paired(task, *_on_shared_seeds(runs.variant(task, "default"), match))
            if part is not None:
                interval = average_interval([part], seed=SEED)
                cell += f"; {interval.points()}, a {_verdict(interval)}"
                if task in learned:
                    parts.append(part)
                    averaged.append(task)
            cells.append(cell)
        if parts:
            average = average_interval(parts, seed=SEED)
            only = "" if len(parts) == len(learned) else f" ({', '.join(averaged)} only)"
            cells.append(f"{average.points()}, a {_verdict(average)}{only}")
        else:
            cells.append("—")
        lines.append(f"| {VARIANT_LABELS.get(variant, variant)} | " + " | ".join(cells) + " |")
    return (
        lines
        + [
            "",
            "Cells: after recovery, mean ± std over seeds (before recovery; for the two-step variant, its last step's "
            "before its recovery); "
            "then the variant minus the default on the same seeds, points with its 95 % paired interval, and whether "
            "the variant wins, ties or loses against the default. The average is over the learned tasks the variant "
            "ran on, named where they are not all of them.",
            "",
        ]
        + _variants_against_dense(runs, variants)
    )


def _variants_against_dense(runs: Runs, variants: list[str]) -> list[str]:
    """Each variant (and the default) minus the dense model at ABLATION_RATE, with the 1-point verdict: which
    one-flag recipe holds the target where."""
    tasks = runs.learned_tasks
    if not tasks:
        return []
    lines = [
        f"### The variants against the dense model at p={ABLATION_RATE}",
        "",
        "| variant | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for variant in ["default", *variants]:
        cells = []
        for task in tasks:
            interval = runs.minus_dense(task, runs.variant(task, variant))
            cells.append("—" if interval is None else f"{interval.points()}, {interval.verdict(TARGET_LOSS)}")
        label = "default" if variant == "default" else VARIANT_LABELS.get(variant, variant).split(" (")[0]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [
        "",
        "Cells: the variant (mean over its seeds) minus the dense model, points with the 95 % paired interval, and "
        "whether that keeps within 1 point: met (the interval rules out a larger loss), missed, or not resolved.",
        "",
    ]


VARIANT_LABELS = {
    "no-prompt-tuning": "no adaptation before attribution (scores from the un-adapted backbone; the adapted model is pruned)",
    "mean-abs": "ranked by the mean of the absolute h·g over items and tokens, not the absolute of its mean (no cancellation between items)",
    "gradual-2": "the rate reached in two steps, each attributed on the model the step before left and recovered",
    "hidden-distill": f"recovery adds hidden-state distillation (weight {HIDDEN_DISTILL_WEIGHT:g}): each layer's output "
    "pulled towards the dense model's",
    "recovery-4": "4 recovery epochs instead of the flow's",
    "augment-2": f"recovery also distills on {AUGMENT_COPIES} perturbed copies of each training text (about "
    f"{round(DEFAULT_SHARE * 100)} % of the words deleted, swapped or replaced), labelled by the dense model",
    "more-data": f"recovery also trains on up to {MORE_DATA:,} training items past the adaptation's, with their labels "
    "(run only where the split has them)",
    "more-texts": f"recovery also trains on up to {MORE_DATA:,} training items past the adaptation's, labelled by the "
    "dense model (their own labels not read; run only where the split has them)",
    "other-texts": f"recovery also trains on up to {MORE_DATA:,} training texts of another task (SNLI's pairs; SST-2's "
    "sentences for CoLA), labelled by the dense model",
}


def _comparison_plot(runs: Runs, out_dir: Path) -> Path | None:
    """DoE minus each baseline with its interval, per learned task and rate (the comparison tables as a plot)."""
    learned = runs.learned_tasks
    table = {
        rate: {
            method: {t: average_interval([p], seed=SEED) for t in learned if (p := runs.doe_minus(t, method, rate))}
            for method in runs.methods
            if method != "doe"
        }
        for rate in runs.rates
    }
    return study_plots.doe_against_baselines(table, learned, out_dir)


__all__ = ["Runs", "render"]
