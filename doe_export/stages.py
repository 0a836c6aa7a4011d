"""The stage API: one function per stage, each taking the frozen spec of :mod:`doe_export.specs`.

``doe build``, ``doe study`` and every ``doe bench`` suite run experts through these same
functions, so an expert measured by a benchmark is the expert ``doe build`` ships::

    data  = Splits.of(task_data, DataSpec(...))                  # train / dev / test, capped; + the metric
    model = new_model(loaded, task_data, AdaptSpec(...))         # backbone + (soft prompt) + head
    adapt(model, tokenizer, data, AdaptSpec(...))                # in place; returns its record
    expert = make_expert(model, tokenizer, data,                 # a pruned, recovered copy
                         PruneSpec(...), RecoverySpec(...))      #   (the dense model is the teacher)
    exported = export(expert.model, folder, tokenizer, data, ExportSpec(...))

Every score of a model is one typed :class:`Score` (the task metric on the reporting split, and on
dev where it was measured). Caching (study, bench) wraps these calls and keys them by
:func:`~doe_export.records.spec_key` of the specs that decide the result (:mod:`doe_export.cache`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import adapt as adapt_loop
from . import attribution, evaluate, scorers
from . import prune as surgery
from .augment import augmented_inputs
from .errors import ConfigError
from .modes import ExtraLabels
from .records import spec_key
from .specs import (
    SEARCH_RATES,
    AdaptSpec,
    DataSpec,
    ExportSpec,
    LayerTypes,
    PruneSpec,
    RecoverySpec,
    TrainedParams,
)
from .tasks import Split, TaskData

# ----------------------------------------------------------------------------- data and scores


@dataclass
class Splits:
    """What the stages train, select and report on, and the task metric they are scored by."""

    train: Split
    dev: Split
    test: Split
    metric: str
    # the training items past ``train`` (past DataSpec.max_train): what RecoverySpec.extra_examples draws on
    spare: Split = field(default_factory=lambda: Split("no spare training items", [], []))

    @classmethod
    def of(cls, data: TaskData, spec: DataSpec) -> Splits:
        """Train and dev capped by their first items (they are shuffled by the loaders); the
        reporting split by a seeded stratified sample, so a class-sorted file keeps every class."""
        return cls(
            data.train.head(spec.max_train),
            data.dev.head(spec.max_dev),
            data.test.sample(spec.max_eval, spec.seed),
            data.metric,
            data.train.after(spec.max_train),
        )


@dataclass(frozen=True)
class Score:
    """A model's quality: the task metric on the reporting split (``test``), on dev where measured,
    and further values on the reporting split (``details``: e.g. accuracy, mean gold log-probability)."""

    metric: str
    test: float
    dev: float | None = None
    details: dict[str, float] = field(default_factory=dict)
    dev_preds: tuple[int, ...] | None = None  # the labels behind ``dev`` (the rate search's intervals)
    test_preds: tuple[int, ...] | None = None  # the labels behind ``test`` (the study pairs runs item by item)

    def to_json(self) -> dict:
        return {"metric": self.metric, "test": self.test, "dev": self.dev, **self.details}


def scorer(tokenizer, splits: Splits, *, dev: bool = False) -> Callable[[Any], Score]:
    """The default way to score a model: the task metric on the reporting split (and on dev)."""

    def score(model) -> Score:
        test = evaluate.evaluate_torch(model, tokenizer, splits.test, splits.metric)
        if not dev:
            return Score(splits.metric, test)
        preds = evaluate.torch_predictions(model, tokenizer, splits.dev)
        return Score(
            splits.metric, test, evaluate.metric_value(splits.metric, splits.dev.labels, preds), {}, tuple(preds)
        )

    return score


# ----------------------------------------------------------------------------- adapt, attribute, prune, recover


def new_model(loaded, data: TaskData, spec: AdaptSpec):
    """A TaskModel on a private copy of the backbone: the soft prompt (if any) and a fresh head."""
    from .taskmodel import TaskModel

    return TaskModel(
        copy.deepcopy(loaded.backbone),
        num_labels=len(data.labels),
        prompt_length=spec.prompt_length or 0,
        pooling=None if spec.pooling is None else str(spec.pooling),
        sep_token_id=loaded.hf_tokenizer.sep_token_id,
        seed=spec.seed,
    )


def train_config(spec: AdaptSpec | RecoverySpec) -> adapt_loop.TrainConfig:
    if isinstance(spec, AdaptSpec):
        return adapt_loop.TrainConfig(spec.trains, spec.epochs, spec.lr, spec.batch_size, spec.seed)
    return adapt_loop.TrainConfig(
        spec.params,
        spec.epochs,
        spec.lr,
        spec.batch_size,
        spec.seed,
        distill=spec.distill,
        temperature=spec.temperature,
        hidden_distill=spec.hidden_distill,
    )


def adapt(model, tokenizer, data: Splits, spec: AdaptSpec, *, progress: bool = True, desc: str = "adapt") -> dict:
    """Train the dense model on the task in place (best dev epoch kept); return the training record."""
    record = adapt_loop.train(
        model,
        tokenizer,
        data.train,
        data.dev,
        metric=data.metric,
        config=train_config(spec),
        desc=desc,
        progress=progress,
    )
    return {"mode": str(spec.mode), **record}


def intermediate(
    model,
    loaded,
    tokenizer,
    spec: AdaptSpec,
    data: DataSpec,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    desc: str = "intermediate",
) -> dict:
    """Train ``model``'s backbone in place on ``spec.intermediate`` first: a helper model shares the backbone
    with its own head for that task's labels (dropped after), fine-tuned for ``spec.intermediate_epochs`` on
    ``spec.intermediate_examples`` of its training split, best dev epoch kept. The record of that training."""
    from .taskmodel import TaskModel
    from .tasks import load_task

    task = load_task(str(spec.intermediate), data.seed, data_dir, cache_dir)
    splits = Splits.of(task, replace(data, max_train=spec.intermediate_examples, match_test_lengths=False))
    helper = TaskModel(
        model.backbone,
        num_labels=len(task.labels),
        pooling=None if spec.pooling is None else str(spec.pooling),
        sep_token_id=loaded.hf_tokenizer.sep_token_id,
        seed=spec.seed,
    )
    config = adapt_loop.TrainConfig(TrainedParams.ALL, spec.intermediate_epochs, spec.lr, spec.batch_size, spec.seed)
    record = adapt_loop.train(
        helper, tokenizer, splits.train, splits.dev, metric=task.metric, config=config, desc=desc, progress=progress
    )
    return {"task": task.name, "labels": list(task.labels), "metric": task.metric, **record}


@dataclass
class Attribution:
    scores: attribution.Scores  # per-layer FFN importance (+ mean activations)
    heads: list | None  # per-layer head importance, when heads are removed
    stats: attribution.CalibrationStats | None


def calibration_stats(
    model, tokenizer, train: Split, spec: PruneSpec, *, progress: bool = True, needs: tuple[str, ...] | None = None
) -> attribution.CalibrationStats | None:
    """The calibration pass for ``spec`` (only the statistics it needs; ``needs`` overrides)."""
    needs = spec.needs() if needs is None else needs
    if not needs:
        return None
    batches = attribution.calibration_batches(tokenizer, train, spec.calib_examples, spec.batch_size, spec.seed)
    total = (spec.calib_examples + spec.batch_size - 1) // spec.batch_size
    return attribution.collect_stats(model, batches, total=total, progress=progress, needs=needs)


def attribute(
    model,
    tokenizer,
    train: Split | None,
    spec: PruneSpec,
    *,
    progress: bool = True,
    stats: attribution.CalibrationStats | None = None,
) -> Attribution:
    """Score every FFN neuron (and head) of ``model`` for the task; ``stats`` reuses a calibration pass.
    A data-free scorer (``magnitude``, ``random``) needs neither ``tokenizer`` nor ``train``."""
    plugin = scorers.make_scorer(spec.scorer, **scorers.accepted(spec.scorer, spec.scorer_options()))
    if stats is None and spec.needs():
        if tokenizer is None or train is None:
            raise ConfigError(f"scorer {spec.scorer!r} needs calibration data: pass a tokenizer and a training split")
        stats = calibration_stats(model, tokenizer, train, spec, progress=progress)
    scores = plugin.score(model, stats)
    heads = plugin.score_heads(model, stats) if spec.layer_types is not LayerTypes.FFN else None
    return Attribution(scores, heads, stats)


def alignments(model, spec: PruneSpec) -> tuple[int, int]:
    """(FFN width multiple, head count multiple) of ``spec`` for ``model``: its GEMM dimensions aligned."""
    widths, heads = model.ffn_widths(), model.spec.head_counts(model.backbone)
    ffn = min(surgery.alignment(spec.round_to, width) for width in widths)
    head_dim = model.spec.head_dim(model.backbone)
    head = max(surgery.alignment(spec.round_to, count, head_dim) for count in heads) if heads else 1
    return ffn, head


def prune(model, found: Attribution, spec: PruneSpec) -> dict:
    """Remove the least important neurons (and heads) of ``model`` in place; return the report (with the
    alignment the widths were made multiples of)."""
    ffn_multiple, head_multiple = alignments(model, spec)
    config = surgery.PruneConfig(spec.ffn_rate, spec.budget, ffn_multiple, spec.fold_bias, rounding=spec.rounding)
    return surgery.prune_model(
        model,
        str(spec.layer_types),
        config,
        found.scores.importance,
        head_importance=found.heads,
        head_rate=spec.heads_removed if spec.layer_types is not LayerTypes.FFN else None,
        head_multiple=head_multiple,
        mean_activation=found.scores.mean_activation,
    ) | {"alignment": {"ffn_multiple": ffn_multiple, "head_multiple": head_multiple}}


def recover(
    model, teacher, tokenizer, data: Splits, spec: RecoverySpec, *, progress: bool = True, desc: str = "recovery"
) -> dict:
    """Re-train the pruned ``model`` in place (distilling from ``teacher`` when ``spec.distill`` or
    ``spec.hidden_distill`` > 0)."""
    if spec.params is TrainedParams.PROMPT and model.prompt is None:
        raise ConfigError(
            "recovery of the prompt and head only needs a soft prompt; this model has none (use recovery params 'all')"
        )
    train = data.train.head(spec.max_examples)
    notes: dict[str, Any] = {}
    extra = 0
    if spec.extra_examples:
        extended = with_extra(train, data.spare, spec.extra_examples)
        extra = len(extended) - len(train)  # fewer than asked where the split has fewer left
        notes |= {"extra_examples": extra, "extra_labels": str(spec.extra_labels)}
        if spec.extra_from is not None:
            notes["extra_from"] = spec.extra_from
        train = extended
    relabel = extra and spec.extra_labels is ExtraLabels.DENSE
    if teacher is None and (relabel or spec.augment):
        what, fix = (
            (f"{extra:,} extra items labelled 'dense'", "label them 'gold'")
            if relabel
            else (f"{spec.augment} augmented copies", "set augment to 0")
        )
        raise ConfigError(
            f"recovery with {what} labels them with the dense model's answers, and no dense model was given: pass "
            f"the teacher, or {fix}"
        )
    teacher_logits = None  # computed once: they label what the dense model labels, and feed distillation
    if relabel or (spec.augment and spec.distill > 0):
        teacher_logits = evaluate.torch_logits(teacher, tokenizer, train.inputs)
    if relabel and teacher_logits is not None:
        kept = len(train) - extra
        answers = teacher_logits.argmax(axis=1).tolist()
        train = Split(
            f"{train.name}; the {extra:,} extra labelled by the dense model",
            train.inputs,
            [*train.labels[:kept], *answers[kept:]],
        )
    if spec.augment:
        notes["augment"] = spec.augment
        augmented, copied = augmented_split(train, teacher, tokenizer, spec.augment, spec.seed)
        if teacher_logits is not None:  # the copies' logits labelled them already: no second pass
            teacher_logits = np.concatenate([teacher_logits, copied])
        train = augmented
    if spec.distill == 0:
        teacher_logits = None
    record = adapt_loop.train(
        model,
        tokenizer,
        train,
        data.dev if spec.select_on_dev else None,
        metric=data.metric,
        config=train_config(spec),
        desc=desc,
        progress=progress,
        teacher=teacher if spec.distill > 0 or spec.hidden_distill > 0 else None,
        teacher_logits=teacher_logits,
    )
    return record | notes


def with_extra(train: Split, spare: Split, wanted: int) -> Split:
    """``train`` followed by the first ``wanted`` items of ``spare`` (fewer where it has fewer): the recovery
    split of ``RecoverySpec.extra_examples``. None left is an error: the option would change nothing."""
    extra = spare.head(wanted)
    if not len(extra):
        raise ConfigError(
            f"recovery asks for {wanted:,} training items past the adaptation's, and the training split has none "
            f"left: the adaptation takes all {len(train):,} ({train.name}). Lower --max-train to leave some, or "
            "drop --recovery-extra"
        )
    return Split(
        f"{train.name} + {len(extra):,} more ({extra.name})",
        [*train.inputs, *extra.inputs],
        [*train.labels, *extra.labels],
    )


def texts_from(
    name: str, task: TaskData, seed: int, data_dir: str | None = None, cache_dir: str | None = None
) -> Split:
    """Task ``name``'s training split (loaded) as ``task``'s recovery extra items: :func:`extra_texts`."""
    from .tasks import load_task

    return extra_texts(load_task(name, seed, data_dir, cache_dir), task)


def extra_texts(other: TaskData, task: TaskData) -> Split:
    """``other``'s training split as ``task``'s recovery extra items (``RecoverySpec.extra_from``): its texts,
    which the dense model labels (its own labels name other classes). Refused where they are not shaped like
    ``task``'s inputs (one text or a pair), or where ``other`` is ``task`` itself."""
    if other.name == task.name:
        raise ConfigError(
            f"task {task.name!r}: --recovery-extra-from {other.name} names the task itself; its own items past the "
            "adaptation's are what --recovery-extra takes without --recovery-extra-from"
        )
    if other.input != task.input:
        raise ConfigError(
            f"task {task.name!r} reads {task.input} inputs and --recovery-extra-from {other.name} gives {other.input} "
            f"ones: the dense model cannot label them; name a task whose inputs are {task.input} texts"
        )
    return Split(f"{other.name}'s training texts", other.train.inputs, other.train.labels)


def augmented_split(train: Split, teacher, tokenizer, copies: int, seed: int) -> tuple[Split, np.ndarray]:
    """``train`` followed by ``copies`` perturbed copies of its inputs (:mod:`doe_export.augment`), each
    labelled with ``teacher``'s answer: the recovery split of ``RecoverySpec.augment``; with the teacher's
    logits on the copies ([copies x N, labels]), which distillation reuses."""
    if teacher is None:
        raise ConfigError(
            f"recovery with {copies} augmented copies labels them with the dense model's answers, and no dense "
            "model was given: pass the teacher, or set augment to 0"
        )
    extra = augmented_inputs(train, copies, seed)
    logits = evaluate.torch_logits(teacher, tokenizer, extra)
    split = Split(
        f"{train.name} + {copies} perturbed copies labelled by the dense model",
        [*train.inputs, *extra],
        [*train.labels, *logits.argmax(axis=1).tolist()],
    )
    return split, logits


@dataclass
class ExpertResult:
    model: Any  # the pruned, recovered TaskModel
    attribution: Attribution
    report: dict  # prune report: params and widths before/after, head counts
    recovery: dict  # training record of the recovery
    before: Score  # the pruned model before recovery
    after: Score  # after recovery
    seconds: dict = field(default_factory=dict)


def make_expert(
    dense,
    tokenizer,
    data: Splits,
    prune_spec: PruneSpec,
    recovery_spec: RecoverySpec,
    *,
    progress: bool = True,
    desc: str = "expert",
    stats: attribution.CalibrationStats | None = None,
    score: Callable[[Any], Score] | None = None,
) -> ExpertResult:
    """Attribute on ``dense``, prune a copy, score it, recover it (``dense`` is the teacher), score again.
    With ``prune_spec.steps`` > 1 the widths are reached gradually: each step attributes on the model the step
    before left, prunes to its share of the way and recovers; ``before`` is the last step's, before its recovery.

    ``score(model)`` defaults to the task metric on ``data.test`` (:func:`scorer`); the study passes
    one with more values, the rate search one that also scores dev.
    """
    score = score or scorer(tokenizer, data)
    seconds: dict[str, float] = {"attribute": 0.0, "prune": 0.0, "recover": 0.0}
    model = copy.deepcopy(dense)
    step_specs = gradual_steps(model, prune_spec)
    found: Attribution | None = None
    before: Score | None = None
    report: dict = {}
    record: dict = {}
    for step, spec in enumerate(step_specs, 1):
        start = time.perf_counter()
        found = attribute(model, tokenizer, data.train, spec, progress=progress, stats=stats if step == 1 else None)
        seconds["attribute"] += round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        step_report = prune(model, found, spec)
        # the model before the first step is the dense one: its sizes stay the report's "before" (FLOP bound)
        report = (
            step_report if step == 1 else {**step_report, **{k: v for k, v in report.items() if k.endswith("_before")}}
        )
        seconds["prune"] += round(time.perf_counter() - start, 2)
        before = score(model)
        start = time.perf_counter()
        where = f" step {step}/{len(step_specs)}" if len(step_specs) > 1 else ""
        record = recover(
            model, dense, tokenizer, data, recovery_spec, progress=progress, desc=f"{desc}{where} recovery"
        )
        seconds["recover"] += round(time.perf_counter() - start, 2)
    assert found is not None and before is not None  # at least one step
    if len(step_specs) > 1:  # the steps' own specs align nothing: the final widths are aligned as prune_spec asks
        ffn_multiple, head_multiple = alignments(dense, prune_spec)
        report["alignment"] = {"ffn_multiple": ffn_multiple, "head_multiple": head_multiple}
        report["steps"] = [{"rate": round(s.rate, 6)} for s in step_specs]
    return ExpertResult(model, found, report, record, before, score(model), seconds)


def gradual_steps(model, spec: PruneSpec) -> list[PruneSpec]:
    """The prune specs of each step: one step is ``spec`` itself; with ``spec.steps`` = n, step k keeps
    ``width - (width - final) * k / n`` neurons per layer (``final``: the one-shot kept width, aligned as
    ``spec`` aligns it), each step's rate relative to the width the step before left."""
    if spec.steps == 1:
        return [spec]
    widths = set(model.ffn_widths())
    if len(widths) != 1:
        raise ConfigError(
            f"--prune-steps {spec.steps}: gradual pruning needs one FFN width in every layer, the model has "
            f"{sorted(widths)}; use --prune-steps 1"
        )
    width = widths.pop()
    multiple, _ = alignments(model, spec)
    config = surgery.PruneConfig(spec.ffn_rate, spec.budget, multiple, rounding=spec.rounding)
    final = surgery.kept_width(round(width * (1.0 - spec.ffn_rate)), width, config)
    kept = [round(width - (width - final) * k / spec.steps) for k in range(spec.steps + 1)]
    # round_to=1: each step's count is already what it should be (the last one aligned above)
    return [replace(spec, rate=1.0 - kept[k] / kept[k - 1], round_to=1, steps=1) for k in range(1, spec.steps + 1)]


# ----------------------------------------------------------------------------- export


@dataclass
class Exported:
    onnx: dict  # the manifest's onnx section (file, sha256, opset, precision, io, rewrites, variants, session)
    validation: dict  # the fp32 graph against PyTorch at the validation shapes
    metric_onnx: float  # the fp32 graph's metric on the test split
    rejected: dict  # precision -> why a variant was not written
    # the test split's predicted labels: "expert" (PyTorch), "fp32" (the ONNX graph), and each variant written
    preds: dict = field(default_factory=dict)


def export(model, folder: Path, tokenizer, data: Splits, spec: ExportSpec) -> Exported:
    """Write ``folder/model.onnx`` (validated against PyTorch) and every variant that passes its checks."""
    from . import bundle, onnx_export, variants

    folder = Path(folder)
    path = folder / "model.onnx"
    test = data.test
    batches = onnx_export.validation_batches(tokenizer, test.inputs)
    disabled = list(spec.disabled_optimizers)
    sample = onnx_export.encode_sample(tokenizer, test.inputs)
    opset, validation, fusions = onnx_export.export_validated(
        model,
        path,
        sample,
        batches,
        exporter=str(spec.exporter),
        fuse=spec.fuse,
        tolerance=spec.tolerance,
        disabled_optimizers=disabled,
        attention=str(spec.attention),
    )
    expected = evaluate.torch_logits(model, tokenizer, test.inputs)
    fp32_logits = evaluate.onnx_file_logits(path, tokenizer, test.inputs, disabled_optimizers=disabled)
    metric_onnx = evaluate.metric_value(data.metric, test.labels, fp32_logits.argmax(1).tolist())
    written, rejected = variants.write_variants(
        model,
        folder,
        path,
        tokenizer,
        test,
        metric=data.metric,
        expected=expected,
        batches=batches,
        spec=spec,
        sample=sample,
    )
    section = {
        **bundle.file_entry(folder, "model.onnx"),
        "initializers": bundle.initializer_table(path),
        "opset": opset,
        "precision": "fp32",
        "exporter": str(spec.exporter),
        "attention": str(spec.attention),
        "rewrites": {"ort_fusions": fusions} if spec.fuse else {},
        **onnx_export.io_spec(model.num_labels),
        "quality": {"metric": data.metric, "value": metric_onnx, "split_size": len(test)},
        "session": {"CPUExecutionProvider": {"disabled_optimizers": disabled}} if disabled else {},
    }
    preds = {"expert": expected.argmax(1).tolist(), "fp32": fp32_logits.argmax(1).tolist()}
    preds.update({precision: entry.pop("_preds") for precision, entry in written.items()})
    if written:
        section["variants"] = written
    return Exported(section, validation, metric_onnx, rejected, preds)


__all__ = [
    "SEARCH_RATES",
    "AdaptSpec",
    "Attribution",
    "DataSpec",
    "ExpertResult",
    "ExportSpec",
    "Exported",
    "PruneSpec",
    "RecoverySpec",
    "Score",
    "Splits",
    "adapt",
    "attribute",
    "calibration_stats",
    "export",
    "make_expert",
    "new_model",
    "prune",
    "recover",
    "scorer",
    "spec_key",
]
