"""The load suite's client: one asyncio process with N connections sending requests round-robin, a
liveness prober in its own process, and the server's memory sampled every second. The connections are
:mod:`.http_client`'s lean keep-alive ones (the client shares the cores with the server it measures), and the
CPU both sides used over the measured window is recorded."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .http_client import Answer, ClientError, Connection
from .workbench import SuiteConfig

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


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def pick(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1] if ordered else None}


class _Tally:
    """What the workers saw while measuring."""

    def __init__(self):
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.mismatches = 0
        self.differing: collections.Counter = collections.Counter()  # request index -> answers that differed
        self.shed: list[float] = []
        self.held: list[float] = []  # the server's own time per answer (its Server-Timing header), seconds
        self.held_shed: list[float] = []

    def add(self, *, elapsed: float, response, ok: bool, was_shed: bool, labels, expected, index: int) -> None:
        timing = getattr(response, "headers", {}).get("server-timing", "").partition(";dur=")[2]
        if was_shed:
            self.shed.append(elapsed)
            if timing:
                self.held_shed.append(float(timing) / 1e3)
            return
        self.latencies.append(elapsed)
        if timing:
            self.held.append(float(timing) / 1e3)
        if not ok:
            self.errors.append(str(getattr(response, "status_code", response))[:200])
        elif labels != expected:
            self.mismatches += 1
            self.differing[index] += 1


async def _worker(job: dict, state: dict, tally: _Tally) -> None:
    requests, expected = job["requests"], job["expected"]
    client = Connection(job["base"])
    try:
        await _send(client, requests, expected, state, tally)
    finally:
        await client.close()


async def _send(client: Connection, requests: list, expected: list, state: dict, tally: _Tally) -> None:
    while not state["stop"].is_set():
        index = state["next"] % len(requests)
        state["next"] += 1
        task, items = requests[index]
        t0 = time.perf_counter()
        response: Answer | str
        try:
            response = await client.post_json(f"/v1/tasks/{task}/predict", {"inputs": items})
            ok = response.status_code == 200
            labels = [p["label_id"] for p in response.json()["predictions"]] if ok else None
        except (ClientError, ValueError, KeyError) as exc:
            ok, labels, response = False, None, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - t0
        status = getattr(response, "status_code", None)
        state["answered"][str(status)] += 1  # every answer the server gave, warm-up and tail included
        retry = response.headers.get("retry-after") if isinstance(response, Answer) and status == 503 else None
        was_shed = retry is not None
        if state["measuring"].is_set() and not state["stop"].is_set():
            tally.add(
                elapsed=elapsed,
                response=response,
                ok=ok,
                was_shed=was_shed,
                labels=labels,
                expected=expected[index],
                index=index,
            )
        if retry is not None:
            await asyncio.sleep(float(retry) * 0.2)  # a polite client backs off


async def _drive(
    job: dict, server: Any, *, config: SuiteConfig, connections: int, probe_file: Path
) -> tuple[_Tally, list, float, tuple[int, int], dict]:
    tally, samples = _Tally(), []
    state: dict[str, Any] = {
        "next": 0,
        "stop": asyncio.Event(),
        "measuring": asyncio.Event(),
        "answered": collections.Counter(),
    }
    job["answered"] = state["answered"]

    async def sampler():
        while not state["stop"].is_set():
            samples.append((time.monotonic(), state["measuring"].is_set(), server.memory()))
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(_worker(job, state, tally)) for _ in range(connections)]
    tasks.append(asyncio.create_task(sampler()))
    await asyncio.sleep(config.load_warmup_seconds)
    state["measuring"].set()
    probe_start = probe_file.stat().st_size
    cpu = (time.process_time(), server.cpu_seconds())
    start = time.monotonic()
    if job.get("midway") is not None:  # e.g. a /metrics scrape in the middle of the measured window
        await asyncio.sleep(config.load_seconds / 2)
        job["midway_result"] = await asyncio.to_thread(job["midway"])
    await asyncio.sleep(max(0.0, config.load_seconds - (time.monotonic() - start)))
    state["stop"].set()
    elapsed = time.monotonic() - start
    used = {"client_cpu_s": time.process_time() - cpu[0], "server_cpu_s": server.cpu_seconds() - cpu[1]}
    probe_end = probe_file.stat().st_size
    await asyncio.gather(*tasks)
    return tally, samples, elapsed, (probe_start, probe_end), used


def run_client(
    server: Any,
    requests: list,
    expected: list,
    *,
    config: SuiteConfig,
    connections: int,
    midway: Callable[[], Any] | None = None,
) -> dict:
    """Load ``server`` (its ``base`` URL, ``memory()`` and ``cpu_seconds()``) with ``connections`` connections
    for ``config.load_seconds`` after a warm-up; the record.
    ``midway()`` runs (in a thread) halfway through the measured window; what it returns is ``midway``."""
    # the liveness probe runs in its own process (as a kubelet's would), so the load client's own
    # event loop does not delay it: what it measures is the server's answer time
    probe_file = Path(tempfile.mkstemp(prefix="doe-probe-", suffix=".jsonl")[1])
    prober = subprocess.Popen([sys.executable, "-c", PROBER, f"{server.base}/healthz", str(probe_file)])
    job: dict[str, Any] = {"base": server.base, "requests": requests, "expected": expected, "midway": midway}
    try:
        tally, samples, elapsed, (start, end), used = asyncio.run(
            _drive(
                job,
                server,
                config=config,
                connections=connections,
                probe_file=probe_file,
            )
        )
    finally:
        prober.terminate()
        prober.wait()
    with open(probe_file, "rb") as handle:
        handle.seek(start)
        lines = handle.read(end - start).decode().splitlines()
    probe_file.unlink()
    health = [json.loads(line)["s"] for line in lines if line.strip()]
    rss = [r for _, during, r in samples if during] or [samples[-1][2]]
    return {
        "kind": "load",
        "connections": connections,
        "memory_arena": config.load_memory_arena,
        "tasks": len({t for t, _ in requests}),
        "seconds": elapsed,
        "warmup_seconds": config.load_warmup_seconds,
        "requests": len(tally.latencies),
        "errors": len(tally.errors),
        "error_samples": tally.errors[:5],
        "mismatches": tally.mismatches,
        "differing_requests": {str(i): n for i, n in sorted(tally.differing.items())},  # index -> answers
        "shed": len(tally.shed),
        "shed_latency_s": quantiles(tally.shed),
        "requests_per_s": len(tally.latencies) / elapsed,
        # CPU over the measured window: the server's processes, and this client's (on the same cores)
        **used,
        "server_cpu_ms_per_request": 1e3 * used["server_cpu_s"] / max(1, len(tally.latencies)),
        "client_cpu_share": used["client_cpu_s"] / (used["client_cpu_s"] + used["server_cpu_s"] or 1.0),
        "latency_s": quantiles(tally.latencies),
        "server_s": quantiles(tally.held),
        "shed_server_s": quantiles(tally.held_shed),
        "health_probes": len(health),
        "health_s": quantiles(health),
        "rss_after_warmup_bytes": rss[0],
        "rss_end_bytes": rss[-1],
        "rss_max_bytes": max(rss),
        "rss_growth": (rss[-1] - rss[0]) / rss[0],
        "rss_samples": len(rss),
        "answered_by_status": dict(job["answered"]),
        "midway": job.get("midway_result"),
    }


__all__ = ["PROBER", "quantiles", "run_client"]
