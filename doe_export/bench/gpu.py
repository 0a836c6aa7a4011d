"""``doe bench --suite gpu``: the replace comparison on onnxruntime's CUDA provider.

For MiniLM's and BERT-base's shapes (random weights: a graph's speed does not depend on the values), bundles
are built by ``doe build``'s own code (``build_task``: data-free (random) attribution, aligned widths, the fused fp16
CUDA variant) and timed, tokenization included, on batch x tokens cells against what a GPU user runs today:

- ``pytorch eager fp16 (sdpa)``: the dense model in PyTorch, fp16, SDPA attention;
- ``ort dense fp16 (plain)`` / ``ort dense fp16 (fused)``: the dense model's fp16 graphs in onnxruntime
  (TorchScript form; dynamo form with fused attention), served without CUDA graphs — the best of the two per
  cell is "the best onnxruntime fp16 dense graph";
- ``expert ffn (shipped)`` / ``expert ffn+heads (shipped)``: the bundles through ``Router(device="cuda")`` with
  its defaults (fp16 fused variant, IOBinding, CUDA graphs for the buckets), and the FFN expert without CUDA
  graphs as context.

Every candidate answers the same texts (each exactly ``tokens`` tokens long) in interleaved, rotated order;
the report gives p50/p99, items/s, speed-ups, the FLOP bound and a verdict per cell. ``--quick`` runs the same
code on a tiny model with the CPU provider (the tests do); without ``--quick`` and without a CUDA provider the
suite says what is missing and how to get it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..console import log
from ..errors import ConfigError
from ..specs import Fp16Form, LayerTypes
from . import common
from .workbench import SuiteConfig

SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
# bundle kind -> (FFN rate, layer types, fp16 form): the dense model's two fp16 forms and the two shipped experts
KINDS = {
    "dense-plain": (0.0, LayerTypes.FFN, Fp16Form.PLAIN),
    "dense-fused": (0.0, LayerTypes.FFN, Fp16Form.FUSED),
    "expert-ffn": (0.65, LayerTypes.FFN, Fp16Form.FUSED),
    "expert-both": (0.65, LayerTypes.BOTH, Fp16Form.FUSED),
}
EAGER = "pytorch eager fp16 (sdpa)"
DENSE_ORT = ("ort dense fp16 (plain)", "ort dense fp16 (fused)")
EXPERTS = ("expert ffn (shipped)", "expert ffn+heads (shipped)")
NO_GRAPHS = "expert ffn, no CUDA graphs"
WORDS = "the a of and to in is it that was for on are as with his they at be this from".split()


def check_cuda() -> None:
    """Refuse to run the real suite without a CUDA provider and a CUDA torch, saying how to get them."""
    import onnxruntime as ort

    missing = []
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        missing.append(f"onnxruntime's CUDAExecutionProvider (available: {ort.get_available_providers()})")
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA device visible to torch")
    except ImportError:
        missing.append("torch")
    if missing:
        raise ConfigError(
            f"the gpu suite needs {' and '.join(missing)}: install doe-runtime[gpu] (onnxruntime-gpu) instead of "
            "[cpu] on a GPU machine; on the lent GPU machine source .gpu-ort/device-env.sh first "
            "(../shared/tools/ort-gpu/README.md, benchmarks/gpu_check.sh). --quick runs the suite on the CPU"
        )


def _loaded(name: str, tokenizer_dir: Path | None, seed: int):
    """A random-weight backbone of the named shape with a BERT tokenizer (the packaged MiniLM one by default)."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from ..loading import LoadedModel, packaged_minilm_dir, state_sha256

    torch.manual_seed(seed)
    shape: dict[str, Any] = dict(SHAPES[name], vocab_size=30522, max_position_embeddings=512)
    config = BertConfig(**shape)
    backbone = AutoModel.from_config(config).eval()
    folder = tokenizer_dir or packaged_minilm_dir()
    return LoadedModel(
        backbone, AutoTokenizer.from_pretrained(folder), f"random {name}", "config", state_sha256(backbone)
    )


def build_one(name: str, kind: str, root: str, tokenizer_dir: str | None, max_length: int) -> str:
    """One bundle of ``name``'s shape (module level: it also runs in a worker process); its folder."""
    from ..pipeline import build_task
    from ..specs import AdaptSpec, BuildConfig, DataSpec, ExportSpec, PruneSpec, RecoverySpec
    from ..tasks import synthetic_task

    rate, layer_types, form = KINDS[kind]
    loaded = _loaded(name, Path(tokenizer_dir) if tokenizer_dir else None, seed=0)
    config = BuildConfig(
        out_dir=root,
        data=DataSpec(max_eval=32, max_length=max_length),
        adapt=AdaptSpec(epochs=0),
        prune=PruneSpec(scorer="random", rate=rate, layer_types=layer_types, calib_examples=16),
        recovery=RecoverySpec(epochs=0),
        export=ExportSpec(int8=False, fp16_form=form, measure_speed=False),
        progress=False,
    )
    return build_task(config, loaded, synthetic_task(f"{name}-{kind}")).bundle


def build_bundles(config: SuiteConfig, root: Path, name: str, workers: int) -> None:
    """The four bundles of one shape, in parallel worker processes where there are cores for them."""
    import concurrent.futures
    import multiprocessing

    max_length = max(config.gpu_tokens)
    jobs = [(name, kind, str(root), config.gpu_tokenizer_dir, max_length) for kind in KINDS]
    if workers <= 1:
        for job in jobs:
            build_one(*job)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for future in concurrent.futures.as_completed([pool.submit(build_one, *job) for job in jobs]):
            log(f"[gpu] built {future.result()}")


def texts_of(tokenizer, batch: int, tokens: int) -> list[str]:
    """``batch`` texts that each tokenize to exactly ``tokens`` tokens ([CLS] and [SEP] included)."""
    words = [WORDS[i % len(WORDS)] for i in range(max(0, tokens - 2))]
    text = " ".join(words)
    got = len(tokenizer(text)["input_ids"])
    if got != tokens:
        raise ConfigError(f"the gpu suite's texts tokenize to {got} tokens, not {tokens}; use another tokenizer")
    return [text] * batch


class _Eager:
    """The dense model in PyTorch (fp16 + SDPA on CUDA; fp32 on the CPU), tokenization included."""

    def __init__(self, loaded, device: str):
        import torch

        from ..taskmodel import TaskModel

        self.torch, self.device, self.tokenizer = torch, device, loaded.hf_tokenizer
        backbone = loaded.backbone
        backbone.set_attn_implementation("sdpa")
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.model = TaskModel(backbone, num_labels=2, sep_token_id=self.tokenizer.sep_token_id).eval()
        self.model.to(device, dtype)

    def __call__(self, texts: list[str]):
        torch = self.torch
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device))
            return torch.softmax(logits.float(), -1).cpu()


def candidates(name: str, root: Path, device: str, loaded) -> tuple[dict[str, Callable[[list[str]], Any]], Any]:
    """Every candidate as a callable on a list of texts, and the Router that serves the shipped experts."""
    from doe_runtime import Router

    served = Router(root, device=device, max_resident=8)  # the defaults: fp16 on CUDA, CUDA graphs, IOBinding
    plain = Router(root, device=device, max_resident=8, cuda_graphs=False)

    def through(router, task: str) -> Callable[[list[str]], Any]:
        return lambda texts: router.predict(task, texts)

    runners: dict[str, Callable[[list[str]], Any]] = {EAGER: _Eager(loaded, device)}
    for label, kind in zip(DENSE_ORT, ("dense-plain", "dense-fused")):
        runners[label] = through(plain, f"{name}-{kind}")
    for label, kind in zip(EXPERTS, ("expert-ffn", "expert-both")):
        runners[label] = through(served, f"{name}-{kind}")
    runners[NO_GRAPHS] = through(plain, f"{name}-expert-ffn")
    return runners, served


def time_cell(runners: dict, texts: list[str], repeats: int) -> dict[str, list[float]]:
    """Every runner on the same texts, interleaved with the order rotated each repeat (after a warm-up)."""
    for run in runners.values():
        run(texts)
        run(texts)
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for index in range(repeats):
        for n in names[index % len(names) :] + names[: index % len(names)]:
            t0 = time.perf_counter()
            runners[n](texts)
            times[n].append(time.perf_counter() - t0)
    return times


def _bounds(root: Path, name: str, tokens: int) -> dict[str, float]:
    from doe_runtime.bundle import read_manifest

    from ..flops import model_bound

    out = {}
    for label, kind in zip(EXPERTS + (NO_GRAPHS,), ("expert-ffn", "expert-both", "expert-ffn")):
        arch = read_manifest(root / f"{name}-{kind}").architecture
        out[label] = model_bound(
            arch["hidden_size"],
            dense_ffn=arch["ffn_widths_dense"],
            dense_heads=arch["num_heads_dense"],
            ffn=arch["ffn_widths"],
            heads=arch["num_heads"],
            tokens=tokens,
        )
    return out


def _records(name: str, cell: tuple[int, int], times: dict, bounds: dict) -> list[dict]:
    batch, tokens = cell
    p50 = {n: float(sorted(t)[len(t) // 2]) for n, t in times.items()}
    best_dense = min(DENSE_ORT, key=lambda n: p50[n])
    records = []
    for candidate, latencies in times.items():
        ordered = sorted(latencies)
        records.append(
            {
                "kind": "gpu",
                "model": name,
                "candidate": candidate,
                "batch": batch,
                "tokens": tokens,
                "repeats": len(latencies),
                "latency_s": common.quantiles(latencies),
                "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                "items_per_s": batch / p50[candidate],
                "speedup_vs_eager": common.quantiles(common.ratios(times, EAGER, candidate)),
                "speedup_vs_best_ort_dense": common.quantiles(common.ratios(times, best_dense, candidate)),
                "best_ort_dense": best_dense,
                "bound": bounds.get(candidate),
            }
        )
    return records


def run_gpu(config: SuiteConfig, root: Path, progress: bool) -> tuple[list[dict], dict]:
    """Build the bundles of every shape, time every cell; the records and what the header should add."""
    import os

    device = "cpu" if config.tiny else "cuda"
    if not config.tiny:
        check_cuda()
    models = ("tiny",) if config.tiny else config.gpu_models
    unknown = sorted(set(models) - set(SHAPES))
    if unknown:
        raise ConfigError(
            f"--gpu-models: unknown shapes {unknown}; known: {', '.join(s for s in SHAPES if s != 'tiny')}"
        )
    records: list[dict] = []
    info: dict[str, Any] = {"device": device, "models": {m: SHAPES[m] for m in models}, "random_weights": True}
    for name in models:
        start = time.perf_counter()
        build_bundles(config, root, name, workers=1 if config.tiny else min(4, (os.cpu_count() or 4) // 4))
        info[f"build_seconds_{name}"] = round(time.perf_counter() - start, 1)
        loaded = _loaded(name, Path(config.gpu_tokenizer_dir) if config.gpu_tokenizer_dir else None, seed=0)
        runners, served = candidates(name, root, device, loaded)
        for batch in config.gpu_batches:
            for tokens in config.gpu_tokens:
                try:
                    times = time_cell(runners, texts_of(loaded.hf_tokenizer, batch, tokens), config.gpu_repeats)
                except Exception as exc:  # out of device memory, a kernel missing: recorded, the rest still runs
                    records.append(
                        {
                            "kind": "skipped",
                            "model": name,
                            "batch": batch,
                            "tokens": tokens,
                            "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
                        }
                    )
                    continue
                records += _records(name, (batch, tokens), times, _bounds(root, name, tokens))
                log(
                    f"[gpu] {name} {batch}x{tokens}: "
                    + ", ".join(
                        f"{r['candidate']} {1e3 * r['latency_s']['median']:.2f} ms" for r in records[-len(times) :]
                    )
                )
        # what the Router served each shipped expert with (provider, precision, CUDA graphs captured)
        info[f"served_{name}"] = {
            kind: {k: served.info(f"{name}-{kind}")[k] for k in ("provider", "precision", "io_binding", "cuda_graphs")}
            for kind in ("expert-ffn", "expert-both")
        }
    return records, info


__all__ = [
    "DENSE_ORT",
    "EAGER",
    "EXPERTS",
    "KINDS",
    "NO_GRAPHS",
    "SHAPES",
    "build_one",
    "check_cuda",
    "run_gpu",
    "texts_of",
]
