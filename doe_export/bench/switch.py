"""``switch``: the unplug-and-play cost: round-robin requests over N resident experts vs one, cold
load time and resident memory per expert, the router's overhead over a bare ``session.run``."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

from ..console import log
from . import common
from .report import q as _q
from .workbench import SuiteConfig, long_texts, make_bundles, rss_bytes


def run_switch(config: SuiteConfig, root: Path, progress: bool) -> list[dict]:
    from doe_runtime import Router

    names = make_bundles(config, root, max(config.switch_tasks), progress)
    router = Router(root, device="cpu", max_resident=len(names), intra_op_threads=config.threads)
    records = [_cold_loads(router, root, names)]
    for items, words in ((1, 6), (config.batch, 400)):
        texts = SHORT if items == 1 else long_texts(items, words, config.seed)
        records += [_round_robin(config, router, names[:count], texts) for count in config.switch_tasks]
    records.append(_overhead(config, router, root, names[0]))
    return records


SHORT = ["a short request about the market"]


def _cold_loads(router, root: Path, names: list[str]) -> dict:
    """Cold load of every expert (sha256 checks + session creation + first run) and its resident memory."""
    loads, rss = [], [rss_bytes()]
    for name in names:
        t0 = time.perf_counter()
        router.predict(name, SHORT)
        loads.append(time.perf_counter() - t0)
        rss.append(rss_bytes())
    growth = [b - a for a, b in itertools.pairwise(rss)]
    per_expert = float(np.median(growth[1:] if len(growth) > 1 else growth))
    log(
        f"[switch] cold load median {1e3 * np.median(loads):.1f} ms; resident memory per expert "
        f"{per_expert / 2**20:.1f} MiB"
    )
    return {
        "kind": "load",
        "experts": len(names),
        "cold_load_s": common.quantiles(loads),
        "first_load_s": loads[0],
        "rss_growth_bytes": growth,
        "rss_per_expert_bytes": per_expert,
        "model_bytes": (root / names[0] / "model.onnx").stat().st_size,
    }


def _round_robin(config: SuiteConfig, router, tasks: list[str], texts: list[str]) -> dict:
    """Requests to one task against requests rotating over ``tasks``: what switching adds per request."""
    requests = config.switch_requests

    def single():
        for _ in range(requests):
            router.predict(tasks[0], texts)

    def rotate():
        for index in range(requests):
            router.predict(tasks[index % len(tasks)], texts)

    times = common.paired_timing(
        {"one task": single, "round-robin": rotate}, config.repeats, warmup=1, min_seconds=config.min_seconds
    )
    per_request = [(r - s) / requests for s, r in zip(times["one task"], times["round-robin"])]
    log(
        f"[switch] {len(tasks)} tasks, {len(texts)} item(s)/request: round-robin adds "
        f"{1e3 * np.median(per_request):+.3f} ms per request"
    )
    return {
        "kind": "switch",
        "tasks": len(tasks),
        "items": len(texts),
        "requests": requests,
        "one_task_s_per_request": common.quantiles([t / requests for t in times["one task"]]),
        "round_robin_s_per_request": common.quantiles([t / requests for t in times["round-robin"]]),
        "added_s_per_request": common.quantiles(per_request),
        "repeats": len(per_request),
    }


def _overhead(config: SuiteConfig, router, root: Path, task: str) -> dict:
    """The router's overhead at batch x tokens: bare session.run vs tokenize + run vs Router.predict."""
    from doe_runtime.expert import Expert
    from doe_runtime.tokenization import encode_batch

    texts = long_texts(config.batch, 400, config.seed)
    expert = Expert(root / task, "cpu", session_options=router._session_options())
    ids, mask = encode_batch(expert.tokenizer, texts)
    feeds = {"input_ids": ids, "attention_mask": mask}
    runners = {
        "session.run": lambda: expert.session.run(None, feeds),
        "tokenize + session.run": lambda: expert.session.run(
            None, dict(zip(("input_ids", "attention_mask"), encode_batch(expert.tokenizer, texts)))
        ),
        "Router.predict": lambda: router.predict(task, texts),
    }
    times = common.paired_timing(runners, max(config.repeats, 10), warmup=2, min_seconds=config.min_seconds)
    bare, tokenized = np.asarray(times["session.run"]), np.asarray(times["tokenize + session.run"])
    routed = np.asarray(times["Router.predict"])
    log(
        f"[switch] Router.predict overhead over tokenize + session.run: "
        f"{100 * np.median((routed - tokenized) / bare):+.2f}% of session.run"
    )
    return {
        "kind": "overhead",
        "batch": config.batch,
        "tokens": int(ids.shape[1]),
        "session_run_s": common.quantiles(list(bare)),
        "tokenize_run_s": common.quantiles(list(tokenized)),
        "router_predict_s": common.quantiles(list(routed)),
        "router_overhead_share": common.quantiles(list((routed - tokenized) / bare)),
        "tokenization_share": common.quantiles(list((tokenized - bare) / bare)),
        "repeats": len(bare),
    }


def _render_switch(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Switch: the cost of unplugging one expert and plugging in another", ""] + intro
    lines += [
        "Bundles: one FFN expert (p = {:g}, fused graph) written by `doe build`, copied under several task "
        "names (separate sessions; the values of the weights do not change these costs).".format(cfg["ffn_rate"]),
        "",
    ]
    for r in rows:
        if r["kind"] == "load":
            lines += [
                f"- Cold load (sha256 checks + session creation + first request), {r['experts']} experts: median "
                f"{1e3 * r['cold_load_s']['median']:.1f} ms (first {1e3 * r['first_load_s']:.1f} ms).",
                f"- Resident memory per expert: {r['rss_per_expert_bytes'] / 2**20:.1f} MiB "
                f"(model file {r['model_bytes'] / 2**20:.1f} MiB).",
                "",
            ]
    switch = [r for r in rows if r["kind"] == "switch"]
    if switch:
        lines += [
            "| tasks | items per request | one task ms/request | round-robin ms/request | added ms/request |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in switch:
            lines.append(
                f"| {r['tasks']} | {r['items']} | {_q(r['one_task_s_per_request'], 1e3, '{:.3f}')} | "
                f"{_q(r['round_robin_s_per_request'], 1e3, '{:.3f}')} | "
                f"{_q(r['added_s_per_request'], 1e3, '{:+.3f}')} |"
            )
        lines.append("")
    for r in rows:
        if r["kind"] == "overhead":
            lines += [
                f"Router overhead at batch {r['batch']} x {r['tokens']} tokens: `session.run` "
                f"{_q(r['session_run_s'], 1e3)} ms, tokenize + run {_q(r['tokenize_run_s'], 1e3)} ms, "
                f"`Router.predict` {_q(r['router_predict_s'], 1e3)} ms. Router's own overhead (predict minus "
                f"tokenize + run) = {100 * r['router_overhead_share']['median']:+.2f}% of `session.run` "
                f"[{100 * r['router_overhead_share']['p25']:+.2f}, {100 * r['router_overhead_share']['p75']:+.2f}]; "
                f"tokenization itself {100 * r['tokenization_share']['median']:.1f}%.",
                "",
            ]
    return lines
