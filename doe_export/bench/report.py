"""The one report helper of the suites: the Markdown intro every report starts with, and how
quantiles print."""

from __future__ import annotations


def intro(head: dict, cfg: dict) -> list[str]:
    model = "tiny random BERT" if cfg.get("tiny") else f"`{cfg['model']}`"
    return [
        f"Model {model}; CPU {head['cpu']} ({head['cores']} cores), {cfg['threads']} intra-op thread(s); "
        f"onnxruntime {head['versions'].get('onnxruntime')}, torch {head['versions'].get('torch')}. "
        f"Recorded {head['created']}. Ratios are medians of per-repeat ratios of interleaved runs on the same "
        "inputs; [p25, p75] in brackets.",
        "",
    ]


def q(quantiles: dict, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    """``median [p25, p75]`` of a quantiles dict, scaled."""
    return (
        f"{fmt.format(quantiles['median'] * scale)} [{fmt.format(quantiles['p25'] * scale)}, "
        f"{fmt.format(quantiles['p75'] * scale)}]"
    )
