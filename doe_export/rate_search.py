"""The accuracy-budget search (``doe build --max-loss``): the largest pruning rate whose expert stays within
the budget on dev, each rate tried recorded with its paired bootstrap interval against the dense model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import evaluate
from .console import log
from .errors import ConfigError
from .specs import SEARCH_RATES, BudgetRule, PruneSpec, RecoverySpec
from .stages import ExpertResult, Splits, calibration_stats, make_expert, scorer
from .uncertainty import DEV_METHOD, DISAGREEMENT_PRIOR, disagreement, paired_bootstrap


@dataclass
class RateSearch:
    """The accuracy-budget search: the expert at the chosen rate (scored on dev and test) and every
    rate tried with its dev metric."""

    expert: ExpertResult
    record: dict
    rate: float


def search_rate(
    dense,
    tokenizer,
    data: Splits,
    prune_spec: PruneSpec,
    recovery_spec: RecoverySpec,
    *,
    max_loss: float,
    rates: tuple[float, ...] = SEARCH_RATES,
    rule: BudgetRule = BudgetRule.CONFIDENT,
    progress: bool = True,
    desc: str = "expert",
) -> RateSearch:
    """The expert at the largest rate in ``rates`` whose dev metric after recovery is at most
    ``max_loss`` points (x100) below the dense model's dev metric — with ``rule`` CONFIDENT, the lower end of
    its 95 % paired interval against the dense model too (the estimate alone, POINT, leaves about an even
    chance that the chosen rate loses more than the budget on new data). Searched on dev only (never test),
    by bisection over the sorted rates (the metric falls with the rate); the attribution pass is
    shared by every try. With heads removed and no fixed head rate, heads follow the same rate.
    Raises ConfigError with the dev metric of every rate tried when none is within the budget."""
    if not max_loss >= 0:
        raise ConfigError(f"--max-loss must be >= 0 points, got {max_loss}")
    rates, rule = tuple(sorted(set(rates))), BudgetRule.parse(rule, "--budget-rule")
    if not rates or not all(0 < r < 1 for r in rates):
        raise ConfigError(f"search rates must be in (0, 1), got {rates}")
    score = scorer(tokenizer, data, dev=True)  # dev decides; test is only reported for the chosen rate
    dense_preds = evaluate.torch_predictions(dense, tokenizer, data.dev)
    dense_dev = evaluate.metric_value(data.metric, data.dev.labels, dense_preds)
    stats = calibration_stats(dense, tokenizer, data.train, prune_spec, progress=progress)
    tried: dict[float, ExpertResult] = {}
    intervals: dict[float, Any] = {}

    def dev_of(rate: float) -> float:
        dev = tried[rate].after.dev
        assert dev is not None  # scored with dev=True above
        return dev

    def attempt(rate: float) -> bool:
        result = make_expert(
            dense,
            tokenizer,
            data,
            replace(prune_spec, rate=rate),
            recovery_spec,
            progress=progress,
            desc=f"{desc} p={rate:g}",
            stats=stats,
            score=score,
        )
        tried[rate] = result
        intervals[rate] = paired_bootstrap(
            data.metric,
            data.dev.labels,
            dense_preds,
            list(result.after.dev_preds or ()),
            seed=prune_spec.seed,
            method=DEV_METHOD,
        )
        log(
            f"{desc} rate search: p={rate:g} dev {data.metric} {dev_of(rate):.4f} (dense {dense_dev:.4f}; expert - "
            f"dense {intervals[rate].points()} points on {len(data.dev)} dev items; budget {max_loss:g} points)"
        )
        within = 100 * (dense_dev - dev_of(rate)) <= max_loss + 1e-9  # float noise of x100
        # confident: the verdict the search record shows for this rate (Interval.verdict) is "met"
        return within and (rule is BudgetRule.POINT or intervals[rate].verdict(max_loss / 100) == "met")

    low, high = -1, len(rates)  # invariant: rates[low] passes (or low = -1), rates[high] fails (or len)
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(rates[middle]):
            low = middle
        else:
            high = middle
    changed = {r: disagreement(dense_preds, tried[r].after.dev_preds) for r in tried}  # record and width share it
    width = _width(max_loss, len(data.dev), intervals, changed)
    if width["dev_items_to_resolve"]:
        log(f"{desc} rate search: {_width_note(width, max_loss)}")
    if low < 0:
        found = ", ".join(f"p={r:g}: {dev_of(r):.4f} ({intervals[r].points()})" for r in sorted(tried))
        wide = f" ({_width_note(width, max_loss)})" if width["dev_items_to_resolve"] else ""
        raise ConfigError(
            f"{desc}: --max-loss {max_loss:g}: no pruning rate kept the dev {data.metric} within {max_loss:g} points "
            f"of the dense model's {dense_dev:.4f} by the {rule} rule ({found}){wide}; raise --max-loss, give "
            "smaller rates, use --budget-rule point, or train the dense model longer"
        )
    chosen = rates[low]
    record = _record(
        data, max_loss, rule, rates, chosen, dense_dev=dense_dev, tried=tried, intervals=intervals, changed=changed
    )
    record["interval_width"] = width
    return RateSearch(tried[chosen], record, chosen)


def _width(max_loss: float, dev_items: int, intervals: dict, changed: dict[float, float]) -> dict:
    """The dev intervals' half-width against the one the split was sized for (half the budget, assuming the
    experts change DISAGREEMENT_PRIOR of the answers), and the dev size the widest measured one implies when it
    is wider (None when the split resolved the budget as planned)."""
    planned = max_loss / 2
    measured = max(50 * (i.high - i.low) for i in intervals.values())
    # percentile intervals wobble by a few per cent between resamplings; a zero budget (search_rate allows it
    # when called directly: --max-loss refuses it) plans no width, so none is compared
    wider = planned > 0 and measured > planned * 1.05
    return {
        "planned_points": planned,
        "measured_points": measured,
        "assumed_disagreement": DISAGREEMENT_PRIOR,
        "measured_disagreement": [min(changed.values()), max(changed.values())],
        "dev_items_to_resolve": int(np.ceil(dev_items * (measured / planned) ** 2)) if wider else None,
    }


def _width_note(width: dict, max_loss: float) -> str:
    low, high = width["measured_disagreement"]
    return (
        f"the dev intervals reach ±{width['measured_points']:.2f} points, not the ±{width['planned_points']:.2f} "
        f"the dev split was sized for: its size assumes experts that change {width['assumed_disagreement']:.0%} "
        f"of the dense model's answers, these changed {low:.1%}–{high:.1%}; about "
        f"{width['dev_items_to_resolve']:,} dev items would resolve {max_loss:g} points as planned"
    )


def _record(
    data,
    max_loss: float,
    rule: BudgetRule,
    rates,
    chosen,
    *,
    dense_dev: float,
    tried: dict,
    intervals: dict,
    changed: dict[float, float],
) -> dict:
    """The manifest's ``pruning.search``: every rate tried with its dev metric, interval and disagreement."""
    return {
        "max_loss_points": max_loss,
        "split": data.dev.name,
        "dense_dev": dense_dev,
        "dev_items": len(data.dev),
        "tried": [
            {
                "rate": r,
                "dev": tried[r].after.dev,
                "vs_dense": intervals[r].to_json(max_loss / 100),
                "disagreement": changed[r],
            }
            for r in sorted(tried)
        ],
        "chosen_rate": chosen,
        "candidates": list(rates),
        "rule": str(rule),
    }


__all__ = ["RateSearch", "search_rate"]
