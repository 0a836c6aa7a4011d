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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..console import log
from ..flops import model_bound
from . import common
from .workbench import SuiteConfig, Workbench

CANDIDATES = ("expert (shipped)", "expert fp32", "expert int8 static", "plain dense fp32", "plain dense int8")
BASES = ("plain dense fp32", "plain dense int8")


def _side_bundle(root: Path, shipped: Path, name: str, graph: Path, dense: bool) -> Path:
    """A graph as a bundle beside the shipped one (its tokenizer and task), served as-is by the same Router."""
    from ..bundle import file_entry, initializer_table

    manifest = json.loads((shipped / "manifest.json").read_text())
    folder = root / f"{manifest['task']['name']}-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(graph, folder / "model.onnx")
    shutil.copy(shipped / "tokenizer.json", folder / "tokenizer.json")
    side = {**manifest, "task": {**manifest["task"], "name": folder.name}}
    side["onnx"] = {
        **manifest["onnx"],
        **file_entry(folder, "model.onnx"),
        "variants": {},
        "rewrites": {},
        "precision": "fp32",  # served as-is: the Router picks this one graph
        "initializers": initializer_table(folder / "model.onnx"),
    }
    if dense:  # the plain export: no session settings of ours, the dense architecture
        side["onnx"]["session"] = {}
        side["architecture"] = {
            **manifest["architecture"],
            "ffn_widths": manifest["architecture"]["ffn_widths_dense"],
            "num_heads": manifest["architecture"]["num_heads_dense"],
        }
    (folder / "manifest.json").write_text(json.dumps(side, indent=2))
    return folder


def _plain_bundles(root: Path, shipped: Path, dense, tokenizer, test) -> dict[str, Path]:
    """The plain dense graphs (fp32, int8) as bundles beside the shipped one, served by the same Router."""
    from ..onnx_export import encode_sample, export_onnx
    from ..variants import quantize_int8

    task = shipped.name
    fp32 = root / f"{task}-plain.onnx"
    export_onnx(dense, fp32, *encode_sample(tokenizer, test.inputs), exporter="torchscript")
    int8 = root / f"{task}-plain.int8.onnx"
    quantize_int8(fp32, int8)
    return {
        name: _side_bundle(root, shipped, name, graph, dense=True)
        for name, graph in (("plain-fp32", fp32), ("plain-int8", int8))
    }


def _static_bundle(root: Path, shipped: Path, tokenizer, train, batches: int) -> Path:
    """The shipped fp32 expert after static QDQ int8, calibrated on batches of 8 training texts: what the
    bundle's dynamic int8 variant is measured against (issue: measure both)."""
    from ..variants import calibration_feeds, quantize_int8_static

    feeds = calibration_feeds(tokenizer, train.inputs, batches)
    graph = root / f"{shipped.name}-expert.int8-static.onnx"
    quantize_int8_static(shipped / "model.onnx", graph, feeds)
    return _side_bundle(root, shipped, "int8-static", graph, dense=False)


def _served_quality(router, task: str, ctx: _Task, seed: int) -> tuple[float, dict]:
    """A candidate's metric as served on the whole reporting split, and its paired bootstrap interval against
    the dense PyTorch model (with the within-1-point verdict)."""
    from .. import evaluate
    from ..uncertainty import paired_bootstrap

    preds = [p.label_id for p in router.predict(task, ctx.test.inputs)]
    interval = paired_bootstrap(ctx.metric, ctx.test.labels, ctx.dense_preds, preds, seed=seed)
    return evaluate.metric_value(ctx.metric, ctx.test.labels, preds), interval.to_json(0.01)


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


@dataclass
class _Task:
    """One task of the suite: the shipped build, its split, the candidates' bundles and what every record repeats."""

    name: str
    root: Path
    test: Any
    metric: str
    max_length: int
    manifest: dict
    result: Any  # the build's TaskResult
    build_seconds: float
    folders: dict[str, Path]
    dense_preds: list[int]  # the dense PyTorch model's labels on ``test``: every interval is paired with them


def _prepare(config: SuiteConfig, bench: Workbench, task: str) -> tuple[_Task, Any]:
    """Build the task's bundle exactly as `doe build` does, then the plain and static-int8 candidates beside it."""
    from .. import evaluate, stages
    from ..loading import fast_tokenizer
    from ..pipeline import build_task

    data = bench.task_data(task)
    root = bench.work / "replace" / task
    shutil.rmtree(root, ignore_errors=True)
    build = _build_config(config, task, root, bench.progress)
    start = time.perf_counter()
    result, dense, _ = build_task(build, bench.loaded, data, return_models=True)
    build_seconds = time.perf_counter() - start
    splits = stages.Splits.of(data, build.data)  # exactly the split the build reports on
    shipped = Path(result.bundle)
    tokenizer = fast_tokenizer(bench.loaded.hf_tokenizer, build.data.max_length)
    folders = _plain_bundles(root, shipped, dense, tokenizer, splits.test)
    folders["int8-static"] = _static_bundle(root, shipped, tokenizer, splits.train, 2 if config.tiny else 32)
    manifest = json.loads((shipped / "manifest.json").read_text())
    dense_preds = evaluate.torch_predictions(dense, tokenizer, splits.test)
    return _Task(
        task,
        root,
        splits.test,
        data.metric,
        build.data.max_length,
        manifest,
        result,
        build_seconds,
        folders,
        dense_preds,
    ), tokenizer


def _routers(ctx: _Task, threads: int) -> dict[str, tuple[Any, str]]:
    """Every candidate as (Router, task name); all CPU, ``threads`` intra-op threads."""
    from doe_runtime import Router

    # several sessions run in turn here: with more than one thread, idle workers of one session would spin
    # on the cores the next one needs, so every candidate's threads sleep when idle (allow_spinning=False)
    options: dict[str, Any] = dict(device="cpu", intra_op_threads=threads, allow_spinning=threads == 1)
    return {
        "expert (shipped)": (Router(ctx.root, **options), ctx.name),
        "expert fp32": (Router(ctx.root, precision="fp32", **options), ctx.name),
        "expert int8 static": (Router(ctx.root, **options), ctx.folders["int8-static"].name),
        "plain dense fp32": (Router(ctx.root, **options), ctx.folders["plain-fp32"].name),
        "plain dense int8": (Router(ctx.root, **options), ctx.folders["plain-int8"].name),
    }


def _time_real(ctx: _Task, routers: dict, items: int, tiny: bool) -> tuple[dict, dict]:
    """Every candidate answers every request of ``items`` real test texts, order rotated per request:
    (seconds per request per candidate, the requests' token statistics)."""
    requests = [ctx.test.inputs[i : i + items] for i in range(0, len(ctx.test), items)]
    requests = requests[: (120 if items == 1 else 60) if not tiny else 4]
    times: dict[str, list[float]] = {name: [] for name in routers}
    for router, task in routers.values():  # warm-up
        router.predict(task, requests[0])
    names = list(routers)
    for index, request in enumerate(requests):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            router, task = routers[name]
            t0 = time.perf_counter()
            router.predict(task, request)
            times[name].append(time.perf_counter() - t0)
    tokenizer = routers["expert fp32"][0]._expert(ctx.name).tokenizer
    lengths = [
        len(tokenizer.encode(*x).ids if isinstance(x, tuple) else tokenizer.encode(x).ids)
        for request in requests
        for x in request
    ]
    stats = {
        "tokens_p50": float(np.median(lengths)),
        "tokens_p90": float(np.percentile(lengths, 90)),
        "requests": len(requests),
    }
    return times, stats


def run_replace(config: SuiteConfig, bench: Workbench) -> list[dict]:
    records = []
    for task in config.replace_tasks:
        ctx, _ = _prepare(config, bench, task)
        for threads in sorted({1, max(1, os.cpu_count() or 1)}):
            routers = _routers(ctx, threads)
            quality = {name: _served_quality(r, t, ctx, config.seed) for name, (r, t) in routers.items()}
            values = {name: value for name, (value, _) in quality.items()}
            vs_dense = {name: interval for name, (_, interval) in quality.items()}
            served = routers["expert (shipped)"][0].info(task)
            shared = dict(ctx=ctx, threads=threads, values=values, served=served, vs_dense=vs_dense)
            for items in (1, 8):
                times, stats = _time_real(ctx, routers, items, config.tiny)
                records += [
                    _record(name, condition="real", items=items, tokens=None, times=times, extra=stats, **shared)
                    for name in routers
                ]
                log(
                    f"[replace] {task} real texts x{items}, {threads} thread(s): "
                    + ", ".join(f"{n} p50 {1e3 * np.median(times[n]):.1f} ms ({100 * values[n]:.1f})" for n in routers)
                )
            records += _fixed_shapes(config, ctx, routers, shared)
    return records


def _fixed_shapes(config: SuiteConfig, ctx: _Task, routers: dict, shared: dict) -> list[dict]:
    """``session.run`` of each candidate's served session on 8 x 32 and 8 x 128 ids cut from real texts."""
    records = []
    tokenizer = routers["expert fp32"][0]._expert(ctx.name).tokenizer
    for batch, tokens in ((8, 32), (8, 128)):
        feeds = _fixed_feeds(tokenizer, ctx.test.inputs, batch, min(tokens, ctx.max_length))
        if feeds is None:
            records.append(
                {
                    "kind": "skipped",
                    "task": ctx.name,
                    "threads": shared["threads"],
                    "batch": batch,
                    "tokens": tokens,
                    "reason": f"fewer than {batch} test texts of {tokens} tokens or more",
                }
            )
            continue
        sessions = {name: r._expert(t).session for name, (r, t) in routers.items()}
        run = {name: (lambda s=s, feeds=feeds: s.run(None, feeds)) for name, s in sessions.items()}
        times = common.paired_timing(run, config.repeats, warmup=1, min_seconds=config.min_seconds)
        length = feeds["input_ids"].shape[1]
        records += [
            _record(name, condition="fixed", items=batch, tokens=length, times=times, extra={}, **shared)
            for name in routers
        ]
        log(
            f"[replace] {ctx.name} fixed {batch}x{length}, {shared['threads']} thread(s): "
            + ", ".join(f"{n} x{np.median(common.ratios(times, 'plain dense fp32', n)):.2f}" for n in routers)
        )
    return records


def _build_config(config: SuiteConfig, task: str, root: Path, progress: bool):
    """`doe build`'s defaults, except the caps the quick mode needs."""
    from ..specs import BuildConfig, ExportSpec, PruneSpec

    build = BuildConfig(
        model=config.model, tasks=(task,), data_dir=config.data_dir, out_dir=str(root), progress=progress
    )
    if config.replace_round_to is not None:
        build = replace(build, prune=replace(build.prune, round_to=config.replace_round_to))
    if not config.tiny:
        return build
    flow = config.flow_used()
    return replace(
        build,
        data=flow.data,
        adapt=flow.adapt,
        prune=PruneSpec(calib_examples=flow.prune.calib_examples),
        export=ExportSpec(fp16=False),
    )


def _record(
    name: str,
    *,
    ctx: _Task,
    condition: str,
    threads: int,
    items: int,
    tokens: int | None,
    times: dict,
    values: dict,
    served: dict,
    vs_dense: dict,
    extra: dict,
) -> dict:
    latencies = times[name]
    ordered = sorted(latencies)
    manifest, result = ctx.manifest, ctx.result
    record = {
        "kind": "replace",
        "task": ctx.name,
        "candidate": name,
        "condition": condition,
        "threads": threads,
        "items": items,
        "tokens": tokens,
        "repeats": len(latencies),
        "latency_s": common.quantiles(latencies),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "items_per_s": items / float(np.median(latencies)),
        "speedup_vs": {base: common.quantiles(common.ratios(times, base, name)) for base in BASES},
        "metric": ctx.metric,
        "value": values[name],
        "vs_dense": vs_dense[name],  # value - dense PyTorch, paired bootstrap interval, within-1-point verdict
        "split": ctx.test.name,
        "split_size": len(ctx.test),
        "served_precision": served["precision"]
        if name == "expert (shipped)"
        else {"plain dense int8": "int8", "expert int8 static": "int8 static QDQ"}.get(name, "fp32"),
        "extra_positions": manifest["adaptation"].get("prompt_length", 0),
        "dense_pytorch": result.dense,
        "expert_pytorch": result.expert,
        "ffn_widths": manifest["architecture"]["ffn_widths"],
        "build_seconds": ctx.build_seconds,
        "int8_recipe": manifest["onnx"].get("variants", {}).get("int8", {}).get("recipe"),
        "left_out": manifest["quality"].get("variants_left_out", {}),
        **extra,
    }
    if name.startswith("expert"):
        arch = manifest["architecture"]
        seq = (tokens or extra.get("tokens_p50") or 64) + record["extra_positions"]
        record["bound"] = model_bound(
            arch["hidden_size"],
            dense_ffn=arch["ffn_widths_dense"],
            dense_heads=arch["num_heads_dense"],
            ffn=arch["ffn_widths"],
            heads=arch["num_heads"],
            tokens=int(seq),
        )
    return record


__all__ = ["BASES", "CANDIDATES", "run_replace"]
