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

from doe_runtime.tokenization import encode_batch

from .tasks import Split
from .errors import ConfigError

TOKEN_AGGS = ("mean", "max")


@dataclass
class Scores:
    importance: list[torch.Tensor]  # per layer, [I_l]
    mean_activation: list[torch.Tensor]  # per layer, [I_l]
    examples: int
    info: dict = field(default_factory=dict)


STATS = ("ag_mean", "ag_max", "abs_ag_mean", "act", "abs_act", "abs_grad", "taylor", "prompt_act", "head_ag_mean")


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
            raise ConfigError(f"{who} needs calibration statistics {missing}, which were not gathered "
                             f"(gathered: {list(self.gathered)})")


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


def collect_stats(model, batches, total: int | None = None, progress: bool = True,
                  needs=STATS) -> CalibrationStats:
    """One pass over the calibration batches, gathering only the statistics in ``needs``.

    Gradients of log p(gold) w.r.t. the FFN activations (and the heads' context vectors) are taken
    only if a gradient statistic is needed; the extra backward pass for the weights' gradients only
    for ``taylor``."""
    needs = tuple(name for name in STATS if name in set(needs))
    unknown = sorted(set(needs) - set(STATS))
    if unknown:
        raise ConfigError(f"unknown statistics {unknown}; known: {list(STATS)}")
    want = set(needs)
    grad_stats = want & {"ag_mean", "ag_max", "abs_ag_mean", "abs_grad", "head_ag_mean", "taylor"}
    heads = "head_ag_mean" in want and model.spec.heads_module is not None
    model.eval()
    layers = list(model.spec.layer_list(model.backbone))
    ffn_params = [p for layer in layers for p in _ffn_params(model, layer)] if "taylor" in want else []
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    saved_grads = [p.grad for p in ffn_params]
    for param in all_params:  # only the FFN weights collect gradients during the pass (taylor)
        param.requires_grad_(False)
    for param in ffn_params:
        param.requires_grad_(True)
        param.grad = None
    tap = ActivationTap(model)
    heads_tap = ActivationTap(model, "attention") if heads else None
    head_counts = model.spec.head_counts(model.backbone) if heads_tap else []
    widths = model.ffn_widths()
    zeros = lambda: [torch.zeros(w, dtype=torch.float64) for w in widths]  # noqa: E731
    sums = {name: zeros() for name in ("ag_mean", "ag_max", "abs_ag_mean", "act", "abs_act", "abs_grad") if name in want}
    head_ag = [torch.zeros(h, dtype=torch.float64) for h in head_counts]
    prompt_act: list[list[torch.Tensor]] = [[] for _ in widths]
    labels_seen, tokens, examples = [], 0, 0
    try:
        for ids, mask, labels in tqdm(batches, total=total, desc="attribution", disable=not progress,
                                      leave=False, unit="batch"):
            with torch.set_grad_enabled(bool(grad_stats)):
                logits = model(ids, mask)
                grads, head_grads, head_acts = [None] * len(tap.acts), [], []
                if grad_stats:
                    gold = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).sum()
                    # one backward pass for the FFN activations and the heads' context vectors together
                    head_acts = heads_tap.acts if heads_tap else []
                    all_grads = torch.autograd.grad(gold, tap.acts + head_acts, retain_graph="taylor" in want)
                    grads, head_grads = all_grads[: len(tap.acts)], all_grads[len(tap.acts):]
                    if "taylor" in want:
                        (-gold).backward()  # accumulates dL/dw of the FFN weights for the Taylor scorer
            full_mask = model.full_mask(mask)  # [B, P+T], prompt positions count as real
            weights = full_mask.unsqueeze(-1).double()
            prompt = model.prompt_length
            for index, (act, grad) in enumerate(zip(tap.acts, grads)):
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
                if "prompt_act" in want:
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
            raise ConfigError("attribution got no calibration examples")
        taylor = [_taylor(model, layer) for layer in layers] if "taylor" in want else None
    finally:
        tap.close()
        if heads_tap:
            heads_tap.close()
        for param, grad in zip(ffn_params, saved_grads):
            param.grad = grad
        for param, flag in zip(all_params, flags):
            param.requires_grad_(flag)
    gathered = tuple(n for n in needs if n != "head_ag_mean" or heads)
    return CalibrationStats(
        examples, tokens, taylor=taylor, labels=torch.cat(labels_seen), num_labels=model.num_labels,
        prompt_act=[torch.cat(chunks) for chunks in prompt_act] if "prompt_act" in want else None,
        head_ag_mean=head_ag if heads else None, gathered=gathered, **sums)


class Scorer:
    """Base of the plug-ins: ``needs`` names the statistics :func:`collect_stats` must gather for
    the FFN scores (empty: data-free), ``head_needs`` those for head scores."""

    name = "base"
    needs: tuple[str, ...] = ()
    head_needs: tuple[str, ...] = ()

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    def config(self) -> dict:
        return {"scorer": self.name}

    def importance(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        raise NotImplementedError

    def head_importance(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        """One value per attention head and layer (higher = keep); scorers that cannot score heads refuse."""
        raise ConfigError(f"scorer {self.name!r} scores FFN neurons only; attention heads can be scored by: "
                         f"{', '.join(HEAD_SCORERS)}")

    def score_heads(self, model, stats: CalibrationStats | None) -> list[torch.Tensor]:
        if model.spec.heads_module is None:
            raise ConfigError(f"attention heads of the {model.spec.family!r} family cannot be scored or removed; "
                             "use layer types 'ffn'")
        if self.head_needs:
            if stats is None:
                raise ConfigError(f"scorer {self.name!r} needs calibration statistics (collect_stats) to score heads")
            stats.require(self.head_needs, f"scorer {self.name!r} (heads)")
        return [t.float() for t in self.head_importance(model, stats)]

    def score(self, model, stats: CalibrationStats | None) -> Scores:
        if self.needs:
            if stats is None:
                raise ConfigError(f"scorer {self.name!r} needs calibration statistics (collect_stats)")
            stats.require(self.needs, f"scorer {self.name!r}")
        importance = [t.float() for t in self.importance(model, stats)]
        mean_act = (stats.mean_activation() if stats is not None and stats.act is not None
                    else [torch.zeros(w) for w in model.ffn_widths()])
        return Scores(importance, mean_act, stats.examples if stats is not None else 0, self.config())


class DoEScorer(Scorer):
    """Activation x gradient of the gold label's log-probability (the DoE paper's attribution)."""

    name = "doe"

    def __init__(self, token_agg: str = "mean", rank: str = "abs-of-mean"):
        if token_agg not in TOKEN_AGGS:
            raise ConfigError(f"token_agg must be one of {TOKEN_AGGS}, got {token_agg!r}")
        if rank not in ("abs-of-mean", "mean-abs"):
            raise ConfigError(f"rank must be 'abs-of-mean' or 'mean-abs', got {rank!r}")
        self.token_agg = token_agg
        self.rank = rank
        self.needs = ("abs_ag_mean",) if rank == "mean-abs" else ("ag_mean",) if token_agg == "mean" else ("ag_max",)
        self.head_needs = ("head_ag_mean",)

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
        raise ConfigError(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}")
    cls = SCORERS[name]
    accepted = {"doe": ("token_agg", "rank"), "random": ("seed",)}.get(name, ())
    return cls(**{key: value for key, value in options.items() if key in accepted})
