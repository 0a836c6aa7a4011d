"""``peers``: on the same inputs in one run: PyTorch eager dense, ONNX dense, ONNX expert, the expert
after onnxruntime fusions, and int8 dynamic quantization (FFN-only and both layer types), each with
its task metric; optionally the dense model exported by ``optimum-cli`` in another environment."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..console import log
from ..errors import ConfigError
from . import common
from .report import q as _q
from .workbench import SuiteConfig, Workbench, random_feeds, time_sessions


def _graphs(config: SuiteConfig, bench: Workbench, task: str) -> tuple[dict, dict, dict]:
    """The peers' ONNX graphs (dense, expert, fused, int8, both layer types): paths, metrics, notes."""
    from ..variants import quantize_int8

    dense = bench.runner(task).adapted
    paths, values, notes = {}, {}, {}
    paths["onnx dense"], _ = bench.export(dense, f"peers-{task}-dense", fuse=False)
    paths["onnx dense fused"], _ = bench.export(dense, f"peers-{task}-dense", fuse=True)
    ffn_model, _, _, ffn_value = bench.expert(task, "ffn", config.ffn_rate, 0.0)
    paths["onnx expert"], _ = bench.export(ffn_model, f"peers-{task}-ffn", fuse=False)
    paths["onnx expert fused"], _ = bench.export(ffn_model, f"peers-{task}-ffn", fuse=True)
    paths["onnx expert fused int8"] = bench.work / f"peers-{task}-ffn.fused.int8.onnx"
    quantize_int8(paths["onnx expert fused"], paths["onnx expert fused int8"])
    both_model, both_report, _, both_value = bench.expert(task, "both", *config.both_rates)
    paths["onnx both fused"], _ = bench.export(both_model, f"peers-{task}-both", fuse=True)
    paths["onnx both fused int8"] = bench.work / f"peers-{task}-both.fused.int8.onnx"
    quantize_int8(paths["onnx both fused"], paths["onnx both fused int8"])
    for name, path in paths.items():
        values[name] = bench.onnx_metric(task, path)
    notes["onnx expert"] = f"FFN p={config.ffn_rate:g}; PyTorch metric {100 * ffn_value:.1f}"
    notes["onnx both fused"] = (
        f"FFN p={config.both_rates[0]:g} + heads p={config.both_rates[1]:g} "
        f"(heads {both_report['head_counts']}); PyTorch metric {100 * both_value:.1f}"
    )
    return paths, values, notes


def run_peers(config: SuiteConfig, bench: Workbench) -> list[dict]:
    import torch

    task = config.peers_task
    runner = bench.runner(task)
    shape = bench.shape
    metric = runner.data.metric
    dense = runner.adapted
    dense_value = runner.score(dense).test
    paths, values, notes = _graphs(config, bench, task)

    feeds = random_feeds(shape["vocab"], config.batch, config.tokens, config.seed)
    extra_sessions = {}
    if config.optimum_python:
        optimum_path, optimum_version = export_with_optimum(
            config.optimum_python, bench.loaded.path, bench.work / "optimum", len(runner.data.labels)
        )
        optimum_session = common.session(optimum_path, config.threads)
        optimum_feeds = {
            i.name: (feeds[i.name] if i.name in feeds else np.zeros_like(feeds["input_ids"]))
            for i in optimum_session.get_inputs()
        }
        extra_sessions["optimum-cli dense (base model, own head)"] = lambda: optimum_session.run(None, optimum_feeds)
        notes["optimum-cli dense (base model, own head)"] = (
            f"optimum-onnx {optimum_version}, exported in a separate environment from the base model with its "
            f"untrained classification head and no soft prompt ({bench.flow.adapt.prompt_length} fewer positions): a speed "
            "peer only, no task metric"
        )
        values["optimum-cli dense (base model, own head)"] = None
    torch_ids, torch_mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:

        def eager():
            with torch.inference_mode():
                dense(torch_ids, torch_mask)

        times = time_sessions(paths, feeds, config, extra={"pytorch eager dense": eager, **extra_sessions})
    finally:
        torch.set_num_threads(threads)
    values["pytorch eager dense"] = dense_value
    records = []
    base = "pytorch eager dense"
    for name in [base] + list(paths) + list(extra_sessions):
        speedup = common.quantiles(common.ratios(times, base, name))
        over_onnx = common.quantiles(common.ratios(times, "onnx dense", name))
        records.append(
            {
                "kind": "peer",
                "task": task,
                "peer": name,
                "metric": metric,
                "value": values[name],
                "metric_split": runner.test.name,
                "metric_split_size": len(runner.test),
                "batch": config.batch,
                "tokens": config.tokens,
                "repeats": len(times[name]),
                "latency_s": common.quantiles(times[name]),
                "speedup_vs_eager": speedup,
                "speedup_vs_onnx_dense": over_onnx,
                "note": notes.get(name, ""),
            }
        )
        shown = "n/a" if values[name] is None else f"{100 * values[name]:.1f}"
        log(
            f"[peers] {name}: {metric} {shown}, x{speedup['median']:.2f} vs eager, "
            f"x{over_onnx['median']:.2f} vs ONNX dense"
        )
    return records


def export_with_optimum(python: str, model_dir: str, out: Path, num_labels: int) -> tuple[Path, str]:
    """Run ``optimum-cli export onnx`` in another Python environment; return the graph and the version."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        [python, "-c", "from importlib.metadata import version; print(version('optimum-onnx'))"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise ConfigError(
            f"--optimum-python {python}: optimum-onnx is not importable there "
            f"({(probe.stderr.strip().splitlines() or ['no output'])[-1][-300:]}); "
            "create that environment with: python -m venv ENV && ENV/bin/pip install torch==2.13.0 "
            "optimum-onnx onnx onnxruntime 'transformers<4.58'"
        )
    command = [
        python,
        "-m",
        "optimum.exporters.onnx",
        "--model",
        str(model_dir),
        "--task",
        "text-classification",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    path = out / "model.onnx"
    if done.returncode != 0 or not path.is_file():
        raise ConfigError(f"optimum export failed ({' '.join(command)}): {done.stderr.strip()[-1000:]}")
    return path, probe.stdout.strip()


def _render_peers(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Peers: what users run today vs the experts, on the same inputs", ""] + intro
    if rows:
        r0 = rows[0]
        lines += [
            f"Task {r0['task']}: {r0['metric']} on {r0['metric_split']} (n={r0['metric_split_size']}), "
            f"speed at batch {r0['batch']} x {r0['tokens']} tokens (+ prompt). "
            + (
                "The optimum-cli row is the base model exported by optimum-onnx in a separate environment "
                "(transformers < 4.58), run here through a plain onnxruntime session interleaved with the "
                "others; `ORTModelForSequenceClassification` adds its own Python wrapper on top. "
                if any(r["peer"].startswith("optimum") for r in rows)
                else "The optimum-cli peer needs `--optimum-python` (a separate environment). "
            )
            + "fp16 belongs to the GPU run.",
            "",
            "| peer | metric x100 | latency ms | speed-up vs PyTorch eager | speed-up vs ONNX dense | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            value = "n/a" if r["value"] is None else f"{100 * r['value']:.1f}"
            lines.append(
                f"| {r['peer']} | {value} | {_q(r['latency_s'], 1e3)} | "
                f"x{_q(r['speedup_vs_eager'])} | x{_q(r['speedup_vs_onnx_dense'])} | {r['note']} |"
            )
        lines.append("")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        names = [r["peer"] for r in rows]
        ax.barh(names, [r["speedup_vs_onnx_dense"]["median"] for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            label = "" if r["value"] is None else f"  {100 * r['value']:.1f}"
            ax.text(r["speedup_vs_onnx_dense"]["median"], i, label, va="center", fontsize=8)
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(f"speed-up over ONNX dense fp32 (label: {rows[0]['metric']} x100)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out_dir / "peers.png", dpi=100)
        plt.close(fig)
        lines += ["![peers](peers.png)", ""]
    return lines
