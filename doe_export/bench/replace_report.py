"""The replace suite's report: tables per task and condition, verdicts, the Pareto plot."""

from __future__ import annotations

from pathlib import Path

from .replace import CANDIDATES
from .report import q as _q


def render_replace(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Replace: the shipped expert against the plain dense model a user already has", ""] + intro
    lines += [
        "Candidates: **expert (shipped)** = the bundle exactly as `doe build` writes it with its defaults, "
        "served by `Router` with its defaults (on CPU: its validated int8 variant); **expert fp32** = the same "
        "bundle's fp32 graph; **expert int8 static** = that fp32 graph after static QDQ int8 (`quantize_static`: "
        "per-channel weights, activation scales fixed from 256 training texts by a 99.999 histogram percentile, "
        "weight MatMuls only) — not shipped, measured beside the bundle's dynamic int8 variant; "
        "**plain dense fp32** = the same fine-tuned dense model exported with "
        "`torch.onnx.export` (TorchScript, no rewrites); **plain dense int8** = that graph after one "
        "`quantize_dynamic` call. All five go through the same `Router` (tokenization, length-sorted "
        "batching), so the comparison includes everything a request costs. Speed-ups are medians of "
        "per-request (or per-repeat) paired ratios; the metric is each candidate's, as served, on the "
        "whole reporting split. With 2 threads every candidate's idle intra-op threads sleep instead of spinning "
        "(`Router(allow_spinning=False)`): with five sessions run in turn, spinning workers of one took the "
        "cores of the next.",
        "",
    ]
    skipped = [r for r in rows if r["kind"] == "skipped"]
    rows = [r for r in rows if r["kind"] == "replace"]
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        first = sub[0]
        lines += [
            f"## {task}: {first['metric']} on {first['split']} (n={first['split_size']})",
            "",
            f"Dense fine-tuned model (PyTorch) {100 * first['dense_pytorch']:.1f}, expert (PyTorch) "
            f"{100 * first['expert_pytorch']:.1f}; FFN widths {first['ffn_widths']}; extra positions per call "
            f"{first['extra_positions']}; build {first['build_seconds']:.0f} s.",
            "",
            "| condition | threads | candidate | metric x100 | p50 ms | p99 ms | items/s | vs plain fp32 | "
            "vs plain int8 | bound |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(
            sub,
            key=lambda r: (
                r["condition"],
                r["items"],
                r["tokens"] or 0,
                r["threads"],
                CANDIDATES.index(r["candidate"]),
            ),
        ):
            cond = (
                f"real texts, {r['items']}/request (tokens p50 {r['tokens_p50']:.0f}, p90 {r['tokens_p90']:.0f})"
                if r["condition"] == "real"
                else f"fixed {r['items']} x {r['tokens']}"
            )
            bound = f"x{r['bound']:.2f}" if "bound" in r else ""
            name = r["candidate"] + (f" ({r['served_precision']})" if r["candidate"] == "expert (shipped)" else "")
            lines.append(
                f"| {cond} | {r['threads']} | {name} | {100 * r['value']:.1f} | "
                f"{1e3 * r['latency_s']['median']:.2f} | {1e3 * r['p99_s']:.2f} | {r['items_per_s']:.1f} | "
                f"x{_q(r['speedup_vs']['plain dense fp32'])} | x{_q(r['speedup_vs']['plain dense int8'])} | "
                f"{bound} |"
            )
        lines.append("")
        for r in skipped:
            if r["task"] == task and r["threads"] == 1:
                lines += [f"Fixed {r['batch']} x {r['tokens']} not measured: {r['reason']}.", ""]
        lines += _verdict(sub)
    plot = _pareto(rows, Path(out_dir))
    if plot:
        lines += [f"![metric vs latency]({plot.name})", ""]
    return lines


def _verdict(rows) -> list[str]:
    """The targets of the comparison, per condition: the expert >= 1.5x faster than the plain export at the
    same precision (fp32 vs fp32; int8 vs int8 where the bundle serves int8) and than plain dense int8
    whatever it serves, at <= 1 point below the dense model; met or missed, with the ratio."""
    first = rows[0]
    shipped_rows = [r for r in rows if r["candidate"] == "expert (shipped)"]
    served = shipped_rows[0]["served_precision"]
    value = shipped_rows[0]["value"]
    loss = 100 * (first["dense_pytorch"] - value)
    lines = [
        f"Verdict (targets: x1.5 over plain dense at the same precision and over plain dense int8; at most 1 "
        f"point below the dense model). Shipped precision: {served}"
        + (f" (int8 recipe: {first['int8_recipe']})" if first.get("int8_recipe") else "")
        + (f"; left out: {first['left_out']}" if first.get("left_out") else "")
        + ".",
        "",
        _metric_verdict(shipped_rows[0], value, first["dense_pytorch"], loss),
    ]
    mark = lambda ratio: f"x{ratio:.3f} ({'met' if ratio >= 1.5 else 'missed'})"  # noqa: E731
    for r in shipped_rows:
        fp32 = next(
            x
            for x in rows
            if x["candidate"] == "expert fp32"
            and x["condition"] == r["condition"]
            and x["items"] == r["items"]
            and x["tokens"] == r["tokens"]
            and x["threads"] == r["threads"]
        )
        cond = f"real x{r['items']}" if r["condition"] == "real" else f"{r['items']} x {r['tokens']}"
        parts = [f"fp32 vs fp32 {mark(fp32['speedup_vs']['plain dense fp32']['median'])}"]
        if served == "int8":
            parts.append(f"int8 vs int8 {mark(r['speedup_vs']['plain dense int8']['median'])}")
        else:
            parts.append(f"shipped ({served}) vs plain int8 {mark(r['speedup_vs']['plain dense int8']['median'])}")
        lines.append(f"- {cond}, {r['threads']} thread(s): " + "; ".join(parts))
    return lines + [""]


def _pareto(rows, out_dir: Path) -> Path | None:
    picked = [r for r in rows if r["condition"] == "real" and r["items"] == 8 and r["threads"] == 1]
    if not picked:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in picked})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    markers = dict(zip(CANDIDATES, "o*Ds^"))
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in picked if r["task"] == task):
            ax.scatter(
                1e3 * r["latency_s"]["median"],
                100 * r["value"],
                marker=markers[r["candidate"]],
                s=80,
                label=r["candidate"],
            )
        ax.set_xlabel("p50 latency per request of 8 real texts, 1 thread (ms)")
        ax.set_ylabel(f"{picked[0]['metric']} x100 as served")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "replace.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _metric_verdict(row: dict, value: float, dense: float, loss: float) -> str:
    """The metric line: the point difference, its 95 % paired bootstrap interval and what the interval allows
    (records written before intervals existed: the point difference alone)."""
    interval = row.get("vs_dense")
    if not interval:
        return (
            f"- metric: shipped {100 * value:.1f} vs dense {100 * dense:.1f}: {abs(loss):.1f} points "
            f"{'below' if loss > 0 else 'above'} — {'met' if loss <= 1.0 else 'missed'}"
        )
    low, high = 100 * interval["low"], 100 * interval["high"]
    return (
        f"- metric: shipped {100 * value:.1f} vs dense {100 * dense:.1f}: {-loss:+.1f} points, 95% interval "
        f"[{low:+.1f}, {high:+.1f}] ({interval['method']}, {interval['resamples']} resamples, seed "
        f"{interval['seed']}) — within 1 point: {interval['within']['verdict']}"
    )
