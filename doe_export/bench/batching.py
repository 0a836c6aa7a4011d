"""``batching``: ``doe-runtime serve`` with its defaults, single-text requests at each connection count, with
dynamic batching off (``--batch-wait-ms 0``) and on (each other wait): throughput, client and server
p50/p99, ``/healthz`` p99, every answer against ``Router.predict`` of that text alone, and ``/metrics``
(scraped mid-run and parsed with prometheus_client's parser; its request counter against what the client got).

The served bundle is the one ``doe build`` ships (``--bundles DIR``, or built here with its defaults); the
texts are the task's test texts. ``--quick``: a tiny generated bundle and texts, to keep the code path alive.
"""

from __future__ import annotations

import collections
from pathlib import Path

from ..console import log
from ..errors import ConfigError
from .load import ServerProcess
from .load_client import run_client
from .workbench import SuiteConfig, make_bundles, mixed_texts

COUNTED = ("doe_requests_total", "doe_model_call_requests_count", "doe_model_call_requests_sum")


def _served(config: SuiteConfig, work: Path, progress: bool) -> tuple[Path, str, list[str]]:
    """(the folder served, the task, the request texts)."""
    if config.tiny:
        root = work / "tiny-bundles"
        return root, make_bundles(config, root, 1, progress)[0], mixed_texts(128, config.seed, max_words=60)
    from ..tasks import load_task

    task = config.batching_task
    data = load_task(task, config.seed, config.data_dir)
    if data.input != "single":
        raise ConfigError(f"the batching suite sends single texts; task {task!r} takes pairs (pick a single-text task)")
    root = Path(config.batching_bundles) if config.batching_bundles else work / "shipped"
    if not (root / task / "manifest.json").is_file():
        if config.batching_bundles:
            raise ConfigError(
                f"--bundles {root}: no bundle of task {task!r} there ({root / task / 'manifest.json'} is missing); "
                f"build it with `doe build --tasks {task} --out {root}` or leave --bundles out"
            )
        _build(config, task, root, progress)
    return root, task, [str(text) for text in data.test.inputs]


def _build(config: SuiteConfig, task: str, root: Path, progress: bool) -> None:
    from ..pipeline import build
    from ..specs import BuildConfig

    log(f"[batching] building {task} with doe build's defaults into {root} (reused next time)")
    build(
        BuildConfig(model=config.model, tasks=(task,), data_dir=config.data_dir, out_dir=str(root), progress=progress)
    )


def scrape_totals(text: str) -> dict[str, float]:
    """``/metrics`` parsed with prometheus_client's parser: the sum over labels of the counters the suite checks,
    and how many metric families the scrape held (it must parse whole)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = collections.defaultdict(float)
    families = 0
    for family in text_string_to_metric_families(text):
        families += 1
        for sample in family.samples:
            if sample.name in COUNTED:
                totals[sample.name] += sample.value
    return {**totals, "families": families}


def _scrape(base: str) -> dict[str, float]:
    import httpx

    response = httpx.get(base + "/metrics", timeout=30)
    response.raise_for_status()
    return scrape_totals(response.text)


def run_batching(config: SuiteConfig, work: Path, progress: bool) -> list[dict]:
    from doe_runtime import Router

    root, task, texts = _served(config, Path(work), progress)
    texts = texts[:256]
    requests = [(task, [text]) for text in texts]
    reference = Router(root)  # the server's defaults: its device and the precision it serves there
    expected = [[p.label_id for p in reference.predict(task, [text])] for text in texts]
    info = reference.info(task)
    del reference
    records = []
    for wait in config.batching_waits_ms:
        with ServerProcess(
            config,
            root,
            engine="fastapi",
            replicas=None,
            tasks=1,
            extra=("--batch-wait-ms", f"{wait:g}"),
            suite_threads=False,
        ) as server:
            for connections in config.batching_connections:
                before = _scrape(server.base)
                result = run_client(
                    server.base,
                    server.memory,
                    requests,
                    expected,
                    config=config,
                    connections=connections,
                    midway=lambda: _scrape(server.base),
                )
                after = _scrape(server.base)
                result.update(_counters(before, after, result))
                result.update(
                    kind="batching",
                    task=task,
                    batch_wait_ms=wait,
                    batching=wait > 0,
                    texts=len(texts),
                    precision=info["precision"],
                    provider=info["provider"],
                    bundles=str(root),
                )
                records.append(result)
                _log(result)
        for record in records:
            if record["batch_wait_ms"] == wait:
                record.update(server.shutdown)
    return records + _verdicts(records)


def _counters(before: dict, after: dict, result: dict) -> dict:
    """What /metrics counted over the step against what the client got: requests answered, and the model
    calls they took (requests per call: the batching actually achieved)."""
    answered = sum(count for status, count in result["answered_by_status"].items() if status != "None")
    counted = after.get("doe_requests_total", 0.0) - before.get("doe_requests_total", 0.0)
    calls = after.get("doe_model_call_requests_count", 0.0) - before.get("doe_model_call_requests_count", 0.0)
    merged = after.get("doe_model_call_requests_sum", 0.0) - before.get("doe_model_call_requests_sum", 0.0)
    return {
        "client_answered": answered,
        "metrics_requests": counted,
        "metrics_add_up": counted == answered,
        "metrics_midway_families": (result.get("midway") or {}).get("families"),
        "model_calls": calls,
        "requests_per_call": merged / calls if calls else None,
    }


def _log(result: dict) -> None:
    log(
        f"[batching] wait {result['batch_wait_ms']:g} ms, {result['connections']} connections: "
        f"{result['requests_per_s']:.1f} req/s, p50 {1e3 * result['latency_s']['p50']:.1f} ms, "
        f"p99 {1e3 * result['latency_s']['p99']:.1f} ms, /healthz p99 {1e3 * result['health_s']['p99']:.1f} ms, "
        f"{result['errors']} errors, {result['mismatches']} differing, {result['shed']} shed, "
        f"{result['requests_per_call'] or 0:.1f} requests per call; /metrics counted {result['metrics_requests']:.0f} "
        f"of {result['client_answered']} answers"
    )


def _verdicts(records: list[dict]) -> list[dict]:
    """Each wait against batching off at the same connection count: throughput ratio and p99s."""
    off = {r["connections"]: r for r in records if not r["batching"]}
    out = []
    for record in records:
        base = off.get(record["connections"])
        if not record["batching"] or base is None:
            continue
        out.append(
            {
                "kind": "verdict",
                "connections": record["connections"],
                "batch_wait_ms": record["batch_wait_ms"],
                "throughput_ratio": record["requests_per_s"] / base["requests_per_s"],
                "p99_s": record["latency_s"]["p99"],
                "p99_off_s": base["latency_s"]["p99"],
                "p99_no_worse": record["latency_s"]["p99"] <= base["latency_s"]["p99"],
                "errors": record["errors"] + base["errors"],
                "mismatches": record["mismatches"],
                "health_p99_s": record["health_s"]["p99"],
            }
        )
    return out


__all__ = ["run_batching", "scrape_totals"]
