"""The modes of the flow: string enums whose members compare equal to their strings and serialize as them,
so records and manifests keep plain strings (``AdaptMode("prompt") == "prompt"``). :mod:`doe_export.specs`
re-exports them beside the specs that use them."""

from __future__ import annotations

from enum import Enum
from typing import Any

from .errors import ConfigError


class Choice(str, Enum):
    """A mode: equal to its string value, printed and serialized as it."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # specs print as AdaptSpec(mode='prompt', ...)
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls, value: Any, what: str) -> Any:
        """``value`` as a member of ``cls``; ConfigError naming ``what`` and the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{what} must be one of {', '.join(cls.values())}, got {value!r}") from None


class TrainedParams(Choice):
    """What a training loop updates."""

    ALL = "all"  # every remaining weight
    PROMPT = "prompt"  # the soft prompt and the classification head (backbone frozen)


class ExtraLabels(Choice):
    """What the training items past the adaptation's are labelled with in recovery (RecoverySpec.extra_examples)."""

    GOLD = "gold"  # the split's own labels
    DENSE = "dense"  # the dense model's answers: the split's labels are not read (unlabelled text would do)


class AdaptMode(Choice):
    """How the dense model learns a task before attribution."""

    FINETUNE = "finetune"  # every weight trains; the graph has no soft prompt
    PROMPT = "prompt"  # the paper's prompt tuning: soft prompt + head, frozen backbone

    @property
    def trains(self) -> TrainedParams:
        """What adaptation in this mode trains, and what recovery trains by default after it."""
        return TrainedParams.PROMPT if self is AdaptMode.PROMPT else TrainedParams.ALL


class LayerTypes(Choice):
    FFN = "ffn"
    ATTENTION = "attention"
    BOTH = "both"


class Budget(Choice):
    PER_LAYER = "per-layer"  # the same rate in every layer
    GLOBAL = "global"  # one ranking over all layers


class TokenAgg(Choice):
    MEAN = "mean"
    MAX = "max"


class Rank(Choice):
    ABS_OF_MEAN = "abs-of-mean"  # |mean_examples(agg_tokens(h * g))| (the paper; never the signed value)
    MEAN_ABS = "mean-abs"  # mean |h * g|


class Exporter(Choice):
    TORCHSCRIPT = "torchscript"  # torch.onnx.export(dynamo=False)
    DYNAMO = "dynamo"


class Attention(Choice):
    EAGER = "eager"  # scores + additive mask (no per-layer safe-softmax Where)
    NATIVE = "native"  # the model's own implementation (SDPA)


class Rounding(Choice):
    """How a kept width that is not a multiple of the alignment is made one."""

    NEAREST = "nearest"  # the closest multiple: the rate stays as close as it can (default)
    UP = "up"  # keep more: never more pruning than asked for
    DOWN = "down"  # keep fewer: never less pruning than asked for


class BudgetRule(Choice):
    """How ``--max-loss`` decides that a rate keeps the budget on dev."""

    CONFIDENT = "confident"  # the dev interval's lower end is within it: 95 % sure on dev (default)
    POINT = "point"  # the dev estimate is within it: about an even chance of a larger loss at the chosen rate


class Fp16Form(Choice):
    """The form of the fp16 variant, the graph served on CUDA."""

    FUSED = "fused"  # dynamo export + onnxruntime fusions (fused Attention in every layer), then fp16
    PLAIN = "plain"  # the fp32 graph's own form converted to fp16


class Pooling(Choice):
    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


__all__ = [
    "AdaptMode",
    "Attention",
    "Budget",
    "BudgetRule",
    "Choice",
    "Exporter",
    "Fp16Form",
    "LayerTypes",
    "Pooling",
    "Rank",
    "Rounding",
    "TokenAgg",
    "TrainedParams",
]
