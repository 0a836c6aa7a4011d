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
import logging
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

from .router import Router
from .server import create_app, error_for, predict_response

log = logging.getLogger("doe_runtime.ray")
APP_NAME = "doe"
REPLICA_HEADER = "X-Doe-Replica"


def _experts_deployment(max_experts: int):
    """The replica class, with Serve's per-replica model cap fixed at definition time."""

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
                body = await asyncio.to_thread(predict_response, self.router, task, items)
                return {"status": 200, "body": body, "replica": self.replica}
            except (DoeRuntimeError, OSError) as exc:
                status, kind, message = error_for(task, exc, self.root)
                return {
                    "status": status,
                    "body": {"error": {"type": kind, "message": message}},
                    "replica": self.replica,
                }

    return DoeExperts


@serve.deployment(name="DoeIngress")
@serve.ingress()
class DoeIngress:
    """The HTTP API: doe_runtime.server's app, its predictions sent to the DoeExperts replicas."""

    def __init__(self, experts, root: str, app_options: dict):
        self.experts, self.root, self.app_options = experts, root, app_options

    async def _predict(self, task: str, items: list):
        last = None
        for attempt in range(2):  # a replica that died mid-request: once more, on another
            try:
                answer = await self.experts.options(multiplexed_model_id=task).predict.remote(items)
                return answer["status"], answer["body"], {REPLICA_HEADER: answer["replica"]}
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorDiedError,
                serve.exceptions.RayServeException,
                ray.exceptions.RayTaskError,
            ) as exc:
                last = exc
                log.warning("replica failed on task %s (attempt %d): %s", task, attempt + 1, type(exc).__name__)
                await asyncio.sleep(0.5)
        return (
            503,
            {
                "error": {
                    "type": "replica_unavailable",
                    "message": f"no replica answered for task {task!r} ({type(last).__name__}); retry shortly",
                }
            },
            {"Retry-After": "1"},
        )

    def __serve_build_asgi_app__(self):
        return create_app(self.root, predictor=self._predict, **self.app_options)


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


def build_app(
    root: str | Path,
    *,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    max_experts_per_replica: int = 4,
    replica_cpus: float = 1.0,
    router_options: dict | None = None,
    **app_options: Any,
):
    """The Serve application (ingress + expert replicas) for the bundles under ``root``."""
    scaling = check_scaling(replicas, min_replicas, max_replicas, max_experts_per_replica)
    root = str(Path(root).resolve())
    experts = (
        _experts_deployment(max_experts_per_replica)
        .options(ray_actor_options={"num_cpus": replica_cpus}, **scaling)
        .bind(root, dict(router_options or {}))
    )
    ingress: Any = DoeIngress  # a Serve Deployment (its .options come from @serve.deployment)
    return ingress.options(ray_actor_options={"num_cpus": 0}).bind(experts, root, app_options)


def serve_ray(
    root: str | Path, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, **options: Any
) -> None:
    """Start (or join, with ``address``) a Ray cluster, run the app, block until SIGINT/SIGTERM."""
    import signal
    import threading

    app = build_app(root, **options)  # bad settings fail here, before Ray starts
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    # no access log line per request on every hop (proxy, ingress, replica): on 2 cores it cost measurable CPU
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=quiet)
    log.info("doe-runtime (Ray engine) serving %s on http://%s:%s", root, host, port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


__all__ = ["APP_NAME", "REPLICA_HEADER", "DoeIngress", "build_app", "check_scaling", "serve_ray"]
