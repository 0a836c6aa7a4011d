"""Perturbed copies of the training texts for distillation recovery (``RecoverySpec.augment``).

Recovery distills the dense model into the pruned one on the task's training texts. Small splits show
the student few of the inputs where the two models could differ; TinyBERT (Jiao et al., 2020) found
distillation on perturbed copies of the training texts worth most on CoLA. Each copy here changes
about ``share`` of a text's words, each changed word one of: deleted, swapped with the next word, or
replaced by a word drawn from the split's own words. Pair inputs perturb both texts. The copies carry
no gold label: recovery labels them with the dense model's answers (:func:`doe_export.stages.recover`).
"""

from __future__ import annotations

import random

from .errors import ConfigError
from .tasks import Split, map_texts, texts_of

DEFAULT_SHARE = 0.15  # of each text's words changed per copy (at least one)


def _words(split: Split) -> list[str]:
    return [word for item in split.inputs for text in texts_of(item) for word in text.split()]


def perturb(text: str, rng: random.Random, vocabulary: list[str], share: float = DEFAULT_SHARE) -> str:
    """``text`` with about ``share`` of its words changed (at least one, when it has two or more)."""
    words = text.split()
    if len(words) < 2:
        return text
    for i in sorted(rng.sample(range(len(words)), max(1, round(share * len(words)))), reverse=True):
        op = rng.randrange(3)
        if op == 0 and len(words) > 2:
            del words[i]
        elif op == 1 and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words[i] = rng.choice(vocabulary)
    return " ".join(words)


def augmented_inputs(split: Split, copies: int, seed: int, share: float = DEFAULT_SHARE) -> list:
    """``copies`` perturbed copies of every input of ``split`` (copy after copy, each in the split's order)."""
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 0:
        raise ConfigError(f"augmented copies must be an integer >= 0, got {copies!r}")
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"share of words changed must be in (0, 1], got {share!r}")
    vocabulary = _words(split)
    if copies and not vocabulary:
        raise ConfigError(f"cannot augment {split.name!r}: its texts have no words")
    rng = random.Random(seed)
    change = lambda text: perturb(text, rng, vocabulary, share)  # noqa: E731
    return [map_texts(item, change) for _ in range(copies) for item in split.inputs]


__all__ = ["DEFAULT_SHARE", "augmented_inputs", "perturb"]
