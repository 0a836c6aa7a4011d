"""Router on the committed tiny bundles: predictions equal a bare onnxruntime session, batching,
precision choice, LRU, threads, and a clear error for every kind of bad input."""

import subprocess
import sys

import numpy as np
import pytest

from doe_runtime import BundleError, ConfigError, DeviceError, InputError, Router, TaskNameError, UnknownTaskError
from doe_runtime.expert import choose_precision
from doe_runtime.tokenization import plan_batches


def bare_probabilities(folder, texts, precision="fp32"):
    """One item at a time (no padding at all) through a bare session and the bare tokenizer."""
    import json

    import onnxruntime as ort
    from tokenizers import Tokenizer

    manifest = json.loads((folder / "manifest.json").read_text())
    name = manifest["onnx"]["file"] if precision == "fp32" else manifest["onnx"]["variants"][precision]["file"]
    session = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    out = []
    for text in texts:
        encoding = tokenizer.encode(*text) if isinstance(text, tuple) else tokenizer.encode(text)
        ids = np.array([encoding.ids[: manifest["tokenizer"]["max_length"]]], dtype=np.int64)
        logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0].astype(np.float64)
        out.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
    return out


def test_import_is_lean():
    code = (
        "import sys, doe_runtime; print(sorted(m for m in ('torch', 'transformers', 'doe_export', 'onnx', "
        "'fastapi', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_predictions_equal_a_bare_session(bundles):
    router = Router(bundles, device="cpu", precision="fp32", batch_size=2)
    assert router.tasks == ["toy-pair", "toy-single"]
    texts = ["good", "a long dull story with a dark ending and bad music", "great cast", "poor", "Film!"]
    preds = router.predict("toy-single", texts)
    want = bare_probabilities(bundles / "toy-single", texts)
    assert len(preds) == len(texts)
    for pred, probs in zip(preds, want):
        assert pred.label == ["no", "yes"][int(np.argmax(probs))] and pred.label_id == int(np.argmax(probs))
        np.testing.assert_allclose(list(pred.probabilities.values()), probs, atol=1e-6)
    pairs = [("a man plays", "someone plays music"), ("the film", "is not good")]
    got = router.predict("toy-pair", pairs)
    for pred, probs in zip(got, bare_probabilities(bundles / "toy-pair", pairs)):
        assert list(pred.probabilities) == ["entailment", "neutral", "contradiction"]
        np.testing.assert_allclose(list(pred.probabilities.values()), probs, atol=1e-6)
    assert router.provider("toy-single") == "CPUExecutionProvider"
    assert router.predict("toy-single", []) == []


def test_truncates_to_manifest_max_length(bundles):
    router = Router(bundles, device="cpu")
    expert = router._expert("toy-single")
    feeds = expert.encode(["good " * 500, "short"])
    assert feeds["input_ids"].shape == (2, 16)
    assert feeds["attention_mask"][1].sum() == 3  # [CLS] short [SEP]: padded to the longest, not beyond
    assert len(router.predict("toy-single", ["x" * 100_000])) == 1


def test_precision_choice_and_variants(bundles, edit_manifest):
    texts = ["a good film", "a bad film", "fine", "music " * 30]
    auto = Router(bundles, device="cpu")
    assert auto.info("toy-single")["precision"] == "int8"  # CPU + validated int8 variant: int8
    fp32 = Router(bundles, device="cpu", precision="fp32")
    fp16 = Router(bundles, device="cpu", precision="fp16")
    assert fp32.info("toy-single")["precision"] == "fp32" and fp16.info("toy-single")["precision"] == "fp16"
    bound = Router(bundles, device="cpu", precision="fp32", io_binding=True)
    assert bound.info("toy-single")["io_binding"] is True and fp32.info("toy-single")["io_binding"] is False
    want = fp32.predict("toy-single", texts)
    for precision, router, tolerance in (("int8", auto, 5e-2), ("fp16", fp16, 2e-2), ("fp32", bound, 1e-6)):
        got = router.predict("toy-single", texts)
        for a, b in zip(want, got):
            assert a.probabilities == pytest.approx(b.probabilities, abs=tolerance), precision
    # the variant's own file serves: equal to a bare session of that file, within the spread that padded
    # batches give against single items (reduced precision; int8 quantizes activations per batch)
    for precision, tolerance in (("fp16", 1e-2), ("int8", 1e-2)):
        expected = bare_probabilities(bundles / "toy-single", texts, precision)
        got = Router(bundles, device="cpu", precision=precision).predict("toy-single", texts)
        for pred, probs in zip(got, expected):
            np.testing.assert_allclose(list(pred.probabilities.values()), probs, atol=tolerance)
    with pytest.raises(ConfigError, match="precision must be one of"):
        Router(bundles, precision="int4")

    (bundles / "toy-single" / "model.fp16.onnx").write_bytes(b"broken")
    with pytest.raises(BundleError, match=r"model\.fp16\.onnx: sha256 mismatch"):
        Router(bundles, device="cpu", precision="fp16").predict("toy-single", texts)
    edit_manifest(bundles / "toy-single", lambda m: m["onnx"].pop("variants"))
    with pytest.raises(BundleError, match=r"no int8 variant \(it has: fp32\)"):
        Router(bundles, device="cpu", precision="int8").predict("toy-single", texts)
    assert Router(bundles, device="cpu").info("toy-single")["precision"] == "fp32"  # auto without variants


def test_choose_precision_rules():
    from doe_runtime.manifest import Variant

    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    both = {"fp16": Variant("a", "0" * 64), "int8": Variant("b", "0" * 64)}
    assert choose_precision("auto", cuda, both) == "fp16"
    assert choose_precision("auto", cpu, both) == "int8"
    assert choose_precision("auto", cpu, {"fp16": both["fp16"]}) == "fp32"
    assert choose_precision("auto", cuda, {"int8": both["int8"]}) == "fp32"
    assert choose_precision("fp16", cpu, {"fp16": both["fp16"]}) == "fp16"
    faster = Variant("b", "0" * 64, speed={"vs_fp32": {"8x32": 1.9, "8x128": 1.7}})
    slower = Variant("b", "0" * 64, speed={"vs_fp32": {"8x32": 1.2, "8x128": 0.9}})
    assert choose_precision("auto", cpu, {"int8": faster}) == "int8"
    assert choose_precision("auto", cpu, {"int8": slower}) == "fp32"  # measured slower where it was built
    assert choose_precision("int8", cpu, {"int8": slower}) == "int8"  # asked for: served


def test_unknown_task_and_bad_names(bundles):
    router = Router(bundles, device="cpu")
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'; known tasks: toy-pair, toy-single") as caught:
        router.predict("nope", ["x"])
    assert str(bundles) not in str(caught.value)  # no local path in what a client may see
    for name in ("../toy-single", "Toy", ".", "a" * 129, "", 5):
        with pytest.raises(TaskNameError, match="task name"):
            router.predict(name, ["x"])


def test_wrong_input_shapes_are_named(bundles):
    router = Router(bundles, device="cpu")
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
    with open(bundles / "toy-single" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    (bundles / "toy-pair" / "tokenizer.json").write_text("{}")
    router = Router(bundles, device="cpu", precision="fp32")
    with pytest.raises(BundleError, match=r"toy-single/model.onnx: sha256 mismatch"):
        router.predict("toy-single", ["x"])
    with pytest.raises(BundleError, match=r"toy-pair/tokenizer.json: sha256 mismatch"):
        router.predict("toy-pair", [("a", "b")])


def test_labels_that_do_not_fit_the_model_are_refused_at_load(bundles, edit_manifest):
    edit_manifest(bundles / "toy-single", lambda m: m["task"].update(labels=["a", "b", "c"]))
    with pytest.raises(BundleError, match=r"'logits' has 2 columns but task.labels .* names 3 labels"):
        Router(bundles, device="cpu").predict("toy-single", ["x"])


def test_lru_keeps_at_most_max_resident(bundles):
    router = Router(bundles, device="cpu", max_resident=1)
    router.predict("toy-single", ["x"])
    router.predict("toy-pair", [("a", "b")])
    assert router.resident() == ["toy-pair"]
    router.predict("toy-single", ["x"])
    assert router.resident() == ["toy-single"]


def test_max_resident_bytes_evicts_least_recently_used(bundles):
    size = (bundles / "toy-single" / "model.int8.onnx").stat().st_size
    router = Router(bundles, device="cpu", max_resident=4, max_resident_bytes=int(size * 1.5))
    router.predict("toy-single", ["a"])
    router.predict("toy-pair", [("a", "b")])
    assert router.resident() == ["toy-pair"]
    roomy = Router(bundles, device="cpu", max_resident=4, max_resident_bytes=size * 3)
    roomy.predict("toy-single", ["a"])
    roomy.predict("toy-pair", [("a", "b")])
    assert roomy.resident() == ["toy-single", "toy-pair"]
    with pytest.raises(ConfigError, match="max_resident_bytes"):
        Router(bundles, max_resident_bytes=0)


def test_predict_is_thread_safe(bundles, run_threads):
    router = Router(bundles, device="cpu", max_resident=1)
    texts = ["good film", "bad plot", "great music", "dull"] * 4
    expected = [p.probabilities for p in Router(bundles, device="cpu").predict("toy-single", texts)]
    outputs = []

    def worker(index):
        for _ in range(5):
            if index % 2:
                router.predict("toy-pair", [("a", "b")])  # forces evictions between threads
            outputs.append([p.probabilities for p in router.predict("toy-single", texts)])

    assert run_threads(worker, 6) == []
    assert len(outputs) == 30 and all(out == expected for out in outputs)


def test_cuda_demanded_without_cuda_is_an_error(bundles):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider; the error path cannot happen here")
    with pytest.raises(DeviceError, match="device='cuda' demanded"):
        Router(bundles, device="cuda").predict("toy-single", ["x"])
    with pytest.raises(ConfigError, match="device must be one of"):
        Router(bundles, device="tpu")


def test_plan_batches_sorts_and_respects_budgets():
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
    router = Router(bundles, device="cpu", batch_size=2, precision="fp32")
    texts = ["good " * 20, "bad", "great film " * 5, "dull", "fine"]
    expected = [
        p.probabilities
        for p in Router(bundles, device="cpu", batch_size=1, precision="fp32").predict("toy-single", texts)
    ]
    expert = router._expert("toy-single")
    shapes = []
    original = expert.run
    monkeypatch.setattr(expert, "run", lambda ids, mask: shapes.append(ids.shape) or original(ids, mask))
    got = router.predict("toy-single", texts)
    for have, want in zip(got, expected):
        assert have.probabilities == pytest.approx(want, abs=1e-6)
    assert [s[1] for s in shapes] == [3, 12, 16]  # [CLS] w [SEP] x2, then 10+2, then 20 words cut to 16
    assert sum(b for b, _ in shapes) == 5 and all(b <= 2 for b, _ in shapes)
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        Router(bundles, max_batch_tokens=0)
    unsorted = Router(bundles, device="cpu", batch_size=2, sort_by_length=False, precision="fp32")
    for have, want in zip(unsorted.predict("toy-single", texts), expected):
        assert have.probabilities == pytest.approx(want, abs=1e-6)


def test_thread_counts_are_configurable_and_reported(bundles):
    router = Router(bundles, device="cpu", intra_op_threads=1, inter_op_threads=1)
    info = router.info("toy-single")
    assert info["intra_op_threads"] == 1 and info["inter_op_threads"] == 1
    with pytest.raises(ConfigError, match="inter_op_threads must be an int >= 1"):
        Router(bundles, inter_op_threads=0)
    no_arena = Router(bundles, device="cpu", memory_arena=False)
    assert no_arena._expert("toy-single").session.get_session_options().enable_cpu_mem_arena is False
    want = router.predict("toy-single", ["a good film"])[0].probabilities
    assert no_arena.predict("toy-single", ["a good film"])[0].probabilities == pytest.approx(want, abs=1e-6)


def test_no_pickle_on_the_load_path():
    """Bundles are JSON + ONNX protobuf + tokenizers JSON: nothing on the runtime's load path unpickles."""
    from pathlib import Path

    import doe_runtime

    sources = sorted(Path(doe_runtime.__file__).parent.glob("*.py"))
    assert len(sources) >= 6
    for source in sources:
        text = source.read_text()
        for banned in ("import pickle", "pickle.load", "allow_pickle", "np.load(", "torch.load", "joblib", "dill"):
            assert banned not in text, f"{source.name} uses {banned}"


def test_session_settings_of_the_manifest_are_applied_per_provider(bundles, edit_manifest, monkeypatch):
    import onnxruntime as ort

    edit_manifest(
        bundles / "toy-single",
        lambda m: m["onnx"].update(
            session={
                "CPUExecutionProvider": {"disabled_optimizers": ["SkipLayerNormFusion"]},
                "CUDAExecutionProvider": {"disabled_optimizers": ["SomethingElse"]},
            }
        ),
    )
    seen = []
    real = ort.InferenceSession

    def spy(path, sess_options=None, providers=None, **kwargs):
        seen.append((path.rsplit("/", 1)[-1], kwargs.get("disabled_optimizers")))
        return real(path, sess_options=sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    Router(bundles, device="cpu").predict("toy-single", ["good"])
    Router(bundles, device="cpu").predict("toy-pair", [("a", "b")])
    assert seen == [("model.int8.onnx", ["SkipLayerNormFusion"]), ("model.int8.onnx", None)]
