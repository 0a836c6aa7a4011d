"""HTTP server over a :class:`~doe_runtime.router.Router` (extra ``[serve]``: FastAPI + uvicorn).

    doe-runtime serve artifacts/ --host 127.0.0.1 --port 8000

Endpoints (OpenAPI document at ``/openapi.json``, interactive docs at ``/docs``):

- ``GET  /healthz``                   the process answers
- ``GET  /readyz``                    at least one bundle is present (503 otherwise)
- ``GET  /v1/tasks``                  every task with its manifest summary
- ``GET  /v1/tasks/{task}``           one task's manifest summary
- ``POST /v1/tasks/{task}/predict``   ``{"inputs": [...]}`` -> labels and probabilities, in order

Client errors are 4xx with a JSON body ``{"error": {"type": ..., "message": ...}}`` that says
what was wrong: 404 unknown task, 413 body over the byte limit, 422 inputs that do not
fit the task, malformed JSON, no inputs or more than ``max_items``, 503 a bundle that cannot be loaded (named in the message; the
other tasks keep answering). Bundles are watched: a rebuilt bundle is loaded on its next request
while requests already running finish on the old session.
"""

# no `from __future__ import annotations`: FastAPI reads the request models from the annotations
import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

from .batching import batching_options
from .bundle import read_manifest
from .errors import (
    BundleError,
    ConfigError,
    DeviceError,
    DoeRuntimeError,
    InputError,
    MissingExtraError,
    RunError,
    TaskNameError,
    UnknownTaskError,
)
from .metrics import ServerMetrics, router_state
from .middleware import BodyLimit, HostCheck, ServerTiming
from .router import Router
from .serving import Admission, Predictions, device_kind, predict_response

log = logging.getLogger("doe_runtime.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_ITEMS = 256
DEFAULT_MAX_QUEUE = 64
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MULTIPLEXED_HEADER = "serve_multiplexed_model_id"  # Ray Serve's header; the task in the path must match it
SERVE_EXTRA = "the HTTP server needs the [serve] extra: pip install 'doe-runtime[serve]'"
GPU_CONCURRENCY = 2


def json_error(status: int, kind: str, message: str, headers: dict | None = None):
    """The JSON error response every refusal uses: ``{"error": {"type", "message"}}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message}}, headers=headers)


def _check_limits(
    *, max_items: int, max_body_bytes: int, max_queue: int, max_concurrency: int | None, device: str
) -> int:
    """Refuse limits out of range, naming them; return the concurrency (default: the CPU count on CPU, 2 on
    a GPU: one device runs one call at a time, and a second overlaps its tokenization)."""
    for name, value, low in (
        ("max_items", max_items, 1),
        ("max_body_bytes", max_body_bytes, 1),
        ("max_queue", max_queue, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    default = GPU_CONCURRENCY if device == "cuda" else (os.cpu_count() or 1)
    limit = max_concurrency if max_concurrency is not None else default
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
    return limit


def _models(max_items: int) -> dict[str, Any]:
    """The request and response schemas (they document the API in /openapi.json)."""
    from pydantic import BaseModel, Field

    pair = Annotated[list[str], Field(min_length=2, max_length=2)]

    class PredictRequest(BaseModel):
        inputs: list[str | pair] = Field(
            ...,
            min_length=1,
            max_length=max_items,
            examples=[["A delightful film."]],
            description=f"single-text tasks: a list of strings; pair tasks: a list of [text_a, text_b] lists; "
            f"1 to {max_items} items",
        )

    class Prediction(BaseModel):
        label: str
        label_id: int
        probabilities: dict[str, float]

    class PredictResponse(BaseModel):
        task: str
        provider: str
        precision: str
        predictions: list[Prediction]

    class ErrorBody(BaseModel):
        type: str
        message: str

    class ErrorResponse(BaseModel):
        error: ErrorBody

    return {
        "PredictRequest": PredictRequest,
        "PredictResponse": PredictResponse,
        "ErrorResponse": ErrorResponse,
        "errors": {status: {"model": ErrorResponse} for status in (400, 404, 413, 422, 503)},
    }


def _error_handlers(app) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return json_error(
            exc.status_code,
            kinds.get(exc.status_code, "http_error"),
            f"{request.method} {request.url.path}: {exc.detail}; see /docs for the endpoints",
            getattr(exc, "headers", None),  # e.g. Allow on 405
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return json_error(
            422,
            "invalid_request",
            f"the request does not match the schema: {problems}. Expected "
            '{"inputs": ["text", ...]} or {"inputs": [["text_a", "text_b"], ...]}',
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: still JSON, never a trace or a path
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return json_error(
            500,
            "internal_error",
            f"{type(exc).__name__} while serving {request.method} "
            f"{request.url.path[:80]}; the server log has the details",
        )


def _health_routes(app, router: Router, admission: Admission, models: dict) -> None:
    # Health and listing are async: they run on the event loop, never in the thread pool where
    # predictions wait for an admission slot, so a liveness probe answers under any load.
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": models["ErrorResponse"]}})
    async def readyz():
        tasks = router.refresh()
        if not tasks:
            return json_error(503, "not_ready", "no bundles under the served folder yet; build some with `doe build`")
        return {
            "status": "ready",
            "tasks": len(tasks),
            "in_flight": admission.running,
            "waiting": admission.waiting,
            "shed": admission.shed,
        }

    @app.get("/v1/tasks")
    async def list_tasks() -> dict:
        out = []
        for task in router.refresh():
            try:
                out.append(router.manifest(task).summary())
            except (BundleError, OSError) as exc:
                out.append({"task": task, "error": _public(exc, router.root)})
        return {"tasks": out}


def _answer(router: Router, task: str, call):
    """``call()``, or the JSON error of what it raised (by class; no local path in the message)."""
    try:
        return call()
    except (DoeRuntimeError, OSError) as exc:
        status, kind, message = error_for(task, exc, router.root)
        return json_error(status, kind, message)


def _describe_route(app, router: Router, models: dict) -> None:
    @app.get("/v1/tasks/{task}", responses=models["errors"])
    def describe(task: str):
        def summary():
            loaded = router.loaded_info(task)  # provider and precision when resident; nothing is loaded here
            manifest = router.manifest(task)
            out = manifest.summary(loaded["provider"], loaded["precision"]) if loaded else manifest.summary()
            if loaded:
                out["memory"] = {k: loaded[k] for k in ("model_bytes", "shared_bytes", "own_bytes")}
            return out

        return _answer(router, task, summary)


def _predict_route(app, router: Router, predictions: Predictions, models: dict) -> None:
    from fastapi import Request

    PredictRequest = models["PredictRequest"]

    @app.post("/v1/tasks/{task}/predict", response_model=models["PredictResponse"], responses=models["errors"])
    async def predict(task: str, body: PredictRequest, request: Request):  # type: ignore[valid-type]
        start = time.perf_counter()
        items = [tuple(item) if isinstance(item, list) else item for item in body.inputs]  # type: ignore[attr-defined]
        named = request.headers.get(MULTIPLEXED_HEADER)
        if named is not None and named != task:
            response = json_error(
                400,
                "task_mismatch",
                f"the {MULTIPLEXED_HEADER} header names {named[:128]!r} "
                f"but the path names {task[:128]!r}; send one task (the path is enough)",
            )
        else:
            response = predictions.shed(task) or await predictions.answer(task, items, request.receive)
        predictions.metrics.answered(task, getattr(response, "status_code", 200), time.perf_counter() - start)
        return response


def _metrics_route(app, metrics: ServerMetrics) -> None:
    from fastapi.responses import Response

    @app.get(
        "/metrics",
        include_in_schema=True,
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def scrape():
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)


def create_app(
    root: str | Path,
    *,
    router: Router | None = None,
    batch_wait_ms: float | None = None,
    max_batch_items: int | None = None,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrency: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    allowed_hosts: list[str] | None = None,
    predictor: Any = None,
    **router_options: Any,
):
    """The FastAPI application serving the bundles under ``root``.

    ``batch_wait_ms`` / ``max_batch_items``: requests for one task arriving within that many milliseconds
    share one model call of at most that many items (:mod:`doe_runtime.batching`; 0 ms: every request alone;
    None: the device's measured default). ``max_concurrency``: model calls running at once (default: the CPU
    count on CPU, 2 on a GPU: one running while the next is tokenized); further requests wait their turn,
    which keeps latency and memory bounded. ``max_queue``: requests allowed to wait for a turn; beyond it a
    request is shed at once with 503 and ``Retry-After`` instead of queueing without bound.
    ``allowed_hosts``: Host header values answered (None: any; ``serve`` on loopback passes the loopback names).
    ``predictor``: an object answering predictions elsewhere (the Ray engine's replicas): awaited as
    ``predictor(task, items) -> (status, body dict, headers, stats)``, with ``predictor.states()`` for
    ``/metrics``; None: this process's Router. Everything else (schemas, limits, shedding, errors, health,
    listing, metrics) is this same app for both engines."""
    try:
        from fastapi import FastAPI
    except ImportError as exc:  # the server is an optional extra
        raise MissingExtraError(SERVE_EXTRA) from exc
    device = device_kind(router_options)
    limit = _check_limits(
        max_items=max_items,
        max_body_bytes=max_body_bytes,
        max_queue=max_queue,
        max_concurrency=max_concurrency,
        device=device,
    )
    batching = batching_options(batch_wait_ms, max_batch_items, device)
    if batching and device == "cpu" and predictor is None:
        # merged calls run one at a time on every core unless told otherwise: two concurrent merged calls on
        # one session contended on 2 cores (p99 x5 at 64 connections, docs/results.md)
        limit = limit if max_concurrency is not None else 1
        if router_options.get("intra_op_threads") is None:
            router_options["intra_op_threads"] = os.cpu_count() or 1
    router = router or Router(root, auto_reload=True, **router_options)
    admission = Admission(limit, max_queue)
    states = predictor.states if predictor is not None else (lambda: {"local": router_state(router)})
    metrics = ServerMetrics(known=lambda task: task in router.tasks, states=states)
    predictions = Predictions(
        router=router,
        admission=admission,
        metrics=metrics,
        batcher_options=batching,
        predictor=predictor,
        error=json_error,
    )
    models = _models(max_items)
    app = FastAPI(
        title="doe-runtime", version="0.1.0", description="Per-task DoE expert models (ONNX) behind one HTTP API."
    )
    app.state.router, app.state.predictions = router, predictions
    _error_handlers(app)
    _health_routes(app, router, admission, models)
    _describe_route(app, router, models)
    _predict_route(app, router, predictions, models)
    _metrics_route(app, metrics)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=set(allowed_hosts))
    app.add_middleware(ServerTiming)  # added last: outermost, so it times every answer, refusals included
    return app


def error_for(task: str, exc: BaseException, root: Path) -> tuple[int, str, str]:
    """(HTTP status, error type, client message) of an error raised while serving ``task``: by class,
    never by builtin; the message carries no local path. Both engines (FastAPI, Ray) use it."""
    if isinstance(exc, (TaskNameError, UnknownTaskError)):
        return 404, "unknown_task", _public(exc, root)
    if isinstance(exc, InputError):
        return 422, "invalid_inputs", _public(exc, root)
    if isinstance(exc, (BundleError, DeviceError, OSError)):
        log.warning("task %s unavailable: %s", task, exc)
        return 503, "bundle_unavailable", f"task {task!r} cannot be served now: {_public(exc, root)}"
    if isinstance(exc, RunError):
        log.error("task %s failed to run: %s", task, exc)
        return 500, "inference_failed", _public(exc, root)
    log.error("task %s failed: %s", task, exc)  # every other error of ours: still JSON, still no local path
    return 500, type(exc).__name__, _public(exc, root)


def _public(exc: BaseException, root: Path) -> str:
    """An error message fit for a client: the served folder's absolute path replaced by its name."""
    text = str(exc)
    for form in {str(Path(root)), str(Path(root).resolve())}:
        text = text.replace(form + "/", "").replace(form, Path(root).name)
    return text if len(text) <= 2000 else text[:2000] + "..."


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Refuse a host reachable from other machines unless asked for (there is no authentication)."""
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"refusing to listen on {host!r}, which is reachable from other machines; pass --allow-remote if that is "
            "intended (there is no authentication)"
        )


def serve(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_remote: bool = False,
    max_connections: int = 256,
    **app_options: Any,
) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn drains running requests before it exits).
    ``app_options``: :func:`create_app`'s limits and the Router's options."""
    check_bind(host, allow_remote)
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError(SERVE_EXTRA) from exc
    if not Path(root).is_dir():
        raise ConfigError(f"bundle folder {root} does not exist; build bundles with `doe build --out {root}`")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port must be in 1..65535, got {port!r}")
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ConfigError(f"max_connections must be an int >= 1, got {max_connections!r}")
    allowed = list(LOOPBACK_NAMES) if is_loopback(host) else None
    app = create_app(root, allowed_hosts=allowed, **app_options)
    # limit_concurrency: connections + tasks beyond it get 503 from uvicorn itself; keep-alive connections
    # idle for 5 s are closed; a request head over 64 KiB is refused by the HTTP parser
    uvicorn.run(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=30,
        log_level="info",
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,
    )


__all__ = [
    "Admission",
    "check_bind",
    "create_app",
    "error_for",
    "is_loopback",
    "predict_response",
    "read_manifest",
    "serve",
]
