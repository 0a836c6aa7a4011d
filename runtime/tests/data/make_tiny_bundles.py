"""Regenerate the tiny bundles under ``runtime/tests/data/bundles/`` (committed, a few KB each).

    python runtime/tests/data/make_tiny_bundles.py

Needs ``onnx`` (and onnxruntime's quantization and float16 tools), which the full dev install
has; the runtime tests themselves only read the files, so they run with ``doe-runtime`` alone.

Each bundle is a complete, valid bundle of schema version 1 — the same contract ``doe build``
writes — around a graph small enough to read in one sitting::

    input_ids [B, T] --Gather(E [V, H])--> x [B, T, H]
    x + W2 · tanh(W1 · x + b1) + b2          (a residual FFN of width F)
    mean over real positions (attention_mask) -> [B, H] -> head -> logits [B, K]

``toy-single`` (2 labels, single texts) and ``toy-pair`` (3 labels, text pairs) share the
tokenizer: a word-level vocabulary with [CLS]/[SEP] templates, like BERT's. Each has the fp32
graph, an fp16 variant (``keep_io_types``) and an int8 variant (``quantize_dynamic``), all
recorded with their sha256 in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "bundles"
WORDS = (
    "good bad great awful fine poor movie plot actor scene music long short funny dull bright dark story "
    "ending start middle cast film a the man woman plays sings someone music is not and of"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
HIDDEN, FFN = 8, 12


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(SPECIALS + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.save(str(path))
    return len(vocab)


def make_graph(path: Path, vocab: int, labels: int, seed: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    init = {
        "embeddings": rng.normal(0, 0.5, (vocab, HIDDEN)),
        "ffn_up": rng.normal(0, 0.5, (HIDDEN, FFN)),
        "ffn_up_bias": rng.normal(0, 0.1, FFN),
        "ffn_down": rng.normal(0, 0.5, (FFN, HIDDEN)),
        "ffn_down_bias": rng.normal(0, 0.1, HIDDEN),
        "head": rng.normal(0, 1.0, (HIDDEN, labels)),
        "head_bias": rng.normal(0, 0.1, labels),
        "one": np.array(1.0),
        "axis1": np.array([1], dtype=np.int64),
        "axis_last": np.array([-1], dtype=np.int64),
    }
    tensors = [
        numpy_helper.from_array(v.astype(np.int64 if v.dtype == np.int64 else np.float32), k) for k, v in init.items()
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["embeddings", "input_ids"], ["x"]),  # [B, T, H]
        node("MatMul", ["x", "ffn_up"], ["up"]),
        node("Add", ["up", "ffn_up_bias"], ["up_b"]),
        node("Tanh", ["up_b"], ["act"]),  # [B, T, F]
        node("MatMul", ["act", "ffn_down"], ["down"]),
        node("Add", ["down", "ffn_down_bias"], ["down_b"]),
        node("Add", ["x", "down_b"], ["hidden"]),  # residual, [B, T, H]
        node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["mask_f", "axis_last"], ["mask3"]),  # [B, T, 1]
        node("Mul", ["hidden", "mask3"], ["masked"]),
        node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),  # [B, H]
        node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),  # [B, 1]
        node("Max", ["count", "one"], ["count_safe"]),
        node("Div", ["summed", "count_safe"], ["pooled"]),
        node("MatMul", ["pooled", "head"], ["head_out"]),
        node("Add", ["head_out", "head_bias"], ["logits"]),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask")
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels])]
    graph = helper.make_graph(nodes, "tiny_expert", inputs, outputs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="make_tiny_bundles")
    model.ir_version = 9  # readable by onnxruntime >= 1.16
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def make_variants(folder: Path) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(
        convert_float_to_float16(onnx.load(str(folder / "model.onnx")), keep_io_types=True),
        str(folder / "model.fp16.onnx"),
    )
    quantize_dynamic(str(folder / "model.onnx"), str(folder / "model.int8.onnx"), weight_type=QuantType.QInt8)
    out = {}
    for precision in ("fp16", "int8"):
        name = f"model.{precision}.onnx"
        out[precision] = {
            "file": name,
            "sha256": sha256(folder / name),
            "precision": precision,
            "validation": {"label_agreement": 1.0, "note": "generated test bundle"},
            "quality": {},
            "speed": {},
        }
    return out


def manifest(name: str, kind: str, labels: list[str], folder: Path, variants: dict) -> dict:
    return {
        "schema_version": 1,
        "task": {"name": name, "input": kind, "labels": labels, "metric": "accuracy"},
        "base_model": {"name": "tiny generated graph", "sha256": None, "model_type": "none"},
        "architecture": {
            "family": "tiny",
            "num_layers": 1,
            "hidden_size": HIDDEN,
            "ffn_widths": [FFN],
            "ffn_widths_dense": [2 * FFN],
            "num_heads": [0],
            "pooling": "mean",
        },
        "adaptation": {"mode": "finetune", "prompt_length": 0},
        "pruning": {
            "method": "doe",
            "rate": 0.5,
            "layer_types": ["ffn"],
            "budget": "per-layer",
            "params_before": 1000,
            "params_after": 800,
        },
        "onnx": {
            "file": "model.onnx",
            "sha256": sha256(folder / "model.onnx"),
            "opset": 18,
            "precision": "fp32",
            "inputs": [
                {"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in ("input_ids", "attention_mask")
            ],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(labels)]}],
            "variants": variants,
            "rewrites": {},
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": sha256(folder / "tokenizer.json"),
            "max_length": 16,
            "truncation": "longest_first",
            "padding": "longest in batch, right",
            "pad_id": 0,
            "pad_token": "[PAD]",
        },
        "validation": {"shapes": [[1, 4], [3, 9]], "max_abs_diff": 0.0, "label_agreement": 1.0},
        "quality": {"metric": "accuracy", "split": "none (generated weights)", "size": 0},
        "data": {"source": "generated"},
        "versions": {"generator": "runtime/tests/data/make_tiny_bundles.py"},
        "created": "2026-11-29T00:00:00+00:00",
    }


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    for seed, (name, kind, labels) in enumerate(
        (("toy-single", "single", ["no", "yes"]), ("toy-pair", "pair", ["entailment", "neutral", "contradiction"]))
    ):
        folder = OUT / name
        folder.mkdir(parents=True)
        vocab = make_tokenizer(folder / "tokenizer.json")
        make_graph(folder / "model.onnx", vocab, len(labels), seed)
        variants = make_variants(folder)
        (folder / "manifest.json").write_text(json.dumps(manifest(name, kind, labels, folder, variants), indent=2))
        sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
        print(f"{folder}: {sizes}")


if __name__ == "__main__":
    main()
