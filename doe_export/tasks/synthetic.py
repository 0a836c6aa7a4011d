"""Generated data for tests and ``--quick`` modes."""

from __future__ import annotations

import random

from .base import Split, TaskData

_WORDS = (
    "good bad great awful fine poor movie plot actor scene music long short funny dull bright dark "
    "story ending start middle cast film"
).split()


def synthetic_task(
    name: str = "toy", kind: str = "single", n_train: int = 48, n_test: int = 24, seed: int = 0
) -> TaskData:
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

    return TaskData(
        name,
        kind,
        ["no", "yes"],
        "accuracy",
        Split("generated train", *make(n_train)),
        Split("generated dev", *make(8)),
        Split("generated test", *make(n_test)),
        "generated",
    )
