"""ONNX export, numerical validation against PyTorch, and atomic bundle writing.

Export uses ``torch.onnx.export(dynamo=True, external_data=False)`` with dynamic batch and
sequence axes. Validation runs the graph in onnxruntime at several shapes (one padded batch at
least) and fails the build unless max |ORT - torch| <= tolerance and every label agrees.

A bundle is built in a hidden temp folder beside its target and moved into place only when
complete (``manifest.json`` last), so an interrupted export leaves the previous bundle intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from doe_runtime.bundle import MANIFEST_FILE, check_task_name, sha256_file, validate_manifest
from doe_runtime.router import encode_batch

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["logits"]


class ExportValidationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


def export_onnx(model, path: Path, sample_ids: np.ndarray, sample_mask: np.ndarray, verbose: bool = False) -> int:
    """Write ``model`` to ``path`` as a single-file ONNX graph; return its opset."""
    import onnx

    model.eval()
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    args = (torch.from_numpy(sample_ids), torch.from_numpy(sample_mask))
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    if not verbose:
        quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        with sink, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=True,
                external_data=False,
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                dynamic_shapes=dynamic,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
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


FP16_TOLERANCE = 5e-2  # on logits; labels must agree exactly


def to_fp16(src: Path, dst: Path) -> None:
    """An fp16 copy of ``src`` whose inputs and outputs keep their types (int64 ids, float32 logits)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


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


def validate_onnx(model, path: Path, batches, tolerance: float = 1e-4) -> dict:
    """Compare ORT with PyTorch on each batch; raise ExportValidationError listing every failure."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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


def write_bundle(root: Path, task: str, fill, manifest: dict) -> Path:
    """Build ``root/task`` atomically.

    ``fill(folder) -> dict`` writes the model and tokenizer files into a temp folder and returns
    manifest fields to merge (e.g. hashes). ``manifest.json`` is written last; then the folder
    replaces any previous bundle of the task. On any error the temp folder is removed and the
    previous bundle is untouched.
    """
    check_task_name(task)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _task_lock(root, task):  # a writer killed mid-swap left the old bundle aside: put it back
        _restore_orphan(root, task)
        _remove_dead_writers(root, task)
    work = Path(tempfile.mkdtemp(prefix=f".{task}.tmp-{os.getpid()}-", dir=root))
    try:
        manifest = {**manifest, **fill(work)}
        validate_manifest(manifest, f"manifest for {task}")
        with open(work / MANIFEST_FILE, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=False)
            handle.flush()
            os.fsync(handle.fileno())
        target = root / task
        with _task_lock(root, task):  # concurrent writers of one task swap one at a time
            _restore_orphan(root, task)
            if target.exists():
                previous = root / f".{task}.previous"
                os.replace(target, previous)
                os.replace(work, target)
                shutil.rmtree(previous, ignore_errors=True)
            else:
                os.replace(work, target)
        return target
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextlib.contextmanager
def _task_lock(root: Path, task: str):
    """Exclusive lock on ``root/.<task>.lock`` (POSIX flock; without fcntl, no cross-process lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: renames are still atomic one by one, only not serialised
        yield
        return
    with open(root / f".{task}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def file_entry(folder: Path, name: str) -> dict:
    return {"file": name, "sha256": sha256_file(folder / name)}
