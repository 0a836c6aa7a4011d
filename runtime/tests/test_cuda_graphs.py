"""CUDA graphs in the Router: the buckets and the padding that replays rely on, checked where a CPU can check
them (the captured replays themselves run only on a GPU: `doe bench --suite gpu` measures and compares them)."""

import json

import numpy as np
import pytest

from doe_runtime import ConfigError, Router
from doe_runtime.cuda_graphs import DEFAULT_BUCKETS, Buckets, pad_to
from doe_runtime.tokenization import encode_batch


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([], "cuda_graph_buckets is empty"),
        ([(8, 64), (1, 32)], "must be sorted by"),
        ([(1, 32), (1, 32)], "must be sorted by .* without repeats"),
        ([(1, 0)], r"cuda_graph_buckets\[0\] must be a \(batch, length\) pair of integers >= 1"),
        ([(1, 32, 4)], r"cuda_graph_buckets\[0\]"),
        (["1x32"], r"cuda_graph_buckets\[0\]"),
    ],
)
def test_bad_bucket_lists_are_refused_naming_them(shapes, message):
    with pytest.raises(ConfigError, match=message):
        Buckets.parse(shapes)


def test_a_batch_goes_to_the_bucket_with_the_fewest_padded_tokens():
    buckets = Buckets.parse([(1, 32), (1, 128), (8, 32), (8, 64), (32, 128)])
    assert buckets.fit(1, 20) == (1, 32)
    assert buckets.fit(1, 100) == (1, 128)
    assert buckets.fit(2, 30) == (8, 32)
    assert buckets.fit(5, 40) == (8, 64)
    assert buckets.fit(9, 10) == (32, 128)
    assert buckets.fit(33, 10) is None and buckets.fit(1, 129) is None  # beyond every bucket: the normal run
    assert Buckets().shapes == DEFAULT_BUCKETS and tuple(sorted(DEFAULT_BUCKETS)) == DEFAULT_BUCKETS


def test_padding_to_a_bucket_leaves_every_answer_as_it_was(bundles):
    """What a replay computes: the batch padded to its bucket (extra rows repeat row 0, extra positions are
    masked padding). On the bundle's fp32 graph the real rows' logits are those of the unpadded batch."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from doe_runtime.tokenization import configure_tokenizer

    manifest = json.loads((bundles / "toy-single" / "manifest.json").read_text())
    spec = manifest["tokenizer"]
    tokenizer = configure_tokenizer(
        Tokenizer.from_file(str(bundles / "toy-single" / "tokenizer.json")),
        spec["max_length"],
        spec["pad_id"],
        spec["pad_token"],
    )
    session = ort.InferenceSession(str(bundles / "toy-single" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = encode_batch(tokenizer, ["good film", "a bad and dull story", "great"])
    plain = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    bucket = Buckets.parse([(8, 32)]).fit(*ids.shape)
    padded_ids, padded_mask = pad_to(ids, mask, bucket, spec["pad_id"])
    assert padded_ids.shape == (8, 32) and (padded_ids[3:] == padded_ids[0]).all() and padded_mask[:, 12:].sum() == 0
    padded = session.run(None, {"input_ids": padded_ids, "attention_mask": padded_mask})[0]
    np.testing.assert_allclose(padded[:3], plain, atol=1e-5)
    assert (padded[:3].argmax(1) == plain.argmax(1)).all() and np.isfinite(padded).all()


def test_cuda_graphs_on_cpu_are_refused_and_auto_stays_off(bundles):
    with pytest.raises(ConfigError, match=r"cuda_graphs=True asked for with device='cpu'"):
        Router(bundles, device="cpu", cuda_graphs=True)
    with pytest.raises(ConfigError, match="cuda_graphs must be 'auto', True or False"):
        Router(bundles, cuda_graphs="yes")
    with pytest.raises(ConfigError, match="cuda_graph_buckets is empty"):
        Router(bundles, graph_buckets=[])
    with pytest.raises(ConfigError, match=r"bundle 'toy-.*': CUDA graph bucket length 512 exceeds the bundle's"):
        Router(bundles, graph_buckets=[(1, 32), (1, 512)])
    router = Router(bundles, device="cpu")
    router.predict("toy-single", ["good film"])
    assert router.info("toy-single")["cuda_graphs"] == {"off": "the session runs on CPUExecutionProvider"}
    off = Router(bundles, device="cpu", cuda_graphs=False)
    assert off.info("toy-single")["cuda_graphs"] == {"off": "the session runs on CPUExecutionProvider"}
