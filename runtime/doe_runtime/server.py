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
import asyncio
import ipaddress
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Union

from .bundle import read_manifest
from .errors import (BundleError, ConfigError, DeviceError, DoeRuntimeError, InputError, RunError, TaskNameError,
                     UnknownTaskError)
from .router import Router, release_free_memory

log = logging.getLogger("doe_runtime.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_ITEMS = 256
DEFAULT_MAX_QUEUE = 64
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
TRIM_ABOVE_BYTES = 1 << 20  # request bodies above this are followed by release_free_memory()
MULTIPLEXED_HEADER = "serve_multiplexed_model_id"  # Ray Serve's header; the task in the path must match it


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413 before the app parses them.

    A declared Content-Length over the limit is refused at once; a chunked body is read up to the
    limit and refused as soon as it passes it (the app never sees it, so no parser can turn the
    refusal into a 400). Bodies within the limit are replayed to the app unchanged."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, "body_too_large",
                                    f"request body of {int(declared)} bytes exceeds the limit of {self.limit} bytes")
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await _send_json(send, 413, "body_too_large",
                                        f"request body exceeds the limit of {self.limit} bytes")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notices

        if seen <= TRIM_ABOVE_BYTES:
            return await self.app(scope, replay, send)
        try:
            return await self.app(scope, replay, send)
        finally:  # a large body, answered: its parsed texts and batches are garbage now; give the memory back
            chunks.clear()
            await asyncio.to_thread(release_free_memory)


class HostCheck:
    """ASGI middleware: answer only requests whose Host header names an allowed host (a loopback
    server allows its loopback names only: a web page cannot reach it through DNS rebinding)."""

    def __init__(self, app, allowed: set[str]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
        host = raw[1:raw.index("]")] if raw.startswith("[") and "]" in raw else raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw
        if host not in self.allowed:
            shown = raw[:64]
            return await _send_json(send, 421, "host_not_allowed",
                                    f"Host {shown!r} is not served here (allowed: {', '.join(sorted(self.allowed))}); "
                                    "a server bound to loopback answers loopback names only")
        return await self.app(scope, receive, send)


class ServerTiming:
    """ASGI middleware: every response says how long the server held the request, from the parsed
    request head to the response head, as ``Server-Timing: app;dur=MILLISECONDS`` (the W3C header
    browsers and load tools read). It tells time spent in the server (admission queue included) from
    time spent in the network or the client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed(message):
            if message["type"] == "http.response.start":
                took = f"app;dur={1e3 * (time.perf_counter() - start):.1f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", took)]}
            await send(message)

        return await self.app(scope, receive, timed)


async def _send_json(send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(root: str | Path, router: Router | None = None, max_items: int = DEFAULT_MAX_ITEMS,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_concurrency: int | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, allowed_hosts: list[str] | None = None, predictor: Any = None,
               **router_options: Any):
    """The FastAPI application serving the bundles under ``root``.

    ``max_concurrency``: predictions running at once (default: the CPU count); further requests
    wait their turn instead of all sharing the cores, which keeps latency and memory bounded.
    ``max_queue``: requests allowed to wait for a turn; beyond it a request is shed at once with
    503 and ``Retry-After`` (load shedding) instead of queueing without bound.
    ``allowed_hosts``: Host header values answered (None: any; ``serve`` on loopback passes the
    loopback names).
    ``predictor``: ``async (task, items) -> (status, body dict, headers)`` answering predictions
    elsewhere (the Ray engine's replicas); None: this process's Router. Everything else (schemas,
    limits, shedding, errors, health, listing) is this same app for both engines."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, Field
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as exc:  # the server is an optional extra
        raise ImportError("the HTTP server needs the [serve] extra: pip install 'doe-runtime[serve]'") from exc

    import asyncio
    import os

    from starlette.concurrency import run_in_threadpool

    for name, value, low in (("max_items", max_items, 1), ("max_body_bytes", max_body_bytes, 1),
                             ("max_queue", max_queue, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    limit = max_concurrency if max_concurrency is not None else (os.cpu_count() or 1)
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
    router = router or Router(root, auto_reload=True, **router_options)
    admission = asyncio.Semaphore(limit)  # event-loop side: waiting requests hold no thread
    in_flight = {"count": 0, "waiting": 0, "shed": 0}

    pair = Annotated[list[str], Field(min_length=2, max_length=2)]

    class PredictRequest(BaseModel):
        inputs: list[Union[str, pair]] = Field(
            ..., min_length=1, max_length=max_items,
            description=f"single-text tasks: a list of strings; pair tasks: a list of [text_a, text_b] lists; "
                        f"1 to {max_items} items", examples=[["A delightful film."]])

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

    errors = {status: {"model": ErrorResponse} for status in (400, 404, 413, 422, 503)}
    app = FastAPI(title="doe-runtime", version="0.1.0",
                  description="Per-task DoE expert models (ONNX) behind one HTTP API.")
    app.state.router = router

    def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message}},
                            headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return error(exc.status_code, kinds.get(exc.status_code, "http_error"),
                     f"{request.method} {request.url.path}: {exc.detail}; see /docs for the endpoints",
                     getattr(exc, "headers", None))  # e.g. Allow on 405

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return error(422, "invalid_request", f"the request does not match the schema: {problems}. Expected "
                                              '{"inputs": ["text", ...]} or {"inputs": [["text_a", "text_b"], ...]}')

    # Health and listing are async: they run on the event loop, never in the thread pool where
    # predictions wait for an admission slot, so a liveness probe answers under any load.
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        tasks = router.refresh()
        if not tasks:
            return error(503, "not_ready", "no bundles under the served folder yet; build some with `doe build`")
        return {"status": "ready", "tasks": len(tasks), "in_flight": in_flight["count"],
                "waiting": in_flight["waiting"], "shed": in_flight["shed"]}

    @app.get("/v1/tasks")
    async def list_tasks() -> dict:
        out = []
        for task in router.refresh():
            try:
                out.append(router.manifest(task).summary())
            except (BundleError, OSError) as exc:
                out.append({"task": task, "error": _public(exc, router.root)})
        return {"tasks": out}

    def _task_response(task: str, call):
        try:
            return call()
        except (DoeRuntimeError, OSError) as exc:
            status, kind, message = error_for(task, exc, router.root)
            return error(status, kind, message)

    @app.get("/v1/tasks/{task}", responses=errors)
    def describe(task: str):
        def summary():
            loaded = router.loaded_info(task)  # provider and precision when resident; nothing is loaded here
            out = router.manifest(task).summary(loaded and loaded["provider"], loaded and loaded["precision"])
            if loaded:
                out["memory"] = {k: loaded[k] for k in ("model_bytes", "shared_bytes", "own_bytes")}
            return out

        return _task_response(task, summary)

    @app.post("/v1/tasks/{task}/predict", response_model=PredictResponse, responses=errors)
    async def predict(task: str, body: PredictRequest, request: Request):
        items = [tuple(item) if isinstance(item, list) else item for item in body.inputs]
        named = request.headers.get(MULTIPLEXED_HEADER)
        if named is not None and named != task:
            return error(400, "task_mismatch", f"the {MULTIPLEXED_HEADER} header names {named[:128]!r} but the path "
                                               f"names {task[:128]!r}; send one task (the path is enough)")
        if admission.locked() and in_flight["waiting"] >= max_queue:
            in_flight["shed"] += 1
            return error(503, "overloaded", f"{in_flight['waiting']} requests are already waiting for one of "
                                            f"{limit} prediction slots; retry shortly", headers={"Retry-After": "1"})

        def run():
            return predict_response(router, task, items)

        in_flight["waiting"] += 1
        queued = True
        try:
            async with admission:
                in_flight["waiting"] -= 1
                queued = False
                in_flight["count"] += 1
                try:
                    if predictor is None:
                        return await run_in_threadpool(_task_response, task, run)
                    status, content, headers = await predictor(task, items)
                    return JSONResponse(status_code=status, content=content, headers=headers)
                finally:
                    in_flight["count"] -= 1
        finally:
            if queued:  # cancelled while waiting
                in_flight["waiting"] -= 1

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: still JSON, never a trace or a path
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal_error", f"{type(exc).__name__} while serving {request.method} "
                                            f"{request.url.path[:80]}; the server log has the details")

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=set(allowed_hosts))
    app.add_middleware(ServerTiming)  # added last: outermost, so it times every answer, refusals included
    return app


def predict_response(router: Router, task: str, items: list) -> dict:
    """The predict endpoint's body for ``items`` (texts, or pairs as tuples or 2-item lists): both engines
    (this process's Router, a Ray replica's) answer with it."""
    predictions = router.predict(task, [tuple(item) if isinstance(item, list) else item for item in items])
    info = router.info(task)  # one lookup (a bundle scan with auto_reload), not one per field
    return {"task": task, "provider": info["provider"], "precision": info["precision"],
            "predictions": [p.to_dict() for p in predictions]}


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


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          max_items: int = DEFAULT_MAX_ITEMS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_concurrency: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE, max_connections: int = 256,
          **router_options) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn drains running requests before it exits)."""
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(f"refusing to listen on {host!r}, which is reachable from other machines; pass "
                         "--allow-remote if that is intended (there is no authentication)")
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError("the HTTP server needs the [serve] extra: pip install 'doe-runtime[serve]'") from exc
    if not Path(root).is_dir():
        raise ConfigError(f"bundle folder {root} does not exist; build bundles with `doe build --out {root}`")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port must be in 1..65535, got {port!r}")
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ConfigError(f"max_connections must be an int >= 1, got {max_connections!r}")
    allowed = list(LOOPBACK_NAMES) if is_loopback(host) else None
    app = create_app(root, max_items=max_items, max_body_bytes=max_body_bytes, max_concurrency=max_concurrency,
                     max_queue=max_queue, allowed_hosts=allowed, **router_options)
    # limit_concurrency: connections + tasks beyond it get 503 from uvicorn itself; keep-alive connections
    # idle for 5 s are closed; a request head over 64 KiB is refused by the HTTP parser
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30, log_level="info",
                limit_concurrency=max_connections, timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)


__all__ = ["create_app", "serve", "is_loopback", "read_manifest"]
