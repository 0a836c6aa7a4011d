"""What a ``doe build`` of one task reports: the manifest of its bundle, its :class:`TaskResult` row,
and the summary table printed at the end of the build."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .bundle import file_entry, manifest_for
from .console import package_versions
from .specs import LayerTypes


@dataclass
class TaskResult:
    task: str
    metric: str
    test_split: str
    test_size: int
    dense: float
    pruned_no_recovery: float
    expert: float
    expert_onnx: float
    params_before: int
    params_after: int
    ffn_widths: list[int]
    head_counts: list[int]
    max_abs_diff: float
    bundle: str
    precisions: list[str] = field(default_factory=list)
    extra_positions: int = 0
    rate: float = 0.0
    bound_128: float = 1.0  # FLOP bound of the expert's widths and heads at 128 tokens
    seconds: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # precision -> why its variant was not written
    uncertainty: dict = field(default_factory=dict)  # uncertainty.Figures.to_json(): intervals against dense
    served_vs_dense: str = ""  # the CPU-served form against dense, with its interval and verdict (a table cell)
    dense_learned: bool = True  # the dense model beats the majority answer beyond its interval
    unused_train: int = 0  # training items neither the adaptation nor recovery trained on (--recovery-extra's)


@dataclass(frozen=True)
class BuiltTask:
    """Everything the manifest of one built task is made of (the build's stages, their results)."""

    config: Any  # pipeline.BuildConfig, with the rate the build used
    loaded: Any  # loading.LoadedModel
    data: Any  # tasks.TaskData
    splits: Any  # stages.Splits
    expert: Any  # stages.ExpertResult
    dense: float  # the dense model's metric on the reporting split
    adapt_record: dict
    exported: Any  # stages.Exported
    search: dict | None = None  # the accuracy-budget search, when the rate was searched
    figures: Any = None  # uncertainty.Figures: the intervals of every form against the dense model


def _quality(built: BuiltTask) -> dict:
    expert, exported, splits = built.expert, built.exported, built.splits
    quality = {
        "metric": splits.metric,
        "split": splits.test.name,
        "size": len(splits.test),
        "dense": built.dense,
        "pruned_before_recovery": expert.before.test,
        "expert": expert.after.test,
        "expert_onnx": exported.metric_onnx,
    }
    for precision, variant in exported.onnx.get("variants", {}).items():
        quality[f"expert_onnx_{precision}"] = variant["quality"]["value"]
    if exported.rejected:
        quality["variants_left_out"] = exported.rejected
    if built.figures is not None:
        quality.update(built.figures.to_json())
        quality["dense_learned"] = built.figures.learned
    return quality


def _architecture(model, report: dict) -> dict:
    backbone = model.backbone.config
    return {
        "family": model.spec.family,
        "num_layers": len(report["ffn_widths"]),
        "hidden_size": backbone.hidden_size,
        "ffn_widths": report["ffn_widths"],
        "ffn_widths_dense": report["ffn_widths_before"],
        "num_heads": report["head_counts"],
        "num_heads_dense": report["head_counts_before"],
        "head_dim": model.spec.head_dim(model.backbone),
        "pooling": model.pooling,
        "token_types_from_sep": model.sep_token_id is not None,
    }


def _pruning(built: BuiltTask) -> dict:
    spec, expert, report = built.config.prune, built.expert, built.expert.report
    types = [LayerTypes.FFN, LayerTypes.ATTENTION] if spec.layer_types is LayerTypes.BOTH else [spec.layer_types]
    return {
        "method": spec.scorer,
        "scorer": expert.attribution.scores.info,
        "rate": spec.rate,
        "head_rate": spec.heads_removed,
        "layer_types": [str(t) for t in types],
        "budget": str(spec.budget),
        "round_to": spec.round_to,  # None: aligned for tensor cores where the dense widths are (specs)
        "rounding": str(spec.rounding),
        "alignment": report.get("alignment", {}),
        "fold_bias": spec.fold_bias,
        "steps": spec.steps,  # gradual pruning: each step's rate, relative to the widths the step before left
        **({"step_rates": [s["rate"] for s in report["steps"]]} if "steps" in report else {}),
        "calibration_examples": expert.attribution.scores.examples,
        "seed": spec.seed,
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        **({"search": built.search} if built.search else {}),
    }


def build_manifest(built: BuiltTask, folder: Path) -> dict:
    """The manifest of the bundle in ``folder`` (its graph and tokenizer already written there)."""
    loaded, data, splits, model = built.loaded, built.data, built.splits, built.expert.model
    local = Path(loaded.path).is_dir() and loaded.name == loaded.path  # a --model folder: record its name only
    return manifest_for(
        task={"name": data.name, "input": data.input, "labels": data.labels, "metric": data.metric},
        base_model={
            "name": Path(loaded.name).name if local else loaded.name,
            "source": "local folder" if local else "hub or package",
            "sha256": loaded.weights_sha256,
            "model_type": model.backbone.config.model_type,
        },
        architecture=_architecture(model, built.expert.report),
        adaptation={
            "mode": str(built.config.adapt.mode),
            "prompt_length": model.prompt_length,
            "train": built.adapt_record,
            "recovery": built.expert.recovery,
        },
        pruning=_pruning(built),
        onnx=built.exported.onnx,
        tokenizer={
            **file_entry(folder, "tokenizer.json"),
            "max_length": built.config.data.max_length,
            "truncation": "longest_first",
            "padding": "longest in batch, right",
            "pad_id": int(loaded.hf_tokenizer.pad_token_id),
            "pad_token": str(loaded.hf_tokenizer.pad_token),
        },
        validation=built.exported.validation,
        quality=_quality(built),
        data={
            **data.describe(),
            "used": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
        },
        versions=package_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def summary_table(results: list[TaskResult]) -> str:
    header = (
        "task",
        "metric",
        "test n",
        "dense",
        "expert",
        "expert ORT",
        "served - dense, points (95% CI)",
        "no-recovery",
        "rate (bound@128)",
        "params (M)",
        "FFN widths",
        "heads",
        "precisions",
        "max|diff|",
        "seconds",
        "bundle",
    )
    rows = [header]
    for r in results:
        rows.append(
            (
                r.task,
                r.metric,
                str(r.test_size),
                f"{r.dense:.4f}",
                f"{r.expert:.4f}",
                f"{r.expert_onnx:.4f}",
                r.served_vs_dense or "—",
                f"{r.pruned_no_recovery:.4f}",
                f"{r.rate:g} (x{r.bound_128:.2f})",
                f"{r.params_before / 1e6:.2f} -> {r.params_after / 1e6:.2f}",
                ",".join(map(str, r.ffn_widths)),
                ",".join(map(str, r.head_counts)),
                ",".join(r.precisions),
                f"{r.max_abs_diff:.1e}",
                " ".join(f"{k}={v:.0f}" for k, v in r.seconds.items()),
                r.bundle,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def served_verdict(result: TaskResult) -> str | None:
    """The served form's verdict against the tolerance (met, not resolved, missed); None where the dense model
    is not shown to have learned the task."""
    forms = result.uncertainty.get("expert_minus_dense", {})
    within = forms.get("int8" if "int8" in result.precisions else "fp32", {}).get("within")
    return None if not result.dense_learned or within is None else within["verdict"]


def verdict_line(results: list[TaskResult], tolerance_points: float) -> str:
    """How many served experts hold the tolerance on test (the --max-loss budget, else 1 point), read from each
    build's paired interval: met (the interval rules out a larger loss), not resolved, missed, or no verdict
    where the dense model is not shown to have learned the task."""
    groups: dict[str, list[str]] = {"met": [], "not resolved": [], "missed": [], "no verdict (dense not learned)": []}
    for r in results:
        verdict = served_verdict(r)
        if verdict is None:
            groups["no verdict (dense not learned)"].append(r.task)
        else:
            groups[verdict].append(f"{r.task} p={r.rate:g}")
    return (
        f"Served expert within {tolerance_points:g} point(s) of the dense model on test (95% interval): "
        + "; ".join(f"{verdict} {len(tasks)} ({', '.join(tasks)})" for verdict, tasks in groups.items() if tasks)
    )


def rate_line(results: list[TaskResult], default_rate: float) -> str | None:
    """The tasks whose rate (the budget's choice, or the user's) is below ``default_rate``, with the FLOP bound
    each keeps at 128 tokens; None when every task pruned at least that much."""
    lower = [r for r in results if r.rate < default_rate]
    if not lower:
        return None
    return f"Pruned less than the default p={default_rate:g} to hold the budget or as asked: " + "; ".join(
        f"{r.task} p={r.rate:g}, FLOP bound x{r.bound_128:.2f} at 128 tokens" for r in lower
    )


def unused_line(results: list[TaskResult]) -> str | None:
    """The tasks not shown within the tolerance (missed or not resolved) whose training split has items the build
    did not train on, with the flag that trains recovery on them; None when there are none."""
    shown = [
        f"{r.task} {r.unused_train:,}" for r in results if served_verdict(r) not in (None, "met") and r.unused_train
    ]
    if not shown:
        return None
    return (
        f"Training items left unused where the tolerance is not shown: {', '.join(shown)}. --recovery-extra N "
        "trains recovery on N of them too (SST-2, 8,000: within 1 point of its dense model; docs/export.md)"
    )


def results_as_dicts(results: list[TaskResult]) -> list[dict]:
    return [asdict(r) for r in results]


__all__ = [
    "BuiltTask",
    "TaskResult",
    "build_manifest",
    "rate_line",
    "results_as_dicts",
    "served_verdict",
    "summary_table",
    "unused_line",
    "verdict_line",
]
