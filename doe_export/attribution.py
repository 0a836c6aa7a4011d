"""Neuron scorers: how much each FFN neuron matters for a task.

One calibration pass (:func:`collect_stats`) gathers, per layer and neuron, the statistics the
scorers of :mod:`doe_export.scorers` declare they need (activations h_i of the FFN neurons, their
gradients g_i = dF/dh_i with F = log p(gold label), over real (non-pad) positions, soft-prompt
positions included; and per attention head the same product on the heads' context vectors).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from doe_runtime.tokenization import encode_batch

from .errors import ConfigError
from .scorers import SCORERS, STATS, Scorer, Scores, make_scorer
from .tasks import Split


@dataclass
class CalibrationStats:
    """Per-layer sums over the calibration data (see the module docstring for the notation).

    Only the statistics a scorer declares in ``Scorer.needs`` are gathered; the others stay None.
    """

    examples: int
    tokens: int
    ag_mean: list[torch.Tensor] | None = None  # sum over examples of mean_tokens(h*g)
    ag_max: list[torch.Tensor] | None = None  # sum over examples of max_tokens(h*g)
    abs_ag_mean: list[torch.Tensor] | None = None  # sum over examples of mean_tokens |h*g|
    act: list[torch.Tensor] | None = None  # sum over tokens of h
    abs_act: list[torch.Tensor] | None = None  # sum over tokens of |h|
    abs_grad: list[torch.Tensor] | None = None  # sum over tokens of |g|
    taylor: list[torch.Tensor] | None = None  # sum over the neuron's weights of |w * accumulated dL/dw|
    prompt_act: list[torch.Tensor] | None = None  # [N, I]: mean activation over prompt positions, per example
    labels: torch.Tensor | None = None  # [N]
    num_labels: int = 0
    # per layer [heads]: sum over examples of mean_tokens(sum over the head's dims of c*dF/dc), where
    # c is the input of the attention output projection (the heads' context vectors)
    head_ag_mean: list[torch.Tensor] | None = None
    gathered: tuple[str, ...] = STATS

    def mean_activation(self) -> list[torch.Tensor]:
        if self.act is None:
            raise ConfigError("mean activations were not gathered: pass needs including 'act' to collect_stats")
        return [(s / self.tokens).float() for s in self.act]

    def require(self, names, who: str) -> None:
        missing = sorted(set(names) - set(self.gathered))
        if missing:
            raise ConfigError(
                f"{who} needs calibration statistics {missing}, which were not gathered "
                f"(gathered: {list(self.gathered)})"
            )


class ActivationTap:
    """Capture the input of every down-projection (the FFN neuron activations) on forward.

    ``where="attention"`` taps the input of every attention output projection instead: the
    concatenated per-head context vectors [B, T, heads * head_dim].
    """

    def __init__(self, model, where: str = "ffn"):
        self.acts: list[Any] = []  # per layer, the last forward's tensor (None before one)
        self.handles = []
        for index, layer in enumerate(model.spec.layer_list(model.backbone)):
            self.acts.append(None)
            linear = model.spec.down_linear(layer) if where == "ffn" else model.spec.attention_linears(layer)[3]
            self.handles.append(linear.register_forward_pre_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(module, args):
            act = args[0]
            if torch.is_grad_enabled() and not act.requires_grad:
                act = act.detach().requires_grad_(True)  # so dF/dh exists even with a frozen backbone
            self.acts[index] = act
            return (act,) + tuple(args[1:])

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def masked_token_agg(values: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """[B, T, I] values, [B, T] mask of real positions -> [B, I] mean or max over real positions."""
    weights = mask.unsqueeze(-1).to(values.dtype)
    if agg == "mean":
        return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return values.masked_fill(weights == 0, float("-inf")).amax(dim=1)


def calibration_batches(tokenizer, split: Split, examples: int, batch_size: int, seed: int):
    """Seeded sample of ``examples`` items of ``split``, batched: (ids, mask, labels) tensors."""
    if examples > len(split):
        raise ConfigError(f"calibration needs {examples} examples but the split ({split.name}) has {len(split)}")
    picked = random.Random(seed).sample(range(len(split)), examples)
    for start in range(0, examples, batch_size):
        chunk = picked[start : start + batch_size]
        ids, mask = encode_batch(tokenizer, [split.inputs[i] for i in chunk])
        yield torch.from_numpy(ids), torch.from_numpy(mask), torch.tensor([split.labels[i] for i in chunk])


def _ffn_params(model, layer) -> list[torch.nn.Parameter]:
    linears = [*model.spec.up_linears(layer), model.spec.down_linear(layer)]
    return [p for linear in linears for p in linear.parameters()]


@torch.no_grad()
def _taylor(model, layer) -> torch.Tensor:
    """Per neuron: sum of |w * grad| over its up rows (weights and biases) and its down column."""
    total = 0
    for linear in model.spec.up_linears(layer):
        total = total + (linear.weight * linear.weight.grad).abs().sum(dim=1).double()
        if linear.bias is not None:
            total = total + (linear.bias * linear.bias.grad).abs().double()
    down = model.spec.down_linear(layer)
    return total + (down.weight * down.weight.grad).abs().sum(dim=0).double()


class _Sums:
    """The running per-layer sums of one calibration pass (only those asked for)."""

    FFN = ("ag_mean", "ag_max", "abs_ag_mean", "act", "abs_act", "abs_grad")

    def __init__(self, model, want: set[str], head_counts: list[int]):
        widths = model.ffn_widths()
        self.want, self.head_counts, self.prompt = want, head_counts, model.prompt_length
        self.sums = {name: [torch.zeros(w, dtype=torch.float64) for w in widths] for name in self.FFN if name in want}
        self.head_ag = [torch.zeros(h, dtype=torch.float64) for h in head_counts]
        self.prompt_act: list[list[torch.Tensor]] = [[] for _ in widths]
        self.labels: list[torch.Tensor] = []
        self.tokens = self.examples = 0

    def add_ffn(self, index: int, act: torch.Tensor, grad: torch.Tensor | None, full_mask: torch.Tensor) -> None:
        """One layer's FFN activations [B, P+T, I] (and their gradients) of a batch."""
        sums, weights = self.sums, full_mask.unsqueeze(-1).double()
        act = act.detach().double()
        if grad is not None:
            grad = grad.double()
            product = act * grad  # [B, P+T, I]
            if "ag_mean" in sums:
                sums["ag_mean"][index] += masked_token_agg(product, full_mask, "mean").sum(dim=0)
            if "ag_max" in sums:
                sums["ag_max"][index] += masked_token_agg(product, full_mask, "max").sum(dim=0)
            if "abs_ag_mean" in sums:
                sums["abs_ag_mean"][index] += masked_token_agg(product.abs(), full_mask, "mean").sum(dim=0)
            if "abs_grad" in sums:
                sums["abs_grad"][index] += (grad.abs() * weights).sum(dim=(0, 1))
        if "act" in sums:
            sums["act"][index] += (act * weights).sum(dim=(0, 1))
        if "abs_act" in sums:
            sums["abs_act"][index] += (act.abs() * weights).sum(dim=(0, 1))
        if "prompt_act" in self.want:
            if self.prompt:
                self.prompt_act[index].append(act[:, : self.prompt].mean(dim=1).float())
            else:
                self.prompt_act[index].append(masked_token_agg(act, full_mask, "mean").float())

    def add_heads(self, index: int, ctx: torch.Tensor, grad: torch.Tensor, full_mask: torch.Tensor) -> None:
        """One layer's head context vectors [B, P+T, heads*head_dim] and gradients: per head, summed over head_dim."""
        batch, length, _ = ctx.shape
        product = (ctx.detach().double() * grad.double()).reshape(batch, length, self.head_counts[index], -1).sum(-1)
        self.head_ag[index] += masked_token_agg(product, full_mask, "mean").sum(dim=0)


class _Taps:
    """The pass's hooks and gradient flags, undone on close: only the FFN weights collect gradients (taylor)."""

    def __init__(self, model, want: set[str], heads: bool):
        layers = list(model.spec.layer_list(model.backbone))
        self.ffn_params = [p for layer in layers for p in _ffn_params(model, layer)] if "taylor" in want else []
        self.all_params = list(model.parameters())
        self.flags = [p.requires_grad for p in self.all_params]
        self.saved_grads = [p.grad for p in self.ffn_params]
        for param in self.all_params:
            param.requires_grad_(False)
        for param in self.ffn_params:
            param.requires_grad_(True)
            param.grad = None
        self.ffn = ActivationTap(model)
        self.heads = ActivationTap(model, "attention") if heads else None

    def close(self) -> None:
        self.ffn.close()
        if self.heads:
            self.heads.close()
        for param, grad in zip(self.ffn_params, self.saved_grads):
            param.grad = grad
        for param, flag in zip(self.all_params, self.flags):
            param.requires_grad_(flag)


def _gradients(logits: torch.Tensor, labels: torch.Tensor, taps: _Taps, taylor: bool) -> tuple[list, list, list]:
    """d log p(gold) / d (FFN activations, heads' context vectors), in one backward pass; with ``taylor``,
    dL/dw of the FFN weights accumulated as well. Returns (FFN grads, head context vectors, head grads)."""
    gold = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).sum()
    head_acts = taps.heads.acts if taps.heads else []
    grads = torch.autograd.grad(gold, [*taps.ffn.acts, *head_acts], retain_graph=taylor)
    if taylor:
        (-gold).backward()  # accumulates dL/dw of the FFN weights for the Taylor scorer
    return list(grads[: len(taps.ffn.acts)]), head_acts, list(grads[len(taps.ffn.acts) :])


def collect_stats(model, batches, total: int | None = None, progress: bool = True, needs=STATS) -> CalibrationStats:
    """One pass over the calibration batches, gathering only the statistics in ``needs``.

    Gradients of log p(gold) w.r.t. the FFN activations (and the heads' context vectors) are taken
    only if a gradient statistic is needed; the extra backward pass for the weights' gradients only
    for ``taylor``."""
    unknown = sorted(set(needs) - set(STATS))
    if unknown:
        raise ConfigError(f"unknown statistics {unknown}; known: {list(STATS)}")
    needs = tuple(name for name in STATS if name in set(needs))
    want = set(needs)
    grad_stats = want & {"ag_mean", "ag_max", "abs_ag_mean", "abs_grad", "head_ag_mean", "taylor"}
    heads = "head_ag_mean" in want and model.spec.heads_module is not None
    model.eval()
    taps = _Taps(model, want, heads)
    sums = _Sums(model, want, model.spec.head_counts(model.backbone) if heads else [])
    try:
        bar = tqdm(batches, total=total, desc="attribution", disable=not progress, leave=False, unit="batch")
        for ids, mask, labels in bar:
            with torch.set_grad_enabled(bool(grad_stats)):
                logits = model(ids, mask)
                grads: list[Any] = [None] * len(taps.ffn.acts)
                head_acts: list[Any] = []
                head_grads: list[Any] = []
                if grad_stats:
                    grads, head_acts, head_grads = _gradients(logits, labels, taps, "taylor" in want)
            full_mask = model.full_mask(mask)  # [B, P+T], prompt positions count as real
            for index, (act, grad) in enumerate(zip(taps.ffn.acts, grads)):
                sums.add_ffn(index, act, grad, full_mask)
            for index, (ctx, grad) in enumerate(zip(head_acts, head_grads)):
                sums.add_heads(index, ctx, grad, full_mask)
            sums.labels.append(labels)
            sums.tokens += int(full_mask.sum())
            sums.examples += ids.shape[0]
        if sums.examples == 0:
            raise ConfigError("attribution got no calibration examples")
        layers = list(model.spec.layer_list(model.backbone))
        taylor = [_taylor(model, layer) for layer in layers] if "taylor" in want else None
    finally:
        taps.close()
    return CalibrationStats(
        sums.examples,
        sums.tokens,
        taylor=taylor,
        labels=torch.cat(sums.labels),
        num_labels=model.num_labels,
        prompt_act=[torch.cat(chunks) for chunks in sums.prompt_act] if "prompt_act" in want else None,
        head_ag_mean=sums.head_ag if heads else None,
        gathered=tuple(n for n in needs if n != "head_ag_mean" or heads),
        **sums.sums,
    )


__all__ = [
    "SCORERS",
    "STATS",
    "ActivationTap",
    "CalibrationStats",
    "Scorer",
    "Scores",
    "calibration_batches",
    "collect_stats",
    "make_scorer",
    "masked_token_agg",
]
