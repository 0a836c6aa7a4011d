"""The HTTP server: endpoints, client errors as 4xx JSON, limits, hot reload of rebuilt bundles,
a corrupted bundle isolated to its task, loopback by default, and input fuzzing of predict."""

import json
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is part of the README install")
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doe_runtime import ConfigError, Router
from doe_runtime.server import create_app, is_loopback, serve


@pytest.fixture
def client(bundles):
    root = bundles
    with TestClient(create_app(root, max_items=8, max_body_bytes=20_000, device="cpu")) as c:
        yield c


def test_endpoints_and_answers_equal_router(client, bundles):
    root = bundles
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["tasks"] == 2
    tasks = client.get("/v1/tasks").json()["tasks"]
    assert sorted(t["task"] for t in tasks) == ["toy-pair", "toy-single"]
    one = client.get("/v1/tasks/toy-pair").json()
    assert one["input"] == "pair" and one["labels"] == ["entailment", "neutral", "contradiction"]
    assert str(root) not in json.dumps(one) and str(root) not in json.dumps(tasks)

    texts = ["a good film", "a bad film", "fine"]
    response = client.post("/v1/tasks/toy-single/predict", json={"inputs": texts})
    assert response.status_code == 200
    body = response.json()
    assert body["provider"] == "CPUExecutionProvider" and body["precision"] == "int8"
    expected = Router(root, device="cpu").predict("toy-single", texts)
    for got, want in zip(body["predictions"], expected):
        assert got["label"] == want.label
        assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
    pair = client.post("/v1/tasks/toy-pair/predict", json={"inputs": [["a man sings", "someone sings"]]})
    assert pair.status_code == 200 and len(pair.json()["predictions"]) == 1
    schema = client.get("/openapi.json").json()
    assert "/v1/tasks/{task}/predict" in schema["paths"]


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/v1/tasks/nope/predict", {"inputs": ["x"]}, 404, "unknown task 'nope'; known tasks: toy-pair, toy-single"),
        ("/v1/tasks/..%2Fetc/predict", {"inputs": ["x"]}, 404, ""),
        ("/v1/tasks/Bad!/predict", {"inputs": ["x"]}, 404, "invalid task name"),
        ("/v1/tasks/toy-single/predict", {"inputs": []}, 422, "inputs: List should have at least 1 item"),
        ("/v1/tasks/toy-single/predict", {"inputs": [["a", "b"]]}, 422, "takes single texts"),
        ("/v1/tasks/toy-pair/predict", {"inputs": ["lonely"]}, 422, "takes text pairs"),
        ("/v1/tasks/toy-pair/predict", {"inputs": [["a", "b", "c"]]}, 422, "does not match the schema"),
        ("/v1/tasks/toy-single/predict", {"inputs": [1, 2]}, 422, "does not match the schema"),
        ("/v1/tasks/toy-single/predict", {"text": "x"}, 422, "does not match the schema"),
        ("/v1/tasks/toy-single/predict", {"inputs": ["x"] * 9}, 422, "at most 8 items"),
    ],
)
def test_client_errors_are_4xx_json(client, bundles, path, body, status, words):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert str(bundles) not in response.text  # no local path in any answer


def test_malformed_and_oversized_bodies(client):
    bad = client.post(
        "/v1/tasks/toy-single/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 422
    big = client.post("/v1/tasks/toy-single/predict", json={"inputs": ["word " * 5000]})
    assert big.status_code == 413 and "exceeds the limit of 20000 bytes" in big.json()["error"]["message"]


def test_rebuilt_bundle_is_picked_up_and_corruption_is_isolated(client, bundles):
    root = bundles
    texts = ["a good film"]
    assert client.post("/v1/tasks/toy-single/predict", json={"inputs": texts}).status_code == 200
    # "rebuild": the pair bundle written as toy-single (other labels), swapped in atomically
    staging = root / ".staging"
    shutil.copytree(root / "toy-pair", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["task"]["name"] = "toy-single"
    (staging / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(root / "toy-single")
    staging.rename(root / "toy-single")
    after = client.post("/v1/tasks/toy-single/predict", json={"inputs": texts})
    assert after.status_code == 422 and "takes text pairs" in after.json()["error"]["message"]  # new bundle served

    # corrupt the pair bundle's model while it is resident: it answers 503 naming the file, others keep going
    assert client.post("/v1/tasks/toy-pair/predict", json={"inputs": [["a", "b"]]}).status_code == 200
    model = root / "toy-pair" / "model.int8.onnx"  # the graph auto serves on CPU
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    broken = client.post("/v1/tasks/toy-pair/predict", json={"inputs": [["a", "b"]]})
    assert broken.status_code == 503
    message = broken.json()["error"]["message"]
    assert "toy-pair" in message and "model.int8.onnx: sha256 mismatch" in message and str(root) not in message
    assert client.post("/v1/tasks/toy-single/predict", json={"inputs": [["a", "b"]]}).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_requests_in_flight_finish_on_the_old_session(bundles):
    """A reload while requests run: every request answers 200, from the old or the new bundle."""
    root = bundles
    router = Router(root, device="cpu", auto_reload=True)
    old = router._expert("toy-single")
    stop, errors, answers = threading.Event(), [], []

    def hammer():
        while not stop.is_set():
            try:
                answers.append(router.predict("toy-single", ["a good film", "bad"]))
            except Exception as exc:
                errors.append(exc)

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    (root / "toy-single" / "manifest.json").touch()  # looks rebuilt: reload on the next request
    time.sleep(0.5)
    stop.set()
    for worker in workers:
        worker.join()
    assert not errors and len(answers) > 10
    assert router._expert("toy-single") is not old


def test_server_binds_loopback_unless_told(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with pytest.raises(ConfigError, match="--allow-remote"):
        serve(tmp_path, host="0.0.0.0")
    with pytest.raises(ConfigError, match="does not exist"):
        serve(tmp_path / "missing")


def test_readyz_without_bundles(tmp_path):
    with TestClient(create_app(tmp_path)) as c:
        response = c.get("/readyz")
    assert response.status_code == 503 and "no bundles" in response.json()["error"]["message"]


item = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1000, max_size=3000),
    st.lists(st.text(max_size=20), max_size=3),
    st.integers(),
    st.none(),
    st.floats(allow_nan=True),
    st.binary(max_size=10),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=st.one_of(st.lists(item, max_size=6), item))
def test_predict_fuzz_answers_or_refuses_clearly(bundles, inputs):
    """Any input: either one prediction per item, or an InputError that names the task."""
    from doe_runtime import InputError

    root = bundles
    router = _fuzz_router(root)
    for task in ("toy-single", "toy-pair"):
        try:
            predictions = router.predict(task, inputs)
        except InputError as exc:
            assert task in str(exc)
            continue
        assert len(predictions) == len(inputs)
        for prediction in predictions:
            assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-5


_ROUTERS = {}


def _fuzz_router(root):
    if root not in _ROUTERS:
        _ROUTERS.clear()
        _ROUTERS[root] = Router(root, device="cpu")
    return _ROUTERS[root]


def test_huge_and_odd_inputs(bundles):
    root = bundles
    router = Router(root, device="cpu", batch_size=64)
    odd = ["", " ", "\x00\x01\x1b[31m", "x" * 100_000, "مرحبا 你好 Привет 🙂", "\u202e\u200b", "a\nb\tc"]
    assert len(router.predict("toy-single", odd)) == len(odd)
    many = ["short text"] * 5000
    assert len(router.predict("toy-single", many)) == 5000


def test_admission_limit_caps_concurrent_predictions(bundles):
    root = bundles
    router = Router(root, device="cpu", auto_reload=True)
    active, peak, lock = [0], [0], threading.Lock()
    original = router.predict

    def counting(task, items, **options):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.02)
            return original(task, items, **options)
        finally:
            with lock:
                active[0] -= 1

    router.predict = counting
    with TestClient(create_app(root, router=router, max_concurrency=1)) as c:
        statuses = []
        threads = [
            threading.Thread(
                target=lambda: statuses.append(
                    c.post("/v1/tasks/toy-single/predict", json={"inputs": ["a good film"]}).status_code
                )
            )
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert statuses == [200] * 6 and peak[0] == 1
    with pytest.raises(ConfigError, match="max_concurrency must be an int >= 1"):
        create_app(root, max_concurrency=0)


def test_every_answer_says_how_long_the_server_held_it(client):
    """Server-Timing on answers, refusals from the middlewares and errors alike: the load suite reads it to
    tell time in the server (admission queue included) from time in the client."""
    answers = [
        client.post("/v1/tasks/toy-single/predict", json={"inputs": ["a short text"]}),
        client.post("/v1/tasks/toy-single/predict", json={"inputs": ["word " * 5000]}),  # 413, BodyLimit
        client.get("/v1/tasks/nope"),
        client.get("/healthz"),
    ]
    assert [a.status_code for a in answers] == [200, 413, 404, 200]
    for answer in answers:
        name, _, value = answer.headers["server-timing"].partition(";dur=")
        assert name == "app" and 0.0 <= float(value) < 60_000
