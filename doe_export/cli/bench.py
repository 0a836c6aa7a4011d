"""``doe bench``: the benchmark suites' flags (defaults read from GridConfig and SuiteConfig) and runs."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..bench.grid import GridConfig
from ..bench.suites import CPU_SUITES, SUITES
from ..bench.workbench import SuiteConfig
from ..errors import ConfigError
from ..specs import AdaptMode
from .options import choices, default, names, numbers, render_only, report_errors

SUITE_HELP = (
    "grid: dense vs FFN experts over batch x tokens beside the FLOP bound; replace: the bundle as `doe build` ships "
    "it, through Router, against the plain dense export of the same fine-tuned model in fp32 and int8, on real texts "
    "and fixed shapes, metric beside speed; layers: FFN vs heads vs both at matched budgets with task metrics; peers: "
    "PyTorch eager, ONNX dense, expert, fused, int8; switch: round-robin over N experts, cold load, memory, router "
    "overhead; memory: N experts of one frozen backbone with and without weight sharing; e2e: Router.predict with "
    "and without length sorting; load: the HTTP server under concurrent requests (errors, p50/p99, memory); batching: single-text requests to "
    "the shipped bundle with dynamic batching off and on (throughput, p99, answers, /metrics); gpu: the "
    "shipped experts through Router on CUDA against PyTorch eager fp16 and the best onnxruntime fp16 dense graph "
    "(needs onnxruntime-gpu; --quick runs it on the CPU); all: every suite but gpu"
)
# flag (argparse dest) -> (config class, field) whose default the flag shows and uses
FIELDS: dict[str, tuple[type, str]] = {
    "model": (SuiteConfig, "model"),
    "batch": (SuiteConfig, "batch"),
    "token_count": (SuiteConfig, "tokens"),
    "load_seconds": (SuiteConfig, "load_seconds"),
    "load_warmup": (SuiteConfig, "load_warmup_seconds"),
    "load_connections": (SuiteConfig, "load_connections"),
    "optimum_python": (SuiteConfig, "optimum_python"),
    "batches": (GridConfig, "batches"),
    "tokens": (GridConfig, "tokens"),
    "rates": (GridConfig, "rates"),
    "max_work": (GridConfig, "max_work"),
    "fused": (GridConfig, "fused"),
    "replace_tasks": (SuiteConfig, "replace_tasks"),
    "replace_round_to": (SuiteConfig, "replace_round_to"),
    "batching_task": (SuiteConfig, "batching_task"),
    "batching_connections": (SuiteConfig, "batching_connections"),
    "batching_waits": (SuiteConfig, "batching_waits_ms"),
    "batching_rounds": (SuiteConfig, "batching_rounds"),
    "gpu_models": (SuiteConfig, "gpu_models"),
    "gpu_repeats": (SuiteConfig, "gpu_repeats"),
    "gpu_tokenizer_dir": (SuiteConfig, "gpu_tokenizer_dir"),
}


def _default(dest: str):
    cls, name = FIELDS[dest]
    return default(cls, name)


def _add_suite_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--suite", choices=(*SUITES, "all"), default="grid", help=SUITE_HELP)
    g.add_argument(
        "--data-dir",
        default=os.environ.get("DOE_DATA_DIR"),
        help="GLUE layout folder for the layers, peers and replace suites; env DOE_DATA_DIR",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="adapted models and statistics (default <cache>/study, shared with `doe study`)",
    )
    g.add_argument("--batch", type=int, default=_default("batch"), help="layers/peers/switch: batch of timed requests")
    g.add_argument(
        "--token-count", type=int, default=_default("token_count"), help="layers/peers/switch: tokens per timed request"
    )
    g.add_argument(
        "--adapt",
        choices=choices(AdaptMode),
        default=None,
        help="layers/peers: how the task models are adapted before pruning (default: as `doe build`)",
    )
    g.add_argument(
        "--lr", type=float, default=None, help="layers/peers: adaptation learning rate (default: as doe build)"
    )
    g.add_argument("--epochs", type=int, default=None, help="layers/peers: adaptation epochs (default: as doe build)")
    g.add_argument("--load-seconds", type=float, default=_default("load_seconds"), help="load: measured seconds")
    g.add_argument(
        "--load-warmup", type=float, default=_default("load_warmup"), help="load: warm-up seconds before measuring"
    )
    g.add_argument(
        "--load-connections",
        default=str(_default("load_connections")),
        help="load: concurrent connections; comma-separated for one row per count (e.g. 64,128)",
    )
    g.add_argument(
        "--engine",
        choices=("fastapi", "ray"),
        default="fastapi",
        help="load: ray adds `doe-runtime serve --engine ray` with 1 and 2 replicas beside the FastAPI server",
    )
    g.add_argument(
        "--load-big-request",
        action="store_true",
        help="load: after the load, time one 4 MiB request and the server memory it leaves",
    )
    g.add_argument("--load-no-arena", action="store_true", help="load: serve with onnxruntime's memory arena off")
    g.add_argument(
        "--optimum-python",
        default=_default("optimum_python"),
        metavar="PYTHON",
        help="peers: a Python with optimum-onnx installed (transformers < 4.58, so a separate environment); "
        "adds the dense model exported by `optimum-cli export onnx`",
    )


def _add_batching_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--replace-tasks", default=_default("replace_tasks"), help="replace: comma-separated tasks")
    g.add_argument(
        "--replace-round-to",
        type=int,
        default=_default("replace_round_to"),
        metavar="N",
        help="replace: build the bundles with `doe build --round-to N` (default: doe build's own; 1: unaligned "
        "widths, to measure what the tensor-core alignment costs on CPU)",
    )
    g.add_argument("--batching-task", default=_default("batching_task"), help="batching: the single-text task served")
    g.add_argument(
        "--bundles",
        default=None,
        metavar="DIR",
        help="batching: serve the task's bundle from this `doe build --out` folder (default: build it with doe "
        "build's defaults in the work folder, reused next time)",
    )
    g.add_argument(
        "--batching-connections",
        default=_default("batching_connections"),
        help="batching: comma-separated connection counts",
    )
    g.add_argument(
        "--batching-waits",
        default=_default("batching_waits"),
        help="batching: comma-separated --batch-wait-ms values to serve with (0: batching off; the runtime's "
        "default is the shipped setting)",
    )
    g.add_argument(
        "--batching-rounds",
        type=int,
        default=_default("batching_rounds"),
        help="batching: rounds of every row, alternating between the servers (one per wait); the verdicts are "
        "the medians of each round's ratio",
    )


def _add_gpu_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--gpu-models", default=_default("gpu_models"), help="gpu: model shapes (minilm, bert-base)")
    g.add_argument("--gpu-repeats", type=int, default=_default("gpu_repeats"), help="gpu: timed repeats per cell")
    g.add_argument(
        "--gpu-tokenizer-dir",
        default=_default("gpu_tokenizer_dir"),
        help="gpu: a BERT tokenizer folder (default: the packaged MiniLM's; benchmarks/prepare_gpu.sh "
        "copies it for the lent GPU machine)",
    )


def _add_grid_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--batches", default=_default("batches"), help="grid: comma-separated batch sizes")
    g.add_argument("--tokens", default=_default("tokens"), help="grid: comma-separated token counts (prompt excluded)")
    g.add_argument(
        "--threads",
        default=None,
        help="comma-separated intra-op thread counts (default: grid 1,2; the other suites 1, their first)",
    )
    g.add_argument("--rates", default=_default("rates"), help="grid: comma-separated pruning rates")
    g.add_argument(
        "--prompt-length",
        type=int,
        default=None,
        help="soft prompt tokens inside the graphs (grid, default 0; layers/peers with --adapt prompt, default 20)",
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="minimum interleaved repeats per cell (default: grid 5, the other suites 7)",
    )
    g.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="keep repeating a cell until this much time (default: grid 0.5, the other suites 1.0)",
    )
    g.add_argument(
        "--max-work",
        type=int,
        default=_default("max_work"),
        help="grid: skip cells with more batch x tokens (unfused attention memory); 0: no limit",
    )
    g.add_argument(
        "--fused",
        action="store_true",
        default=_default("fused"),
        help="grid: measure graphs rewritten with onnxruntime fusions",
    )


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "bench",
        help="benchmark suites (records + Markdown report + plots)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_suite_options(g)
    _add_grid_options(g)
    _add_batching_options(g)
    _add_gpu_options(g)
    g.add_argument("--quick", action="store_true", help="tiny model and grid: checks the code path in seconds")
    g.add_argument("--model", default=_default("model"), help="model folder or hub id")
    g.add_argument("--out", default="benchmarks/results", help="where records, report and plots go")
    g.add_argument("--work-dir", default=None, help="where the benchmark graphs are exported (default: <cache>/bench)")
    g.add_argument("--render-only", action="store_true", help="re-render report and plots from <out>/<suite>.jsonl")
    g.add_argument("--no-progress", action="store_true")
    return g


def _given(**values: Any) -> dict[str, Any]:
    """The options given on the command line (None: the config's own default)."""
    return {key: value for key, value in values.items() if value is not None}


def grid_config(args: argparse.Namespace) -> GridConfig:
    from ..bench import grid

    if args.quick:
        return GridConfig(model=args.model, tiny=True, prompt_length=4, fused=args.fused, **grid.QUICK)
    config = GridConfig(
        model=args.model,
        batches=numbers(args.batches),
        tokens=numbers(args.tokens),
        rates=numbers(args.rates, float),
        max_work=args.max_work or None,
        fused=args.fused,
        **_given(
            threads=args.threads and numbers(args.threads),
            prompt_length=args.prompt_length,
            repeats=args.repeats,
            min_seconds=args.min_seconds,
        ),
    )
    return config


def _flow(args: argparse.Namespace):
    """doe build's flow with the bench's --adapt / --lr / --epochs / --prompt-length applied; None when none
    of them is given (the suites then use doe build's flow itself)."""
    from ..specs import AdaptSpec, Flow

    if args.adapt is None and args.lr is None and args.epochs is None:
        return None
    base = Flow(model=args.model)
    adapt = AdaptSpec(
        mode=args.adapt or base.adapt.mode,
        prompt_length=args.prompt_length,
        lr=args.lr,
        epochs=base.adapt.epochs if args.epochs is None else args.epochs,
    )
    return replace(base, adapt=adapt, recovery=replace(base.recovery, params=adapt.trains))


def suite_config(args: argparse.Namespace) -> SuiteConfig:
    from ..bench import suites
    from ..bench.workbench import quick_flow

    engines = ("fastapi", "ray") if args.engine == "ray" else ("fastapi",)
    if args.quick:
        return SuiteConfig(model=args.model, threads=1, flow=quick_flow(), **suites.QUICK, load_engines=engines)
    steps = numbers(args.load_connections)
    config = SuiteConfig(
        model=args.model,
        data_dir=args.data_dir,
        batch=args.batch,
        tokens=args.token_count,
        flow=_flow(args),
        optimum_python=args.optimum_python,
        gpu_models=names(args.gpu_models),
        gpu_repeats=args.gpu_repeats,
        gpu_tokenizer_dir=args.gpu_tokenizer_dir,
        load_seconds=args.load_seconds,
        load_warmup_seconds=args.load_warmup,
        load_connections=steps[0],
        load_connection_steps=steps if len(steps) > 1 else (),
        load_big_request=args.load_big_request,
        load_engines=engines,
        load_memory_arena=not args.load_no_arena,
        replace_tasks=names(args.replace_tasks),
        replace_round_to=args.replace_round_to,
        batching_task=args.batching_task,
        batching_bundles=args.bundles,
        batching_connections=numbers(args.batching_connections),
        batching_waits_ms=numbers(args.batching_waits, float),
        batching_rounds=args.batching_rounds,
        **_given(threads=args.threads and numbers(args.threads)[0], repeats=args.repeats, min_seconds=args.min_seconds),
    )
    if config.batch < 1 or config.tokens < 1:
        raise ConfigError("--batch and --token-count must be >= 1")
    if min(config.batching_connections) < 1:
        raise ConfigError(f"--batching-connections must all be >= 1, got {args.batching_connections!r}")
    if config.batching_rounds < 1:
        raise ConfigError(f"--batching-rounds must be >= 1, got {args.batching_rounds!r}")
    if not all(0 <= wait <= 1000 for wait in config.batching_waits_ms):
        raise ConfigError(
            f"--batching-waits must all be in [0, 1000] ms (0: batching off), got {args.batching_waits!r}"
        )
    return config


def run(args: argparse.Namespace) -> int:
    from ..bench import grid, suites
    from ..tasks import default_cache_dir

    out = Path(args.out)
    wanted = CPU_SUITES if args.suite == "all" else (args.suite,)
    if args.render_only:
        return max(
            render_only("doe bench", out / f"{name}.jsonl", grid.render if name == "grid" else suites.render)
            for name in wanted
        )

    def go() -> int:
        grid_cfg, suite_cfg = grid_config(args), suite_config(args)
        if not args.quick and set(wanted) & {"layers", "peers", "replace"} and not args.data_dir:
            raise ConfigError(
                "the layers, peers and replace suites need GLUE data: pass --data-dir (GLUE layout, e.g. "
                "../shared/data/glue) or set DOE_DATA_DIR"
            )
        work = (
            Path(args.work_dir)
            if args.work_dir
            else default_cache_dir() / "bench" / ("quick" if args.quick else "runs")
        )
        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        for name in wanted:
            if name == "grid":
                path = grid.run(grid_cfg, out, work, progress=not args.no_progress)
                print(f"records: {path}\nreport:  {out / 'grid.md'}\n{grid.summary(path)}")
                continue
            written = suites.run(name, suite_cfg, out_dir=out, work=work, cache=cache, progress=not args.no_progress)
            print(f"records: {written[0]}\nreport:  {written[1]}")
        return 0

    return report_errors("doe bench", go)


__all__ = ["FIELDS", "add_parser", "grid_config", "run", "suite_config"]
