"""``doe-runtime``: list, inspect and query expert bundles from a shell.

    doe-runtime list artifacts/
    doe-runtime inspect artifacts/snli
    doe-runtime predict artifacts/ --task bbc-news "Shares rose after ..."
    doe-runtime predict artifacts/ --task snli --pair "A man plays." "Someone plays music."
    doe-runtime predict artifacts/ --task snli --input requests.jsonl
    doe-runtime serve artifacts/ --host 127.0.0.1 --port 8000

Errors of the runtime (:class:`~doe_runtime.errors.DoeRuntimeError`) print ``doe-runtime: error: ...``
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .batching import DEFAULT_MAX_ITEMS, DEFAULT_WAIT_MS
from .bundle import discover, read_manifest, verify_files
from .errors import ConfigError, DoeRuntimeError, InputError
from .router import DEVICES, PRECISIONS, Router

LOOPBACK = ["localhost", "127.0.0.1", "::1"]


def _read_jsonl(path: str) -> list:
    """Each line: a string, a [text_a, text_b] list, or an object with text / text_a + text_b."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise InputError(
            f"--input {path}: cannot be read ({exc.strerror or exc}); give a JSON-lines file or '-'"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[exc.start : exc.start + 1]!r} at offset {exc.start}); JSON "
            "lines must be UTF-8"
        ) from None
    return [_item(line, path, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _item(line: str, path: str, number: int):
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{number}: not valid JSON ({exc})") from None
    if isinstance(value, dict):
        if "text_a" in value and "text_b" in value:
            return (value["text_a"], value["text_b"])
        if "text" in value:
            return value["text"]
        raise InputError(
            f"{path}:{number}: an object needs 'text' or 'text_a' and 'text_b', found keys {sorted(value)}"
        )
    return tuple(value) if isinstance(value, list) else value


def _int_in(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {low}..{high if high is not None else 'any'}, got {value}")
        return value

    return parse


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="HTTP server over the bundles (needs the [serve] extra)")
    serve.add_argument("root", help="folder holding the bundles (watched: rebuilt bundles are picked up)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=_int_in(1, 65535), default=8000)
    serve.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --host (the server has no authentication)"
    )
    serve.add_argument("--device", choices=DEVICES, default="auto")
    serve.add_argument("--max-items", type=_int_in(1), default=256, help="most inputs per request (422 above)")
    serve.add_argument(
        "--max-body-bytes", type=_int_in(1), default=4 * 1024 * 1024, help="largest request body (413 above)"
    )
    serve.add_argument("--max-resident", type=_int_in(1), default=4, help="sessions kept loaded at once (LRU)")
    serve.add_argument("--batch-size", type=_int_in(1), default=32, help="items per session run")
    serve.add_argument("--threads", type=_int_in(1), default=None, help="onnxruntime intra-op threads per session")
    serve.add_argument(
        "--max-queue",
        type=_int_in(0),
        default=64,
        help="requests allowed to wait for a prediction slot; beyond it: 503 + Retry-After",
    )
    serve.add_argument(
        "--max-connections",
        type=_int_in(1),
        default=256,
        help="open connections + requests uvicorn accepts at once (503 above)",
    )
    serve.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: the bundle's fp16 variant on CUDA, its int8 variant on CPU (where it was measured "
        "faster than fp32), else fp32",
    )
    serve.add_argument(
        "--max-concurrency",
        type=_int_in(1),
        default=None,
        help="model calls running at once (default: the CPU count on CPU, 2 on CUDA; ray: every replica's share); "
        "others wait their turn",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="merge requests for one task arriving within this many ms into one model call (0: every request "
        f"alone; default {DEFAULT_WAIT_MS['cpu']:g} on CPU, {DEFAULT_WAIT_MS['cuda']:g} on CUDA, chosen by "
        "measurement: docs/runtime.md)",
    )
    serve.add_argument(
        "--max-batch-items",
        type=int,
        default=None,
        help=f"most items in one merged model call (default {DEFAULT_MAX_ITEMS['cpu']} on CPU, "
        f"{DEFAULT_MAX_ITEMS['cuda']} on CUDA); a larger request runs alone",
    )
    serve.add_argument(
        "--no-memory-arena",
        action="store_true",
        help="turn off onnxruntime's CPU memory arena (it keeps the peak of concurrent runs)",
    )
    serve.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, run every batch the normal way instead of replaying captured CUDA graphs for batches that "
        "fit a shape bucket (the default there)",
    )
    serve.add_argument(
        "--max-resident-bytes",
        type=_int_in(1),
        default=None,
        help="cap on the summed model sizes of the resident experts (LRU eviction)",
    )
    _add_engine(serve)


def _add_engine(serve: argparse.ArgumentParser) -> None:
    """``serve``'s engine and its Ray options."""
    serve.add_argument(
        "--engine",
        choices=("fastapi", "ray"),
        default="fastapi",
        help="fastapi: one process (default); ray: Ray Serve replicas, each task routed to a replica "
        "holding its expert (needs the [ray] extra)",
    )
    serve.add_argument("--replicas", type=_int_in(1), default=None, help="ray: expert replicas (default 1)")
    serve.add_argument("--min-replicas", type=_int_in(0), default=None, help="ray: autoscaling lower bound")
    serve.add_argument("--max-replicas", type=_int_in(1), default=None, help="ray: autoscaling upper bound")
    serve.add_argument(
        "--max-experts-per-replica",
        type=_int_in(1),
        default=4,
        help="ray: experts loaded per replica (Serve's max_num_models_per_replica)",
    )
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="ray: CPUs reserved per expert replica")
    serve.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        help="ray with --device cuda: the GPU share each replica reserves (default 1; 0.5 puts two on one GPU)",
    )
    serve.add_argument(
        "--address", default=None, help="ray: an existing cluster ('auto' or host:port); default: start a local one"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doe-runtime", description="Serve DoE expert bundles with onnxruntime.")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list the bundles under a folder")
    listing.add_argument("root", help="folder holding <task>/manifest.json bundles")
    inspect = sub.add_parser("inspect", help="show a bundle's manifest summary and verify its files")
    inspect.add_argument("bundle", help="one bundle folder, e.g. artifacts/snli")
    inspect.add_argument("--full", action="store_true", help="print the whole manifest")
    pred = sub.add_parser("predict", help="predict labels; prints one JSON line per input")
    pred.add_argument("root", help="folder holding the bundles")
    pred.add_argument("--task", required=True, help="task name (see `doe-runtime list ROOT`)")
    pred.add_argument("texts", nargs="*", help="texts for a single-text task")
    pred.add_argument("--pair", nargs=2, action="append", metavar=("TEXT_A", "TEXT_B"), help="one pair; repeatable")
    pred.add_argument("--input", help="JSON-lines file of inputs ('-' for stdin)")
    pred.add_argument("--device", choices=DEVICES, default="auto")
    pred.add_argument("--batch-size", type=int, default=32)
    pred.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: the bundle's fp16 variant on CUDA, its int8 variant on CPU (where it was measured "
        "faster than fp32), else fp32",
    )
    _add_serve(sub)
    return parser


def _list(args) -> int:
    broken = 0
    for task, folder in discover(args.root).items():
        try:
            manifest = read_manifest(folder)
        except DoeRuntimeError as exc:  # one broken bundle does not hide the others
            broken += 1
            print(f"{task}\tBROKEN\t{exc}")
            continue
        quality = manifest.quality
        print(
            f"{task}\t{manifest.task.input}\t{len(manifest.task.labels)} labels\t{quality.get('metric', '?')} "
            f"dense={quality.get('dense')} expert={quality.get('expert')}\t"
            f"precisions {','.join([manifest.onnx.precision, *sorted(manifest.onnx.variants)])}"
        )
    if broken:
        print(f"doe-runtime: {broken} bundle(s) cannot be read (marked BROKEN above)", file=sys.stderr)
        return 1
    return 0


def _inspect(args) -> int:
    folder = Path(args.bundle)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    print(json.dumps(manifest.to_json() if args.full else manifest.summary(), indent=2))
    print(
        f"{folder}: files verified (sha256 of model, tokenizer and every variant match the manifest)", file=sys.stderr
    )
    return 0


def _predict(args) -> int:
    items: list = list(args.texts)
    if args.pair:
        items += [tuple(pair) for pair in args.pair]
    if args.input:
        items += _read_jsonl(args.input)
    if not items:
        raise InputError("no inputs: give texts, --pair TEXT_A TEXT_B, or --input FILE.jsonl")
    router = Router(args.root, device=args.device, batch_size=args.batch_size, precision=args.precision)
    predictions = router.predict(args.task, items)
    for prediction in predictions:
        print(json.dumps(prediction.to_dict()))
    info = router.info(args.task)
    print(
        f"task {args.task}: {len(predictions)} predictions on {info['provider']} ({info['precision']}"
        f"{', IOBinding' if info['io_binding'] else ''})",
        file=sys.stderr,
    )
    return 0


def _router_options(args) -> dict:
    return {
        "device": args.device,
        "batch_size": args.batch_size,
        "intra_op_threads": args.threads,
        "precision": args.precision,
        "memory_arena": not args.no_memory_arena,
        "cuda_graphs": False if args.no_cuda_graphs else "auto",
    }


def _serve(args) -> int:
    from .server import check_bind, is_loopback

    check_bind(args.host, args.allow_remote)
    limits = {
        "max_items": args.max_items,
        "max_body_bytes": args.max_body_bytes,
        "max_queue": args.max_queue,
        "batch_wait_ms": args.batch_wait_ms,
        "max_batch_items": args.max_batch_items,
    }
    if args.engine == "fastapi":
        from .server import serve

        serve(
            args.root,
            host=args.host,
            port=args.port,
            allow_remote=args.allow_remote,
            max_connections=args.max_connections,
            max_concurrency=args.max_concurrency,
            max_resident=args.max_resident,
            max_resident_bytes=args.max_resident_bytes,
            **limits,
            **_router_options(args),
        )
        return 0
    if not Path(args.root).is_dir():
        raise ConfigError(f"bundle folder {args.root} does not exist; build bundles with `doe build --out {args.root}`")
    from .ray_engine import check_scaling, serve_ray

    check_scaling(args.replicas, args.min_replicas, args.max_replicas, args.max_experts_per_replica)
    serve_ray(
        args.root,
        host=args.host,
        port=args.port,
        address=args.address,
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        max_experts_per_replica=args.max_experts_per_replica,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        router_options=_router_options(args),
        max_concurrency=args.max_concurrency,
        allowed_hosts=LOOPBACK if is_loopback(args.host) else None,
        **limits,
    )
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Texts may come before or after the options (argparse alone would refuse texts after --task);
    everything after a "--" is a text, even when it starts with "-"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    literal: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, literal = argv[:cut], argv[cut + 1 :]
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "predict" or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)} (a text starting with '-' goes after '--')")
    if literal and args.command != "predict":
        parser.error(f"unexpected texts after '--': {' '.join(literal)}")
    if args.command == "predict":
        args.texts = list(args.texts) + extra + literal
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    commands = {"list": _list, "inspect": _inspect, "predict": _predict, "serve": _serve}
    try:
        return commands[args.command](args)
    except DoeRuntimeError as exc:
        print(f"doe-runtime: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
