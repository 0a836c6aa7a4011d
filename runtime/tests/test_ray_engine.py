"""The Ray Serve engine on a local Ray cluster started here: 2 expert replicas, 3 tasks; answers
equal Router.predict, a task goes back to the replica that holds it, bad input gets the FastAPI
server's 4xx, and a replica killed under load loses no request silently."""

import os
import shutil
import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra (ray[serve]) is not installed in this environment")
httpx = pytest.importorskip("httpx")

from ray import serve  # noqa: E402

from doe_runtime import Router  # noqa: E402
from doe_runtime.cli import main  # noqa: E402
from doe_runtime.errors import ConfigError  # noqa: E402
from doe_runtime.ray_engine import (  # noqa: E402
    PROXY_READY_CHECK,
    REPLICA_HEADER,
    build_app,
    check_scaling,
    patient_proxy,
    replica_resources,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_patient_proxy_sets_the_ready_check_only_where_unset(monkeypatch):
    """Serve's HTTP proxy gets 60 s inside ``patient_proxy`` (its own 5 s failed serve.start on a busy machine);
    a value the environment already sets is kept; either way the environment is as before afterwards."""
    monkeypatch.delenv(PROXY_READY_CHECK, raising=False)
    with patient_proxy():
        assert os.environ[PROXY_READY_CHECK] == "60"
    assert PROXY_READY_CHECK not in os.environ
    monkeypatch.setenv(PROXY_READY_CHECK, "7")
    with pytest.raises(RuntimeError, match="inside"), patient_proxy():
        assert os.environ[PROXY_READY_CHECK] == "7"
        raise RuntimeError("inside")
    assert os.environ[PROXY_READY_CHECK] == "7"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from pathlib import Path

    root = tmp_path_factory.mktemp("ray") / "artifacts"
    shutil.copytree(Path(__file__).parent / "data" / "bundles", root)
    shutil.copytree(root / "toy-single", root / "toy-twin")
    manifest = root / "toy-twin" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"name": "toy-single"', '"name": "toy-twin"'))
    port = free_port()
    with patient_proxy():  # as serve_ray: a busy machine's HTTP proxy gets 60 s to start, not Serve's 5
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(
                root,
                replicas=2,
                max_experts_per_replica=2,
                replica_cpus=0.5,
                router_options={"device": "cpu"},
                max_items=16,
                batch_wait_ms=50,  # the toy model runs in well under a millisecond: a wide window to merge in
            ),
            name="doe",
            route_prefix="/",
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Ray app did not become ready"
            time.sleep(0.5)
        yield root, base
        serve.shutdown()
        ray.shutdown()


def test_answers_routing_and_errors(cluster):
    root, base = cluster
    reference = Router(root, device="cpu")
    texts = ["a good film", "dull plot", "music"]
    replicas = {}
    for task, inputs in (("toy-single", texts), ("toy-twin", texts), ("toy-pair", [["a man", "someone"]])):
        response = httpx.post(f"{base}/v1/tasks/{task}/predict", json={"inputs": inputs}, timeout=60)
        assert response.status_code == 200, response.text
        want = reference.predict(task, [tuple(i) if isinstance(i, list) else i for i in inputs])
        assert [p["probabilities"] for p in response.json()["predictions"]] == [p.probabilities for p in want]
        replicas[task] = response.headers[REPLICA_HEADER]
    # the task goes back to the replica that loaded it
    again = [
        httpx.post(f"{base}/v1/tasks/toy-single/predict", json={"inputs": texts}, timeout=60).headers[REPLICA_HEADER]
        for _ in range(8)
    ]
    assert again.count(replicas["toy-single"]) >= 6, (replicas, again)
    # the Serve header may name the task too; a mismatch is refused
    ok = httpx.post(
        f"{base}/v1/tasks/toy-single/predict",
        json={"inputs": texts},
        headers={"serve_multiplexed_model_id": "toy-single"},
        timeout=60,
    )
    assert ok.status_code == 200
    # the same 4xx as the single-process server
    for path, body, status, kind in (
        ("/v1/tasks/nope/predict", {"inputs": ["x"]}, 404, "unknown_task"),
        ("/v1/tasks/toy-pair/predict", {"inputs": ["lonely"]}, 422, "invalid_inputs"),
        ("/v1/tasks/toy-single/predict", {"inputs": []}, 422, "invalid_request"),
        ("/v1/tasks/toy-single/predict", {"inputs": ["x"] * 17}, 422, "invalid_request"),
    ):
        response = httpx.post(base + path, json=body, timeout=60)
        assert response.status_code == status and response.json()["error"]["type"] == kind, response.text
    mismatch = httpx.post(
        f"{base}/v1/tasks/toy-single/predict",
        json={"inputs": texts},
        headers={"serve_multiplexed_model_id": "toy-pair"},
        timeout=60,
    )
    assert mismatch.status_code == 400 and mismatch.json()["error"]["type"] == "task_mismatch"
    assert httpx.get(base + "/healthz", timeout=10).json() == {"status": "ok"}
    assert {t["task"] for t in httpx.get(base + "/v1/tasks", timeout=10).json()["tasks"]} == {
        "toy-single",
        "toy-twin",
        "toy-pair",
    }


def test_concurrent_requests_are_batched_in_the_replicas_and_measured(cluster):
    import numpy as np
    from prometheus_client.parser import text_string_to_metric_families

    root, base = cluster
    reference = Router(root, device="cpu")
    texts = [f"review {i} " + "fine " * (i % 5) for i in range(24)]
    before = httpx.get(base + "/metrics", timeout=10).text
    answers: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        answers[i] = httpx.post(f"{base}/v1/tasks/toy-single/predict", json={"inputs": [texts[i]]}, timeout=60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, text in enumerate(texts):
        assert answers[i].status_code == 200, answers[i].text
        got, want = answers[i].json()["predictions"][0], reference.predict("toy-single", [text])[0]
        # the toy bundle serves int8 on CPU: its per-batch activation scales move probabilities slightly
        assert got["label"] == want.label
        assert np.allclose(list(got["probabilities"].values()), list(want.probabilities.values()), atol=2e-3)

    def totals(text: str) -> dict:
        out: dict = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, sample.labels.get("task"), sample.labels.get("status"))
                out[key] = out.get(key, 0) + sample.value
        return out

    after_text = httpx.get(base + "/metrics", timeout=10).text
    old, new = totals(before), totals(after_text)
    sent = len(texts)
    key = ("doe_requests_total", "toy-single", "200")
    assert new[key] - old.get(key, 0) == sent
    key = ("doe_model_call_requests_sum", "toy-single", None)
    assert new[key] - old.get(key, 0) == sent  # every request was in exactly one model call
    key = ("doe_model_call_requests_count", "toy-single", None)
    assert new[key] - old.get(key, 0) < sent  # and replicas merged some of them
    replicas = {
        s.labels["replica"]
        for f in text_string_to_metric_families(after_text)
        if f.name == "doe_experts_resident"
        for s in f.samples
    }
    assert 1 <= len(replicas) <= 2 and str(root) not in after_text


def test_a_replica_killed_under_load_loses_no_request(cluster):
    _root, base = cluster
    statuses, stop = [], threading.Event()

    def client():
        with httpx.Client(timeout=60) as session:
            while not stop.is_set():
                try:
                    response = session.post(f"{base}/v1/tasks/toy-single/predict", json={"inputs": ["good"]})
                    statuses.append((response.status_code, response.headers.get("retry-after")))
                except httpx.HTTPError as exc:  # a request that got no answer at all
                    statuses.append((type(exc).__name__, None))

    workers = [threading.Thread(target=client) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(2)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "DoeExperts" in a["name"]]
    assert len(names) == 2, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    killed_at = len(statuses)
    time.sleep(6)
    stop.set()
    for worker in workers:
        worker.join()
    answered = [s for s, _ in statuses if s == 200]
    refused = [(s, r) for s, r in statuses if s != 200]
    assert len(answered) > 10 and len(statuses) > killed_at + 5  # requests went on after the kill
    alive = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "DoeExperts" in a["name"]]
    assert names[0] not in alive  # the replica really died (Serve starts a new one)
    assert all(s == 503 and r == "1" for s, r in refused), refused  # refused clearly, never lost
    assert httpx.post(f"{base}/v1/tasks/toy-single/predict", json={"inputs": ["good"]}, timeout=60).status_code == 200


def test_bad_scaling_is_refused_before_anything_starts(capsys, tmp_path):
    with pytest.raises(ConfigError, match="--replicas must be >= 1"):
        check_scaling(0, None, None, 2)
    with pytest.raises(ConfigError, match=r"0 <= --min-replicas <= --max-replicas"):
        check_scaling(None, 3, 2, 2)
    with pytest.raises(ConfigError, match="either --replicas N or autoscaling"):
        check_scaling(2, 1, 3, 2)
    assert check_scaling(None, 1, 3, 2) == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1}
    }
    assert main(["serve", str(tmp_path), "--engine", "ray", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert "--min-replicas <= --max-replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path), "--engine", "ray", "--replicas", "0"])


def test_gpu_replicas_ask_ray_for_a_gpu_share(capsys, tmp_path):
    assert replica_resources("cuda", 1.0, None) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert replica_resources("cuda", 2, 0.25) == {"num_cpus": 2, "num_gpus": 0.25}
    assert replica_resources("cpu", 1.0, None) == {"num_cpus": 1.0}
    with pytest.raises(ConfigError, match=r"--replica-gpus must be in \(0, 1\]"):
        replica_resources("cuda", 1.0, 1.5)
    with pytest.raises(ConfigError, match="--replica-cpus must be > 0"):
        replica_resources("cpu", 0, None)
    assert main(["serve", str(tmp_path), "--engine", "ray", "--replica-gpus", "0.5"]) == 2
    assert "--replica-gpus 0.5 needs --device cuda" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--engine", "ray", "--batch-wait-ms", "-3"]) == 2
    assert "--batch-wait-ms must be in [0, 1000]" in capsys.readouterr().err
