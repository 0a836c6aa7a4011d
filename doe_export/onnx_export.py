"""ONNX export and numerical validation against PyTorch.

Export uses ``torch.onnx.export`` with dynamic batch and sequence axes: the TorchScript exporter
(``dynamo=False``) by default — on our CPUs its graph runs 10-15 % faster than the dynamo graph,
whose SkipLayerNormalization and safe-softmax nodes cost time (design notes §4) — or the dynamo
exporter. Validation runs the graph in onnxruntime at several shapes (one padded batch at least)
and fails the build unless max |ORT - torch| <= tolerance and every label agrees.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from doe_runtime.tokenization import encode_batch

from .errors import ConfigError, ExportValidationError
from .tasks import map_texts

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["logits"]
TORCHSCRIPT_OPSET = 17

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "attention_implementation",
    "cpu_session",
    "encode_sample",
    "export_onnx",
    "export_validated",
    "fuse_for_ort",
    "io_spec",
    "quieted",
    "validate_onnx",
    "validation_batches",
]


def encode_sample(tokenizer, inputs: list) -> tuple[np.ndarray, np.ndarray]:
    """The example batch the exporter traces with: the first two items."""
    return encode_batch(tokenizer, list(inputs[:2]))


ATTENTIONS = ("eager", "native")


@contextlib.contextmanager
def attention_implementation(backbone, name: str):
    """Trace the backbone with transformers' ``eager`` attention (scores + additive mask, softmax)
    instead of its default SDPA path, whose exported graph masks every layer's scores with a
    Where/IsNaN "safe softmax": on MiniLM at 8 x 128 tokens, 1 thread, that Where cost 15-17 ms of a
    125 ms expert run. ``native`` keeps the model's own setting. Numbers are the same (validated)."""
    if name == "native" or not hasattr(backbone, "set_attn_implementation"):
        yield
        return
    if name not in ATTENTIONS:
        raise ConfigError(f"attention must be one of {ATTENTIONS}, got {name!r}")
    before = getattr(backbone.config, "_attn_implementation", None)
    backbone.set_attn_implementation(name)
    try:
        yield
    finally:
        if before is not None:
            backbone.set_attn_implementation(before)


@contextlib.contextmanager
def quieted(logger: str | None = None):
    """The logger (None: the root logger) raised to ERROR for the block, its level restored after."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def export_onnx(
    model,
    path: Path,
    sample_ids: np.ndarray,
    sample_mask: np.ndarray,
    *,
    verbose: bool = False,
    exporter: str = "torchscript",
    attention: str = "eager",
) -> int:
    """Write ``model`` to ``path`` as a single-file ONNX graph; return its opset."""
    import onnx

    model.eval()  # the legacy exporter restores the wrapper's training flag on the whole tree afterwards
    args = (torch.from_numpy(sample_ids), torch.from_numpy(sample_mask))
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    # "torchvision is not installed" notices on the torch.onnx logger
    quiet = contextlib.nullcontext() if verbose else quieted("torch.onnx")
    with sink, quiet, warnings.catch_warnings(), attention_implementation(model.backbone, attention):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            }
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                dynamic_axes=axes,
                opset_version=TORCHSCRIPT_OPSET,
            )
        elif exporter == "dynamo":
            shapes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=True,
                external_data=False,
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                dynamic_shapes=shapes,
                verbose=False,
            )
        else:
            raise ConfigError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    graph = onnx.load(str(path), load_external_data=False)
    return max((op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")), default=0)


def fuse_for_ort(src: Path, dst: Path) -> dict[str, int]:
    """Rewrite ``src`` with onnxscript's onnxruntime fusions (MultiHeadAttention, SkipLayerNorm,
    BiasGelu, ...) into ``dst``; return the fusions that applied. Validate ``dst`` afterwards: a
    rewrite can change numbers."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(ir.load(str(src)))
    ir.save(model, str(dst))
    return {name: int(count) for name, count in counts.items() if count}


def export_validated(
    model,
    path: Path,
    sample: tuple[np.ndarray, np.ndarray],
    batches,
    *,
    exporter: str = "torchscript",
    fuse: bool = False,
    tolerance: float = 1e-4,
    disabled_optimizers=(),
    attention: str = "eager",
) -> tuple[int, dict, dict]:
    """Export ``model`` to ``path`` (through an unfused temp graph when ``fuse``), validated against
    PyTorch after every rewrite; return (opset, validation of the final graph, fusions applied)."""
    path = Path(path)
    fusions = {}
    if fuse:
        raw = path.with_name(path.stem + ".unfused.onnx")
        opset = export_onnx(model, raw, *sample, exporter=exporter, attention=attention)
        try:
            validate_onnx(model, raw, batches, tolerance, disabled_optimizers)
            fusions = fuse_for_ort(raw, path)
        finally:
            raw.unlink(missing_ok=True)
    else:
        opset = export_onnx(model, path, *sample, exporter=exporter, attention=attention)
    return opset, validate_onnx(model, path, batches, tolerance, disabled_optimizers), fusions


def _shortened(item, words: int):
    cut = lambda text: " ".join(text.split()[:words])  # noqa: E731
    return map_texts(item, cut)


def validation_batches(tokenizer, inputs: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shapes to check: a short item alone, a padded batch of mixed lengths, the longest items.

    Shortened copies of real items guarantee short sequences and real padding even when every
    item of the task is longer than the max length (e.g. news articles).
    """
    by_length = sorted(inputs, key=lambda item: len(tokenizer.encode_batch([item])[0].ids))
    mixed = [by_length[i * (len(by_length) - 1) // 4] for i in range(5)] if len(by_length) >= 5 else list(by_length)
    mixed += [_shortened(by_length[0], 3), _shortened(by_length[-1], 12)]
    return [
        encode_batch(tokenizer, [_shortened(inputs[0], 5)]),
        encode_batch(tokenizer, mixed),
        encode_batch(tokenizer, by_length[-3:]),
    ]


def cpu_session(path: Path, disabled_optimizers=(), threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled_optimizers),
    )


def validate_onnx(model, path: Path, batches, tolerance: float = 1e-4, disabled_optimizers=()) -> dict:
    """Compare ORT with PyTorch on each batch; raise ExportValidationError listing every failure."""
    session = cpu_session(path, disabled_optimizers)
    model.eval()
    shapes, diffs, agree, failures = [], [], 0, []
    total = 0
    for ids, mask in batches:
        with torch.inference_mode():
            expected = model(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
        got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        diff = float(np.abs(got - expected).max())
        same = int((got.argmax(1) == expected.argmax(1)).sum())
        shape = list(ids.shape)
        shapes.append(shape)
        diffs.append(diff)
        agree += same
        total += len(ids)
        padded = bool((mask == 0).any())
        if not diff <= tolerance or same != len(ids):
            failures.append(
                f"shape {shape}{' (padded)' if padded else ''}: max|diff| {diff:.3g} (tolerance {tolerance:g}), "
                f"labels agree {same}/{len(ids)}"
            )
    if failures:
        raise ExportValidationError(f"{path}: ONNX output differs from PyTorch:\n  " + "\n  ".join(failures))
    return {
        "shapes": shapes,
        "max_abs_diff_per_shape": diffs,
        "max_abs_diff": max(diffs),
        "tolerance": tolerance,
        "label_agreement": agree / total,
        "padded_batch_included": any(bool((m == 0).any()) for _, m in batches),
    }


def io_spec(num_labels: int) -> dict:
    return {
        "inputs": [{"name": name, "dtype": "int64", "shape": ["batch", "sequence"]} for name in INPUT_NAMES],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", num_labels]}],
    }
