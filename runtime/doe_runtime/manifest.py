"""The typed bundle manifest: what ``manifest.json`` holds, read into frozen dataclasses.

``Manifest.from_json(data, where)`` checks every field the runtime relies on and raises
:class:`~doe_runtime.errors.BundleError` naming ``where`` and the field (``task.labels``,
``onnx.variants.int8.sha256`` ...) with what was found. ``to_json()`` gives back the whole
document as read, including the sections the runtime only reports (quality, data, versions ...).
``summary()`` is the one client-facing digest the CLI and the HTTP server both print: it holds no
local paths.

The field list and the MUST/MAY rules of the format are in :mod:`doe_runtime.bundle`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import BundleError

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
INPUT_KINDS = ("single", "pair")
TASK_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
MAX_TASK_NAME = 128


def _get(mapping: Any, key: str, kind: type | tuple[type, ...], where: str, path: str, *, default: Any = ...) -> Any:
    """``mapping[key]`` checked to be of ``kind``; ``path`` names the field in messages."""
    if not isinstance(mapping, dict):
        raise BundleError(
            f"{where}: {path.rpartition('.')[0] or 'manifest'} must be a JSON object, found {type(mapping).__name__}"
        )
    if key not in mapping:
        if default is not ...:
            return default
        raise BundleError(f"{where}: missing field {path!r}; re-export the bundle with `doe build`")
    value = mapping[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise BundleError(f"{where}: field {path!r} must be a number, found bool {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise BundleError(f"{where}: field {path!r} must be {names}, found {type(value).__name__}: {shown}")
    return value


def _sha256(mapping: Any, where: str, path: str) -> str:
    value = _get(mapping, "sha256", str, where, f"{path}.sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise BundleError(f"{where}: field {path}.sha256 must be 64 lower-case hex digits, found {value[:80]!r}")
    return value


@dataclass(frozen=True)
class FileRef:
    """A file of the bundle: a path relative to the bundle folder and its sha256."""

    file: str
    sha256: str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple = ()


@dataclass(frozen=True)
class Variant(FileRef):
    """Another graph of the same expert (``fp16``, ``int8`` ...) with the main graph's inputs and outputs."""

    precision: str = ""
    validation: dict = field(default_factory=dict)  # how it was checked against the PyTorch expert
    quality: dict = field(default_factory=dict)  # its metric on the reporting split, when measured
    speed: dict = field(default_factory=dict)  # its latency measured on the build machine, when measured
    initializers: tuple = ()  # large initializers: {name, sha256, bytes, dtype, shape} (weight sharing)


@dataclass(frozen=True)
class OnnxSpec(FileRef):
    opset: int | None = None
    precision: str = "fp32"
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    variants: dict = field(default_factory=dict)  # precision -> Variant
    rewrites: dict = field(default_factory=dict)
    initializers: tuple = ()  # large initializers: {name, sha256, bytes, dtype, shape} (weight sharing)
    # onnxruntime session settings per execution provider, e.g. {"CPUExecutionProvider":
    # {"disabled_optimizers": ["SkipLayerNormFusion"]}}: what the exporter measured and validated
    session: dict = field(default_factory=dict)

    def session_settings(self, provider: str) -> dict:
        """The settings recorded for sessions on ``provider`` (empty when none)."""
        settings = self.session.get(provider, {})
        return settings if isinstance(settings, dict) else {}

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]


@dataclass(frozen=True)
class TokenizerSpec(FileRef):
    max_length: int = 128
    pad_id: int = 0
    pad_token: str = "[PAD]"
    truncation: str = "longest_first"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    input: str  # "single" | "pair"
    labels: tuple[str, ...]
    metric: str | None = None

    @property
    def pair(self) -> bool:
        return self.input == "pair"


def check_task_name(name: object) -> str:
    """Return ``name`` if it can name a bundle, else raise ``TaskNameError`` saying why."""
    from .errors import TaskNameError

    if not isinstance(name, str):
        raise TaskNameError(f"task name must be a string, got {type(name).__name__}")
    if len(name) > MAX_TASK_NAME:
        raise TaskNameError(
            f"invalid task name {name[:40]!r}... ({len(name)} characters): task names have at most "
            f"{MAX_TASK_NAME} characters"
        )
    if not TASK_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise TaskNameError(
            f"invalid task name {name!r}: task names must match [a-z0-9][a-z0-9._-]* "
            "(lower-case letters, digits, '.', '_' and '-', starting with a letter or digit)"
        )
    return name


def _tensors(specs: Any, where: str, path: str) -> tuple[TensorSpec, ...]:
    if not isinstance(specs, list) or not specs:
        raise BundleError(f"{where}: field {path!r} must be a non-empty list, found {specs!r}"[:300])
    out = []
    for index, spec in enumerate(specs):
        here = f"{path}[{index}]"
        shape = _get(spec, "shape", list, where, f"{here}.shape", default=[])
        out.append(
            TensorSpec(
                _get(spec, "name", str, where, f"{here}.name"),
                _get(spec, "dtype", str, where, f"{here}.dtype"),
                tuple(shape),
            )
        )
    return tuple(out)


def _initializers(spec: Any, where: str, path: str) -> tuple:
    entries = _get(spec, "initializers", list, where, f"{path}.initializers", default=[])
    out = []
    for index, entry in enumerate(entries):
        here = f"{path}.initializers[{index}]"
        name = _get(entry, "name", str, where, f"{here}.name")
        nbytes = _get(entry, "bytes", int, where, f"{here}.bytes")
        out.append(
            {
                "name": name,
                "sha256": _sha256(entry, where, here),
                "bytes": nbytes,
                "dtype": _get(entry, "dtype", str, where, f"{here}.dtype", default=""),
                "consumers": tuple(_get(entry, "consumers", list, where, f"{here}.consumers", default=[])),
            }
        )
    return tuple(out)


def _variant(precision: str, spec: Any, where: str) -> Variant:
    path = f"onnx.variants.{precision}"
    return Variant(
        file=_get(spec, "file", str, where, f"{path}.file"),
        sha256=_sha256(spec, where, path),
        precision=_get(spec, "precision", str, where, f"{path}.precision", default=precision),
        validation=_get(spec, "validation", dict, where, f"{path}.validation", default={}),
        quality=_get(spec, "quality", dict, where, f"{path}.quality", default={}),
        speed=_get(spec, "speed", dict, where, f"{path}.speed", default={}),
        initializers=_initializers(spec, where, path),
    )


def _task(data: dict, where: str) -> TaskSpec:
    task = _get(data, "task", dict, where, "task")
    name = _get(task, "name", str, where, "task.name")
    try:
        check_task_name(name)
    except ValueError as exc:
        raise BundleError(f"{where}: task.name: {exc}") from None
    kind = _get(task, "input", str, where, "task.input")
    if kind not in INPUT_KINDS:
        raise BundleError(f"{where}: field 'task.input' must be one of {list(INPUT_KINDS)}, found {kind!r}")
    labels = _get(task, "labels", list, where, "task.labels")
    if not labels or not all(isinstance(label, str) for label in labels):
        raise BundleError(f"{where}: field 'task.labels' must be a non-empty list of strings, found {labels!r}"[:300])
    if len(set(labels)) != len(labels):
        raise BundleError(f"{where}: field 'task.labels' has duplicates: {labels!r}"[:300])
    metric = _get(task, "metric", (str, type(None)), where, "task.metric", default=None)

    return TaskSpec(name, kind, tuple(labels), metric)


def _onnx(data: dict, where: str) -> OnnxSpec:
    onnx = _get(data, "onnx", dict, where, "onnx")
    variants = _get(onnx, "variants", dict, where, "onnx.variants", default={})
    outputs = _tensors(_get(onnx, "outputs", list, where, "onnx.outputs"), where, "onnx.outputs")
    return OnnxSpec(
        file=_get(onnx, "file", str, where, "onnx.file"),
        sha256=_sha256(onnx, where, "onnx"),
        opset=_get(onnx, "opset", (int, type(None)), where, "onnx.opset", default=None),
        precision=_get(onnx, "precision", str, where, "onnx.precision", default="fp32"),
        inputs=_tensors(_get(onnx, "inputs", list, where, "onnx.inputs"), where, "onnx.inputs"),
        outputs=outputs,
        variants={str(p): _variant(str(p), spec, where) for p, spec in variants.items()},
        rewrites=_get(onnx, "rewrites", dict, where, "onnx.rewrites", default={}),
        session=_get(onnx, "session", dict, where, "onnx.session", default={}),
        initializers=_initializers(onnx, where, "onnx"),
    )


def _tokenizer(data: dict, where: str) -> TokenizerSpec:
    tok = _get(data, "tokenizer", dict, where, "tokenizer")
    max_length = _get(tok, "max_length", int, where, "tokenizer.max_length")
    if max_length < 2:
        raise BundleError(f"{where}: field 'tokenizer.max_length' must be >= 2, found {max_length}")
    pad_id = _get(tok, "pad_id", int, where, "tokenizer.pad_id")
    if pad_id < 0:
        raise BundleError(f"{where}: field 'tokenizer.pad_id' must be >= 0, found {pad_id}")
    return TokenizerSpec(
        file=_get(tok, "file", str, where, "tokenizer.file"),
        sha256=_sha256(tok, where, "tokenizer"),
        max_length=max_length,
        pad_id=pad_id,
        pad_token=_get(tok, "pad_token", str, where, "tokenizer.pad_token", default="[PAD]"),
        truncation=_get(tok, "truncation", str, where, "tokenizer.truncation", default="longest_first"),
    )


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    task: TaskSpec
    onnx: OnnxSpec
    tokenizer: TokenizerSpec
    base_model: dict = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)
    adaptation: dict = field(default_factory=dict)
    pruning: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the document as read

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest") -> Manifest:
        """Check and type a manifest document; raise BundleError naming ``where`` and the field."""
        if not isinstance(data, dict):
            raise BundleError(f"{where}: a manifest must be a JSON object, found {type(data).__name__}")
        version = data.get("schema_version")
        if isinstance(version, bool) or version not in KNOWN_SCHEMA_VERSIONS:
            raise BundleError(
                f"{where}: unknown schema_version {version!r}; this doe-runtime reads schema versions "
                f"{list(KNOWN_SCHEMA_VERSIONS)}. Upgrade doe-runtime or re-export the bundle."
            )
        task_spec = _task(data, where)
        onnx_spec = _onnx(data, where)
        tok_spec = _tokenizer(data, where)
        sections = {
            key: _get(data, key, dict, where, key, default={})
            for key in (
                "base_model",
                "architecture",
                "adaptation",
                "pruning",
                "validation",
                "quality",
                "data",
                "versions",
            )
        }
        created = _get(data, "created", (str, type(None)), where, "created", default=None)
        return cls(
            version,
            task_spec,
            onnx_spec,
            tok_spec,
            created=created,
            raw=data,
            **sections,
        )

    def to_json(self) -> dict:
        """The whole manifest document (as read, or as written by the exporter)."""
        return self.raw

    @property
    def extra_positions(self) -> int:
        """Positions the graph adds to every call beside the text's tokens (a soft prompt)."""
        value = self.adaptation.get("prompt_length", 0)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0

    def summary(self, provider: str | None = None, precision: str | None = None) -> dict:
        """What a client needs to know about the expert; never a local path."""
        arch, pruning = self.architecture, self.pruning
        return {
            "task": self.task.name,
            "input": self.task.input,
            "labels": list(self.task.labels),
            "metric": self.task.metric,
            "base_model": self.base_model.get("name"),
            "architecture": {k: arch[k] for k in ("family", "num_layers", "ffn_widths", "num_heads") if k in arch},
            "adaptation": {"mode": self.adaptation.get("mode"), "extra_positions": self.extra_positions},
            "pruning": {
                k: pruning[k]
                for k in ("method", "rate", "head_rate", "layer_types", "budget", "params_before", "params_after")
                if k in pruning
            },
            "precisions": [self.onnx.precision] + sorted(self.onnx.variants),
            "variants": {p: {"quality": v.quality, "speed": v.speed} for p, v in sorted(self.onnx.variants.items())},
            "max_length": self.tokenizer.max_length,
            "shareable_bytes": {
                p: sum(e["bytes"] for e in v.initializers)
                for p, v in [(self.onnx.precision, self.onnx), *sorted(self.onnx.variants.items())]
            },
            "quality": self.quality,
            "validation": {
                k: self.validation[k] for k in ("max_abs_diff", "label_agreement", "shapes") if k in self.validation
            },
            "created": self.created,
            "provider": provider,
            "serving_precision": precision,
        }
