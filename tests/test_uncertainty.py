"""Paired bootstrap intervals: each resample's metric is evaluate's own on the same items, intervals are
reproducible from their seed, shrink with more items, and verdicts read them."""

import numpy as np
import pytest

from doe_export import evaluate
from doe_export.uncertainty import (
    Interval,
    _confusions,
    _metric,
    build_figures,
    majority_interval,
    paired_bootstrap,
)


# f1 is the binary task metric (MRPC): it is never asked of three classes
@pytest.mark.parametrize(
    ("metric", "classes"), [("accuracy", 2), ("accuracy", 3), ("f1", 2), ("matthews", 2), ("matthews", 3)]
)
def test_resampled_metrics_equal_evaluates_own(metric, classes):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, size=300)
    preds = np.where(rng.random(300) < 0.7, labels, rng.integers(0, classes, size=300))
    index = rng.integers(0, 300, size=(20, 300))
    fast = _metric(metric, _confusions(labels, preds, index, classes))
    slow = [evaluate.metric_value(metric, labels[i].tolist(), preds[i].tolist()) for i in index]
    assert np.allclose(fast, slow)


def test_interval_is_paired_reproducible_and_shrinks_with_items():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=2000)
    dense = np.where(rng.random(2000) < 0.85, labels, 1 - labels)
    expert = np.where(rng.random(2000) < 0.97, dense, 1 - dense)  # flips 3 % of the dense answers
    small = paired_bootstrap("accuracy", labels[:200].tolist(), dense[:200].tolist(), expert[:200].tolist(), seed=3)
    again = paired_bootstrap("accuracy", labels[:200].tolist(), dense[:200].tolist(), expert[:200].tolist(), seed=3)
    large = paired_bootstrap("accuracy", labels.tolist(), dense.tolist(), expert.tolist(), seed=3)
    assert small == again and small.items == 200 and small.seed == 3 and small.resamples == 2000
    assert small.low <= small.value <= small.high and large.low <= large.value <= large.high
    assert large.high - large.low < small.high - small.low
    want = evaluate.accuracy(labels.tolist(), expert.tolist()) - evaluate.accuracy(labels.tolist(), dense.tolist())
    assert large.value == pytest.approx(want)
    same = paired_bootstrap("accuracy", labels.tolist(), dense.tolist(), dense.tolist())
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)  # paired: identical answers never differ


def test_verdicts_read_the_interval():
    make = lambda value, low, high: Interval(value, low, high, 0.95, 2000, 0, 400)  # noqa: E731
    assert make(-0.002, -0.008, 0.004).verdict(0.01) == "met"
    assert make(-0.005, -0.015, 0.004).verdict(0.01) == "not resolved"
    assert make(-0.03, -0.04, -0.02).verdict(0.01) == "missed"
    assert make(-0.002, -0.008, 0.004).points() == "-0.2 [-0.8, +0.4]"
    assert make(0, 0, 0).to_json(0.01)["within"] == {"points": 1.0, "verdict": "met"}


def test_a_model_answering_the_majority_is_not_learned():
    labels = [0] * 70 + [1] * 30
    chance = majority_interval("accuracy", labels, [0] * 100)
    assert chance.value == 0 and chance.low <= 0
    learned = majority_interval("accuracy", labels, labels)
    assert learned.value == pytest.approx(0.3) and learned.low > 0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap("accuracy", [0, 1], [0], [1, 1])
    with pytest.raises(ValueError, match="no bootstrap for metric 'bleu'"):
        paired_bootstrap("bleu", [0, 1], [0, 1], [1, 1])


def test_a_form_checked_on_the_first_items_is_paired_on_those():
    """The fp16 variant is checked on the first 300 test items on CPU: its interval pairs those items only."""
    labels = [i % 2 for i in range(40)]
    dense = list(labels)
    figures = build_figures("accuracy", labels, dense, {"expert": dense, "fp16": dense[:10]}, seed=0, tolerance=0.01)
    assert figures.against_dense["expert"].items == 40 and figures.against_dense["fp16"].items == 10
    assert figures.learned and figures.cell("fp16") == "fp16 +0.0 [+0.0, +0.0] met"


def test_differences_average_over_seeds_and_tasks():
    """Several prediction lists (seeds) average their metric; averages over tasks average the resamples."""
    from doe_export.uncertainty import average_interval, resampled_differences

    labels = [0, 1] * 50
    right, wrong = list(labels), [1 - y for y in labels]
    half = right[:50] + wrong[50:]
    value, spread = resampled_differences("accuracy", labels, [wrong], [right, half], seed=3, resamples=500)
    assert value == pytest.approx(0.75) and spread.shape == (500,)  # (1.0 + 0.5) / 2 - 0.0
    same, zero = resampled_differences("accuracy", labels, [half], [half], resamples=300)
    assert same == 0 and not zero.any()
    average = average_interval([(value, spread, 100), (same, np.zeros(500), 100)], seed=3)
    assert average.value == pytest.approx(0.375) and average.items == 200 and average.low <= 0.375 <= average.high
    with pytest.raises(ValueError, match="as long as the 100 labels"):
        resampled_differences("accuracy", labels, [labels[:10]], [labels])
    with pytest.raises(ValueError, match="same number of resamples"):
        average_interval([(value, spread, 100), (same, zero, 100)], seed=0)


def test_build_verdict_line_counts_every_task_once():
    """doe build's last line: each task's served form against dense, grouped by its interval's verdict."""
    from doe_export.summary import TaskResult, verdict_line

    def result(task, verdict, *, learned=True, precisions=("fp32", "int8")):
        within = {"points": 1.0, "verdict": verdict}
        forms = {"int8": {"within": within}, "fp32": {"within": {"points": 1.0, "verdict": "missed"}}}
        return TaskResult(
            task, "accuracy", "test", 100, 0.9, 0.8, 0.89, 0.89, 10, 5, [4], [2], 1e-6, "out",
            list(precisions), rate=0.65, uncertainty={"expert_minus_dense": forms}, dense_learned=learned,
        )  # fmt: skip

    line = verdict_line(
        [
            result("a", "met"),
            result("b", "not resolved"),
            result("c", "met", learned=False),
            result("d", "met", precisions=("fp32",)),  # served fp32: its own verdict is read
        ],
        1.0,
    )
    assert line == (
        "Served expert within 1 point(s) of the dense model on test (95% interval): met 1 (a p=0.65); "
        "not resolved 1 (b p=0.65); missed 1 (d p=0.65); no verdict (dense not learned) 1 (c)"
    )
    from doe_export.summary import rate_line

    kept = result("e", "met")
    kept.rate, kept.bound_128 = 0.2, 1.15
    assert rate_line([result("a", "met"), kept], 0.65) == (
        "Pruned less than the default p=0.65 to hold the budget or as asked: e p=0.2, FLOP bound x1.15 at 128 tokens"
    )
    assert rate_line([result("a", "met")], 0.65) is None
    from doe_export.summary import unused_line

    left = [
        result("a", "met"),
        result("b", "not resolved"),
        result("c", "missed", learned=False),
        result("d", "missed"),
    ]
    for r in left:
        r.unused_train = 65_349
    left[3].unused_train = 0  # recovery took them all (--recovery-extra), or the adaptation did
    assert unused_line(left) == (
        "Training items left unused where the tolerance is not shown: b 65,349. --recovery-extra N trains recovery "
        "on N of them too (SST-2, 8,000: within 1 point of its dense model; docs/export.md)"
    )
    assert unused_line(left[:1] + left[2:]) is None


def test_dev_sizing_counts_how_far_one_answer_moves_the_metric():
    """MCC moves about twice as far as accuracy per changed answer (4x the variance), F1 with a positive
    majority less; the factor scales the dev split a budget needs, and what a split resolves."""
    from doe_export.uncertainty import dev_items_for, metric_factor, resolvable_points

    cola_like = [0] * 30 + [1] * 70
    mcc = metric_factor("matthews", cola_like)
    assert 3.0 < mcc < 5.5 and metric_factor("matthews", cola_like) == mcc  # seeded
    assert metric_factor("f1", [0] * 32 + [1] * 68) < 1.0 and metric_factor("accuracy", cola_like) == 1.0
    assert 2.0 < metric_factor("matthews", [0, 1, 2] * 10) < 5.5  # multi-class works too
    assert dev_items_for(2.0, factor=mcc) == pytest.approx(dev_items_for(2.0) * mcc, rel=0.01)
    assert resolvable_points(dev_items_for(2.0, factor=mcc), factor=mcc) <= 2.0
    with pytest.raises(ValueError, match="at least two classes"):
        metric_factor("matthews", [1, 1, 1])


def test_disagreement_is_the_share_of_changed_answers_and_refuses_unpaired_answers():
    from doe_export.uncertainty import dev_items_for, disagreement

    assert disagreement([0, 1, 1, 0], [0, 1, 0, 1]) == 0.5 and disagreement([2, 2], [2, 2]) == 0.0
    assert disagreement([], []) == 0.0
    with pytest.raises(ValueError, match="same items, got 3 and 2"):
        disagreement([0, 1, 1], [0, 1])
    # the dev split a budget needs grows with the share of answers the expert changes, in proportion
    assert dev_items_for(1.0, disagreement=0.09) == pytest.approx(3 * dev_items_for(1.0), rel=0.001)
