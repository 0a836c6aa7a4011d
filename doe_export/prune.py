"""Physical removal of FFN neurons (masking gives no speed-up; slicing does).

For each layer with kept neuron indices ``keep`` (sorted)::

    up   Linear(H -> I)  -> Linear(H -> k):  weight[keep, :], bias[keep]     (every up Linear)
    down Linear(I -> H)  -> Linear(k -> H):  weight[:, keep], bias unchanged

Optionally the removed neurons' mean activation is folded into the down-projection bias
(``bias += W_down[:, removed] @ mean_h[removed]``), so the layer's average output is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .archs import set_module
from .errors import ConfigError
from .specs import TENSOR_CORE_ALIGNMENT, Budget, LayerTypes, Rounding


@dataclass(frozen=True)
class PruneConfig:
    """The surgery's own settings (the stage API builds them from a PruneSpec)."""

    rate: float = 0.65  # share of FFN neurons removed
    budget: Budget = Budget.PER_LAYER
    round_to: int = 1  # kept width of each layer made a multiple of this (per ``rounding``)
    fold_bias: bool = False
    min_keep: int = 1  # never empty a layer (zero-width MatMuls are not portable across runtimes)
    rounding: Rounding = Rounding.UP

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ConfigError(f"pruning rate must be in [0, 1), got {self.rate}")
        object.__setattr__(self, "budget", Budget.parse(self.budget, "budget"))
        object.__setattr__(self, "rounding", Rounding.parse(self.rounding, "rounding"))
        if self.round_to < 1 or self.min_keep < 1:
            raise ConfigError(f"round_to and min_keep must be >= 1, got {self.round_to}, {self.min_keep}")


def kept_width(k: int, width: int, config: PruneConfig) -> int:
    """``k`` kept of ``width`` made a multiple of ``round_to`` (up, down or to the nearest; at least one multiple
    and never more than the width)."""
    k, step = max(k, config.min_keep), config.round_to
    if config.rounding is Rounding.UP:
        k = math.ceil(k / step) * step
    elif config.rounding is Rounding.DOWN:
        k = (k // step) * step
    else:
        k = math.floor(k / step + 0.5) * step
    return min(max(k, step), width)


def alignment(round_to: int | None, dense: int, unit: int = 1) -> int:
    """The multiple, in ``unit``s, that a kept count of a dimension must be: with ``round_to`` None the tensor-core
    alignment wherever the dense size ``dense * unit`` is a multiple of it (else 1: nothing to align); with an
    explicit ``round_to`` that multiple always. For heads, ``unit`` is the head size (heads x head size aligned)."""
    target = TENSOR_CORE_ALIGNMENT if round_to is None else round_to
    if round_to is None and (dense * unit) % target:
        return 1
    return target // math.gcd(target, unit)


def select_neurons(importance: list[torch.Tensor], config: PruneConfig) -> list[torch.Tensor]:
    """Sorted indices of the neurons to keep in each layer."""
    widths = [len(scores) for scores in importance]
    if config.budget == "per-layer":
        counts = [round(w * (1.0 - config.rate)) for w in widths]
    else:  # global: one threshold over all layers' scores
        total_keep = round(sum(widths) * (1.0 - config.rate))
        flat = torch.cat([s.float() for s in importance])
        layer_of = torch.cat([torch.full((w,), i) for i, w in enumerate(widths)])
        top = torch.topk(flat, total_keep).indices if total_keep else torch.empty(0, dtype=torch.long)
        counts = torch.bincount(layer_of[top], minlength=len(widths)).tolist()
    keep = []
    for scores, width, count in zip(importance, widths, counts):
        count = kept_width(count, width, config)
        # stable tie-break by index so equal scores give the same selection every run
        order = torch.sort(-scores.float(), stable=True).indices
        keep.append(torch.sort(order[:count]).values)
    return keep


def _sliced(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, index) if dim == 0 else bias)
    return new


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_ffn(model, keep: list[torch.Tensor], mean_activation: list[torch.Tensor] | None = None) -> dict:
    """Slice every layer's FFN to ``keep`` in place; return a report (params, widths)."""
    spec = model.spec
    layers = spec.layer_list(model.backbone)
    if len(keep) != len(layers):
        raise ConfigError(f"keep has {len(keep)} entries but the model has {len(layers)} layers")
    before = count_parameters(model)
    widths_before = model.ffn_widths()
    for index, (layer, kept) in enumerate(zip(layers, keep)):
        down = spec.down_linear(layer)
        width = down.in_features
        if kept.numel() == 0 or int(kept.max()) >= width:
            raise ConfigError(f"layer {index}: keep indices must be non-empty and < {width}")
        for path in spec.up:
            set_module(layer, path, _sliced(layer.get_submodule(path), kept, dim=0))
        new_down = _sliced(down, kept, dim=1)
        if mean_activation is not None:
            removed = torch.ones(width, dtype=torch.bool)
            removed[kept] = False
            shift = down.weight.detach()[:, removed] @ mean_activation[index][removed].to(down.weight.dtype)
            if new_down.bias is None:
                new_down = _with_bias(new_down)
            with torch.no_grad():
                new_down.bias.add_(shift)
        set_module(layer, spec.down, new_down)
    return {
        "params_before": before,
        "params_after": count_parameters(model),
        "ffn_widths_before": widths_before,
        "ffn_widths": model.ffn_widths(),
    }


def _with_bias(linear: nn.Linear) -> nn.Linear:
    new = nn.Linear(linear.in_features, linear.out_features, bias=True, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        new.bias.zero_()
    return new


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of q/k/v (= column indices of the output projection) of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def prune_heads(model, keep: list[torch.Tensor]) -> dict:
    """Remove whole attention heads in place: q/k/v rows and output-projection columns.

    ``keep[l]`` holds the sorted indices of the heads layer ``l`` keeps (at least one: a layer
    without heads would need its attention block replaced by its bias, which the exported graphs
    do not do). The module's head count attributes are updated so that the forward pass reshapes
    to the new number of heads; the config keeps the original count (it describes the base model).
    """
    spec = model.spec
    if spec.heads_module is None:
        raise ConfigError(
            f"attention heads of the {spec.family!r} family cannot be removed by this toolchain "
            "(supported: bert, roberta, electra, distilbert); use --layer-types ffn"
        )
    layers = spec.layer_list(model.backbone)
    if len(keep) != len(layers):
        raise ConfigError(f"keep has {len(keep)} entries but the model has {len(layers)} layers")
    head_dim = spec.head_dim(model.backbone)
    before = count_parameters(model)
    heads_before = spec.head_counts(model.backbone)
    for index, (layer, kept) in enumerate(zip(layers, keep)):
        count = heads_before[index]
        if kept.numel() == 0 or int(kept.max()) >= count or int(kept.min()) < 0:
            raise ConfigError(f"layer {index}: keep must name 1..{count} heads in [0, {count}), got {kept.tolist()}")
        rows = head_rows(kept, head_dim)
        for path, dim in zip(spec.attention, (0, 0, 0, 1)):
            set_module(layer, path, _sliced(layer.get_submodule(path), rows, dim=dim))
        holder = layer.get_submodule(spec.heads_module)
        for name in ("num_attention_heads", "n_heads"):
            if hasattr(holder, name):
                setattr(holder, name, int(kept.numel()))
        if hasattr(holder, "all_head_size"):
            holder.all_head_size = int(kept.numel()) * head_dim
    return {
        "params_before": before,
        "params_after": count_parameters(model),
        "head_counts_before": heads_before,
        "head_counts": spec.head_counts(model.backbone),
    }


def prune_model(
    model,
    layer_types: str,
    config: PruneConfig,
    importance: list[torch.Tensor] | None,
    *,
    head_importance: list[torch.Tensor] | None = None,
    head_rate: float | None = None,
    head_multiple: int = 1,
    mean_activation: list[torch.Tensor] | None = None,
) -> dict:
    """Remove FFN neurons, attention heads or both (``layer_types``); one report for the whole model.

    FFN neurons follow ``config`` (rate, budget, rounding, folding); heads follow ``head_rate``
    (default: ``config.rate``) with the same budget and rounding, in multiples of ``head_multiple`` heads, at
    least one multiple per layer.
    """
    layer_types = LayerTypes.parse(layer_types, "layer types")
    spec = model.spec
    report = {
        "params_before": count_parameters(model),
        "ffn_widths_before": model.ffn_widths(),
        "head_counts_before": spec.head_counts(model.backbone),
        "layer_types": layer_types,
    }
    if layer_types in ("ffn", "both"):
        if importance is None:
            raise ConfigError("removing FFN neurons needs their importance (one tensor per layer)")
        keep = select_neurons(importance, config)
        prune_ffn(model, keep, mean_activation if config.fold_bias else None)
    if layer_types in ("attention", "both"):
        if head_importance is None:
            raise ConfigError("removing attention heads needs their importance (one tensor per layer)")
        rate = config.rate if head_rate is None else head_rate
        head_config = PruneConfig(rate, config.budget, round_to=head_multiple, rounding=config.rounding)
        head_keep = select_neurons(head_importance, head_config)
        prune_heads(model, head_keep)
    report.update(
        params_after=count_parameters(model),
        ffn_widths=model.ffn_widths(),
        head_counts=spec.head_counts(model.backbone),
    )
    return report
