"""Length-bucketed batching: group sequences of similar length under a token budget.

Sorting by length before cutting batches keeps padding small: each batch is padded to
its own longest member, and neighbours in sorted order differ little in length.
"""

from __future__ import annotations

from collections.abc import Sequence


def length_buckets(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped so that len(batch) * max length <= batch_tokens.

    Longest sequences come first (a batch that does not fit in memory fails early). A
    sequence longer than the budget gets a batch of its own.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        # Sorted descending, so the batch's first member is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches

