"""Closest-name suggestions for error messages ("did you mean 'batch_size'?").

difflib's ratio alone can prefer a merely similar name over the one a typo came from
(``bptch_size`` -> ``patch_size`` instead of ``batch_size``), so a candidate one edit away
(deletion, insertion, substitution, transposition) wins first.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest_match(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The entry of ``choices`` most like ``name`` (case-insensitive), or None if none is close.

    An exact (case-insensitive) match first, then entries one edit away (the most similar of
    them by difflib's ratio), then difflib's closest at ``cutoff``.
    """
    lowered = {c.lower(): c for c in choices}
    key = name.lower()
    if key in lowered:
        return lowered[key]
    near = [c for c in lowered if one_edit_apart(key, c)]
    if near:
        return lowered[max(near, key=lambda c: difflib.SequenceMatcher(None, key, c).ratio())]
    found = difflib.get_close_matches(key, list(lowered), n=1, cutoff=cutoff)
    return lowered[found[0]] if found else None


def one_edit_apart(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one deletion, insertion, substitution or transposition."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (
            len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )  # fmt: skip
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))
