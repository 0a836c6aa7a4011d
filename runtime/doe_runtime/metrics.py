"""``/metrics`` in Prometheus' text format (``prometheus_client``, part of the ``[serve]`` extra).

Names follow Prometheus' conventions (a ``doe_`` prefix, base units, ``_total`` counters); labels are task
names (only those of served bundles: anything else is ``(unknown)``), HTTP statuses, load results and
replicas — never request text or local paths:

==========================================  =========  ======================================================
metric                                      type       labels / meaning
==========================================  =========  ======================================================
doe_requests_total                          counter    task, status: prediction requests answered
doe_requests_shed_total                     counter    requests refused with 503 + Retry-After (queue full)
doe_request_duration_seconds                histogram  task: the whole request in the server
doe_queue_duration_seconds                  histogram  task: from arrival to the start of its model call
doe_model_call_duration_seconds             histogram  task: one model call (tokenization included)
doe_model_call_items                        histogram  task: items per model call
doe_model_call_requests                     histogram  task: requests merged into one model call
doe_model_call_padded_tokens                histogram  task: padded tokens (items x longest) per model call
doe_experts_resident                        gauge      replica: experts loaded now
doe_expert_bytes                            gauge      replica, task, kind (own | shared): their model bytes
doe_expert_loads_total                      counter    replica, task, result (loaded | reloaded | failed)
doe_cuda_device_memory_used_bytes           gauge      replica: device memory in use (CUDA only)
==========================================  =========  ======================================================
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

from .errors import MissingExtraError

UNKNOWN_TASK = "(unknown)"
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ITEMS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


@functools.cache
def _cudart() -> Any:
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_memory_used() -> int | None:
    """Bytes in use on the current CUDA device (device-wide), or None where there is no CUDA runtime."""
    lib = _cudart()
    if lib is None:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return int(total.value - free.value)


def router_state(router: Any) -> dict:
    """What ``/metrics`` reports about a Router: resident experts, their bytes, loads; CUDA memory."""
    resident = router.resident()
    memory = []
    on_cuda = False
    for task in resident:
        info = router.loaded_info(task)
        if info is None:
            continue
        on_cuda = on_cuda or info["provider"] == "CUDAExecutionProvider"
        memory += [(task, "own", info["own_bytes"]), (task, "shared", info["shared_bytes"])]
    loads = [(task, result, count) for (task, result), count in sorted(router.load_events.items())]
    return {
        "resident": len(resident),
        "bytes": memory,
        "loads": loads,
        "cuda_bytes": cuda_memory_used() if on_cuda else None,
    }


class _StateCollector:
    """The Router-side metrics, read at scrape time from ``states() -> {replica: router_state}``."""

    def __init__(self, states: Callable[[], dict[str, dict]]):
        self.states = states

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        resident = GaugeMetricFamily("doe_experts_resident", "Experts loaded now", labels=["replica"])
        memory = GaugeMetricFamily(
            "doe_expert_bytes",
            "Model bytes of the resident experts (own: not shared)",
            labels=["replica", "task", "kind"],
        )
        loads = CounterMetricFamily("doe_expert_loads", "Expert loads by result", labels=["replica", "task", "result"])
        cuda = GaugeMetricFamily("doe_cuda_device_memory_used_bytes", "CUDA device memory in use", labels=["replica"])
        for replica, state in self.states().items():
            resident.add_metric([replica], state["resident"])
            for task, kind, value in state["bytes"]:
                memory.add_metric([replica, task, kind], value)
            for task, result, count in state["loads"]:
                loads.add_metric([replica, task, result], count)
            if state.get("cuda_bytes") is not None:
                cuda.add_metric([replica], state["cuda_bytes"])
        yield from (resident, memory, loads, cuda)


class ServerMetrics:
    """The server's metrics in their own registry (one per app, so tests and several apps do not collide)."""

    def __init__(self, *, known: Callable[[str], bool], states: Callable[[], dict[str, dict]]):
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError as exc:
            raise MissingExtraError("/metrics needs prometheus_client: pip install 'doe-runtime[serve]'") from exc
        self.known = known
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("doe_requests", "Prediction requests answered", ["task", "status"], registry=reg)
        self.shed = Counter("doe_requests_shed", "Requests refused with 503 + Retry-After (queue full)", registry=reg)
        self.request_seconds = Histogram(
            "doe_request_duration_seconds", "Whole request in the server", ["task"], buckets=SECONDS, registry=reg
        )
        self.queue_seconds = Histogram(
            "doe_queue_duration_seconds",
            "Arrival to the start of its model call",
            ["task"],
            buckets=SECONDS,
            registry=reg,
        )
        self.model_seconds = Histogram(
            "doe_model_call_duration_seconds", "One model call", ["task"], buckets=SECONDS, registry=reg
        )
        self.call_items = Histogram(
            "doe_model_call_items", "Items per model call", ["task"], buckets=ITEMS, registry=reg
        )
        self.call_requests = Histogram(
            "doe_model_call_requests", "Requests merged into one model call", ["task"], buckets=ITEMS, registry=reg
        )
        self.call_tokens = Histogram(
            "doe_model_call_padded_tokens", "Padded tokens per model call", ["task"], buckets=TOKENS, registry=reg
        )
        self.registry.register(_StateCollector(states))

    def task_label(self, task: str) -> str:
        return task if self.known(task) else UNKNOWN_TASK

    def answered(self, task: str, status: int, seconds: float) -> None:
        label = self.task_label(task)
        self.requests.labels(label, str(status)).inc()
        self.request_seconds.labels(label).observe(seconds)

    def model_call(self, task: str, stats: dict, waited: list[float]) -> None:
        """One model call: its stats (Router.predict's, plus ``requests``) and how long each request waited."""
        label = self.task_label(task)
        self.model_seconds.labels(label).observe(stats.get("seconds", 0.0))
        self.call_items.labels(label).observe(stats.get("items", 0))
        self.call_requests.labels(label).observe(stats.get("requests", 1))
        self.call_tokens.labels(label).observe(stats.get("padded_tokens", 0))
        self.queued(task, waited)

    def queued(self, task: str, waited: list[float]) -> None:
        """How long requests waited from arrival to the start of their model call."""
        label = self.task_label(task)
        for seconds in waited:
            self.queue_seconds.labels(label).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["UNKNOWN_TASK", "ServerMetrics", "cuda_memory_used", "router_state"]
