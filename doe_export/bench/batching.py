"""``batching``: ``doe-runtime serve`` with its defaults, single-text requests at each connection count, with
dynamic batching off (``--batch-wait-ms 0``) and on (each other wait): throughput, client and server
p50/p99, ``/healthz`` p99, every answer against ``Router.predict`` of that text alone, and ``/metrics``
(scraped mid-run and parsed with prometheus_client's parser; its request counter against what the client got).

The served bundle is the one ``doe build`` ships (``--bundles DIR``, or built here with its defaults); the
texts are the task's test texts. ``--quick``: a tiny generated bundle and texts, to keep the code path alive.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import statistics
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
    alone = [reference.predict(task, [text]) for text in texts]
    expected = [[p.label_id for p in answer] for answer in alone]
    margins = [_margin(answer[0].probabilities) for answer in alone]  # how close each text is to a tie
    info = reference.info(task)
    del reference
    records = []
    # one server per wait, all up at once; the rows alternate between them round after round (the order
    # reversed every other round), so drift on the machine falls on every setting alike
    with contextlib.ExitStack() as stack:
        servers = {
            wait: stack.enter_context(
                ServerProcess(
                    config,
                    root,
                    engine="fastapi",
                    replicas=None,
                    tasks=1,
                    extra=("--batch-wait-ms", f"{wait:g}"),
                    suite_threads=False,
                )
            )
            for wait in config.batching_waits_ms
        }
        for round_ in range(config.batching_rounds):
            for connections in config.batching_connections:
                waits = list(config.batching_waits_ms)
                for wait in waits[::-1] if round_ % 2 else waits:
                    server = servers[wait]
                    before = _scrape(server.base)
                    result = run_client(
                        server,
                        requests,
                        expected,
                        config=config,
                        connections=connections,
                        midway=functools.partial(_scrape, server.base),
                    )
                    after = _scrape(server.base)
                    result.update(_counters(before, after, result))
                    result.update(
                        kind="batching",
                        round=round_,
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
        record.update(servers[record["batch_wait_ms"]].shutdown)
    return records + _verdicts(records) + [{"kind": "margins", "margins": margins}]


def _margin(probabilities: dict[str, float]) -> float:
    """The top probability minus the second: how far an answer is from changing its label."""
    top = sorted(probabilities.values(), reverse=True)
    return top[0] - (top[1] if len(top) > 1 else 0.0)


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
    """Each wait against batching off at the same connection count: the throughput ratio of each round's
    pair of rows and their median, the p99s (medians over the rounds), errors and answers summed."""
    out = []
    keys = sorted({(r["connections"], r["batch_wait_ms"]) for r in records if r["batching"]})
    for connections, wait in keys:
        pairs = []
        for on in (
            r for r in records if r["batching"] and (r["connections"], r["batch_wait_ms"]) == (connections, wait)
        ):
            off = [
                r for r in records if not r["batching"] and (r["connections"], r["round"]) == (connections, on["round"])
            ]
            pairs += [(on, off[0])] if off else []
        if not pairs:
            continue
        ratios = [on["requests_per_s"] / off["requests_per_s"] for on, off in pairs]
        p99, p99_off = (statistics.median(pair[i]["latency_s"]["p99"] for pair in pairs) for i in (0, 1))
        out.append(
            {
                "kind": "verdict",
                "connections": connections,
                "batch_wait_ms": wait,
                "rounds": len(pairs),
                "throughput_ratio": statistics.median(ratios),
                "throughput_ratios": ratios,
                "requests_per_s": statistics.median(on["requests_per_s"] for on, _ in pairs),
                "requests_per_s_off": statistics.median(off["requests_per_s"] for _, off in pairs),
                "server_cpu_ms_per_request": statistics.median(on["server_cpu_ms_per_request"] for on, _ in pairs),
                "server_cpu_ms_per_request_off": statistics.median(
                    off["server_cpu_ms_per_request"] for _, off in pairs
                ),
                "p99_s": p99,
                "p99_off_s": p99_off,
                "p99_no_worse": p99 <= p99_off,
                "errors": sum(on["errors"] + off["errors"] for on, off in pairs),
                "mismatches": sum(on["mismatches"] for on, _ in pairs),
                "answers": sum(on["requests"] for on, _ in pairs),
                "health_p99_s": max(on["health_s"]["p99"] for on, _ in pairs),
            }
        )
    return out


__all__ = ["run_batching", "scrape_totals"]
