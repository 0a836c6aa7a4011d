"""The training loop shared by adaptation and recovery.

- ``params="prompt"``: only the soft prompt and the head train; the backbone is frozen and kept in
  eval mode (no dropout), as in the DoE paper's prompt tuning.
- ``params="all"``: every parameter trains (fine-tuning; full recovery).

With a ``teacher`` the loss is logit distillation plus cross-entropy (Hinton et al.)::

    loss = distill * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - distill) * CE(student, gold)

With ``hidden_distill`` > 0 each transformer layer's output is also pulled towards the teacher's
(the pruned widths are inside the layers, so the outputs keep the teacher's shape)::

    loss += hidden_distill * mean over layers l of  sum ||h_l - h_l^teacher||^2 / sum ||h_l^teacher||^2

over the real (unpadded) positions; the teacher runs beside the student on every batch (eval mode,
no gradients). The teacher's logits are computed once for the whole training split (they do not
change between epochs), or passed in by a caller that has them already (``teacher_logits``). After each
epoch the dev metric is measured and the best epoch's weights are kept.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from doe_runtime.tokenization import encode_batch

from .console import log
from .errors import ConfigError
from .evaluate import evaluate_torch, torch_logits
from .specs import DEFAULT_LR, TrainedParams, check_training
from .tasks import Split


@dataclass(frozen=True)
class TrainConfig:
    """One training loop's settings (built from an AdaptSpec or a RecoverySpec by the stage API)."""

    params: TrainedParams = TrainedParams.PROMPT  # what trains: the soft prompt + head, or every weight
    epochs: int = 2
    lr: float | None = None  # None: DEFAULT_LR[params]
    batch_size: int = 16
    seed: int = 0
    max_grad_norm: float = 1.0
    distill: float = 0.0  # weight of the distillation term (needs a teacher); 0: cross-entropy only
    temperature: float = 2.0
    hidden_distill: float = 0.0  # weight of hidden-state distillation (needs a teacher); 0: off

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", TrainedParams.parse(self.params, "trained parameters"))
        check_training(
            "training",
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            distill=self.distill,
            temperature=self.temperature,
            hidden_distill=self.hidden_distill,
        )

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.params]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, weight: float, temperature: float
) -> torch.Tensor:
    """``weight * T^2 * KL(teacher_T || student_T) + (1 - weight) * CE(student, labels)``."""
    hard = F.cross_entropy(student, labels)
    if weight == 0.0:
        return hard
    soft = (
        F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(teacher / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    return weight * soft + (1.0 - weight) * hard


def hidden_distillation_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of ``sum ||s - t||^2 / sum ||t||^2`` on the positions where ``mask`` ([B, T]) is 1."""
    if len(student) != len(teacher) or not student:
        raise ConfigError(
            f"hidden-state distillation pairs layer outputs one to one: the student gave {len(student)}, the teacher "
            f"{len(teacher)}; it needs models with the same (non-zero) number of layers"
        )
    weights = mask.unsqueeze(-1).to(student[0].dtype)  # [B, T, 1]
    losses = [
        (((s - t) ** 2) * weights).sum() / ((t**2) * weights).sum().clamp(min=1e-12) for s, t in zip(student, teacher)
    ]
    return torch.stack(losses).mean()


class LayerOutputs:
    """Forward hooks that keep the output hidden states ([B, T, H]) of each transformer layer of a
    TaskModel while ``active``; :meth:`close` removes them."""

    def __init__(self, model) -> None:
        self.active = False
        self.outputs: list[torch.Tensor] = []
        layers = model.spec.layer_list(model.backbone)
        self._handles = [layer.register_forward_hook(self._keep) for layer in layers]

    def _keep(self, module, args, output) -> None:
        if self.active:
            self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        taken, self.outputs = self.outputs, []
        return taken

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def train(
    model,
    tokenizer,
    train_split: Split,
    dev_split: Split | None,
    *,
    metric: str,
    config: TrainConfig,
    desc: str = "train",
    progress: bool = True,
    teacher=None,
    teacher_logits: np.ndarray | None = None,
) -> dict:
    """Train in place; return a record (losses, dev metric per epoch, best epoch, seconds).

    ``teacher_logits``: the teacher's logits on ``train_split``'s inputs, row for row ([N, labels]), for a
    caller that computed them already; without them the teacher runs over the split once here."""
    if config.distill > 0 and teacher is None:
        raise ConfigError(f"{desc}: distillation weight {config.distill} needs a teacher model")
    if teacher_logits is not None and teacher_logits.shape != (len(train_split), model.num_labels):
        raise ConfigError(
            f"{desc}: the teacher's logits given for {train_split.name!r} must have one row per training "
            f"example and one column per label, {(len(train_split), model.num_labels)}; got "
            f"{tuple(teacher_logits.shape)}: compute them on the split's inputs in order"
        )
    if config.hidden_distill > 0 and teacher is None:
        raise ConfigError(f"{desc}: hidden-state distillation weight {config.hidden_distill} needs a teacher model")
    start = time.perf_counter()
    record: dict[str, Any] = {
        "params": str(config.params),
        "epochs": config.epochs,
        "lr": config.learning_rate(),
        "batch_size": config.batch_size,
        "examples": len(train_split),
        "seed": config.seed,
        "distill": config.distill if teacher is not None else 0.0,
        "temperature": config.temperature,
        "hidden_distill": config.hidden_distill if teacher is not None else 0.0,
        "epoch_loss": [],
        "dev_metric": [],
    }
    if config.epochs == 0 or len(train_split) == 0:
        record["seconds"] = 0.0
        return record
    set_seed(config.seed)
    distilled = None
    if teacher is not None and config.distill > 0:
        if teacher_logits is None:
            teacher_logits = torch_logits(teacher, tokenizer, train_split.inputs)  # [N, K], once
        distilled = torch.from_numpy(np.ascontiguousarray(teacher_logits, dtype=np.float32))
    loop = _Loop(model, tokenizer, train_split, config, distilled, teacher=teacher)
    try:
        best = _epochs(loop, dev_split, metric, record, desc=desc, progress=progress)
    finally:
        loop.close()
    if best[1] is not None and best[2] != config.epochs - 1:
        _restore(model, best[1])
    record["best_epoch"] = best[2] + 1 if best[1] is not None else config.epochs
    record["seconds"] = round(time.perf_counter() - start, 2)
    _freeze(model)
    return record


def _epochs(loop: _Loop, dev_split: Split | None, metric: str, record: dict, *, desc: str, progress: bool) -> tuple:
    """The epochs of :func:`train`: (best dev value, its trained weights, its epoch index)."""
    model, config = loop.model, loop.config
    rng = random.Random(config.seed)
    best: tuple[float, dict | None, int] = (float("-inf"), None, -1)
    order = list(range(len(loop.split)))
    for epoch in range(config.epochs):
        rng.shuffle(order)
        epoch_start = time.perf_counter()
        if not progress:
            log(f"{desc}: epoch {epoch + 1}/{config.epochs} ({loop.steps} batches of {config.batch_size})")
        record["epoch_loss"].append(loop.epoch(order, f"{desc} epoch {epoch + 1}/{config.epochs}", progress))
        if dev_split is not None and len(dev_split):
            value = evaluate_torch(model, loop.tokenizer, dev_split, metric)
            record["dev_metric"].append(value)
            if value > best[0]:
                trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
                best = (value, trained, epoch)
        if not progress:
            spent = time.perf_counter() - epoch_start
            dev = f", dev {metric} {record['dev_metric'][-1]:.4f}" if record["dev_metric"] else ""
            log(
                f"{desc}: epoch {epoch + 1}/{config.epochs} done in {spent:.0f}s (loss {record['epoch_loss'][-1]:.3f}"
                f"{dev}); about {spent * (config.epochs - epoch - 1):.0f}s left"
            )
    return best


class _Loop:
    """The optimizer, schedule and one epoch of steps of :func:`train`."""

    def __init__(self, model, tokenizer, split: Split, config: TrainConfig, teacher_logits, *, teacher=None):
        self.model, self.tokenizer, self.split, self.config = model, tokenizer, split, config
        self.teacher_logits = teacher_logits
        # the teacher stays in eval mode throughout (nothing here trains it): set once, not on every batch
        self.teacher = teacher.eval() if teacher is not None and config.hidden_distill > 0 else None
        self.hidden = (LayerOutputs(model), LayerOutputs(teacher)) if self.teacher is not None else None
        prompt_only = config.params is TrainedParams.PROMPT
        self.params = model.trainable("prompt" if prompt_only else "finetune")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate(), weight_decay=0.0 if prompt_only else 0.01
        )
        self.steps = (len(split) + config.batch_size - 1) // config.batch_size
        total = self.steps * config.epochs
        warmup = max(1, total // 10)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
        )

    def epoch(self, order: list[int], desc: str, progress: bool) -> float:
        """One pass over the training split in ``order``; returns the mean loss."""
        config, model = self.config, self.model
        model.train()
        if config.params is TrainedParams.PROMPT:
            model.backbone.eval()  # frozen backbone: no dropout, as in prompt tuning
        losses = []
        bar = tqdm(range(self.steps), desc=desc, disable=not progress, leave=False, unit="batch")
        for step in bar:
            chunk = order[step * config.batch_size : (step + 1) * config.batch_size]
            ids, mask = encode_batch(self.tokenizer, [self.split.inputs[i] for i in chunk])
            labels = torch.tensor([self.split.labels[i] for i in chunk])
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            logits = self._forward(ids_t, mask_t)
            if self.teacher_logits is not None:
                loss = distillation_loss(logits, self.teacher_logits[chunk], labels, config.distill, config.temperature)
            else:
                loss = F.cross_entropy(logits, labels)
            if self.hidden is not None:
                loss = loss + config.hidden_distill * self._hidden_loss(ids_t, mask_t)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.schedule.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        return sum(losses) / len(losses)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The student's logits (its layer outputs kept for the hidden-state term)."""
        if self.hidden is None:
            return self.model(ids, mask)
        self.hidden[0].active = True
        try:
            return self.model(ids, mask)
        finally:
            self.hidden[0].active = False

    def _hidden_loss(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        student, teacher = self.hidden  # type: ignore[misc]
        teacher.active = True
        try:
            with torch.no_grad():
                self.teacher(ids, mask)  # type: ignore[misc]
        finally:
            teacher.active = False
        return hidden_distillation_loss(student.take(), teacher.take(), self.model.full_mask(mask))

    def close(self) -> None:
        """Remove the hidden-state hooks (the trained model is exported afterwards)."""
        for outputs in self.hidden or ():
            outputs.close()


def _restore(model, weights: dict) -> None:
    """Put the kept epoch's trained weights back."""
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, value in weights.items():
            named[name].copy_(value)


def _freeze(model) -> None:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def examples_per_second(model, tokenizer, split: Split, config: TrainConfig, batches: int = 4) -> float:
    """Training throughput measured on a few batches of ``split`` (weights restored afterwards)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = model.trainable("prompt" if config.params is TrainedParams.PROMPT else "finetune")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate())
    model.train()
    rng = np.random.default_rng(config.seed)
    seen, start = 0, time.perf_counter()
    for index in range(batches + 1):  # the first batch warms up and is not timed
        if index == 1:
            start = time.perf_counter()
        chunk = rng.choice(len(split), size=min(config.batch_size, len(split)), replace=False)
        ids, mask = encode_batch(tokenizer, [split.inputs[i] for i in chunk])
        loss = F.cross_entropy(
            model(torch.from_numpy(ids), torch.from_numpy(mask)), torch.tensor([split.labels[i] for i in chunk])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index >= 1:
            seen += len(chunk)
    rate = seen / (time.perf_counter() - start)
    model.load_state_dict(state)
    _freeze(model)
    return rate


__all__ = [
    "LayerOutputs",
    "TrainConfig",
    "distillation_loss",
    "examples_per_second",
    "hidden_distillation_loss",
    "set_seed",
    "train",
]
