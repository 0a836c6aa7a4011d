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
import json
import logging
import threading
from pathlib import Path
from typing import Annotated, Any, Union

from .bundle import read_manifest
from .errors import (BundleError, ConfigError, DeviceError, DoeRuntimeError, InputError, TaskNameError,
                     UnknownTaskError)
from .router import Router

log = logging.getLogger("doe_runtime.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_ITEMS = 256


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413 before parsing them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, "body_too_large",
                                    f"request body of {int(declared)} bytes exceeds the limit of {self.limit} bytes")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _TooLarge:
            return await _send_json(send, 413, "body_too_large",
                                    f"request body exceeds the limit of {self.limit} bytes")


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(root: str | Path, router: Router | None = None, max_items: int = DEFAULT_MAX_ITEMS,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_concurrency: int | None = None,
               **router_options: Any):
    """The FastAPI application serving the bundles under ``root``.

    ``max_concurrency``: predictions running at once (default: the CPU count); further requests
    wait their turn instead of all sharing the cores, which keeps latency and memory bounded."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, Field
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as exc:  # the server is an optional extra
        raise ImportError("the HTTP server needs the [serve] extra: pip install 'doe-runtime[serve]'") from exc

    if not isinstance(max_items, int) or max_items < 1:
        raise ConfigError(f"max_items must be an int >= 1, got {max_items!r}")
    router = router or Router(root, auto_reload=True, **router_options)
    import os

    limit = max_concurrency if max_concurrency is not None else (os.cpu_count() or 1)
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
    admission = threading.BoundedSemaphore(limit)
    in_flight = {"count": 0}
    counter_lock = threading.Lock()

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
        return {"status": "ready", "tasks": len(tasks), "in_flight": in_flight["count"]}

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
        except (TaskNameError, UnknownTaskError) as exc:
            return error(404, "unknown_task", _public(exc, router.root))
        except InputError as exc:
            return error(422, "invalid_inputs", _public(exc, router.root))
        except (BundleError, DeviceError, OSError) as exc:
            log.warning("task %s unavailable: %s", task, exc)
            return error(503, "bundle_unavailable", f"task {task!r} cannot be served now: {_public(exc, router.root)}")
        except DoeRuntimeError as exc:  # every other error of ours: still JSON, still no local path
            log.exception("task %s failed", task)
            return error(500, type(exc).__name__, _public(exc, router.root))

    @app.get("/v1/tasks/{task}", responses=errors)
    def describe(task: str):
        return _task_response(task, lambda: router.manifest(task).summary())

    @app.post("/v1/tasks/{task}/predict", response_model=PredictResponse, responses=errors)
    def predict(task: str, body: PredictRequest):
        items = [tuple(item) if isinstance(item, list) else item for item in body.inputs]

        def run():
            with counter_lock:
                in_flight["count"] += 1
            try:
                with admission:
                    predictions = router.predict(task, items)
                info = router.info(task)  # one lookup (a bundle scan with auto_reload), not one per field
                return {"task": task, "provider": info["provider"], "precision": info["precision"],
                        "predictions": [p.to_dict() for p in predictions]}
            finally:
                with counter_lock:
                    in_flight["count"] -= 1

        return _task_response(task, run)

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


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
          max_concurrency: int | None = None, **router_options) -> None:
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
    app = create_app(root, max_items=max_items, max_body_bytes=max_body_bytes, max_concurrency=max_concurrency,
                     **router_options)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30, log_level="info")


__all__ = ["create_app", "serve", "is_loopback", "read_manifest"]
