"""ONNX export, numerical validation against PyTorch, variants, and atomic bundle writing.

Export uses ``torch.onnx.export`` with dynamic batch and sequence axes: the TorchScript exporter
(``dynamo=False``) by default — on our CPUs its graph runs 10-15 % faster than the dynamo graph,
whose SkipLayerNormalization and safe-softmax nodes cost time (design notes §4) — or the dynamo
exporter. Validation runs the graph in onnxruntime at several shapes (one padded batch at least)
and fails the build unless max |ORT - torch| <= tolerance and every label agrees.

Variants (``model.fp16.onnx`` for CUDA, ``model.int8.onnx`` for CPU) are checked on the task's
test split against the PyTorch expert: label agreement and metric within the spec's limits, else
they are not written and the build says why.

A bundle is built by :class:`BundleWriter` in a hidden temp folder beside its target and moved into
place only when complete (``manifest.json`` last), so an interrupted export leaves the previous
bundle intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from doe_runtime.bundle import MANIFEST_FILE, SCHEMA_VERSION, check_task_name, sha256_file, validate_manifest
from doe_runtime.tokenization import encode_batch

from .console import log
from .errors import ConfigError, ExportValidationError

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["logits"]
FP16_TOLERANCE = 5e-2  # on logits; labels must agree exactly
TORCHSCRIPT_OPSET = 17

__all__ = ["BundleWriter", "ExportValidationError", "FP16_TOLERANCE", "INPUT_NAMES", "OUTPUT_NAMES",
           "encode_sample", "export_onnx", "export_validated", "file_entry", "fuse_for_ort", "io_spec", "manifest_for", "quantize_int8",
           "to_fp16", "validate_onnx", "validation_batches", "write_variants"]


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
def _quieted(logger: str | None = None):
    """The logger (None: the root logger) raised to ERROR for the block, its level restored after."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def export_onnx(model, path: Path, sample_ids: np.ndarray, sample_mask: np.ndarray, verbose: bool = False,
                exporter: str = "torchscript", attention: str = "eager") -> int:
    """Write ``model`` to ``path`` as a single-file ONNX graph; return its opset."""
    import onnx

    model.eval()  # the legacy exporter restores the wrapper's training flag on the whole tree afterwards
    args = (torch.from_numpy(sample_ids), torch.from_numpy(sample_mask))
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    # "torchvision is not installed" notices on the torch.onnx logger
    quiet = contextlib.nullcontext() if verbose else _quieted("torch.onnx")
    with sink, quiet, warnings.catch_warnings(), attention_implementation(model.backbone, attention):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch"}}
            torch.onnx.export(model, args, str(path), dynamo=False, input_names=INPUT_NAMES,
                              output_names=OUTPUT_NAMES, dynamic_axes=axes, opset_version=TORCHSCRIPT_OPSET)
        elif exporter == "dynamo":
            shapes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
            torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, input_names=INPUT_NAMES,
                              output_names=OUTPUT_NAMES, dynamic_shapes=shapes, verbose=False)
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


def export_validated(model, path: Path, sample: tuple[np.ndarray, np.ndarray], batches, exporter: str = "torchscript",
                     fuse: bool = False, tolerance: float = 1e-4, disabled_optimizers=(),
                     attention: str = "eager") -> tuple[int, dict, dict]:
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
    return [node.name for node in graph.node if node.op_type in ("MatMul", "Gemm")
            and (not weights_only or any(name in weights for name in node.input))]


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

    with _quieted():  # onnxruntime.quantization: "Please consider to run pre-processing" on every call
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         nodes_to_exclude=list(exclude or []))


def calibration_feeds(tokenizer, inputs: list, batches: int, size: int = 8) -> list[dict]:
    """Up to ``batches`` feeds of ``size`` items, all padded to one length (the calibrators stack each
    tensor's values across batches, so every batch must have the same shape)."""
    encoded = [encode_batch(tokenizer, inputs[start: start + size])
               for start in range(0, min(len(inputs), size * batches), size)]
    if not encoded:
        return []
    longest = max(ids.shape[1] for ids, _ in encoded)
    pad_id = (tokenizer.padding or {}).get("pad_id", 0)
    feeds = []
    for ids, mask in encoded:
        extra = longest - ids.shape[1]
        feeds.append({"input_ids": np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id),
                      "attention_mask": np.pad(mask, ((0, 0), (0, extra)), constant_values=0)})
    return feeds


def quantize_int8_static(src: Path, dst: Path, feeds: list[dict], percentile: float = 99.999) -> None:
    """Static QDQ int8: weights per channel, activation scales fixed once from ``feeds`` (calibration
    batches of the task's training texts; histogram percentile, so one outlier does not set the scale).
    Only the weight MatMuls (projections, FFN, head; not attention's activation x activation products)
    are quantized. Measured against ``quantize_int8`` by the replace suite: on this
    project's CPU (AVX2, no VNNI) the QDQ graph of the bbc-news expert was slower than the dynamic one
    (8 x 128: 70.0 vs 59.6 ms; 8 x 32: 14.9 vs 12.5 ms) with the same labels on 300 test texts, so bundles
    ship the dynamic variant."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if not feeds:
        raise ExportValidationError(f"static int8 of {src}: no calibration batches (expected at least one)")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    with _quieted():
        # op types named: otherwise the calibrator also collects constant-valued tensors (mask arithmetic),
        # on which the histogram fails ("Too many bins for data range")
        quantize_static(str(src), str(dst), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=_matmuls(src, weights_only=True), op_types_to_quantize=["MatMul", "Gemm"],
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": percentile, "WeightSymmetric": True,
                                       "ActivationSymmetric": False})


def _shortened(item, words: int):
    cut = lambda text: " ".join(text.split()[:words])  # noqa: E731
    return (cut(item[0]), cut(item[1])) if isinstance(item, tuple) else cut(item)


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
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


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


def split_check(path: Path, tokenizer, test, metric: str, expected: np.ndarray, spec, reference: float,
                limit: int | None = None, disabled_optimizers=()) -> dict:
    """A variant on the test split against the PyTorch expert: label agreement and metric."""
    from . import evaluate

    count = len(test) if limit is None else min(limit, len(test))
    logits = evaluate.onnx_file_logits(path, tokenizer, test.inputs[:count], disabled_optimizers=disabled_optimizers)
    preds = logits.argmax(1)
    agreement = float((preds == expected[:count].argmax(1)).mean())
    value = evaluate.metric_value(metric, test.labels[:count], preds.tolist())
    ref = reference if count == len(test) else evaluate.metric_value(metric, test.labels[:count],
                                                                     expected[:count].argmax(1).tolist())
    problems = []
    if agreement < spec.variant_min_agreement:
        problems.append(f"labels agree with the PyTorch expert on {agreement:.2%} of {count} test items "
                        f"(needs >= {spec.variant_min_agreement:.0%})")
    if value < ref - spec.variant_max_metric_drop:
        problems.append(f"{metric} {value:.4f} vs the PyTorch expert's {ref:.4f} on {count} test items "
                        f"(allowed drop {spec.variant_max_metric_drop:g})")
    return {"split": test.name, "size": count, "label_agreement": agreement, "metric": metric, "value": value,
            "pytorch_value": ref, "problems": problems}


def time_graphs(paths: dict[str, Path], shapes=((8, 32), (8, 128)), repeats: int = 7, vocab_low: int = 1000,
                vocab_high: int = 20000, disabled_optimizers=()) -> dict:
    """Median latency of each graph per batch x tokens shape, 1 thread, interleaved on the same inputs."""
    sessions = {name: cpu_session(path, disabled_optimizers, threads=1) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    out = {}
    for batch, tokens in shapes:
        ids = rng.integers(vocab_low, vocab_high, size=(batch, tokens)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        times = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, feeds)
        for repeat in range(repeats):
            names = list(sessions)
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                start = time.perf_counter()
                sessions[name].run(None, feeds)
                times[name].append(time.perf_counter() - start)
        out[f"{batch}x{tokens}"] = {name: statistics.median(t) for name, t in times.items()}
    return out


def write_variants(model, folder: Path, fp32: Path, tokenizer, test, metric: str, expected: np.ndarray, batches,
                   spec) -> tuple[dict, dict]:
    """Write the variants the spec asks for; keep those that pass; return (manifest entries, rejections)."""
    from . import evaluate

    disabled = list(spec.disabled_optimizers)
    reference = evaluate.metric_value(metric, test.labels, expected.argmax(1).tolist())
    variants, rejected = {}, {}
    wanted = [p for p, on in (("int8", spec.int8), ("fp16", spec.fp16)) if on]
    for precision in wanted:
        name = f"model.{precision}.onnx"
        path = folder / name
        # int8: the recipes in order, the first that passes is kept (each next one keeps more in fp32:
        # slower, closer to fp32)
        recipes = INT8_RECIPES if precision == "int8" else ("fp16, io types kept",)
        reasons = []
        for recipe in recipes:
            try:
                if precision == "fp16":
                    to_fp16(fp32, path)
                    shapes = validate_onnx(model, path, batches, spec.fp16_tolerance, disabled)
                    # fp16 is for CUDA; on CPU onnxruntime runs it slowly, so 300 items suffice to check it
                    check = split_check(path, tokenizer, test, metric, expected, spec, reference, 300, disabled)
                else:
                    exclude = recipe_exclusions(recipe, fp32)
                    if exclude is None:
                        continue  # no such nodes in this graph: the recipe would be the first one again
                    quantize_int8(fp32, path, per_channel=True, exclude=exclude)
                    shapes = None
                    check = split_check(path, tokenizer, test, metric, expected, spec, reference, None, disabled)
            except ExportValidationError as exc:
                check, shapes = {"problems": [str(exc)]}, None
            if not check["problems"]:
                break
            reasons.append(f"{recipe}: {'; '.join(check['problems'])}")
            path.unlink(missing_ok=True)
        if check["problems"] or not path.is_file():
            rejected[precision] = " | ".join(reasons) or "no applicable recipe"
            log(f"variant {precision} not written: {rejected[precision]}")
            continue
        if reasons:
            log(f"variant {precision}: {recipe} (earlier recipes failed: {' | '.join(reasons)})")
        variants[precision] = {**file_entry(folder, name), "initializers": initializer_table(path),
                               "precision": precision, "recipe": recipe,
                               "io_types": "int64 inputs, float32 logits (as the fp32 graph)",
                               "validation": {"test_split": {k: v for k, v in check.items() if k != "problems"},
                                              **({"shapes": shapes} if shapes else {}),
                                              **({"recipes_failed": reasons} if reasons else {})},
                               "quality": {"metric": metric, "value": check["value"], "split_size": check["size"]},
                               "speed": {}}
    if spec.measure_speed and "int8" in variants:
        timed = time_graphs({"fp32": fp32, "int8": folder / "model.int8.onnx"}, disabled_optimizers=disabled)
        variants["int8"]["speed"] = {
            "device": "cpu", "threads": 1, "measured_on": "the build machine",
            "latency_ms": {shape: {k: round(1e3 * v, 3) for k, v in cell.items()} for shape, cell in timed.items()},
            "vs_fp32": {shape: round(cell["fp32"] / cell["int8"], 3) for shape, cell in timed.items()},
        }
    return variants, rejected


SHARED_MIN_BYTES = 1 << 16


def initializer_table(path: Path, min_bytes: int = SHARED_MIN_BYTES) -> list[dict]:
    """The graph's initializers of at least ``min_bytes`` with the sha256 of their raw bytes (what the
    runtime hashes): the manifest's ``initializers``, from which it shares identical tensors between
    experts. Read with the runtime's own reader, so both sides see the same bytes."""
    import hashlib

    import onnx

    from doe_runtime.onnxfile import DTYPE_NAMES, read_initializers

    consumers: dict[str, set] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    table = []
    for name, tensor in read_initializers(path).items():
        if len(tensor.raw) >= min_bytes:
            table.append({"name": name, "sha256": hashlib.sha256(tensor.raw).hexdigest(), "bytes": len(tensor.raw),
                          "dtype": DTYPE_NAMES[tensor.data_type], "shape": list(tensor.dims),
                          "consumers": sorted(consumers.get(name, ()))})
    return sorted(table, key=lambda entry: entry["name"])


def io_spec(num_labels: int) -> dict:
    return {
        "inputs": [{"name": name, "dtype": "int64", "shape": ["batch", "sequence"]} for name in INPUT_NAMES],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", num_labels]}],
    }


def file_entry(folder: Path, name: str) -> dict:
    return {"file": name, "sha256": sha256_file(folder / name)}


def manifest_for(*, task: dict, base_model: dict, architecture: dict, adaptation: dict, pruning: dict, onnx: dict,
                 tokenizer: dict, validation: dict, quality: dict, data: dict, versions: dict, created: str) -> dict:
    """The manifest document from its sections (pure: no files, no torch); checked by the runtime's
    own reader, so the exporter cannot write what the runtime would refuse."""
    manifest = {"schema_version": SCHEMA_VERSION, "task": task, "base_model": base_model,
                "architecture": architecture, "adaptation": adaptation, "pruning": pruning, "onnx": onnx,
                "tokenizer": tokenizer, "validation": validation, "quality": quality, "data": data,
                "versions": versions, "created": created}
    validate_manifest(manifest, f"manifest for {task.get('name')!r}")
    return manifest


# ----------------------------------------------------------------------------- atomic bundle writing


def _restore_orphan(root: Path, task: str) -> None:
    """If a writer died between its two renames, the old bundle sits in ``.<task>.previous``."""
    target, previous = root / task, root / f".{task}.previous"
    if previous.is_dir() and not target.exists():
        os.replace(previous, target)
    elif previous.is_dir():
        shutil.rmtree(previous, ignore_errors=True)


def _remove_dead_writers(root: Path, task: str) -> list[str]:
    """Remove temp folders of writers of ``task`` that no longer run (killed with SIGKILL, power cut):
    their names carry the writer's pid. Returns the removed folder names."""
    removed = []
    for folder in root.glob(f".{task}.tmp-*"):
        try:
            pid = int(folder.name[len(f".{task}.tmp-"):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
        except PermissionError:  # alive, another user's
            continue
    return removed


@contextlib.contextmanager
def _task_lock(root: Path, task: str):
    """Exclusive lock serialising the swaps under ``root``: POSIX flock on the root folder itself, so
    no lock file is left behind (swaps are two renames; one root-wide lock costs nothing)."""
    try:
        import fcntl
    except ImportError:  # Windows: renames are still atomic one by one, only not serialised
        yield
        return
    handle = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): readers see either
    the old bundle or the new one, never no bundle. False where the call is unavailable."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux / glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), f"{a} <-> {b}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class BundleWriter:
    """Write ``root/<task>`` atomically::

        with BundleWriter(root, task) as writer:
            ...write files into writer.folder...
            writer.write_manifest(manifest)     # last; checked by the runtime's reader
        writer.path                            # root/<task>, swapped into place

    The files go into a hidden temp folder beside the target (its name carries the writer's pid,
    so the next writer removes it if this process is killed). On leaving the block without an
    error and with a manifest, the folder replaces any previous bundle of the task; on any error
    (Ctrl-C included) the temp folder is removed and the previous bundle is untouched.
    """

    def __init__(self, root: str | os.PathLike, task: str):
        self.task = check_task_name(task)
        self.root = Path(root)
        self.folder: Path | None = None
        self.path = self.root / task
        self._manifest_written = False

    def __enter__(self) -> "BundleWriter":
        self.root.mkdir(parents=True, exist_ok=True)
        with _task_lock(self.root, self.task):  # a writer killed mid-swap left the old bundle aside: put it back
            _restore_orphan(self.root, self.task)
            _remove_dead_writers(self.root, self.task)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.task}.tmp-{os.getpid()}-", dir=self.root))
        os.chmod(self.folder, 0o777 & ~_umask())  # mkdtemp makes 0700; a bundle is shared like any folder
        return self

    def write_manifest(self, manifest: dict) -> None:
        validate_manifest(manifest, f"manifest for {self.task}")
        if manifest["task"]["name"] != self.task:
            raise ConfigError(f"manifest names task {manifest['task']['name']!r} but the bundle is {self.task!r}")
        with open(self.folder / MANIFEST_FILE, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=False)
            handle.flush()
            os.fsync(handle.fileno())
        self._manifest_written = True

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None or not self._manifest_written:
            shutil.rmtree(self.folder, ignore_errors=True)
            if kind is None:
                raise ConfigError(f"bundle {self.task!r}: the writer finished without write_manifest(); nothing "
                                  "was published")
            return
        try:
            with _task_lock(self.root, self.task):  # concurrent writers of one task swap one at a time
                _restore_orphan(self.root, self.task)
                if self.path.exists() and _exchange(self.folder, self.path):
                    shutil.rmtree(self.folder, ignore_errors=True)  # now holds the previous bundle
                elif self.path.exists():  # two renames: the task is briefly missing (readers keep their session)
                    previous = self.root / f".{self.task}.previous"
                    os.replace(self.path, previous)
                    os.replace(self.folder, self.path)
                    shutil.rmtree(previous, ignore_errors=True)
                else:
                    os.replace(self.folder, self.path)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
