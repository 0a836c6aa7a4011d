"""Task metrics and batched evaluation of a TaskModel (PyTorch) or an ONNX file (onnxruntime)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from doe_runtime.tokenization import length_sorted_batches

from .tasks import Split


def accuracy(labels: list[int], preds: list[int]) -> float:
    return float(np.mean(np.asarray(labels) == np.asarray(preds))) if labels else float("nan")


def f1_binary(labels: list[int], preds: list[int], positive: int = 1) -> float:
    y, p = np.asarray(labels), np.asarray(preds)
    tp = int(((p == positive) & (y == positive)).sum())
    fp = int(((p == positive) & (y != positive)).sum())
    fn = int(((p != positive) & (y == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(labels: list[int], preds: list[int]) -> float:
    """Matthews correlation (multi-class form; equals the binary MCC for two classes)."""
    y, p = np.asarray(labels), np.asarray(preds)
    classes = np.union1d(y, p)
    conf = np.array([[np.sum((y == a) & (p == b)) for b in classes] for a in classes], dtype=np.float64)
    t, pk = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    denom = math.sqrt(max(s * s - (pk * pk).sum(), 0.0)) * math.sqrt(max(s * s - (t * t).sum(), 0.0))
    return float((c * s - (t * pk).sum()) / denom) if denom else 0.0


METRIC_FUNCTIONS: dict[str, Callable[[list[int], list[int]], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews,
}


def metric_value(metric: str, labels: list[int], preds: list[int]) -> float:
    return METRIC_FUNCTIONS[metric](labels, preds)


@torch.inference_mode()
def torch_logits(model, tokenizer, inputs: list, batch_size: int = 64) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = np.zeros((len(inputs), model.num_labels), dtype=np.float32)
    for chunk, ids, mask in length_sorted_batches(tokenizer, inputs, batch_size):
        out[chunk] = model(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
    model.train(was_training)
    return out


def onnx_logits(session, tokenizer, inputs: list, batch_size: int = 64) -> np.ndarray:
    out = None
    for chunk, ids, mask in length_sorted_batches(tokenizer, inputs, batch_size):
        logits = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        if out is None:
            out = np.zeros((len(inputs), logits.shape[1]), dtype=np.float32)
        out[chunk] = logits
    if out is None:
        raise ValueError("onnx_logits: no inputs to run")
    return out


def onnx_file_logits(path, tokenizer, inputs: list, batch_size: int = 32, disabled_optimizers=()) -> np.ndarray:
    """Logits of an ONNX file on CPU, batched as the runtime's Router batches by default (32 items,
    length-sorted): int8 graphs quantize activations per batch, so batching is part of the result."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(path), providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers)
    )
    return onnx_logits(session, tokenizer, inputs, batch_size)


def torch_predictions(model, tokenizer, split: Split, batch_size: int = 64) -> list[int]:
    """The model's predicted label of every item of ``split``, in order."""
    return torch_logits(model, tokenizer, split.inputs, batch_size).argmax(axis=1).tolist()


def evaluate_torch(model, tokenizer, split: Split, metric: str, batch_size: int = 64) -> float:
    return metric_value(metric, split.labels, torch_predictions(model, tokenizer, split, batch_size))
