"""--match-test-lengths: dev and the training examples drawn by the test split's word counts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from doe_export.errors import TaskDataError
from doe_export.specs import BuildConfig, DataSpec
from doe_export.tasks import Split, TaskData
from doe_export.tasks.matching import match_test_lengths, words


def _text(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(50)}" for _ in range(n))


def _phrases_vs_sentences(train: int = 3000, dev: int = 150, test: int = 400) -> TaskData:
    """SST-2's shape: train and dev mostly short phrases (1-8 words, 40 % 9-40), test whole sentences
    (10-40 words)."""
    rng = random.Random(7)
    short = lambda: _text(rng, rng.randint(1, 8) if rng.random() < 0.6 else rng.randint(9, 40))  # noqa: E731
    split = lambda name, n, make: Split(name, [f"{name}{i} {make()}" for i in range(n)], [i % 2 for i in range(n)])  # noqa: E731
    return TaskData(
        "t",
        "single",
        ["a", "b"],
        "accuracy",
        split("train", train, short),
        split("dev", dev, short),
        split("test", test, lambda: _text(rng, rng.randint(10, 40))),
        "generated",
    )


def _median(split: Split, first: int | None = None) -> float:
    return float(np.median([words(x) for x in split.inputs[:first]]))


def test_dev_and_training_head_follow_the_test_lengths_and_nothing_is_lost():
    data = _phrases_vs_sentences()
    assert _median(data.train) <= 8 and _median(data.test) >= 20  # the shift the option is for
    matched, match = match_test_lengths(data, dev_items=300, train_items=500, seed=0)
    assert len(matched.dev) == 300
    assert abs(_median(matched.dev) - _median(data.test)) <= 2
    assert abs(_median(matched.train, 500) - _median(data.test)) <= 2
    assert _median(matched.train, 500) > _median(data.train) + 10
    assert match.test_median == _median(data.test) and match.shortfall == 0
    before = sorted([*data.train.inputs, *data.dev.inputs])
    assert sorted([*matched.train.inputs, *matched.dev.inputs]) == before  # every item kept, none twice
    assert not set(matched.dev.inputs) & set(matched.train.inputs[:500])
    assert matched.test is data.test and "--match-test-lengths" in matched.notes[-1]
    again, _ = match_test_lengths(data, dev_items=300, train_items=500, seed=0)
    assert again.dev.inputs == matched.dev.inputs  # seeded


def test_the_test_labels_are_never_read():
    data = _phrases_vs_sentences()
    flipped = TaskData(**{**data.__dict__, "test": Split("test", data.test.inputs, [1 - y for y in data.test.labels])})
    a, _ = match_test_lengths(data, dev_items=200, train_items=400, seed=3)
    b, _ = match_test_lengths(flipped, dev_items=200, train_items=400, seed=3)
    assert a.dev.inputs == b.dev.inputs and a.train.inputs == b.train.inputs


def test_thin_bins_are_made_up_from_other_items_and_counted():
    data = _phrases_vs_sentences(train=600, dev=50)  # about 250 long items for 500 wanted
    matched, match = match_test_lengths(data, dev_items=200, train_items=300, seed=0)
    assert match.shortfall > 0 and f"{match.shortfall:,} item(s) came from outside" in matched.notes[-1]
    assert len(matched.dev) == 200 and len(matched.train) == 450
    assert abs(_median(matched.dev) - _median(data.test)) <= 2  # dev is drawn first: the thin bins cost train
    assert match.dev_median == _median(matched.dev) and match.train_median == _median(matched.train, 300)


def test_with_all_of_train_the_matched_items_come_first():
    """--max-train none (or a --train-budget that picks a head later): train keeps every item, and its head is
    the largest draw the bins can fill at the test's shares."""
    data = _phrases_vs_sentences()
    matched, match = match_test_lengths(data, dev_items=200, train_items=None, seed=0)
    assert len(matched.train) + len(matched.dev) == len(data.train) + len(data.dev) and match.shortfall == 0
    head = match.matched_train
    assert 300 < head < len(matched.train) and f"the first {head:,} training examples" in matched.notes[-1]
    assert abs(_median(matched.train, head) - _median(data.test)) <= 2
    assert _median(Split("tail", matched.train.inputs[head:], [])) < 10  # the phrases follow


def test_too_few_items_are_refused_naming_the_task_and_the_fix():
    data = _phrases_vs_sentences(train=300, dev=20)
    with pytest.raises(TaskDataError, match=r"task 't': --match-test-lengths needs 200 dev items and at least 500"):
        match_test_lengths(data, dev_items=200, train_items=None, seed=0, keep_train=500)


def test_build_plans_a_matched_dev_sized_for_the_budget():
    from doe_export.pipeline import plan_dev
    from doe_export.uncertainty import dev_items_for

    data = _phrases_vs_sentences(train=20000)
    config, matched = plan_dev(BuildConfig(max_loss=1.0, data=DataSpec(match_test_lengths=True)), data)
    assert len(matched.dev) == config.data.max_dev == dev_items_for(1.0)
    assert _median(matched.dev) > _median(data.dev) + 5 and matched.test is data.test
    config, small = plan_dev(BuildConfig(data=DataSpec(match_test_lengths=True)), data)
    assert len(small.dev) == 150 and config.data.max_dev == 200  # the task's dev size, capped by --max-dev
    assert "length-matched" in small.dev.name
