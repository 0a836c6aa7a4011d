"""The whole flow for a list of tasks: adapt -> attribute -> prune -> recover -> export -> bundle.

One :class:`BuildConfig` (frozen) drives everything; :func:`build` runs each task in turn and
returns one :class:`TaskResult` per task with its metrics, sizes and per-stage wall times.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from doe_runtime.bundle import SCHEMA_VERSION, check_task_name
from doe_runtime.router import encode_batch

from . import adapt, attribution, evaluate, export, prune
from .archs import arch_for
from .loading import DEFAULT_MODEL, LoadedModel, fast_tokenizer, load_model
from .taskmodel import TaskModel
from .tasks import TaskData, UserTask, load_task

DEFAULT_TASKS = ("bbc-news", "snli")


@dataclass(frozen=True)
class BuildConfig:
    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = DEFAULT_TASKS
    data_dir: str | None = None
    cache_dir: str | None = None
    out_dir: str = "artifacts"
    adapt: str = "prompt"  # "prompt" | "finetune"
    prompt_length: int = 20
    pooling: str | None = None  # None: mean for encoders, last token for decoders
    epochs: int = 3
    recovery_epochs: int = 1
    lr: float | None = None
    batch_size: int = 16
    scorer: str = "doe"
    token_agg: str = "mean"
    rate: float = 0.65
    layer_types: str = "ffn"  # "ffn" | "attention" | "both"
    head_rate: float | None = None  # share of attention heads removed; None: same as rate
    budget: str = "per-layer"
    round_to: int = 1
    fold_bias: bool = False
    calib_examples: int = 256
    max_train: int | None = 1000
    max_dev: int | None = 200
    max_eval: int | None = 1000
    max_length: int = 128
    seed: int = 0
    tolerance: float = 1e-4
    fuse: bool = False  # onnxruntime fusions (fused attention etc.), validated like the plain graph
    fp16: bool = True  # also write an fp16 variant (for CUDA), validated against PyTorch fp32
    progress: bool = True

    def check(self) -> "BuildConfig":
        if not self.tasks:
            raise ValueError("no tasks given")
        for task in self.tasks:
            check_task_name(task)
        if self.adapt not in ("prompt", "finetune"):
            raise ValueError(f"adapt must be 'prompt' or 'finetune', got {self.adapt!r}")
        if self.adapt == "prompt" and self.prompt_length < 1:
            raise ValueError("prompt tuning needs --prompt-length >= 1")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        for name in ("max_train", "max_dev", "max_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.calib_examples < 1:
            raise ValueError(f"calib_examples must be >= 1, got {self.calib_examples}")
        prune.PruneConfig(self.rate, self.budget, self.round_to, self.fold_bias).check()
        if self.layer_types not in prune.LAYER_TYPES:
            raise ValueError(f"layer types must be one of {prune.LAYER_TYPES}, got {self.layer_types!r}")
        if self.head_rate is not None:
            prune.PruneConfig(self.head_rate).check()
        scorer = attribution.make_scorer(self.scorer, token_agg=self.token_agg, seed=self.seed)
        if self.layer_types != "ffn" and self.scorer not in attribution.HEAD_SCORERS:
            raise ValueError(f"scorer {self.scorer!r} cannot score attention heads (layer types {self.layer_types!r}); "
                             f"use one of {', '.join(attribution.HEAD_SCORERS)} or --layer-types ffn")
        del scorer
        return self


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
    seconds: dict[str, float] = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    names = ["doe-export", "doe-runtime", "torch", "transformers", "onnx", "onnxscript", "onnxruntime",
             "onnxruntime-gpu", "tokenizers", "numpy"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


class Timer:
    """Wall seconds per named stage; a stage entered twice adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_task(config: BuildConfig, loaded: LoadedModel, data: TaskData) -> None:
    """Refuse settings that cannot work for this task and model, before anything trains."""
    available = len(data.train.head(config.max_train))
    if config.calib_examples > available:
        raise ValueError(
            f"task {data.name!r}: --calib-examples {config.calib_examples} exceeds the {available} training "
            f"examples available ({data.train.name}); lower --calib-examples or raise --max-train"
        )
    if config.layer_types != "ffn" and arch_for(loaded.backbone.config).heads_module is None:
        raise ValueError(f"--layer-types {config.layer_types}: attention heads of model type "
                         f"{loaded.backbone.config.model_type!r} cannot be removed; use --layer-types ffn")
    max_positions = getattr(loaded.backbone.config, "max_position_embeddings", None)
    prompt_length = config.prompt_length if config.adapt == "prompt" else 0
    if max_positions and prompt_length + config.max_length > max_positions:
        raise ValueError(
            f"prompt length {prompt_length} + max length {config.max_length} exceeds the model's "
            f"{max_positions} positions; lower --max-length or --prompt-length"
        )


def build_task(config: BuildConfig, loaded: LoadedModel, data: TaskData, return_model: bool = False):
    """Build one task's bundle; return its TaskResult (and the pruned TaskModel if ``return_model``)."""
    timer = Timer()
    task = data.name
    check_task(config, loaded, data)
    tokenizer = fast_tokenizer(loaded.hf_tokenizer, config.max_length)
    train, dev, test = data.train.head(config.max_train), data.dev.head(config.max_dev), data.test.head(config.max_eval)
    prompt_length = config.prompt_length if config.adapt == "prompt" else 0
    log(f"[{task}] train {len(train)} / dev {len(dev)} / test {len(test)} ({test.name}); "
        f"labels {data.labels}; metric {data.metric}")
    model = TaskModel(
        copy.deepcopy(loaded.backbone),
        num_labels=len(data.labels),
        prompt_length=prompt_length,
        pooling=config.pooling,
        sep_token_id=loaded.hf_tokenizer.sep_token_id,
        seed=config.seed,
    )
    train_cfg = adapt.TrainConfig(config.adapt, config.epochs, config.lr, config.batch_size, config.seed)
    with timer.stage("adapt"):
        adapt_record = adapt.train(model, tokenizer, train, dev, data.metric, train_cfg, f"[{task}] {config.adapt}",
                                   config.progress)
    with timer.stage("evaluate"):
        dense = evaluate.evaluate_torch(model, tokenizer, test, data.metric)
    log(f"[{task}] dense {config.adapt}-adapted model: {data.metric} {dense:.4f} on {len(test)} test examples "
        f"({adapt_record['seconds']:.0f}s)")

    scorer = attribution.make_scorer(config.scorer, token_agg=config.token_agg, seed=config.seed)
    with timer.stage("attribute"):
        stats = None
        if scorer.needs_data or config.fold_bias:
            batches = attribution.calibration_batches(tokenizer, train, config.calib_examples, config.batch_size,
                                                      config.seed)
            total = (config.calib_examples + config.batch_size - 1) // config.batch_size
            stats = attribution.collect_stats(model, batches, total=total, progress=config.progress)
        scores = scorer.score(model, stats)
    prune_cfg = prune.PruneConfig(config.rate, config.budget, config.round_to, config.fold_bias)
    with timer.stage("prune"):
        heads = scorer.score_heads(model, stats) if config.layer_types != "ffn" else None
        report = prune.prune_model(model, config.layer_types, prune_cfg, scores.importance, heads, config.head_rate,
                                   scores.mean_activation)
    with timer.stage("evaluate"):
        pruned = evaluate.evaluate_torch(model, tokenizer, test, data.metric)
    rates = (f"FFN rate {config.rate:g}" if config.layer_types != "attention" else "") + (
        f"{', ' if config.layer_types == 'both' else ''}head rate "
        f"{config.rate if config.head_rate is None else config.head_rate:g}" if config.layer_types != "ffn" else "")
    log(f"[{task}] pruned {config.layer_types} ({rates}): params {report['params_before']:,} -> "
        f"{report['params_after']:,}; FFN widths {report['ffn_widths']}; heads {report['head_counts']}; "
        f"{data.metric} before recovery {pruned:.4f}")

    recover_cfg = adapt.TrainConfig(config.adapt, config.recovery_epochs, config.lr, config.batch_size,
                                    config.seed + 1)
    with timer.stage("recover"):
        recover_record = adapt.train(model, tokenizer, train, dev, data.metric, recover_cfg, f"[{task}] recovery",
                                     config.progress)
    with timer.stage("evaluate"):
        expert = evaluate.evaluate_torch(model, tokenizer, test, data.metric)
    log(f"[{task}] expert after {config.recovery_epochs} recovery epoch(s): {data.metric} {expert:.4f}")

    with timer.stage("export"):
        bundle, validation, expert_onnx = _write_expert_bundle(
            config, loaded, data, model, tokenizer, test, dense, pruned, expert, scores, report,
            adapt_record, recover_record, train, dev, timer,
        )
    log(f"[{task}] bundle {bundle}: ORT max|diff| {validation['max_abs_diff']:.2e} at shapes "
        f"{validation['shapes']}; ORT {data.metric} {expert_onnx:.4f}")
    result = TaskResult(task, data.metric, test.name, len(test), dense, pruned, expert, expert_onnx,
                        report["params_before"], report["params_after"], report["ffn_widths"],
                        report["head_counts"], validation["max_abs_diff"], str(bundle), dict(timer.seconds))
    return (result, model) if return_model else result


def _write_expert_bundle(config, loaded, data, model, tokenizer, test, dense, pruned, expert, scores, report,
                         adapt_record, recover_record, train, dev, timer):
    import onnxruntime as ort

    holder = {}

    def fill(folder: Path) -> dict:
        onnx_path = folder / "model.onnx"
        sample_ids, sample_mask = encode_batch(tokenizer, list(test.inputs[:2]))
        fusions = {}
        if config.fuse:
            raw = folder / "unfused.onnx"
            opset = export.export_onnx(model, raw, sample_ids, sample_mask)
            fusions = export.fuse_for_ort(raw, onnx_path)
            raw.unlink()
        else:
            opset = export.export_onnx(model, onnx_path, sample_ids, sample_mask)
        batches = export.validation_batches(tokenizer, test.inputs)
        validation = export.validate_onnx(model, onnx_path, batches, config.tolerance)
        variants = {}
        if config.fp16:
            export.to_fp16(onnx_path, folder / "model.fp16.onnx")
            fp16_check = export.validate_onnx(model, folder / "model.fp16.onnx", batches, export.FP16_TOLERANCE)
            variants["fp16"] = {**export.file_entry(folder, "model.fp16.onnx"), "precision": "fp16",
                                "io_types": "int64 inputs, float32 logits (as the fp32 graph)",
                                "validation": fp16_check}
        tokenizer.save(str(folder / "tokenizer.json"))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        logits = evaluate.onnx_logits(session, tokenizer, test.inputs)
        expert_onnx = evaluate.metric_value(data.metric, test.labels, logits.argmax(1).tolist())
        holder.update(validation=validation, expert_onnx=expert_onnx)
        return {
            "onnx": {**export.file_entry(folder, "model.onnx"), "opset": opset, "precision": "fp32",
                     "rewrites": {"ort_fusions": fusions} if config.fuse else {},
                     **export.io_spec(len(data.labels)), **({"variants": variants} if variants else {})},
            "tokenizer": {**export.file_entry(folder, "tokenizer.json"), "max_length": config.max_length,
                          "truncation": "longest_first", "padding": "longest in batch, right",
                          "pad_id": int(loaded.hf_tokenizer.pad_token_id),
                          "pad_token": str(loaded.hf_tokenizer.pad_token)},
            "validation": validation,
            "quality": {"metric": data.metric, "split": test.name, "size": len(test), "dense": dense,
                        "pruned_before_recovery": pruned, "expert": expert, "expert_onnx": expert_onnx},
        }

    backbone_cfg = model.backbone.config
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "task": {"name": data.name, "input": data.input, "labels": data.labels, "metric": data.metric},
        "base_model": {"name": loaded.name, "path": loaded.path, "sha256": loaded.weights_sha256,
                       "model_type": backbone_cfg.model_type},
        "architecture": {"family": model.spec.family, "num_layers": len(report["ffn_widths"]),
                         "hidden_size": backbone_cfg.hidden_size,
                         "ffn_widths": report["ffn_widths"], "ffn_widths_dense": report["ffn_widths_before"],
                         "num_heads": report["head_counts"], "num_heads_dense": report["head_counts_before"],
                         "head_dim": model.spec.head_dim(model.backbone),
                         "pooling": model.pooling, "token_types_from_sep": model.sep_token_id is not None},
        "adaptation": {"mode": config.adapt, "prompt_length": model.prompt_length, "train": adapt_record,
                       "recovery": recover_record},
        "pruning": {"method": config.scorer, "scorer": scores.info, "rate": config.rate,
                    "head_rate": (config.rate if config.head_rate is None else config.head_rate)
                    if config.layer_types != "ffn" else 0.0,
                    "layer_types": ["ffn", "attention"] if config.layer_types == "both" else [config.layer_types],
                    "budget": config.budget, "round_to": config.round_to, "fold_bias": config.fold_bias,
                    "calibration_examples": scores.examples, "seed": config.seed,
                    "params_before": report["params_before"], "params_after": report["params_after"]},
        "data": {**data.describe(), "used": {"train": len(train), "dev": len(dev), "test": len(test)}},
        "versions": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    bundle = export.write_bundle(Path(config.out_dir), data.name, fill, manifest)
    return bundle, holder["validation"], holder["expert_onnx"]


def build(config: BuildConfig, user_tasks: dict[str, UserTask] | None = None) -> list[TaskResult]:
    config.check()
    start = time.perf_counter()
    # Load (and validate) every task's data before any training starts: bad input fails fast.
    datasets = [load_task(task, config.seed, config.data_dir, config.cache_dir, user_tasks) for task in config.tasks]
    log(f"loading model {config.model}")
    loaded = load_model(config.model)
    for data in datasets:
        check_task(config, loaded, data)
    results = []
    for data in datasets:
        results.append(build_task(config, loaded, data))
    log(f"built {len(results)} expert(s) in {time.perf_counter() - start:.0f}s")
    return results


def summary_table(results: list[TaskResult]) -> str:
    header = ("task", "metric", "test n", "dense", "expert", "expert ORT", "no-recovery", "params (M)", "FFN widths",
              "heads", "max|diff|", "seconds", "bundle")
    rows = [header]
    for r in results:
        rows.append((
            r.task, r.metric, str(r.test_size), f"{r.dense:.4f}", f"{r.expert:.4f}", f"{r.expert_onnx:.4f}",
            f"{r.pruned_no_recovery:.4f}", f"{r.params_before / 1e6:.2f} -> {r.params_after / 1e6:.2f}",
            ",".join(map(str, r.ffn_widths)), ",".join(map(str, r.head_counts)), f"{r.max_abs_diff:.1e}",
            " ".join(f"{k}={v:.0f}" for k, v in r.seconds.items()), r.bundle,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_as_dicts(results: list[TaskResult]) -> list[dict]:
    return [asdict(r) for r in results]
