"""FLOP bounds on the speed-up of a pruned model (design notes section 1).

Per layer and token, with H hidden, I FFN width and L tokens: attention costs ``8H^2 + 4LH`` (both
terms scale with the share of heads kept) and the FFN ``4HI``. Removing a share ``p`` of the FFN
neurons gives at most ``S(p) = 1 / (1 - p f)`` with ``f = I / (2H + L + I)``. Every measured speed-up
is reported beside its bound.
"""

from __future__ import annotations


def ffn_share(hidden: int, ffn: int, tokens: int) -> float:
    """Share of a layer's FLOPs in the FFN: f = I / (2H + L + I)."""
    return ffn / (2 * hidden + tokens + ffn)


def flop_bound(rate: float, hidden: int, ffn: int, tokens: int) -> float:
    """Upper bound on the speed-up from removing a share ``rate`` of FFN neurons: 1 / (1 - p f)."""
    return 1.0 / (1.0 - rate * ffn_share(hidden, ffn, tokens))


def layer_flops(hidden: int, ffn: int, tokens: int, head_share: float = 1.0) -> float:
    """FLOPs per token of one layer: 8H^2 + 4LH for attention (scaled by the share of heads kept) + 4HI."""
    return head_share * (8 * hidden * hidden + 4 * tokens * hidden) + 4 * hidden * ffn


def model_bound(
    hidden: int, *, dense_ffn: list[int], dense_heads: list[int], ffn: list[int], heads: list[int], tokens: int
) -> float:
    """FLOP bound of a pruned model with per-layer FFN widths and head counts over its dense model;
    equals :func:`flop_bound` when only FFN neurons are removed, at the same rate in every layer."""
    dense = sum(layer_flops(hidden, i, tokens) for i in dense_ffn)
    pruned = sum(layer_flops(hidden, i, tokens, h / d) for i, h, d in zip(ffn, heads, dense_heads))
    return dense / pruned


def report_bound(hidden: int, report: dict, tokens: int) -> float:
    """:func:`model_bound` of a prune report (``doe_export.prune.prune_model``'s widths and head counts)."""
    return model_bound(
        hidden,
        dense_ffn=report["ffn_widths_before"],
        dense_heads=report["head_counts_before"],
        ffn=report["ffn_widths"],
        heads=report["head_counts"],
        tokens=tokens,
    )


__all__ = ["ffn_share", "flop_bound", "layer_flops", "model_bound", "report_bound"]
