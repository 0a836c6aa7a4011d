"""Fixtures of the runtime's own tests: the committed tiny bundles (see data/make_tiny_bundles.py),
copied per test so a test may damage its copy. Nothing here imports torch or doe_export."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data" / "bundles"


@pytest.fixture
def bundles(tmp_path) -> Path:
    """A private copy of the tiny bundles: ``toy-single`` (labels no/yes) and ``toy-pair`` (3 labels)."""
    root = tmp_path / "artifacts"
    shutil.copytree(DATA, root)
    return root


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def edit_manifest():
    """``edit_manifest(folder, change)``: apply ``change(dict)`` to the folder's manifest.json."""
    return _edit_manifest


def _run_threads(target, count: int) -> list[Exception]:
    """Run target(index) in ``count`` threads at once; return the exceptions they raised."""
    errors = []

    def guarded(index):
        try:
            target(index)
        except Exception as exc:  # returned to the test, which asserts on it
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.fixture
def run_threads():
    """``run_threads(target, count)``: run target(i) in ``count`` threads; return what they raised."""
    return _run_threads
