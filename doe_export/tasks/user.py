"""User tasks from CSV / TSV / JSON / JSONL files (``--user-task``)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from doe_runtime.bundle import check_task_name

from .base import METRICS, Split, TaskData, TaskDataError, carve, read_text, shuffled, stratified_split


@dataclass(frozen=True)
class UserTask:
    name: str
    train: Path
    test: Path | None
    text: str
    text_b: str | None
    label: str
    metric: str = "accuracy"
    encoding: str = "utf-8-sig"  # of the files; utf-8-sig reads UTF-8 with or without a byte-order mark


def parse_user_task(spec: str) -> UserTask:
    """``name=NAME,train=PATH[,test=PATH],text=COL[,text_b=COL],label=COL[,metric=accuracy|f1|matthews][,encoding=CODEC]``."""
    fields = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise TaskDataError(f"--user-task {spec!r}: {part!r} is not key=value")
        fields[key.strip()] = value.strip()
    allowed = {"name", "train", "test", "text", "text_b", "label", "metric", "encoding"}
    unknown = set(fields) - allowed
    missing = {"name", "train", "text", "label"} - set(fields)
    if unknown or missing:
        raise TaskDataError(
            f"--user-task {spec!r}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}; "
            "form: name=NAME,train=PATH[,test=PATH],text=COL[,text_b=COL],label=COL[,metric=accuracy|f1|matthews][,encoding=CODEC]"
        )
    if fields.get("metric", "accuracy") not in METRICS:
        raise TaskDataError(f"--user-task {spec!r}: metric must be one of {METRICS}")
    try:
        check_task_name(fields["name"])
    except ValueError as exc:
        raise TaskDataError(f"--user-task {spec!r}: {exc}") from None
    return UserTask(
        fields["name"],
        Path(fields["train"]),
        Path(fields["test"]) if "test" in fields else None,
        fields["text"],
        fields.get("text_b"),
        fields["label"],
        fields.get("metric", "accuracy"),
        fields.get("encoding", "utf-8-sig"),
    )


def read_table(path: Path, encoding: str = "utf-8-sig") -> list[dict]:
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    text = read_text(path, encoding)
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TaskDataError(f"{path}:{number}: not valid JSON ({exc})") from None
        return rows
    if suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise TaskDataError(f"{path}: expected a JSON list of objects, found {type(rows).__name__}")
        return rows
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    raise TaskDataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl")


def load_user_task(task: UserTask, seed: int, label_names: list[str] | None = None) -> TaskData:
    def rows_of(path: Path) -> tuple[list, list]:
        rows = read_table(path, task.encoding)
        inputs, raw_labels = [], []
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}: row {number} is not an object/record")
            for column in (task.text, task.label) + ((task.text_b,) if task.text_b else ()):
                if column not in row:
                    raise TaskDataError(f"{path}: row {number} has no column {column!r}; columns: {sorted(row)}")
            text = str(row[task.text])
            inputs.append((text, str(row[task.text_b])) if task.text_b else text)
            raw_labels.append(str(row[task.label]))
        if not rows:
            raise TaskDataError(f"{path}: no rows")
        return inputs, raw_labels

    train_x, train_raw = rows_of(task.train)
    names = label_names or sorted(set(train_raw))
    if len(names) < 2:
        raise TaskDataError(f"{task.train}: column {task.label!r} has fewer than 2 distinct labels: {names}")

    def encode(path, raw):
        out = []
        for number, value in enumerate(raw, 1):
            if value not in names:
                raise TaskDataError(f"{path}: row {number}: label {value!r} not in the train labels {names}")
            out.append(names.index(value))
        return out

    train_y = encode(task.train, train_raw)
    kind = "pair" if task.text_b else "single"
    if task.test is not None:
        test_x, test_raw = rows_of(task.test)
        test = Split(f"{task.test.name}", test_x, encode(task.test, test_raw))
        train = Split(f"{task.train.name}", *shuffled(train_x, train_y, seed))
    else:
        (rx, ry), (tx, ty) = stratified_split(train_x, train_y, 0.2, seed)
        train = Split(f"{task.train.name} minus a seeded 20% test carve", rx, ry)
        test = Split(f"test: seeded 20% carve of {task.train.name} (seed {seed})", tx, ty)
    train, dev = carve(train, 0.1, seed + 1, "dev")
    return TaskData(task.name, kind, names, task.metric, train, dev, test, f"user files {task.train}")
