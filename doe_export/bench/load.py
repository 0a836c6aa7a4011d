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
    ``Router.predict``; the server's resident memory is sampled every second."""
    import asyncio
    import subprocess

    import httpx

    from doe_runtime import Router

    names = make_bundles(config, root, config.load_tasks, progress)
    texts = mixed_texts(64, config.seed, max_words=120)
    requests = [(names[i % len(names)], texts[i: i + 1 + i % 4]) for i in range(len(texts) - 4)]
    reference = Router(root, device="cpu", max_resident=len(names))
    expected = [[p.label_id for p in reference.predict(task, items)] for task, items in requests]
    del reference
    port = _free_port()
    server_log = root / "server.log"
    log_handle = open(server_log, "w", encoding="utf-8")
    server = subprocess.Popen([sys.executable, "-m", "doe_runtime.cli", "serve", str(root), "--port", str(port),
                               "--max-resident", str(len(names)), "--threads", str(config.threads)]
                              + ([] if config.load_memory_arena else ["--no-memory-arena"]),
                              stdout=log_handle, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready: {server_log.read_text()[-2000:]}")
            time.sleep(0.2)
        result = asyncio.run(_load(base, server.pid, requests, expected, config))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log_handle.close()
    # uvicorn drains running requests on SIGTERM, logs the shutdown, then re-raises the signal
    result["graceful_shutdown"] = "Application shutdown complete" in server_log.read_text()
    result["exit_code"] = server.returncode
    log(f"[load] {result['requests']} requests, {result['errors']} errors, {result['mismatches']} mismatches, "
        f"{result['requests_per_s']:.1f} req/s, p50 {1e3 * result['latency_s']['p50']:.1f} ms, p99 "
        f"{1e3 * result['latency_s']['p99']:.1f} ms, memory growth {100 * result['rss_growth']:+.2f}%")
    return [result]


async def _load(base: str, pid: int, requests: list, expected: list, config: SuiteConfig) -> dict:
    import asyncio

    import httpx

    latencies, errors, mismatches, samples = [], [], 0, []
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
            if measuring.is_set() and not stop.is_set():
                latencies.append(elapsed)
                if not ok:
                    errors.append(str(getattr(response, "status_code", response))[:200])
                elif labels != expected[index]:
                    mismatches += 1

    async def sampler():
        while not stop.is_set():
            samples.append((time.monotonic(), measuring.is_set(), _process_rss(pid)))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=config.load_connections, max_keepalive_connections=config.load_connections)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(config.load_connections)]
        tasks.append(asyncio.create_task(sampler()))
        await asyncio.sleep(config.load_warmup_seconds)
        measuring.set()
        start = time.monotonic()
        await asyncio.sleep(config.load_seconds)
        stop.set()
        elapsed = time.monotonic() - start
        await asyncio.gather(*tasks)
    rss = [r for _, during, r in samples if during] or [samples[-1][2]]
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")  # noqa: E731
    return {"kind": "load", "connections": config.load_connections, "memory_arena": config.load_memory_arena, "tasks": len({t for t, _ in requests}),
            "seconds": elapsed, "warmup_seconds": config.load_warmup_seconds, "requests": len(latencies),
            "errors": len(errors), "error_samples": errors[:5], "mismatches": mismatches,
            "requests_per_s": len(latencies) / elapsed,
            "latency_s": {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1] if ordered else None},
            "rss_after_warmup_bytes": rss[0], "rss_end_bytes": rss[-1], "rss_max_bytes": max(rss),
            "rss_growth": (rss[-1] - rss[0]) / rss[0], "rss_samples": len(rss)}


def _render_load(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Load: `doe-runtime serve` under concurrent requests", ""] + intro
    for r in rows:
        lines += [f"{r['connections']} concurrent connections (one asyncio client) on loopback, requests of 1-4 texts "
                  f"(mixed lengths) round-robin over {r['tasks']} tasks, {r['seconds']:.0f} s measured after "
                  f"{r['warmup_seconds']:.0f} s of warm-up; every answer compared with sequential `Router.predict`; "
                  f"onnxruntime CPU memory arena {'on' if r.get('memory_arena', True) else 'off'}.", "",
                  "| requests | errors | answers differing | requests/s | p50 ms | p90 ms | p99 ms | max ms | RSS after "
                  "warm-up → end (MiB) | growth |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {r['requests']} | {r['errors']} | {r['mismatches']} | {r['requests_per_s']:.1f} | "
                  f"{1e3 * r['latency_s']['p50']:.1f} | {1e3 * r['latency_s']['p90']:.1f} | "
                  f"{1e3 * r['latency_s']['p99']:.1f} | {1e3 * r['latency_s']['max']:.1f} | "
                  f"{r['rss_after_warmup_bytes'] / 2**20:.0f} → {r['rss_end_bytes'] / 2**20:.0f} | "
                  f"{100 * r['rss_growth']:+.2f}% |", "",
                  f"SIGTERM at the end: graceful shutdown logged: {r['graceful_shutdown']} (exit code "
                  f"{r['exit_code']}; uvicorn re-raises the signal after draining)."
                  + (f" Error samples: {r['error_samples']}" if r["errors"] else ""), ""]
    return lines
