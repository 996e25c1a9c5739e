"""How an epoch's samples are cut into batches: one rule for every stage (and for the
distributed training checks that must know the batch sizes before training)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_batches(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """Split ``items`` into consecutive batches of ``batch_size``; a trailing batch of 1 joins
    the previous one (batch-1 3D convolutions are disproportionately slow on CPU).

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2].extend(out.pop())
    return out


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches :func:`split_batches` cuts ``n`` samples into."""
    return [len(b) for b in split_batches(range(n), batch_size)]
