"""Bundles on disk: the manifest document, the initializer table, and atomic writing.

A bundle is built by :class:`BundleWriter` in a hidden temp folder beside its target and moved into
place only when complete (``manifest.json`` last), so an interrupted export leaves the previous
bundle intact. :func:`manifest_for` builds the manifest from its sections and checks it with the
runtime's own reader, so the exporter cannot write what the runtime would refuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from doe_runtime.bundle import MANIFEST_FILE, SCHEMA_VERSION, check_task_name, sha256_file, validate_manifest

from .errors import ConfigError

__all__ = ["SHARED_MIN_BYTES", "BundleWriter", "file_entry", "initializer_table", "manifest_for"]


SHARED_MIN_BYTES = 1 << 16


def initializer_table(path: Path, min_bytes: int = SHARED_MIN_BYTES) -> list[dict]:
    """The graph's initializers of at least ``min_bytes`` with the sha256 of their raw bytes (what the
    runtime hashes): the manifest's ``initializers``, from which it shares identical tensors between
    experts. Read with the runtime's own reader, so both sides see the same bytes."""
    import hashlib

    import onnx

    from doe_runtime.onnxfile import DTYPE_NAMES, read_initializers

    consumers: dict[str, set] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    table = []
    for name, tensor in read_initializers(path).items():
        if len(tensor.raw) >= min_bytes:
            table.append(
                {
                    "name": name,
                    "sha256": hashlib.sha256(tensor.raw).hexdigest(),
                    "bytes": len(tensor.raw),
                    "dtype": DTYPE_NAMES[tensor.data_type],
                    "shape": list(tensor.dims),
                    "consumers": sorted(consumers.get(name, ())),
                }
            )
    return sorted(table, key=lambda entry: entry["name"])


def file_entry(folder: Path, name: str) -> dict:
    return {"file": name, "sha256": sha256_file(folder / name)}


def manifest_for(
    *,
    task: dict,
    base_model: dict,
    architecture: dict,
    adaptation: dict,
    pruning: dict,
    onnx: dict,
    tokenizer: dict,
    validation: dict,
    quality: dict,
    data: dict,
    versions: dict,
    created: str,
) -> dict:
    """The manifest document from its sections (pure: no files, no torch); checked by the runtime's
    own reader, so the exporter cannot write what the runtime would refuse."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "base_model": base_model,
        "architecture": architecture,
        "adaptation": adaptation,
        "pruning": pruning,
        "onnx": onnx,
        "tokenizer": tokenizer,
        "validation": validation,
        "quality": quality,
        "data": data,
        "versions": versions,
        "created": created,
    }
    validate_manifest(manifest, f"manifest for {task.get('name')!r}")
    return manifest


# ----------------------------------------------------------------------------- atomic bundle writing


def _restore_orphan(root: Path, task: str) -> None:
    """If a writer died between its two renames, the old bundle sits in ``.<task>.previous``."""
    target, previous = root / task, root / f".{task}.previous"
    if previous.is_dir() and not target.exists():
        os.replace(previous, target)
    elif previous.is_dir():
        shutil.rmtree(previous, ignore_errors=True)


def _remove_dead_writers(root: Path, task: str) -> list[str]:
    """Remove temp folders of writers of ``task`` that no longer run (killed with SIGKILL, power cut):
    their names carry the writer's pid. Returns the removed folder names."""
    removed = []
    for folder in root.glob(f".{task}.tmp-*"):
        try:
            pid = int(folder.name[len(f".{task}.tmp-") :].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
        except PermissionError:  # alive, another user's
            continue
    return removed


@contextlib.contextmanager
def _task_lock(root: Path, task: str):
    """Exclusive lock serialising the swaps under ``root``: POSIX flock on the root folder itself, so
    no lock file is left behind (swaps are two renames; one root-wide lock costs nothing)."""
    try:
        import fcntl
    except ImportError:  # Windows: renames are still atomic one by one, only not serialised
        yield
        return
    handle = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): readers see either
    the old bundle or the new one, never no bundle. False where the call is unavailable."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux / glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), f"{a} <-> {b}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class BundleWriter:
    """Write ``root/<task>`` atomically::

        with BundleWriter(root, task) as writer:
            ...write files into writer.folder...
            writer.write_manifest(manifest)     # last; checked by the runtime's reader
        writer.path                            # root/<task>, swapped into place

    The files go into a hidden temp folder beside the target (its name carries the writer's pid,
    so the next writer removes it if this process is killed). On leaving the block without an
    error and with a manifest, the folder replaces any previous bundle of the task; on any error
    (Ctrl-C included) the temp folder is removed and the previous bundle is untouched.
    """

    def __init__(self, root: str | os.PathLike, task: str):
        self.task = check_task_name(task)
        self.root = Path(root)
        self._folder: Path | None = None
        self.path = self.root / task
        self._manifest_written = False

    def __enter__(self) -> BundleWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        with _task_lock(self.root, self.task):  # a writer killed mid-swap left the old bundle aside: put it back
            _restore_orphan(self.root, self.task)
            _remove_dead_writers(self.root, self.task)
        self._folder = Path(tempfile.mkdtemp(prefix=f".{self.task}.tmp-{os.getpid()}-", dir=self.root))
        os.chmod(self._folder, 0o777 & ~_umask())  # mkdtemp makes 0700; a bundle is shared like any folder
        return self

    @property
    def folder(self) -> Path:
        """The temp folder the bundle's files go into (inside the ``with`` block only)."""
        if self._folder is None:
            raise ConfigError(f"bundle {self.task!r}: the writer's folder exists only inside its `with` block")
        return self._folder

    def write_manifest(self, manifest: dict) -> None:
        validate_manifest(manifest, f"manifest for {self.task}")
        if manifest["task"]["name"] != self.task:
            raise ConfigError(f"manifest names task {manifest['task']['name']!r} but the bundle is {self.task!r}")
        with open(self.folder / MANIFEST_FILE, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=False)
            handle.flush()
            os.fsync(handle.fileno())
        self._manifest_written = True

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None or not self._manifest_written:
            shutil.rmtree(self.folder, ignore_errors=True)
            if kind is None:
                raise ConfigError(
                    f"bundle {self.task!r}: the writer finished without write_manifest(); nothing was published"
                )
            return
        try:
            with _task_lock(self.root, self.task):  # concurrent writers of one task swap one at a time
                _restore_orphan(self.root, self.task)
                if self.path.exists() and _exchange(self.folder, self.path):
                    shutil.rmtree(self.folder, ignore_errors=True)  # now holds the previous bundle
                elif self.path.exists():  # two renames: the task is briefly missing (readers keep their session)
                    previous = self.root / f".{self.task}.previous"
                    os.replace(self.path, previous)
                    os.replace(self.folder, self.path)
                    shutil.rmtree(previous, ignore_errors=True)
                else:
                    os.replace(self.folder, self.path)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
