"""Caching wrappers around the stage API for the study and the benchmarks (``doe build`` caches
nothing): an adapted model and a calibration pass, stored under a key of the specs that decide
them, written atomically so a stopped run never leaves half a file."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from . import attribution, stages


def _save(state, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def cached_adapted(path: Path, loaded, data, spec: stages.AdaptSpec, tokenizer, splits: stages.Splits,
                   progress: bool = True):
    """The dense model adapted by ``spec`` (stages.new_model + stages.adapt), from ``path`` if stored.

    Prompt tuning stores only the soft prompt and the head (the backbone is the base model's)."""
    model = stages.new_model(loaded, data, spec)
    if path.is_file():
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state, strict=spec.mode == "finetune")
        return model.eval()
    stages.adapt(model, tokenizer, splits, data.metric, spec, progress, f"[{data.name}] adapt ({spec.mode})")
    state = model.state_dict() if spec.mode == "finetune" else {
        "prompt": model.prompt.detach(), "head.weight": model.head.weight.detach(), "head.bias": model.head.bias.detach()}
    _save(state, path)
    return model.eval()


def cached_stats(path: Path, model, tokenizer, train, spec: stages.PruneSpec,
                 progress: bool = True) -> attribution.CalibrationStats:
    """Every statistic of every scorer over ``spec.calib_examples`` examples, from ``path`` if stored."""
    if path.is_file():
        cached = attribution.CalibrationStats(**torch.load(path, weights_only=True))
        complete = set(attribution.STATS) <= set(cached.gathered)
        if complete and (cached.head_ag_mean is not None or model.spec.heads_module is None):
            return cached
    stats = stages.calibration_stats(model, tokenizer, train, spec, progress, needs=attribution.STATS)
    _save(asdict(stats), path)
    return stats
