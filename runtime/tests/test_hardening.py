"""What a hostile but careful client found, each fixed and kept fixed: lone surrogates, cost
amplification by long texts, broken bundles re-hashed on every request, run failures, chunked
bodies, load shedding, DNS rebinding, manifests edited in place, and CLI corner cases."""

import json
import os
import threading
import time

import pytest

from doe_runtime import BundleError, InputError, Router, RunError
from doe_runtime.cli import main
from doe_runtime.expert import CHARS_PER_TOKEN_BUDGET, bundle_signature

fastapi = pytest.importorskip("fastapi", reason="the [serve] extra is part of the README install")
from fastapi.testclient import TestClient  # noqa: E402

from doe_runtime.server import create_app  # noqa: E402


def test_lone_surrogates_are_input_errors_not_500(bundles):
    router = Router(bundles, device="cpu")
    with pytest.raises(InputError, match=r"inputs\[1\] is not valid Unicode text: surrogates not allowed"):
        router.predict("toy-single", ["fine", "\ud800"])
    with pytest.raises(InputError, match=r"inputs\[0\] is not valid Unicode"):
        router.predict("toy-pair", [("ok", "x\udfffy")])
    with TestClient(create_app(bundles, device="cpu")) as client:
        for task, inputs in (("toy-single", ["\ud800"]), ("toy-pair", [["a", "\ud800"]])):
            response = client.post(
                f"/v1/tasks/{task}/predict",
                content=json.dumps({"inputs": inputs}),
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_inputs"


def test_long_texts_are_clipped_before_tokenizing(bundles, monkeypatch):
    router = Router(bundles, device="cpu", precision="fp32")
    expert = router._expert("toy-single")
    budget = CHARS_PER_TOKEN_BUDGET * expert.manifest.tokenizer.max_length
    seen = []
    original = expert.tokenizer.encode_batch
    monkeypatch.setattr(
        expert,
        "tokenizer",
        type("Spy", (), {"encode_batch": lambda self, items: seen.extend(items) or original(items)})(),
    )
    text = "good film " * 20_000  # 200 KB
    got = router.predict("toy-single", [text, "bad"])
    assert max(len(t) for t in seen) == budget < len(text)
    monkeypatch.undo()
    clipped = Router(bundles, device="cpu", precision="fp32").predict("toy-single", [text[:budget], "bad"])
    assert got[0].probabilities == pytest.approx(clipped[0].probabilities, abs=1e-6)  # what the model reads


def test_a_broken_bundle_is_not_rehashed_on_every_request(bundles, monkeypatch):
    import doe_runtime.bundle as bundle_module

    model = bundles / "toy-single" / "model.int8.onnx"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    calls = []
    real = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path, *a: calls.append(path) or real(path, *a))
    router = Router(bundles, device="cpu")
    for _ in range(5):
        with pytest.raises(BundleError, match=r"model\.int8\.onnx: sha256 mismatch"):
            router.predict("toy-single", ["x"])
    assert len(calls) == 2  # tokenizer + model, once: the failure is remembered for this bundle state
    from pathlib import Path

    source = Path(__file__).parent / "data" / "bundles" / "toy-single" / "model.int8.onnx"
    model.write_bytes(source.read_bytes())  # repaired: the next request loads it
    assert router.predict("toy-single", ["good"])[0].label in ("no", "yes")


def test_run_failures_are_run_errors_and_json_500(bundles, monkeypatch):
    router = Router(bundles, device="cpu")
    expert = router._expert("toy-single")

    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom")

    monkeypatch.setattr(expert.session, "run", broken)
    with pytest.raises(RunError, match=r"onnxruntime failed on a batch of shape \[1, 3\]"):
        router.predict("toy-single", ["good"])
    with TestClient(create_app(bundles, router=router)) as client:
        response = client.post("/v1/tasks/toy-single/predict", json={"inputs": ["good"]})
    assert response.status_code == 500 and response.json()["error"]["type"] == "inference_failed"
    assert str(bundles) not in response.text


def test_chunked_body_over_the_limit_is_413(bundles):
    app = create_app(bundles, device="cpu", max_body_bytes=1000)
    with TestClient(app) as client:

        def chunks():
            yield b'{"inputs": ["'
            for _ in range(50):
                yield b"x" * 100
            yield b'"]}'

        response = client.post(
            "/v1/tasks/toy-single/predict", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413 and "exceeds the limit of 1000 bytes" in response.json()["error"]["message"]
        small = client.post(
            "/v1/tasks/toy-single/predict",
            content=iter([b'{"inputs": ', b'["good"]}']),
            headers={"content-type": "application/json"},
        )
        assert small.status_code == 200


@pytest.mark.parametrize(
    "batching",
    [{"batch_wait_ms": 0}, {"batch_wait_ms": 5, "max_batch_items": 1}],
    ids=["alone", "batched-one-per-call"],
)
def test_requests_beyond_the_queue_are_shed_with_retry_after(bundles, batching):
    router = Router(bundles, device="cpu")
    original = router.predict
    gate = threading.Event()

    def slow(task, items, **options):
        gate.wait(5)
        return original(task, items, **options)

    router.predict = slow
    statuses, headers = [], []
    with TestClient(create_app(bundles, router=router, max_concurrency=1, max_queue=1, **batching)) as client:

        def call():
            response = client.post("/v1/tasks/toy-single/predict", json={"inputs": ["good"]})
            statuses.append(response.status_code)
            headers.append(response.headers.get("retry-after"))

        threads = [threading.Thread(target=call) for _ in range(5)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while statuses.count(503) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        health = client.get("/healthz")  # answers while every prediction slot is taken
        assert health.status_code == 200 and time.monotonic() - started < 1.0
        gate.set()
        for thread in threads:
            thread.join()
        ready = client.get("/readyz").json()
    assert sorted(statuses) == [200, 200, 503, 503, 503]  # one running, one waiting, three shed
    assert headers.count("1") == 3 and ready["shed"] == 3


def test_host_header_is_checked_when_asked(bundles):
    app = create_app(bundles, device="cpu", allowed_hosts=["localhost", "127.0.0.1", "::1"])
    with TestClient(app, base_url="http://localhost:8000") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz", headers={"host": "127.0.0.1:8000"}).status_code == 200
        assert client.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
        evil = client.get("/v1/tasks", headers={"host": "evil.example:8000"})
        assert evil.status_code == 421 and evil.json()["error"]["type"] == "host_not_allowed"


def test_manifest_edited_in_place_with_same_size_and_time_is_seen(bundles):
    folder = bundles / "toy-single"
    path = folder / "manifest.json"
    router = Router(bundles, device="cpu", auto_reload=True)
    first = router.predict("toy-single", ["good"])[0]
    before, stat = bundle_signature(folder), path.stat()
    document = json.loads(path.read_text())
    document["task"]["labels"] = ["yes", "no"]  # swapped: the same number of bytes
    path.write_text(json.dumps(document, indent=2))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert bundle_signature(folder) != before
    again = router.predict("toy-single", ["good"])[0]  # reloaded: the same logits under the swapped names
    assert again.label_id == first.label_id and again.label != first.label


def test_unknown_task_names_are_bounded_and_pathless(bundles):
    with TestClient(create_app(bundles, device="cpu")) as client:
        response = client.get("/v1/tasks/" + "a" * 10_000)
    assert response.status_code == 404 and len(response.text) < 1000 and str(bundles) not in response.text
    loaded = Router(bundles, device="cpu")
    with TestClient(create_app(bundles, router=loaded)) as client:
        assert client.get("/v1/tasks/toy-single").json()["provider"] is None  # not loaded: not loaded here
        client.post("/v1/tasks/toy-single/predict", json={"inputs": ["good"]})
        described = client.get("/v1/tasks/toy-single").json()
    assert described["provider"] == "CPUExecutionProvider" and described["serving_precision"] == "int8"


def test_cli_corner_cases(bundles, capsys, tmp_path):
    assert main(["predict", str(bundles), "--task", "toy-single"]) == 2
    assert "no inputs" in capsys.readouterr().err
    assert main(["predict", str(bundles), "--task", "toy-single", "--", "-1 is a fine number", "--also"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes('"fine"\n"caf\xe9"\n'.encode("latin-1"))
    assert main(["predict", str(bundles), "--task", "toy-single", "--input", str(bad)]) == 2
    assert "latin.jsonl:2: not valid UTF-8" in capsys.readouterr().err
    assert main(["predict", str(bundles), "--task", "toy-single", "caf\udce9"]) == 2  # a non-UTF-8 argv byte
    assert "not valid Unicode text" in capsys.readouterr().err
    for flag, value in (
        ("--port", "70000"),
        ("--max-body-bytes", "0"),
        ("--max-body-bytes", "-1"),
        ("--max-queue", "-1"),
    ):
        with pytest.raises(SystemExit) as caught:
            main(["serve", str(bundles), flag, value])
        assert caught.value.code == 2
        assert "expected" in capsys.readouterr().err


def test_big_batches_shrink_the_memory_arena_afterwards(bundles, monkeypatch):
    router = Router(bundles, device="cpu", batch_size=256, precision="fp32")
    expert = router._expert("toy-single")
    expert.shrink_above_tokens = 100
    seen = []
    real = expert.session.run
    monkeypatch.setattr(
        expert.session,
        "run",
        lambda out, feeds, run_options=None: (
            seen.append((feeds["input_ids"].size, run_options)) or real(out, feeds, run_options=run_options)
        ),
    )
    router.predict("toy-single", ["good"])  # 3 tokens: as usual
    router.predict("toy-single", ["good film " * 10] * 20)  # 20 x 16 = 320 tokens: shrink after it
    assert seen[0][1] is None and seen[1][0] == 320 and seen[1][1] is expert._shrink_options


def test_without_an_arena_big_batches_run_and_the_heap_is_trimmed(bundles, monkeypatch):
    """memory_arena=False has no arena to shrink: a big batch must still run (it raised RunError: 'Did not
    find an arena based allocator'), and after it the heap's free pages go back to the system."""
    import doe_runtime.router as router_module

    trims = []
    monkeypatch.setattr(router_module, "release_free_memory", lambda: trims.append(1) or True)
    for arena in (False, True):
        trims.clear()
        router = Router(bundles, device="cpu", batch_size=256, precision="fp32", memory_arena=arena)
        expert = router._expert("toy-single")
        assert trims == [1]  # after loading: the parsed model file's buffers are free
        expert.shrink_above_tokens = 100
        assert (expert._shrink_options is None) == (not arena)
        router.predict("toy-single", ["good"])
        assert trims == [1]  # a usual request: no trim
        got = router.predict("toy-single", ["good film " * 10] * 20)  # 320 tokens > 100
        assert len(got) == 20 and trims == [1, 1]


def test_release_free_memory_works_here():
    from doe_runtime.expert import release_free_memory

    assert release_free_memory() is True  # glibc (Linux): the call exists and ran


def test_large_bodies_are_followed_by_a_heap_trim(bundles, monkeypatch):
    import doe_runtime.middleware as middleware

    trims = []
    monkeypatch.setattr(middleware, "release_free_memory", lambda: trims.append(1) or True)
    monkeypatch.setattr(middleware, "TRIM_ABOVE_BYTES", 10_000)
    with TestClient(create_app(bundles, device="cpu", max_body_bytes=1 << 20)) as client:
        assert client.post("/v1/tasks/toy-single/predict", json={"inputs": ["good"]}).status_code == 200
        assert trims == []
        big = client.post("/v1/tasks/toy-single/predict", json={"inputs": ["good film " * 200] * 8})
        assert big.status_code == 200 and trims == [1]
