"""Dev and training examples drawn to look like the test split by length (``--match-test-lengths``).

Some tasks' training files are not drawn like their test split. GLUE SST-2's train file holds phrases
(median 7 words) cut from the training sentences, its official dev split — our test split — whole
sentences (median 19). A dev split carved at random from train then measures the expert on phrases, and
the rate a budget picks there does not hold on sentences (``benchmarks/results/builds/README.md``).

:func:`match_test_lengths` redraws the dev split and the training examples the stages take (the head of
train) from every labelled item outside the test split so their word counts follow the test split's: the
test lengths are cut into quantile bins and each bin gets its share of the draw. Only the test *inputs'*
lengths are read, never its labels. Items the draw does not take go after the drawn training items, so a
build with ``--max-train none`` still trains on everything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

from ..errors import TaskDataError
from .base import Split, TaskData, texts_of

BINS = 10  # quantile bins of the test split's word counts


def words(item: str | tuple[str, str]) -> int:
    """Whitespace-separated words of one input (both texts of a pair)."""
    return sum(len(text.split()) for text in texts_of(item))


@dataclass(frozen=True)
class LengthMatch:
    """What the draw did: median word counts before and after, and items a bin could not supply."""

    test_median: float
    before_median: float
    dev_median: float
    train_median: float
    shortfall: int  # drawn items taken outside their bin because the bin had too few
    matched_train: int  # training examples drawn by the test lengths (the head of train)

    def note(self) -> str:
        short = (
            f"; {self.shortfall:,} item(s) came from outside their length bin (too few long enough)"
            if self.shortfall
            else ""
        )
        return (
            f"dev and training examples drawn to match the test split's word counts (--match-test-lengths): "
            f"median words test {self.test_median:g}, train and dev before {self.before_median:g}, "
            f"dev now {self.dev_median:g}, the first {self.matched_train:,} training examples now "
            f"{self.train_median:g}{short}"
        )


def match_test_lengths(
    data: TaskData, *, dev_items: int, train_items: int | None, seed: int, keep_train: int = 0
) -> tuple[TaskData, LengthMatch]:
    """``data`` with dev (``dev_items``) and the first ``train_items`` of train (all of it: None) drawn from
    its train and dev items by the test split's word-count profile; the rest of the items follow in train.
    At least ``keep_train`` items are left to train on, else :class:`TaskDataError`."""
    pool_x = [*data.dev.inputs, *data.train.inputs]
    pool_y = [*data.dev.labels, *data.train.labels]
    if dev_items + keep_train > len(pool_y):
        raise TaskDataError(
            f"task {data.name!r}: --match-test-lengths needs {dev_items:,} dev items and at least {keep_train:,} to "
            f"train on, but train and dev hold {len(pool_y):,}; lower --max-dev (or --max-loss's budget) or give "
            "more data"
        )
    if not len(data.test):
        raise TaskDataError(f"task {data.name!r}: the test split is empty; there is no length profile to match")
    test_len = np.array([words(x) for x in data.test.inputs])
    pool_len = np.array([words(x) for x in pool_x])
    edges = np.unique(np.quantile(test_len, np.linspace(0, 1, BINS + 1)[1:-1]))
    test_bin, pool_bin = np.digitize(test_len, edges), np.digitize(pool_len, edges)
    share = np.bincount(test_bin, minlength=len(edges) + 1) / len(test_len)

    wanted = len(pool_y) - dev_items if train_items is None else min(train_items, len(pool_y) - dev_items)
    rng = random.Random(seed)
    by_bin = [np.flatnonzero(pool_bin == b).tolist() for b in range(len(share))]
    for members in by_bin:
        rng.shuffle(members)
    dev_idx = _draw(by_bin, _largest_remainders(share * dev_items, dev_items))  # dev first: the rate is chosen on it
    if train_items is None:  # all of train trains: the longest head the bins can fill at the test's shares first
        wanted = min(wanted, min(int(len(m) / f) for m, f in zip(by_bin, share) if f > 0))
    train_idx = _draw(by_bin, _largest_remainders(share * wanted, wanted))
    rest = [i for members in by_bin for i in members]
    rng.shuffle(rest)
    filled = dev_items - len(dev_idx)  # bins too thin: made up from the other items, counted in the note
    dev_idx += rest[:filled]
    rng.shuffle(dev_idx)
    rng.shuffle(train_idx)
    # the matched draw first, then the items the thin bins could not place, then the rest: any head of train
    # (--max-train, or what --train-budget later picks) is as close to the test lengths as the bins allow
    shortfall = filled + wanted - len(train_idx)
    train_idx += rest[filled:]

    def split(name: str, idx: list[int]) -> Split:
        return Split(name, [pool_x[i] for i in idx], [pool_y[i] for i in idx])

    origin = f"the task's {len(pool_y):,} train and dev items"
    dev = split(f"dev: {dev_items:,} items length-matched to the test split from {origin} (seed {seed})", dev_idx)
    train = split(f"train: length-matched to the test split first, from {origin} (seed {seed})", train_idx)
    match = LengthMatch(
        test_median=float(np.median(test_len)),
        before_median=float(np.median(pool_len)),
        dev_median=float(np.median(pool_len[dev_idx])) if dev_idx else 0.0,
        train_median=float(np.median(pool_len[train_idx[:wanted]])) if wanted else 0.0,
        shortfall=shortfall,
        matched_train=wanted,
    )
    return replace(data, train=train, dev=dev, notes=[*data.notes, match.note()]), match


def _draw(by_bin: list[list[int]], quota: list[int]) -> list[int]:
    """Take each bin's quota (or all it has left) off the front of its shuffled members."""
    taken = []
    for members, count in zip(by_bin, quota):
        taken += members[:count]
        del members[:count]
    return taken


def _largest_remainders(exact: np.ndarray, total: int) -> list[int]:
    counts = np.floor(exact).astype(int)
    for b in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[b] += 1
    return counts.tolist()
