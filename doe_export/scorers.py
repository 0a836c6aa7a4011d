"""Neuron scorers: the plug-in registry of how much each FFN neuron (and attention head) matters.

Each scorer turns the calibration statistics gathered by :func:`doe_export.attribution.collect_stats`
(and/or the weights) into one importance value per neuron (higher = keep). A scorer declares the
statistics it ``needs`` and the ``options`` it takes; :func:`make_scorer` refuses any other option,
so ``--scorer magnitude --token-agg max`` is an error instead of being ignored. Register a new
scorer in :data:`SCORERS`.

Notation: h_i is neuron i's activation (the input of the down-projection, after the
nonlinearity), g_i = dF/dh_i with F = log p(gold label), over real (non-pad) positions, soft-prompt
positions included.

- ``doe`` (the paper): A_i = mean_examples(agg_tokens(h_i * g_i)), agg = mean | max; rank by |A_i|
  (never by the signed value: design.md section 4). ``rank="mean-abs"`` uses mean |h_i * g_i|.
- ``random``: uniform random (seeded).
- ``activation``: mean |h_i| over real tokens.
- ``gradient``: mean |g_i| over real tokens.
- ``magnitude``: ||up rows of i|| * ||down column of i|| (data-free).
- ``taylor``: sum over the neuron's weights of |w * dL/dw|, gradients of the loss accumulated over
  the calibration data (first-order Taylor importance, as common pruning toolkits do).
- ``skill``: skill-neuron predictivity (Wang et al., EMNLP 2022): the neuron's mean activation over
  the soft-prompt positions, thresholded at its mean, as a predictor of the label; max over
  one-vs-rest classes of max(acc, 1 - acc). Without a soft prompt, all real positions are used.

This module imports torch only inside the scorers' methods: the CLI reads the registry at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .attribution import CalibrationStats

TOKEN_AGGS = ("mean", "max")
RANKS = ("abs-of-mean", "mean-abs")
# every statistic a calibration pass can gather (doe_export.attribution.CalibrationStats has one field each)
STATS = ("ag_mean", "ag_max", "abs_ag_mean", "act", "abs_act", "abs_grad", "taylor", "prompt_act", "head_ag_mean")


@dataclass
class Scores:
    importance: list[torch.Tensor]  # per layer, [I_l]
    mean_activation: list[torch.Tensor]  # per layer, [I_l]
    examples: int
    info: dict = field(default_factory=dict)


class Scorer:
    """Base of the plug-ins: ``needs`` names the statistics :func:`collect_stats` must gather for
    the FFN scores (empty: data-free), ``head_needs`` those for head scores."""

    name = "base"
    needs: tuple[str, ...] = ()
    head_needs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # the keyword options the constructor takes (make_scorer refuses others)
    scores_heads = False  # whether head_importance is implemented

    def config(self) -> dict:
        return {"scorer": self.name}

    def importance(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        raise NotImplementedError

    def head_importance(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        """One value per attention head and layer (higher = keep); scorers that cannot score heads refuse."""
        raise ConfigError(
            f"scorer {self.name!r} scores FFN neurons only; attention heads can be scored by: {', '.join(HEAD_SCORERS)}"
        )

    def score_heads(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        if model.spec.heads_module is None:
            raise ConfigError(
                f"attention heads of the {model.spec.family!r} family cannot be scored or removed; "
                "use layer types 'ffn'"
            )
        if self.head_needs:
            if stats is None:
                raise ConfigError(f"scorer {self.name!r} needs calibration statistics (collect_stats) to score heads")
            stats.require(self.head_needs, f"scorer {self.name!r} (heads)")
        return [t.float() for t in self.head_importance(model, stats)]

    def score(self, model, stats: CalibrationStats | None) -> Scores:
        import torch

        if self.needs:
            if stats is None:
                raise ConfigError(f"scorer {self.name!r} needs calibration statistics (collect_stats)")
            stats.require(self.needs, f"scorer {self.name!r}")
        importance = [t.float() for t in self.importance(model, stats)]
        mean_act = (
            stats.mean_activation()
            if stats is not None and stats.act is not None
            else [torch.zeros(w) for w in model.ffn_widths()]
        )
        return Scores(importance, mean_act, stats.examples if stats is not None else 0, self.config())


class DoEScorer(Scorer):
    """Activation x gradient of the gold label's log-probability (the DoE paper's attribution)."""

    name = "doe"
    options = ("token_agg", "rank")
    scores_heads = True

    def __init__(self, token_agg: str = "mean", rank: str = "abs-of-mean"):
        if token_agg not in TOKEN_AGGS:
            raise ConfigError(f"token_agg must be one of {', '.join(TOKEN_AGGS)}, got {token_agg!r}")
        if rank not in RANKS:
            raise ConfigError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
        self.token_agg = str(token_agg)
        self.rank = str(rank)
        self.needs = ("abs_ag_mean",) if rank == "mean-abs" else ("ag_mean",) if token_agg == "mean" else ("ag_max",)
        self.head_needs = ("head_ag_mean",)

    def config(self) -> dict:
        return {
            "scorer": self.name,
            "token_agg": self.token_agg,
            "objective": "log p(gold)",
            "rank_by": "|A_i|" if self.rank == "abs-of-mean" else "mean |h*g|",
        }

    def head_importance(self, model, stats):
        # the head's share of the same attribution: |mean_examples(mean_tokens(sum_d c_d * dF/dc_d))|,
        # i.e. the gradient of F w.r.t. a gate multiplying the head's output (Michel et al., 2019)
        return [(s / stats.examples).abs() for s in stats.head_ag_mean]

    def importance(self, model, stats):
        if self.rank == "mean-abs":
            return [s / stats.examples for s in stats.abs_ag_mean]
        sums = stats.ag_mean if self.token_agg == "mean" else stats.ag_max
        return [(s / stats.examples).abs() for s in sums]


class RandomScorer(Scorer):
    name = "random"
    options = ("seed",)
    scores_heads = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def config(self) -> dict:
        return {"scorer": self.name, "seed": self.seed}

    def importance(self, model, stats):
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        return [torch.rand(w, generator=generator) for w in model.ffn_widths()]

    def head_importance(self, model, stats):
        import torch

        generator = torch.Generator().manual_seed(10_000 + self.seed)
        return [torch.rand(h, generator=generator) for h in model.spec.head_counts(model.backbone)]


class ActivationScorer(Scorer):
    name = "activation"
    needs = ("abs_act",)

    def importance(self, model, stats):
        return [s / stats.tokens for s in stats.abs_act]


class GradientScorer(Scorer):
    name = "gradient"
    needs = ("abs_grad",)

    def importance(self, model, stats):
        return [s / stats.tokens for s in stats.abs_grad]


class MagnitudeScorer(Scorer):
    name = "magnitude"

    def importance(self, model, stats):
        import torch

        out = []
        for layer in model.spec.layer_list(model.backbone):
            up = torch.cat([linear.weight.detach() for linear in model.spec.up_linears(layer)], dim=1)  # [I, k*H]
            down = model.spec.down_linear(layer).weight.detach()  # [H, I]
            out.append(up.norm(dim=1) * down.norm(dim=0))
        return out


class TaylorScorer(Scorer):
    name = "taylor"
    needs = ("taylor",)

    def importance(self, model, stats):
        return stats.taylor


class SkillScorer(Scorer):
    name = "skill"
    needs = ("prompt_act",)

    def importance(self, model, stats):
        import torch

        onehot = torch.nn.functional.one_hot(stats.labels, stats.num_labels).float()  # [N, C]
        out = []
        for acts in stats.prompt_act:  # [N, I]
            above = (acts > acts.mean(dim=0, keepdim=True)).float()  # [N, I]
            hits = onehot.T @ above + (1 - onehot).T @ (1 - above)  # [C, I]: correct one-vs-rest calls
            accuracy = hits / acts.shape[0]
            out.append(torch.maximum(accuracy, 1 - accuracy).amax(dim=0))
        return out


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (DoEScorer, RandomScorer, ActivationScorer, GradientScorer, MagnitudeScorer, TaylorScorer, SkillScorer)
}
HEAD_SCORERS = tuple(name for name, cls in SCORERS.items() if cls.scores_heads)


def _scorer_class(name: str) -> type[Scorer]:
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def scores_heads(name: str) -> bool:
    return _scorer_class(name).scores_heads


def accepted(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` the scorer ``name`` takes."""
    takes = _scorer_class(name).options
    return {key: value for key, value in options.items() if key in takes}


def check_options(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse options the scorer does not take, unless they hold their default (a spec always carries
    every option; only a changed one is a request). ``seed`` is the flow's seed and never refused."""
    cls = _scorer_class(name)
    for key, value in options.items():
        if key in cls.options or key == "seed":
            continue
        if key in defaults and value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        takes = ", ".join(cls.options) or "none"
        raise ConfigError(
            f"scorer {name!r} takes no option {key} (given {value!s}; its options: {takes}); drop {flag}, or use a "
            f"scorer that takes it: {', '.join(n for n, c in SCORERS.items() if key in c.options)}"
        )


def make_scorer(name: str, **options: Any) -> Scorer:
    """The scorer ``name`` with ``options``; an option it does not take is a ConfigError naming it."""
    cls = _scorer_class(name)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ConfigError(
            f"scorer {name!r} takes no option {', '.join(unknown)} (its options: {', '.join(cls.options) or 'none'})"
        )
    return cls(**options)


__all__ = [
    "HEAD_SCORERS",
    "SCORERS",
    "STATS",
    "Scorer",
    "Scores",
    "accepted",
    "check_options",
    "make_scorer",
    "scores_heads",
]
