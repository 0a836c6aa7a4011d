"""How the HTTP server answers a prediction: admission (slots, queue, shedding) and the three ways a request
reaches a model — alone (one request, one call), merged with others by the :class:`~doe_runtime.batching.Batcher`,
or sent to another process (the Ray engine's replicas). Every path is measured into :class:`ServerMetrics`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from .batching import Batcher, Entry, until_disconnected
from .errors import DoeRuntimeError
from .metrics import ServerMetrics
from .router import Router


class Admission:
    """At most ``limit`` model calls run at once; at most ``max_queue`` requests wait for one (on the event
    loop: a waiting request holds no thread); beyond that a request is shed at once."""

    def __init__(self, limit: int, max_queue: int):
        self.limit, self.max_queue = limit, max_queue
        self._slots = asyncio.Semaphore(limit)
        self.running = self.waiting = self.shed = 0

    def full(self) -> bool:
        """The queue full beyond the free slots: the next request is shed (503 + Retry-After). Requests counted
        as waiting include those not yet holding a slot (a batched request is checked before it queues)."""
        return self.waiting >= self.max_queue + max(0, self.limit - self.running)

    @contextlib.asynccontextmanager
    async def slot(self, waiting: int = 1):
        """One model slot; ``waiting`` requests count as waiting until it is granted (0: counted elsewhere)."""
        self.waiting += waiting
        queued = True
        try:
            async with self._slots:
                self.waiting -= waiting
                queued = False
                self.running += 1
                try:
                    yield
                finally:
                    self.running -= 1
        finally:
            if queued:  # cancelled while waiting
                self.waiting -= waiting


def predict_response(router: Router, task: str, items: list, stats: dict | None = None) -> dict:
    """The predict endpoint's body for ``items`` (texts, or pairs as tuples or 2-item lists) in one call;
    ``stats`` gets the call's (:meth:`Router.predict`'s, plus provider and precision)."""
    predictions, call_stats = merged_call(router, task, [tuple(i) if isinstance(i, list) else i for i in items])
    if stats is not None:
        stats.update(call_stats)
    return response_body(task, predictions, call_stats)


def merged_call(router: Router, task: str, items: list) -> tuple[list, dict]:
    """One model call for ``items`` (already checked or not): the predictions and the call's stats, with the
    provider and precision that answered (one ``info`` lookup: a bundle scan with auto_reload)."""
    stats: dict = {}
    predictions = router.predict(task, items, stats=stats)
    info = router.info(task)
    return predictions, {**stats, "provider": info["provider"], "precision": info["precision"]}


def response_body(task: str, predictions: list, stats: dict) -> dict:
    """The predict endpoint's JSON body: every engine and path answers with it."""
    return {
        "task": task,
        "provider": stats["provider"],
        "precision": stats["precision"],
        "predictions": [p.to_dict() for p in predictions],
    }


class Predictions:
    """The answer to one prediction request, by the path the server was configured with."""

    def __init__(
        self,
        *,
        router: Router,
        admission: Admission,
        metrics: ServerMetrics,
        batcher_options: dict | None,
        predictor: Any,
        error: Any,
    ):
        self.router, self.admission, self.metrics, self.predictor, self.error = (
            router,
            admission,
            metrics,
            predictor,
            error,
        )
        self.batcher = None
        if batcher_options and predictor is None:
            self.batcher = Batcher(
                call=lambda task, items: merged_call(router, task, items),
                slot=lambda: admission.slot(waiting=0),
                started=self._started,
                on_call=self._measured,
                **batcher_options,
            )

    def shed(self, task: str):
        """The 503 of a full queue, or None when the request may wait."""
        if not self.admission.full():
            return None
        self.admission.shed += 1
        self.metrics.shed.inc()
        return self.error(
            503,
            "overloaded",
            f"{self.admission.waiting} requests are already waiting for one of "
            f"{self.admission.limit} prediction slots; retry shortly",
            {"Retry-After": "1"},
        )

    async def answer(self, task: str, items: list, receive: Any):
        """The response (a dict or a JSONResponse) of one request that was admitted."""
        if self.predictor is not None:
            return await self._remote(task, items)
        if self.batcher is not None:
            return await self._batched(task, items, receive)
        return await self._alone(task, items)

    async def _alone(self, task: str, items: list):
        from starlette.concurrency import run_in_threadpool

        arrived = time.perf_counter()
        async with self.admission.slot():
            waited = time.perf_counter() - arrived
            stats: dict = {}
            answer = await run_in_threadpool(self._call, task, items, stats)
        if stats:
            self.metrics.model_call(task, {**stats, "requests": 1}, [waited])
        return answer

    def _call(self, task: str, items: list, stats: dict):
        try:
            return predict_response(self.router, task, items, stats)
        except (DoeRuntimeError, OSError) as exc:
            return self._failure(task, exc)

    def _failure(self, task: str, exc: BaseException):
        from .server import error_for

        status, kind, message = error_for(task, exc, self.router.root)
        return self.error(status, kind, message)

    async def _batched(self, task: str, items: list, receive: Any):
        from starlette.concurrency import run_in_threadpool

        self.admission.waiting += 1  # at once (no await since the shed check), so the queue bound holds
        try:  # checked alone before it joins: a bad item fails its own request, never its batch's neighbours
            # on the loop when the expert is resident (no thread hop per request); else loaded in a thread
            checked = self.router.check_resident(task, items)
            if checked is None:
                checked = await run_in_threadpool(self.router.check, task, items)
        except (DoeRuntimeError, OSError) as exc:
            self.admission.waiting -= 1
            return self._failure(task, exc)
        except BaseException:  # cancelled while checking
            self.admission.waiting -= 1
            raise
        entry = Entry(checked, asyncio.get_running_loop().create_future())
        batcher = self.batcher
        if batcher is None:  # answer() only comes here with one
            raise RuntimeError("the batched path needs a Batcher")
        batcher.join(task, entry)
        gone = asyncio.ensure_future(until_disconnected(receive))
        try:
            await asyncio.wait({entry.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not entry.future.done():  # the client went away before its batch ran: it leaves the batch
            if not entry.left and entry.started is None:
                self.admission.waiting -= 1
            entry.leave()
            return self.error(499, "client_closed", "the client closed the connection before its answer")
        try:
            predictions, stats = entry.future.result()
        except (DoeRuntimeError, OSError) as exc:
            return self._failure(task, exc)
        return response_body(task, predictions, stats)

    def _started(self, entries: list[Entry]) -> None:
        now = time.perf_counter()
        for entry in entries:
            entry.started = now
        self.admission.waiting -= len(entries)

    def _measured(self, task: str, entries: list[Entry], stats: dict) -> None:
        self.metrics.model_call(task, stats, [(e.started or e.arrived) - e.arrived for e in entries])

    async def _remote(self, task: str, items: list):
        from fastapi.responses import JSONResponse

        arrived = time.perf_counter()
        async with self.admission.slot():
            waited = time.perf_counter() - arrived
            status, content, headers, stats = await self.predictor(task, items)
        if stats:  # a replica's batch: one of its requests reports the call, each its own wait
            waited += stats.get("queued_s", 0.0)
            if stats.get("lead", True):
                self.metrics.model_call(task, {"requests": 1, **stats}, [waited])
            else:
                self.metrics.queued(task, [waited])
        return JSONResponse(status_code=status, content=content, headers=headers)


def device_kind(router_options: dict) -> str:
    """``"cuda"`` when the server's sessions will run on a GPU (device='cuda', or 'auto' with a CUDA provider)."""
    device = router_options.get("device", "auto")
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return "cuda"
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


__all__ = ["Admission", "Predictions", "device_kind", "merged_call", "predict_response", "response_body"]
