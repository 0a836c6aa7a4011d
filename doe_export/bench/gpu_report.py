"""The gpu suite's report: per shape a table of every cell, the verdict of each target, and a latency vs
throughput plot (each candidate's points over the batch sizes: the Pareto front of what it can serve)."""

from __future__ import annotations

from pathlib import Path

from .gpu import DENSE_ORT, EAGER, EXPERTS, NO_GRAPHS

# the targets (H200, fp16): at batch x tokens >= 32 x 128 the shipped expert is >= x1.3 over PyTorch eager
# fp16, never slower anywhere; over the best onnxruntime fp16 dense graph >= x1.3 (FFN) and >= x1.6 (FFN + heads)
BIG_CELL = 32 * 128
OVER_EAGER, OVER_ORT = 1.3, {"expert ffn (shipped)": 1.3, "expert ffn+heads (shipped)": 1.6}
SINGLE_TEXT_S = 0.5e-3  # one 32-token text through Router on CUDA, MiniLM


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}"


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| batch x tokens | candidate | p50 ms | p99 ms | items/s | vs eager | vs best ORT dense | bound |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = [EAGER, *DENSE_ORT, *EXPERTS, NO_GRAPHS]
    for r in sorted(rows, key=lambda r: (r["batch"], r["tokens"], order.index(r["candidate"]))):
        bound = f"x{r['bound']:.2f}" if r.get("bound") else ""
        lines.append(
            f"| {r['batch']} x {r['tokens']} | {r['candidate']} | {_ms(r['latency_s']['median'])} | {_ms(r['p99_s'])} "
            f"| {r['items_per_s']:.0f} | x{r['speedup_vs_eager']['median']:.2f} | "
            f"x{r['speedup_vs_best_ort_dense']['median']:.2f} | {bound} |"
        )
    return lines


def verdicts(rows: list[dict], model: str) -> list[str]:
    """One line per target: met or missed, with the cells that decide it."""
    lines = []
    for candidate in EXPERTS:
        mine = [r for r in rows if r["candidate"] == candidate]
        if not mine:
            continue
        big = [r for r in mine if r["batch"] * r["tokens"] >= BIG_CELL]
        slower = [f"{r['batch']}x{r['tokens']}" for r in mine if r["speedup_vs_eager"]["median"] < 1.0]
        under = [
            f"{r['batch']}x{r['tokens']} x{r['speedup_vs_eager']['median']:.2f}"
            for r in big
            if r["speedup_vs_eager"]["median"] < OVER_EAGER
        ]
        lines.append(
            f"- {candidate} vs PyTorch eager fp16: >= x{OVER_EAGER} at >= 32 x 128 "
            f"{'met' if big and not under else 'missed'}"
            + (f" ({', '.join(under)})" if under else "")
            + f"; never slower {'met' if not slower else 'missed (' + ', '.join(slower) + ')'}"
        )
        need = OVER_ORT[candidate]
        short = [
            f"{r['batch']}x{r['tokens']} x{r['speedup_vs_best_ort_dense']['median']:.2f}"
            for r in big
            if r["speedup_vs_best_ort_dense"]["median"] < need
        ]
        lines.append(
            f"- {candidate} vs the best onnxruntime fp16 dense graph: >= x{need} at >= 32 x 128 "
            f"{'met' if big and not short else 'missed'}" + (f" ({', '.join(short)})" if short else "")
        )
    single = [r for r in rows if r["candidate"] == EXPERTS[0] and r["batch"] == 1 and r["tokens"] == 32]
    if model == "minilm" and single:
        p50 = single[0]["latency_s"]["median"]
        lines.append(
            f"- one 32-token text through Router (MiniLM): {_ms(p50)} ms, target <= {_ms(SINGLE_TEXT_S)} ms: "
            f"{'met' if p50 <= SINGLE_TEXT_S else 'missed'}"
        )
    return lines


def _plot(rows: list[dict], out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the lent GPU machine may have no matplotlib: re-render here with --render-only
        return None
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for candidate in [EAGER, *DENSE_ORT, *EXPERTS, NO_GRAPHS]:
            for tokens in sorted({r["tokens"] for r in rows}):
                points = sorted(
                    (r["items_per_s"], r["latency_s"]["median"])
                    for r in rows
                    if r["model"] == model and r["candidate"] == candidate and r["tokens"] == tokens
                )
                if points:
                    xs, ys = zip(*points)
                    ax.plot(
                        xs,
                        [1e3 * y for y in ys],
                        marker="o",
                        linewidth=2.2 if candidate in EXPERTS else 1.0,
                        label=f"{candidate}, {tokens} tokens",
                    )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="items/s (over batch sizes)",
            ylabel="p50 latency, ms",
            title=f"{model}: latency vs throughput (lower right is better)",
        )
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "gpu.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_gpu(rows: list[dict], cfg: dict, intro: list[str], out_dir: Path) -> list[str]:
    lines = [
        "# GPU: the shipped experts against what GPU users run today",
        "",
        *intro,
        "Random weights (a graph's speed does not depend on them), bundles built by `doe build`'s own code "
        "(data-free random attribution, widths aligned for tensor cores, fp16 CUDA variant with fused attention). "
        "Every candidate answers the same texts, tokenization included, interleaved in rotated order. "
        f"Targets: shipped expert >= x{OVER_EAGER} over PyTorch eager fp16 at batch x tokens >= 32 x 128 and never "
        "slower; over the best onnxruntime fp16 dense graph >= x1.3 (FFN) and >= x1.6 (FFN + heads); one "
        "32-token text on MiniLM <= 0.5 ms. The dense onnxruntime graphs and the `no CUDA graphs` row run "
        "without CUDA graphs (what a user of onnxruntime alone gets).",
        "",
    ]
    data = [r for r in rows if r["kind"] == "gpu"]
    for model in sorted({r["model"] for r in data}):
        mine = [r for r in data if r["model"] == model]
        lines += [f"## {model}", "", *verdicts(mine, model), "", *_table(mine), ""]
    skipped = [r for r in rows if r["kind"] == "skipped"]
    if skipped:
        lines += [
            "Not measured: " + "; ".join(f"{r['model']} {r['batch']}x{r['tokens']} ({r['reason']})" for r in skipped),
            "",
        ]
    plot = _plot(data, Path(out_dir))
    if plot:
        lines += [f"![latency vs throughput]({plot.name})", ""]
    return lines


__all__ = ["render_gpu", "verdicts"]
