"""Caching wrappers around the stage API for the study and the benchmarks (``doe build`` caches
nothing): an adapted model and a calibration pass, stored under one key scheme — a hash of the
specs that decide them (:func:`~doe_export.records.spec_key`) — and written atomically so a stopped
run never leaves half a file."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from . import attribution, stages
from .records import spec_key
from .specs import AdaptMode, AdaptSpec, DataSpec, PruneSpec


def adapted_path(cache: Path, model: str, task: str, data: DataSpec, adapt: AdaptSpec) -> Path:
    """Where the dense model of ``task`` adapted by ``adapt`` on ``data`` is kept."""
    return Path(cache) / f"{task}-dense-{spec_key(data, adapt, extra=[model, task])}.pt"


def stats_path(adapted: Path, examples: int, *, adapted_model: bool = True) -> Path:
    """Where a calibration pass of ``examples`` examples over that model (or the un-adapted one) is kept."""
    kind = "adapted" if adapted_model else "unadapted"
    return adapted.with_name(adapted.stem.replace("-dense-", f"-stats-{examples}-{kind}-") + ".pt")


def _save(state, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def cached_adapted(
    path: Path,
    loaded,
    data,
    spec: AdaptSpec,
    *,
    tokenizer,
    splits: stages.Splits,
    data_spec: DataSpec,
    progress: bool = True,
    data_dir: str | Path | None = None,
):
    """The dense model adapted by ``spec`` (stages.new_model, stages.intermediate where ``spec`` asks for it
    — on ``data_spec``'s caps, its task read from ``data_dir`` — then stages.adapt), from ``path`` if stored.

    Prompt tuning stores only the soft prompt and the head (the backbone is the base model's)."""
    model = stages.new_model(loaded, data, spec)
    if path.is_file():
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state, strict=spec.mode is AdaptMode.FINETUNE)
        return model.eval()
    if spec.intermediate is not None:
        stages.intermediate(
            model,
            loaded,
            tokenizer,
            spec,
            data_spec,
            data_dir=None if data_dir is None else str(data_dir),
            progress=progress,
            desc=f"[{data.name}] intermediate {spec.intermediate}",
        )
    stages.adapt(model, tokenizer, splits, spec, progress=progress, desc=f"[{data.name}] adapt ({spec.mode})")
    if spec.mode is AdaptMode.FINETUNE:
        state = model.state_dict()
    else:
        state = {
            "prompt": model.prompt.detach(),
            "head.weight": model.head.weight.detach(),
            "head.bias": model.head.bias.detach(),
        }
    _save(state, path)
    return model.eval()


def cached_stats(
    path: Path, model, tokenizer, train, spec: PruneSpec, *, progress: bool = True
) -> attribution.CalibrationStats:
    """Every statistic of every scorer over ``spec.calib_examples`` examples, from ``path`` if stored."""
    if path.is_file():
        cached = attribution.CalibrationStats(**torch.load(path, weights_only=True))
        complete = set(attribution.STATS) <= set(cached.gathered)
        if complete and (cached.head_ag_mean is not None or model.spec.heads_module is None):
            return cached
    stats = stages.calibration_stats(model, tokenizer, train, spec, progress=progress, needs=attribution.STATS)
    assert stats is not None  # every statistic was asked for
    _save(asdict(stats), path)
    return stats


__all__ = ["adapted_path", "cached_adapted", "cached_stats", "stats_path"]
