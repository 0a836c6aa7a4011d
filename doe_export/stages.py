"""The stage API: one frozen, self-checking spec per stage and one function per stage.

``doe build``, ``doe study`` and every ``doe bench`` suite run experts through these same
functions, so an expert measured by a benchmark is the expert ``doe build`` ships::

    data  = Splits.of(task_data, DataSpec(...))                  # train / dev / test, capped
    model = new_model(loaded, task_data, AdaptSpec(...))         # backbone + (soft prompt) + head
    adapt(model, tokenizer, data, metric, AdaptSpec(...))        # in place; returns its record
    expert = make_expert(model, tokenizer, data, metric,         # a pruned, recovered copy
                         PruneSpec(...), RecoverySpec(...))      #   (the dense model is the teacher)
    exported = export(expert.model, folder, tokenizer, data.test, metric, ExportSpec(...))

Caching (study, bench) wraps these calls and keys them by :func:`spec_key` of the specs that
decide the result. Recovery that tunes only the prompt and head, full recovery and distillation
are values of :class:`RecoverySpec`, not copies of the loop.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable


from . import adapt as adapt_loop
from . import attribution, evaluate, prune as surgery
from .console import log
from .errors import ConfigError
from .tasks import Split, TaskData

ADAPT_MODES = ("prompt", "finetune")
RECOVERY_PARAMS = ("all", "prompt")
EXPORTERS = ("torchscript", "dynamo")


def spec_key(*specs: Any, extra: Any = None) -> str:
    """A short stable hash of frozen specs (and anything JSON-able beside them), for cache keys."""
    payload = [type(s).__name__ for s in specs] + [asdict(s) for s in specs] + [extra]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _positive_or_none(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be an integer >= 1 or None (all), got {value!r}")


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DataSpec:
    """How much of a task's data the stages see, and how texts are cut."""

    max_train: int | None = 2000  # training examples (adaptation, calibration, recovery); None: all
    max_dev: int | None = 200  # dev examples for epoch selection
    max_eval: int | None = 1000  # reporting examples (seeded stratified sample); None: the whole split
    max_length: int = 128  # tokens per input (soft prompt excluded)
    seed: int = 0

    def check(self) -> "DataSpec":
        for name in ("max_train", "max_dev", "max_eval"):
            _positive_or_none(name, getattr(self, name))
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ConfigError(f"max_length must be an integer >= 8, got {self.max_length!r}")
        return self


@dataclass(frozen=True)
class AdaptSpec:
    """How the dense model learns the task before attribution."""

    mode: str = "finetune"  # "prompt": soft prompt + head, frozen backbone (the paper); "finetune": everything
    prompt_length: int = 0  # soft-prompt positions in the graph (prompt mode needs >= 1)
    pooling: str | None = None  # None: mean for encoders, last token for decoders
    epochs: int = 3
    lr: float | None = None  # None: 1e-2 for prompt tuning, 8e-5 for fine-tuning
    batch_size: int = 16
    seed: int = 0

    def check(self) -> "AdaptSpec":
        if self.mode not in ADAPT_MODES:
            raise ConfigError(f"adaptation mode must be one of {ADAPT_MODES}, got {self.mode!r}")
        if self.mode == "prompt" and self.prompt_length < 1:
            raise ConfigError("prompt tuning needs a prompt length >= 1 (--prompt-length)")
        if self.prompt_length < 0 or self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"prompt length and epochs must be >= 0 and batch size >= 1, got {self.prompt_length}, "
                              f"{self.epochs}, {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        return self

    def train_config(self) -> adapt_loop.TrainConfig:
        params = "prompt" if self.mode == "prompt" else "all"
        return adapt_loop.TrainConfig(params, self.epochs, self.lr, self.batch_size, self.seed).check()


@dataclass(frozen=True)
class PruneSpec:
    """Which neurons (and heads) the expert keeps."""

    scorer: str = "doe"
    token_agg: str = "mean"
    rank: str = "abs-of-mean"
    rate: float = 0.65  # share of FFN neurons removed
    layer_types: str = "ffn"  # "ffn" | "attention" | "both"
    head_rate: float | None = None  # share of heads removed; None: the same as rate
    budget: str = "per-layer"
    round_to: int = 1
    fold_bias: bool = False
    calib_examples: int = 256
    batch_size: int = 16
    seed: int = 0

    def check(self) -> "PruneSpec":
        surgery.PruneConfig(self.rate, self.budget, self.round_to, self.fold_bias).check()
        if self.layer_types not in surgery.LAYER_TYPES:
            raise ConfigError(f"layer types must be one of {surgery.LAYER_TYPES}, got {self.layer_types!r}")
        if self.head_rate is not None:
            surgery.PruneConfig(self.head_rate).check()
        self.scorer_plugin()  # unknown scorer / options fail here
        if self.layer_types != "ffn" and self.scorer not in attribution.HEAD_SCORERS:
            raise ConfigError(f"scorer {self.scorer!r} cannot score attention heads (layer types {self.layer_types!r})"
                              f"; use one of {', '.join(attribution.HEAD_SCORERS)} or --layer-types ffn")
        if self.calib_examples < 1 or self.batch_size < 1:
            raise ConfigError(f"calibration examples and batch size must be >= 1, got {self.calib_examples}, "
                              f"{self.batch_size}")
        return self

    @property
    def heads_removed(self) -> float:
        return 0.0 if self.layer_types == "ffn" else (self.rate if self.head_rate is None else self.head_rate)

    def scorer_plugin(self) -> attribution.Scorer:
        try:
            return attribution.make_scorer(self.scorer, token_agg=self.token_agg, rank=self.rank, seed=self.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def needs(self) -> tuple[str, ...]:
        """The calibration statistics this spec needs (empty: no calibration pass)."""
        scorer = self.scorer_plugin()
        needs = set(scorer.needs) | ({"act"} if self.fold_bias else set())
        if self.layer_types != "ffn":
            needs |= set(scorer.head_needs)
        return tuple(n for n in attribution.STATS if n in needs)


@dataclass(frozen=True)
class RecoverySpec:
    """How the pruned model relearns what pruning cost: which weights train, and from what."""

    epochs: int = 2
    params: str = "all"  # "all": every remaining weight; "prompt": soft prompt + head only (the paper)
    distill: float = 0.5  # weight of logit distillation from the dense model; 0: cross-entropy only
    temperature: float = 2.0
    lr: float | None = None  # None: 1e-2 for prompt + head, 8e-5 for all weights
    batch_size: int = 16
    max_examples: int | None = None  # cap on the training examples used (None: the stage's whole train split)
    select_on_dev: bool = True  # keep the best dev epoch
    seed: int = 1

    def check(self) -> "RecoverySpec":
        if self.params not in RECOVERY_PARAMS:
            raise ConfigError(f"recovery params must be one of {RECOVERY_PARAMS}, got {self.params!r}")
        _positive_or_none("recovery max_examples", self.max_examples)
        self.train_config()
        return self

    def train_config(self) -> adapt_loop.TrainConfig:
        return adapt_loop.TrainConfig(self.params, self.epochs, self.lr, self.batch_size, self.seed,
                                      distill=self.distill, temperature=self.temperature).check()


@dataclass(frozen=True)
class ExportSpec:
    """How the expert becomes ONNX graphs, and what each graph must pass to be shipped."""

    exporter: str = "torchscript"  # "torchscript" (torch.onnx.export dynamo=False) | "dynamo"
    attention: str = "eager"  # traced attention: "eager" (no safe-softmax Where per layer) | "native"
    fuse: bool = False  # onnxruntime fusions via onnxscript, validated like the plain graph
    # onnxruntime optimizers the served CPU session turns off (the manifest's onnx.session): on MiniLM
    # int8 graphs, SkipLayerNormalization cost 17 ms where Add + LayerNormalization cost 11 (8 x 128)
    disabled_optimizers: tuple[str, ...] = ("SkipLayerNormFusion",)
    fp16: bool = True  # fp16 variant (for CUDA)
    int8: bool = True  # dynamic int8 variant (for CPU)
    tolerance: float = 1e-4  # max |ORT - torch| of the fp32 graph at the validation shapes
    fp16_tolerance: float = 5e-2
    variant_min_agreement: float = 0.99  # labels equal to the PyTorch expert's on the test split
    variant_max_metric_drop: float = 0.003  # metric of a variant at most this below the PyTorch expert's
    measure_speed: bool = True  # time each variant against fp32 on the build machine (1 thread)

    def check(self) -> "ExportSpec":
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.attention not in ("eager", "native"):
            raise ConfigError(f"attention must be 'eager' or 'native', got {self.attention!r}")
        if not self.tolerance > 0 or not 0 < self.variant_min_agreement <= 1 or self.variant_max_metric_drop < 0:
            raise ConfigError("tolerance must be > 0, variant_min_agreement in (0, 1], variant_max_metric_drop >= 0")
        return self


# ----------------------------------------------------------------------------- data


@dataclass
class Splits:
    train: Split
    dev: Split
    test: Split

    @classmethod
    def of(cls, data: TaskData, spec: DataSpec) -> "Splits":
        """Train and dev capped by their first items (they are shuffled by the loaders); the
        reporting split by a seeded stratified sample, so a class-sorted file keeps every class."""
        return cls(data.train.head(spec.max_train), data.dev.head(spec.max_dev),
                   data.test.sample(spec.max_eval, spec.seed))


# ----------------------------------------------------------------------------- stages


def new_model(loaded, data: TaskData, spec: AdaptSpec):
    """A TaskModel on a private copy of the backbone: the soft prompt (if any) and a fresh head."""
    from .taskmodel import TaskModel

    spec.check()
    return TaskModel(copy.deepcopy(loaded.backbone), num_labels=len(data.labels), prompt_length=spec.prompt_length,
                     pooling=spec.pooling, sep_token_id=loaded.hf_tokenizer.sep_token_id, seed=spec.seed)


def adapt(model, tokenizer, data: Splits, metric: str, spec: AdaptSpec, progress: bool = True,
          desc: str = "adapt") -> dict:
    """Train the dense model on the task in place (best dev epoch kept); return the training record."""
    record = adapt_loop.train(model, tokenizer, data.train, data.dev, metric, spec.check().train_config(), desc, progress)
    return {"mode": spec.mode, **record}


@dataclass
class Attribution:
    scores: attribution.Scores  # per-layer FFN importance (+ mean activations)
    heads: list | None  # per-layer head importance, when heads are removed
    stats: attribution.CalibrationStats | None


def calibration_stats(model, tokenizer, train: Split, spec: PruneSpec, progress: bool = True,
                      needs: tuple[str, ...] | None = None) -> attribution.CalibrationStats | None:
    """The calibration pass for ``spec`` (only the statistics it needs; ``needs`` overrides)."""
    needs = spec.needs() if needs is None else needs
    if not needs:
        return None
    batches = attribution.calibration_batches(tokenizer, train, spec.calib_examples, spec.batch_size, spec.seed)
    total = (spec.calib_examples + spec.batch_size - 1) // spec.batch_size
    return attribution.collect_stats(model, batches, total=total, progress=progress, needs=needs)


def attribute(model, tokenizer, train: Split, spec: PruneSpec, progress: bool = True,
              stats: attribution.CalibrationStats | None = None) -> Attribution:
    """Score every FFN neuron (and head) of ``model`` for the task; ``stats`` reuses a calibration pass."""
    spec.check()
    scorer = spec.scorer_plugin()
    if stats is None:
        stats = calibration_stats(model, tokenizer, train, spec, progress)
    scores = scorer.score(model, stats)
    heads = scorer.score_heads(model, stats) if spec.layer_types != "ffn" else None
    return Attribution(scores, heads, stats)


def prune(model, found: Attribution, spec: PruneSpec) -> dict:
    """Remove the least important neurons (and heads) of ``model`` in place; return the report."""
    config = surgery.PruneConfig(spec.rate if spec.layer_types != "attention" else 0.0, spec.budget, spec.round_to,
                                 spec.fold_bias)
    return surgery.prune_model(model, spec.layer_types, config, found.scores.importance, found.heads,
                               spec.heads_removed if spec.layer_types != "ffn" else None, found.scores.mean_activation)


def recover(model, teacher, tokenizer, data: Splits, metric: str, spec: RecoverySpec, progress: bool = True,
            desc: str = "recovery") -> dict:
    """Re-train the pruned ``model`` in place (distilling from ``teacher`` when ``spec.distill`` > 0)."""
    config = spec.check().train_config()
    if config.params == "prompt" and model.prompt is None:
        raise ConfigError("recovery of the prompt and head only needs a soft prompt; this model has none "
                          "(use recovery params 'all')")
    train = data.train.head(spec.max_examples)
    return adapt_loop.train(model, tokenizer, train, data.dev if spec.select_on_dev else None, metric, config, desc,
                            progress, teacher=teacher if spec.distill > 0 else None)


@dataclass
class ExpertResult:
    model: Any  # the pruned, recovered TaskModel
    attribution: Attribution
    report: dict  # prune report: params and widths before/after, head counts
    recovery: dict  # training record of the recovery
    before: Any  # score of the pruned model before recovery
    after: Any  # score after recovery
    seconds: dict = field(default_factory=dict)


def make_expert(dense, tokenizer, data: Splits, metric: str, prune_spec: PruneSpec, recovery_spec: RecoverySpec,
                progress: bool = True, desc: str = "expert", stats: attribution.CalibrationStats | None = None,
                score: Callable[[Any], Any] | None = None) -> ExpertResult:
    """Attribute on ``dense``, prune a copy, score it, recover it (``dense`` is the teacher), score again.

    ``score(model)`` defaults to the task metric on ``data.test``; the study passes richer metrics.
    """
    score = score or (lambda model: evaluate.evaluate_torch(model, tokenizer, data.test, metric))
    seconds = {}
    start = time.perf_counter()
    found = attribute(dense, tokenizer, data.train, prune_spec, progress, stats)
    seconds["attribute"] = round(time.perf_counter() - start, 2)
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    report = prune(model, found, prune_spec)
    seconds["prune"] = round(time.perf_counter() - start, 2)
    before = score(model)
    start = time.perf_counter()
    record = recover(model, dense, tokenizer, data, metric, recovery_spec, progress, f"{desc} recovery")
    seconds["recover"] = round(time.perf_counter() - start, 2)
    return ExpertResult(model, found, report, record, before, score(model), seconds)


SEARCH_RATES = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9)


@dataclass
class RateSearch:
    """The accuracy-budget search: the expert at the chosen rate (its ``before``/``after`` are
    ``{"dev", "test"}`` dicts) and every rate tried with its dev metric."""

    expert: ExpertResult
    record: dict
    rate: float


def search_rate(dense, tokenizer, data: Splits, metric: str, prune_spec: PruneSpec, recovery_spec: RecoverySpec,
                max_loss: float, rates: tuple[float, ...] = SEARCH_RATES, progress: bool = True,
                desc: str = "expert") -> RateSearch:
    """The expert at the largest rate in ``rates`` whose dev metric after recovery is at most
    ``max_loss`` points (x100) below the dense model's dev metric. Searched on dev only (never test),
    by bisection over the sorted rates (the metric falls with the rate); the attribution pass is
    shared by every try. With heads removed and no fixed head rate, heads follow the same rate.
    Raises ConfigError with the dev metric of every rate tried when none is within the budget."""
    if not max_loss >= 0:
        raise ConfigError(f"--max-loss must be >= 0 points, got {max_loss}")
    rates = tuple(sorted(set(rates)))
    if not rates or not all(0 < r < 1 for r in rates):
        raise ConfigError(f"search rates must be in (0, 1), got {rates}")
    def scores(model) -> dict:  # dev decides; test is only reported for the chosen rate
        return {"dev": evaluate.evaluate_torch(model, tokenizer, data.dev, metric),
                "test": evaluate.evaluate_torch(model, tokenizer, data.test, metric)}

    dense_dev = evaluate.evaluate_torch(dense, tokenizer, data.dev, metric)
    stats = calibration_stats(dense, tokenizer, data.train, prune_spec, progress) if prune_spec.needs() else None
    tried: dict[float, tuple[float, ExpertResult]] = {}

    def attempt(rate: float) -> bool:
        spec = replace(prune_spec, rate=rate, head_rate=prune_spec.head_rate)
        result = make_expert(dense, tokenizer, data, metric, spec, recovery_spec, progress, f"{desc} p={rate:g}",
                             stats=stats, score=scores)
        tried[rate] = (result.after["dev"], result)
        log(f"{desc} rate search: p={rate:g} dev {metric} {result.after['dev']:.4f} (dense {dense_dev:.4f}, budget "
            f"{max_loss:g} points)")
        return 100 * (dense_dev - result.after["dev"]) <= max_loss + 1e-9  # float noise of x100

    low, high = -1, len(rates)  # invariant: rates[low] passes (or low = -1), rates[high] fails (or len)
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(rates[middle]):
            low = middle
        else:
            high = middle
    record = {"max_loss_points": max_loss, "split": data.dev.name, "dense_dev": dense_dev,
              "tried": [{"rate": r, "dev": v} for r, (v, _) in sorted(tried.items())],
              "chosen_rate": rates[low] if low >= 0 else None, "candidates": list(rates)}
    if low < 0:
        found = ", ".join(f"p={r:g}: {v:.4f}" for r, (v, _) in sorted(tried.items()))
        raise ConfigError(f"{desc}: --max-loss {max_loss:g}: no pruning rate kept the dev {metric} within "
                          f"{max_loss:g} points of the dense model's {dense_dev:.4f} ({found}); raise --max-loss, "
                          "give smaller rates, or train the dense model longer")
    return RateSearch(tried[rates[low]][1], record, rates[low])


# ----------------------------------------------------------------------------- export


@dataclass
class Exported:
    onnx: dict  # the manifest's onnx section (file, sha256, opset, precision, io, rewrites, variants, session)
    validation: dict  # the fp32 graph against PyTorch at the validation shapes
    metric_onnx: float  # the fp32 graph's metric on the test split
    rejected: dict  # precision -> why a variant was not written


def export(model, folder: Path, tokenizer, test: Split, metric: str, spec: ExportSpec, num_labels: int) -> Exported:
    """Write ``folder/model.onnx`` (validated against PyTorch) and every variant that passes its checks."""
    from . import export as onnx_export

    spec.check()
    folder = Path(folder)
    path = folder / "model.onnx"
    batches = onnx_export.validation_batches(tokenizer, test.inputs)
    disabled = list(spec.disabled_optimizers)
    opset, validation, fusions = onnx_export.export_validated(
        model, path, onnx_export.encode_sample(tokenizer, test.inputs), batches, spec.exporter, spec.fuse,
        spec.tolerance, disabled, spec.attention)
    expected = evaluate.torch_logits(model, tokenizer, test.inputs)
    fp32_logits = evaluate.onnx_file_logits(path, tokenizer, test.inputs, disabled_optimizers=disabled)
    metric_onnx = evaluate.metric_value(metric, test.labels, fp32_logits.argmax(1).tolist())
    variants, rejected = onnx_export.write_variants(model, folder, path, tokenizer, test, metric, expected, batches, spec)
    section = {**onnx_export.file_entry(folder, "model.onnx"), "initializers": onnx_export.initializer_table(path),
               "opset": opset, "precision": "fp32",
               "exporter": spec.exporter, "attention": spec.attention,
               "rewrites": {"ort_fusions": fusions} if spec.fuse else {},
               **onnx_export.io_spec(num_labels),
               "quality": {"metric": metric, "value": metric_onnx, "split_size": len(test)},
               "session": {"CPUExecutionProvider": {"disabled_optimizers": disabled}} if disabled else {}}
    if variants:
        section["variants"] = variants
    return Exported(section, validation, metric_onnx, rejected)


__all__ = ["AdaptSpec", "Attribution", "DataSpec", "ExpertResult", "ExportSpec", "Exported", "PruneSpec",
           "RateSearch", "RecoverySpec", "SEARCH_RATES", "Splits", "adapt", "attribute", "calibration_stats", "export",
           "make_expert", "new_model", "prune", "recover", "search_rate", "spec_key"]
