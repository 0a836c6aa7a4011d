"""``layers``: FFN neurons vs attention heads vs both, removed by DoE at matched parameter budgets on
real tasks; the task metric after recovery next to the speed-up over the dense graph and the FLOP
bound of each expert's own shape."""

from __future__ import annotations

from pathlib import Path

from ..console import log
from ..flops import report_bound
from . import common
from .report import q as _q
from .workbench import SuiteConfig, Workbench, random_feeds, record_flow, time_sessions


def matched_rates(shape: dict, budget: float, max_rate: float) -> dict[str, tuple[float, float]]:
    """(FFN rate, head rate) per layer type that removes ``budget`` of the FFN + attention weights."""
    ffn = 2 * shape["hidden"] * shape["ffn"]
    attention = 4 * shape["hidden"] * shape["hidden"]
    total = ffn + attention
    out = {"both": (budget, budget)}
    if budget * total / ffn < max_rate:
        out["ffn"] = (budget * total / ffn, 0.0)
    if budget * total / attention < max_rate:
        out["attention"] = (0.0, budget * total / attention)
    return {k: out[k] for k in ("ffn", "attention", "both") if k in out}


def run_layers(config: SuiteConfig, bench: Workbench) -> list[dict]:
    shape = bench.shape
    feeds = random_feeds(shape["vocab"], config.batch, config.tokens, config.seed)
    seq = config.tokens + (bench.flow.adapt.prompt_length or 0)
    records = []
    for task in config.layer_tasks:
        runner = bench.runner(task)
        dense_value = runner.score(runner.adapted).test
        dense_path, _ = bench.export(runner.adapted, f"{task}-dense", fuse=True)
        records.append(
            {
                "kind": "dense",
                "task": task,
                "metric": runner.data.metric,
                "value": dense_value,
                "split": runner.test.name,
                "split_size": len(runner.test),
                "majority": _majority(runner),
            }
        )
        for budget in config.budgets:
            for layer_types, (ffn_rate, head_rate) in matched_rates(shape, budget, config.max_rate).items():
                model, report, before, after = bench.expert(task, layer_types, ffn_rate, head_rate)
                path, checks = bench.export(model, f"{task}-{layer_types}-{budget:g}", fuse=True)
                times = time_sessions({"dense": dense_path, "expert": path}, feeds, config)
                speedup = common.quantiles(common.ratios(times, "dense", "expert"))
                bound = report_bound(shape["hidden"], report, seq)
                records.append(
                    {
                        "kind": "layers",
                        "task": task,
                        "layer_types": layer_types,
                        "budget": budget,
                        "ffn_rate": ffn_rate,
                        "head_rate": head_rate,
                        "metric": runner.data.metric,
                        "dense_value": dense_value,
                        "value_before_recovery": before,
                        "value": after,
                        "params_before": report["params_before"],
                        "params_after": report["params_after"],
                        "ffn_widths": report["ffn_widths"],
                        "head_counts": report["head_counts"],
                        "batch": config.batch,
                        "tokens": config.tokens,
                        "sequence": seq,
                        "repeats": len(times["dense"]),
                        "dense_latency_s": common.quantiles(times["dense"]),
                        "expert_latency_s": common.quantiles(times["expert"]),
                        "speedup": speedup,
                        "bound": bound,
                        "share_of_bound": speedup["median"] / bound,
                        "max_abs_diff": checks,
                    }
                )
                log(
                    f"[layers] {task} {layer_types} budget {budget:g} (FFN {ffn_rate:.2f}, heads {head_rate:.2f}): "
                    f"{100 * dense_value:.1f} -> {100 * after:.1f} ({100 * before:.1f} before recovery); "
                    f"x{speedup['median']:.2f} (bound x{bound:.2f})"
                )
    return records


def _majority(runner) -> float:
    from ..study import majority_baseline

    return majority_baseline(runner.data, runner.flow)["value"]


def _render_layers(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Layer types: FFN neurons vs attention heads vs both, at matched parameter budgets", ""] + intro
    flow = record_flow(cfg)
    lines += [
        f"DoE scores on {flow.prune.calib_examples} calibration examples of the {flow.adapt.mode}-adapted model, "
        f"{flow.recovery.epochs} recovery epoch(s) ({flow.recovery.params}, distill {flow.recovery.distill:g}) on "
        f"{flow.recovery.max_examples or 'all training'} examples; graphs with onnxruntime fusions (validated "
        f"against PyTorch after every rewrite); speed at batch {cfg['batch']} x {cfg['tokens']} tokens (+ "
        f"{flow.adapt.prompt_length} prompt). Budget = share of the FFN + attention projection weights removed; "
        "the bound is the FLOP bound of each expert's own widths and head counts.",
        "",
    ]
    dense = {r["task"]: r for r in rows if r["kind"] == "dense"}
    data = [r for r in rows if r["kind"] == "layers"]
    for task, d in dense.items():
        lines += [
            f"## {task}: {d['metric']} on {d['split']} (n={d['split_size']}); dense {100 * d['value']:.1f}, "
            f"majority label {100 * d['majority']:.1f}",
            "",
            "| budget | layer types | FFN rate | head rate | heads kept | params (M) | metric (before recovery) "
            "| speed-up | bound | share |",
            "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in sorted((r for r in data if r["task"] == task), key=lambda r: (r["budget"], r["layer_types"])):
            lines.append(
                f"| {r['budget']:g} | {r['layer_types']} | {r['ffn_rate']:.2f} | {r['head_rate']:.2f} | "
                f"{','.join(map(str, r['head_counts']))} | {r['params_before'] / 1e6:.1f} -> "
                f"{r['params_after'] / 1e6:.1f} | {100 * r['value']:.1f} ({100 * r['value_before_recovery']:.1f})"
                f" | x{_q(r['speedup'])} | x{r['bound']:.2f} | {r['share_of_bound']:.0%} |"
            )
        lines.append("")
    plot = _plot_layers(data, dense, out_dir)
    if plot:
        lines += [f"![layer types]({plot.name})", ""]
    return lines


def _plot_layers(data, dense, out_dir) -> Path | None:
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dense)
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    colors = {"ffn": "tab:blue", "attention": "tab:orange", "both": "tab:green"}
    for col, task in enumerate(tasks):
        sub = [r for r in data if r["task"] == task]
        budgets = sorted({r["budget"] for r in sub})
        for offset, kind in enumerate(("ffn", "attention", "both")):
            sel = {r["budget"]: r for r in sub if r["layer_types"] == kind}
            xs = [i + (offset - 1) * 0.27 for i, b in enumerate(budgets) if b in sel]
            picked = [sel[b] for b in budgets if b in sel]
            axes[0][col].bar(xs, [r["speedup"]["median"] for r in picked], 0.25, color=colors[kind], label=kind)
            axes[0][col].scatter(xs, [r["bound"] for r in picked], marker="_", s=200, color="black")
            axes[1][col].bar(xs, [100 * r["value"] for r in picked], 0.25, color=colors[kind], label=kind)
        for row in (0, 1):
            axes[row][col].set_xticks(range(len(budgets)), [f"{b:g}" for b in budgets])
            axes[row][col].set_xlabel("budget (share of FFN + attention weights removed)")
        axes[0][col].set_ylabel("speed-up over dense (black: FLOP bound)")
        axes[1][col].axhline(100 * dense[task]["value"], color="black", linestyle="--", label="dense")
        axes[1][col].set_ylabel(f"{dense[task]['metric']} x100 after recovery")
        low = min([100 * r["value"] for r in sub] + [100 * dense[task]["value"]])
        axes[1][col].set_ylim(max(0, low - 5), None)
        axes[0][col].set_title(task)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "layers.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
