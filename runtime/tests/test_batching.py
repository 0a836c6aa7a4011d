"""Dynamic batching (doe_runtime.batching) and /metrics: merged requests answer as they would alone, a bad
item fails only its own request, a client that leaves is dropped from its batch, a busy task does not
starve another, options out of range are refused, and /metrics parses and adds up."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

from doe_runtime import Router  # noqa: E402
from doe_runtime.batching import Batcher, Entry, batching_options, split_answers  # noqa: E402
from doe_runtime.cli import main  # noqa: E402
from doe_runtime.errors import ConfigError  # noqa: E402
from doe_runtime.server import create_app  # noqa: E402

TEXTS = [f"text number {i} " + "word " * (i % 7) for i in range(24)]


async def _post_all(app, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return list(await asyncio.gather(*(client.post(path, json=body) for path, body in requests)))


async def _get(app, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get(path)


def _families(text: str) -> dict[str, list]:
    """Samples of a scrape by name, parsed with prometheus_client's own parser."""
    out: dict[str, list] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_merged_requests_answer_as_alone_and_metrics_add_up(bundles):
    # fp32: exact up to float rounding (int8's per-batch activation scales move probabilities by ~1e-4,
    # the batch effect the README explains; the load suite compares the shipped int8 answers)
    app = create_app(bundles, device="cpu", precision="fp32", batch_wait_ms=50, max_batch_items=64)
    answers = asyncio.run(_post_all(app, [("/v1/tasks/toy-single/predict", {"inputs": [t]}) for t in TEXTS]))
    assert [a.status_code for a in answers] == [200] * len(TEXTS), [a.text for a in answers]
    reference = Router(bundles, device="cpu", precision="fp32")
    for text, answer in zip(TEXTS, answers):
        want = reference.predict("toy-single", [text])[0]
        got = answer.json()["predictions"][0]
        assert got["label"] == want.label
        assert np.allclose(list(got["probabilities"].values()), list(want.probabilities.values()), atol=1e-5)
    # one unknown task and one bad request, to see them counted apart
    extra = asyncio.run(
        _post_all(
            app,
            [
                ("/v1/tasks/secret-name/predict", {"inputs": ["x"]}),
                ("/v1/tasks/toy-pair/predict", {"inputs": ["alone"]}),
            ],
        )
    )
    assert [a.status_code for a in extra] == [404, 422]
    scrape = asyncio.run(_get(app, "/metrics"))
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    samples = _families(scrape.text)
    requests = {(s.labels["task"], s.labels["status"]): s.value for s in samples["doe_requests_total"]}
    assert requests == {("toy-single", "200"): len(TEXTS), ("(unknown)", "404"): 1, ("toy-pair", "422"): 1}
    calls = {s.labels["task"]: s.value for s in samples["doe_model_call_requests_count"]}
    merged = {s.labels["task"]: s.value for s in samples["doe_model_call_requests_sum"]}
    assert merged["toy-single"] == len(TEXTS)  # every answered request was in exactly one call
    assert calls["toy-single"] < len(TEXTS)  # and some of them shared one
    items = {s.labels["task"]: s.value for s in samples["doe_model_call_items_sum"]}
    assert items["toy-single"] == len(TEXTS)
    queued = {s.labels["task"]: s.value for s in samples["doe_queue_duration_seconds_count"]}
    assert queued["toy-single"] == len(TEXTS)
    total = {s.labels["task"]: s.value for s in samples["doe_request_duration_seconds_count"]}
    assert sum(total.values()) == len(TEXTS) + 2
    loads = {(s.labels["task"], s.labels["result"]): s.value for s in samples["doe_expert_loads_total"]}
    assert loads[("toy-single", "loaded")] == 1 and ("toy-single", "failed") not in loads
    kinds = {(s.labels["task"], s.labels["kind"]) for s in samples["doe_expert_bytes"]}
    assert ("toy-single", "own") in kinds and ("toy-single", "shared") in kinds
    assert [s.value for s in samples["doe_experts_resident"]] == [2]  # toy-single, and toy-pair (checked)
    # never request text, an unknown task's name or a local path
    for secret in ("text number", "secret-name", "alone", str(bundles)):
        assert secret not in scrape.text


def test_a_bad_item_fails_only_its_own_request(bundles):
    app = create_app(bundles, device="cpu", batch_wait_ms=50)
    pairs = [{"inputs": [["a man", "someone"]]}] * 5
    requests = [("/v1/tasks/toy-pair/predict", body) for body in pairs]
    requests.insert(2, ("/v1/tasks/toy-pair/predict", {"inputs": ["a lonely single text"]}))
    answers = asyncio.run(_post_all(app, requests))
    assert [a.status_code for a in answers] == [200, 200, 422, 200, 200, 200]
    assert answers[2].json()["error"]["type"] == "invalid_inputs"


def test_requests_too_large_together_are_split_not_refused(bundles):
    app = create_app(bundles, device="cpu", batch_wait_ms=50, max_batch_items=4)
    requests = [("/v1/tasks/toy-single/predict", {"inputs": TEXTS[i : i + 3]}) for i in (0, 3, 6)]
    requests.append(("/v1/tasks/toy-single/predict", {"inputs": TEXTS[:10]}))  # larger than a batch: alone
    answers = asyncio.run(_post_all(app, requests))
    assert [len(a.json()["predictions"]) for a in answers] == [3, 3, 3, 10]
    samples = _families(asyncio.run(_get(app, "/metrics")).text)
    buckets = {s.labels["le"]: s.value for s in samples["doe_model_call_items_bucket"]}
    assert buckets["4.0"] == 3 and buckets["16.0"] == 4  # three calls of 3 items (3 + 3 > 4), one of 10


class _Slots:
    """One model slot at a time, recording the order calls got it."""

    def __init__(self):
        self.lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def slot(self):
        async with self.lock:
            yield


def test_a_busy_task_does_not_starve_another():
    calls: list[tuple[str, int]] = []

    def call(task, items):
        time.sleep(0.01)
        calls.append((task, len(items)))
        return [f"{task}:{item}" for item in items], {"items": len(items)}

    async def scenario():
        slots = _Slots()
        batcher = Batcher(call=call, slot=slots.slot, wait_s=0.001, max_items=4)
        busy = [asyncio.ensure_future(batcher.submit("busy", [i])) for i in range(40)]
        await asyncio.sleep(0.005)
        quiet = await batcher.submit("quiet", ["q"])
        await asyncio.gather(*busy)
        return quiet, [f.result()[0] for f in busy]

    quiet, busy = asyncio.run(scenario())
    assert quiet[0] == ["quiet:q"] and busy == [[f"busy:{i}"] for i in range(40)]
    assert [len for task, len in calls if task == "busy"] == [4] * 10
    # the quiet task's call ran right after the busy call that was running, not after all ten of them
    assert calls.index(("quiet", 1)) <= 2, calls


def test_the_next_batch_starts_before_the_last_ones_answers_are_written():
    """While requests of the task are queued, the next merged call runs while the event loop answers the
    last one: ``on_call`` (on the loop, before the answers go out) sees the next call start."""
    import threading

    started = [threading.Event() for _ in range(3)]
    seen_while_answering: list[bool] = []

    def call(task, items):
        started[items[0] // 4].set()
        return list(items), {}

    def on_call(task, entries, stats):
        following = entries[0].items[0] // 4 + 1
        if following < 3:  # the loop blocks here until the following call has started (or gives up after 5 s)
            seen_while_answering.append(started[following].wait(5))

    async def scenario():
        slots = _Slots()
        batcher = Batcher(call=call, slot=slots.slot, wait_s=0.001, max_items=4, on_call=on_call)
        await slots.lock.acquire()  # busy: the twelve requests queue
        futures = [asyncio.ensure_future(batcher.submit("t", [i])) for i in range(12)]
        await asyncio.sleep(0.01)
        slots.lock.release()
        return [(await f)[0] for f in futures]

    answers = asyncio.run(scenario())
    assert answers == [[i] for i in range(12)]
    assert seen_while_answering == [True, True]


def test_a_client_that_leaves_is_dropped_from_its_batch():
    seen: list[list] = []

    def call(task, items):
        seen.append(list(items))
        return list(items), {}

    async def scenario():
        slots = _Slots()
        batcher = Batcher(call=call, slot=slots.slot, wait_s=0.001, max_items=8)
        await slots.lock.acquire()  # the device is busy: requests queue
        loop = asyncio.get_running_loop()
        entries = [batcher.join("t", Entry([i], loop.create_future())) for i in range(3)]
        await asyncio.sleep(0.01)
        entries[1].leave()  # its client went away while it waited
        slots.lock.release()
        return [await entries[0].future, await entries[2].future], entries[1].future.cancelled()

    answers, cancelled = asyncio.run(scenario())
    assert seen == [[0, 2]] and [a for a, _ in answers] == [[0], [2]] and cancelled


def test_a_disconnected_request_gets_499_and_frees_its_place(bundles):
    app = create_app(bundles, device="cpu", batch_wait_ms=20, max_concurrency=1)
    predictions = app.state.predictions

    async def gone():
        return {"type": "http.disconnect"}

    async def scenario():
        answer = await predictions.answer("toy-single", ["hello"], gone)
        return answer, predictions.admission.waiting

    answer, waiting = asyncio.run(scenario())
    assert answer.status_code == 499 and waiting == 0


def test_split_answers_keeps_each_requests_share():
    assert split_answers([[1], [2, 3], [], [4]], ["a", "b", "c", "d"]) == [["a"], ["b", "c"], [], ["d"]]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"batch_wait_ms": -1}, "--batch-wait-ms must be in [0, 1000]"),
        ({"batch_wait_ms": 5000}, "--batch-wait-ms must be in [0, 1000]"),
        ({"batch_wait_ms": True}, "--batch-wait-ms"),
        ({"max_batch_items": 0}, "--max-batch-items must be an integer >= 1"),
        ({"max_batch_items": 2.5}, "--max-batch-items must be an integer >= 1"),
    ],
)
def test_batching_options_out_of_range_are_refused(bundles, options, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        create_app(bundles, device="cpu", **options)


def test_batching_defaults_and_off(bundles, capsys):
    assert batching_options(None, None, "cpu") == {"wait_s": pytest.approx(0.002), "max_items": 8}
    assert batching_options(0, None, "cuda") is None
    assert batching_options(None, None, "cuda")["max_items"] == 128
    assert main(["serve", str(bundles), "--batch-wait-ms", "2000"]) == 2
    assert "--batch-wait-ms must be in [0, 1000]" in capsys.readouterr().err
