"""What the suites share: their settings, the task workbench (adapted models, experts through the
stage API, graphs exported and validated), timing of sessions, process memory, generated texts and
bundles made by ``doe build``'s own code."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from doe_runtime.batching import DEFAULT_WAIT_MS

from ..records import from_json, to_json
from ..specs import DEFAULT_MODEL, AdaptSpec, DataSpec, ExportSpec, Flow, LayerTypes, PruneSpec, RecoverySpec
from . import common


@dataclass(frozen=True)
class SuiteConfig:
    model: str = DEFAULT_MODEL
    data_dir: str | None = None
    layer_tasks: tuple[str, ...] = ("sst2", "rte")
    peers_task: str = "sst2"
    replace_tasks: tuple[str, ...] = ("bbc-news", "sst2")
    # replace: the build's --round-to (None: doe build's default, 64 wherever the dense widths are multiples of
    # it; 1: the unaligned widths the rate gives, to measure what the alignment costs on CPU)
    replace_round_to: int | None = None
    # share of the prunable (FFN + attention projection) parameters removed; each layer type gets
    # the rate that removes that many parameters (skipped where that rate would be >= max_rate)
    budgets: tuple[float, ...] = (0.2, 0.3, 0.43, 0.65)
    max_rate: float = 0.95
    ffn_rate: float = 0.65  # the peers' FFN expert
    both_rates: tuple[float, float] = (0.65, 0.65)  # the peers' "both" expert: FFN rate, head rate
    # timed requests of layers / peers / switch: batch x tokens, intra-op threads, repeats (at least
    # `repeats`, more until `min_seconds` have passed)
    batch: int = 8
    tokens: int = 128
    threads: int = 1
    repeats: int = 7
    min_seconds: float = 1.0
    switch_tasks: tuple[int, ...] = (2, 5, 10)  # resident experts in the round-robin
    memory_counts: tuple[int, ...] = (1, 2, 5, 10, 20)  # resident experts in the memory suite
    switch_requests: int = 20
    e2e_items: int = 512
    e2e_batch: int = 32
    # the load suite: measured seconds after a warm-up, concurrent connections, tasks served
    load_seconds: float = 60.0
    load_warmup_seconds: float = 10.0
    load_connections: int = 32
    load_tasks: int = 3
    load_memory_arena: bool = True
    load_connection_steps: tuple[int, ...] = ()  # several rows (e.g. 64, 128); empty: load_connections
    load_big_request: bool = False  # after the load: one 4 MiB request (time, memory that stays)
    load_engines: tuple[str, ...] = ("fastapi",)  # with "ray": also `serve --engine ray`, each replica count
    load_ray_replicas: tuple[int, ...] = (1, 2)
    # the batching suite: single-text requests to the served bundle of `batching_task` (from `batching_bundles`,
    # a `doe build --out` folder; None: built with doe build's defaults in the work folder), at each connection
    # count, with each --batch-wait-ms (0: batching off; the runtime's default is the shipped setting)
    batching_task: str = "bbc-news"
    batching_bundles: str | None = None
    batching_connections: tuple[int, ...] = (1, 16, 64)
    batching_waits_ms: tuple[float, ...] = (0.0, DEFAULT_WAIT_MS["cpu"])
    batching_rounds: int = 3  # every row this many times, alternating between the settings; verdicts: medians
    # the gpu suite: shapes, batch x tokens cells, timed repeats, and a BERT tokenizer folder (None: the packaged
    # MiniLM one; the lent GPU machine has no such package, so benchmarks/gpu_check.sh carries one)
    gpu_models: tuple[str, ...] = ("minilm", "bert-base")
    gpu_batches: tuple[int, ...] = (1, 8, 32, 128)
    gpu_tokens: tuple[int, ...] = (32, 128, 512)
    gpu_repeats: int = 30
    gpu_tokenizer_dir: str | None = None
    # a separate Python with optimum-onnx (it needs transformers < 4.58, so it cannot share ours):
    # the peers suite then also times the dense model exported by `optimum-cli export onnx`
    optimum_python: str | None = None
    seed: int = 0
    tiny: bool = False
    # adaptation, attribution and recovery of the layers/peers experts; None: `doe build`'s defaults,
    # taken from BuildConfig itself, so a benchmark measures the experts `doe build` ships
    flow: Flow | None = None

    def flow_used(self) -> Flow:
        """How the suites' experts are made: ``flow``, or ``doe build``'s defaults on the suite's model."""
        if self.flow is not None:
            return self.flow
        return Flow(model="tiny" if self.tiny else self.model)

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, data: dict) -> SuiteConfig:
        return from_json(cls, {**data, "flow": None} if data.get("flow") is None else data)


def quick_flow() -> Flow:
    """The --quick flow: `doe build`'s stages on a tiny model and generated data, in seconds."""
    return Flow(
        model="tiny",
        data=DataSpec(max_train=48, max_dev=8, max_eval=24, max_length=24),
        adapt=AdaptSpec(epochs=1),
        prune=PruneSpec(calib_examples=16),
        recovery=RecoverySpec(epochs=1, max_examples=24),
    )


def record_flow(cfg: dict) -> Flow:
    """The flow of a suite's record header, whichever layout wrote it: a Flow, the first studies' flat
    config under ``flow``, the oldest records' flat keys at the top level, or none (doe build's)."""
    from ..study import LEGACY_FLOW_KEYS, legacy_config

    flow = cfg.get("flow")
    if isinstance(flow, dict):
        return from_json(Flow, flow) if "data" in flow else legacy_config(flow).flow
    flat = {k: v for k, v in cfg.items() if k in LEGACY_FLOW_KEYS}
    if set(flat) - {"model", "seed"}:
        return legacy_config(flat).flow
    return Flow(model=cfg.get("model", DEFAULT_MODEL))


QUICK: dict[str, Any] = dict(
    layer_tasks=("toy",),
    peers_task="toy",
    replace_tasks=("toy",),
    budgets=(0.3,),
    batch=2,
    tokens=16,
    repeats=2,
    min_seconds=0.0,
    switch_tasks=(2,),
    switch_requests=2,
    e2e_items=24,
    e2e_batch=8,
    load_seconds=3.0,
    load_warmup_seconds=1.0,
    load_connections=4,
    load_tasks=2,
    tiny=True,
    load_big_request=True,
    memory_counts=(1, 2),
    gpu_batches=(1, 4),
    gpu_tokens=(16, 32),
    gpu_repeats=2,
    load_ray_replicas=(1,),
    batching_connections=(4,),
    batching_waits_ms=(0.0, 5.0),
    batching_rounds=2,
)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_feeds(vocab: int, batch: int, tokens: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1000, vocab, size=(batch, tokens)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


class Workbench:
    """What the layers, peers and replace suites share: the model, the tasks' adapted models and
    calibration statistics (cached on disk, the study's cache layout), experts made by the stage API
    exactly as ``doe build`` makes them, ONNX export + validation."""

    def __init__(self, config: SuiteConfig, cache: Path, work: Path, progress: bool):
        self.config, self.cache, self.work, self.progress = config, Path(cache), Path(work), progress
        if config.tiny:
            from ..loading import tiny_model

            self.loaded = tiny_model(config.seed)
        else:
            from ..loading import load_model

            self.loaded = load_model(config.model)
        self.flow = config.flow_used()
        self._runners: dict[str, Any] = {}
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def shape(self) -> dict:
        cfg = self.loaded.backbone.config
        return {
            "hidden": cfg.hidden_size,
            "ffn": cfg.intermediate_size,
            "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads,
            "vocab": cfg.vocab_size,
            "max_positions": getattr(cfg, "max_position_embeddings", None),
        }

    def task_data(self, task: str):
        """The task's data (generated in quick mode); nothing trains."""
        from ..tasks import load_task, synthetic_task

        return synthetic_task(task) if self.config.tiny else load_task(task, self.config.seed, self.config.data_dir)

    def runner(self, task: str):
        """The task's runner: its adapted model (cached, the study's cache) and calibration statistics."""
        from ..runner import TaskRunner

        if task not in self._runners:
            self._runners[task] = TaskRunner(
                self.flow, self.task_data(task), self.loaded, self.cache / "study", progress=self.progress
            )
        return self._runners[task]

    def expert(self, task: str, layer_types: str, ffn_rate: float, head_rate: float):
        """A DoE expert of the adapted model (stage API): (model, prune report, metric before, metric after)."""
        runner = self.runner(task)
        spec = replace(
            self.flow.prune,
            rate=ffn_rate if layer_types != "attention" else 0.0,
            layer_types=LayerTypes(layer_types),
            head_rate=head_rate if layer_types != "ffn" else None,
            seed=self.config.seed,
        )
        result = runner.expert(spec, desc=f"{layer_types} {ffn_rate:.2f}/{head_rate:.2f}")
        return result.model, result.report, result.before.test, result.after.test

    def export(self, model, name: str, fuse: bool, exporter: str = "torchscript") -> tuple[Path, dict]:
        """Export (and optionally fuse) ``model``; validated against PyTorch after every rewrite."""
        from ..onnx_export import export_validated

        sample, batches = common.random_check_batches(self.shape["vocab"], self.config.seed, low=1000)
        path = self.work / f"{name}{'.fused' if fuse else ''}.{exporter}.onnx"
        _, validation, fusions = export_validated(model, path, sample, batches, exporter=exporter, fuse=fuse)
        return path, {"max_abs_diff": validation["max_abs_diff"], "fusions": fusions, "exporter": exporter}

    def onnx_metric(self, task: str, path: Path) -> float:
        from .. import evaluate

        runner = self.runner(task)
        logits = evaluate.onnx_file_logits(path, runner.tokenizer, runner.test.inputs)
        return evaluate.metric_value(runner.data.metric, runner.test.labels, logits.argmax(1).tolist())


def header(config: SuiteConfig, suite: str, shape: dict) -> dict:
    import onnxruntime as ort

    head = common.environment([config.threads], ort.get_available_providers())
    head.update(suite=suite, config=config.to_json(), model_shape=shape)
    return head


def time_sessions(paths: dict[str, Path], feeds: dict, config: SuiteConfig, extra: dict | None = None) -> dict:
    """Interleaved timing of sessions (and other callables in ``extra``) on the same feeds."""
    sessions = {name: common.session(path, config.threads) for name, path in paths.items()}
    runners = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    runners.update(extra or {})
    return common.paired_timing(runners, config.repeats, warmup=1, min_seconds=config.min_seconds)


def make_bundles(config: SuiteConfig, root: Path, count: int, progress: bool) -> list[str]:
    """One real expert bundle (``doe build``'s own code on generated data; the weights' values do not
    change the costs measured here), copied under ``count`` task names."""
    from ..loading import load_model, tiny_model
    from ..pipeline import build_task
    from ..specs import BuildConfig
    from ..tasks import synthetic_task

    loaded = tiny_model(config.seed) if config.tiny else load_model(config.model)
    build_cfg = BuildConfig(
        out_dir=str(root),
        data=DataSpec(max_eval=32, max_length=config.tokens),
        adapt=AdaptSpec(epochs=0),
        prune=PruneSpec(rate=config.ffn_rate, calib_examples=16),
        recovery=RecoverySpec(epochs=0),
        export=ExportSpec(fp16=False),
        progress=progress,
    )
    result = build_task(build_cfg, loaded, synthetic_task("expert-0"))
    names = ["expert-0"]
    source = Path(result.bundle)
    for index in range(1, count):
        name = f"expert-{index}"
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["task"]["name"] = name
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
        names.append(name)
    return names


def long_texts(count: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocabulary = (
        "market film team minister growth season album court bank player music election profit "
        "shares league court police phone software director economy award"
    ).split()
    return [" ".join(rng.choice(vocabulary, size=words)) for _ in range(count)]


def mixed_texts(count: int, seed: int, max_words: int = 160) -> list[str]:
    """Request texts of realistic, mixed lengths (log-uniform 3..max_words words)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(3), np.log(max_words), size=count)).astype(int)
    pool = long_texts(1, max_words, seed)[0].split()
    return [" ".join(pool[:n]) for n in lengths]
