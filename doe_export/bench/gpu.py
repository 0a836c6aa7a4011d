"""GPU check (run by ``benchmarks/gpu_check.sh`` on a machine with CUDA): dense vs pruned experts
across batch x tokens, fp32 and fp16, interleaved, timed with CUDA events.

The lent GPU machine has torch and the CPU build of onnxruntime but not onnxruntime-gpu (its wheel
is larger than what can be carried there), so the ONNX Runtime CUDA provider is used only if it is
present; otherwise the PyTorch CUDA path of the same TaskModel (soft prompt + backbone + head) is
measured as a *proxy*, and every record says which path it is. The weights are random (the model
files cannot be carried either): the speed of a graph does not depend on their values.

    python -m doe_export.bench.gpu --out results/ [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from . import common

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522,
              max_position_embeddings=512)


def build_models(tiny: bool, prompt: int):
    import torch
    from transformers import AutoModel, BertConfig

    from ..prune import PruneConfig, prune_model
    from ..taskmodel import TaskModel

    torch.manual_seed(0)
    shape = dict(MINILM, num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=96) if tiny else MINILM
    backbone = AutoModel.from_config(BertConfig(**shape)).eval()
    dense = TaskModel(backbone, num_labels=2, prompt_length=prompt).eval()
    models = {"dense": dense}
    generator = torch.Generator().manual_seed(0)
    for name, kind, rate, head_rate in (("ffn-0.65", "ffn", 0.65, None), ("both-0.65", "both", 0.65, 0.65)):
        model = copy.deepcopy(dense)
        layers = model.spec.layer_list(model.backbone)
        ffn = [torch.rand(shape["intermediate_size"], generator=generator) for _ in layers]
        heads = [torch.rand(shape["num_attention_heads"], generator=generator) for _ in layers]
        report = prune_model(model, kind, PruneConfig(rate), ffn, heads, head_rate)
        models[name] = model
        models[name].report = report
    return models, shape


def time_cuda(runners: dict, repeats: int) -> dict[str, list[float]]:
    """Interleaved, order rotated each repeat; seconds per call from CUDA events."""
    import torch

    names = list(runners)
    for name in names:  # warm-up (kernels, cuBLAS handles, autotuning)
        for _ in range(3):
            runners[name]()
    torch.cuda.synchronize()
    times = {name: [] for name in names}
    for index in range(repeats):
        for name in names[index % len(names):] + names[: index % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runners[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3)
    return times


def time_cpu(runners: dict, repeats: int) -> dict[str, list[float]]:
    return common.paired_timing(runners, repeats, warmup=1)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m doe_export.bench.gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model and grid (checks the script on a CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompt = 20
    batches, tokens = ((1, 4), (16, 32)) if args.quick else ((1, 8, 32, 128, 512), (16, 64, 128, 256, 492))
    models, shape = build_models(args.quick, prompt)
    try:
        import onnxruntime as ort

        ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        ort_version = ort.__version__
    except ImportError:
        ort_cuda, ort_version = False, None
    header = common.environment([torch.get_num_threads()], ["torch-" + args.device])
    header.update(suite="gpu", device=args.device, ort_cuda_provider=ort_cuda, onnxruntime=ort_version,
                  path="pytorch (proxy: onnxruntime-gpu not available)" if not ort_cuda else "pytorch + onnxruntime-cuda",
                  gpu=torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                  torch=torch.__version__, model_shape=shape, random_weights=True)
    records = [header]
    timer = time_cuda if args.device == "cuda" else time_cpu
    for precision in ("fp32", "fp16") if args.device == "cuda" else ("fp32",):
        dtype = torch.float16 if precision == "fp16" else torch.float32
        placed = {name: copy.deepcopy(m).to(args.device, dtype) for name, m in models.items()}
        for batch in batches:
            for length in tokens:
                ids = torch.randint(1000, shape["vocab_size"], (batch, length), device=args.device)
                mask = torch.ones_like(ids)

                def runner(model):
                    def run():
                        with torch.inference_mode():
                            model(ids, mask)
                    return run

                try:
                    times = timer({name: runner(m) for name, m in placed.items()}, args.repeats)
                except torch.OutOfMemoryError:
                    records.append({"kind": "skipped", "precision": precision, "batch": batch, "tokens": length,
                                    "reason": "out of memory"})
                    continue
                for name in placed:
                    if name == "dense":
                        continue
                    report = models[name].report
                    bound = common.model_bound(shape["hidden_size"], report["ffn_widths_before"],
                                               report["head_counts_before"], report["ffn_widths"],
                                               report["head_counts"], length + prompt)
                    speedup = common.quantiles(common.ratios(times, "dense", name))
                    records.append({"kind": "gpu", "path": "pytorch", "device": args.device, "precision": precision,
                                    "expert": name, "batch": batch, "tokens": length,
                                    "dense_latency_s": common.quantiles(times["dense"]),
                                    "expert_latency_s": common.quantiles(times[name]), "speedup": speedup,
                                    "bound": bound, "share_of_bound": speedup["median"] / bound})
                print(f"[gpu] {precision} {batch}x{length}: " + ", ".join(
                    f"{r['expert']} x{r['speedup']['median']:.2f}" for r in records[-2:] if r.get("kind") == "gpu"),
                    file=sys.stderr, flush=True)
        del placed
    path = out / "gpu.jsonl"
    common.write_jsonl(path, records)
    print(json.dumps({"records": len(records) - 1, "path": str(path), "elapsed": time.process_time()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
