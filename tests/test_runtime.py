"""doe_runtime on bundles built by the real pipeline: predictions, the bundle contract, and a
clear error (with nothing lost) for every kind of bad input."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from doe_export import export
from doe_runtime import BundleError, InputError, Router, UnknownTaskError
from doe_runtime.bundle import discover, read_manifest
from doe_runtime.cli import main as runtime_cli


def run_threads(target, count: int) -> list[Exception]:
    """Run target(index) in ``count`` threads at once; return the exceptions they raised."""
    errors = []

    def guarded(index):
        try:
            target(index)
        except Exception as exc:  # returned to the test, which asserts on it
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_import_is_lean():
    code = "import sys, doe_runtime; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_predict_single_and_pair(bundles):
    root, results = bundles
    router = Router(root, device="cpu")
    assert router.tasks == ["toy-pair", "toy-single"]
    preds = router.predict("toy-single", ["good movie", "dull plot", "great film"])
    assert len(preds) == 3
    for pred in preds:
        assert pred.label in ("no", "yes")
        assert abs(sum(pred.probabilities.values()) - 1.0) < 1e-6
        assert pred.probabilities[pred.label] == max(pred.probabilities.values())
    pair = router.predict("toy-pair", [("a man plays", "someone plays music")])
    assert pair[0].label in ("no", "yes")
    assert router.provider("toy-single") == "CPUExecutionProvider"
    assert router.predict("toy-single", []) == []


def test_manifest_records_the_contract(bundles):
    root, results = bundles
    manifest = read_manifest(root / "toy-single")
    assert manifest["schema_version"] == 1
    assert manifest["task"] == {"name": "toy-single", "input": "single", "labels": ["no", "yes"], "metric": "accuracy"}
    assert [i["name"] for i in manifest["onnx"]["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["onnx"]["opset"] >= 18
    assert manifest["validation"]["max_abs_diff"] <= 1e-4 and manifest["validation"]["label_agreement"] == 1.0
    assert len(manifest["validation"]["shapes"]) >= 2
    assert manifest["quality"]["size"] == 24 and manifest["quality"]["split"] == "generated test"
    assert manifest["architecture"]["ffn_widths"] == [13, 13]  # round(37 * 0.35)
    assert manifest["pruning"]["rate"] == 0.65 and manifest["pruning"]["params_after"] < manifest["pruning"]["params_before"]
    assert manifest["versions"]["torch"].startswith("2.13")
    assert results["toy-single"].expert_onnx == manifest["quality"]["expert_onnx"]


def test_router_equals_bare_session_without_padding(bundles):
    """Router (batched, padded) gives the logits of a bare session run one item at a time."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    root, _ = bundles
    router = Router(root, device="cpu", batch_size=2)
    texts = ["good", "a long dull story with a dark ending and bad music", "great cast", "poor"]
    preds = router.predict("toy-single", texts)
    manifest = read_manifest(root / "toy-single")
    tok = Tokenizer.from_file(str(root / "toy-single" / "tokenizer.json"))
    session = ort.InferenceSession(str(root / "toy-single" / "model.onnx"), providers=["CPUExecutionProvider"])
    for text, pred in zip(texts, preds):  # one at a time: no padding at all
        ids = np.array([tok.encode(text).ids[: manifest["tokenizer"]["max_length"]]], dtype=np.int64)
        logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert pred.label_id == int(np.argmax(logits))
        np.testing.assert_allclose(list(pred.probabilities.values()), probs, atol=1e-5)


def test_truncates_to_manifest_max_length(bundles):
    root, _ = bundles
    router = Router(root, device="cpu")
    expert = router._expert("toy-single")
    feeds = expert.encode(["word " * 500, "short"])
    assert feeds["input_ids"].shape == (2, 32)
    assert feeds["attention_mask"][1].sum() < 32  # padded to the longest, not beyond
    assert len(router.predict("toy-single", ["x" * 100_000])) == 1


def test_unknown_task_lists_known(bundles):
    root, _ = bundles
    router = Router(root, device="cpu")
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'.*known tasks: toy-pair, toy-single"):
        router.predict("nope", ["x"])
    with pytest.raises(ValueError, match="invalid task name"):
        router.predict("../toy-single", ["x"])
    with pytest.raises(ValueError, match="invalid task name"):
        router.predict("Toy", ["x"])


def test_wrong_input_shapes_are_named(bundles):
    root, _ = bundles
    router = Router(root, device="cpu")
    with pytest.raises(InputError, match=r"takes text pairs: inputs\[0\]"):
        router.predict("toy-pair", ["single text"])
    with pytest.raises(InputError, match=r"takes single texts: inputs\[1\].*not pairs"):
        router.predict("toy-single", ["ok", ("a", "b")])
    with pytest.raises(InputError, match=r"inputs\[0\] must be str, got int"):
        router.predict("toy-single", [5])
    with pytest.raises(InputError, match="wrap a single input in a list"):
        router.predict("toy-single", "bare string")
    with pytest.raises(InputError, match=r"inputs\[0\] must be a \(str, str\) pair"):
        router.predict("toy-pair", [("a", 3)])


def test_tampered_model_or_tokenizer_is_named(bundles):
    root, _ = bundles
    with open(root / "toy-single" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    (root / "toy-pair" / "tokenizer.json").write_text("{}")
    router = Router(root, device="cpu")
    with pytest.raises(BundleError, match=r"toy-single/model.onnx: sha256 mismatch"):
        router.predict("toy-single", ["x"])
    with pytest.raises(BundleError, match=r"toy-pair/tokenizer.json: sha256 mismatch"):
        router.predict("toy-pair", [("a", "b")])


def _edit_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_unknown_schema_and_escaping_paths_are_refused(bundles):
    root, _ = bundles
    _edit_manifest(root / "toy-single", lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match=r"unknown schema_version 99.*reads schema versions \[1\]"):
        Router(root, device="cpu").predict("toy-single", ["x"])
    _edit_manifest(root / "toy-pair", lambda m: m["onnx"].update(file="../toy-single/model.onnx"))
    with pytest.raises(BundleError, match="leaves the bundle folder"):
        Router(root, device="cpu").predict("toy-pair", [("a", "b")])
    _edit_manifest(root / "toy-pair", lambda m: m["onnx"].update(file="/etc/passwd"))
    with pytest.raises(BundleError, match="is absolute"):
        read_manifest(root / "toy-pair")


def test_interrupted_export_keeps_previous_bundle(bundles):
    root, _ = bundles
    before = (root / "toy-single" / "model.onnx").read_bytes()
    manifest = read_manifest(root / "toy-single")

    def fill(folder):
        (folder / "model.onnx").write_bytes(b"half a model")
        raise KeyboardInterrupt  # the user pressed Ctrl-C half-way

    with pytest.raises(KeyboardInterrupt):
        export.write_bundle(root, "toy-single", fill, manifest)
    assert (root / "toy-single" / "model.onnx").read_bytes() == before
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and p.is_dir()] == []  # temp folder cleaned
    assert Router(root, device="cpu").predict("toy-single", ["good"])[0].label in ("no", "yes")


def test_folder_without_manifest_is_ignored_and_orphan_restored(bundles):
    root, _ = bundles
    (root / "half").mkdir()
    (root / "half" / "model.onnx").write_bytes(b"x")
    assert "half" not in discover(root)
    # a writer killed between its two renames leaves the old bundle in .<task>.previous
    (root / "toy-single").rename(root / ".toy-single.previous")
    manifest = json.loads((root / ".toy-single.previous" / "manifest.json").read_text())

    def fill(folder):
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        export.write_bundle(root, "toy-single", fill, manifest)
    assert read_manifest(root / "toy-single")["task"]["name"] == "toy-single"
    assert not (root / ".toy-single.previous").exists()


def test_lru_keeps_at_most_max_resident(bundles):
    root, _ = bundles
    router = Router(root, device="cpu", max_resident=1)
    router.predict("toy-single", ["x"])
    router.predict("toy-pair", [("a", "b")])
    assert router.resident() == ["toy-pair"]
    router.predict("toy-single", ["x"])
    assert router.resident() == ["toy-single"]


def test_predict_is_thread_safe(bundles):
    root, _ = bundles
    router = Router(root, device="cpu", max_resident=1)
    texts = ["good film", "bad plot", "great music", "dull"] * 4
    expected = [p.label for p in Router(root, device="cpu").predict("toy-single", texts)]
    outputs = []

    def worker(index):
        for _ in range(5):
            if index % 2:
                router.predict("toy-pair", [("a", "b")])  # forces evictions between threads
            outputs.append([p.label for p in router.predict("toy-single", texts)])

    assert run_threads(worker, 6) == []
    assert len(outputs) == 30 and all(out == expected for out in outputs)


def test_cuda_demanded_without_cuda_is_an_error(bundles):
    import onnxruntime as ort

    from doe_runtime import DeviceError

    root, _ = bundles
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider; the error path cannot happen here")
    with pytest.raises(DeviceError, match="device='cuda' demanded"):
        Router(root, device="cuda").predict("toy-single", ["x"])
    with pytest.raises(ValueError, match="device must be one of"):
        Router(root, device="tpu")


def test_cli_predict_inspect_list(bundles, capsys, tmp_path):
    root, _ = bundles
    assert runtime_cli(["predict", str(root), "--task", "toy-single", "good film", "bad plot"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["label"] in ("no", "yes")
    requests = tmp_path / "req.jsonl"
    requests.write_text('{"text_a": "a", "text_b": "b"}\n["c", "d"]\n')
    assert runtime_cli(["predict", str(root), "--task", "toy-pair", "--input", str(requests),
                        "--pair", "e", "f"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert runtime_cli(["inspect", str(root / "toy-pair")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "toy-pair" and summary["ffn_widths"] == [13, 13]
    assert runtime_cli(["list", str(root)]) == 0
    assert "toy-single" in capsys.readouterr().out
    assert runtime_cli(["predict", str(root), "--task", "toy-pair", "lonely text"]) == 2
    assert "takes text pairs" in capsys.readouterr().err


def test_plan_batches_sorts_and_respects_budgets():
    from doe_runtime.router import plan_batches

    lengths = np.array([9, 2, 7, 3, 30, 2])
    batches = plan_batches(lengths, batch_size=2)
    assert [b.tolist() for b in batches] == [[1, 5], [3, 2], [0, 4]]
    by_tokens = plan_batches(lengths, batch_size=10, max_tokens=20)
    assert all(len(b) * lengths[b].max() <= 20 or len(b) == 1 for b in by_tokens)
    assert sorted(i for b in by_tokens for i in b.tolist()) == list(range(6))
    assert [b.tolist() for b in by_tokens][-1] == [4]  # 30 tokens alone exceeds the budget: still runs
    arrival = plan_batches(lengths, batch_size=2, sort=False)
    assert [b.tolist() for b in arrival] == [[0, 1], [2, 3], [4, 5]]
    arrival_tokens = plan_batches(lengths, batch_size=10, max_tokens=20, sort=False)
    assert [b.tolist() for b in arrival_tokens] == [[0, 1], [2, 3], [4], [5]]  # (9,2)->18; (7,3)->14; 30 alone


def test_predict_batches_by_length_and_keeps_caller_order(bundles, monkeypatch):
    root, _ = bundles
    router = Router(root, device="cpu", batch_size=2)
    texts = ["good " * 20, "bad", "great film " * 5, "dull", "fine"]
    expected = [p.probabilities for p in Router(root, device="cpu", batch_size=1).predict("toy-single", texts)]
    expert = router._expert("toy-single")
    shapes = []
    original = expert.run
    monkeypatch.setattr(expert, "run", lambda ids, mask: shapes.append(ids.shape) or original(ids, mask))
    got = router.predict("toy-single", texts)
    for have, want in zip(got, expected):
        assert have.probabilities == pytest.approx(want, abs=1e-5)
    assert shapes[0][1] == 3 and shapes[-1][1] == 22  # short items together, the long one alone-ish
    assert sum(b for b, _ in shapes) == 5 and all(b <= 2 for b, _ in shapes)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Router(root, max_batch_tokens=0)
    unsorted = Router(root, device="cpu", batch_size=2, sort_by_length=False)
    for have, want in zip(unsorted.predict("toy-single", texts), expected):
        assert have.probabilities == pytest.approx(want, abs=1e-5)


def test_concurrent_exports_of_one_task_end_with_one_complete_bundle(bundles):
    """Writers racing on one task: the survivor is whole (its files match its own manifest)."""
    from doe_runtime.bundle import verify_files

    root, _ = bundles
    manifest = read_manifest(root / "toy-single")
    model = (root / "toy-single" / "model.onnx").read_bytes()
    tokenizer = (root / "toy-single" / "tokenizer.json").read_bytes()

    def writer(index):
        def fill(folder):
            (folder / "model.onnx").write_bytes(model)
            (folder / "tokenizer.json").write_bytes(tokenizer)
            return {"created": f"writer {index}"}

        for _ in range(5):
            export.write_bundle(root, "toy-single", fill, manifest)

    assert run_threads(writer, 4) == []
    final = read_manifest(root / "toy-single")
    verify_files(root / "toy-single", final)
    assert final["created"].startswith("writer ")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["toy-pair", "toy-single"]


def test_fp16_variant_iobinding_and_precision_choice(bundles):
    root, _ = bundles
    manifest = json.loads((root / "toy-single" / "manifest.json").read_text())
    variant = manifest["onnx"]["variants"]["fp16"]
    assert variant["file"] == "model.fp16.onnx" and variant["validation"]["label_agreement"] == 1.0
    texts = ["a good film", "a bad film", "fine", "x " * 30]
    fp32 = Router(root, device="cpu")
    assert fp32.info("toy-single")["precision"] == "fp32"  # auto on CPU: fp32 (fp16 pays only on CUDA)
    fp16 = Router(root, device="cpu", precision="fp16")
    assert fp16.info("toy-single")["precision"] == "fp16"
    bound = Router(root, device="cpu", io_binding=True)
    assert bound.info("toy-single")["io_binding"] is True and fp32.info("toy-single")["io_binding"] is False
    want = fp32.predict("toy-single", texts)
    for a, b, c in zip(want, fp16.predict("toy-single", texts), bound.predict("toy-single", texts)):
        assert a.label == b.label and a.probabilities == pytest.approx(b.probabilities, abs=2e-2)
        assert a.probabilities == pytest.approx(c.probabilities, abs=1e-6)
    with pytest.raises(ValueError, match="precision must be one of"):
        Router(root, precision="int4")

    (root / "toy-single" / "model.fp16.onnx").write_bytes(b"broken")
    with pytest.raises(BundleError, match="model.fp16.onnx: sha256 mismatch"):
        Router(root, device="cpu", precision="fp16").predict("toy-single", texts)
    del manifest["onnx"]["variants"]
    (root / "toy-single" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no fp16 variant"):
        Router(root, device="cpu", precision="fp16").predict("toy-single", texts)


def test_max_resident_bytes_evicts_least_recently_used(bundles):
    root, _ = bundles
    size = (root / "toy-single" / "model.onnx").stat().st_size
    router = Router(root, device="cpu", max_resident=4, max_resident_bytes=int(size * 1.5))
    router.predict("toy-single", ["a"])
    router.predict("toy-pair", [("a", "b")])
    assert router.resident() == ["toy-pair"]
    roomy = Router(root, device="cpu", max_resident=4, max_resident_bytes=size * 3)
    roomy.predict("toy-single", ["a"])
    roomy.predict("toy-pair", [("a", "b")])
    assert roomy.resident() == ["toy-single", "toy-pair"]
    with pytest.raises(ValueError, match="max_resident_bytes"):
        Router(root, max_resident_bytes=0)


def test_export_killed_with_sigkill_keeps_previous_bundle_served(bundles, tmp_path):
    """A writer process killed with SIGKILL half-way: the old bundle stays whole and served, and the
    next writer removes the dead writer's temp folder."""
    import os
    import signal
    import time

    root, _ = bundles
    before = (root / "toy-single" / "model.onnx").read_bytes()
    ready = tmp_path / "ready"
    script = f"""
import time
from pathlib import Path
from doe_export import export
from doe_runtime.bundle import read_manifest
root = Path({str(root)!r})
manifest = read_manifest(root / "toy-single")
def fill(folder):
    (folder / "model.onnx").write_bytes(b"half a model")
    Path({str(ready)!r}).write_text("x")
    time.sleep(60)
export.write_bundle(root, "toy-single", fill, manifest)
"""
    writer = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "writer did not start"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".toy-single.tmp-")]
    assert len(leftovers) == 1  # SIGKILL leaves its temp folder; readers ignore it
    assert (root / "toy-single" / "model.onnx").read_bytes() == before
    assert Router(root, device="cpu").predict("toy-single", ["good"])[0].label in ("no", "yes")

    manifest = read_manifest(root / "toy-single")
    model = (root / "toy-single" / "model.onnx").read_bytes()
    tokenizer = (root / "toy-single" / "tokenizer.json").read_bytes()

    def fill(folder):
        (folder / "model.onnx").write_bytes(model)
        (folder / "tokenizer.json").write_bytes(tokenizer)
        return {}

    export.write_bundle(root, "toy-single", fill, manifest)
    assert not [p for p in root.iterdir() if p.name.startswith(".toy-single.tmp-")]


def test_thread_counts_are_configurable_and_reported(bundles):
    root, _ = bundles
    router = Router(root, device="cpu", intra_op_threads=1, inter_op_threads=1)
    info = router.info("toy-single")
    assert info["intra_op_threads"] == 1 and info["inter_op_threads"] == 1
    with pytest.raises(ValueError, match="inter_op_threads must be an int >= 1"):
        Router(root, inter_op_threads=0)
    no_arena = Router(root, device="cpu", memory_arena=False)
    assert no_arena._expert("toy-single").session.get_session_options().enable_cpu_mem_arena is False
    want = router.predict("toy-single", ["a good film"])[0].probabilities
    assert no_arena.predict("toy-single", ["a good film"])[0].probabilities == pytest.approx(want, abs=1e-6)


def test_no_pickle_on_the_load_path():
    """Bundles are JSON + ONNX protobuf + tokenizers JSON: nothing on the runtime's load path unpickles."""
    from pathlib import Path

    import doe_runtime

    sources = sorted(Path(doe_runtime.__file__).parent.glob("*.py"))
    assert len(sources) >= 4
    for source in sources:
        text = source.read_text()
        for banned in ("import pickle", "pickle.load", "allow_pickle", "np.load(", "torch.load", "joblib", "dill"):
            assert banned not in text, f"{source.name} uses {banned}"
