"""One loaded bundle: its tokenizer, its onnxruntime session (provider and precision chosen and checked)
and its manifest; what the Router keeps per resident task."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import read_manifest, verify_file
from .cuda_graphs import NO_GRAPH, Buckets, GraphRunner
from .errors import BundleError, ConfigError, DeviceError, InputError, RunError
from .manifest import Manifest
from .sharing import WeightPool
from .tokenization import configure_tokenizer, encode_batch

DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
log = logging.getLogger("doe_runtime.expert")


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
    if (
        isinstance(ratios, dict)
        and ratios
        and not all(isinstance(r, (int, float)) and r > 1.0 for r in ratios.values())
    ):
        return "fp32"  # measured slower on the build machine
    return preferred


class Expert:
    """One loaded bundle: tokenizer + onnxruntime session + manifest.

    ``precision``: ``"fp32"`` (the main graph), ``"fp16"`` / ``"int8"`` (the bundle's variant of that
    precision; error if it has none) or ``"auto"`` (:func:`choose_precision`: fp16 on CUDA, int8 on
    CPU, when the bundle has them, else fp32).
    ``io_binding``: ``"auto"`` (on CUDA), ``True`` or ``False``: with it, each call binds the inputs
    once and lets onnxruntime allocate the output on the session's device.
    ``cuda_graphs``: ``"auto"`` (on CUDA), ``True`` (error unless the session runs on CUDA) or ``False``:
    batches that fit one of ``graph_buckets`` replay a captured CUDA graph (:mod:`doe_runtime.cuda_graphs`).
    """

    def __init__(
        self,
        folder: Path,
        device: str,
        *,
        session_options: Any = None,
        precision: str = "auto",
        io_binding: bool | str = "auto",
        pool: WeightPool | None = None,
        cuda_graphs: bool | str = "auto",
        graph_buckets: Buckets | None = None,
    ):
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

        if cuda_graphs is True and device == "cpu":
            raise ConfigError(
                "cuda_graphs=True asked for with device='cpu': CUDA graphs need a CUDA session; use "
                "device='cuda' (or 'auto' on a GPU machine), or cuda_graphs=False"
            )
        providers = self._providers(ort, device, graphs=cuda_graphs is not False)
        variants = self.manifest.onnx.variants
        if precision not in ("auto", self.manifest.onnx.precision) and precision not in variants:
            have = [self.manifest.onnx.precision] + sorted(variants)
            raise BundleError(
                f"{folder}: precision={precision!r} asked for but the bundle has no {precision} "
                f"variant (it has: {', '.join(have)}); rebuild it with `doe build` (fp16 and int8 "
                "variants are written when they pass validation), or use precision='auto'"
            )
        # the provider decides "auto", and the provider is only known once a session exists
        chosen = choose_precision(precision, CUDA if providers[0] == CUDA else CPU, variants)
        self.graphs_off = ""  # why this session runs without CUDA graphs ("": it does not)
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
        self._shrink_options = self._arena_shrinkage(ort)
        self._device_type = "cuda" if self.provider == CUDA else "cpu"
        self._check_io()
        self._plain_options = None  # run options of a normal run (CUDA graphs: one that neither captures nor replays)
        if self.provider != CUDA:
            self.graphs_off = f"the session runs on {self.provider}"
        self.graphs = self._graph_runner(cuda_graphs, graph_buckets or Buckets())
        self.run(np.asarray([[1, 2]], dtype=np.int64), np.ones((1, 2), dtype=np.int64))  # warm-up at load

    def _arena_shrinkage(self, ort) -> Any:
        """Run options that shrink the memory arena after a run, or None where there is no arena.

        A batch far above the usual size grows onnxruntime's memory arena to its peak, and the arena never
        gives memory back: after such a batch the arena returns what it does not use (measured: a 4 MiB
        request of 256 long texts left +103 MiB resident without this). The CPU arena can only be shrunk
        where there is one (Router(memory_arena=False) has none)."""
        self.shrink_above_tokens = SHRINK_ABOVE_TOKENS
        if self.provider != CUDA and not self.session.get_session_options().enable_cpu_mem_arena:
            return None
        options = ort.RunOptions()
        options.add_run_config_entry(
            "memory.enable_memory_arena_shrinkage", "gpu:0" if self.provider == CUDA else "cpu:0"
        )
        return options

    def _graph_runner(self, cuda_graphs: bool | str, buckets: Buckets) -> GraphRunner | None:
        """The captured-graph runner of a CUDA session (None on CPU, or when asked for none)."""
        if cuda_graphs is False or self.provider != CUDA or self.graphs_off:
            if cuda_graphs is True:
                raise ConfigError(
                    f"task {self.task!r}: cuda_graphs=True asked for but {self.graphs_off or 'it is off'}; "
                    "use cuda_graphs='auto' (on where the session gets CUDA) or False"
                )
            return None
        buckets.check_length(self.manifest.tokenizer.max_length, f"task {self.task!r}")
        runner = GraphRunner(
            self.session,
            input_names=self.input_names,
            output_name=self.output_name,
            num_labels=len(self.labels),
            buckets=buckets,
            pad_id=self.manifest.tokenizer.pad_id,
        )
        # a normal run on a session with CUDA graphs enabled must say so, or onnxruntime captures graph 0
        self._plain_options = runner.plain_options
        if self._shrink_options is not None:
            self._shrink_options.add_run_config_entry("gpu_graph_id", NO_GRAPH)
        return runner

    def _providers(self, ort, device: str, *, graphs: bool) -> list:
        """The providers to ask for: CUDA first where this onnxruntime has it (unless device='cpu'), with
        CUDA graph capture enabled when ``graphs``."""
        available = ort.get_available_providers()
        if device == "cpu":
            return [CPU]
        if CUDA in available:
            return [(CUDA, {"enable_cuda_graph": "1"}) if graphs else CUDA, CPU]
        if device == "cuda":
            raise DeviceError(
                f"task {self.task!r}: device='cuda' demanded but this onnxruntime has no CUDA provider "
                f"(available: {available}); install doe-runtime[gpu] instead of [cpu], or use device='auto'"
            )
        return [CPU]

    def _session(self, ort, precision: str, providers: list[str], options: Any):
        main = self.manifest.onnx
        ref: Any = main if precision == main.precision else main.variants[precision]  # OnnxSpec or VariantSpec
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
        first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        disabled = main.session_settings(first).get("disabled_optimizers") or []
        # the optimizers the exporter measured to slow this graph down (manifest onnx.session)
        extra = {"disabled_optimizers": list(disabled)} if disabled else {}
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=providers, **extra)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            if isinstance(providers[0], tuple):  # CUDA graphs refused (e.g. a node left on CPU): without them
                self.graphs_off = f"onnxruntime refused CUDA graphs for this graph ({str(exc)[:200]})"
                log.warning("task %s: %s; serving without CUDA graphs", self.task, self.graphs_off)
                return self._session(ort, precision, [CUDA, *providers[1:]], options)
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
        items: list[Any] = []
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
                f"{exc.start} ({text[exc.start : exc.end]!r}); send UTF-8 text (a lone surrogate is not a character)"
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
            raise RunError(
                f"task {self.task!r}: onnxruntime failed on a batch of shape {list(ids.shape)} "
                f"({type(exc).__name__}: {str(exc)[:300]}); the bundle's graph may be broken: re-export "
                "it"
            ) from exc

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.graphs is not None:
            captured = self.graphs.run(ids, mask)
            if captured is not None:
                return captured
        feeds = {"input_ids": ids, "attention_mask": mask}
        options = self._shrink_options if ids.size > self.shrink_above_tokens else self._plain_options
        if not self.io_binding:
            return self.session.run(
                [self.output_name], {name: feeds[name] for name in self.input_names}, run_options=options
            )[0]
        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))  # copied to the device once
        binding.bind_output(self.output_name, self._device_type)  # allocated by onnxruntime on the device
        self.session.run_with_iobinding(binding, run_options=options)
        return binding.copy_outputs_to_cpu()[0]

    def info(self) -> dict:
        options = self.session.get_session_options()
        return {
            "task": self.task,
            "provider": self.provider,
            "precision": self.precision,
            "io_binding": self.io_binding,
            "model_bytes": self.model_bytes,
            "pooled_bytes": sum(tensor.nbytes for tensor in self.shared.values()),
            "intra_op_threads": options.intra_op_num_threads,
            "inter_op_threads": options.inter_op_num_threads,
            "cuda_graphs": self.graphs.info() if self.graphs is not None else {"off": self.graphs_off or "asked off"},
        }


def _describe(item: Any) -> str:
    text = repr(item)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(item).__name__} {text}"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


__all__ = [
    "CHARS_PER_TOKEN_BUDGET",
    "CPU",
    "CUDA",
    "DEVICES",
    "PRECISIONS",
    "Expert",
    "bundle_signature",
    "choose_precision",
    "clip_text",
    "release_free_memory",
    "softmax",
]
