"""``doe``: build per-task DoE expert bundles.

    doe build                                   # defaults: packaged MiniLM, tasks bbc-news and snli
    doe build --model path/or/hub-id --tasks sst2,mrpc --data-dir ../shared/data/glue
    doe build --user-task name=reviews,train=train.csv,text=review,label=stars --tasks reviews
    doe tasks                                   # list the built-in tasks
    doe bench --suite grid [--quick]            # dense vs expert speed over batch x tokens
    doe study localization|recovery             # the studies

Every flag's default comes from the spec dataclasses (:mod:`doe_export.specs`); heavy imports
(torch, transformers) happen inside the subcommands so ``doe --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from ..console import exit_on_sigterm, library_progress_bars
from . import bench, build, study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doe", description="Export per-task DoE expert ONNX bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list built-in tasks")
    build.add_parser(sub)
    bench.add_parser(sub)
    study.add_parser(sub)
    return parser


def _tasks() -> int:
    from ..tasks import BUILTIN_TASKS

    for name, text in BUILTIN_TASKS.items():
        print(f"{name:10s} {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()  # a stopped build or bench still runs its cleanup (servers, Ray, temp folders)
    commands = {"tasks": lambda _: _tasks(), "build": build.run, "bench": bench.run, "study": study.run}
    with library_progress_bars(shown=not getattr(args, "no_progress", False)):
        return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
