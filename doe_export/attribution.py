"""Neuron scorers: how much each FFN neuron matters for a task.

A scorer returns, per layer, one importance value per FFN neuron (higher = keep) plus the mean
activation of each neuron over real tokens (used to fold removed neurons into the bias).
Scorers are plug-ins: register a class in :data:`SCORERS`.

DoE (design.md §1): for neuron i, activation h_i (input of the down-projection) and gradient
g_i = dF/dh_i, with F the log-probability of the gold label::

    A_i = mean_over_examples( agg_over_real_tokens( h_i * g_i ) )     agg: mean | max
    importance_i = |A_i|   (never the signed value: it ranks whole useful neurons last)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from doe_runtime.router import encode_batch

from .tasks import Split

TOKEN_AGGS = ("mean", "max")


@dataclass
class Scores:
    importance: list[torch.Tensor]  # per layer, [I_l]
    mean_activation: list[torch.Tensor]  # per layer, [I_l]
    examples: int
    info: dict = field(default_factory=dict)


class ActivationTap:
    """Capture the input of every down-projection (the FFN neuron activations) on forward."""

    def __init__(self, model):
        self.acts: list[torch.Tensor | None] = []
        self.handles = []
        for index, layer in enumerate(model.spec.layer_list(model.backbone)):
            self.acts.append(None)
            self.handles.append(model.spec.down_linear(layer).register_forward_pre_hook(self._hook(index)))

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
        raise ValueError(f"calibration needs {examples} examples but the split ({split.name}) has {len(split)}")
    picked = random.Random(seed).sample(range(len(split)), examples)
    for start in range(0, examples, batch_size):
        chunk = picked[start : start + batch_size]
        ids, mask = encode_batch(tokenizer, [split.inputs[i] for i in chunk])
        yield torch.from_numpy(ids), torch.from_numpy(mask), torch.tensor([split.labels[i] for i in chunk])


class DoEScorer:
    """Activation x gradient of the gold label's log-probability (the DoE paper's attribution)."""

    name = "doe"

    def __init__(self, token_agg: str = "mean"):
        if token_agg not in TOKEN_AGGS:
            raise ValueError(f"token_agg must be one of {TOKEN_AGGS}, got {token_agg!r}")
        self.token_agg = token_agg

    def config(self) -> dict:
        return {"scorer": self.name, "token_agg": self.token_agg, "objective": "log p(gold)", "rank_by": "|A_i|"}

    def score(self, model, batches, total: int | None = None, progress: bool = True) -> Scores:
        model.eval()
        tap = ActivationTap(model)
        widths = model.ffn_widths()
        attr_sum = [torch.zeros(w, dtype=torch.float64) for w in widths]
        act_sum = [torch.zeros(w, dtype=torch.float64) for w in widths]
        tokens = 0
        examples = 0
        try:
            for ids, mask, labels in tqdm(batches, total=total, desc="attribution", disable=not progress,
                                          leave=False, unit="batch"):
                with torch.enable_grad():
                    logits = model(ids, mask)
                    gold = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).sum()
                    grads = torch.autograd.grad(gold, tap.acts)
                full_mask = model.full_mask(mask)  # [B, P+T], prompt positions count as real
                weights = full_mask.unsqueeze(-1).double()
                for layer, (act, grad) in enumerate(zip(tap.acts, grads)):
                    act, grad = act.detach().double(), grad.double()
                    attr_sum[layer] += masked_token_agg(act * grad, full_mask, self.token_agg).sum(dim=0)
                    act_sum[layer] += (act * weights).sum(dim=(0, 1))
                tokens += int(full_mask.sum())
                examples += ids.shape[0]
        finally:
            tap.close()
        if examples == 0:
            raise ValueError("attribution got no calibration examples")
        return Scores(
            importance=[(s / examples).abs().float() for s in attr_sum],
            mean_activation=[(s / tokens).float() for s in act_sum],
            examples=examples,
            info=self.config(),
        )


SCORERS = {"doe": DoEScorer}


def make_scorer(name: str, **options):
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}")
    return SCORERS[name](**options)
