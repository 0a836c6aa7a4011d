"""The bundle's variants: ``model.int8.onnx`` for CPU and ``model.fp16.onnx`` for CUDA.

Each is checked on the task's test split against the PyTorch expert — label agreement and metric
within the ExportSpec's limits — else it is not written and the build says why. int8 tries its
recipes in order (each keeps more in fp32: slower, closer to fp32); the int8 variant's latency
against fp32 is measured on the build machine and recorded, so the runtime serves it only where it
was faster.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from doe_runtime.tokenization import encode_batch

from .bundle import file_entry, initializer_table
from .console import log
from .errors import ExportValidationError
from .onnx_export import cpu_session, export_validated, quieted, validate_onnx

__all__ = [
    "INT8_RECIPES",
    "calibration_feeds",
    "quantize_int8",
    "quantize_int8_static",
    "split_check",
    "time_graphs",
    "to_fp16",
    "write_variants",
]


def to_fp16(src: Path, dst: Path) -> None:
    """An fp16 copy of ``src`` whose inputs and outputs keep their types (int64 ids, float32 logits)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


# tried in order, the first that passes is kept: fastest first. Measured on the SST-2 expert of the default
# build (872 test items): per-channel 9 labels differ from fp32 (98.97 %), first layer in fp32 6 (99.31 %),
# FFN in fp32 4 (99.54 %) — and on SNLI (1,000 items) 26 / 22 (down-projections fp32).
INT8_RECIPES = ("per-channel", "per-channel, first layer fp32", "per-channel, FFN down-projections fp32")


def _matmuls(path: Path, weights_only: bool = False) -> list[str]:
    """Names of the MatMul/Gemm nodes; ``weights_only``: those that multiply by an initializer."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer} if weights_only else set()
    return [
        node.name
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and (not weights_only or any(name in weights for name in node.input))
    ]


def ffn_down_nodes(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes of the FFN down-projections (TorchScript naming of BERT-like
    models: ``.../output/dense/MatMul``, not the attention's output)."""
    return [name for name in _matmuls(path) if "output/dense" in name and "attention" not in name]


def first_layer_nodes(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes of the first transformer layer (``.../layer.0/...``, ``layers.0``)."""
    import re

    return [name for name in _matmuls(path) if re.search(r"(^|/)layers?\.0/", name)]


def recipe_exclusions(recipe: str, path: Path) -> list[str] | None:
    """The nodes an int8 recipe keeps in fp32 (None: the recipe does not apply to this graph)."""
    if "FFN down" in recipe:
        return ffn_down_nodes(path) or None
    if "first layer" in recipe:
        return first_layer_nodes(path) or None
    return []


def quantize_int8(src: Path, dst: Path, per_channel: bool = False, exclude: list[str] | None = None) -> None:
    """One ``quantize_dynamic`` call: int8 weights, activations quantized at run time per batch.

    ``per_channel=False`` is the call a user makes on a plain export (the benchmarks' baseline);
    the bundles' variant uses ``per_channel=True``: one scale per output column of each weight.
    Measured on the SNLI expert of the default build (1,000 test pairs), per-tensor int8 agreed with
    fp32 on 92.0 % of the labels and per-channel on 97.0 %, at the same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quieted():  # onnxruntime.quantization: "Please consider to run pre-processing" on every call
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            nodes_to_exclude=list(exclude or []),
        )


def calibration_feeds(tokenizer, inputs: list, batches: int, size: int = 8) -> list[dict]:
    """Up to ``batches`` feeds of ``size`` items, all padded to one length (the calibrators stack each
    tensor's values across batches, so every batch must have the same shape)."""
    encoded = [
        encode_batch(tokenizer, inputs[start : start + size])
        for start in range(0, min(len(inputs), size * batches), size)
    ]
    if not encoded:
        return []
    longest = max(ids.shape[1] for ids, _ in encoded)
    pad_id = (tokenizer.padding or {}).get("pad_id", 0)
    feeds = []
    for ids, mask in encoded:
        extra = longest - ids.shape[1]
        feeds.append(
            {
                "input_ids": np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id),
                "attention_mask": np.pad(mask, ((0, 0), (0, extra)), constant_values=0),
            }
        )
    return feeds


def quantize_int8_static(src: Path, dst: Path, feeds: list[dict], percentile: float = 99.999) -> None:
    """Static QDQ int8: weights per channel, activation scales fixed once from ``feeds`` (calibration
    batches of the task's training texts; histogram percentile, so one outlier does not set the scale).
    Only the weight MatMuls (projections, FFN, head; not attention's activation x activation products)
    are quantized. Measured against ``quantize_int8`` by the replace suite: on this
    project's CPU (AVX2, no VNNI) the QDQ graph of the bbc-news expert was slower than the dynamic one
    (8 x 128: 70.0 vs 59.6 ms; 8 x 32: 14.9 vs 12.5 ms) with the same labels on 300 test texts, so bundles
    ship the dynamic variant."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not feeds:
        raise ExportValidationError(f"static int8 of {src}: no calibration batches (expected at least one)")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    with quieted():
        # op types named: otherwise the calibrator also collects constant-valued tensors (mask arithmetic),
        # on which the histogram fails ("Too many bins for data range")
        quantize_static(
            str(src),
            str(dst),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=_matmuls(src, weights_only=True),
            op_types_to_quantize=["MatMul", "Gemm"],
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": percentile, "WeightSymmetric": True, "ActivationSymmetric": False},
        )


def split_check(
    path: Path,
    tokenizer,
    test,
    *,
    metric: str,
    expected: np.ndarray,
    spec,
    reference: float,
    limit: int | None = None,
    disabled_optimizers=(),
) -> dict:
    """A variant on the test split against the PyTorch expert: label agreement and metric."""
    from . import evaluate

    count = len(test) if limit is None else min(limit, len(test))
    logits = evaluate.onnx_file_logits(path, tokenizer, test.inputs[:count], disabled_optimizers=disabled_optimizers)
    preds = logits.argmax(1)
    agreement = float((preds == expected[:count].argmax(1)).mean())
    value = evaluate.metric_value(metric, test.labels[:count], preds.tolist())
    ref = (
        reference
        if count == len(test)
        else evaluate.metric_value(metric, test.labels[:count], expected[:count].argmax(1).tolist())
    )
    problems = []
    if agreement < spec.variant_min_agreement:
        problems.append(
            f"labels agree with the PyTorch expert on {agreement:.2%} of {count} test items "
            f"(needs >= {spec.variant_min_agreement:.0%})"
        )
    if value < ref - spec.variant_max_metric_drop:
        problems.append(
            f"{metric} {value:.4f} vs the PyTorch expert's {ref:.4f} on {count} test items "
            f"(allowed drop {spec.variant_max_metric_drop:g})"
        )
    return {
        "split": test.name,
        "size": count,
        "label_agreement": agreement,
        "metric": metric,
        "value": value,
        "pytorch_value": ref,
        "problems": problems,
        "_preds": preds.tolist(),  # the build's intervals against the dense model (not written to the manifest)
    }


def time_graphs(
    paths: dict[str, Path],
    *,
    shapes=((8, 32), (8, 128)),
    repeats: int = 7,
    vocab_low: int = 1000,
    vocab_high: int = 20000,
    disabled_optimizers=(),
) -> dict:
    """Median latency of each graph per batch x tokens shape, 1 thread, interleaved on the same inputs."""
    sessions = {name: cpu_session(path, disabled_optimizers, threads=1) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    out = {}
    for batch, tokens in shapes:
        ids = rng.integers(vocab_low, vocab_high, size=(batch, tokens)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, feeds)
        for repeat in range(repeats):
            names = list(sessions)
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                start = time.perf_counter()
                sessions[name].run(None, feeds)
                times[name].append(time.perf_counter() - start)
        out[f"{batch}x{tokens}"] = {name: statistics.median(t) for name, t in times.items()}
    return out


@dataclass
class _Checks:
    """What every variant is checked against: the PyTorch expert's logits on the test split and its metric."""

    model: Any
    tokenizer: Any
    test: Any
    metric: str
    expected: np.ndarray
    batches: list
    spec: Any  # ExportSpec
    sample: tuple  # the batch the exporter traces with

    def __post_init__(self) -> None:
        from . import evaluate

        self.disabled = list(self.spec.disabled_optimizers)
        self.reference = evaluate.metric_value(self.metric, self.test.labels, self.expected.argmax(1).tolist())

    def on_split(self, path: Path, limit: int | None = None) -> dict:
        return split_check(
            path,
            self.tokenizer,
            self.test,
            metric=self.metric,
            expected=self.expected,
            spec=self.spec,
            reference=self.reference,
            limit=limit,
            disabled_optimizers=self.disabled,
        )


FUSED_FP16 = "dynamo export, onnxruntime fusions (fused attention), fp16"
PLAIN_FP16 = "the fp32 graph's form, fp16"
FUSED_OPS = ("Attention", "MultiHeadAttention")  # com.microsoft fused attention, one per layer expected


def fp16_recipes(spec) -> tuple[str, ...]:
    """The fp16 variant's recipes in order: the fused form first (the fastest on CUDA), the fp32 graph's form
    as the fallback where the fused one cannot be made or fails its checks."""
    return (FUSED_FP16, PLAIN_FP16) if str(spec.fp16_form) == "fused" else (PLAIN_FP16,)


def _fused_fp32(checks: _Checks, path: Path) -> dict:
    """``path``: the expert exported by dynamo (the model's own attention) and rewritten with onnxruntime's
    fusions, validated in fp32 against PyTorch; raises unless every layer's attention was fused. Its form."""
    import onnx

    _, validation, fusions = export_validated(
        checks.model,
        path,
        checks.sample,
        checks.batches,
        exporter="dynamo",
        fuse=True,
        tolerance=checks.spec.tolerance,
        disabled_optimizers=checks.disabled,
        attention="native",
    )
    graph = onnx.load(str(path), load_external_data=False).graph
    fused = sum(node.domain == "com.microsoft" and node.op_type in FUSED_OPS for node in graph.node)
    layers = len(checks.model.ffn_widths())
    if fused < layers:
        raise ExportValidationError(f"fused attention in {fused} of {layers} layers (fusions: {fusions})")
    return {
        "exporter": "dynamo",
        "attention": "native",
        "fusions": fusions,
        "fused_attention_layers": fused,
        "layers": layers,
        "fp32_max_abs_diff": validation["max_abs_diff"],
    }


def _fp16_attempt(recipe: str, fp32: Path, path: Path, checks: _Checks) -> tuple[dict, Any, dict]:
    """The fp16 variant by ``recipe``; checked at the validation shapes and on 300 test items (fp16 runs slowly
    on a CPU; the fused fp16 kernels of CUDA are measured and compared by `doe bench --suite gpu`)."""
    import onnxruntime as ort

    form = {"exporter": str(checks.spec.exporter), "fusions": "as the fp32 graph"}
    if recipe == FUSED_FP16:
        source = path.with_name(".fused-fp32." + path.name)
        try:
            form = _fused_fp32(checks, source)
            to_fp16(source, path)
        finally:
            source.unlink(missing_ok=True)
    else:
        to_fp16(fp32, path)
    shapes = validate_onnx(checks.model, path, checks.batches, checks.spec.fp16_tolerance, checks.disabled)
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    form["validated_on"] = "CPUExecutionProvider" + (" (CUDA present: see the gpu suite)" if cuda else "")
    return checks.on_split(path, limit=300), shapes, form


def _attempt(precision: str, recipe: str, fp32: Path, path: Path, checks: _Checks) -> tuple[dict, Any, dict] | None:
    """Write one recipe of a variant to ``path`` and check it: (split check, validation shapes, graph form), or
    None when the recipe does not apply to this graph (it would be the first recipe again)."""
    try:
        if precision == "fp16":
            return _fp16_attempt(recipe, fp32, path, checks)
        exclude = recipe_exclusions(recipe, fp32)
        if exclude is None:
            return None
        quantize_int8(fp32, path, per_channel=True, exclude=exclude)
        return checks.on_split(path), None, {}
    except (ExportValidationError, RuntimeError, ValueError) as exc:  # an export or rewrite that failed: next recipe
        return {"problems": [f"{type(exc).__name__}: {str(exc)[:500]}"]}, None, {}


def _entry(precision: str, recipe: str, folder: Path, outcome: tuple, *, checks: _Checks, reasons: list[str]) -> dict:
    name = f"model.{precision}.onnx"
    check, shapes, form = outcome
    return {
        **file_entry(folder, name),
        "initializers": initializer_table(folder / name),
        "precision": precision,
        "recipe": recipe,
        "io_types": "int64 inputs, float32 logits (as the fp32 graph)",
        **({"form": form} if form else {}),
        "validation": {
            "test_split": {k: v for k, v in check.items() if k not in ("problems", "_preds")},
            **({"shapes": shapes} if shapes else {}),
            **({"recipes_failed": reasons} if reasons else {}),
        },
        "quality": {"metric": checks.metric, "value": check["value"], "split_size": check["size"]},
        "speed": {},
        "_preds": check["_preds"],  # popped by stages.export before the manifest is written
    }


def _variant(precision: str, folder: Path, fp32: Path, checks: _Checks) -> tuple[dict | None, str]:
    """The first recipe of ``precision`` that passes its checks, as its manifest entry (or None and why not).
    int8 tries its recipes in order, each keeping more in fp32 (slower, closer to fp32); fp16 the fused form,
    then the fp32 graph's."""
    path = folder / f"model.{precision}.onnx"
    reasons: list[str] = []
    for recipe in INT8_RECIPES if precision == "int8" else fp16_recipes(checks.spec):
        outcome = _attempt(precision, recipe, fp32, path, checks)
        if outcome is None:
            continue
        if not outcome[0]["problems"]:
            if reasons:
                log(f"variant {precision}: {recipe} (earlier recipes failed: {' | '.join(reasons)})")
            return _entry(precision, recipe, folder, outcome, checks=checks, reasons=reasons), ""
        reasons.append(f"{recipe}: {'; '.join(outcome[0]['problems'])}")
        path.unlink(missing_ok=True)
    return None, " | ".join(reasons) or "no applicable recipe"


def _speed(fp32: Path, int8: Path, disabled: list[str]) -> dict:
    """The int8 variant's latency against fp32 on the build machine (1 thread), per shape."""
    timed = time_graphs({"fp32": fp32, "int8": int8}, disabled_optimizers=disabled)
    return {
        "device": "cpu",
        "threads": 1,
        "measured_on": "the build machine",
        "latency_ms": {shape: {k: round(1e3 * v, 3) for k, v in cell.items()} for shape, cell in timed.items()},
        "vs_fp32": {shape: round(cell["fp32"] / cell["int8"], 3) for shape, cell in timed.items()},
    }


def write_variants(
    model, folder: Path, fp32: Path, tokenizer, test, *, metric: str, expected: np.ndarray, batches, spec, sample
) -> tuple[dict, dict]:
    """Write the variants the spec asks for; keep those that pass; return (manifest entries, rejections)."""
    checks = _Checks(model, tokenizer, test, metric, expected, batches, spec, sample)
    variants, rejected = {}, {}
    for precision in [p for p, on in (("int8", spec.int8), ("fp16", spec.fp16)) if on]:
        entry, why = _variant(precision, folder, fp32, checks)
        if entry is None:
            rejected[precision] = why
            log(f"variant {precision} not written: {why}")
        else:
            variants[precision] = entry
    if spec.measure_speed and "int8" in variants:
        variants["int8"]["speed"] = _speed(fp32, folder / "model.int8.onnx", checks.disabled)
    return variants, rejected
