"""``load``: ``doe-runtime serve`` in its own process under a bounded asyncio client: errors, answers
compared with sequential ``Router.predict``, p50/p99, the server's memory, graceful shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..console import log
from .load_client import run_client
from .workbench import SuiteConfig, make_bundles, mixed_texts


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def session_cpu_seconds(leader: int) -> float:
    """CPU seconds (user + system) used so far by the processes of ``leader``'s session: the server started
    with ``start_new_session`` and whatever it started (the Ray engine's replicas)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[3]) == leader:  # field 6, the session id (fields here start at field 3, the state)
                total += (int(fields[11]) + int(fields[12])) / tick  # fields 14-15: utime, stime
        except (OSError, ValueError, IndexError):  # a process that ended while being read
            continue
    return total


def run_load(config: SuiteConfig, root: Path, progress: bool) -> list[dict]:
    """``doe-runtime serve`` in its own process, a bounded asyncio client with ``load_connections``
    concurrent connections over ``load_tasks`` tasks; every answer is compared with sequential
    ``Router.predict``; the server's resident memory is sampled every second. With the Ray engine in
    ``load_engines``, the same load against ``serve --engine ray`` with 1 and 2 replicas as well."""
    from doe_runtime import Router

    names = make_bundles(config, root, config.load_tasks, progress)
    texts = mixed_texts(64, config.seed, max_words=120)
    requests = [(names[i % len(names)], texts[i : i + 1 + i % 4]) for i in range(len(texts) - 4)]
    reference = Router(root, device="cpu", max_resident=len(names))
    expected = [[p.label_id for p in reference.predict(task, items)] for task, items in requests]
    del reference
    results = []
    engines = [("fastapi", None)] + [("ray", n) for n in config.load_ray_replicas if "ray" in config.load_engines]
    for engine, replicas in engines:
        with ServerProcess(config, root, engine=engine, replicas=replicas, tasks=len(names)) as server:
            for connections in config.load_connection_steps or (config.load_connections,):
                result = run_client(server, requests, expected, config=config, connections=connections)
                result.update(engine=engine, replicas=replicas)
                results.append(result)
                _log_result(server.label, connections, result)
            if config.load_big_request and engine == "fastapi":
                results.append(_big_request(server.base, server.process.pid))
        for result in results:
            if result.get("engine") == engine and result.get("replicas") == replicas:
                result.update(server.shutdown)
    return results


def _log_result(label: str, connections: int, result: dict) -> None:
    log(
        f"[load] {label}, {connections} connections: {result['requests']} answered, {result['shed']} shed "
        f"(503 + Retry-After), {result['errors']} errors, {result['mismatches']} mismatches, "
        f"p50 {1e3 * result['latency_s']['p50']:.0f} ms, p99 {1e3 * result['latency_s']['p99']:.0f} ms "
        f"(in server {1e3 * (result['server_s']['p99'] or 0):.0f} ms), "
        f"/healthz p99 {1e3 * result['health_s']['p99']:.1f} ms, memory growth {100 * result['rss_growth']:+.2f}%"
    )


class ServerProcess:
    """``doe-runtime serve ROOT`` in its own process group (Ray's processes go with it), ready on entry,
    stopped with SIGTERM on exit; ``shutdown`` then says whether it drained and logged its shutdown."""

    def __init__(
        self,
        config: SuiteConfig,
        root: Path,
        *,
        engine: str,
        replicas: int | None,
        tasks: int,
        extra: tuple[str, ...] = (),
        suite_threads: bool = True,
    ):
        self.engine, self.replicas = engine, replicas
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.label = engine if engine == "fastapi" else f"ray, {replicas} replica(s)"
        self.log_path = root / f"server-{engine}{replicas or ''}{'-'.join(('', *extra)).replace('--', '')}.log"
        self.command = [
            sys.executable,
            "-m",
            "doe_runtime.cli",
            "serve",
            str(root),
            "--port",
            str(self.port),
            *(("--threads", str(config.threads)) if suite_threads else ()),  # else the server's default
            *extra,
        ]
        if not config.load_memory_arena:
            self.command.append("--no-memory-arena")
        if engine == "ray":
            self.command += [
                "--engine",
                "ray",
                "--replicas",
                str(replicas),
                "--max-experts-per-replica",
                str(tasks),
                "--replica-cpus",
                str(round(1.0 / (replicas or 1), 2)),
            ]
        else:
            self.command += ["--max-resident", str(tasks)]
        self.shutdown: dict = {}

    def memory(self) -> int:
        return _replica_rss(self.process.pid) if self.engine == "ray" else process_rss(self.process.pid)

    def cpu_seconds(self) -> float:
        return session_cpu_seconds(self.process.pid)

    def __enter__(self) -> ServerProcess:
        import httpx

        self._log = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(
                    f"the server ({self.label}) did not become ready: {self.log_path.read_text()[-2000:]}"
                )
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        server = self.process
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if self.engine == "ray":  # whatever the Ray cluster left in the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        self._log.close()
        # uvicorn drains running requests on SIGTERM, logs the shutdown, then re-raises the signal
        text = self.log_path.read_text()
        graceful = "Application shutdown complete" in text if self.engine == "fastapi" else None
        self.shutdown = {"graceful_shutdown": graceful, "exit_code": server.returncode}


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
                total += process_rss(int(status.parent.name))
        except (OSError, ValueError):
            continue
    return total or process_rss(pid)


def _big_request(base: str, pid: int) -> dict:
    """One 4 MiB request of 256 texts of 16 KB: its time and the server's memory before, just after
    and 3 s after (what stays)."""
    import httpx

    text = ("The markets rallied as investors weighed the latest figures. " * 300)[:16_000]
    body = {"inputs": [text] * 256}
    before = process_rss(pid)
    start = time.perf_counter()
    response = httpx.post(f"{base}/v1/tasks/expert-0/predict", json=body, timeout=120)
    seconds = time.perf_counter() - start
    after = process_rss(pid)
    time.sleep(3)
    settled = process_rss(pid)
    log(
        f"[load] 4 MiB request ({len(response.request.content) / 2**20:.1f} MiB): HTTP {response.status_code} in "
        f"{seconds:.2f} s; server memory {before / 2**20:.0f} -> {after / 2**20:.0f} -> {settled / 2**20:.0f} MiB"
    )
    return {
        "kind": "big_request",
        "bytes": len(response.request.content),
        "items": 256,
        "status": response.status_code,
        "seconds": seconds,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_settled_bytes": settled,
        "lasting_growth_bytes": settled - before,
    }


__all__ = ["ServerProcess", "process_rss", "run_load"]
