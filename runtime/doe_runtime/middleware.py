"""ASGI middleware of the HTTP server: body limits, Host checks and Server-Timing, applied before the app
parses anything (so a refusal never reaches a parser that could turn it into another status)."""

import asyncio
import json
import time

from .router import release_free_memory

TRIM_ABOVE_BYTES = 1 << 20  # request bodies above this are followed by release_free_memory()


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
            return await send_json(
                send,
                413,
                "body_too_large",
                f"request body of {int(declared)} bytes exceeds the limit of {self.limit} bytes",
            )
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
                return await send_json(
                    send, 413, "body_too_large", f"request body exceeds the limit of {self.limit} bytes"
                )
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
        host = (
            raw[1 : raw.index("]")]
            if raw.startswith("[") and "]" in raw
            else raw.rsplit(":", 1)[0]
            if raw.count(":") == 1
            else raw
        )
        if host not in self.allowed:
            shown = raw[:64]
            return await send_json(
                send,
                421,
                "host_not_allowed",
                f"Host {shown!r} is not served here (allowed: {', '.join(sorted(self.allowed))}); "
                "a server bound to loopback answers loopback names only",
            )
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


async def send_json(send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = ["TRIM_ABOVE_BYTES", "BodyLimit", "HostCheck", "ServerTiming", "send_json"]
