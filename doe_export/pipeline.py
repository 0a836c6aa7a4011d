"""``doe build``: the whole flow for a list of tasks, through the stage API (:mod:`doe_export.stages`).

One :class:`BuildConfig` (frozen; the five stage specs plus what the build itself decides) is
checked on construction; :func:`build` loads and checks every task's data first, then builds each
task's bundle and returns one :class:`~doe_export.summary.TaskResult` per task with its metrics,
sizes and per-stage wall times.
"""

from __future__ import annotations

import time
from dataclasses import replace

from . import evaluate, stages
from .archs import arch_for
from .bundle import BundleWriter
from .console import Timer, log
from .errors import ConfigError
from .flops import report_bound
from .loading import LoadedModel, fast_tokenizer, load_model
from .rate_search import search_rate
from .specs import DEFAULT_TASKS, BuildConfig, LayerTypes, PruneSpec
from .summary import BuiltTask, TaskResult, build_manifest, results_as_dicts, summary_table
from .tasks import Split, TaskData, UserTask, load_task
from .uncertainty import Figures, build_figures

__all__ = [
    "DEFAULT_TASKS",
    "BuildConfig",
    "TaskResult",
    "build",
    "build_task",
    "check_task",
    "results_as_dicts",
    "summary_table",
]


def check_task(config: BuildConfig, loaded: LoadedModel, data: TaskData) -> None:
    """Refuse settings that cannot work for this task and model, before anything trains."""
    available = len(data.train.head(config.data.max_train))
    if config.prune.calib_examples > available:
        raise ConfigError(
            f"task {data.name!r}: --calib-examples {config.prune.calib_examples} exceeds the {available} training "
            f"examples available ({data.train.name}); lower --calib-examples or raise --max-train"
        )
    wanted = config.recovery.extra_examples
    if wanted and config.recovery.extra_from is None:  # another task's texts are checked where they load
        spare = len(data.train.after(config.data.max_train))
        if not spare:
            raise ConfigError(
                f"task {data.name!r}: --recovery-extra {wanted:,} asks recovery for training items past the "
                f"adaptation's, and the adaptation takes all {available:,} ({data.train.name}); lower --max-train to "
                "leave some, or drop --recovery-extra"
            )
        if spare < wanted:
            log(
                f"[{data.name}] --recovery-extra {wanted:,}: the training split has {spare:,} past the adaptation's; recovery takes those"
            )
    if config.prune.layer_types is not LayerTypes.FFN and arch_for(loaded.backbone.config).heads_module is None:
        raise ConfigError(
            f"--layer-types {config.prune.layer_types}: attention heads of model type "
            f"{loaded.backbone.config.model_type!r} cannot be removed; use --layer-types ffn"
        )
    max_positions = getattr(loaded.backbone.config, "max_position_embeddings", None)
    prompt = config.adapt.prompt_length or 0
    if max_positions and prompt + config.data.max_length > max_positions:
        raise ConfigError(
            f"prompt length {prompt} + max length {config.data.max_length} exceeds the model's {max_positions} "
            "positions; lower --max-length or --prompt-length"
        )


def _expert(config: BuildConfig, dense_model, tokenizer, splits: stages.Splits, task: str):
    """The expert at the configured rate, or at the rate the accuracy budget chose: (expert, search
    record or None, the prune spec it was made with)."""
    if config.max_loss is None:
        expert = stages.make_expert(
            dense_model, tokenizer, splits, config.prune, config.recovery, progress=config.progress, desc=f"[{task}]"
        )
        return expert, None, config.prune
    found = search_rate(
        dense_model,
        tokenizer,
        splits,
        config.prune,
        config.recovery,
        max_loss=config.max_loss,
        rates=config.search_rates,
        rule=config.budget_rule,
        progress=config.progress,
        desc=f"[{task}]",
    )
    log(f"[{task}] rate search chose p={found.rate:g} (budget {config.max_loss:g} points on {splits.dev.name})")
    return found.expert, found.record, replace(config.prune, rate=found.rate)


def _log_expert(task: str, config: BuildConfig, expert: stages.ExpertResult, prune: PruneSpec) -> None:
    report, metric = expert.report, expert.after.metric
    log(
        f"[{task}] pruned {prune.layer_types} (FFN rate {prune.rate:g}, head rate {prune.heads_removed:g}): params "
        f"{report['params_before']:,} -> {report['params_after']:,}; FFN widths {report['ffn_widths']}; heads "
        f"{report['head_counts']}; {metric} before recovery {expert.before.test:.4f}"
    )
    extra = expert.recovery.get("extra_examples")
    source = expert.recovery.get("extra_from")
    more = ""
    if extra:
        more = (
            f", {extra:,} texts of {source} labelled by the dense model"
            if source
            else f", {extra:,} training items past the adaptation's"
        )
    log(
        f"[{task}] expert after {config.recovery.epochs} recovery epoch(s) ({config.recovery.params}, distill "
        f"{config.recovery.distill:g}{more}): {metric} {expert.after.test:.4f}"
    )


def build_task(
    config: BuildConfig, loaded: LoadedModel, data: TaskData, *, return_models: bool = False, extra: Split | None = None
):
    """Build one task's bundle; return its TaskResult, or with ``return_models`` (result, the dense
    adapted TaskModel, the expert TaskModel) — the benchmarks compare against that dense model. ``extra``: the
    texts of ``config.recovery.extra_from`` (:func:`stages.extra_texts`; loaded here when not given)."""
    timer = Timer()
    task = data.name
    check_task(config, loaded, data)
    tokenizer = fast_tokenizer(loaded.hf_tokenizer, config.data.max_length)
    splits = stages.Splits.of(data, config.data)
    if config.recovery.extra_from is not None:
        splits.spare = (
            extra
            if extra is not None
            else stages.texts_from(
                config.recovery.extra_from, data, config.data.seed, config.data_dir, config.cache_dir
            )
        )
        wanted = config.recovery.extra_examples
        if len(splits.spare) < wanted:
            log(
                f"[{task}] --recovery-extra {wanted:,}: {splits.spare.name} are {len(splits.spare):,}; recovery takes those"
            )
    log(
        f"[{task}] train {len(splits.train)} / dev {len(splits.dev)} / test {len(splits.test)} ({splits.test.name}); "
        f"labels {data.labels}; metric {data.metric}"
    )
    dense_model = stages.new_model(loaded, data, config.adapt)
    first = None
    if config.adapt.intermediate is not None:
        with timer.stage("intermediate"):
            first = stages.intermediate(
                dense_model,
                loaded,
                tokenizer,
                config.adapt,
                config.data,
                data_dir=config.data_dir,
                cache_dir=config.cache_dir,
                progress=config.progress,
                desc=f"[{task}] intermediate {config.adapt.intermediate}",
            )
        dev = f", dev {first['metric']} {max(first['dev_metric']):.4f}" if first["dev_metric"] else ""
        log(
            f"[{task}] intermediate training on {first['task']}: {first['examples']} examples{dev} ({first['seconds']:.0f}s)"
        )
    with timer.stage("adapt"):
        adapt_record = stages.adapt(
            dense_model, tokenizer, splits, config.adapt, progress=config.progress, desc=f"[{task}] {config.adapt.mode}"
        )
    if first is not None:
        adapt_record["intermediate"] = first
    with timer.stage("evaluate"):
        dense_preds = evaluate.torch_predictions(dense_model, tokenizer, splits.test)
        dense = evaluate.metric_value(data.metric, splits.test.labels, dense_preds)
    log(
        f"[{task}] dense {config.adapt.mode}-adapted model: {data.metric} {dense:.4f} on {len(splits.test)} test "
        f"examples ({adapt_record['seconds']:.0f}s)"
    )
    with timer.stage("expert"):
        expert, search, prune = _expert(config, dense_model, tokenizer, splits, task)
    _log_expert(task, config, expert, prune)
    timer.seconds.update(expert.seconds)

    with timer.stage("export"), BundleWriter(config.out_dir, task) as writer:
        exported = stages.export(expert.model, writer.folder, tokenizer, splits, config.export)
        tokenizer.save(str(writer.folder / "tokenizer.json"))
        figures = build_figures(
            data.metric,
            splits.test.labels,
            dense_preds,
            exported.preds,
            seed=prune.seed,
            tolerance=(config.max_loss if config.max_loss is not None else 1.0) / 100,
        )
        built = BuiltTask(
            replace(config, prune=prune), loaded, data, splits, expert, dense, adapt_record, exported, search, figures
        )
        writer.write_manifest(build_manifest(built, writer.folder))
    validation = exported.validation
    precisions = ["fp32", *sorted(exported.onnx.get("variants", {}))]
    log(
        f"[{task}] bundle {writer.path}: ORT max|diff| {validation['max_abs_diff']:.2e} at shapes "
        f"{validation['shapes']}; ORT {data.metric} {exported.metric_onnx:.4f}; precisions {precisions}"
        + (f"; left out: {exported.rejected}" if exported.rejected else "")
    )
    _log_figures(task, figures, served="int8" if "int8" in exported.preds else "fp32")
    report, backbone = expert.report, expert.model.backbone.config
    result = TaskResult(
        task,
        data.metric,
        splits.test.name,
        len(splits.test),
        dense,
        expert.before.test,
        expert.after.test,
        exported.metric_onnx,
        report["params_before"],
        report["params_after"],
        report["ffn_widths"],
        report["head_counts"],
        validation["max_abs_diff"],
        str(writer.path),
        precisions,
        expert.model.prompt_length,
        prune.rate,
        report_bound(backbone.hidden_size, report, 128 + expert.model.prompt_length),
        dict(timer.seconds),
        dict(exported.rejected),
        figures.to_json(),
        figures.cell("int8" if "int8" in exported.preds else "fp32"),
        figures.learned,
        len(data.train.after(config.data.max_train))
        - (0 if config.recovery.extra_from else expert.recovery.get("extra_examples", 0)),
    )
    return (result, dense_model, expert.model) if return_models else result


def _log_figures(task: str, figures: Figures, served: str) -> None:
    iv = figures.against_dense[served]
    log(
        f"[{task}] {served} expert - dense: {iv.points()} points ({100 * iv.level:.0f}% paired bootstrap over "
        f"{iv.items} test items, {iv.resamples} resamples, seed {iv.seed}); within {100 * figures.tolerance:g} "
        f"point(s): {iv.verdict(figures.tolerance) if figures.learned else 'no verdict'}"
    )
    if not figures.learned:
        majority = figures.against_majority
        log(
            f"[{task}] WARNING: the dense model is not shown to have learned the task: it beats always answering "
            f"the most frequent label by {majority.points()} points, an interval that reaches 0; its expert's "
            "figures are no pruning result (train longer or on more data: --max-train, --epochs)"
        )


def plan_training(config: BuildConfig, loaded: LoadedModel, data: TaskData) -> BuildConfig:
    """With ``train_budget``: the task's config with ``max_train`` set to the training examples whose
    adaptation fits the budget, from the throughput measured on a few batches of this task's data
    (``max_train``, if also given, stays an upper bound). Too small a budget is an error here,
    before anything trains."""
    from . import adapt

    if config.train_budget is None:
        return config
    spec_data, spec_adapt = config.data, config.adapt
    model = stages.new_model(loaded, data, spec_adapt)
    tokenizer = fast_tokenizer(loaded.hf_tokenizer, spec_data.max_length)
    rate = adapt.examples_per_second(model, tokenizer, data.train, stages.train_config(spec_adapt))
    epochs = max(1, spec_adapt.epochs)
    fits = int(config.train_budget * 60 * rate / epochs)
    available = len(data.train) if spec_data.max_train is None else min(len(data.train), spec_data.max_train)
    need = max(config.prune.calib_examples, spec_adapt.batch_size)
    if fits < need:
        raise ConfigError(
            f"task {data.name!r}: --train-budget {config.train_budget:g} min fits {fits} training examples per epoch "
            f"({rate:.1f} examples/s measured here, {epochs} epochs), fewer than the {need} that one epoch over the "
            f"calibration examples needs (about {need * epochs / rate / 60:.1f} min); raise --train-budget or lower "
            "--epochs / --calib-examples"
        )
    chosen = min(fits, available)
    log(
        f"[{data.name}] --train-budget {config.train_budget:g} min: {rate:.1f} training examples/s measured -> "
        f"{chosen:,} of {len(data.train):,} training examples x {epochs} epoch(s), about "
        f"{chosen * epochs / rate / 60:.1f} min"
    )
    return replace(config, data=replace(spec_data, max_train=chosen))


def plan_dev(config: BuildConfig, data: TaskData) -> tuple[BuildConfig, TaskData]:
    """The dev split the build selects on. With ``max_loss``: large enough to resolve the budget
    (:func:`uncertainty.dev_items_for`), the task's own dev split topped up from the end of train (items the
    training never sees while ``max_train`` leaves them out; else train gives them up, down to MIN_TRAIN).
    A budget the data cannot resolve is an error here, before anything trains, with the dev size it would
    need (F1 and MCC need more items than accuracy: :func:`uncertainty.metric_factor`). With
    ``match_test_lengths``: dev and the training examples drawn by the test split's word counts."""
    from .uncertainty import dev_items_for, metric_factor

    if config.max_loss is not None and not config.max_loss > 0:
        raise ConfigError("--max-loss 0 cannot be resolved by any dev split (every rate loses something); give > 0")
    needed, factor = None, 1.0
    if config.max_loss is not None:
        factor = metric_factor(data.metric, [*data.train.labels, *data.dev.labels], seed=config.data.seed)
        needed = dev_items_for(config.max_loss, factor=factor)
        _resolvable(config, data, needed, factor)
    if config.data.match_test_lengths:
        data = _matched(config, data, needed)
    elif needed is not None:
        data = _topped_up(data, needed)
    if needed is None:
        return config, data
    used = len(data.train) if config.data.max_train is None else min(config.data.max_train, len(data.train))
    log(
        f"[{data.name}] --max-loss {config.max_loss:g}: dev split of {needed:,} items ({data.dev.name}) so its 95% "
        f"interval resolves the budget{_metric_note(data.metric, factor)}; {used:,} training examples"
    )
    return replace(config, data=replace(config.data, max_dev=needed)), data


def _metric_note(metric: str, factor: float) -> str:
    if factor == 1.0:
        return ""
    return f" ({metric} needs {factor:.1f}x the items accuracy would: one changed answer moves it that much more)"


def _resolvable(config: BuildConfig, data: TaskData, needed: int, factor: float) -> None:
    from .uncertainty import MIN_TRAIN, resolvable_points

    have = len(data.dev) + max(len(data.train) - MIN_TRAIN, 0)
    if needed > have:
        raise ConfigError(
            f"task {data.name!r}: --max-loss {config.max_loss:g} needs a dev split of {needed:,} items to resolve "
            f"{config.max_loss:g} point(s) of {data.metric} (95% interval half-width <= half the budget"
            f"{_metric_note(data.metric, factor)}); the task has {len(data.dev):,} dev and {len(data.train):,} train "
            f"items, so at most {have:,} (keeping {MIN_TRAIN} to train): the smallest budget its data resolve is "
            f"{resolvable_points(have, factor=factor):.1f} points. Raise --max-loss or give more data (--user-task)"
        )


def _topped_up(data: TaskData, needed: int) -> TaskData:
    from .tasks import Split

    extra = max(0, needed - len(data.dev))
    if not extra:
        return data
    train, dev = data.train, data.dev
    cut = len(train) - extra
    dev = Split(
        f"{dev.name} + {extra:,} items carved from the end of train",
        [*dev.inputs, *train.inputs[cut:]],
        [*dev.labels, *train.labels[cut:]],
    )
    return replace(data, train=Split(train.name, train.inputs[:cut], train.labels[:cut]), dev=dev)


def _matched(config: BuildConfig, data: TaskData, needed: int | None) -> TaskData:
    from .tasks.matching import match_test_lengths
    from .uncertainty import MIN_TRAIN

    size = needed or min(config.data.max_dev or len(data.dev), len(data.dev))
    reported = data.test.sample(config.data.max_eval, config.data.seed)  # the items the build reports on
    matched, match = match_test_lengths(
        replace(data, test=reported),
        dev_items=size,
        train_items=config.data.max_train,
        seed=config.data.seed + 2,
        keep_train=MIN_TRAIN,
    )
    log(f"[{data.name}] {match.note()}")
    return replace(matched, test=data.test)


def build(config: BuildConfig, user_tasks: dict[str, UserTask] | None = None) -> list[TaskResult]:
    start = time.perf_counter()
    # Load (and validate) every task's data before any training starts: bad input fails fast.
    datasets = [
        load_task(task, config.data.seed, config.data_dir, config.cache_dir, user_tasks) for task in config.tasks
    ]
    planned = [plan_dev(config, data) for data in datasets]  # accuracy budgets checked before the model loads
    datasets = [data for _, data in planned]
    source = config.recovery.extra_from
    other = (
        None if source is None else load_task(source, config.data.seed, config.data_dir, config.cache_dir, user_tasks)
    )
    extras = [None if other is None else stages.extra_texts(other, data) for data in datasets]
    log(f"loading model {config.model}")
    loaded = load_model(config.model)
    plans = [plan_training(plan, loaded, data) for plan, data in planned]  # time budgets checked before training
    for plan, data in zip(plans, datasets):
        check_task(plan, loaded, data)
    results = [build_task(plan, loaded, data, extra=extra) for plan, data, extra in zip(plans, datasets, extras)]
    log(f"built {len(results)} expert(s) in {time.perf_counter() - start:.0f}s")
    return results
