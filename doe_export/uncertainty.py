"""How sure an accuracy figure is: paired bootstrap intervals over the test items.

An expert-vs-dense figure is a difference of two metrics on the same items, so the items are resampled
together (a *paired* bootstrap): each resample draws n item indices with replacement, computes both
models' metric on them, and keeps the difference. The 95 % interval is the 2.5th and 97.5th percentile
of those differences. On a 426-item split one item is 0.23 points of accuracy; the interval says how
many such items the figure could be off by chance.

A "within N points" verdict reads the interval: ``met`` when its lower end is above -N (the data rule
out a larger loss), ``missed`` when even its upper end is below -N, ``not resolved`` otherwise (the
data allow both; more test items would decide).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
METHOD = "paired bootstrap over the test items (percentile interval)"
DEV_METHOD = METHOD.replace("test items", "dev items")  # the rate search's intervals
_CHUNK = 250  # resamples per vectorised step (memory: chunk x items indices)


@dataclass(frozen=True)
class Interval:
    """``value`` (other minus base, in metric units: 0.01 = one point) and its ``level`` interval."""

    value: float
    low: float
    high: float
    level: float
    resamples: int
    seed: int
    items: int
    method: str = METHOD

    def verdict(self, tolerance: float) -> str:
        """Within ``tolerance`` (metric units) of the base: ``met`` / ``not resolved`` / ``missed``."""
        if self.low >= -tolerance:
            return "met"
        if self.high < -tolerance:
            return "missed"
        return "not resolved"

    def points(self) -> str:
        """e.g. ``-0.2 [-1.2, +0.7]`` (points: metric x 100)."""
        return f"{100 * self.value:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"

    def to_json(self, tolerance: float | None = None) -> dict:
        out = asdict(self)
        if tolerance is not None:
            out["within"] = {"points": 100 * tolerance, "verdict": self.verdict(tolerance)}
        return out


def _confusions(labels: np.ndarray, preds: np.ndarray, index: np.ndarray, classes: int) -> np.ndarray:
    """Confusion matrices (rows: label, columns: prediction) of each resample: (resamples, K, K)."""
    rows = np.arange(index.shape[0])[:, None] * classes * classes
    cells = rows + labels[index] * classes + preds[index]
    counts = np.bincount(cells.ravel(), minlength=index.shape[0] * classes * classes)
    return counts.reshape(index.shape[0], classes, classes).astype(np.float64)


def _metric(metric: str, conf: np.ndarray) -> np.ndarray:
    """The metric of each confusion matrix (the same definitions as doe_export.evaluate)."""
    total = conf.sum(axis=(1, 2))
    if metric == "accuracy":
        return np.trace(conf, axis1=1, axis2=2) / total
    if metric == "f1":  # the positive class is 1
        tp, fp, fn = conf[:, 1, 1], conf[:, 0, 1], conf[:, 1, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    if metric == "matthews":
        t, p = conf.sum(axis=2), conf.sum(axis=1)
        c = np.trace(conf, axis1=1, axis2=2)
        numerator = c * total - (t * p).sum(axis=1)
        denominator = np.sqrt(np.maximum(total**2 - (p * p).sum(axis=1), 0)) * np.sqrt(
            np.maximum(total**2 - (t * t).sum(axis=1), 0)
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, numerator / denominator, 0.0)
    raise ValueError(f"no bootstrap for metric {metric!r}; known: accuracy, f1, matthews")


def resampled_differences(
    metric: str,
    labels: list[int],
    base: list[list[int]],
    other: list[list[int]],
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> tuple[float, np.ndarray]:
    """The mean metric of ``other``'s prediction lists minus that of ``base``'s (e.g. one list per seed), on all
    items and on each of ``resamples`` paired resamples of the items (the same resamples for every list)."""
    y = np.asarray(labels, dtype=np.int64)
    a = [np.asarray(v, dtype=np.int64) for v in base]
    b = [np.asarray(v, dtype=np.int64) for v in other]
    if not a or not b or len(y) == 0 or any(len(v) != len(y) for v in (*a, *b)):
        raise ValueError(
            f"paired bootstrap needs non-empty prediction lists as long as the {len(y)} labels; got lengths "
            f"{[len(v) for v in a]} and {[len(v) for v in b]}"
        )
    classes = int(max(y.max(), *(v.max() for v in (*a, *b)))) + 1

    def mean_metric(preds: list[np.ndarray], index: np.ndarray) -> np.ndarray:
        return np.mean([_metric(metric, _confusions(y, p, index, classes)) for p in preds], axis=0)

    full = np.arange(len(y))[None, :]
    value = float(mean_metric(b, full)[0] - mean_metric(a, full)[0])
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, _CHUNK):
        index = rng.integers(0, len(y), size=(min(_CHUNK, resamples - start), len(y)))
        diffs.append(mean_metric(b, index) - mean_metric(a, index))
    return value, np.concatenate(diffs)


def interval_of(
    value: float, spread: np.ndarray, *, seed: int, items: int, level: float = LEVEL, method: str = METHOD
) -> Interval:
    """The percentile interval of resampled differences (:func:`resampled_differences`)."""
    tail = (1 - level) / 2
    low, high = np.quantile(spread, [tail, 1 - tail])
    return Interval(value, float(low), float(high), level, len(spread), seed, items, method)


def paired_bootstrap(
    metric: str,
    labels: list[int],
    base: list[int],
    other: list[int],
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    method: str = METHOD,
) -> Interval:
    """``metric(other) - metric(base)`` on the same items, with its paired bootstrap interval (``method``
    says which items they are)."""
    if not (len(labels) == len(base) == len(other)) or len(labels) == 0:
        raise ValueError(
            f"paired bootstrap needs equal, non-empty lists; got {len(labels)}, {len(base)}, {len(other)} items"
        )
    value, spread = resampled_differences(metric, labels, [base], [other], seed=seed, resamples=resamples)
    return interval_of(value, spread, seed=seed, items=len(labels), level=level, method=method)


def average_interval(parts: list[tuple[float, np.ndarray, int]], *, seed: int, level: float = LEVEL) -> Interval:
    """The average of several independent differences (e.g. one per task, each ``(value, resampled differences,
    items)`` from :func:`resampled_differences` with the same number of resamples): the mean of the values, and the
    interval of the resample-wise means (the tasks' items are resampled independently)."""
    if not parts or len({len(spread) for _, spread, _ in parts}) != 1:
        raise ValueError("average_interval needs at least one part, all with the same number of resamples")
    value = float(np.mean([v for v, _, _ in parts]))
    spread = np.mean([s for _, s, _ in parts], axis=0)
    return interval_of(value, spread, seed=seed, items=sum(n for _, _, n in parts), level=level)


def majority_interval(metric: str, labels: list[int], preds: list[int], *, seed: int = 0) -> Interval:
    """The model against always answering the most frequent test label: a model whose interval reaches 0
    has not been shown to learn the task (its figures are not pruning results)."""
    majority = int(np.bincount(np.asarray(labels, dtype=np.int64)).argmax())
    return paired_bootstrap(metric, labels, [majority] * len(labels), preds, seed=seed)


# Sizing a dev split for an accuracy budget (--max-loss L points). A paired difference of two models' metric
# on n items has a standard error of about sqrt(d / n), d the share of items they answer differently; the
# dev split is sized so the 95 % half-width is at most half the budget: n = (2 z / L)^2 d. d = 3 % is the
# prior (the shipped experts disagree with their dense model on 1-5 % of test items); the search records the
# disagreement it finds, and the half-width that gives.
DISAGREEMENT_PRIOR = 0.03
Z95 = 1.959964
MIN_TRAIN = 500  # training examples a carve may leave at the least


def dev_items_for(max_loss_points: float, disagreement: float = DISAGREEMENT_PRIOR, factor: float = 1.0) -> int:
    """Dev items whose paired 95 % interval is at most half of ``max_loss_points`` wide on each side
    (``factor``: the metric's variance per changed answer against accuracy's, :func:`metric_factor`)."""
    if not max_loss_points > 0:
        raise ValueError(f"a budget of {max_loss_points} points cannot be resolved by any number of items")
    return int(np.ceil((2 * Z95 * 100 / max_loss_points) ** 2 * disagreement * factor))


def disagreement(dense, expert) -> float:
    """Share of items two models label differently (what a --max-loss dev split is sized for:
    DISAGREEMENT_PRIOR); 0 for no items."""
    dense, expert = np.asarray(dense), np.asarray(expert if expert is not None else ())
    if dense.shape != expert.shape:
        raise ValueError(
            f"disagreement needs two models' answers to the same items, got {len(dense)} and {len(expert)}"
        )
    return float(np.mean(dense != expert)) if len(dense) else 0.0


def resolvable_points(items: int, disagreement: float = DISAGREEMENT_PRIOR, factor: float = 1.0) -> float:
    """The smallest budget (points) that ``items`` dev items resolve (the inverse of dev_items_for)."""
    return float(2 * Z95 * 100 * np.sqrt(disagreement * factor / max(items, 1)))


# The sizing above is accuracy's. F1 and Matthews' correlation move by other amounts when one answer changes
# (MCC about twice as much: it is scaled by each class's size), so their variance is measured on a simulated
# pair of models: labels drawn at the task's shares, a dense model right on ACCURACY_PRIOR of them, an expert
# that changes DISAGREEMENT_PRIOR of its answers.
ACCURACY_PRIOR = 0.8
_FACTOR_ITEMS, _FACTOR_RESAMPLES = 2000, 500


def metric_factor(metric: str, labels: list[int], *, seed: int = 0) -> float:
    """How many times the dev items accuracy needs ``metric`` needs for the same interval width in points,
    for a task whose labels are ``labels`` (their shares are what matters). 1 for accuracy."""
    if metric == "accuracy":
        return 1.0
    classes, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"metric_factor needs labels of at least two classes, got {classes.tolist()}")
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, size=_FACTOR_ITEMS, p=counts / counts.sum())

    def changed(v: np.ndarray) -> np.ndarray:  # another class than v's, at random among the task's
        pick = rng.integers(1, len(classes), size=len(v))
        position = np.searchsorted(classes, v)
        return classes[(position + pick) % len(classes)]

    dense = np.where(rng.random(_FACTOR_ITEMS) < ACCURACY_PRIOR, y, changed(y))
    expert = np.where(rng.random(_FACTOR_ITEMS) < DISAGREEMENT_PRIOR, changed(dense), dense)
    spread = {
        name: resampled_differences(
            name, y.tolist(), [dense.tolist()], [expert.tolist()], seed=seed, resamples=_FACTOR_RESAMPLES
        )[1].std()
        for name in (metric, "accuracy")
    }
    return float((spread[metric] / spread["accuracy"]) ** 2)


@dataclass(frozen=True)
class Figures:
    """A build's uncertainty: every form of the expert against the dense model, and the dense model
    against the majority answer (whether the task was learned at all)."""

    against_dense: dict[str, Interval]  # "expert" (PyTorch), "fp32" (ONNX), "int8", "fp16": expert - dense
    against_majority: Interval  # dense - always the most frequent label
    tolerance: float  # the "within" verdicts' tolerance, metric units (the --max-loss budget, else 1 point)

    @property
    def learned(self) -> bool:
        return self.against_majority.low > 0

    def to_json(self) -> dict:
        within = self.tolerance if self.learned else None  # an unlearned task's figures are no pruning result
        return {
            "expert_minus_dense": {name: iv.to_json(within) for name, iv in self.against_dense.items()},
            "dense_minus_majority": {**self.against_majority.to_json(), "learned": self.learned},
        }

    def cell(self, name: str) -> str:
        """One summary-table cell: ``name: -0.2 [-1.2, +0.7] met`` (or why there is no verdict)."""
        interval = self.against_dense.get(name)
        if interval is None:
            return "—"
        verdict = interval.verdict(self.tolerance) if self.learned else "dense NOT LEARNED"
        return f"{name} {interval.points()} {verdict}"


def build_figures(
    metric: str, labels: list[int], dense: list[int], forms: dict[str, list[int]], *, seed: int, tolerance: float
) -> Figures:
    """The intervals of one build: each form's predictions against the dense model's, on the same items (a
    form checked on the first n test items only, as the fp16 variant on CPU, is paired on those n)."""
    against = {
        name: paired_bootstrap(metric, labels[: len(preds)], dense[: len(preds)], preds, seed=seed)
        for name, preds in forms.items()
    }
    return Figures(against, majority_interval(metric, labels, dense, seed=seed), tolerance)


__all__ = [
    "DISAGREEMENT_PRIOR",
    "LEVEL",
    "METHOD",
    "MIN_TRAIN",
    "RESAMPLES",
    "Figures",
    "Interval",
    "average_interval",
    "build_figures",
    "dev_items_for",
    "disagreement",
    "interval_of",
    "majority_interval",
    "metric_factor",
    "paired_bootstrap",
    "resampled_differences",
    "resolvable_points",
]
