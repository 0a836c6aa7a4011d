"""The load suite's report."""

from __future__ import annotations


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
