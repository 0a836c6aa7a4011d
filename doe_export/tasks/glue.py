"""GLUE tasks from files in GLUE's own layout (``<data-dir>/SST-2/train.tsv`` ...) or from the hub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Split, TaskData, TaskDataError, carve, read_text, shuffled


@dataclass(frozen=True)
class GlueTask:
    folder: str  # folder name in GLUE's layout
    hub_config: str  # config name of the hub dataset
    labels: list[str]
    metric: str
    header: bool
    text_columns: tuple[int, ...]  # TSV column indices of the text field(s)
    label_column: int
    label_map: dict[str, int] | None = None  # TSV label string -> id (None: integer labels)


GLUE: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", "cola", ["unacceptable", "acceptable"], "matthews", False, (3,), 1),
    "sst2": GlueTask("SST-2", "sst2", ["negative", "positive"], "accuracy", True, (0,), 1),
    "mrpc": GlueTask("MRPC", "mrpc", ["not_equivalent", "equivalent"], "f1", True, (3, 4), 0),
    "rte": GlueTask(
        "RTE",
        "rte",
        ["entailment", "not_entailment"],
        "accuracy",
        True,
        (1, 2),
        3,
        {"entailment": 0, "not_entailment": 1},
    ),
    "qnli": GlueTask(
        "QNLI",
        "qnli",
        ["entailment", "not_entailment"],
        "accuracy",
        True,
        (1, 2),
        3,
        {"entailment": 0, "not_entailment": 1},
    ),
    "wnli": GlueTask("WNLI", "wnli", ["not_entailment", "entailment"], "accuracy", True, (1, 2), 3),
}
GLUE_ALIASES = {"sst-2": "sst2", "sst_2": "sst2"}


def read_glue_tsv(path: Path, task: GlueTask) -> tuple[list, list[int]]:
    """Read a GLUE TSV: split on tab and newline only, no quote handling (fields may start with ")."""
    if not path.is_file():
        raise TaskDataError(f"{path}: missing; expected GLUE's layout <data-dir>/{task.folder}/<split>.tsv")
    text = read_text(path)
    rows = [line.split("\t") for line in text.split("\n") if line.strip()]
    if task.header:
        rows = rows[1:]
    needed = max(*task.text_columns, task.label_column) + 1
    inputs, labels = [], []
    for number, row in enumerate(rows, 2 if task.header else 1):
        if len(row) < needed:
            raise TaskDataError(f"{path}:{number}: expected at least {needed} tab-separated columns, found {len(row)}")
        raw = row[task.label_column].strip()
        if task.label_map is not None:
            if raw not in task.label_map:
                raise TaskDataError(f"{path}:{number}: label {raw!r} not in {sorted(task.label_map)}")
            label = task.label_map[raw]
        else:
            if raw not in {str(i) for i in range(len(task.labels))}:
                raise TaskDataError(
                    f"{path}:{number}: label {raw!r} is not one of 0..{len(task.labels) - 1} ({task.labels})"
                )
            label = int(raw)
        fields = [row[c] for c in task.text_columns]
        inputs.append(fields[0] if len(fields) == 1 else (fields[0], fields[1]))
        labels.append(label)
    if not labels:
        raise TaskDataError(f"{path}: no rows")
    return inputs, labels


def load_glue(name: str, data_dir: Path | None, seed: int) -> TaskData:
    task = GLUE[name]
    kind = "pair" if len(task.text_columns) == 2 else "single"
    notes = []
    if data_dir is not None:
        folder = Path(data_dir) / task.folder
        if not folder.is_dir():
            raise TaskDataError(
                f"{folder}: no such folder; --data-dir must hold GLUE's layout (<data-dir>/{task.folder}/dev.tsv)"
            )
        source = f"GLUE files under {folder}"
        test_x, test_y = read_glue_tsv(folder / "dev.tsv", task)
        test = Split(f"GLUE {task.folder} dev (official)", test_x, test_y)
        if (folder / "train.tsv").is_file():
            train_x, train_y = read_glue_tsv(folder / "train.tsv", task)
            train = Split(f"GLUE {task.folder} train", *shuffled(train_x, train_y, seed))
        else:
            train, test = carve(test, 0.5, seed, "test")
            train = Split(
                f"the half of GLUE {task.folder} dev carved as train (no train.tsv in {folder})",
                train.inputs,
                train.labels,
            )
            notes.append(
                f"{folder} has no train.tsv: train and test were carved from the official dev split (seed {seed})"
            )
    else:
        train, test, source = _load_glue_hub(task, kind, seed)
    train, dev = carve(train, 0.05, seed + 1, "dev")
    return TaskData(name, kind, task.labels, task.metric, train, dev, test, source, notes)


def _load_glue_hub(task: GlueTask, kind: str, seed: int) -> tuple[Split, Split, str]:
    """Load from the Hugging Face hub with ``datasets`` (needs network access)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a declared dependency
        raise TaskDataError("the `datasets` package is needed to load GLUE from the hub") from exc
    try:
        data = datasets.load_dataset("nyu-mll/glue", task.hub_config)
    except Exception as exc:  # datasets raises many kinds (ConnectionError, OfflineModeIsEnabled, ...)
        raise TaskDataError(
            f"could not load GLUE {task.hub_config!r} from the hub ({type(exc).__name__}: {exc}). "
            "Offline? Pass --data-dir pointing at GLUE's file layout."
        ) from exc
    columns = {
        "cola": ["sentence"],
        "sst2": ["sentence"],
        "mrpc": ["sentence1", "sentence2"],
        "rte": ["sentence1", "sentence2"],
        "qnli": ["question", "sentence"],
        "wnli": ["sentence1", "sentence2"],
    }
    cols = columns[task.hub_config]

    def to_split(part, name):
        rows = data[part]
        inputs = list(rows[cols[0]]) if kind == "single" else list(zip(rows[cols[0]], rows[cols[1]]))
        return Split(name, inputs, [int(v) for v in rows["label"]])

    train = to_split("train", f"GLUE {task.folder} train (hub)")
    train = Split(train.name, *shuffled(train.inputs, train.labels, seed))
    return train, to_split("validation", f"GLUE {task.folder} validation (hub, official dev)"), "hub nyu-mll/glue"
