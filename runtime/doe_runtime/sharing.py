"""One copy of each tensor per process: weights shared by the sessions of several experts.

Experts of one frozen backbone (prompt-tuned bundles) carry byte-identical embeddings, attention
and LayerNorm weights. The manifest lists each graph's large initializers with their sha256
(``onnx.initializers``, ``onnx.variants.<p>.initializers``); :class:`WeightPool` turns each distinct
(base model, sha256) into one onnxruntime ``OrtValue``, handed to every session that needs it with
``SessionOptions.add_initializer`` instead of each session loading its own copy.

A tensor lives as long as a session uses it: the pool holds tensors weakly, each expert holds
strong references to its own, so evicting the last expert that uses a tensor frees it. The bytes
of every shared tensor are hashed when first read; a mismatch with the manifest is a
``BundleError`` naming the tensor and the file.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from pathlib import Path

from .errors import BundleError
from .onnxfile import OnnxFormatError, read_initializers

# onnxruntime re-packs the constant operand of these ops into a buffer of each session's own, so a
# tensor they consume would live once in the pool and once more per session: such tensors are not shared
PREPACKED_OPS = frozenset(
    {
        "MatMul",
        "Gemm",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "FusedMatMul",
        "Conv",
        "Attention",
        "QAttention",
        "QLinearMatMul",
    }
)


def shareable(entry: dict) -> bool:
    """A manifest initializer entry worth sharing: not consumed by an op that re-packs it per session
    (entries written before consumers were recorded are shared)."""
    return not PREPACKED_OPS.intersection(entry.get("consumers", ()))


class SharedTensor:
    """One tensor in memory: its OrtValue (and the array that backs it)."""

    __slots__ = ("__weakref__", "array", "key", "nbytes", "value")

    def __init__(self, key: tuple, array, value):
        self.key, self.array, self.value, self.nbytes = key, array, value, int(array.nbytes)


class WeightPool:
    """Process-wide pool of shared tensors, keyed by (base model sha256, tensor sha256)."""

    def __init__(self):
        self._tensors: weakref.WeakValueDictionary[tuple, SharedTensor] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tensors)

    def acquire(self, path: Path, base: str, table: list) -> dict[str, SharedTensor]:
        """The shared tensors of the graph at ``path`` listed in ``table`` (manifest entries with name and
        sha256), created from the file where the pool has none yet; name -> SharedTensor."""
        import onnxruntime as ort

        wanted = {entry["name"]: entry for entry in table if shareable(entry)}
        out, missing = {}, {}
        with self._lock:
            for name, entry in wanted.items():
                tensor = self._tensors.get((base, entry["sha256"]))
                if tensor is not None:
                    out[name] = tensor
                else:
                    missing[name] = entry
        if not missing:
            return out
        try:
            found = read_initializers(path, set(missing))
        except OnnxFormatError as exc:
            raise BundleError(
                f"{path}: cannot read its initializers to share them ({exc}); re-export the bundle"
            ) from exc
        for name, entry in missing.items():
            initializer = found.get(name)
            if initializer is None:
                raise BundleError(
                    f"{path}: the manifest lists a shared initializer {name!r} that the graph does not "
                    "hold as raw data; re-export the bundle"
                )
            digest = hashlib.sha256(initializer.raw).hexdigest()
            if digest != entry["sha256"]:
                raise BundleError(
                    f"{path}: initializer {name!r}: sha256 mismatch (manifest says {entry['sha256']}, "
                    f"the file holds {digest}); the graph was changed after export. Re-export the "
                    "bundle"
                )
            array = initializer.array()
            key = (base, digest)
            with self._lock:
                shared = self._tensors.get(key)
                if shared is None:
                    shared = SharedTensor(key, array, ort.OrtValue.ortvalue_from_numpy(array))
                    self._tensors[key] = shared
            out[name] = shared
        return out


__all__ = ["PREPACKED_OPS", "SharedTensor", "WeightPool", "shareable"]
