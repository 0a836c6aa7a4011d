"""``replace``: the comparison users decide by.

The bundle exactly as ``doe build`` ships it (its defaults), served by ``Router`` with its defaults,
against what a user would deploy without us: the same base model fine-tuned the same way and
exported plainly (``torch.onnx.export``, no rewrites, no soft prompt), in fp32 and after one
``onnxruntime.quantization.quantize_dynamic`` call. Every candidate is served through the same
``Router`` (same tokenizer, batching and thread settings), so tokenization is included alike.

Per task and thread count:

- ``real``: the task's test texts, their own length distribution, requests of 1 and of 8 items in
  test order; every candidate answers every request (order rotated per request); p50/p99 latency,
  items/s, and the per-request speed-up over each plain graph (median of paired ratios);
- ``fixed``: ``session.run`` of each candidate's served session on 8 x 32 and 8 x 128 token ids cut
  from real test texts (the graph alone);
- the task metric of each candidate as served, on the whole test split, beside every speed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..console import log
from . import common
from .report import q as _q
from .workbench import SuiteConfig, Workbench

CANDIDATES = ("expert (shipped)", "expert fp32", "expert int8 static", "plain dense fp32", "plain dense int8")
BASES = ("plain dense fp32", "plain dense int8")


def _side_bundle(root: Path, shipped: Path, name: str, graph: Path, dense: bool) -> Path:
    """A graph as a bundle beside the shipped one (its tokenizer and task), served as-is by the same Router."""
    from ..export import file_entry, initializer_table

    manifest = json.loads((shipped / "manifest.json").read_text())
    folder = root / f"{manifest['task']['name']}-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(graph, folder / "model.onnx")
    shutil.copy(shipped / "tokenizer.json", folder / "tokenizer.json")
    side = {**manifest, "task": {**manifest["task"], "name": folder.name}}
    side["onnx"] = {**manifest["onnx"], **file_entry(folder, "model.onnx"), "variants": {}, "rewrites": {},
                    "precision": "fp32",  # served as-is: the Router picks this one graph
                    "initializers": initializer_table(folder / "model.onnx")}
    if dense:  # the plain export: no session settings of ours, the dense architecture
        side["onnx"]["session"] = {}
        side["architecture"] = {**manifest["architecture"], "ffn_widths": manifest["architecture"]["ffn_widths_dense"],
                                "num_heads": manifest["architecture"]["num_heads_dense"]}
    (folder / "manifest.json").write_text(json.dumps(side, indent=2))
    return folder


def _plain_bundles(root: Path, shipped: Path, dense, tokenizer, test) -> dict[str, Path]:
    """The plain dense graphs (fp32, int8) as bundles beside the shipped one, served by the same Router."""
    from ..export import encode_sample, export_onnx, quantize_int8

    task = shipped.name
    fp32 = root / f"{task}-plain.onnx"
    export_onnx(dense, fp32, *encode_sample(tokenizer, test.inputs), exporter="torchscript")
    int8 = root / f"{task}-plain.int8.onnx"
    quantize_int8(fp32, int8)
    return {name: _side_bundle(root, shipped, name, graph, dense=True)
            for name, graph in (("plain-fp32", fp32), ("plain-int8", int8))}


def _static_bundle(root: Path, shipped: Path, tokenizer, train, batches: int) -> Path:
    """The shipped fp32 expert after static QDQ int8, calibrated on batches of 8 training texts: what the
    bundle's dynamic int8 variant is measured against (issue: measure both)."""
    from ..export import calibration_feeds, quantize_int8_static

    feeds = calibration_feeds(tokenizer, train.inputs, batches)
    graph = root / f"{shipped.name}-expert.int8-static.onnx"
    quantize_int8_static(shipped / "model.onnx", graph, feeds)
    return _side_bundle(root, shipped, "int8-static", graph, dense=False)


def _served_metric(router, task: str, test, metric: str) -> float:
    from .. import evaluate

    preds = [p.label_id for p in router.predict(task, test.inputs)]
    return evaluate.metric_value(metric, test.labels, preds)


def _fixed_feeds(tokenizer, texts: list, batch: int, tokens: int) -> dict | None:
    """[batch, tokens] ids cut from real texts that are at least that long (None if too few are)."""
    from doe_runtime.tokenization import encode_batch

    ids, mask = encode_batch(tokenizer, texts)
    long_enough = np.flatnonzero(mask.sum(1) >= tokens)
    if len(long_enough) < batch:
        return None
    picked = ids[long_enough[:batch], :tokens].copy()
    picked[:, -1] = ids[long_enough[:batch], mask[long_enough[:batch]].sum(1) - 1]  # end with the [SEP] id
    return {"input_ids": picked, "attention_mask": np.ones_like(picked)}


def run_replace(config: SuiteConfig, bench: Workbench) -> list[dict]:
    from doe_runtime import Router

    from .. import stages
    from ..loading import fast_tokenizer
    from ..pipeline import BuildConfig, build_task

    records = []
    threads_list = sorted({1, max(1, os.cpu_count() or 1)})
    for task in config.replace_tasks:
        data = bench.task_data(task)
        root = bench.work / "replace" / task
        shutil.rmtree(root, ignore_errors=True)
        build = BuildConfig(model=config.model, tasks=(task,), data_dir=config.data_dir, out_dir=str(root),
                            progress=bench.progress, **_build_overrides(config))
        start = time.perf_counter()
        result, dense, _ = build_task(build, bench.loaded, data, return_models=True)
        build_seconds = time.perf_counter() - start
        spec_data = build.specs()[0]
        splits = stages.Splits.of(data, spec_data)
        test, metric = splits.test, data.metric  # exactly the split the build reports on
        shipped = Path(result.bundle)
        tokenizer = fast_tokenizer(bench.loaded.hf_tokenizer, spec_data.max_length)
        folders = _plain_bundles(root, shipped, dense, tokenizer, test)
        folders["int8-static"] = _static_bundle(root, shipped, tokenizer, splits.train, 2 if config.tiny else 32)
        manifest = json.loads((shipped / "manifest.json").read_text())
        for threads in threads_list:
            # several sessions run in turn here: with more than one thread, idle workers of one session would spin
            # on the cores the next one needs, so every candidate's threads sleep when idle (allow_spinning=False)
            common_options = dict(device="cpu", intra_op_threads=threads, allow_spinning=threads == 1)
            routers = {
                "expert (shipped)": (Router(root, **common_options), task),
                "expert fp32": (Router(root, precision="fp32", **common_options), task),
                "expert int8 static": (Router(root, **common_options), folders["int8-static"].name),
                "plain dense fp32": (Router(root, **common_options), folders["plain-fp32"].name),
                "plain dense int8": (Router(root, **common_options), folders["plain-int8"].name),
            }
            values = {name: _served_metric(r, t, test, metric) for name, (r, t) in routers.items()}
            served = routers["expert (shipped)"][0].info(task)
            for items in (1, 8):
                requests = [test.inputs[i: i + items] for i in range(0, len(test), items)]
                requests = requests[: (120 if items == 1 else 60) if not config.tiny else 4]
                runners = {name: (lambda r=r, t=t: [r.predict(t, request) for request in requests])
                           for name, (r, t) in routers.items()}
                times = {name: [] for name in routers}
                for name, (r, t) in routers.items():  # warm-up
                    r.predict(t, requests[0])
                for index, request in enumerate(requests):
                    names = list(routers)
                    for name in names[index % len(names):] + names[: index % len(names)]:
                        r, t = routers[name]
                        t0 = time.perf_counter()
                        r.predict(t, request)
                        times[name].append(time.perf_counter() - t0)
                del runners
                lengths = [len(routers["expert fp32"][0]._expert(task).tokenizer.encode(*x).ids if isinstance(x, tuple)
                               else routers["expert fp32"][0]._expert(task).tokenizer.encode(x).ids)
                           for request in requests for x in request]
                for name in routers:
                    records.append(_record(task, name, "real", threads, items, None, times, values, metric, test,
                                           served, manifest, result, build_seconds,
                                           {"tokens_p50": float(np.median(lengths)),
                                            "tokens_p90": float(np.percentile(lengths, 90)), "requests": len(requests)}))
                log(f"[replace] {task} real texts x{items}, {threads} thread(s): "
                    + ", ".join(f"{n} p50 {1e3 * np.median(times[n]):.1f} ms ({100 * values[n]:.1f})" for n in routers))
            for batch, tokens in ((8, 32), (8, 128)):
                tokenizer = routers["expert fp32"][0]._expert(task).tokenizer
                feeds = _fixed_feeds(tokenizer, test.inputs, batch, min(tokens, spec_data.max_length))
                if feeds is None:
                    records.append({"kind": "skipped", "task": task, "threads": threads, "batch": batch, "tokens": tokens,
                                    "reason": f"fewer than {batch} test texts of {tokens} tokens or more"})
                    continue
                sessions = {name: r._expert(t).session for name, (r, t) in routers.items()}
                run = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
                times = common.paired_timing(run, config.repeats, warmup=1, min_seconds=config.min_seconds)
                for name in routers:
                    records.append(_record(task, name, "fixed", threads, batch, feeds["input_ids"].shape[1], times,
                                           values, metric, test, served, manifest, result, build_seconds, {}))
                log(f"[replace] {task} fixed {batch}x{feeds['input_ids'].shape[1]}, {threads} thread(s): "
                    + ", ".join(f"{n} x{np.median(common.ratios(times, 'plain dense fp32', n)):.2f}" for n in routers))
    return records


def _build_overrides(config: SuiteConfig) -> dict:
    """`doe build`'s defaults, except the caps the quick mode needs."""
    if not config.tiny:
        return {}
    flow = config.study_config()
    return dict(epochs=flow.epochs, max_train=flow.max_train, max_dev=flow.max_dev, max_eval=flow.max_eval,
                max_length=flow.max_length, calib_examples=flow.calib_examples, fp16=False)


def _record(task, name, condition, threads, items, tokens, times, values, metric, test, served, manifest, result,
            build_seconds, extra) -> dict:
    latencies = times[name]
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    record = {"kind": "replace", "task": task, "candidate": name, "condition": condition, "threads": threads,
              "items": items, "tokens": tokens, "repeats": len(latencies),
              "latency_s": common.quantiles(latencies), "p99_s": p99,
              "items_per_s": items / float(np.median(latencies)),
              "speedup_vs": {base: common.quantiles(common.ratios(times, base, name)) for base in BASES},
              "metric": metric, "value": values[name], "split": test.name, "split_size": len(test),
              "served_precision": served["precision"] if name == "expert (shipped)" else
              {"plain dense int8": "int8", "expert int8 static": "int8 static QDQ"}.get(name, "fp32"),
              "extra_positions": manifest["adaptation"].get("prompt_length", 0),
              "dense_pytorch": result.dense, "expert_pytorch": result.expert,
              "ffn_widths": manifest["architecture"]["ffn_widths"], "build_seconds": build_seconds,
              "int8_recipe": manifest["onnx"].get("variants", {}).get("int8", {}).get("recipe"),
              "left_out": manifest["quality"].get("variants_left_out", {}), **extra}
    if name.startswith("expert"):
        arch = manifest["architecture"]
        seq = (tokens or extra.get("tokens_p50") or 64) + record["extra_positions"]
        record["bound"] = common.model_bound(arch["hidden_size"], arch["ffn_widths_dense"], arch["num_heads_dense"],
                                             arch["ffn_widths"], arch["num_heads"], int(seq))
    return record


def render_replace(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Replace: the shipped expert against the plain dense model a user already has", ""] + intro
    lines += ["Candidates: **expert (shipped)** = the bundle exactly as `doe build` writes it with its defaults, "
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
              "cores of the next.", ""]
    skipped = [r for r in rows if r["kind"] == "skipped"]
    rows = [r for r in rows if r["kind"] == "replace"]
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        first = sub[0]
        lines += [f"## {task}: {first['metric']} on {first['split']} (n={first['split_size']})", "",
                  f"Dense fine-tuned model (PyTorch) {100 * first['dense_pytorch']:.1f}, expert (PyTorch) "
                  f"{100 * first['expert_pytorch']:.1f}; FFN widths {first['ffn_widths']}; extra positions per call "
                  f"{first['extra_positions']}; build {first['build_seconds']:.0f} s.", "",
                  "| condition | threads | candidate | metric x100 | p50 ms | p99 ms | items/s | vs plain fp32 | "
                  "vs plain int8 | bound |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(sub, key=lambda r: (r["condition"], r["items"], r["tokens"] or 0, r["threads"],
                                            CANDIDATES.index(r["candidate"]))):
            cond = (f"real texts, {r['items']}/request (tokens p50 {r['tokens_p50']:.0f}, p90 {r['tokens_p90']:.0f})"
                    if r["condition"] == "real" else f"fixed {r['items']} x {r['tokens']}")
            bound = f"x{r['bound']:.2f}" if "bound" in r else ""
            name = r["candidate"] + (f" ({r['served_precision']})" if r["candidate"] == "expert (shipped)" else "")
            lines.append(f"| {cond} | {r['threads']} | {name} | {100 * r['value']:.1f} | "
                         f"{1e3 * r['latency_s']['median']:.2f} | {1e3 * r['p99_s']:.2f} | {r['items_per_s']:.1f} | "
                         f"x{_q(r['speedup_vs']['plain dense fp32'])} | x{_q(r['speedup_vs']['plain dense int8'])} | "
                         f"{bound} |")
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
    lines = [f"Verdict (targets: x1.5 over plain dense at the same precision and over plain dense int8; at most 1 "
             f"point below the dense model). Shipped precision: {served}"
             + (f" (int8 recipe: {first['int8_recipe']})" if first.get("int8_recipe") else "")
             + (f"; left out: {first['left_out']}" if first.get("left_out") else "") + ".", "",
             f"- metric: shipped {100 * value:.1f} vs dense {100 * first['dense_pytorch']:.1f}: {abs(loss):.1f} points "
             f"{'below' if loss > 0 else 'above'} — {'met' if loss <= 1.0 else 'missed'}"]
    mark = lambda ratio: f"x{ratio:.3f} ({'met' if ratio >= 1.5 else 'missed'})"  # noqa: E731
    for r in shipped_rows:
        fp32 = next(x for x in rows if x["candidate"] == "expert fp32" and x["condition"] == r["condition"]
                    and x["items"] == r["items"] and x["tokens"] == r["tokens"] and x["threads"] == r["threads"])
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
            ax.scatter(1e3 * r["latency_s"]["median"], 100 * r["value"], marker=markers[r["candidate"]], s=80,
                       label=r["candidate"])
        ax.set_xlabel("p50 latency per request of 8 real texts, 1 thread (ms)")
        ax.set_ylabel(f"{picked[0]['metric']} x100 as served")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "replace.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
