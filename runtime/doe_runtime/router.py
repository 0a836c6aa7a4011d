"""Serve per-task ONNX experts: one onnxruntime session per task, created on first use.

``Router(root)`` finds the bundles under ``root`` (see :mod:`doe_runtime.bundle`), and
``predict(task, inputs)`` tokenizes with the bundle's own ``tokenizer.json``, pads to the longest
item of each batch, runs the task's session and returns labels with probabilities in the
caller's order. At most ``max_resident`` sessions are kept; the least recently used is dropped.
One loaded bundle is a :class:`~doe_runtime.expert.Expert`.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import check_task_name, discover, read_manifest
from .cuda_graphs import Buckets
from .errors import BundleError, ConfigError, DeviceError, RunError, UnknownTaskError
from .expert import (
    DEVICES,
    PRECISIONS,
    Expert,
    bundle_signature,
    release_free_memory,
    softmax,
)
from .manifest import Manifest
from .sharing import WeightPool
from .tokenization import length_sorted_batches

__all__ = ["DEVICES", "PRECISIONS", "Prediction", "Router"]


@dataclass(frozen=True)
class Prediction:
    label: str
    label_id: int
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "label_id": self.label_id, "probabilities": self.probabilities}


class Router:
    """Route requests to per-task experts.

    ``device``: ``"cpu"``, ``"cuda"`` (error unless the session really gets CUDA) or ``"auto"``
    (CUDA when the session gets it, else CPU). ``max_resident``: sessions kept loaded at once.
    ``batch_size``: items per ``session.run``; ``max_batch_tokens``: cap on items x longest item
    per run (``None``: no cap). ``intra_op_threads`` / ``inter_op_threads``: onnxruntime threads
    per session (``None``: onnxruntime's default; ``Router.info`` reports what each session got).
    ``sort_by_length``: batch items of similar length together (default; ``False`` batches them in
    arrival order, padding each batch to its longest item).
    ``precision`` / ``io_binding``: see :class:`Expert`. ``max_resident_bytes``: cap on the summed
    size of the resident experts' model files (their weights dominate a session's memory; the
    switch benchmark measures the real resident memory per expert); the least recently used are
    dropped until the cap holds, the newest always stays. ``memory_arena=False`` turns off
    onnxruntime's CPU memory arena (buffers go back to the allocator after each run instead of the
    arena keeping its peak). ``allow_spinning=False``: idle intra-op threads sleep instead of
    spinning (with several sessions busy in turn, spinning threads of one steal the cores of the next).
    ``share_weights`` (default on): tensors that several experts hold byte for byte (the manifest's
    initializer hashes; experts of one frozen backbone) are loaded once per process and given to every
    session that needs them; freed when no resident expert uses them. Fine-tuned experts share nothing
    and lose nothing. ``max_resident_bytes`` counts a shared tensor once.
    ``auto_reload``: before each request, compare the task's bundle files with those the resident
    session was loaded from; a rebuilt bundle is loaded anew (requests already running finish on
    the old session, which is freed when they end). While a bundle is being swapped (its folder
    briefly missing) the resident session keeps serving. Costs one directory scan per request.
    ``cuda_graphs`` (``"auto"``: on where a session gets CUDA; ``True``: an error elsewhere; ``False``: off)
    and ``graph_buckets`` ((batch, padded length) pairs, sorted; default
    :data:`~doe_runtime.cuda_graphs.DEFAULT_BUCKETS`): batches that fit a bucket are padded to it and replay
    that bucket's captured CUDA graph; the others run the normal way.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        device: str = "auto",
        max_resident: int = 4,
        batch_size: int = 32,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        max_batch_tokens: int | None = None,
        sort_by_length: bool = True,
        auto_reload: bool = False,
        precision: str = "auto",
        io_binding: bool | str = "auto",
        max_resident_bytes: int | None = None,
        memory_arena: bool = True,
        allow_spinning: bool = True,
        share_weights: bool = True,
        cuda_graphs: bool | str = "auto",
        graph_buckets: Sequence[tuple[int, int]] | None = None,
    ):
        if cuda_graphs not in ("auto", True, False):
            raise ConfigError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
        if cuda_graphs is True and device == "cpu":
            raise ConfigError(
                "cuda_graphs=True asked for with device='cpu': CUDA graphs need the CUDA provider; use "
                "device='cuda' (or 'auto' on a GPU machine), or cuda_graphs=False"
            )
        self.cuda_graphs = cuda_graphs
        self.graph_buckets = Buckets.parse(graph_buckets) if graph_buckets is not None else Buckets()
        if device not in DEVICES:
            raise ConfigError(f"device must be one of {list(DEVICES)}, got {device!r}")
        if not isinstance(max_resident, int) or max_resident < 1:
            raise ConfigError(f"max_resident must be an int >= 1, got {max_resident!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.root = Path(root)
        self.device = device
        self.max_resident = max_resident
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
            raise ConfigError(f"max_batch_tokens must be an int >= 1 or None, got {max_batch_tokens!r}")
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an int >= 1 or None (onnxruntime's default), got {value!r}")
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if io_binding not in ("auto", True, False):
            raise ConfigError(f"io_binding must be 'auto', True or False, got {io_binding!r}")
        if max_resident_bytes is not None and (not isinstance(max_resident_bytes, int) or max_resident_bytes < 1):
            raise ConfigError(f"max_resident_bytes must be an int >= 1 or None, got {max_resident_bytes!r}")
        self.precision = precision
        self.io_binding = io_binding
        self.max_resident_bytes = max_resident_bytes
        self.memory_arena = bool(memory_arena)
        self.allow_spinning = bool(allow_spinning)
        self._pool = WeightPool() if share_weights else None
        self.sort_by_length = bool(sort_by_length)
        self.auto_reload = bool(auto_reload)
        self._bundles = discover(self.root)
        if graph_buckets is not None and cuda_graphs is not False:
            for task, folder in self._bundles.items():  # buckets no request of a bundle can reach: refused now
                with contextlib.suppress(BundleError):  # a broken bundle says so when it is asked for
                    self.graph_buckets.check_length(read_manifest(folder).tokenizer.max_length, f"bundle {task!r}")
        self._resident: collections.OrderedDict[str, Expert] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._failed: dict[str, tuple] = {}  # task -> (bundle signature, error) of its last failed load
        # (task, "loaded" | "reloaded" | "failed") -> count: what the server's /metrics reports as loads
        self.load_events: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def tasks(self) -> list[str]:
        return sorted(self._bundles)

    def refresh(self) -> list[str]:
        """Rescan the root for bundles added since start; return the task names."""
        found = discover(self.root)
        with self._lock:
            self._bundles = found
        return self.tasks

    def manifest(self, task: str) -> Manifest:
        """The task's manifest, read and checked (no hashing; the session load checks the files)."""
        return read_manifest(self._folder(task))

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def provider(self, task: str) -> str:
        """The execution provider the task's session really got (loads it if needed)."""
        return self._expert(task).provider

    def info(self, task: str) -> dict:
        """Provider, precision, IOBinding, model bytes and the bytes it shares with other resident experts
        of the task's session (loads it if needed)."""
        return self._with_sharing(self._expert(task))

    def loaded_info(self, task: str) -> dict | None:
        """``info`` of the task's session if it is resident now, else None (loads nothing)."""
        with self._lock:
            expert = self._resident.get(task)
        return self._with_sharing(expert) if expert is not None else None

    def _with_sharing(self, expert: Expert) -> dict:
        info = expert.info()
        with self._lock:
            others = {t.key for e in self._resident.values() if e is not expert for t in e.shared.values()}
        shared = sum(t.nbytes for t in expert.shared.values() if t.key in others)
        info.update(shared_bytes=shared, own_bytes=max(0, expert.model_bytes - shared))
        return info

    def _folder(self, task: str) -> Path:
        check_task_name(task)
        folder = self._bundles.get(task)
        if folder is None:
            self.refresh()
            folder = self._bundles.get(task)
        if folder is None:
            known = ", ".join(self.tasks) or "none"
            raise UnknownTaskError(f"unknown task {task!r}; known tasks: {known}")
        return folder

    def _session_options(self) -> Any:
        if (
            self.intra_op_threads is None
            and self.inter_op_threads is None
            and self.memory_arena
            and self.allow_spinning
        ):
            return None
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = self.memory_arena
        if not self.allow_spinning:  # idle intra-op threads sleep instead of spinning (several busy sessions)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads if self.inter_op_threads is not None else 1
        return options

    def _expert(self, task: str) -> Expert:
        folder = self._folder(task)
        with self._lock:
            expert = self._resident.get(task)
        reloading = False
        if expert is not None and self.auto_reload and not self._unchanged(expert):
            with self._lock:
                if self._resident.get(task) is expert:
                    del self._resident[task]  # in-flight requests still hold the old expert
                    reloading = True
        with self._lock:
            expert = self._resident.get(task)
            if expert is not None:
                self._resident.move_to_end(task)
                return expert
            load_lock = self._loading.setdefault(task, threading.Lock())
        with load_lock:  # one load per task at a time; others wait for it
            with self._lock:
                expert = self._resident.get(task)
                if expert is not None:
                    return expert
            signature = self._signature(folder)
            failed = self._failed.get(task)
            if failed is not None and signature is not None and failed[0] == signature:
                raise failed[1]  # the same broken bundle: no re-hashing, no second session attempt
            try:
                expert = Expert(
                    folder,
                    self.device,
                    session_options=self._session_options,
                    precision=self.precision,
                    io_binding=self.io_binding,
                    pool=self._pool,
                    cuda_graphs=self.cuda_graphs,
                    graph_buckets=self.graph_buckets,
                )
            except (BundleError, DeviceError, RunError) as exc:
                self.load_events[(task, "failed")] += 1
                if signature is not None:
                    self._failed[task] = (signature, exc)  # until the bundle's files change
                raise
            self._failed.pop(task, None)
            self.load_events[(task, "reloaded" if reloading else "loaded")] += 1
            with self._lock:
                self._resident[task] = expert
                self._resident.move_to_end(task)
                while len(self._resident) > self.max_resident or (
                    self.max_resident_bytes is not None
                    and len(self._resident) > 1
                    and self._resident_bytes() > self.max_resident_bytes
                ):
                    self._resident.popitem(last=False)  # freed once the requests running on it end
            # loading parsed the whole model file into buffers that are free now: without this the heap kept
            # ~14 MiB per unshared MiniLM expert (first expert 128.6 -> 114.6 MiB, measured)
            release_free_memory()
        return expert

    def _resident_bytes(self) -> int:
        """Model bytes of the resident experts, a tensor shared by several of them counted once."""
        own = sum(max(0, e.model_bytes - sum(t.nbytes for t in e.shared.values())) for e in self._resident.values())
        shared = {t.key: t.nbytes for e in self._resident.values() for t in e.shared.values()}
        return own + sum(shared.values())

    @staticmethod
    def _signature(folder: Path) -> tuple | None:
        try:
            return bundle_signature(folder)
        except OSError:
            return None

    @staticmethod
    def _unchanged(expert: Expert) -> bool:
        try:
            return bundle_signature(expert.folder) == expert.signature
        except FileNotFoundError:  # mid-swap (between the two renames): keep serving the loaded session
            return True

    def check(self, task: str, inputs: Sequence[Any]) -> list:
        """``inputs`` as ``predict`` takes them (texts clipped, pairs as tuples), checked against the task's
        bundle (loaded if needed); an InputError names the first item that does not fit."""
        return self._expert(task).check_inputs(inputs)

    def check_resident(self, task: str, inputs: Sequence[Any]) -> list | None:
        """``check`` against the task's resident expert, without looking for a rebuilt bundle (no file access:
        fit for an event loop); None when the task is not resident."""
        with self._lock:
            expert = self._resident.get(task)
        return None if expert is None else expert.check_inputs(inputs)

    def predict(self, task: str, inputs: Sequence[Any], *, stats: dict | None = None) -> list[Prediction]:
        """Labels and probabilities for ``inputs`` (texts, or (text_a, text_b) pairs), in order.

        Items are tokenized once, sorted by length and batched (``batch_size`` items, at most
        ``max_batch_tokens`` padded tokens), so padding stays small; results come back in the
        caller's order. ``stats``, if given, is filled with what the call ran: ``items``,
        ``session_runs``, ``padded_tokens`` (items x longest, summed over the runs) and ``seconds``.
        """
        start = time.perf_counter()
        expert = self._expert(task)
        items = expert.check_inputs(inputs)
        probs = np.empty((len(items), len(expert.labels)), dtype=np.float64)
        batches = length_sorted_batches(
            expert.tokenizer, items, self.batch_size, self.max_batch_tokens, self.sort_by_length
        )
        big, runs, padded = False, 0, 0
        for chunk, ids, mask in batches:
            probs[chunk] = softmax(expert.run(ids, mask).astype(np.float64))
            big = big or ids.size > expert.shrink_above_tokens
            runs, padded = runs + 1, padded + int(ids.size)
        if stats is not None:
            stats.update(items=len(items), session_runs=runs, padded_tokens=padded, seconds=time.perf_counter() - start)
        if big:  # the batches' buffers are free now: give the heap's free pages back (see release_free_memory)
            release_free_memory()
        return [
            Prediction(
                label=expert.labels[int(row.argmax())],
                label_id=int(row.argmax()),
                probabilities={label: float(p) for label, p in zip(expert.labels, row)},
            )
            for row in probs
        ]
