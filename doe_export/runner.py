"""What every run of one task shares in the study and the benchmarks: its data and tokenizer, the
dense model adapted by the flow (cached), calibration passes (cached), and experts made by the stage
API exactly as ``doe build`` makes them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from . import attribution, evaluate, stages
from .cache import adapted_path, cached_adapted, cached_stats, stats_path
from .loading import fast_tokenizer
from .specs import Flow, PruneSpec, RecoverySpec
from .tasks import Split, TaskData


def metrics_of(data: TaskData, labels: list[int], logits: np.ndarray) -> dict:
    """The task's metric, accuracy, and the mean log-probability of the gold label (continuous)."""
    preds = logits.argmax(1).tolist()
    values = {data.metric: evaluate.metric_value(data.metric, labels, preds)}
    values.setdefault("accuracy", evaluate.accuracy(labels, preds))
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    values["gold_logprob"] = float(logp[np.arange(len(labels)), labels].mean())
    return values


class TaskRunner:
    """Everything one task's runs share: data, tokenizer, adapted model (cached), statistics (cached)."""

    def __init__(
        self, flow: Flow, data: TaskData, loaded, cache: Path, *, progress: bool = True, data_dir: str | None = None
    ):
        self.flow, self.data, self.loaded, self.cache, self.progress = flow, data, loaded, Path(cache), progress
        self.data_dir = data_dir
        self._texts: dict[str, Split] = {}  # other tasks' texts for recovery (RecoverySpec.extra_from)
        self.tokenizer = fast_tokenizer(loaded.hf_tokenizer, flow.data.max_length)
        self.splits = stages.Splits.of(data, flow.data)
        self.train, self.dev, self.test = self.splits.train, self.splits.dev, self.splits.test
        self._stats: dict[str, attribution.CalibrationStats] = {}
        self.path = adapted_path(self.cache, flow.model, data.name, flow.data, flow.adapt)
        self.adapted = cached_adapted(
            self.path,
            loaded,
            data,
            flow.adapt,
            tokenizer=self.tokenizer,
            splits=self.splits,
            progress=progress,
            data_spec=flow.data,
            data_dir=data_dir,
        )

    def stats(self, examples: int, *, adapted: bool = True) -> attribution.CalibrationStats:
        """Every statistic of every scorer for ``examples`` calibration examples (one pass, cached)."""
        key = f"{examples}-{'adapted' if adapted else 'unadapted'}"
        if key not in self._stats:
            model = self.adapted if adapted else stages.new_model(self.loaded, self.data, self.flow.adapt).eval()
            spec = replace(self.flow.prune, calib_examples=examples)
            path = stats_path(self.path, examples, adapted_model=adapted)
            self._stats[key] = cached_stats(path, model, self.tokenizer, self.train, spec, progress=self.progress)
        return self._stats[key]

    def texts(self, task: str) -> Split:
        """``task``'s training texts as this task's recovery extra items (:func:`stages.texts_from`; loaded once)."""
        if task not in self._texts:
            self._texts[task] = stages.texts_from(task, self.data, self.flow.data.seed, self.data_dir)
        return self._texts[task]

    def metrics(self, model) -> dict:
        """:func:`metrics_of` the model on the reporting split."""
        return self.score(model).details

    def score(self, model) -> stages.Score:
        """The model on the reporting split: its metric, :func:`metrics_of`'s values, and its predictions."""
        logits = evaluate.torch_logits(model, self.tokenizer, self.test.inputs)
        values = metrics_of(self.data, self.test.labels, logits)
        preds = tuple(int(p) for p in logits.argmax(1))
        return stages.Score(self.data.metric, values[self.data.metric], details=values, test_preds=preds)

    def expert(
        self,
        prune_spec: PruneSpec,
        recovery_spec: RecoverySpec | None = None,
        *,
        stats: attribution.CalibrationStats | None = None,
        desc: str = "expert",
    ) -> stages.ExpertResult:
        """A pruned, recovered expert of the adapted model (the stage API, as ``doe build`` makes it)."""
        if stats is None and prune_spec.needs():
            stats = self.stats(prune_spec.calib_examples)
        recovery_spec = recovery_spec or self.flow.recovery
        splits = self.splits
        if recovery_spec.extra_from is not None:
            splits = replace(splits, spare=self.texts(recovery_spec.extra_from))
        return stages.make_expert(
            self.adapted,
            self.tokenizer,
            splits,
            prune_spec,
            recovery_spec,
            progress=self.progress,
            desc=f"[{self.data.name}] {desc}",
            stats=stats,
            score=self.score,
        )


__all__ = ["TaskRunner", "metrics_of"]
