"""Dynamic batching: requests for the same task that arrive close together share one model call.

Each task has its own queue and its own loop. The loop waits for a first request, then up to
``wait_s`` for companions (or until ``max_items`` items are queued) — unless the request is alone and no
call of its task is running: a lone request on an idle task is not held back for companions that a
sequential client will never send — then for a model slot of the
server's :class:`~doe_runtime.server.Admission` (one FIFO for every task, so a busy task's batches
queue behind, not ahead of, another task's), and only then takes what is queued — everything that
arrived meanwhile joins, up to ``max_items`` items (whole requests; a request larger than that runs
alone). The call runs in a worker thread; each request gets its own slice of the answers. When a call
returns while more requests of its task are queued and no other task waits for a slot, the next batch's
call starts on the same slot before this one's answers are written, so the model does not wait for the
event loop.

Requests are checked against their task before they join (a bad item gets its own 4xx and never fails
its neighbours); a request whose client went away before its batch starts is dropped from it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# CPU: measured on 2 cores, the shipped bbc-news int8 bundle (docs/results.md#dynamic-batching-on-2-cpu-cores):
# 2 ms and 8 items, one merged call at a time on every core; larger merged calls were slower per item there.
# CUDA: not measured yet (no GPU lent); from Router on an H200, 1 text 1.5 ms vs 64 texts 7.5 ms (issue 20)
DEFAULT_WAIT_MS = {"cpu": 2.0, "cuda": 1.0}
DEFAULT_MAX_ITEMS = {"cpu": 8, "cuda": 128}


def batching_options(wait_ms: float | None, max_items: int | None, device: str) -> dict | None:
    """The Batcher's ``wait_s`` and ``max_items`` from the server's options (None: ``device``'s measured
    default), or None when batching is off (0 ms); options out of range are refused, naming them."""
    wait_ms = DEFAULT_WAIT_MS[device] if wait_ms is None else wait_ms
    max_items = DEFAULT_MAX_ITEMS[device] if max_items is None else max_items
    if not isinstance(wait_ms, (int, float)) or isinstance(wait_ms, bool) or not 0 <= wait_ms <= 1000:
        raise ConfigError(f"--batch-wait-ms must be in [0, 1000] (0: no batching), got {wait_ms!r}")
    if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1:
        raise ConfigError(f"--max-batch-items must be an integer >= 1, got {max_items!r}")
    return {"wait_s": wait_ms / 1e3, "max_items": max_items} if wait_ms > 0 else None


@dataclass
class Entry:
    """One request waiting in its task's queue."""

    items: list
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its batch's model call started (None: still queued)
    left: bool = False  # its client went away: skipped when the batch is taken

    def leave(self) -> None:
        self.left = True
        if not self.future.done():
            self.future.cancel()


@dataclass
class _Queue:
    entries: collections.deque = field(default_factory=collections.deque)
    grew: asyncio.Event = field(default_factory=asyncio.Event)
    loop: asyncio.Task | None = None
    calls: int = 0  # model calls of this task running now

    def items(self) -> int:
        return sum(len(e.items) for e in self.entries if not e.left)


class Batcher:
    """Merge requests per task into model calls (see the module docstring).

    ``call(task, items) -> (answers, stats)`` runs one model call (in a worker thread: it blocks);
    ``slot()`` is an async context manager holding one model slot; ``started(entries)`` is told which
    requests a call takes (the admission count of waiting requests goes down by that many)."""

    def __init__(
        self,
        *,
        call: Callable[[str, list], tuple[list, dict]],
        slot: Callable[[], Any],
        wait_s: float,
        max_items: int,
        started: Callable[[list[Entry]], None] | None = None,
        on_call: Callable[[str, list[Entry], dict], None] | None = None,
    ):
        self.call, self.slot, self.wait_s, self.max_items = call, slot, wait_s, max_items
        self.started = started or (lambda entries: None)
        self.on_call = on_call or (lambda task, entries, stats: None)
        self._queues: dict[str, _Queue] = {}
        self._wanting: collections.Counter = collections.Counter()  # task -> its loops waiting for a slot

    async def submit(self, task: str, items: list) -> tuple[list, dict]:
        """This request's answers (and the stats of the call that made them), once its batch has run."""
        entry = self.join(task, Entry(list(items), asyncio.get_running_loop().create_future()))
        return await entry.future

    def join(self, task: str, entry: Entry) -> Entry:
        """Queue ``entry`` for ``task`` (starting the task's loop if it is idle); the entry, to await or leave."""
        queue = self._queues.get(task)
        if queue is None:
            queue = self._queues[task] = _Queue()
        queue.entries.append(entry)
        queue.grew.set()
        if queue.loop is None or queue.loop.done():
            queue.loop = asyncio.get_running_loop().create_task(self._run_task(task, queue))
        return entry

    async def _run_task(self, task: str, queue: _Queue) -> None:
        """The task's loop: form a batch, wait for a slot, hand the call to a worker; until the queue is empty."""
        while any(not e.left for e in queue.entries):
            first = next(e for e in queue.entries if not e.left).arrived
            alone = queue.calls == 0 and sum(not e.left for e in queue.entries) == 1
            while not alone and queue.items() < self.max_items:
                delay = first + self.wait_s - time.perf_counter()
                if delay <= 0:
                    break
                queue.grew.clear()
                try:
                    await asyncio.wait_for(queue.grew.wait(), delay)
                except asyncio.TimeoutError:
                    break
            slot = self.slot()
            self._wanting[task] += 1
            try:
                await slot.__aenter__()
            finally:
                self._wanting[task] -= 1
            batch = self._take(queue)
            if not batch:
                await slot.__aexit__(None, None, None)
                continue
            self.started(batch)
            queue.calls += 1
            asyncio.get_running_loop().create_task(self._call(task, queue, batch, slot))

    def _take(self, queue: _Queue) -> list[Entry]:
        """Whole requests from the head of the queue, up to ``max_items`` items (at least one request)."""
        batch: list[Entry] = []
        count = 0
        while queue.entries:
            entry = queue.entries[0]
            if entry.left:
                queue.entries.popleft()
                continue
            if batch and count + len(entry.items) > self.max_items:
                break
            batch.append(queue.entries.popleft())
            count += len(entry.items)
        return batch

    async def _call(self, task: str, queue: _Queue, batch: list[Entry], slot: Any) -> None:
        """Run ``batch``'s call, then — while requests of this task are queued and no other task waits for a
        slot — take the next batch and start its call before answering this one, on the same slot: the model
        does not sit idle while the event loop writes answers (on 2 cores it did, about a quarter of the time)."""
        loop = asyncio.get_running_loop()
        running = self._submit(loop, task, batch)
        counted = 1  # this coroutine's batches in queue.calls (the first was counted by the task's loop)
        try:
            while batch:
                failure: Exception | None = None
                try:
                    answers, stats = await running
                except Exception as exc:  # the call's error belongs to every request in it (items were checked)
                    answers, stats, failure = None, {}, exc
                following = self._following(task, queue)
                if following:
                    self.started(following)
                    queue.calls, counted = queue.calls + 1, counted + 1
                    running = self._submit(loop, task, following)
                queue.calls, counted = queue.calls - 1, counted - 1
                if failure is not None:
                    for entry in batch:
                        if not entry.future.done():
                            entry.future.set_exception(failure)
                else:
                    self._answer(task, batch, answers, stats)
                batch = following
        finally:
            queue.calls -= counted  # cancelled mid-call (the server stopping): nothing stays counted as running
            await slot.__aexit__(None, None, None)

    def _submit(self, loop: asyncio.AbstractEventLoop, task: str, batch: list[Entry]) -> asyncio.Future:
        """Start ``batch``'s model call in a worker thread now (not at the event loop's next turn)."""
        items = [item for entry in batch for item in entry.items]
        return loop.run_in_executor(None, functools.partial(self.call, task, items))

    def _following(self, task: str, queue: _Queue) -> list[Entry]:
        """The next batch of ``task`` to run on the slot it holds: none when its queue is empty or another
        task waits for a slot (that task goes first, as the FIFO of slots would have it)."""
        if any(n for other, n in self._wanting.items() if other != task):
            return []
        return self._take(queue) if any(not e.left for e in queue.entries) else []

    def _answer(self, task: str, batch: list[Entry], answers: list, stats: dict) -> None:
        stats = {**stats, "requests": len(batch)}
        self.on_call(task, batch, stats)
        for entry, share in zip(batch, split_answers([e.items for e in batch], answers)):
            if not entry.future.done():
                entry.future.set_result((share, stats))


def split_answers(entries_items: list[list], answers: list) -> list[list]:
    """``answers`` of the concatenated items, cut back into each request's share, in order."""
    out, start = [], 0
    for items in entries_items:
        out.append(answers[start : start + len(items)])
        start += len(items)
    return out


async def until_disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return when the client of a request goes away (its body already read: the next message is the end)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


__all__ = [
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_WAIT_MS",
    "Batcher",
    "Entry",
    "batching_options",
    "split_answers",
    "until_disconnected",
]
