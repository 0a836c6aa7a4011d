"""``doe-runtime serve ROOT --engine ray``: the same HTTP API over Ray Serve replicas, each task routed
to a replica that already holds its expert (extra ``doe-runtime[ray]``).

Two deployments::

    DoeIngress  (1 replica)   the FastAPI app of doe_runtime.server (schemas, limits, errors, health,
                              listing), whose predictions are answered by
    DoeExperts  (N replicas)  one doe_runtime.Router each; the task is Serve's multiplexed model id,
                              so Serve's request router prefers a replica that has the task loaded
                              (then the one with fewest loaded) and each replica keeps at most
                              ``max_experts_per_replica`` experts (Serve's max_num_models_per_replica).

Bundles live on a path every replica can read (a local folder, or a volume mounted at the same path
on every node); each replica verifies their sha256 itself and reloads a rebuilt bundle on its next
request, as the single-process server does. A replica that dies mid-request is retried once on
another; if none answers, the client gets 503 with Retry-After, never a silent loss.

This module imports ``ray`` at import time: only ``--engine ray`` imports it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, DoeRuntimeError, MissingExtraError

try:
    import ray
    from ray import serve
except ImportError as exc:  # the Ray engine is an optional extra
    raise MissingExtraError(
        "--engine ray needs the [ray] extra: pip install 'doe-runtime[ray]' (ray[serve] 2.60)"
    ) from exc

from .batching import batching_options, split_answers
from .metrics import router_state
from .router import Router
from .server import DEFAULT_MAX_QUEUE, create_app, error_for
from .serving import merged_call, predict_response, response_body

log = logging.getLogger("doe_runtime.ray")
APP_NAME = "doe"
REPLICA_HEADER = "X-Doe-Replica"
SERVE_ONGOING = 5  # Serve's default max_ongoing_requests: a replica's requests at once without batching
# Serve kills an HTTP proxy that is not ready within RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S (5 s by default), and
# serve.start then fails with ActorDiedError: on 2 cores busy with another job the proxy's imports alone took
# longer. A local cluster's workers inherit the environment ray.init starts them with.
PROXY_READY_CHECK = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
PROXY_READY_TIMEOUT_S = 60


@contextlib.contextmanager
def patient_proxy() -> Iterator[None]:
    """Within it, Serve waits PROXY_READY_TIMEOUT_S for its HTTP proxy, unless the environment already sets
    PROXY_READY_CHECK (that value is kept); the environment is put back after. It reaches a cluster that
    ``ray.init`` starts inside it; a cluster joined by address keeps the setting it was started with."""
    previous = os.environ.get(PROXY_READY_CHECK)
    if previous is None:
        os.environ[PROXY_READY_CHECK] = str(PROXY_READY_TIMEOUT_S)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROXY_READY_CHECK, None)


def _merge_calls(router: Router, calls: list[tuple[str, list]]) -> list[tuple[bool, Any]]:
    """One Serve batch (requests of any of the replica's tasks): one Router call per task, each request's
    share of it back in order; ``(True, (predictions, stats))`` or ``(False, error)`` per request."""
    by_task: dict[str, list[int]] = collections.defaultdict(list)
    for index, (task, _items) in enumerate(calls):
        by_task[task].append(index)
    out: list[tuple[bool, Any]] = [(False, None)] * len(calls)
    for task, indexes in by_task.items():
        started = time.perf_counter()
        try:
            predictions, stats = merged_call(router, task, [item for i in indexes for item in calls[i][1]])
        except (DoeRuntimeError, OSError) as exc:  # the call's error belongs to every request in it
            for i in indexes:
                out[i] = (False, exc)
            continue
        shares = split_answers([calls[i][1] for i in indexes], predictions)
        for i, share in zip(indexes, shares):
            # "lead": the one request of the call that reports the call to /metrics (the others only their wait)
            out[i] = (True, (share, {**stats, "requests": len(indexes), "lead": i == indexes[0], "started": started}))
    return out


def _experts_deployment(max_experts: int, batching: dict | None):
    """The replica class, with Serve's per-replica model cap and batching fixed at definition time."""
    wait_s = batching["wait_s"] if batching else 0.0
    max_items = batching["max_items"] if batching else 1

    @serve.deployment(name="DoeExperts")
    class DoeExperts:
        def __init__(self, root: str, router_options: dict):
            self.root = Path(root)
            # the Router's own LRU matches Serve's: a replica never holds more sessions than Serve assumes
            self.router = Router(root, auto_reload=True, max_resident=max_experts, **router_options)
            self.replica = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=max_experts)
        async def load(self, task: str) -> str:
            await asyncio.to_thread(self.router.info, task)  # hashes, session, warm-up: once per replica
            return task

        async def predict(self, items: list) -> dict:
            task = serve.get_multiplexed_model_id()
            try:
                await self.load(task)
                if batching is None or len(items) > max_items:  # alone: no batching, or larger than a batch
                    stats: dict = {}
                    body = await asyncio.to_thread(predict_response, self.router, task, items, stats)
                    stats["requests"] = 1
                else:  # checked alone first: a bad item fails its own request, never its batch's neighbours
                    checked = await asyncio.to_thread(self.router.check, task, items)
                    arrived = time.perf_counter()
                    ok, answer = await self.merged((task, checked))
                    if not ok:
                        raise answer
                    predictions, stats = answer
                    stats["queued_s"] = stats.pop("started") - arrived  # in this replica's batch queue
                    body = response_body(task, predictions, stats)
                status = 200
            except (DoeRuntimeError, OSError) as exc:
                status, kind, message = error_for(task, exc, self.root)
                body, stats = {"error": {"type": kind, "message": message}}, {}
            state = await asyncio.to_thread(router_state, self.router)
            return {"status": status, "body": body, "replica": self.replica, "stats": stats, "state": state}

        @serve.batch(
            max_batch_size=max_items,
            batch_wait_timeout_s=wait_s,
            batch_size_fn=lambda calls: sum(len(items) for _task, items in calls),
        )
        async def merged(self, calls: list[tuple[str, list]]) -> list[tuple[bool, Any]]:
            return await asyncio.to_thread(_merge_calls, self.router, calls)

    return DoeExperts


class Replicas:
    """The ingress' predictor: sends a prediction to the expert replicas, retries once on a replica that died,
    and keeps each replica's Router state as of its last answer (what ``/metrics`` reports for it)."""

    def __init__(self, experts: Any):
        self.experts = experts
        self._states: dict[str, dict] = {}

    def states(self) -> dict[str, dict]:
        return dict(self._states)

    async def __call__(self, task: str, items: list) -> tuple[int, dict, dict, dict]:
        last = None
        for attempt in range(2):  # a replica that died mid-request: once more, on another
            try:
                answer = await self.experts.options(multiplexed_model_id=task).predict.remote(items)
                self._states[answer["replica"]] = answer["state"]
                return answer["status"], answer["body"], {REPLICA_HEADER: answer["replica"]}, answer["stats"]
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorDiedError,
                serve.exceptions.RayServeException,
                ray.exceptions.RayTaskError,
            ) as exc:
                last = exc
                log.warning("replica failed on task %s (attempt %d): %s", task, attempt + 1, type(exc).__name__)
                await asyncio.sleep(0.5)
        body = {
            "error": {
                "type": "replica_unavailable",
                "message": f"no replica answered for task {task!r} ({type(last).__name__}); retry shortly",
            }
        }
        return 503, body, {"Retry-After": "1"}, {}


@serve.deployment(name="DoeIngress")
@serve.ingress()
class DoeIngress:
    """The HTTP API: doe_runtime.server's app, its predictions sent to the DoeExperts replicas."""

    def __init__(self, experts, root: str, app_options: dict):
        self.replicas, self.root, self.app_options = Replicas(experts), root, app_options

    def __serve_build_asgi_app__(self):
        return create_app(self.root, predictor=self.replicas, **self.app_options)


def check_scaling(
    replicas: int | None, min_replicas: int | None, max_replicas: int | None, max_experts_per_replica: int
) -> dict:
    """Serve's scaling settings from the CLI's, refused before anything starts when they contradict."""
    if max_experts_per_replica < 1:
        raise ConfigError(f"--max-experts-per-replica must be >= 1, got {max_experts_per_replica}")
    autoscale = min_replicas is not None or max_replicas is not None
    if autoscale and replicas is not None:
        raise ConfigError("give either --replicas N or autoscaling bounds (--min-replicas/--max-replicas), not both")
    if autoscale:
        low, high = (min_replicas if min_replicas is not None else 1), max_replicas
        if high is None or low < 0 or high < 1 or low > high:
            raise ConfigError(
                f"autoscaling bounds must satisfy 0 <= --min-replicas <= --max-replicas >= 1, got "
                f"{min_replicas} and {max_replicas}"
            )
        return {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1)}}
    count = 1 if replicas is None else replicas
    if count < 1:
        raise ConfigError(f"--replicas must be >= 1, got {count}")
    return {"num_replicas": count}


def replica_resources(device: str, cpus: float, gpus: float | None) -> dict:
    """Ray's ``ray_actor_options`` of one expert replica: ``cpus`` CPUs, and with ``device='cuda'`` a GPU
    (``gpus``: a fraction in (0, 1] lets several replicas share one GPU; default a whole one)."""
    if not isinstance(cpus, (int, float)) or cpus <= 0:
        raise ConfigError(f"--replica-cpus must be > 0, got {cpus!r}")
    if device != "cuda":
        if gpus is not None:
            raise ConfigError(
                f"--replica-gpus {gpus} needs --device cuda (got --device {device}): replicas ask Ray for a GPU "
                "only when they will run on one"
            )
        return {"num_cpus": cpus}
    gpus = 1.0 if gpus is None else gpus
    if not isinstance(gpus, (int, float)) or not 0 < gpus <= 1:
        raise ConfigError(
            f"--replica-gpus must be in (0, 1] (a replica runs on one GPU; 0.5 puts two on one), got {gpus!r}"
        )
    return {"num_cpus": cpus, "num_gpus": gpus}


def build_app(
    root: str | Path,
    *,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    max_experts_per_replica: int = 4,
    replica_cpus: float = 1.0,
    replica_gpus: float | None = None,
    router_options: dict | None = None,
    batch_wait_ms: float | None = None,
    max_batch_items: int | None = None,
    **app_options: Any,
):
    """The Serve application (ingress + expert replicas) for the bundles under ``root``.

    Batching happens in the replicas (Serve's ``@serve.batch``, ``batch_wait_ms`` / ``max_batch_items`` as in
    the FastAPI engine), so a replica takes up to two batches of requests at once, and the ingress lets
    every replica's share through (its default ``max_concurrency``; Serve's own default of 5 ongoing
    requests would cap every batch at 5)."""
    scaling = check_scaling(replicas, min_replicas, max_replicas, max_experts_per_replica)
    router_options = dict(router_options or {})
    device = router_options.get("device", "auto")
    resources = replica_resources(device, replica_cpus, replica_gpus)
    batching = batching_options(batch_wait_ms, max_batch_items, "cuda" if device == "cuda" else "cpu")
    ongoing = 2 * batching["max_items"] if batching else SERVE_ONGOING
    count = replicas or max_replicas or 1
    app_options["max_concurrency"] = app_options.get("max_concurrency") or (ongoing if batching else 8) * count
    queue = app_options.get("max_queue", DEFAULT_MAX_QUEUE)
    root = str(Path(root).resolve())
    experts = (
        _experts_deployment(max_experts_per_replica, batching)
        .options(ray_actor_options=resources, max_ongoing_requests=ongoing, **scaling)
        .bind(root, router_options)
    )
    ingress: Any = DoeIngress  # a Serve Deployment (its .options come from @serve.deployment)
    # the ingress admits, queues and sheds itself: Serve must let all of those through to it
    return ingress.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=app_options["max_concurrency"] + queue + 16
    ).bind(experts, root, {**app_options, "batch_wait_ms": 0})


def serve_ray(
    root: str | Path, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, **options: Any
) -> None:
    """Start (or join, with ``address``) a Ray cluster, run the app, block until SIGINT/SIGTERM."""
    import signal
    import threading

    app = build_app(root, **options)  # bad settings fail here, before Ray starts
    # no access log line per request on every hop (proxy, ingress, replica): on 2 cores it cost measurable CPU
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    with patient_proxy():
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
        serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=quiet)
    log.info("doe-runtime (Ray engine) serving %s on http://%s:%s", root, host, port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


__all__ = [
    "APP_NAME",
    "PROXY_READY_CHECK",
    "PROXY_READY_TIMEOUT_S",
    "REPLICA_HEADER",
    "DoeIngress",
    "build_app",
    "check_scaling",
    "patient_proxy",
    "replica_resources",
    "serve_ray",
]
