"""CUDA graphs for small requests: one captured graph per shape bucket, replayed for every batch that fits it.

On the GPU a small request is bound by kernel launches (0.8–1.5 ms per call up to 32 x 128 tokens,
whatever the width: ``../shared/docs/design.md`` §4); a captured CUDA graph replays the whole model in one
launch. onnxruntime captures one graph per ``gpu_graph_id`` run option (ids from 1; ``-1`` runs without
capture), and a replay must see the same shapes and the same device buffers as its capture. So each
bucket (batch, padded length) owns its device input and output buffers; a batch that fits a bucket is
padded up to it — extra rows are copies of its first row, extra positions are padding with attention mask
0 — copied into the bucket's buffers, and the graph replays; its first rows are the answer. A batch that
fits no bucket, or a bucket whose capture failed, runs the normal way (said once in the log).

    buckets = Buckets.parse([(1, 32), (8, 64), (32, 128)])
    buckets.fit(5, 40)        # (8, 64): the smallest bucket (by padded tokens) that holds 5 x 40
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

log = logging.getLogger("doe_runtime.cuda_graphs")

# batch x padded length: single items and small batches, where launches dominate (design notes §4)
DEFAULT_BUCKETS = tuple((batch, length) for batch in (1, 2, 4, 8, 16, 32) for length in (32, 64, 128))
NO_GRAPH = "-1"  # the gpu_graph_id of a run that neither captures nor replays


@dataclass(frozen=True)
class Buckets:
    """Shape buckets (batch, padded length), sorted, each used by one captured graph."""

    shapes: tuple[tuple[int, int], ...] = DEFAULT_BUCKETS

    @classmethod
    def parse(cls, shapes: Iterable[Any], what: str = "cuda_graph_buckets") -> Buckets:
        """Refuse an empty, unsorted, repeated or malformed list, naming it; return the buckets."""
        given = list(shapes)
        if not given:
            raise ConfigError(
                f"{what} is empty; give (batch, length) pairs such as [(1, 32), (8, 128)], or turn CUDA graphs off"
            )
        parsed = []
        for index, shape in enumerate(given):
            if (
                not isinstance(shape, (tuple, list))
                or len(shape) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
            ):
                raise ConfigError(f"{what}[{index}] must be a (batch, length) pair of integers >= 1, got {shape!r}")
            parsed.append((int(shape[0]), int(shape[1])))
        if parsed != sorted(set(parsed)):
            raise ConfigError(
                f"{what} must be sorted by (batch, length) without repeats, got {parsed}; e.g. {sorted(set(parsed))}"
            )
        return cls(tuple(parsed))

    def check_length(self, max_length: int, where: str) -> None:
        """Refuse buckets longer than what the bundle's tokenizer ever produces (they could never be used)."""
        longest = max(length for _, length in self.shapes)
        if longest > max_length:
            raise ConfigError(
                f"{where}: CUDA graph bucket length {longest} exceeds the bundle's max_length {max_length} (no "
                f"request is ever that long); use buckets up to {max_length} tokens"
            )

    def fit(self, batch: int, length: int) -> tuple[int, int] | None:
        """The bucket with the fewest padded tokens that holds ``batch`` x ``length``; None if none does."""
        fitting = [(b * t, b, t) for b, t in self.shapes if b >= batch and t >= length]
        return min(fitting)[1:] if fitting else None


def pad_to(ids: np.ndarray, mask: np.ndarray, bucket: tuple[int, int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``ids``/``mask`` [B, T] padded to the bucket [b, t]: extra positions are ``pad_id`` with mask 0 (the
    model ignores them), extra rows repeat the first row (a real row: no all-masked softmax, no NaN)."""
    batch, length = bucket
    rows, columns = ids.shape
    out_ids = np.full((batch, length), pad_id, dtype=np.int64)
    out_mask = np.zeros((batch, length), dtype=np.int64)
    out_ids[:rows, :columns], out_mask[:rows, :columns] = ids, mask
    out_ids[rows:], out_mask[rows:] = out_ids[0], out_mask[0]
    return out_ids, out_mask


class GraphRunner:
    """The captured graphs of one CUDA session: per bucket, fixed device buffers and a ``gpu_graph_id``."""

    def __init__(
        self, session: Any, *, input_names: list[str], output_name: str, num_labels: int, buckets: Buckets, pad_id: int
    ):
        import onnxruntime as ort

        self._ort, self.session, self.input_names, self.output_name = ort, session, input_names, output_name
        self.num_labels, self.buckets, self.pad_id = num_labels, buckets, pad_id
        self._slots: dict[tuple[int, int], dict] = {}
        self.failed: dict[tuple[int, int], str] = {}
        self.fallbacks = 0
        self._said_outside = False
        self.plain_options = ort.RunOptions()
        self.plain_options.add_run_config_entry("gpu_graph_id", NO_GRAPH)

    def _slot(self, bucket: tuple[int, int]) -> dict:
        slot = self._slots.get(bucket)
        if slot is None:
            ort, (batch, length) = self._ort, bucket
            inputs = {
                name: ort.OrtValue.ortvalue_from_shape_and_type((batch, length), np.int64, "cuda", 0)
                for name in self.input_names
            }
            output = ort.OrtValue.ortvalue_from_shape_and_type((batch, self.num_labels), np.float32, "cuda", 0)
            binding = self.session.io_binding()
            for name, value in inputs.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(self.output_name, output)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(len(self._slots) + 1))  # ids from 1; 0 is reserved
            slot = {"inputs": inputs, "output": output, "binding": binding, "options": options, "runs": 0}
            self._slots[bucket] = slot
        return slot

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
        """Logits [B, K] from the captured graph of the batch's bucket; None when the batch fits no bucket or its
        capture failed (the caller then runs the normal way, with :attr:`plain_options`)."""
        rows, columns = ids.shape
        bucket = self.buckets.fit(rows, columns)
        if bucket is None or bucket in self.failed:
            self.fallbacks += 1
            if bucket is None and not self._said_outside:
                self._said_outside = True
                log.info(
                    "a batch of %d x %d fits no CUDA graph bucket (largest %s): it runs without a graph (said once)",
                    rows,
                    columns,
                    self.buckets.shapes[-1],
                )
            return None
        padded = dict(zip(("input_ids", "attention_mask"), pad_to(ids, mask, bucket, self.pad_id)))
        slot = self._slot(bucket)
        try:
            for name, value in slot["inputs"].items():
                value.update_inplace(padded[name])
            self.session.run_with_iobinding(slot["binding"], run_options=slot["options"])
        except Exception as exc:  # onnxruntime raises its own types when a capture fails
            self.failed[bucket] = f"{type(exc).__name__}: {str(exc)[:200]}"
            self._slots.pop(bucket, None)
            log.warning(
                "CUDA graph capture failed for bucket %s (%s); that bucket runs without a graph",
                bucket,
                self.failed[bucket],
            )
            self.fallbacks += 1
            return None
        slot["runs"] += 1
        return slot["output"].numpy()[:rows]

    def info(self) -> dict:
        return {
            "buckets": [list(b) for b in self.buckets.shapes],
            "captured": sorted(list(b) for b in self._slots),
            "failed": {f"{b[0]}x{b[1]}": why for b, why in self.failed.items()},
            "fallbacks": self.fallbacks,
        }


__all__ = ["DEFAULT_BUCKETS", "NO_GRAPH", "Buckets", "GraphRunner", "pad_to"]
