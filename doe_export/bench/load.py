"""``load``: ``doe-runtime serve`` in its own process under a bounded asyncio client: errors, answers
compared with sequential ``Router.predict``, p50/p99, the server's memory, graceful shutdown."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..console import log
from .workbench import SuiteConfig, make_bundles, mixed_texts

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def run_load(config: SuiteConfig, root: Path, progress: bool) -> list[dict]:
    """``doe-runtime serve`` in its own process, a bounded asyncio client with ``load_connections``
    concurrent connections over ``load_tasks`` tasks; every answer is compared with sequential
    ``Router.predict``; the server's resident memory is sampled every second. With the Ray engine in
    ``load_engines``, the same load against ``serve --engine ray`` with 1 and 2 replicas as well."""
    from doe_runtime import Router

    names = make_bundles(config, root, config.load_tasks, progress)
    texts = mixed_texts(64, config.seed, max_words=120)
    requests = [(names[i % len(names)], texts[i: i + 1 + i % 4]) for i in range(len(texts) - 4)]
    reference = Router(root, device="cpu", max_resident=len(names))
    expected = [[p.label_id for p in reference.predict(task, items)] for task, items in requests]
    del reference
    results = []
    for engine, replicas in [("fastapi", None)] + [("ray", n) for n in config.load_ray_replicas
                                                    if "ray" in config.load_engines]:
        results += _serve_and_load(config, root, names, requests, expected, engine, replicas)
    return results


def _serve_and_load(config: SuiteConfig, root: Path, names: list, requests: list, expected: list, engine: str,
                    replicas: int | None) -> list[dict]:
    import asyncio
    import subprocess

    import httpx

    port = _free_port()
    server_log = root / f"server-{engine}{replicas or ''}.log"
    log_handle = open(server_log, "w", encoding="utf-8")
    command = [sys.executable, "-m", "doe_runtime.cli", "serve", str(root), "--port", str(port), "--threads",
               str(config.threads)] + ([] if config.load_memory_arena else ["--no-memory-arena"])
    if engine == "ray":
        command += ["--engine", "ray", "--replicas", str(replicas), "--max-experts-per-replica", str(len(names)),
                    "--replica-cpus", str(round(1.0 / replicas, 2))]
    else:
        command += ["--max-resident", str(len(names))]
    server = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)  # its own process group: Ray's processes go with it
    base = f"http://127.0.0.1:{port}"
    label = engine if engine == "fastapi" else f"ray, {replicas} replica(s)"
    results = []
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server ({label}) did not become ready: {server_log.read_text()[-2000:]}")
            time.sleep(0.5)
        memory = (lambda: _replica_rss(server.pid)) if engine == "ray" else (lambda: _process_rss(server.pid))
        for connections in config.load_connection_steps or (config.load_connections,):
            result = asyncio.run(_load(base, memory, requests, expected, config, connections))
            result.update(engine=engine, replicas=replicas)
            results.append(result)
            log(f"[load] {label}, {connections} connections: {result['requests']} answered, {result['shed']} shed "
                f"(503 + Retry-After), {result['errors']} errors, {result['mismatches']} mismatches, "
                f"p50 {1e3 * result['latency_s']['p50']:.0f} ms, p99 {1e3 * result['latency_s']['p99']:.0f} ms "
                f"(in server {1e3 * (result['server_s']['p99'] or 0):.0f} ms), "
                f"/healthz p99 {1e3 * result['health_s']['p99']:.1f} ms, memory growth {100 * result['rss_growth']:+.2f}%")
        if config.load_big_request and engine == "fastapi":
            results.append(_big_request(base, server.pid))
    finally:
        import os
        import signal

        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if engine == "ray":  # whatever the Ray cluster left in the group
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log_handle.close()
    # uvicorn drains running requests on SIGTERM, logs the shutdown, then re-raises the signal
    text = server_log.read_text()
    for result in results:
        result["graceful_shutdown"] = "Application shutdown complete" in text if engine == "fastapi" else None
        result["exit_code"] = server.returncode
    return results


PROBER = r"""
import json, sys, time
import httpx
url, path = sys.argv[1], sys.argv[2]
with httpx.Client(timeout=30) as client, open(path, "a", buffering=1) as out:
    while True:
        t0 = time.perf_counter()
        try:
            ok = client.get(url).status_code == 200
        except httpx.HTTPError:
            ok = False
        out.write(json.dumps({"s": time.perf_counter() - t0 if ok else 1e9}) + "\n")
        time.sleep(0.2)
"""


def _replica_rss(pid: int) -> int:
    """Resident memory of the Ray expert replicas started under the server process (summed). The server
    leads its own session (``start_new_session``) and Ray's workers stay in it, so replicas of any other
    Ray cluster on the machine are not counted."""
    import os

    total = 0
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = status.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "DoeExperts" in cmdline and os.getsid(int(status.parent.name)) == pid:
                total += _process_rss(int(status.parent.name))
        except (OSError, ValueError):
            continue
    return total or _process_rss(pid)


def _big_request(base: str, pid: int) -> dict:
    """One 4 MiB request of 256 texts of 16 KB: its time and the server's memory before, just after
    and 3 s after (what stays)."""
    import httpx

    text = ("The markets rallied as investors weighed the latest figures. " * 300)[:16_000]
    body = {"inputs": [text] * 256}
    before = _process_rss(pid)
    start = time.perf_counter()
    response = httpx.post(f"{base}/v1/tasks/expert-0/predict", json=body, timeout=120)
    seconds = time.perf_counter() - start
    after = _process_rss(pid)
    time.sleep(3)
    settled = _process_rss(pid)
    log(f"[load] 4 MiB request ({len(response.request.content) / 2**20:.1f} MiB): HTTP {response.status_code} in "
        f"{seconds:.2f} s; server memory {before / 2**20:.0f} -> {after / 2**20:.0f} -> {settled / 2**20:.0f} MiB")
    return {"kind": "big_request", "bytes": len(response.request.content), "items": 256, "status": response.status_code,
            "seconds": seconds, "rss_before_bytes": before, "rss_after_bytes": after, "rss_settled_bytes": settled,
            "lasting_growth_bytes": settled - before}


async def _load(base: str, memory, requests: list, expected: list, config: SuiteConfig, connections: int) -> dict:
    import asyncio

    import httpx

    latencies, errors, mismatches, samples, shed = [], [], 0, [], []
    held, held_shed = [], []  # the server's own time per answer (its Server-Timing header), seconds
    measuring = asyncio.Event()
    stop = asyncio.Event()
    counter = {"next": 0}

    async def worker(client):
        nonlocal mismatches
        while not stop.is_set():
            index = counter["next"] % len(requests)
            counter["next"] += 1
            task, items = requests[index]
            t0 = time.perf_counter()
            try:
                response = await client.post(f"{base}/v1/tasks/{task}/predict", json={"inputs": items})
                ok = response.status_code == 200
                labels = [p["label_id"] for p in response.json()["predictions"]] if ok else None
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                ok, labels, response = False, None, f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - t0
            timing = getattr(response, "headers", {}).get("server-timing", "").partition(";dur=")[2]
            was_shed = (not ok and getattr(response, "status_code", None) == 503
                        and response.headers.get("retry-after") is not None)
            if measuring.is_set() and not stop.is_set():
                if was_shed:
                    shed.append(elapsed)
                    if timing:
                        held_shed.append(float(timing) / 1e3)
                else:
                    latencies.append(elapsed)
                    if timing:
                        held.append(float(timing) / 1e3)
                    if not ok:
                        errors.append(str(getattr(response, "status_code", response))[:200])
                    elif labels != expected[index]:
                        mismatches += 1
            if was_shed:
                await asyncio.sleep(float(response.headers["retry-after"]) * 0.2)  # a polite client backs off

    import json
    import subprocess
    import tempfile

    # the liveness probe runs in its own process (as a kubelet's would), so the load client's own
    # event loop does not delay it: what it measures is the server's answer time
    probe_file = Path(tempfile.mkstemp(prefix="doe-probe-", suffix=".jsonl")[1])
    prober = subprocess.Popen([sys.executable, "-c", PROBER, f"{base}/healthz", str(probe_file)])

    async def sampler():
        while not stop.is_set():
            samples.append((time.monotonic(), measuring.is_set(), memory()))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(connections)]
        tasks += [asyncio.create_task(sampler())]
        await asyncio.sleep(config.load_warmup_seconds)
        measuring.set()
        probe_start = probe_file.stat().st_size
        start = time.monotonic()
        await asyncio.sleep(config.load_seconds)
        stop.set()
        elapsed = time.monotonic() - start
        probe_end = probe_file.stat().st_size
        await asyncio.gather(*tasks)
    prober.terminate()
    prober.wait()
    with open(probe_file, "rb") as handle:
        handle.seek(probe_start)
        health = [json.loads(line)["s"] for line in handle.read(probe_end - probe_start).decode().splitlines()
                  if line.strip()]
    probe_file.unlink()
    rss = [r for _, during, r in samples if during] or [samples[-1][2]]

    def quantiles(values):
        ordered = sorted(values)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None  # noqa: E731
        return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1] if ordered else None}

    return {"kind": "load", "connections": connections, "memory_arena": config.load_memory_arena,
            "tasks": len({t for t, _ in requests}), "seconds": elapsed, "warmup_seconds": config.load_warmup_seconds,
            "requests": len(latencies), "errors": len(errors), "error_samples": errors[:5], "mismatches": mismatches,
            "shed": len(shed), "shed_latency_s": quantiles(shed), "requests_per_s": len(latencies) / elapsed,
            "latency_s": quantiles(latencies), "server_s": quantiles(held), "shed_server_s": quantiles(held_shed),
            "health_probes": len(health), "health_s": quantiles(health),
            "rss_after_warmup_bytes": rss[0], "rss_end_bytes": rss[-1], "rss_max_bytes": max(rss),
            "rss_growth": (rss[-1] - rss[0]) / rss[0], "rss_samples": len(rss)}


def _render_load(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Load: `doe-runtime serve` under concurrent requests", ""] + intro
    loads = [r for r in rows if r["kind"] == "load"]
    if loads:
        r0 = loads[0]
        lines += [f"One asyncio client on loopback, requests of 1-4 texts (mixed lengths) round-robin over "
                  f"{r0['tasks']} tasks, {r0['seconds']:.0f} s measured after {r0['warmup_seconds']:.0f} s of warm-up per "
                  "row; every answer compared with sequential `Router.predict`; a separate process probes "
                  "`/healthz` every 200 ms (as a liveness probe would; a failed probe counts as 1e9 s); requests shed by the server (503 + Retry-After) are counted apart and "
                  f"the client backs off 0.2 s before its next one; onnxruntime CPU memory arena "
                  f"{'on' if r0.get('memory_arena', True) else 'off'}.", "",
                  "Latencies are the client's (send to answer read); *in server* is the server's own `Server-Timing` "
                  "(request head parsed to response head, admission queue included): where the two differ, the time "
                  "went to the client's event loop or the sockets, on the same 2 cores as the server.", "",
                  "| engine | connections | answered | shed | errors | answers differing | requests/s | p50 ms | p99 ms | "
                  "max ms | in server p99 ms | shed max ms (in server) | /healthz p99 ms (max) | "
                  "RSS after warm-up → end (MiB) | growth |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ms = lambda v: "—" if v is None else f"{1e3 * v:.1f}"  # noqa: E731
        for r in loads:
            health = r.get("health_s", {})
            shed = r.get("shed_latency_s", {})
            engine = r.get("engine", "fastapi") + (f" ({r['replicas']} replica(s); RSS: replicas summed)"
                                                   if r.get("engine") == "ray" else "")
            lines.append(f"| {engine} | {r['connections']} | {r['requests']} | {r.get('shed', 0)} | {r['errors']} | "
                         f"{r['mismatches']} | "
                         f"{r['requests_per_s']:.1f} | {ms(r['latency_s']['p50'])} | {ms(r['latency_s']['p99'])} | "
                         f"{ms(r['latency_s']['max'])} | {ms(r.get('server_s', {}).get('p99'))} | {ms(shed.get('max'))} "
                         f"({ms(r.get('shed_server_s', {}).get('max'))}) | {ms(health.get('p99'))} "
                         f"({ms(health.get('max'))}) | {r['rss_after_warmup_bytes'] / 2**20:.0f} → "
                         f"{r['rss_end_bytes'] / 2**20:.0f} | {100 * r['rss_growth']:+.2f}% |")
        base = {r["connections"]: r for r in loads if r.get("engine", "fastapi") == "fastapi"}
        for r in loads:
            if r.get("engine") == "ray" and r["connections"] in base:
                ratio = r["latency_s"]["p50"] / base[r["connections"]]["latency_s"]["p50"]
                lines.append(f"- Ray, {r['replicas']} replica(s), {r['connections']} connections: p50 {ratio:.0%} of the "
                             f"FastAPI server's ({'within' if ratio <= 1.15 else 'over'} the 115 % target); "
                             f"{r['rss_end_bytes'] / r['replicas'] / 2**20:.0f} MiB per replica.")
        lines += ["", f"SIGTERM at the end: graceful shutdown logged: {r0['graceful_shutdown']} (exit code "
                      f"{r0['exit_code']}; uvicorn re-raises the signal after draining)."
                  + "".join(f" Error samples at {r['connections']}: {r['error_samples']}." for r in loads if r["errors"]),
                  ""]
    for r in rows:
        if r["kind"] == "big_request":
            lines += [f"One request of {r['items']} texts of 16 KB ({r['bytes'] / 2**20:.1f} MiB) after the load: HTTP "
                      f"{r['status']} in {r['seconds']:.2f} s; server memory {r['rss_before_bytes'] / 2**20:.0f} → "
                      f"{r['rss_after_bytes'] / 2**20:.0f} MiB just after → {r['rss_settled_bytes'] / 2**20:.0f} MiB 3 s "
                      f"later ({r['lasting_growth_bytes'] / 2**20:+.1f} MiB lasting).", ""]
    return lines
