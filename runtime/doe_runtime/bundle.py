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
- ``onnx.variants`` MAY map a precision (``fp16``, ``int8``) to another graph of the same model
  with the same inputs and outputs (``file``, ``sha256``, ``precision``, ``validation``; MAY carry
  ``quality`` and ``speed`` measured by the exporter); a reader that uses a variant MUST check its
  sha256 like the main graph's. A writer MUST NOT list a variant that failed its validation.
- ``adaptation.prompt_length`` (MAY, default 0) is the number of positions the graph adds to
  every call beside the text (a soft prompt); readers report it.
- ``task.labels`` MUST have as many entries as the graph's ``logits`` has columns; a reader MUST
  refuse a bundle where they differ, at load time.

The typed form of the manifest is :class:`doe_runtime.manifest.Manifest`. This module and
``manifest.py`` use the standard library only, so both sides can import them cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import BundleError, TaskNameError
from .manifest import (
    INPUT_KINDS,
    KNOWN_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    TASK_NAME_PATTERN,
    FileRef,
    Manifest,
    check_task_name,
)

MANIFEST_FILE = "manifest.json"

__all__ = [
    "INPUT_KINDS",
    "KNOWN_SCHEMA_VERSIONS",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "TASK_NAME_PATTERN",
    "BundleError",
    "FileRef",
    "Manifest",
    "TaskNameError",
    "check_task_name",
    "discover",
    "read_manifest",
    "resolve_inside",
    "sha256_file",
    "validate_manifest",
    "verify_file",
    "verify_files",
]


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


def validate_manifest(manifest: Any, where: str) -> Manifest:
    """Check a manifest document (a dict); return it typed or raise ``BundleError`` naming the field."""
    return Manifest.from_json(manifest, where)


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check ``<folder>/manifest.json`` (no hashing; see :func:`verify_files`)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{folder}: no {MANIFEST_FILE}; not a bundle (an export that did not finish leaves no manifest)"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); re-export the bundle") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    manifest = Manifest.from_json(document, str(path))
    if manifest.task.name != folder.name:
        raise BundleError(
            f"{path}: task name {manifest.task.name!r} does not match the folder name {folder.name!r}; "
            "rename the folder to the task name"
        )
    resolve_inside(folder, manifest.onnx.file, "onnx.file")
    resolve_inside(folder, manifest.tokenizer.file, "tokenizer.file")
    for precision, variant in manifest.onnx.variants.items():
        resolve_inside(folder, variant.file, f"onnx.variants.{precision}.file")
    return manifest


def verify_file(folder: Path, ref: FileRef, field: str) -> Path:
    """Check one file named by a manifest entry (file + sha256); return its path."""
    path = resolve_inside(folder, ref.file, field)
    if not path.is_file():
        raise BundleError(f"{path}: file named by {field} in {folder / MANIFEST_FILE} is missing")
    found = sha256_file(path)
    if found != ref.sha256:
        raise BundleError(
            f"{path}: sha256 mismatch (manifest says {ref.sha256}, file has {found}); "
            "the file was changed or truncated after export. Re-export this task's bundle."
        )
    return path


def verify_files(folder: str | os.PathLike, manifest: Manifest) -> list[Path]:
    """Check the sha256 of the model, the tokenizer and every variant; return their paths."""
    folder = Path(folder)
    paths = [verify_file(folder, manifest.onnx, "onnx.file"), verify_file(folder, manifest.tokenizer, "tokenizer.file")]
    for precision, variant in sorted(manifest.onnx.variants.items()):
        paths.append(verify_file(folder, variant, f"onnx.variants.{precision}.file"))
    return paths


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
