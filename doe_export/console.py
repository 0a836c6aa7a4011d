"""Progress lines on stderr, per-stage wall times, and the package versions a record carries."""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from importlib import metadata

VERSIONED = (
    "doe-export",
    "doe-runtime",
    "torch",
    "transformers",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "tokenizers",
    "numpy",
)


def log(message: str) -> None:
    """One progress line on stderr (stdout is for results)."""
    print(message, file=sys.stderr, flush=True)


def package_versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


class Timer:
    """Wall seconds per named stage; a stage entered twice adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)


@contextlib.contextmanager
def library_progress_bars(shown: bool):
    """Hide the libraries' own progress bars (transformers' "Loading weights", the hub's downloads)
    while ``shown`` is False, as ``--no-progress`` promises, and put them back afterwards."""
    if shown:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    transformers_on = hf_logging.is_progress_bar_enabled()
    hub_on = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if hub_on:
            enable_progress_bars()


def exit_on_sigterm() -> bool:
    """Make SIGTERM (a scheduler's stop, `timeout`, `kill`) end the program like Ctrl-C does: as an
    exception, so every ``finally`` runs — the bench suites' server processes and Ray clusters are
    stopped, temp files removed — instead of the process vanishing and leaving them behind. Exit
    status 143 (128 + SIGTERM), as the shell expects. Only the main thread can install it (False
    elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return True
