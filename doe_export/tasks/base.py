"""The data model of a task (splits, labels, metric) and the seeded splitting helpers."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TaskDataError

METRICS = ("accuracy", "f1", "matthews")

__all__ = [
    "METRICS",
    "Split",
    "TaskData",
    "TaskDataError",
    "carve",
    "default_cache_dir",
    "map_texts",
    "read_text",
    "shuffled",
    "stratified_split",
    "texts_of",
]


def texts_of(item) -> tuple[str, ...]:
    """The texts of one input: one for a single text, both for a pair."""
    return tuple(item) if isinstance(item, (tuple, list)) else (item,)


def map_texts(item, change: Callable[[str], str]):
    """``item`` with ``change`` applied to each of its texts, in order: a pair stays a (str, str) pair."""
    return tuple(change(text) for text in item) if isinstance(item, (tuple, list)) else change(item)


def read_text(path: Path, encoding: str = "utf-8-sig") -> str:
    """A data file's text; a decoding error names the file, the line and the encoding expected."""
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise TaskDataError(
            f"{path}:{line}: byte {raw[exc.start : exc.start + 1]!r} at offset {exc.start} is not valid {encoding} "
            f"({exc.reason}); save the file as UTF-8, or name its encoding (e.g. encoding=latin-1 in --user-task)"
        ) from None
    except LookupError:
        raise TaskDataError(
            f"{path}: unknown encoding {encoding!r}; use a Python codec name such as utf-8, latin-1 or cp1252"
        ) from None


@dataclass
class Split:
    name: str  # where it came from, e.g. "GLUE dev (official)" or "carved from train"
    inputs: list  # str, or (str, str) for pair tasks
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        return Split(f"{self.name}, first {n}", self.inputs[:n], self.labels[:n])

    def after(self, n: int | None) -> Split:
        """The items past the first ``n`` (none when ``n`` is None or covers the split): what :meth:`head`
        leaves out."""
        if n is None or n >= len(self):
            return Split(f"{self.name}, none past the first {len(self)}", [], [])
        return Split(f"{self.name}, past the first {n}", self.inputs[n:], self.labels[n:])

    def sample(self, n: int | None, seed: int) -> Split:
        """A seeded sample of ``n`` items that keeps every label's share (largest remainders), in the
        split's own order. Capping a reporting split with :meth:`head` would drop whole classes when
        the file is sorted by label."""
        if n is None or n >= len(self):
            return self
        by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(self.labels):
            by_label[label].append(index)
        exact = {label: n * len(indices) / len(self) for label, indices in by_label.items()}
        counts = {label: int(value) for label, value in exact.items()}
        for label in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: n - sum(counts.values())]:
            counts[label] += 1
        rng = random.Random(seed)
        picked = sorted(i for label, indices in sorted(by_label.items()) for i in rng.sample(indices, counts[label]))
        return Split(
            f"{self.name}, seeded stratified sample of {n} (seed {seed})",
            [self.inputs[i] for i in picked],
            [self.labels[i] for i in picked],
        )


@dataclass
class TaskData:
    name: str
    input: str  # "single" | "pair"
    labels: list[str]
    metric: str
    train: Split
    dev: Split
    test: Split
    source: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "splits": {
                role: {"name": split.name, "size": len(split)}
                for role, split in (("train", self.train), ("dev", self.dev), ("test", self.test))
            },
            "notes": self.notes,
        }


def default_cache_dir() -> Path:
    return Path(os.environ.get("DOE_CACHE_DIR", Path.home() / ".cache" / "doe-export"))


def shuffled(inputs: list, labels: list[int], seed: int) -> tuple[list, list[int]]:
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    return [inputs[i] for i in order], [labels[i] for i in order]


def stratified_split(inputs: list, labels: list[int], fraction: float, seed: int) -> tuple[tuple, tuple]:
    """Split into (rest, held) with ``fraction`` of each label held out; both shuffled, seeded."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    rng = random.Random(seed)
    rest, held = [], []
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        cut = max(1, round(len(indices) * fraction)) if len(indices) > 1 else 0
        held += indices[:cut]
        rest += indices[cut:]
    rng.shuffle(rest)
    rng.shuffle(held)
    pick = lambda idx: ([inputs[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return pick(rest), pick(held)


def carve(split: Split, fraction: float, seed: int, held_name: str) -> tuple[Split, Split]:
    (rest_x, rest_y), (held_x, held_y) = stratified_split(split.inputs, split.labels, fraction, seed)
    rest = Split(f"{split.name} minus a seeded {fraction:.0%} carve (seed {seed})", rest_x, rest_y)
    return rest, Split(f"{held_name}: seeded {fraction:.0%} carve of {split.name} (seed {seed})", held_x, held_y)
