"""The load suite's report."""

from __future__ import annotations

import statistics


def _render_load(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Load: `doe-runtime serve` under concurrent requests", ""] + intro
    loads = [r for r in rows if r["kind"] == "load"]
    if loads:
        r0 = loads[0]
        lines += [
            f"One asyncio client on loopback, requests of 1-4 texts (mixed lengths) round-robin over "
            f"{r0['tasks']} tasks, {r0['seconds']:.0f} s measured after {r0['warmup_seconds']:.0f} s of warm-up per "
            "row; every answer compared with sequential `Router.predict`; a separate process probes "
            "`/healthz` every 200 ms (as a liveness probe would; a failed probe counts as 1e9 s); requests shed by the server (503 + Retry-After) are counted apart and "
            f"the client backs off 0.2 s before its next one; onnxruntime CPU memory arena "
            f"{'on' if r0.get('memory_arena', True) else 'off'}.",
            "",
            "Latencies are the client's (send to answer read); *in server* is the server's own `Server-Timing` "
            "(request head parsed to response head, admission queue included): where the two differ, the time "
            "went to the client's event loop or the sockets, on the same 2 cores as the server.",
            "",
            "| engine | connections | answered | shed | errors | answers differing | requests/s | p50 ms | p99 ms | "
            "max ms | in server p99 ms | shed max ms (in server) | /healthz p99 ms (max) | "
            "RSS after warm-up → end (MiB) | growth |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ms = lambda v: "—" if v is None else f"{1e3 * v:.1f}"  # noqa: E731
        for r in loads:
            health = r.get("health_s", {})
            shed = r.get("shed_latency_s", {})
            engine = r.get("engine", "fastapi") + (
                f" ({r['replicas']} replica(s); RSS: replicas summed)" if r.get("engine") == "ray" else ""
            )
            lines.append(
                f"| {engine} | {r['connections']} | {r['requests']} | {r.get('shed', 0)} | {r['errors']} | "
                f"{r['mismatches']} | "
                f"{r['requests_per_s']:.1f} | {ms(r['latency_s']['p50'])} | {ms(r['latency_s']['p99'])} | "
                f"{ms(r['latency_s']['max'])} | {ms(r.get('server_s', {}).get('p99'))} | {ms(shed.get('max'))} "
                f"({ms(r.get('shed_server_s', {}).get('max'))}) | {ms(health.get('p99'))} "
                f"({ms(health.get('max'))}) | {r['rss_after_warmup_bytes'] / 2**20:.0f} → "
                f"{r['rss_end_bytes'] / 2**20:.0f} | {100 * r['rss_growth']:+.2f}% |"
            )
        base = {r["connections"]: r for r in loads if r.get("engine", "fastapi") == "fastapi"}
        for r in loads:
            if r.get("engine") == "ray" and r["connections"] in base:
                ratio = r["latency_s"]["p50"] / base[r["connections"]]["latency_s"]["p50"]
                lines.append(
                    f"- Ray, {r['replicas']} replica(s), {r['connections']} connections: p50 {ratio:.0%} of the "
                    f"FastAPI server's ({'within' if ratio <= 1.15 else 'over'} the 115 % target); "
                    f"{r['rss_end_bytes'] / r['replicas'] / 2**20:.0f} MiB per replica."
                )
        lines += [
            "",
            f"SIGTERM at the end: graceful shutdown logged: {r0['graceful_shutdown']} (exit code "
            f"{r0['exit_code']}; uvicorn re-raises the signal after draining)."
            + "".join(f" Error samples at {r['connections']}: {r['error_samples']}." for r in loads if r["errors"]),
            "",
        ]
    for r in rows:
        if r["kind"] == "big_request":
            lines += [
                f"One request of {r['items']} texts of 16 KB ({r['bytes'] / 2**20:.1f} MiB) after the load: HTTP "
                f"{r['status']} in {r['seconds']:.2f} s; server memory {r['rss_before_bytes'] / 2**20:.0f} → "
                f"{r['rss_after_bytes'] / 2**20:.0f} MiB just after → {r['rss_settled_bytes'] / 2**20:.0f} MiB 3 s "
                f"later ({r['lasting_growth_bytes'] / 2**20:+.1f} MiB lasting).",
                "",
            ]
    return lines


def render_batching(rows, cfg, intro, out_dir) -> list[str]:
    """The batching suite's report: one row per wait x connections, the verdicts, a throughput plot."""
    lines = ["# Dynamic batching: single-text requests to `doe-runtime serve`", ""] + intro
    runs = [r for r in rows if r["kind"] == "batching"]
    if not runs:
        return lines
    r0 = runs[0]
    ms = lambda v: "—" if v is None else f"{1e3 * v:.1f}"  # noqa: E731
    lines += [
        f"Task {r0['task']}: the bundle as `doe build` ships it ({r0['precision']} on {r0['provider']}), served by "
        f"`doe-runtime serve` with its defaults but `--batch-wait-ms` (0: batching off). Requests of one text each, "
        f"round-robin over {r0['texts']} test texts; {r0['seconds']:.0f} s measured after {r0['warmup_seconds']:.0f} s "
        "of warm-up per row. One server per wait, all started together; the rows alternate between them round "
        "after round (the order reversed every other round), so the machine's drift falls on every setting alike. "
        "*Server CPU*: CPU milliseconds the server's processes used per answered request over the row; *client "
        "CPU*: the load client's share of the CPU both used (it runs on the same cores). *Differing*: answers whose label is not `Router.predict`'s for that text alone. "
        "*Per call*: requests per model call, from the server's `/metrics`; *counted*: `doe_requests_total` over "
        "the row against the answers the client got (a scrape mid-row must parse too). The header's intra-op "
        "thread count is the suite's, not the server's: the server runs with its own defaults (with batching on "
        "CPU: one merged call at a time on every core; off: one call per CPU at onnxruntime's default threads).",
        "",
        "| round | wait ms | connections | requests/s | p50 ms | p99 ms | in server p50 / p99 ms | /healthz p99 ms | "
        "server CPU ms | client CPU | errors | differing | shed | per call | counted / answered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        cpu = r.get("server_cpu_ms_per_request")  # absent from records made before it was measured
        cpu_cells = "— | —" if cpu is None else f"{cpu:.1f} | {100 * r['client_cpu_share']:.0f} %"
        lines.append(
            f"| {r.get('round', 0) + 1} | {r['batch_wait_ms']:g} | {r['connections']} | {r['requests_per_s']:.1f} | "
            f"{ms(r['latency_s']['p50'])} | "
            f"{ms(r['latency_s']['p99'])} | {ms(r['server_s']['p50'])} / {ms(r['server_s']['p99'])} | "
            f"{ms(r['health_s']['p99'])} | {cpu_cells} | "
            f"{r['errors']} | {r['mismatches']} | {r['shed']} | "
            f"{r['requests_per_call'] or 0:.1f} | {r['metrics_requests']:.0f} / {r['client_answered']}"
            f"{'' if r['metrics_add_up'] else ' (MISMATCH)'} |"
        )
    verdicts = [r for r in rows if r["kind"] == "verdict"]
    if verdicts:
        lines += ["", "Against batching off at the same connection count (medians over the rounds):", ""]
        for v in verdicts:
            each = v.get("throughput_ratios", [v["throughput_ratio"]])
            cpu = (
                f"; server CPU per request {v['server_cpu_ms_per_request']:.1f} vs "
                f"{v['server_cpu_ms_per_request_off']:.1f} ms"
                if "server_cpu_ms_per_request" in v
                else ""
            )
            lines.append(
                f"- wait {v['batch_wait_ms']:g} ms, {v['connections']} connections: throughput ×"
                f"{v['throughput_ratio']:.2f} (rounds: {', '.join(f'×{x:.2f}' for x in each)}){cpu}, "
                f"p99 {ms(v['p99_s'])} ms vs {ms(v['p99_off_s'])} ms "
                f"({'no worse' if v['p99_no_worse'] else 'worse'}), {v['errors']} errors, {v['mismatches']} differing, "
                f"/healthz p99 {ms(v['health_p99_s'])} ms."
            )
    lines += _differing(runs, next((r["margins"] for r in rows if r["kind"] == "margins"), None))
    plot = _batching_plot(runs, out_dir)
    if plot:
        lines += ["", f"![throughput by connections]({plot})"]
    return lines + [""]


def _differing(runs: list[dict], margins: list[float] | None) -> list[str]:
    """Which texts got another label in a merged call than alone, and how close to a tie they were alone."""
    counts: dict[str, int] = {}
    for run in runs:
        for index, n in run.get("differing_requests", {}).items():
            counts[index] = counts.get(index, 0) + n
    if not counts or margins is None:
        return []
    texts = ", ".join(
        f"#{i} ({n} answer{'s' * (n > 1)}, margin {margins[int(i)]:.3f})"
        for i, n in sorted(counts.items(), key=lambda kv: int(kv[0]))
    )
    return [
        "",
        f"Answers whose label differed from `Router.predict` of the text alone: {sum(counts.values())}, from "
        f"{len(counts)} of the {len(margins)} texts — {texts}. The margin is the text's top probability minus its "
        f"second when predicted alone (median over all texts {statistics.median(margins):.3f}): the int8 variant "
        "quantizes activations per call, so an item near a tie can change label with the batch it shares "
        "(`docs/runtime.md`, `precision`).",
    ]


def _batching_plot(runs: list[dict], out_dir) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from pathlib import Path

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for wait in sorted({r["batch_wait_ms"] for r in runs}):
        counts = sorted({r["connections"] for r in runs if r["batch_wait_ms"] == wait})
        rows = [[r for r in runs if (r["batch_wait_ms"], r["connections"]) == (wait, c)] for c in counts]
        label = "batching off" if wait == 0 else f"wait {wait:g} ms"
        left.plot(
            counts, [statistics.median(r["requests_per_s"] for r in row) for row in rows], marker="o", label=label
        )
        right.plot(
            counts,
            [statistics.median(1e3 * r["latency_s"]["p99"] for r in row) for row in rows],
            marker="o",
            label=label,
        )
    for axis, title in ((left, "requests/s (one text each), median of rounds"), (right, "client p99 ms, median")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("connections")
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    name = "batching.png"
    fig.savefig(Path(out_dir) / name, dpi=100)
    plt.close(fig)
    return name
