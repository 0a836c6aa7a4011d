"""``doe build``: the whole flow for a list of tasks, through the stage API (:mod:`doe_export.stages`).

One :class:`BuildConfig` (frozen; the command line's settings) is turned into one spec per stage;
:func:`build` loads and checks every task's data first, then builds each task's bundle and returns
one :class:`TaskResult` per task with its metrics, sizes and per-stage wall times.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from doe_runtime.bundle import check_task_name

from . import evaluate, stages
from .archs import arch_for
from .console import Timer, log, package_versions
from .errors import ConfigError
from .export import BundleWriter, manifest_for
from .loading import DEFAULT_MODEL, LoadedModel, fast_tokenizer, load_model
from .tasks import TaskData, UserTask, load_task

DEFAULT_TASKS = ("bbc-news", "snli")

__all__ = ["BuildConfig", "DEFAULT_TASKS", "TaskResult", "build", "build_task", "check_task", "package_versions",
           "results_as_dicts", "summary_table"]


@dataclass(frozen=True)
class BuildConfig:
    """The settings of ``doe build`` (one per flag); :meth:`specs` turns them into stage specs."""

    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = DEFAULT_TASKS
    data_dir: str | None = None
    cache_dir: str | None = None
    out_dir: str = "artifacts"
    adapt: str = "finetune"  # "finetune" (prompt-free graphs) | "prompt" (the paper: soft prompt + head)
    prompt_length: int = 20  # soft-prompt positions, prompt mode only
    pooling: str | None = None
    epochs: int = 3
    lr: float | None = None
    batch_size: int = 16
    scorer: str = "doe"
    token_agg: str = "mean"
    rate: float = 0.65
    layer_types: str = "ffn"
    head_rate: float | None = None
    budget: str = "per-layer"
    round_to: int = 1
    fold_bias: bool = False
    calib_examples: int = 256
    recovery_epochs: int = 2
    recovery_params: str | None = None  # None: "all" after fine-tuning, "prompt" after prompt tuning
    distill: float = 0.5
    temperature: float = 2.0
    recovery_lr: float | None = None
    max_train: int | None = 2000
    max_dev: int | None = 200
    max_eval: int | None = 1000
    max_length: int = 128
    seed: int = 0
    tolerance: float = 1e-4
    exporter: str = "torchscript"
    attention: str = "eager"
    fuse: bool = False
    fp16: bool = True
    int8: bool = True
    max_loss: float | None = None  # points: the largest rate whose dev metric stays within this (rate ignored)
    train_budget: float | None = None  # minutes for the dense adaptation: as many training examples as fit
    search_rates: tuple[float, ...] = stages.SEARCH_RATES
    progress: bool = True

    def specs(self) -> tuple[stages.DataSpec, stages.AdaptSpec, stages.PruneSpec, stages.RecoverySpec,
                             stages.ExportSpec]:
        data = stages.DataSpec(self.max_train, self.max_dev, self.max_eval, self.max_length, self.seed)
        adapt = stages.AdaptSpec(self.adapt, self.prompt_length if self.adapt == "prompt" else 0, self.pooling,
                                 self.epochs, self.lr, self.batch_size, self.seed)
        prune = stages.PruneSpec(self.scorer, self.token_agg, "abs-of-mean", self.rate, self.layer_types,
                                 self.head_rate, self.budget, self.round_to, self.fold_bias, self.calib_examples,
                                 self.batch_size, self.seed)
        params = self.recovery_params or ("prompt" if self.adapt == "prompt" else "all")
        recovery = stages.RecoverySpec(self.recovery_epochs, params, self.distill, self.temperature,
                                       self.recovery_lr, self.batch_size, None, True, self.seed + 1)
        export = stages.ExportSpec(self.exporter, self.attention, self.fuse, fp16=self.fp16, int8=self.int8,
                                   tolerance=self.tolerance)
        return data.check(), adapt.check(), prune.check(), recovery.check(), export.check()

    def check(self) -> "BuildConfig":
        if not self.tasks:
            raise ConfigError("no tasks given; pass --tasks (see `doe tasks`)")
        for task in self.tasks:
            check_task_name(task)
        self.specs()
        return self


@dataclass
class TaskResult:
    task: str
    metric: str
    test_split: str
    test_size: int
    dense: float
    pruned_no_recovery: float
    expert: float
    expert_onnx: float
    params_before: int
    params_after: int
    ffn_widths: list[int]
    head_counts: list[int]
    max_abs_diff: float
    bundle: str
    precisions: list[str] = field(default_factory=list)
    extra_positions: int = 0
    rate: float = 0.0
    bound_128: float = 1.0  # FLOP bound of the expert's widths and heads at 128 tokens
    seconds: dict[str, float] = field(default_factory=dict)


def check_task(config: BuildConfig, loaded: LoadedModel, data: TaskData) -> None:
    """Refuse settings that cannot work for this task and model, before anything trains."""
    spec_data, spec_adapt, spec_prune, _, _ = config.specs()
    available = len(data.train.head(spec_data.max_train))
    if spec_prune.calib_examples > available:
        raise ConfigError(
            f"task {data.name!r}: --calib-examples {spec_prune.calib_examples} exceeds the {available} training "
            f"examples available ({data.train.name}); lower --calib-examples or raise --max-train"
        )
    if spec_prune.layer_types != "ffn" and arch_for(loaded.backbone.config).heads_module is None:
        raise ConfigError(f"--layer-types {spec_prune.layer_types}: attention heads of model type "
                          f"{loaded.backbone.config.model_type!r} cannot be removed; use --layer-types ffn")
    max_positions = getattr(loaded.backbone.config, "max_position_embeddings", None)
    if max_positions and spec_adapt.prompt_length + spec_data.max_length > max_positions:
        raise ConfigError(
            f"prompt length {spec_adapt.prompt_length} + max length {spec_data.max_length} exceeds the model's "
            f"{max_positions} positions; lower --max-length or --prompt-length"
        )


def build_task(config: BuildConfig, loaded: LoadedModel, data: TaskData, return_models: bool = False):
    """Build one task's bundle; return its TaskResult, or with ``return_models`` (result, the dense
    adapted TaskModel, the expert TaskModel) — the benchmarks compare against that dense model."""
    timer = Timer()
    task = data.name
    check_task(config, loaded, data)
    spec_data, spec_adapt, spec_prune, spec_recovery, spec_export = config.specs()
    tokenizer = fast_tokenizer(loaded.hf_tokenizer, spec_data.max_length)
    splits = stages.Splits.of(data, spec_data)
    log(f"[{task}] train {len(splits.train)} / dev {len(splits.dev)} / test {len(splits.test)} ({splits.test.name}); "
        f"labels {data.labels}; metric {data.metric}")
    dense_model = stages.new_model(loaded, data, spec_adapt)
    with timer.stage("adapt"):
        adapt_record = stages.adapt(dense_model, tokenizer, splits, data.metric, spec_adapt, config.progress,
                                    f"[{task}] {spec_adapt.mode}")
    with timer.stage("evaluate"):
        dense = evaluate.evaluate_torch(dense_model, tokenizer, splits.test, data.metric)
    log(f"[{task}] dense {spec_adapt.mode}-adapted model: {data.metric} {dense:.4f} on {len(splits.test)} test "
        f"examples ({adapt_record['seconds']:.0f}s)")

    search = None
    with timer.stage("expert"):
        if config.max_loss is None:
            expert = stages.make_expert(dense_model, tokenizer, splits, data.metric, spec_prune, spec_recovery,
                                        config.progress, f"[{task}]")
        else:
            found = stages.search_rate(dense_model, tokenizer, splits, data.metric, spec_prune, spec_recovery,
                                       config.max_loss, config.search_rates, config.progress, f"[{task}]")
            expert, search = found.expert, found.record
            expert.before, expert.after = expert.before["test"], expert.after["test"]
            spec_prune = replace(spec_prune, rate=found.rate)
            log(f"[{task}] rate search chose p={found.rate:g} (budget {config.max_loss:g} points on "
                f"{splits.dev.name})")
    report = expert.report
    log(f"[{task}] pruned {spec_prune.layer_types} (FFN rate {spec_prune.rate:g}, head rate "
        f"{spec_prune.heads_removed:g}): params {report['params_before']:,} -> {report['params_after']:,}; FFN widths "
        f"{report['ffn_widths']}; heads {report['head_counts']}; {data.metric} before recovery {expert.before:.4f}")
    log(f"[{task}] expert after {spec_recovery.epochs} recovery epoch(s) ({spec_recovery.params}, distill "
        f"{spec_recovery.distill:g}): {data.metric} {expert.after:.4f}")
    for stage, seconds in expert.seconds.items():
        timer.seconds[stage] = seconds

    with timer.stage("export"):
        with BundleWriter(config.out_dir, task) as writer:
            exported = stages.export(expert.model, writer.folder, tokenizer, splits.test, data.metric, spec_export,
                                     len(data.labels))
            tokenizer.save(str(writer.folder / "tokenizer.json"))
            writer.write_manifest(_manifest(config, loaded, data, splits, expert, dense, adapt_record, exported,
                                            writer.folder, spec_prune, search))
    validation = exported.validation
    precisions = ["fp32"] + sorted(exported.onnx.get("variants", {}))
    log(f"[{task}] bundle {writer.path}: ORT max|diff| {validation['max_abs_diff']:.2e} at shapes "
        f"{validation['shapes']}; ORT {data.metric} {exported.metric_onnx:.4f}; precisions {precisions}"
        + (f"; left out: {exported.rejected}" if exported.rejected else ""))
    result = TaskResult(task, data.metric, splits.test.name, len(splits.test), dense, expert.before, expert.after,
                        exported.metric_onnx, report["params_before"], report["params_after"], report["ffn_widths"],
                        report["head_counts"], validation["max_abs_diff"], str(writer.path), precisions,
                        expert.model.prompt_length, spec_prune.rate, _bound(expert, 128), dict(timer.seconds))
    return (result, dense_model, expert.model) if return_models else result


def _bound(expert, tokens: int) -> float:
    from .bench.common import model_bound

    report, backbone = expert.report, expert.model.backbone.config
    return model_bound(backbone.hidden_size, report["ffn_widths_before"], report["head_counts_before"],
                       report["ffn_widths"], report["head_counts"], tokens + expert.model.prompt_length)


def _manifest(config, loaded, data, splits, expert, dense, adapt_record, exported, folder: Path, spec_prune,
              search: dict | None) -> dict:
    from .export import file_entry

    model = expert.model
    backbone = model.backbone.config
    report = expert.report
    local = Path(loaded.path).is_dir() and loaded.name == loaded.path  # a --model folder: record its name only
    quality = {"metric": data.metric, "split": splits.test.name, "size": len(splits.test), "dense": dense,
               "pruned_before_recovery": expert.before, "expert": expert.after, "expert_onnx": exported.metric_onnx}
    for precision, variant in exported.onnx.get("variants", {}).items():
        quality[f"expert_onnx_{precision}"] = variant["quality"]["value"]
    if exported.rejected:
        quality["variants_left_out"] = exported.rejected
    return manifest_for(
        task={"name": data.name, "input": data.input, "labels": data.labels, "metric": data.metric},
        base_model={"name": Path(loaded.name).name if local else loaded.name, "source": "local folder" if local
                    else "hub or package", "sha256": loaded.weights_sha256, "model_type": backbone.model_type},
        architecture={"family": model.spec.family, "num_layers": len(report["ffn_widths"]),
                      "hidden_size": backbone.hidden_size, "ffn_widths": report["ffn_widths"],
                      "ffn_widths_dense": report["ffn_widths_before"], "num_heads": report["head_counts"],
                      "num_heads_dense": report["head_counts_before"], "head_dim": model.spec.head_dim(model.backbone),
                      "pooling": model.pooling, "token_types_from_sep": model.sep_token_id is not None},
        adaptation={"mode": config.adapt, "prompt_length": model.prompt_length, "train": adapt_record,
                    "recovery": expert.recovery},
        pruning={"method": spec_prune.scorer, "scorer": expert.attribution.scores.info, "rate": spec_prune.rate,
                 "head_rate": spec_prune.heads_removed,
                 "layer_types": ["ffn", "attention"] if spec_prune.layer_types == "both" else [spec_prune.layer_types],
                 "budget": spec_prune.budget, "round_to": spec_prune.round_to, "fold_bias": spec_prune.fold_bias,
                 "calibration_examples": expert.attribution.scores.examples, "seed": spec_prune.seed,
                 "params_before": report["params_before"], "params_after": report["params_after"],
                 **({"search": search} if search else {})},
        onnx=exported.onnx,
        tokenizer={**file_entry(folder, "tokenizer.json"), "max_length": config.max_length,
                   "truncation": "longest_first", "padding": "longest in batch, right",
                   "pad_id": int(loaded.hf_tokenizer.pad_token_id), "pad_token": str(loaded.hf_tokenizer.pad_token)},
        validation=exported.validation,
        quality=quality,
        data={**data.describe(), "used": {"train": len(splits.train), "dev": len(splits.dev),
                                          "test": len(splits.test)}},
        versions=package_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def plan_training(config: BuildConfig, loaded: LoadedModel, data: TaskData) -> BuildConfig:
    """With ``train_budget``: the task's config with ``max_train`` set to the training examples whose
    adaptation fits the budget, from the throughput measured on a few batches of this task's data
    (``max_train``, if also given, stays an upper bound). Too small a budget is an error here,
    before anything trains."""
    from . import adapt

    if config.train_budget is None:
        return config
    if not config.train_budget > 0:
        raise ConfigError(f"--train-budget must be > 0 minutes, got {config.train_budget}")
    spec_data, spec_adapt, spec_prune, _, _ = config.specs()
    model = stages.new_model(loaded, data, spec_adapt)
    tokenizer = fast_tokenizer(loaded.hf_tokenizer, spec_data.max_length)
    rate = adapt.examples_per_second(model, tokenizer, data.train, spec_adapt.train_config())
    epochs = max(1, spec_adapt.epochs)
    fits = int(config.train_budget * 60 * rate / epochs)
    available = len(data.train) if spec_data.max_train is None else min(len(data.train), spec_data.max_train)
    need = max(spec_prune.calib_examples, spec_adapt.batch_size)
    if fits < need:
        raise ConfigError(
            f"task {data.name!r}: --train-budget {config.train_budget:g} min fits {fits} training examples per epoch "
            f"({rate:.1f} examples/s measured here, {epochs} epochs), fewer than the {need} that one epoch over the "
            f"calibration examples needs (about {need * epochs / rate / 60:.1f} min); raise --train-budget or lower "
            "--epochs / --calib-examples")
    chosen = min(fits, available)
    log(f"[{data.name}] --train-budget {config.train_budget:g} min: {rate:.1f} training examples/s measured -> "
        f"{chosen:,} of {len(data.train):,} training examples x {epochs} epoch(s), about "
        f"{chosen * epochs / rate / 60:.1f} min")
    return replace(config, max_train=chosen)


def build(config: BuildConfig, user_tasks: dict[str, UserTask] | None = None) -> list[TaskResult]:
    config.check()
    start = time.perf_counter()
    # Load (and validate) every task's data before any training starts: bad input fails fast.
    datasets = [load_task(task, config.seed, config.data_dir, config.cache_dir, user_tasks) for task in config.tasks]
    log(f"loading model {config.model}")
    loaded = load_model(config.model)
    plans = [plan_training(config, loaded, data) for data in datasets]  # budgets checked before training
    for plan, data in zip(plans, datasets):
        check_task(plan, loaded, data)
    results = []
    for plan, data in zip(plans, datasets):
        results.append(build_task(plan, loaded, data))
    log(f"built {len(results)} expert(s) in {time.perf_counter() - start:.0f}s")
    return results


def summary_table(results: list[TaskResult]) -> str:
    header = ("task", "metric", "test n", "dense", "expert", "expert ORT", "no-recovery", "rate (bound@128)",
              "params (M)", "FFN widths", "heads", "precisions", "max|diff|", "seconds", "bundle")
    rows = [header]
    for r in results:
        rows.append((
            r.task, r.metric, str(r.test_size), f"{r.dense:.4f}", f"{r.expert:.4f}", f"{r.expert_onnx:.4f}",
            f"{r.pruned_no_recovery:.4f}", f"{r.rate:g} (x{r.bound_128:.2f})",
            f"{r.params_before / 1e6:.2f} -> {r.params_after / 1e6:.2f}",
            ",".join(map(str, r.ffn_widths)), ",".join(map(str, r.head_counts)), ",".join(r.precisions),
            f"{r.max_abs_diff:.1e}", " ".join(f"{k}={v:.0f}" for k, v in r.seconds.items()), r.bundle,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_as_dicts(results: list[TaskResult]) -> list[dict]:
    return [asdict(r) for r in results]
