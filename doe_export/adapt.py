"""Adaptation of a TaskModel to a task: prompt tuning (paper default) or full fine-tuning.

- ``prompt``: only the soft prompt and the head train; the backbone is frozen and kept in eval
  mode (no dropout), as in the DoE paper.
- ``finetune``: every parameter trains.

The same loop does the *recovery* step after pruning (a shorter run of the same mode).
After each epoch the dev metric is measured and the best epoch's trainable weights are kept.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from doe_runtime.router import encode_batch

from .evaluate import evaluate_torch
from .tasks import Split

DEFAULT_LR = {"prompt": 1e-2, "finetune": 8e-5}


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "prompt"  # "prompt" | "finetune"
    epochs: int = 2
    lr: float | None = None  # None: DEFAULT_LR[mode]
    batch_size: int = 16
    seed: int = 0
    max_grad_norm: float = 1.0

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(
    model,
    tokenizer,
    train_split: Split,
    dev_split: Split | None,
    metric: str,
    config: TrainConfig,
    desc: str = "train",
    progress: bool = True,
) -> dict:
    """Train in place; return a record (losses, dev metric per epoch, best epoch, seconds)."""
    if config.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {config.epochs}")
    start = time.perf_counter()
    record = {"mode": config.mode, "epochs": config.epochs, "lr": config.learning_rate(),
              "batch_size": config.batch_size, "examples": len(train_split), "seed": config.seed,
              "epoch_loss": [], "dev_metric": []}
    if config.epochs == 0 or len(train_split) == 0:
        record["seconds"] = 0.0
        return record
    set_seed(config.seed)
    params = model.trainable(config.mode)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=0.0 if config.mode == "prompt" else 0.01)
    steps_per_epoch = (len(train_split) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    loss_fn = nn.CrossEntropyLoss()
    rng = random.Random(config.seed)
    best = (float("-inf"), None, -1)
    order = list(range(len(train_split)))
    for epoch in range(config.epochs):
        model.train()
        if config.mode == "prompt":
            model.backbone.eval()  # frozen backbone: no dropout, as in prompt tuning
        rng.shuffle(order)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False, unit="batch")
        for step in bar:
            chunk = order[step * config.batch_size : (step + 1) * config.batch_size]
            ids, mask = encode_batch(tokenizer, [train_split.inputs[i] for i in chunk])
            labels = torch.tensor([train_split.labels[i] for i in chunk])
            logits = model(torch.from_numpy(ids), torch.from_numpy(mask))
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        record["epoch_loss"].append(sum(losses) / len(losses))
        if dev_split is not None and len(dev_split):
            value = evaluate_torch(model, tokenizer, dev_split, metric)
            record["dev_metric"].append(value)
            if value > best[0]:
                best = (value, {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}, epoch)
    if best[1] is not None and best[2] != config.epochs - 1:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in best[1].items():
                named[name].copy_(value)
    record["best_epoch"] = best[2] + 1 if best[1] is not None else config.epochs
    record["seconds"] = round(time.perf_counter() - start, 2)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return record
