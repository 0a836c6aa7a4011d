"""Tokenization and batching shared by the runtime and the export side.

The export side tokenizes through these same functions when it trains, validates and evaluates,
so training, validation and serving see identical ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def configure_tokenizer(tokenizer: Any, max_length: int, pad_id: int, pad_token: str) -> Any:
    """Truncate each item to ``max_length`` tokens (pairs: longest first) and pad to the batch's longest.

    The export side tokenizes through this same function, so training, validation and serving
    see identical ids.
    """
    tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def encode_batch(tokenizer: Any, items: list) -> tuple[np.ndarray, np.ndarray]:
    """Texts or (text_a, text_b) pairs -> (input_ids, attention_mask), both [B, T] int64."""
    encodings = tokenizer.encode_batch(items)
    ids = np.asarray([enc.ids for enc in encodings], dtype=np.int64)
    mask = np.asarray([enc.attention_mask for enc in encodings], dtype=np.int64)
    return ids, mask


def plan_batches(
    lengths: np.ndarray, batch_size: int, max_tokens: int | None = None, sort: bool = True
) -> list[np.ndarray]:
    """Group item indices by length (shortest first) into batches of at most ``batch_size`` items
    and, if given, at most ``max_tokens`` padded tokens (items x longest); one item always fits.
    ``sort=False`` keeps the arrival order (the baseline the length sorting is measured against)."""
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(lengths))
    batches: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for index in order:
        new_longest = max(longest, int(lengths[index]))
        if current and (len(current) == batch_size or (max_tokens and (len(current) + 1) * new_longest > max_tokens)):
            batches.append(np.asarray(current))
            current, new_longest = [], int(lengths[index])
        current.append(int(index))
        longest = new_longest
    if current:
        batches.append(np.asarray(current))
    return batches


def length_sorted_batches(
    tokenizer: Any, items: list, batch_size: int, max_tokens: int | None = None, sort: bool = True
):
    """Tokenize once, then yield (indices, ids, mask) batches of similar lengths, each cut to its
    own longest item (right padding makes that exact)."""
    if not items:
        return
    ids, mask = encode_batch(tokenizer, items)  # right-padded to the longest item
    lengths = mask.sum(axis=1)
    for chunk in plan_batches(lengths, batch_size, max_tokens, sort):
        width = int(lengths[chunk].max())
        yield chunk, np.ascontiguousarray(ids[chunk, :width]), np.ascontiguousarray(mask[chunk, :width])
