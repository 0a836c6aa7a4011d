"""The localization study: which neuron scorer keeps a task's accuracy after pruning?

By default every run is made the way ``doe build`` makes its experts (:class:`~doe_export.specs.Flow`'s
defaults: fine-tuning, aligned widths, two epochs of distillation recovery), with the training data
each task needs to be learned (``train_sizes``: the whole split where 2,000 examples are too few).

For every task: adapt once (cached), gather calibration statistics once per calibration size
(cached), then for every method x pruning rate x seed prune a copy of the adapted model, measure
the metric before and after recovery, and append one record to ``localization.jsonl`` with the
test predictions, so the report can pair any two runs item by item (bootstrap intervals). Records already present are not recomputed, so a stopped study resumes and
re-rendering the report (:mod:`doe_export.study_report`) never retrains.

Ablations of DoE at rate 0.65: max over tokens, global budget, bias folding, attribution without
adaptation (on the un-adapted model), calibration sizes; "without recovery" is the
``before_recovery`` value every record carries.

Every run goes through the stage API with the study's :class:`~doe_export.specs.Flow`; the header of
the records holds the whole config, and :meth:`StudyConfig.from_json` rebuilds identical specs from it.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import records as record_io
from .console import log as default_log
from .errors import ConfigError, TaskDataError
from .records import from_json, to_json
from .specs import (
    AdaptMode,
    AdaptSpec,
    Budget,
    DataSpec,
    ExtraLabels,
    Flow,
    PruneSpec,
    Rank,
    RecoverySpec,
    Rounding,
    TokenAgg,
    TrainedParams,
)
from .tasks import TaskData

METHODS = ("doe", "random", "activation", "gradient", "magnitude", "taylor", "skill")
ABLATION_RATE = 0.65
# DoE's variants at ABLATION_RATE (with the calibration sizes, "calib-N"): token aggregation by max, one budget
# over all layers, bias folding, attribution on the un-adapted backbone, ranking by mean |h*g| instead of
# |mean h*g| (no cancellation between items), the rate reached in two steps with recovery after each; and three
# recovery levers on DoE's expert: hidden-state distillation (HIDDEN_DISTILL_WEIGHT), 4 recovery epochs, and
# distillation on AUGMENT_COPIES perturbed copies of each training text besides the texts themselves, and
# recovery on up to MORE_DATA training items past the adaptation's (only where the split has them), with their
# labels ("more-data") or labelled by the dense model ("more-texts": what unlabelled text would give), and on
# up to MORE_DATA texts of another task, labelled by the dense model ("other-texts", OTHER_TEXTS: for the tasks
# whose own split the adaptation uses up)
ABLATIONS = (
    "max-tokens",
    "global-budget",
    "fold-bias",
    "no-prompt-tuning",
    "mean-abs",
    "gradual-2",
    "hidden-distill",
    "recovery-4",
    "augment-2",
    "more-data",
    "more-texts",
    "other-texts",
)
HIDDEN_DISTILL_WEIGHT = 1.0  # the "hidden-distill" variant's weight: the term starts near the logit loss's size
AUGMENT_COPIES = 2  # the "augment-2" variant's perturbed copies per training text: three times the recovery time
MORE_DATA = 8000  # the "more-data" variant's training items past the adaptation's: five times SST-2's 2,000
MORE_DATA_VARIANTS = ("more-data", "more-texts")  # run only where the training split has items left over
# the task whose training texts the "other-texts" variant distills on, for the tasks it runs on: SNLI's pairs
# for the pair tasks (RTE's dense model also trains on them first), SST-2's sentences for CoLA
OTHER_TEXTS = {"rte": "snli", "mrpc": "snli", "qnli": "snli", "cola": "sst2"}
ALL_ABLATIONS = (*ABLATIONS, "calib")  # what StudyConfig.ablations may name; "calib": the calibration sizes


def first_study_flow() -> Flow:
    """The flow of the first studies: prompt tuning (20 soft tokens, 2 epochs, 1,024 examples, 64 tokens),
    then one epoch of prompt + head recovery on 500 examples, no teacher, the last epoch kept; widths as the
    rate gives them (no alignment)."""
    return Flow(
        data=DataSpec(max_train=1024, max_length=64),
        adapt=AdaptSpec(mode=AdaptMode.PROMPT, prompt_length=20, epochs=2),
        prune=PruneSpec(round_to=1, rounding=Rounding.UP),
        recovery=RecoverySpec(
            epochs=1, params=TrainedParams.PROMPT, distill=0.0, max_examples=500, select_on_dev=False
        ),
    )


# Training examples each task needs for its dense model to be learned, where doe build's 2,000 are too few
# (None: the whole training split). CoLA at 2,000 examples reached MCC 0.08, with its 8,551 0.31
# (benchmarks/results/builds/cola-full.json); RTE has 2,490 and MRPC 3,668, so "all" costs them little.
TRAIN_SIZES: dict[str, int | None] = {"cola": None, "rte": None, "mrpc": None}


@dataclass(frozen=True)
class StudyConfig:
    """Which runs the study makes (tasks, rates, methods, seeds, ablations) and the flow they share.

    ``seeds``: the runs of every method at every rate (a seed changes the recovery's shuffling, and for
    ``random`` the neurons drawn); ``random`` runs at least ``random_seeds``. ``train_sizes``: a task's
    training examples where they differ from the flow's ``max_train`` (None: the whole split)."""

    tasks: tuple[str, ...] = ("sst2", "mrpc", "rte", "cola", "qnli", "bbc-news")
    rates: tuple[float, ...] = (0.5, 0.65, 0.8, 0.9)
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0,)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    ablation_calib_sizes: tuple[int, ...] = (64, 1024)
    # the DoE variants run at ABLATION_RATE: names from ABLATIONS, "calib" for the ablation_calib_sizes (older
    # records say True for all of them, False for none)
    ablations: tuple[str, ...] = ALL_ABLATIONS
    train_sizes: dict[str, int | None] = dataclasses.field(default_factory=lambda: dict(TRAIN_SIZES))
    # a task's intermediate training task (AdaptSpec.intermediate), e.g. {"rte": "snli"}; none by default
    intermediates: dict[str, str] = dataclasses.field(default_factory=dict)
    flow: Flow = dataclasses.field(default_factory=Flow)

    def __post_init__(self) -> None:
        if isinstance(self.ablations, bool):
            object.__setattr__(self, "ablations", ALL_ABLATIONS if self.ablations else ())
        for name in ("tasks", "rates", "methods", "seeds", "random_seeds", "ablation_calib_sizes", "ablations"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = sorted(set(self.ablations) - set(ALL_ABLATIONS))
        if unknown:
            raise ConfigError(
                f"unknown ablations {unknown}; available: {', '.join(ABLATIONS)}, calib (the calibration sizes)"
            )
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; available: {', '.join(METHODS)}")
        if not self.rates or not all(0 < r < 1 for r in self.rates):
            raise ConfigError(f"study rates must be in (0, 1), got {self.rates}")
        if not self.seeds or not all(isinstance(s, int) and s >= 0 for s in (*self.seeds, *self.random_seeds)):
            raise ConfigError(f"study seeds must be integers >= 0, got {self.seeds} and {self.random_seeds}")
        for task in self.intermediates:
            self.flow_for(task)  # AdaptSpec checks the name, and refuses it with prompt tuning
        for task, size in self.train_sizes.items():
            if size is not None and not (isinstance(size, int) and size >= 1):
                raise ConfigError(
                    f"training size of task {task!r} must be >= 1 or none (the whole split), got {size!r}"
                )

    @property
    def seed(self) -> int:
        return self.flow.prune.seed

    def flow_for(self, task: str) -> Flow:
        """The flow of ``task``'s runs: the shared flow with the task's training size and intermediate task."""
        flow = self.flow
        if task in self.train_sizes:
            flow = replace(flow, data=replace(flow.data, max_train=self.train_sizes[task]))
        if task in self.intermediates:
            flow = replace(flow, adapt=replace(flow.adapt, intermediate=self.intermediates[task]))
        return flow

    def merged(self, other: StudyConfig) -> StudyConfig:
        """The runs of both configs (``self`` first, then what ``other`` adds), ``other``'s flow and per-task
        settings: the header of records that several invocations extended, so the report shows all of them."""

        def union(a: tuple, b: tuple) -> tuple:
            return (*a, *(x for x in b if x not in a))

        return replace(
            other,
            tasks=union(self.tasks, other.tasks),
            rates=tuple(sorted(set(self.rates) | set(other.rates))),
            methods=tuple(m for m in METHODS if m in self.methods or m in other.methods),
            seeds=tuple(sorted(set(self.seeds) | set(other.seeds))),
            random_seeds=tuple(sorted(set(self.random_seeds) | set(other.random_seeds))),
            ablation_calib_sizes=tuple(sorted(set(self.ablation_calib_sizes) | set(other.ablation_calib_sizes))),
            ablations=tuple(a for a in ALL_ABLATIONS if a in self.ablations or a in other.ablations),
            train_sizes={**self.train_sizes, **other.train_sizes},
            intermediates={**self.intermediates, **other.intermediates},
        )

    def seeds_of(self, method: str) -> tuple[int, ...]:
        """The seeds ``method`` runs with at every rate."""
        return tuple(sorted({*self.seeds, *self.random_seeds})) if method == "random" else self.seeds

    def recovery_spec(self, run: dict) -> RecoverySpec:
        """The recovery of one run: the flow's, its seed moved by the run's (seed 0: exactly doe build's); the
        recovery variants change what they name."""
        spec = replace(self.flow.recovery, seed=self.flow.recovery.seed + run["seed"])
        if run.get("variant") == "hidden-distill":
            return replace(spec, hidden_distill=HIDDEN_DISTILL_WEIGHT)
        if run.get("variant") == "recovery-4":
            return replace(spec, epochs=4)
        if run.get("variant") == "augment-2":
            return replace(spec, augment=AUGMENT_COPIES)
        if run.get("variant") == "more-data":
            return replace(spec, extra_examples=MORE_DATA)
        if run.get("variant") == "more-texts":
            return replace(spec, extra_examples=MORE_DATA, extra_labels=ExtraLabels.DENSE)
        if run.get("variant") == "other-texts":
            source = OTHER_TEXTS[run["task"]]
            return replace(spec, extra_examples=MORE_DATA, extra_labels=ExtraLabels.DENSE, extra_from=source)
        return spec

    def prune_spec(self, run: dict) -> PruneSpec:
        """The pruning spec of one run (method x rate x seed, or a DoE ablation variant)."""
        variant = run["variant"]
        calib = int(variant.split("-")[1]) if variant.startswith("calib-") else self.flow.prune.calib_examples
        return replace(
            self.flow.prune,
            scorer=run["method"],
            rate=run["rate"],
            seed=run["seed"],
            calib_examples=calib,
            token_agg=TokenAgg.MAX if variant == "max-tokens" else TokenAgg.MEAN,
            budget=Budget.GLOBAL if variant == "global-budget" else Budget.PER_LAYER,
            fold_bias=variant == "fold-bias",
            rank=Rank.MEAN_ABS if variant == "mean-abs" else self.flow.prune.rank,
            steps=2 if variant == "gradual-2" else self.flow.prune.steps,
        )

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, data: dict) -> StudyConfig:
        """The config of a record header: this layout, or the flat one of the first studies' records."""
        if "flow" in data or not any(key in data for key in LEGACY_FLOW_KEYS):
            # records made before per-task training sizes existed trained every task on the flow's max_train
            return from_json(cls, {"train_sizes": {}, "intermediates": {}, **data})
        return legacy_config(data)


# The flat keys of the first studies' records (before the flow was a Flow of specs), with their defaults.
LEGACY_FLOW_KEYS = {
    "model": Flow().model,
    "adapt": "prompt",
    "lr": None,
    "calib_examples": 256,
    "prompt_length": 20,
    "epochs": 2,
    "recovery_epochs": 1,
    "max_train": 1024,
    "recovery_examples": 500,
    "max_dev": 200,
    "max_eval": 1000,
    "max_length": 64,
    "batch_size": 16,
    "seed": 0,
    "recovery_params": "prompt",
    "distill": 0.0,
    "temperature": 2.0,
    "recovery_on_dev": False,
}


def legacy_config(data: dict) -> StudyConfig:
    """A StudyConfig from a flat config of the first studies' records (settings added later: their defaults)."""
    flat = {**LEGACY_FLOW_KEYS, **{k: v for k, v in data.items() if k in LEGACY_FLOW_KEYS}}
    seed, batch = flat["seed"], flat["batch_size"]
    flow = Flow(
        model=flat["model"],
        data=DataSpec(
            max_train=flat["max_train"],
            max_dev=flat["max_dev"],
            max_eval=flat["max_eval"],
            max_length=flat["max_length"],
            seed=seed,
        ),
        adapt=AdaptSpec(
            mode=flat["adapt"],
            prompt_length=flat["prompt_length"],
            epochs=flat["epochs"],
            lr=flat["lr"],
            batch_size=batch,
            seed=seed,
        ),
        prune=PruneSpec(
            calib_examples=flat["calib_examples"], batch_size=batch, seed=seed, round_to=1, rounding=Rounding.UP
        ),
        recovery=RecoverySpec(
            epochs=flat["recovery_epochs"],
            params=flat["recovery_params"],
            distill=flat["distill"],
            temperature=flat["temperature"],
            batch_size=batch,
            max_examples=flat["recovery_examples"],
            select_on_dev=flat["recovery_on_dev"],
            seed=seed + 1,
        ),
    )
    runs: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k not in LEGACY_FLOW_KEYS
    }
    return StudyConfig(**{"train_sizes": {}, "intermediates": {}, **runs}, flow=flow)


QUICK_FLOW = Flow(
    model="tiny",
    data=DataSpec(max_train=48, max_dev=8, max_eval=24, max_length=24),
    adapt=AdaptSpec(mode=AdaptMode.PROMPT, prompt_length=4, epochs=1, batch_size=8),
    prune=PruneSpec(calib_examples=16, batch_size=8),
    recovery=RecoverySpec(
        epochs=1, params=TrainedParams.PROMPT, distill=0.0, batch_size=8, max_examples=24, select_on_dev=False, seed=1
    ),
)
QUICK: dict[str, Any] = dict(
    tasks=("toy",), rates=(0.5, 0.8), random_seeds=(0, 1), ablation_calib_sizes=(8,), train_sizes={}, flow=QUICK_FLOW
)


def run_specs(config: StudyConfig) -> list[dict]:
    """Every run of the study for one task, as the fields that identify its record."""
    specs = []
    for rate in config.rates:
        for method in config.methods:
            for seed in config.seeds_of(method):
                specs.append({"method": method, "variant": "default", "rate": rate, "seed": seed})
    if config.ablations:  # every variant on every seed of ``seeds``, as DoE's own runs
        variants = [v for v in ABLATIONS if v in config.ablations]
        variants += [f"calib-{size}" for size in config.ablation_calib_sizes] if "calib" in config.ablations else []
        for seed in config.seeds:
            if ABLATION_RATE not in config.rates or "doe" not in config.methods:  # what the variants compare with
                specs.append({"method": "doe", "variant": "default", "rate": ABLATION_RATE, "seed": seed})
            specs += [{"method": "doe", "variant": v, "rate": ABLATION_RATE, "seed": seed} for v in variants]
    return specs


def record_key(record: dict) -> tuple:
    return (record["task"], record["method"], record["variant"], record["rate"], record["seed"])


def majority_baseline(data: TaskData, flow: Flow) -> dict:
    """The metric of always answering the most frequent training label, on the reporting split."""
    from . import evaluate

    counts = Counter(data.train.head(flow.data.max_train).labels)
    label = max(sorted(counts), key=counts.get)  # type: ignore[arg-type]
    test = data.test.sample(flow.data.max_eval, flow.data.seed)
    return {"label": data.labels[label], "value": evaluate.metric_value(data.metric, test.labels, [label] * len(test))}


def run_record(runner: Any, config: StudyConfig, spec: dict) -> dict:
    """One run of the study (``spec`` from :func:`run_specs`) on a task's runner, as its record."""
    start = time.perf_counter()
    prune_spec = config.prune_spec(spec)
    recovery_spec = config.recovery_spec({"task": runner.data.name, **spec})
    stats = runner.stats(prune_spec.calib_examples, adapted=spec["variant"] != "no-prompt-tuning")
    result = runner.expert(
        prune_spec,
        recovery_spec,
        stats=stats if prune_spec.needs() else None,
        desc=f"{spec['method']}/{spec['variant']} p={spec['rate']:g}",
    )
    metric = runner.data.metric
    return {
        "kind": "run",
        "task": runner.data.name,
        **spec,
        "metric": metric,
        "before_recovery": result.before.details,
        "after_recovery": result.after.details,
        "value": result.after.test,
        "value_before_recovery": result.before.test,
        "recovery_seed": recovery_spec.seed,
        "preds": list(result.after.test_preds or ()),  # test predictions: runs pair item by item in the report
        "preds_before_recovery": list(result.before.test_preds or ()),
        "split": runner.test.name,
        "split_size": len(runner.test),
        "calibration_examples": result.attribution.scores.examples,
        "recovery_examples": result.recovery["examples"],  # more than the flow's with more-data or augment-2
        "ffn_widths": result.report["ffn_widths"],
        "params_after": result.report["params_after"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def _check_sizes(config: StudyConfig, datasets: list[TaskData]) -> None:
    need = max(
        (config.flow.prune.calib_examples, *(config.ablation_calib_sizes if "calib" in config.ablations else ()))
    )
    for data in datasets:
        available = len(data.train.head(config.flow_for(data.name).data.max_train))
        if need > available:
            raise TaskDataError(
                f"task {data.name!r}: calibration needs {need} examples but the train split ({data.train.name}, "
                f"capped at {config.flow_for(data.name).data.max_train}) has {available}; lower the calibration sizes"
            )


def _changed_flow(old: Flow, new: Flow) -> list[str]:
    """The settings (spec.field) in which two flows differ."""
    changed = ["model"] if old.model != new.model else []
    for part in ("data", "adapt", "prune", "recovery"):
        a, b = to_json(getattr(old, part)), to_json(getattr(new, part))
        changed += [f"{part}.{key}" for key in a if a[key] != b[key]]
    return changed


def _open_records(config: StudyConfig, records_path: Path) -> list[dict]:
    """The records so far (a header first), refusing to extend records made with another flow."""
    import torch

    if not records_path.is_file():
        header = {**record_io.environment([torch.get_num_threads()], []), "suite": "localization"}
        return [{**header, "config": config.to_json()}]
    existing = record_io.read_jsonl(records_path)
    old = StudyConfig.from_json(existing[0].get("config", {}))
    changed = _changed_flow(old.flow, config.flow)
    changed += [
        f"train_sizes.{task}"
        for task in sorted(set(old.train_sizes) | set(config.train_sizes))
        if old.flow_for(task).data.max_train != config.flow_for(task).data.max_train
        and any(r.get("task") == task for r in existing[1:])
    ]
    changed += [
        f"intermediates.{task}"
        for task in sorted(set(old.intermediates) | set(config.intermediates))
        if old.flow_for(task).adapt.intermediate != config.flow_for(task).adapt.intermediate
        and any(r.get("task") == task for r in existing[1:])
    ]
    if changed:
        raise ConfigError(
            f"{records_path} holds runs made with other settings of {changed}; its runs would not be comparable. Use "
            "another --out, or delete the file to start over"
        )
    # the set of runs (tasks, methods, rates, seeds) grows; the header keeps every invocation's, for the report
    existing[0]["config"] = old.merged(config).to_json()
    return existing


def _dense_record(runner: Any, config: StudyConfig, data: TaskData) -> dict:
    score = runner.score(runner.adapted)
    dense = score.details
    return {
        "kind": "dense",
        "task": data.name,
        "method": "dense",
        "variant": "default",
        "rate": 0.0,
        "seed": config.seed,
        "metric": data.metric,
        "after_recovery": dense,
        "value": dense[data.metric],
        "preds": list(score.test_preds or ()),
        "labels": list(runner.test.labels),  # the reporting split's gold labels, item by item (the intervals)
        "split": runner.test.name,
        "split_size": len(runner.test),
        "train_size": len(runner.train),
        "intermediate": config.flow_for(data.name).adapt.intermediate,
        "notes": data.notes,
        "majority": majority_baseline(data, config.flow_for(data.name)),
    }


def _check_same_dense(runner: Any, recorded: dict, records_path: Path) -> None:
    """New runs are paired item by item with the recorded dense model's predictions: the dense model this
    invocation adapted (or found in its cache) must be that model. A cache lost between sessions is retrained;
    this says whether the retraining reproduced it."""
    preds = list(runner.score(runner.adapted).test_preds or ())
    differ = sum(a != b for a, b in zip(preds, recorded["preds"], strict=False))
    if len(preds) != len(recorded["preds"]) or differ:
        raise ConfigError(
            f"{records_path}: the dense model of task {recorded['task']!r} adapted now ({runner.path}) does not "
            f"reproduce the recorded one: {differ} of {len(recorded['preds'])} test predictions differ "
            f"({len(preds)} now). New runs would be compared against another model than the recorded runs. Use the "
            "cache the records were made with (--cache-dir), or another --out to start the task's records over"
        )


def run_study(
    config: StudyConfig,
    out_dir: Path,
    cache: Path,
    *,
    data_dir=None,
    progress: bool = True,
    datasets: list[TaskData] | None = None,
    loaded=None,
    log=None,
) -> Path:
    from .loading import load_model
    from .runner import TaskRunner
    from .study_report import render
    from .tasks import load_task

    log = log or default_log
    out_dir = Path(out_dir)
    records_path = out_dir / "localization.jsonl"
    # All data is loaded and checked before any training starts.
    datasets = datasets or [load_task(task, config.flow.data.seed, data_dir) for task in config.tasks]
    _check_sizes(config, datasets)
    records = _open_records(config, records_path)
    done = {record_key(r) for r in records[1:] if r.get("kind") in ("run", "dense")}
    loaded = loaded or load_model(config.flow.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_io.write_jsonl(records_path, records)
    for data in datasets:
        for record in records:  # older records may lack the baseline; it needs the data only
            if record.get("kind") == "dense" and record["task"] == data.name and "majority" not in record:
                record["majority"] = majority_baseline(data, config.flow_for(data.name))
                record_io.write_jsonl(records_path, records)
        specs = [s for s in run_specs(config) if record_key({"task": data.name, **s}) not in done]
        if not len(data.train.after(config.flow_for(data.name).data.max_train)):
            skipped = sorted({s["variant"] for s in specs} & set(MORE_DATA_VARIANTS))
            if skipped:
                log(f"[{data.name}] {', '.join(skipped)} not run: the adaptation trains on the whole training split")
            specs = [s for s in specs if s["variant"] not in MORE_DATA_VARIANTS]
        if data.name not in OTHER_TEXTS and any(s["variant"] == "other-texts" for s in specs):
            log(f"[{data.name}] other-texts not run: no other task's texts are set for it (study.OTHER_TEXTS)")
            specs = [s for s in specs if s["variant"] != "other-texts"]
        dense_key = (data.name, "dense", "default", 0.0, config.seed)
        if not specs and dense_key in done:
            continue
        runner = TaskRunner(
            config.flow_for(data.name),
            data,
            loaded,
            Path(cache),
            progress=progress,
            data_dir=None if data_dir is None else str(data_dir),
        )
        if dense_key not in done:
            records.append(_dense_record(runner, config, data))
            record_io.write_jsonl(records_path, records)
            log(f"[{data.name}] dense {config.flow.adapt.mode}-adapted {data.metric} {records[-1]['value']:.4f}")
        else:
            recorded = next(r for r in records[1:] if r.get("kind") == "dense" and record_key(r) == dense_key)
            _check_same_dense(runner, recorded, records_path)
        for index, spec in enumerate(specs, 1):
            record = run_record(runner, config, spec)
            records.append(record)
            record_io.write_jsonl(records_path, records)  # after every run: a stopped study resumes here
            log(
                f"[{data.name}] {index}/{len(specs)} {spec['method']}/{spec['variant']} p={spec['rate']:g} "
                f"seed {spec['seed']}: {record['value_before_recovery']:.4f} -> {record['value']:.4f}"
            )
    render(records_path, out_dir)
    return records_path


__all__ = [
    "ABLATIONS",
    "ABLATION_RATE",
    "ALL_ABLATIONS",
    "AUGMENT_COPIES",
    "HIDDEN_DISTILL_WEIGHT",
    "METHODS",
    "MORE_DATA",
    "MORE_DATA_VARIANTS",
    "OTHER_TEXTS",
    "QUICK",
    "TRAIN_SIZES",
    "StudyConfig",
    "first_study_flow",
    "legacy_config",
    "majority_baseline",
    "record_key",
    "run_record",
    "run_specs",
    "run_study",
]
