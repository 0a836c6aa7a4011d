"""The load suites' lean HTTP client against scripted servers: framing, keep-alive, reconnects, errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from doe_export.bench.http_client import ClientError, Connection


async def _serve(answers: list[bytes], seen: list[bytes], close_after: int | None = None):
    """A server answering each request on a connection with the next scripted bytes; it closes a connection
    after ``close_after`` answers. Returns (server, base URL)."""
    script = iter(answers)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while close_after is None or served < close_after:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            seen.append(head + await reader.readexactly(length))
            writer.write(next(script))
            await writer.drain()
            served += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _run(coro):
    return asyncio.run(coro)


def test_posts_json_and_reads_length_and_chunked_answers_on_one_connection():
    async def main():
        seen: list[bytes] = []
        body = json.dumps({"ok": 1}).encode()
        server, base = await _serve(
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nServer-Timing: app;dur=1.5\r\n\r\n" % len(body) + body,
                b'HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nRetry-After: 1\r\n\r\n4\r\n{"a"\r\n3\r\n:2}\r\n0\r\n\r\n',
            ],
            seen,
        )
        async with server:
            client = Connection(base)
            first = await client.post_json("/v1/tasks/t/predict", {"inputs": ["héllo"]})
            second = await client.get("/healthz")
            await client.close()
        return seen, first, second

    seen, first, second = _run(main())
    assert (first.status_code, first.json(), first.headers["server-timing"]) == (200, {"ok": 1}, "app;dur=1.5")
    assert (second.status_code, second.json(), second.headers["retry-after"]) == (503, {"a": 2}, "1")
    request = seen[0].decode()
    assert request.startswith("POST /v1/tasks/t/predict HTTP/1.1\r\n")
    assert json.loads(request.split("\r\n\r\n", 1)[1]) == {"inputs": ["héllo"]}
    assert seen[1].startswith(b"GET /healthz HTTP/1.1\r\n")


def test_reopens_a_keep_alive_connection_the_server_closed():
    async def main():
        seen: list[bytes] = []
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        server, base = await _serve([ok, ok, ok], seen, close_after=1)
        async with server:
            client = Connection(base)
            answers = [await client.get("/x") for _ in range(3)]
            await client.close()
        return seen, answers

    seen, answers = _run(main())
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len(seen) == 3


def test_an_answer_that_is_not_http_or_a_refused_connection_is_a_client_error():
    async def main():
        server, base = await _serve([b"SSH-2.0-OpenSSH\r\n\r\n"], [])
        async with server:
            client = Connection(base)
            with pytest.raises(ClientError, match=r"not an HTTP/1\.x status line"):
                await client.get("/")
        return base

    base = _run(main())
    with pytest.raises(ClientError, match=r"ConnectionRefusedError|OSError"):
        _run(Connection(base).get("/"))  # the server is gone: nothing listens on its port now
    with pytest.raises(ValueError, match="plain http://host:port"):
        Connection("https://example.org")
