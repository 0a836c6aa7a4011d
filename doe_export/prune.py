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

BUDGETS = ("per-layer", "global")


@dataclass(frozen=True)
class PruneConfig:
    rate: float = 0.65  # share of FFN neurons removed
    budget: str = "per-layer"  # "per-layer" | "global"
    round_to: int = 1  # kept width of each layer rounded up to a multiple of this
    fold_bias: bool = False
    min_keep: int = 1  # never empty a layer (zero-width MatMuls are not portable across runtimes)

    def check(self) -> "PruneConfig":
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"pruning rate must be in [0, 1), got {self.rate}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.round_to < 1 or self.min_keep < 1:
            raise ValueError(f"round_to and min_keep must be >= 1, got {self.round_to}, {self.min_keep}")
        return self


def _round_width(k: int, width: int, config: PruneConfig) -> int:
    k = max(k, config.min_keep)
    k = int(math.ceil(k / config.round_to) * config.round_to)
    return min(k, width)


def select_neurons(importance: list[torch.Tensor], config: PruneConfig) -> list[torch.Tensor]:
    """Sorted indices of the neurons to keep in each layer."""
    config.check()
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
        count = _round_width(count, width, config)
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
        raise ValueError(f"keep has {len(keep)} entries but the model has {len(layers)} layers")
    before = count_parameters(model)
    widths_before = model.ffn_widths()
    for index, (layer, kept) in enumerate(zip(layers, keep)):
        down = spec.down_linear(layer)
        width = down.in_features
        if kept.numel() == 0 or int(kept.max()) >= width:
            raise ValueError(f"layer {index}: keep indices must be non-empty and < {width}")
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
                new_down.bias += shift
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
