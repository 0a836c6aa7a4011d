"""``e2e``: ``Router.predict`` throughput with tokenization, with and without length sorting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..console import log
from . import common
from .report import q as _q
from .workbench import SuiteConfig, mixed_texts


def run_e2e(config: SuiteConfig, root: Path) -> list[dict]:
    from doe_runtime import Router
    from doe_runtime.tokenization import encode_batch, plan_batches

    task = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())[0]
    texts = mixed_texts(config.e2e_items, config.seed)
    routers = {
        sort: Router(
            root, device="cpu", batch_size=config.e2e_batch, intra_op_threads=config.threads, sort_by_length=sort
        )
        for sort in (True, False)
    }
    expected = [p.label_id for p in routers[True].predict(task, texts)]
    same = [p.label_id for p in routers[False].predict(task, texts)] == expected
    tokenizer = routers[True]._expert(task).tokenizer
    _, mask = encode_batch(tokenizer, texts)
    lengths = mask.sum(axis=1)
    padded = {}
    for sort in (True, False):
        batches = plan_batches(lengths, config.e2e_batch, None, sort)
        padded[sort] = int(sum(len(b) * lengths[b].max() for b in batches))
    runners = {
        ("sorted" if sort else "arrival order"): (lambda r=r: r.predict(task, texts)) for sort, r in routers.items()
    }
    times = common.paired_timing(runners, config.repeats, warmup=1, min_seconds=config.min_seconds)
    records = []
    for sort, name in ((True, "sorted"), (False, "arrival order")):
        records.append(
            {
                "kind": "e2e",
                "order": name,
                "items": len(texts),
                "batch": config.e2e_batch,
                "real_tokens": int(lengths.sum()),
                "padded_tokens": padded[sort],
                "latency_s": common.quantiles(times[name]),
                "items_per_s": len(texts) / float(np.median(times[name])),
                "speedup_vs_arrival": common.quantiles(common.ratios(times, "arrival order", name)),
                "same_labels": same,
                "repeats": len(times[name]),
            }
        )
        log(
            f"[e2e] {name}: {len(texts) / np.median(times[name]):.0f} items/s, padded tokens {padded[sort]} "
            f"for {int(lengths.sum())} real"
        )
    return records


def _render_e2e(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# End to end: `Router.predict` with tokenization, with and without length sorting", ""] + intro
    if rows:
        lines += [
            f"{rows[0]['items']} requests of mixed length (3 to 160 words, log-uniform), batch "
            f"{rows[0]['batch']}; labels identical in both orders: {rows[0]['same_labels']}.",
            "",
            "| order | items/s | latency ms | padded tokens (real tokens) | speed-up vs arrival order |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['order']} | {r['items_per_s']:.0f} | {_q(r['latency_s'], 1e3, '{:.1f}')} | "
                f"{r['padded_tokens']} ({r['real_tokens']}) | x{_q(r['speedup_vs_arrival'])} |"
            )
        lines.append("")
    return lines
