"""Weights shared between experts of one backbone: one copy per process, answers bit-identical to
unshared sessions, freed with the last expert that uses them, refused when a hash does not match."""

import gc
import hashlib
import shutil

import numpy as np
import pytest

from doe_runtime import BundleError, Router
from doe_runtime.onnxfile import DTYPE_NAMES, OnnxFormatError, read_initializers

TEXTS = ["a good film", "the plot is dull", "music", "bad " * 10]


def table(path):
    """Every initializer of the graph with the sha256 of its raw bytes (what the exporter records)."""
    return [
        {
            "name": name,
            "sha256": hashlib.sha256(t.raw).hexdigest(),
            "bytes": len(t.raw),
            "dtype": DTYPE_NAMES[t.data_type],
            "shape": list(t.dims),
        }
        for name, t in sorted(read_initializers(path).items())
    ]


@pytest.fixture
def shared_bundles(bundles, edit_manifest):
    """toy-single, a second expert of the same base (toy-twin: the same graph, its own task name) and a
    third of another base model (toy-other)."""
    for name, base in (("toy-twin", "1" * 64), ("toy-other", "2" * 64)):
        shutil.copytree(bundles / "toy-single", bundles / name)
        edit_manifest(
            bundles / name,
            lambda m, name=name, base=base: (m["task"].update(name=name), m["base_model"].update(sha256=base)),
        )
    edit_manifest(bundles / "toy-single", lambda m: m["base_model"].update(sha256="1" * 64))
    for name in ("toy-single", "toy-twin", "toy-other"):
        folder = bundles / name
        edit_manifest(
            folder,
            lambda m, folder=folder: (
                m["onnx"].update(initializers=table(folder / "model.onnx")),
                m["onnx"]["variants"]["int8"].update(initializers=table(folder / "model.int8.onnx")),
            ),
        )
    return bundles


def test_reader_gives_the_tensors_onnxruntime_uses(bundles):
    """Every initializer read here, handed back to onnxruntime, reproduces the outputs bit for bit."""
    import onnxruntime as ort

    path = bundles / "toy-single" / "model.onnx"
    tensors = read_initializers(path)
    assert tensors["embeddings"].dims[1] == 8 and DTYPE_NAMES[tensors["embeddings"].data_type] == "float32"
    assert {"head", "ffn_up", "ffn_down"} <= set(tensors)
    ids = np.array([[2, 7, 9, 3]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    options = ort.SessionOptions()
    values = {
        name: ort.OrtValue.ortvalue_from_numpy(t.array() * 0) for name, t in tensors.items() if name == "head"
    }  # zeroed head: the override is really used
    for name, value in values.items():
        options.add_initializer(name, value)
    zeroed = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert not np.array_equal(plain, zeroed)
    with pytest.raises(OnnxFormatError):
        read_initializers(bundles / "toy-single" / "tokenizer.json")


def test_experts_of_one_base_share_tensors_and_answer_the_same(shared_bundles):
    plain = Router(shared_bundles, device="cpu", share_weights=False, precision="fp32")
    shared = Router(shared_bundles, device="cpu", precision="fp32")
    want = {t: [p.probabilities for p in plain.predict(t, TEXTS)] for t in ("toy-single", "toy-twin", "toy-other")}
    for task in ("toy-single", "toy-twin", "toy-other"):
        assert [p.probabilities for p in shared.predict(task, TEXTS)] == want[task]  # bit-identical
    count = len(read_initializers(shared_bundles / "toy-single" / "model.onnx"))
    assert len(shared._pool) == 2 * count  # toy-single and toy-twin hold one copy; toy-other (another base) its own
    twin = shared.info("toy-twin")
    assert twin["shared_bytes"] > 0 and twin["own_bytes"] == twin["model_bytes"] - twin["shared_bytes"]
    assert shared.info("toy-other")["shared_bytes"] == 0  # the same bytes, another base model: never shared
    assert plain.info("toy-twin")["shared_bytes"] == 0


def test_shared_tensors_are_freed_with_the_last_expert_and_counted_once(shared_bundles):
    router = Router(shared_bundles, device="cpu", max_resident=1)  # auto on CPU: the int8 graphs
    router.predict("toy-single", TEXTS)
    count = len(router._pool)
    assert count == len(read_initializers(shared_bundles / "toy-single" / "model.int8.onnx"))
    router.predict("toy-other", TEXTS)  # evicts toy-single: its tensors go with it
    gc.collect()
    assert len(router._pool) == count and router.resident() == ["toy-other"]
    probe = Router(shared_bundles, device="cpu")
    probe.predict("toy-single", TEXTS)
    probe.predict("toy-twin", TEXTS)
    both, files = probe._resident_bytes(), 2 * (shared_bundles / "toy-single" / "model.int8.onnx").stat().st_size
    assert both < files  # what the two share counted once
    for share, resident in ((True, ["toy-single", "toy-twin"]), (False, ["toy-twin"])):
        capped = Router(shared_bundles, device="cpu", max_resident_bytes=(both + files) // 2, share_weights=share)
        capped.predict("toy-single", TEXTS)
        capped.predict("toy-twin", TEXTS)
        assert capped.resident() == resident


def test_a_shared_tensor_that_does_not_match_its_hash_is_refused(shared_bundles, edit_manifest):
    def corrupt(manifest):
        manifest["onnx"]["initializers"][0]["sha256"] = "0" * 64

    edit_manifest(shared_bundles / "toy-twin", corrupt)
    name = table(shared_bundles / "toy-twin" / "model.onnx")[0]["name"]
    with pytest.raises(BundleError, match=rf"toy-twin/model.onnx: initializer '{name}': sha256 mismatch"):
        Router(shared_bundles, device="cpu", precision="fp32").predict("toy-twin", TEXTS)


def test_tensors_that_sessions_repack_are_not_pooled(shared_bundles, edit_manifest):
    """A MatMul's weight is re-packed by every session: pooling it would keep one more copy, not one less."""
    from doe_runtime.sharing import shareable

    def mark(manifest):
        for entry in manifest["onnx"]["initializers"]:
            entry["consumers"] = ["Gather"] if entry["name"] == "embeddings" else ["MatMul"]

    edit_manifest(shared_bundles / "toy-single", mark)
    edit_manifest(shared_bundles / "toy-twin", mark)
    router = Router(shared_bundles, device="cpu", precision="fp32")
    router.predict("toy-single", TEXTS)
    router.predict("toy-twin", TEXTS)
    assert len(router._pool) == 1  # the embedding table only, once for both
    assert shareable({"consumers": ["Gather", "Add"]}) and not shareable({"consumers": ["Gather", "MatMul"]})
    assert shareable({})  # manifests written before consumers were recorded
