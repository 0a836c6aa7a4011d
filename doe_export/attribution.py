"""Neuron scorers: how much each FFN neuron matters for a task.

One calibration pass (:func:`collect_stats`) gathers, per layer and neuron, every statistic the
scorers need; each scorer then turns those statistics (and/or the weights) into one importance
value per neuron (higher = keep). Scorers are plug-ins: register a class in :data:`SCORERS`.

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


@dataclass
class CalibrationStats:
    """Per-layer sums over the calibration data (see the module docstring for the notation)."""

    examples: int
    tokens: int
    ag_mean: list[torch.Tensor]  # sum over examples of mean_tokens(h*g)
    ag_max: list[torch.Tensor]  # sum over examples of max_tokens(h*g)
    abs_ag_mean: list[torch.Tensor]  # sum over examples of mean_tokens |h*g|
    act: list[torch.Tensor]  # sum over tokens of h
    abs_act: list[torch.Tensor]  # sum over tokens of |h|
    abs_grad: list[torch.Tensor]  # sum over tokens of |g|
    taylor: list[torch.Tensor]  # sum over the neuron's weights of |w * accumulated dL/dw|
    prompt_act: list[torch.Tensor]  # [N, I]: mean activation over prompt positions, per example
    labels: torch.Tensor  # [N]
    num_labels: int
    # per layer [heads]: sum over examples of mean_tokens(sum over the head's dims of c*dF/dc), where
    # c is the input of the attention output projection (the heads' context vectors)
    head_ag_mean: list[torch.Tensor] | None = None

    def mean_activation(self) -> list[torch.Tensor]:
        return [(s / self.tokens).float() for s in self.act]


class ActivationTap:
    """Capture the input of every down-projection (the FFN neuron activations) on forward.

    ``where="attention"`` taps the input of every attention output projection instead: the
    concatenated per-head context vectors [B, T, heads * head_dim].
    """

    def __init__(self, model, where: str = "ffn"):
        self.acts: list[torch.Tensor | None] = []
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
        raise ValueError(f"calibration needs {examples} examples but the split ({split.name}) has {len(split)}")
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


def collect_stats(model, batches, total: int | None = None, progress: bool = True) -> CalibrationStats:
    """One pass over the calibration batches; gradients of log p(gold) w.r.t. activations and FFN weights."""
    model.eval()
    layers = list(model.spec.layer_list(model.backbone))
    ffn_params = [p for layer in layers for p in _ffn_params(model, layer)]
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    saved_grads = [p.grad for p in ffn_params]
    for param in all_params:  # only the FFN weights collect gradients during the pass
        param.requires_grad_(False)
    for param in ffn_params:
        param.requires_grad_(True)
        param.grad = None
    tap = ActivationTap(model)
    heads_tap = ActivationTap(model, "attention") if model.spec.heads_module is not None else None
    head_counts = model.spec.head_counts(model.backbone) if heads_tap else []
    head_ag = [torch.zeros(h, dtype=torch.float64) for h in head_counts]
    widths = model.ffn_widths()
    zeros = lambda: [torch.zeros(w, dtype=torch.float64) for w in widths]  # noqa: E731
    ag_mean, ag_max, abs_ag_mean, act_sum, abs_act, abs_grad = zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
    prompt_act: list[list[torch.Tensor]] = [[] for _ in widths]
    labels_seen, tokens, examples = [], 0, 0
    try:
        for ids, mask, labels in tqdm(batches, total=total, desc="attribution", disable=not progress,
                                      leave=False, unit="batch"):
            with torch.enable_grad():
                logits = model(ids, mask)
                gold = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).sum()
                # one backward pass for the FFN activations and the heads' context vectors together
                head_acts = heads_tap.acts if heads_tap else []
                all_grads = torch.autograd.grad(gold, tap.acts + head_acts, retain_graph=True)
                grads, head_grads = all_grads[: len(tap.acts)], all_grads[len(tap.acts):]
                (-gold).backward()  # accumulates dL/dw of the FFN weights for the Taylor scorer
            full_mask = model.full_mask(mask)  # [B, P+T], prompt positions count as real
            weights = full_mask.unsqueeze(-1).double()
            prompt = model.prompt_length
            for index, (act, grad) in enumerate(zip(tap.acts, grads)):
                act, grad = act.detach().double(), grad.double()
                product = act * grad  # [B, P+T, I]
                ag_mean[index] += masked_token_agg(product, full_mask, "mean").sum(dim=0)
                ag_max[index] += masked_token_agg(product, full_mask, "max").sum(dim=0)
                abs_ag_mean[index] += masked_token_agg(product.abs(), full_mask, "mean").sum(dim=0)
                act_sum[index] += (act * weights).sum(dim=(0, 1))
                abs_act[index] += (act.abs() * weights).sum(dim=(0, 1))
                abs_grad[index] += (grad.abs() * weights).sum(dim=(0, 1))
                if prompt:
                    prompt_act[index].append(act[:, :prompt].mean(dim=1).float())
                else:
                    prompt_act[index].append(masked_token_agg(act, full_mask, "mean").float())
            for index, (ctx, grad) in enumerate(zip(head_acts, head_grads)):
                batch, length, _ = ctx.shape  # [B, P+T, heads*head_dim] -> per head: sum over head_dim
                product = (ctx.detach().double() * grad.double()).reshape(batch, length, head_counts[index], -1).sum(-1)
                head_ag[index] += masked_token_agg(product, full_mask, "mean").sum(dim=0)
            labels_seen.append(labels)
            tokens += int(full_mask.sum())
            examples += ids.shape[0]
        if examples == 0:
            raise ValueError("attribution got no calibration examples")
        taylor = [_taylor(model, layer) for layer in layers]
    finally:
        tap.close()
        if heads_tap:
            heads_tap.close()
        for param, grad in zip(ffn_params, saved_grads):
            param.grad = grad
        for param, flag in zip(all_params, flags):
            param.requires_grad_(flag)
    return CalibrationStats(examples, tokens, ag_mean, ag_max, abs_ag_mean, act_sum, abs_act, abs_grad, taylor,
                            [torch.cat(chunks) for chunks in prompt_act], torch.cat(labels_seen), model.num_labels,
                            head_ag if heads_tap else None)


class Scorer:
    """Base of the plug-ins: ``needs_data`` says whether :func:`collect_stats` must run first."""

    name = "base"
    needs_data = True

    def config(self) -> dict:
        return {"scorer": self.name}

    def importance(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        raise NotImplementedError

    def head_importance(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        """One value per attention head and layer (higher = keep); scorers that cannot score heads refuse."""
        raise ValueError(f"scorer {self.name!r} scores FFN neurons only; attention heads can be scored by: "
                         f"{', '.join(HEAD_SCORERS)}")

    def score_heads(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        if model.spec.heads_module is None:
            raise ValueError(f"attention heads of the {model.spec.family!r} family cannot be scored or removed; "
                             "use layer types 'ffn'")
        if self.needs_data and (stats is None or stats.head_ag_mean is None):
            raise ValueError(f"scorer {self.name!r} needs calibration statistics with head sums (collect_stats)")
        return [t.float() for t in self.head_importance(model, stats)]

    def score(self, model, stats: CalibrationStats | None) -> Scores:
        if self.needs_data and stats is None:
            raise ValueError(f"scorer {self.name!r} needs calibration statistics (collect_stats)")
        importance = [t.float() for t in self.importance(model, stats)]
        mean_act = stats.mean_activation() if stats is not None else [torch.zeros(w) for w in model.ffn_widths()]
        return Scores(importance, mean_act, stats.examples if stats is not None else 0, self.config())


class DoEScorer(Scorer):
    """Activation x gradient of the gold label's log-probability (the DoE paper's attribution)."""

    name = "doe"

    def __init__(self, token_agg: str = "mean", rank: str = "abs-of-mean"):
        if token_agg not in TOKEN_AGGS:
            raise ValueError(f"token_agg must be one of {TOKEN_AGGS}, got {token_agg!r}")
        if rank not in ("abs-of-mean", "mean-abs"):
            raise ValueError(f"rank must be 'abs-of-mean' or 'mean-abs', got {rank!r}")
        self.token_agg = token_agg
        self.rank = rank

    def config(self) -> dict:
        return {"scorer": self.name, "token_agg": self.token_agg, "objective": "log p(gold)",
                "rank_by": "|A_i|" if self.rank == "abs-of-mean" else "mean |h*g|"}

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
    needs_data = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def config(self) -> dict:
        return {"scorer": self.name, "seed": self.seed}

    def importance(self, model, stats):
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.rand(w, generator=generator) for w in model.ffn_widths()]

    def head_importance(self, model, stats):
        generator = torch.Generator().manual_seed(10_000 + self.seed)
        return [torch.rand(h, generator=generator) for h in model.spec.head_counts(model.backbone)]


class ActivationScorer(Scorer):
    name = "activation"

    def importance(self, model, stats):
        return [s / stats.tokens for s in stats.abs_act]


class GradientScorer(Scorer):
    name = "gradient"

    def importance(self, model, stats):
        return [s / stats.tokens for s in stats.abs_grad]


class MagnitudeScorer(Scorer):
    name = "magnitude"
    needs_data = False

    def importance(self, model, stats):
        out = []
        for layer in model.spec.layer_list(model.backbone):
            up = torch.cat([linear.weight.detach() for linear in model.spec.up_linears(layer)], dim=1)  # [I, k*H]
            down = model.spec.down_linear(layer).weight.detach()  # [H, I]
            out.append(up.norm(dim=1) * down.norm(dim=0))
        return out


class TaylorScorer(Scorer):
    name = "taylor"

    def importance(self, model, stats):
        return stats.taylor


class SkillScorer(Scorer):
    name = "skill"

    def importance(self, model, stats):
        onehot = torch.nn.functional.one_hot(stats.labels, stats.num_labels).float()  # [N, C]
        out = []
        for acts in stats.prompt_act:  # [N, I]
            above = (acts > acts.mean(dim=0, keepdim=True)).float()  # [N, I]
            hits = onehot.T @ above + (1 - onehot).T @ (1 - above)  # [C, I]: correct one-vs-rest calls
            accuracy = hits / acts.shape[0]
            out.append(torch.maximum(accuracy, 1 - accuracy).amax(dim=0))
        return out


SCORERS = {cls.name: cls for cls in (DoEScorer, RandomScorer, ActivationScorer, GradientScorer, MagnitudeScorer,
                                     TaylorScorer, SkillScorer)}


HEAD_SCORERS = ("doe", "random")


def make_scorer(name: str, **options) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}")
    cls = SCORERS[name]
    accepted = {"doe": ("token_agg", "rank"), "random": ("seed",)}.get(name, ())
    return cls(**{key: value for key, value in options.items() if key in accepted})
