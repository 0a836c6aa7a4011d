"""A lean HTTP/1.1 keep-alive client for the load suites.

The load client shares the 2 cores with the server it measures. httpx's async client spent ~3 ms of CPU
per request there (a quarter to a third of a core at 70–85 requests/s, measured with ``top`` during the
batching suite), so it took CPU from the server under test and held the batching gain down. This client does
only what the suites send and read — a JSON POST or a GET on one persistent connection, answers framed by
``Content-Length`` or chunked — in a fraction of that, and the suites record the CPU both sides used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class ClientError(Exception):
    """The connection failed or the answer was not HTTP/1.1 this client can read."""


@dataclass
class Answer:
    """One HTTP answer: status, headers (names lower-cased) and body."""

    status_code: int
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""

    def json(self) -> Any:
        return json.loads(self.content)


class Connection:
    """One keep-alive connection to ``base`` (``http://host:port``), opened on first use and reopened after
    the server closes it. One request at a time (each load worker holds its own)."""

    def __init__(self, base: str, timeout: float = 60.0):
        parts = urlsplit(base)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the load client speaks plain http://host:port, got {base!r}")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post_json(self, path: str, body: Any) -> Answer:
        payload = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
        return await self._request(head.encode() + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)

    async def get(self, path: str) -> Answer:
        return await self._request(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())

    async def _request(self, message: bytes) -> Answer:
        reused = self._streams is not None
        try:
            return await asyncio.wait_for(self._exchange(message), self.timeout)
        except _Stale:
            if not reused:
                raise ClientError("the server closed the connection before answering") from None
            return await self._request(message)  # an idle keep-alive connection the server had closed: once more
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError) as exc:
            await self.close()
            raise ClientError(f"{type(exc).__name__}: {exc}") from exc

    async def _exchange(self, message: bytes) -> Answer:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        try:
            writer.write(message)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                raise
            await self.close()
            raise _Stale from exc
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            await self.close()
            raise ClientError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            content = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            content = await _chunked(reader)
        else:  # framed by the end of the connection
            content = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Answer(int(rest[:3]), headers, content)

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):  # already reset by the server: nothing left to close
                await writer.wait_closed()


class _Stale(Exception):
    """The connection was gone before any byte of the answer came back."""


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent to this client: the empty line ends it
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


__all__ = ["Answer", "ClientError", "Connection"]
