"""The localization study: which neuron scorer keeps a task's accuracy after pruning?

For every task: adapt once (prompt tuning, cached), gather calibration statistics once per
calibration size (cached), then for every method x pruning rate (x seed for ``random``) prune a
copy of the adapted model, measure the metric before and after a short recovery tuning, and
append one record to ``localization.jsonl``. Records already present are not recomputed, so a
stopped study resumes and re-rendering the report never retrains.

Ablations of DoE at rate 0.65: max over tokens, global budget, bias folding, attribution without
prompt tuning (on the un-adapted model), calibration sizes; "without recovery" is the
``before_recovery`` value every record carries.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import attribution, evaluate, stages
from . import records as record_io
from .cache import cached_adapted, cached_stats
from .console import log as default_log
from .errors import ConfigError, TaskDataError
from .loading import DEFAULT_MODEL, fast_tokenizer, load_model
from .tasks import TaskData, load_task

METHODS = ("doe", "random", "activation", "gradient", "magnitude", "taylor", "skill")
ABLATION_RATE = 0.65


@dataclass(frozen=True)
class StudyConfig:
    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = ("sst2", "mrpc", "rte", "cola", "qnli")
    # "prompt": soft prompt + head on the frozen backbone (the paper); "finetune": everything trains
    # (the soft prompt included when prompt_length > 0).
    adapt: str = "prompt"
    lr: float | None = None  # adaptation learning rate (None: adapt.DEFAULT_LR of the mode)
    rates: tuple[float, ...] = (0.3, 0.5, 0.65, 0.8, 0.9)
    methods: tuple[str, ...] = METHODS
    random_seeds: tuple[int, ...] = (0, 1, 2)
    calib_examples: int = 256
    ablation_calib_sizes: tuple[int, ...] = (64, 1024)
    ablations: bool = True
    prompt_length: int = 20
    epochs: int = 2
    recovery_epochs: int = 1
    max_train: int = 1024  # >= the largest calibration size (1024)
    recovery_examples: int | None = 500  # None: the whole (capped) training split
    max_dev: int = 200
    max_eval: int | None = 1000  # None: the whole reporting split
    max_length: int = 64
    batch_size: int = 16
    seed: int = 0
    # recovery: what trains after pruning and from what (the first studies: prompt + head, no teacher)
    recovery_params: str = "prompt"
    distill: float = 0.0
    temperature: float = 2.0
    recovery_on_dev: bool = False  # keep the best dev epoch of the recovery (build does)

    @classmethod
    def from_specs(cls, data: stages.DataSpec, adapt: stages.AdaptSpec, prune: stages.PruneSpec,
                   recovery: stages.RecoverySpec, **rest) -> "StudyConfig":
        """A study config whose flow is exactly these stage specs (e.g. `doe build`'s defaults)."""
        return cls(adapt=adapt.mode, lr=adapt.lr, prompt_length=adapt.prompt_length, epochs=adapt.epochs,
                   batch_size=adapt.batch_size, seed=adapt.seed, max_train=data.max_train, max_dev=data.max_dev,
                   max_eval=data.max_eval, max_length=data.max_length, calib_examples=prune.calib_examples,
                   recovery_epochs=recovery.epochs, recovery_params=recovery.params, distill=recovery.distill,
                   temperature=recovery.temperature, recovery_examples=recovery.max_examples,
                   recovery_on_dev=recovery.select_on_dev, **rest)

    def data_spec(self) -> stages.DataSpec:
        return stages.DataSpec(self.max_train, self.max_dev, self.max_eval, self.max_length, self.seed).check()

    def adapt_spec(self) -> stages.AdaptSpec:
        return stages.AdaptSpec(self.adapt, self.prompt_length, None, self.epochs, self.lr, self.batch_size,
                                self.seed).check()

    def recovery_spec(self) -> stages.RecoverySpec:
        return stages.RecoverySpec(self.recovery_epochs, self.recovery_params, self.distill, self.temperature, None,
                                   self.batch_size, self.recovery_examples, self.recovery_on_dev,
                                   self.seed + 1).check()

    def prune_spec(self, run: dict) -> stages.PruneSpec:
        """The pruning spec of one run (method x rate x seed, or a DoE ablation variant)."""
        variant = run["variant"]
        calib = int(variant.split("-")[1]) if variant.startswith("calib-") else self.calib_examples
        return stages.PruneSpec(run["method"], "max" if variant == "max-tokens" else "mean", "abs-of-mean", run["rate"],
                                "ffn", None, "global" if variant == "global-budget" else "per-layer", 1,
                                variant == "fold-bias", calib, self.batch_size, run["seed"])

    def adapt_key(self, task: str) -> str:
        fields = (self.model, task, self.prompt_length, self.epochs, self.max_train, self.max_dev, self.max_length,
                  self.batch_size, self.seed)
        if self.adapt != "prompt" or self.lr is not None:  # keys of earlier prompt-tuned caches stay valid
            fields += (self.adapt, self.lr)
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


# Settings that change the result of a single run; the others only choose which runs exist.
RESULT_FIELDS = ("model", "adapt", "lr", "calib_examples", "prompt_length", "epochs", "recovery_epochs", "max_train",
                 "recovery_examples", "max_dev", "max_eval", "max_length", "batch_size", "seed", "recovery_params",
                 "distill", "temperature", "recovery_on_dev")

QUICK = dict(tasks=("toy",), rates=(0.5, 0.8), random_seeds=(0, 1), calib_examples=16, ablation_calib_sizes=(8,),
             prompt_length=4, epochs=1, max_train=48, recovery_examples=24, max_dev=8, max_eval=24, max_length=24,
             batch_size=8)


def run_specs(config: StudyConfig) -> list[dict]:
    """Every run of the study for one task, as the fields that identify its record."""
    specs = []
    for rate in config.rates:
        for method in config.methods:
            seeds = config.random_seeds if method == "random" else (config.seed,)
            for seed in seeds:
                specs.append({"method": method, "variant": "default", "rate": rate, "seed": seed})
    if config.ablations:
        for variant in ("max-tokens", "global-budget", "fold-bias", "no-prompt-tuning"):
            specs.append({"method": "doe", "variant": variant, "rate": ABLATION_RATE, "seed": config.seed})
        for size in config.ablation_calib_sizes:
            specs.append({"method": "doe", "variant": f"calib-{size}", "rate": ABLATION_RATE, "seed": config.seed})
    return specs


def record_key(record: dict) -> tuple:
    return (record["task"], record["method"], record["variant"], record["rate"], record["seed"])


def metrics_of(data: TaskData, labels: list[int], logits: np.ndarray) -> dict:
    """The task's metric, accuracy, and the mean log-probability of the gold label (continuous)."""
    preds = logits.argmax(1).tolist()
    values = {data.metric: evaluate.metric_value(data.metric, labels, preds)}
    values.setdefault("accuracy", evaluate.accuracy(labels, preds))
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    values["gold_logprob"] = float(logp[np.arange(len(labels)), labels].mean())
    return values


def majority_baseline(data: TaskData, config: StudyConfig) -> dict:
    """The metric of always answering the most frequent training label, on the reporting split."""
    counts = Counter(data.train.head(config.max_train).labels)
    label = max(sorted(counts), key=counts.get)
    test = data.test.sample(config.max_eval, config.seed)
    return {"label": data.labels[label], "value": evaluate.metric_value(data.metric, test.labels, [label] * len(test))}


class TaskRunner:
    """Everything one task's runs share: data, tokenizer, adapted model (cached), statistics (cached)."""

    def __init__(self, config: StudyConfig, data: TaskData, loaded, cache: Path, progress: bool):
        self.config, self.data, self.loaded, self.cache, self.progress = config, data, loaded, Path(cache), progress
        self.tokenizer = fast_tokenizer(loaded.hf_tokenizer, config.max_length)
        self.splits = stages.Splits.of(data, config.data_spec())
        self.train, self.dev, self.test = self.splits.train, self.splits.dev, self.splits.test
        self._stats: dict[str, attribution.CalibrationStats] = {}
        self.key = config.adapt_key(data.name)
        self.adapted = cached_adapted(self.cache / f"{data.name}-adapted-{self.key}.pt", loaded, data,
                                      config.adapt_spec(), self.tokenizer, self.splits, progress)

    def stats(self, examples: int, adapted: bool = True) -> attribution.CalibrationStats:
        """Every statistic of every scorer for ``examples`` calibration examples (one pass, cached)."""
        key = f"{examples}-{'adapted' if adapted else 'unadapted'}"
        if key not in self._stats:
            path = self.cache / f"{self.data.name}-stats-{key}-{self.key}.pt"
            model = self.adapted if adapted else stages.new_model(self.loaded, self.data, self.config.adapt_spec()).eval()
            spec = stages.PruneSpec(calib_examples=examples, batch_size=self.config.batch_size, seed=self.config.seed)
            self._stats[key] = cached_stats(path, model, self.tokenizer, self.train, spec, self.progress)
        return self._stats[key]

    def evaluate(self, model) -> dict:
        logits = evaluate.torch_logits(model, self.tokenizer, self.test.inputs)
        return metrics_of(self.data, self.test.labels, logits)

    def expert(self, prune_spec: stages.PruneSpec, recovery_spec: stages.RecoverySpec | None = None,
               stats: attribution.CalibrationStats | None = None, desc: str = "expert") -> stages.ExpertResult:
        """A pruned, recovered expert of the adapted model (the stage API, as ``doe build`` makes it)."""
        stats = stats if stats is not None else (self.stats(prune_spec.calib_examples) if prune_spec.needs() else None)
        return stages.make_expert(self.adapted, self.tokenizer, self.splits, self.data.metric, prune_spec,
                                  recovery_spec or self.config.recovery_spec(), self.progress,
                                  f"[{self.data.name}] {desc}", stats=stats, score=self.evaluate)

    def run(self, spec: dict) -> dict:
        start = time.perf_counter()
        prune_spec = self.config.prune_spec(spec)
        stats = self.stats(prune_spec.calib_examples, adapted=spec["variant"] != "no-prompt-tuning")
        result = self.expert(prune_spec, stats=stats if prune_spec.needs() else None,
                             desc=f"{spec['method']}/{spec['variant']} p={spec['rate']:g}")
        before, after = result.before, result.after
        return {
            "kind": "run", "task": self.data.name, **spec, "metric": self.data.metric,
            "before_recovery": before, "after_recovery": after, "value": after[self.data.metric],
            "value_before_recovery": before[self.data.metric], "split": self.test.name, "split_size": len(self.test),
            "calibration_examples": result.attribution.scores.examples, "ffn_widths": result.report["ffn_widths"],
            "params_after": result.report["params_after"], "seconds": round(time.perf_counter() - start, 1),
        }


def _check_sizes(config: StudyConfig, datasets: list[TaskData]) -> None:
    need = max((config.calib_examples,) + (config.ablation_calib_sizes if config.ablations else ()))
    for data in datasets:
        available = len(data.train.head(config.max_train))
        if need > available:
            raise TaskDataError(
                f"task {data.name!r}: calibration needs {need} examples but the train split ({data.train.name}, "
                f"capped at --max-train {config.max_train}) has {available}; lower the calibration sizes"
            )


def run_study(config: StudyConfig, out_dir: Path, cache: Path, data_dir=None, progress: bool = True,
              datasets: list[TaskData] | None = None, loaded=None, log=None) -> Path:
    log = log or default_log
    out_dir = Path(out_dir)
    records_path = out_dir / "localization.jsonl"
    # All data is loaded and checked before any training starts.
    datasets = datasets or [load_task(task, config.seed, data_dir) for task in config.tasks]
    _check_sizes(config, datasets)
    existing = record_io.read_jsonl(records_path) if records_path.is_file() else []
    config_json = json.loads(json.dumps(asdict(config)))
    if existing:
        old = existing[0].get("config", {})
        defaults = asdict(StudyConfig())  # settings added later: older records ran with their defaults
        changed = sorted(k for k in RESULT_FIELDS if old.get(k, defaults[k]) != config_json[k])
        if changed:
            raise ConfigError(
                f"{records_path} holds runs made with other settings of {changed}; its runs would not be "
                "comparable. Use another --out, or delete the file to start over"
            )
        existing[0]["config"] = config_json  # the set of runs (tasks, methods, rates, seeds) may grow
    header = existing[0] if existing else {**record_io.environment([torch.get_num_threads()], []),
                                           "suite": "localization", "config": config_json}
    done = {record_key(r) for r in existing if r.get("kind") in ("run", "dense")}
    records = existing or [header]
    loaded = loaded or load_model(config.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_io.write_jsonl(records_path, records)
    for data in datasets:
        for record in records:  # older records may lack the baseline; it needs the data only
            if record.get("kind") == "dense" and record["task"] == data.name and "majority" not in record:
                record["majority"] = majority_baseline(data, config)
                record_io.write_jsonl(records_path, records)
        specs = [s for s in run_specs(config) if (data.name, s["method"], s["variant"], s["rate"], s["seed"]) not in done]
        dense_key = (data.name, "dense", "default", 0.0, config.seed)
        if not specs and dense_key in done:
            continue
        runner = TaskRunner(config, data, loaded, Path(cache), progress)
        if dense_key not in done:
            dense = runner.evaluate(runner.adapted)
            records.append({"kind": "dense", "task": data.name, "method": "dense", "variant": "default", "rate": 0.0,
                            "seed": config.seed, "metric": data.metric, "after_recovery": dense,
                            "value": dense[data.metric], "split": runner.test.name, "split_size": len(runner.test),
                            "notes": data.notes, "majority": majority_baseline(data, config)})
            record_io.write_jsonl(records_path, records)
            log(f"[{data.name}] dense {config.adapt}-adapted {data.metric} {dense[data.metric]:.4f} on {runner.test.name}")
        for index, spec in enumerate(specs, 1):
            record = runner.run(spec)
            records.append(record)
            record_io.write_jsonl(records_path, records)  # after every run: a stopped study resumes here
            log(f"[{data.name}] {index}/{len(specs)} {spec['method']}/{spec['variant']} p={spec['rate']:g} "
                f"seed {spec['seed']}: {record['value_before_recovery']:.4f} -> {record['value']:.4f}")
    render(records_path, out_dir)
    return records_path


# ----------------------------------------------------------------------------- report


def _table(rows: list[dict], task: str, method: str, rate: float, field: str = "value") -> tuple[float, float, int]:
    values = [r[field] for r in rows if r["task"] == task and r["method"] == method and r["rate"] == rate
              and r["variant"] == "default"]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values)), len(values)


def render(records_path: Path, out_dir: Path) -> Path:
    records = record_io.read_jsonl(records_path)
    header, rows = records[0], [r for r in records[1:] if r.get("kind") == "run"]
    dense = {r["task"]: r for r in records[1:] if r.get("kind") == "dense"}
    cfg = header["config"]
    tasks = [t for t in cfg["tasks"] if t in dense]
    expected = len(run_specs(StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})))
    per_task = {t: sum(r["task"] == t for r in rows) for t in cfg["tasks"]}
    progress = ", ".join(f"{t}: {n}/{expected}" for t, n in per_task.items())
    lines = ["# Localization study: which neurons make a task expert?", "",
             f"Model `{cfg['model']}`, adapted by "
             + ("prompt tuning (frozen backbone; " if cfg.get("adapt", "prompt") == "prompt" else
                f"fine-tuning (backbone, prompt and head; lr {cfg.get('lr') or 'default'}; ")
             + f"{cfg['prompt_length']} soft tokens, {cfg['epochs']} epochs on "
             f"at most {cfg['max_train']} training examples, max length {cfg['max_length']}), DoE and baselines on "
             f"{cfg['calib_examples']} calibration examples, per-layer budget, then {cfg['recovery_epochs']} recovery "
             f"epoch(s) of prompt + head on {cfg['recovery_examples']} examples. Values are x100 on the reporting "
             f"split. Environment: {header['cpu']}, torch {header['versions'].get('torch')}.", "",
             f"Runs recorded: {len(rows)} of {expected * len(cfg['tasks'])} planned ({progress}).", ""]
    for task in tasks:
        d = dense[task]
        lines += [f"## {task} — {d['metric']} on {d['split']} (n={d['split_size']})", "",
                  f"Dense adapted model: **{100 * d['value']:.1f}**"
                  + (f" (always answering the majority label '{d['majority']['label']}': "
                     f"{100 * d['majority']['value']:.1f})." if "majority" in d else ".")
                  + (f" Note: {' '.join(d['notes'])}" if d.get("notes") else ""), "",
                  "| method | " + " | ".join(f"p={r:g}" for r in cfg["rates"]) + " |",
                  "|---|" + "---:|" * len(cfg["rates"])]
        for method in cfg["methods"]:
            cells = []
            for rate in cfg["rates"]:
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
        lines += [f"## Average over {', '.join(tasks)}: {title}", "",
                  "| method | " + " | ".join(f"p={r:g}" for r in cfg["rates"]) + " |",
                  "|---|" + "---:|" * len(cfg["rates"]),
                  "| dense | " + " | ".join(f"{100 * np.mean([dense[t]['value'] for t in tasks]):.1f}"
                                             for _ in cfg["rates"]) + " |"]
        for method in cfg["methods"]:
            cells = [_average(rows, tasks, method, rate, field) for rate in cfg["rates"]]
            best = [max((_average(rows, tasks, m, rate, field), m) for m in cfg["methods"])[1] for rate in cfg["rates"]]
            lines.append(f"| {method} | " + " | ".join(
                "—" if np.isnan(c) else (f"**{100 * c:.1f}**" if b == method else f"{100 * c:.1f}")
                for c, b in zip(cells, best)) + " |")
        lines += ["", "Bold: the best method at that rate.", ""]
    return lines


def _ablations(rows, dense, tasks) -> list[str]:
    variants = sorted({r["variant"] for r in rows if r["variant"] != "default"})
    if not variants:
        return []
    lines = [f"## DoE ablations at p={ABLATION_RATE}", "",
             "| variant | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    base = []
    for task in tasks:
        mean, _, n = _table(rows, task, "doe", ABLATION_RATE)
        before, _, _ = _table(rows, task, "doe", ABLATION_RATE, "value_before_recovery")
        base.append(f"{100 * mean:.1f} ({100 * before:.1f})" if n else "—")
    lines.append("| default (mean over tokens, per-layer, no folding, attribution on the adapted model, calib 256) | "
                 + " | ".join(base) + " |")
    for variant in variants:
        cells = []
        for task in tasks:
            match = [r for r in rows if r["task"] == task and r["variant"] == variant]
            cells.append(f"{100 * match[0]['value']:.1f} ({100 * match[0]['value_before_recovery']:.1f})" if match else "—")
        label = VARIANT_LABELS.get(variant, variant)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", "Cells: after recovery (before recovery = the 'without recovery' ablation).", ""]


VARIANT_LABELS = {"no-prompt-tuning": "no-prompt-tuning (attribution on the un-adapted backbone; the adapted model "
                                      "is pruned)"}


def _targets(rows, dense, tasks, cfg) -> list[str]:
    run_minutes = sum(r.get("seconds", 0.0) for r in rows) / 60
    lines = ["## Targets", "", f"(The {len(rows)} pruning runs took {run_minutes:.0f} min of compute in total, adaptation "
             "and calibration passes not included.)", ""]
    lines += _target_lines(rows, dense, tasks, cfg)
    learned = [t for t in tasks if "majority" in dense[t] and dense[t]["value"] - dense[t]["majority"]["value"] >= 0.05]
    if learned and learned != tasks:
        lines += ["", f"On the tasks the dense model learned (at least 5 points above always answering the majority "
                      f"label: {', '.join(learned)}):", ""]
        lines += _target_lines(rows, dense, learned, cfg)
    return lines + [""]


def _target_lines(rows, dense, tasks, cfg) -> list[str]:
    lines = []
    if ABLATION_RATE in cfg["rates"] and tasks:
        gaps = {t: 100 * (dense[t]["value"] - _table(rows, t, "doe", ABLATION_RATE)[0]) for t in tasks}
        if not any(np.isnan(list(gaps.values()))):
            worst = max(gaps.values())
            lines.append(f"- DoE at p=0.65 within 1.0 point of dense on every task: "
                         f"{'met' if worst <= 1.0 else 'missed'} (loss per task: "
                         + ", ".join(f"{t} {g:+.1f}" for t, g in gaps.items()) + ")")
            mean_gap = float(np.mean(list(gaps.values())))
            lines.append(f"- within 0.5 on average: {'met' if mean_gap <= 0.5 else 'missed'} "
                         f"(average loss {mean_gap:+.1f} points)")
    for rate in (0.8, 0.9):
        if rate not in cfg["rates"]:
            continue
        doe = _average(rows, tasks, "doe", rate)
        others = {m: _average(rows, tasks, m, rate) for m in cfg["methods"] if m != "doe"}
        if not others or np.isnan(doe) or any(np.isnan(list(others.values()))):
            continue
        best = max(others, key=others.get)
        lines.append(f"- DoE beats every baseline on the average at p={rate:g}: "
                     f"{'met' if doe > others[best] else 'missed'} (DoE {100 * doe:.1f}, best baseline {best} "
                     f"{100 * others[best]:.1f})")
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
        for method in cfg["methods"]:
            points = [(rate, *_table(rows, task, method, rate)[:2]) for rate in cfg["rates"]]
            points = [p for p in points if not np.isnan(p[1])]
            if points:
                xs, ys, es = zip(*points)
                ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="o", capsize=2,
                            label=method, linewidth=2.2 if method == "doe" else 1.0)
        ax.axhline(100 * dense[task]["value"], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_title(f"{task} ({dense[task]['metric']}, n={dense[task]['split_size']})")
        ax.set_xlabel("pruning rate (share of FFN neurons removed)")
        ax.set_ylabel(f"{dense[task]['metric']} x100 after recovery")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "localization.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
