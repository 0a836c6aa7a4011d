"""Where the int8 variant's label changes come from, on one bundle (the record behind the 98 % agreement floor).

    python benchmarks/int8_agreement.py BUNDLE TASK [--data-dir ../shared/data/glue] > out.txt

For the bundle's fp32 graph on the task's reporting split (doe build's default split): the per-channel
dynamic int8 graph, then the same with each layer and each projection type kept in fp32, then 8-bit and 4-bit
weight-only MatMulNBits; labels changed against fp32, the metric, the fp32 decision margins of the changed
items, and the latency of each form (1 thread, interleaved, the build's timing function).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from tokenizers import Tokenizer

from doe_export import evaluate, stages
from doe_export.specs import DataSpec
from doe_export.tasks import load_task
from doe_export.variants import _matmuls, quantize_int8, time_graphs

DISABLED = ["SkipLayerNormFusion"]  # as the Router serves CPU sessions
PARTS = ("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense")


def weight_only(src: Path, dst: Path, bits: int, block: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True, accuracy_level=4, algo_config=config
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("task")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    args = parser.parse_args()
    data = load_task(args.task, 0, args.data_dir)
    test = stages.Splits.of(data, DataSpec()).test
    tokenizer = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    fp32 = args.bundle / "model.onnx"
    ref = evaluate.onnx_file_logits(fp32, tokenizer, test.inputs, disabled_optimizers=DISABLED)
    top2 = np.sort(ref, 1)
    margin = top2[:, -1] - top2[:, -2]
    labels = np.asarray(test.labels)
    names = _matmuls(fp32)
    layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"layer\.(\d+)/", n))})
    exclusions = {"per-channel int8, nothing in fp32": []}
    exclusions |= {f"layer {k} in fp32": [n for n in names if f"layer.{k}/" in n] for k in layers}
    exclusions |= {f"{part} in fp32 (every layer)": [n for n in names if part in n] for part in PARTS}
    exclusions["intermediate/dense in fp32 (every layer)"] = [n for n in names if "intermediate/dense" in n]
    exclusions["FFN output/dense in fp32 (every layer)"] = [
        n for n in names if "output/dense" in n and "attention" not in n
    ]
    print(f"bundle {args.bundle}, task {args.task}: {len(test)} items of {test.name}; fp32 margins < 0.1 / 0.2 / 0.5:")
    print(f"  {(margin < 0.1).sum()} / {(margin < 0.2).sum()} / {(margin < 0.5).sum()} items")
    work = Path(tempfile.mkdtemp())
    forms = {"fp32": fp32}
    for label, exclude in exclusions.items():
        path = work / f"int8-{len(forms)}.onnx"
        quantize_int8(fp32, path, per_channel=True, exclude=exclude)
        forms[label] = path
    for bits, block in ((8, 32), (8, 128), (4, 32)):
        path = work / f"nbits{bits}-{block}.onnx"
        weight_only(fp32, path, bits, block)
        forms[f"MatMulNBits {bits}-bit, block {block} (weight-only)"] = path
    for label, path in list(forms.items())[1:]:
        logits = evaluate.onnx_file_logits(path, tokenizer, test.inputs, disabled_optimizers=DISABLED)
        changed = logits.argmax(1) != ref.argmax(1)
        right = int((logits.argmax(1)[changed] == labels[changed]).sum())
        value = evaluate.metric_value(data.metric, test.labels, logits.argmax(1).tolist())
        print(
            f"{label:50s} {changed.sum():3d} labels changed ({right} to the right one), {data.metric} {value:.4f}, "
            f"max |logit - fp32| {np.abs(logits - ref).max():.3f}, fp32 margins of the changed "
            f"{[round(float(m), 2) for m in np.sort(margin[changed])]}",
            flush=True,
        )
    fp32_value = evaluate.metric_value(data.metric, test.labels, ref.argmax(1).tolist())
    print(f"fp32 {data.metric} {fp32_value:.4f}")
    timed = ("fp32", "per-channel int8, nothing in fp32", *[k for k in forms if k.startswith("MatMulNBits")])
    for shape, cell in time_graphs({k: forms[k] for k in timed}, disabled_optimizers=DISABLED).items():
        print(f"latency {shape}, 1 thread, median ms: " + ", ".join(f"{k}: {1e3 * v:.2f}" for k, v in cell.items()))


if __name__ == "__main__":
    main()
