"""The bundle format: the one contract between ``doe_export`` (writer) and ``doe_runtime`` (reader).

A bundle is one folder per task expert::

    <root>/<task>/model.onnx       ONNX graph: token ids + attention mask -> logits
    <root>/<task>/tokenizer.json   fast-tokenizer file (read with ``tokenizers``)
    <root>/<task>/manifest.json    written last; a folder without it is not a bundle

Rules (MUST unless said otherwise):

- ``manifest.json`` carries ``schema_version``; a reader MUST refuse a version it does not know.
- Task names match ``[a-z0-9][a-z0-9._-]*`` and equal the folder name.
- Every path in a manifest is relative and MUST stay inside the bundle folder.
- The reader MUST check the sha256 of ``model.onnx`` and ``tokenizer.json`` before use.
- Folders whose names start with ``.`` are work areas of a writer and MUST be ignored by readers.
- ``onnx.variants`` MAY map a precision (e.g. ``fp16``) to another graph of the same model with
  the same inputs and outputs (``file``, ``sha256``, ``precision``, ``validation``); a reader
  that uses a variant MUST check its sha256 like the main graph's.

This module uses the standard library only, so both sides can import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"
TASK_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
INPUT_KINDS = ("single", "pair")


class BundleError(ValueError):
    """A bundle on disk is missing, malformed, tampered with or of an unknown version."""


def check_task_name(name: object) -> str:
    """Return ``name`` if it is a valid task name, else raise ``ValueError`` saying why."""
    if not isinstance(name, str):
        raise ValueError(f"task name must be a string, got {type(name).__name__}: {name!r}")
    if not TASK_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"invalid task name {name!r}: task names must match [a-z0-9][a-z0-9._-]* "
            "(lower-case letters, digits, '.', '_' and '-', starting with a letter or digit)"
        )
    return name


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def resolve_inside(folder: Path, relative: object, what: str) -> Path:
    """Resolve a manifest path and refuse any that leaves ``folder``."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"{folder / MANIFEST_FILE}: {what} must be a non-empty relative path, got {relative!r}")
    if os.path.isabs(relative):
        raise BundleError(
            f"{folder / MANIFEST_FILE}: {what} {relative!r} is absolute; bundle paths must be relative "
            "to the bundle folder"
        )
    base = folder.resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise BundleError(
            f"{folder / MANIFEST_FILE}: {what} {relative!r} leaves the bundle folder {base}; "
            "bundle paths must stay inside it"
        )
    return target


def _require(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise BundleError(f"{where}: missing field {key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"{where}: field {key!r} must be {names}, found {type(value).__name__}: {value!r}")
    return value


def validate_manifest(manifest: Any, where: str) -> dict:
    """Check the fields the runtime relies on; raise ``BundleError`` naming ``where`` and the field."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest must be a JSON object, found {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise BundleError(
            f"{where}: unknown schema_version {version!r}; this doe-runtime reads schema versions "
            f"{list(KNOWN_SCHEMA_VERSIONS)}. Upgrade doe-runtime or re-export the bundle."
        )
    task = _require(manifest, "task", dict, where)
    try:
        check_task_name(_require(task, "name", str, where + " task"))
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from None
    kind = _require(task, "input", str, where + " task")
    if kind not in INPUT_KINDS:
        raise BundleError(f"{where}: task.input must be one of {list(INPUT_KINDS)}, found {kind!r}")
    labels = _require(task, "labels", list, where + " task")
    if not labels or not all(isinstance(label, str) for label in labels):
        raise BundleError(f"{where}: task.labels must be a non-empty list of strings, found {labels!r}")
    onnx_spec = _require(manifest, "onnx", dict, where)
    _require(onnx_spec, "file", str, where + " onnx")
    _require(onnx_spec, "sha256", str, where + " onnx")
    for key in ("inputs", "outputs"):
        specs = _require(onnx_spec, key, list, where + " onnx")
        for spec in specs:
            _require(spec, "name", str, f"{where} onnx.{key}")
            _require(spec, "dtype", str, f"{where} onnx.{key}")
    tok = _require(manifest, "tokenizer", dict, where)
    _require(tok, "file", str, where + " tokenizer")
    _require(tok, "sha256", str, where + " tokenizer")
    max_length = _require(tok, "max_length", int, where + " tokenizer")
    if max_length < 2:
        raise BundleError(f"{where}: tokenizer.max_length must be >= 2, found {max_length}")
    _require(tok, "pad_id", int, where + " tokenizer")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """Read and validate ``<folder>/manifest.json`` (no hashing; see :func:`verify_files`)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{folder}: no {MANIFEST_FILE}; not a bundle (an export that did not finish leaves no manifest)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); re-export the bundle") from None
    validate_manifest(manifest, str(path))
    name = manifest["task"]["name"]
    if name != folder.name:
        raise BundleError(
            f"{path}: task name {name!r} does not match the folder name {folder.name!r}; "
            "rename the folder to the task name"
        )
    for section in ("onnx", "tokenizer"):
        resolve_inside(folder, manifest[section]["file"], f"{section}.file")
    variants = manifest["onnx"].get("variants", {})
    if not isinstance(variants, dict):
        raise BundleError(f"{path}: onnx.variants must be an object, found {type(variants).__name__}")
    for precision, spec in variants.items():
        where = f"{path} onnx.variants.{precision}"
        _require(spec, "sha256", str, where)
        resolve_inside(folder, _require(spec, "file", str, where), f"onnx.variants.{precision}.file")
    return manifest


def verify_file(folder: Path, spec: dict, field: str) -> Path:
    """Check one file named by a manifest entry ({file, sha256}); return its path."""
    path = resolve_inside(folder, spec["file"], field)
    if not path.is_file():
        raise BundleError(f"{path}: file named by {field} in {folder / MANIFEST_FILE} is missing")
    found = sha256_file(path)
    if found != spec["sha256"]:
        raise BundleError(
            f"{path}: sha256 mismatch (manifest says {spec['sha256']}, file has {found}); "
            "the file was changed or truncated after export. Re-export this task's bundle."
        )
    return path


def verify_files(folder: str | os.PathLike, manifest: dict) -> tuple[Path, Path]:
    """Check sha256 of the model and tokenizer files; return their paths."""
    folder = Path(folder)
    return verify_file(folder, manifest["onnx"], "onnx.file"), verify_file(folder, manifest["tokenizer"], "tokenizer.file")


def discover(root: str | os.PathLike) -> dict[str, Path]:
    """Map task name -> bundle folder for every finished bundle directly under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle root is not a folder; pass the folder that holds <task>/manifest.json")
    found = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not TASK_NAME_PATTERN.fullmatch(entry.name):
            continue
        if (entry / MANIFEST_FILE).is_file():
            found[entry.name] = entry
    return found
