"""What every benchmark suite shares: the environment header, paired timing of several sessions on
the same inputs, and JSON-lines records (the FLOP bounds live in :mod:`doe_export.flops`).

Speed is compared as a ratio measured in one run: the sessions are run interleaved (order
rotated every repeat) on the same inputs with the same thread count, and the speed-up of each
repeat is the ratio of two neighbouring measurements; the report gives its median and spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..records import cpu_model, environment, read_jsonl, write_jsonl

__all__ = [
    "cpu_model",
    "environment",
    "paired_timing",
    "quantiles",
    "random_check_batches",
    "ratios",
    "read_jsonl",
    "session",
    "write_jsonl",
]


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    if len(ordered) == 1:
        return {"median": ordered[0], "p25": ordered[0], "p75": ordered[0]}
    q = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2]}


def paired_timing(
    runners: Mapping[str, Callable[..., object]],
    repeats: int,
    warmup: int = 1,
    min_seconds: float = 0.0,
    max_repeats: int = 50,
) -> dict[str, list[float]]:
    """Run every runner ``repeats`` times (more, up to ``max_repeats``, until ``min_seconds`` have
    passed), interleaved with the order rotated each repeat; return seconds per run per name."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    done = 0
    while done < repeats or (time.perf_counter() - start < min_seconds and done < max_repeats):
        order = names[done % len(names) :] + names[: done % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
        done += 1
    return times


def ratios(times: dict[str, list[float]], base: str, other: str) -> list[float]:
    """Per-repeat speed-up of ``other`` over ``base`` (base time / other time)."""
    return [b / o for b, o in zip(times[base], times[other])]


def random_check_batches(vocab: int, seed: int, low: int = 5):
    """Random token ids for exporting and validating a benchmark graph: (sample batch [2, 12], the
    validation batches: the sample and a [3, 20] batch with one padded row)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sample = rng.integers(low, vocab, size=(2, 12)).astype(np.int64)
    check = rng.integers(low, vocab, size=(3, 20)).astype(np.int64)
    check_mask = np.ones_like(check)
    check_mask[1, 9:] = 0  # one padded row
    return (sample, np.ones_like(sample)), [(sample, np.ones_like(sample)), (check, check_mask)]


def session(path: Path, threads: int):
    """A CPU onnxruntime session with ``threads`` intra-op threads, one inter-op thread, sequential."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
