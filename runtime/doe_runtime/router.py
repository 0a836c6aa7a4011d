"""Serve per-task ONNX experts: one onnxruntime session per task, created on first use.

``Router(root)`` finds the bundles under ``root`` (see :mod:`doe_runtime.bundle`), and
``predict(task, inputs)`` tokenizes with the bundle's own ``tokenizer.json``, pads to the longest
item of each batch, runs the task's session and returns labels with probabilities in the
caller's order. At most ``max_resident`` sessions are kept; the least recently used is dropped.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bundle import FileRef, check_task_name, discover, read_manifest, verify_file
from .errors import BundleError, ConfigError, DeviceError, InputError, RunError, UnknownTaskError
from .manifest import Manifest
from .sharing import WeightPool
from .tokenization import configure_tokenizer, encode_batch, length_sorted_batches, plan_batches

DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

__all__ = ["CPU", "CUDA", "DEVICES", "PRECISIONS", "DeviceError", "Expert", "InputError", "Prediction", "Router",
           "UnknownTaskError", "configure_tokenizer", "encode_batch", "length_sorted_batches", "plan_batches"]


@dataclass(frozen=True)
class Prediction:
    label: str
    label_id: int
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "label_id": self.label_id, "probabilities": self.probabilities}


def bundle_signature(folder: Path) -> tuple:
    """What changes when a bundle is rebuilt or its files are touched: (name, mtime_ns, size, inode)
    of every regular file, and the sha256 of ``manifest.json`` itself (small; it names the hashes of
    every other file, so a manifest edited in place with the same size and time, or a copy with
    preserved times, is still seen). Raises OSError while the folder is missing."""
    entries = []
    with os.scandir(folder) as items:
        for item in items:
            if item.is_file(follow_symlinks=False):
                info = item.stat(follow_symlinks=False)
                entries.append((item.name, info.st_mtime_ns, info.st_size, info.st_ino))
    manifest = Path(folder) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return tuple(sorted(entries)) + (digest,)


CHARS_PER_TOKEN_BUDGET = 32
SHRINK_ABOVE_TOKENS = 2048  # padded tokens of a batch above which the memory arena is shrunk after the run


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim``); False where
    there is no glibc. After one request far above the usual size (a 4 MiB body, batches of 256 long
    texts) the freed tokenizer, numpy and onnxruntime buffers otherwise stay resident: measured +31 MiB
    in a Router alone and +86 MiB in the server; with this call the server ended 47 MiB below where it
    started. Also called after loading an expert (the parsed model file's buffers)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # 1 if memory was released, 0 if there was none to release
    return True


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once; None where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without it)
        return None


def clip_text(text: str, max_length: int) -> str:
    """A text cut to ``CHARS_PER_TOKEN_BUDGET * max_length`` characters before tokenizing: the
    tokenizer's work (and the overflow it keeps) no longer grows with the text beyond what the
    model reads. It changes a result only if the first ``max_length`` tokens span more than 32
    characters per token on average (English averages about 4-5)."""
    limit = CHARS_PER_TOKEN_BUDGET * max_length
    return text if len(text) <= limit else text[:limit]


PRECISIONS = ("auto", "fp32", "fp16", "int8")


def choose_precision(requested: str, provider: str, available: dict) -> str:
    """The graph to serve: ``requested`` if not ``"auto"``; on CUDA the fp16 variant, on CPU the int8
    variant, when the bundle has it (a variant is only written when it passed validation) and, where
    the exporter measured its speed (``variant.speed["vs_fp32"]``, ratios per shape), it was faster
    than fp32 at every measured shape; else fp32."""
    if requested != "auto":
        return requested
    preferred = "fp16" if provider == CUDA else "int8"
    variant = available.get(preferred)
    if variant is None:
        return "fp32"
    ratios = getattr(variant, "speed", {}).get("vs_fp32", {}) if provider != CUDA else {}
    if isinstance(ratios, dict) and ratios and not all(isinstance(r, (int, float)) and r > 1.0 for r in ratios.values()):
        return "fp32"  # measured slower on the build machine
    return preferred


class Expert:
    """One loaded bundle: tokenizer + onnxruntime session + manifest.

    ``precision``: ``"fp32"`` (the main graph), ``"fp16"`` / ``"int8"`` (the bundle's variant of that
    precision; error if it has none) or ``"auto"`` (:func:`choose_precision`: fp16 on CUDA, int8 on
    CPU, when the bundle has them, else fp32).
    ``io_binding``: ``"auto"`` (on CUDA), ``True`` or ``False``: with it, each call binds the inputs
    once and lets onnxruntime allocate the output on the session's device.
    """

    def __init__(self, folder: Path, device: str, session_options: Any = None, precision: str = "auto",
                 io_binding: bool | str = "auto", pool: "WeightPool | None" = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.folder = folder
        self.pool = pool
        self.shared: dict = {}  # initializer name -> SharedTensor held for this expert's session
        self.signature = bundle_signature(folder)  # taken before reading: a change during the load shows next time
        self.manifest: Manifest = read_manifest(folder)
        tok_spec = self.manifest.tokenizer
        tokenizer_path = verify_file(folder, tok_spec, "tokenizer.file")
        self.task = self.manifest.task.name
        self.labels = list(self.manifest.task.labels)
        self.pair = self.manifest.task.pair
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(f"{tokenizer_path}: cannot be read as a tokenizers file ({exc})") from exc
        self.tokenizer = configure_tokenizer(tokenizer, tok_spec.max_length, tok_spec.pad_id, tok_spec.pad_token)

        available = ort.get_available_providers()
        if device == "cpu":
            providers = [CPU]
        elif CUDA in available:
            providers = [CUDA, CPU]
        elif device == "cuda":
            raise DeviceError(
                f"task {self.task!r}: device='cuda' demanded but this onnxruntime has no CUDA provider "
                f"(available: {available}); install doe-runtime[gpu] instead of [cpu], or use device='auto'"
            )
        else:
            providers = [CPU]
        variants = self.manifest.onnx.variants
        if precision not in ("auto", self.manifest.onnx.precision) and precision not in variants:
            have = [self.manifest.onnx.precision] + sorted(variants)
            raise BundleError(f"{folder}: precision={precision!r} asked for but the bundle has no {precision} "
                              f"variant (it has: {', '.join(have)}); rebuild it with `doe build` (fp16 and int8 "
                              "variants are written when they pass validation), or use precision='auto'")
        # the provider decides "auto", and the provider is only known once a session exists
        chosen = choose_precision(precision, CUDA if providers[0] == CUDA else CPU, variants)
        self.session = self._session(ort, chosen, providers, session_options)
        self.provider = self.session.get_providers()[0]
        if precision == "auto" and choose_precision("auto", self.provider, variants) != chosen:
            chosen = choose_precision("auto", self.provider, variants)  # CUDA was listed but not granted
            self.session = self._session(ort, chosen, providers, session_options)
            self.provider = self.session.get_providers()[0]
        self.precision = chosen
        if device == "cuda" and self.provider != CUDA:
            raise DeviceError(
                f"task {self.task!r}: device='cuda' demanded but the session got {self.session.get_providers()} "
                "(CUDA libraries missing or no GPU visible); use device='auto' to fall back to CPU"
            )
        self.io_binding = (self.provider == CUDA) if io_binding == "auto" else bool(io_binding)
        # A batch far above the usual size grows onnxruntime's memory arena to its peak, and the arena never
        # gives memory back: after such a batch the arena returns what it does not use (measured: a 4 MiB
        # request of 256 long texts left +103 MiB resident without this).
        self.shrink_above_tokens = SHRINK_ABOVE_TOKENS
        self._shrink_options = None
        # the CPU arena can only be shrunk where there is one (Router(memory_arena=False) has none)
        if self.provider == CUDA or self.session.get_session_options().enable_cpu_mem_arena:
            self._shrink_options = ort.RunOptions()
            self._shrink_options.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                                      "gpu:0" if self.provider == CUDA else "cpu:0")
        self._device_type = "cuda" if self.provider == CUDA else "cpu"
        self._check_io()
        self.run(np.asarray([[1, 2]], dtype=np.int64), np.ones((1, 2), dtype=np.int64))  # warm-up at load

    def _session(self, ort, precision: str, providers: list[str], options: Any):
        main = self.manifest.onnx
        ref: FileRef = main if precision == main.precision else main.variants[precision]
        field = "onnx.file" if ref is main else f"onnx.variants.{precision}.file"
        path = verify_file(self.folder, ref, field)
        self.model_bytes = path.stat().st_size
        options = options() if callable(options) else options  # a fresh SessionOptions per session
        self.shared = {}
        if self.pool is not None and ref.initializers:
            # experts of different base models never share: the pool key includes the base weights' hash
            base = self.manifest.base_model.get("sha256") or f"unhashed base of {self.folder}"
            self.shared = self.pool.acquire(path, str(base), list(ref.initializers))
            options = options or ort.SessionOptions()
            for name, tensor in self.shared.items():
                options.add_initializer(name, tensor.value)
        disabled = main.session_settings(providers[0]).get("disabled_optimizers") or []
        try:
            if disabled:  # the optimizers the exporter measured to slow this graph down (manifest onnx.session)
                return ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                            disabled_optimizers=list(disabled))
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{path}: onnxruntime cannot load this model ({exc}); re-export the bundle") from exc

    def _check_io(self) -> None:
        spec = self.manifest.onnx
        want_in, want_out = spec.input_names, spec.output_names
        got_in = [item.name for item in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        got_out = [item.name for item in outputs]
        if got_in != want_in or got_out != want_out:
            raise BundleError(
                f"{self.folder}: model inputs/outputs {got_in} -> {got_out} do not match the manifest's "
                f"{want_in} -> {want_out}; re-export the bundle"
            )
        width = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(width, int) and width != len(self.labels):
            raise BundleError(
                f"{self.folder}: the model's {want_out[0]!r} has {width} columns but task.labels in the manifest "
                f"names {len(self.labels)} labels ({list(self.labels)}); the manifest does not belong to this "
                "model. Re-export the bundle"
            )
        self.input_names = got_in
        self.output_name = want_out[0]

    def check_inputs(self, inputs: Sequence[Any]) -> list:
        """The items as the tokenizer takes them (texts or (text_a, text_b) tuples), each text clipped
        to the character budget of the bundle's max length; an InputError names the first bad item."""
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            raise InputError(
                f"task {self.task!r}: inputs must be a list of "
                f"{'(text_a, text_b) pairs' if self.pair else 'strings'}, got {type(inputs).__name__}; "
                "wrap a single input in a list"
            )
        items = []
        limit = self.manifest.tokenizer.max_length
        for index, item in enumerate(inputs):
            if self.pair:
                if (
                    not isinstance(item, (tuple, list))
                    or len(item) != 2
                    or not all(isinstance(part, str) for part in item)
                ):
                    raise InputError(
                        f"task {self.task!r} takes text pairs: inputs[{index}] must be a (str, str) pair, "
                        f"got {_describe(item)}"
                    )
                items.append((self._text(item[0], index, limit), self._text(item[1], index, limit)))
            else:
                if not isinstance(item, str):
                    hint = " (this task takes single texts, not pairs)" if isinstance(item, (tuple, list)) else ""
                    raise InputError(
                        f"task {self.task!r} takes single texts: inputs[{index}] must be str, "
                        f"got {_describe(item)}{hint}"
                    )
                items.append(self._text(item, index, limit))
        return items

    def _text(self, text: str, index: int, max_length: int) -> str:
        text = clip_text(text, max_length)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (valid JSON "\ud800", or a non-UTF-8 argv)
            raise InputError(
                f"task {self.task!r}: inputs[{index}] is not valid Unicode text: {exc.reason} at character "
                f"{exc.start} ({text[exc.start:exc.end]!r}); send UTF-8 text (a lone surrogate is not a character)"
            ) from None
        return text

    def encode(self, items: list) -> dict[str, np.ndarray]:
        ids, mask = encode_batch(self.tokenizer, items)
        feeds = {"input_ids": ids, "attention_mask": mask}
        return {name: feeds[name] for name in self.input_names}

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One session call on an already padded batch; returns logits [B, K] (float32)."""
        try:
            return self._run(ids, mask)
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            raise RunError(f"task {self.task!r}: onnxruntime failed on a batch of shape {list(ids.shape)} "
                           f"({type(exc).__name__}: {str(exc)[:300]}); the bundle's graph may be broken: re-export "
                           "it") from exc

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask}
        options = self._shrink_options if ids.size > self.shrink_above_tokens else None
        if not self.io_binding:
            return self.session.run([self.output_name], {name: feeds[name] for name in self.input_names},
                                    run_options=options)[0]
        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))  # copied to the device once
        binding.bind_output(self.output_name, self._device_type)  # allocated by onnxruntime on the device
        self.session.run_with_iobinding(binding, run_options=options)
        return binding.copy_outputs_to_cpu()[0]

    def info(self) -> dict:
        options = self.session.get_session_options()
        return {"task": self.task, "provider": self.provider, "precision": self.precision,
                "io_binding": self.io_binding, "model_bytes": self.model_bytes,
                "pooled_bytes": sum(tensor.nbytes for tensor in self.shared.values()),
                "intra_op_threads": options.intra_op_num_threads, "inter_op_threads": options.inter_op_num_threads}


def _describe(item: Any) -> str:
    text = repr(item)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(item).__name__} {text}"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


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
    """

    def __init__(
        self,
        root: str | Path,
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
    ):
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
        self._resident: collections.OrderedDict[str, Expert] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._failed: dict[str, tuple] = {}  # task -> (bundle signature, error) of its last failed load

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
        if self.intra_op_threads is None and self.inter_op_threads is None and self.memory_arena \
                and self.allow_spinning:
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
        if expert is not None and self.auto_reload and not self._unchanged(expert):
            with self._lock:
                if self._resident.get(task) is expert:
                    del self._resident[task]  # in-flight requests still hold the old expert
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
                expert = Expert(folder, self.device, self._session_options, self.precision, self.io_binding,
                                self._pool)
            except (BundleError, DeviceError, RunError) as exc:
                if signature is not None:
                    self._failed[task] = (signature, exc)  # until the bundle's files change
                raise
            self._failed.pop(task, None)
            with self._lock:
                self._resident[task] = expert
                self._resident.move_to_end(task)
                while len(self._resident) > self.max_resident or (
                    self.max_resident_bytes is not None and len(self._resident) > 1
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

    def predict(self, task: str, inputs: Sequence[Any]) -> list[Prediction]:
        """Labels and probabilities for ``inputs`` (texts, or (text_a, text_b) pairs), in order.

        Items are tokenized once, sorted by length and batched (``batch_size`` items, at most
        ``max_batch_tokens`` padded tokens), so padding stays small; results come back in the
        caller's order.
        """
        expert = self._expert(task)
        items = expert.check_inputs(inputs)
        probs = np.empty((len(items), len(expert.labels)), dtype=np.float64)
        batches = length_sorted_batches(expert.tokenizer, items, self.batch_size, self.max_batch_tokens,
                                        self.sort_by_length)
        big = False
        for chunk, ids, mask in batches:
            probs[chunk] = softmax(expert.run(ids, mask).astype(np.float64))
            big = big or ids.size > expert.shrink_above_tokens
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
