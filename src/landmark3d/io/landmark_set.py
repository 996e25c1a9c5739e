"""The in-memory landmark set: named points in world LPS millimetres.

A missing landmark is explicit — its row is NaN and ``missing_reason`` says why — never a
silent zero. Per-landmark extra fields (e.g. ``confidence``, ``expected_error_mm``) travel in
``extras`` so that writers able to store them can do so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray


@dataclass
class LandmarkSet:
    """Named 3D landmarks in world LPS mm.

    Attributes:
        names: landmark names, unique, in a fixed order.
        coords: shape (N, 3) float64, LPS mm; a row of NaN marks a missing landmark.
        missing_reason: name -> why it is missing (only for missing landmarks).
        extras: name -> {field: value} additional per-landmark data (confidence, ...).
    """

    names: list[str]
    coords: NDArray[np.float64]
    missing_reason: dict[str, str] = field(default_factory=dict)
    extras: dict[str, dict[str, float | str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.coords = np.asarray(self.coords, dtype=np.float64).reshape(-1, 3)
        if len(self.names) != self.coords.shape[0]:
            raise ValueError(f"{len(self.names)} names but {self.coords.shape[0]} coordinates")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"duplicate landmark names: {', '.join(dup)}")
        # A partially-NaN row is meaningless: make the whole row missing.
        partial = np.asarray(np.isnan(self.coords).any(axis=1), dtype=bool)
        self.coords[partial] = np.nan
        for n, miss in zip(self.names, partial.tolist(), strict=True):
            if miss:
                self.missing_reason.setdefault(n, "missing")

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dict(
        cls,
        points: Mapping[str, ArrayLike | None],
        missing_reason: Mapping[str, str] | None = None,
    ) -> LandmarkSet:
        """Build from ``{name: (x, y, z) or None}`` (LPS mm); ``None`` means missing."""
        names = list(points)
        coords = np.full((len(names), 3), np.nan)
        for row, name in enumerate(names):
            p = points[name]
            if p is not None:
                coords[row] = np.asarray(p, dtype=np.float64).reshape(3)
        return cls(names, coords, dict(missing_reason or {}))

    @classmethod
    def empty(cls, names: Sequence[str], reason: str = "not predicted") -> LandmarkSet:
        """All landmarks missing."""
        return cls(list(names), np.full((len(names), 3), np.nan), {n: reason for n in names})

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        """Row of ``name``; KeyError naming the known landmarks if absent."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown landmark {name!r}; known: {', '.join(self.names)}") from None

    def get(self, name: str) -> NDArray[np.float64] | None:
        """LPS mm position of ``name``, or None if it is missing."""
        p = self.coords[self.index(name)]
        return None if np.isnan(p).any() else p.copy()

    def is_missing(self, name: str) -> bool:
        return bool(np.isnan(self.coords[self.index(name)]).any())

    @property
    def present(self) -> NDArray[np.bool_]:
        """Shape (N,) mask of landmarks that have coordinates."""
        return np.asarray(~np.isnan(self.coords).any(axis=1), dtype=bool)

    def as_dict(self) -> dict[str, NDArray[np.float64] | None]:
        return {n: self.get(n) for n in self.names}

    def subset(self, names: Iterable[str]) -> LandmarkSet:
        """The landmarks ``names`` in that order; names not present here become missing."""
        names = list(names)
        coords = np.full((len(names), 3), np.nan)
        reasons: dict[str, str] = {}
        extras: dict[str, dict[str, float | str]] = {}
        for row, n in enumerate(names):
            if n in self.names:
                coords[row] = self.coords[self.index(n)]
                if n in self.missing_reason:
                    reasons[n] = self.missing_reason[n]
                if n in self.extras:
                    extras[n] = dict(self.extras[n])
            else:
                reasons[n] = "not annotated"
        return LandmarkSet(names, coords, reasons, extras)

    def transformed(self, fn: object) -> LandmarkSet:
        """A copy with ``fn`` (a callable (M, 3) -> (M, 3)) applied to present points."""
        if not callable(fn):
            raise TypeError("fn must be callable")
        coords = self.coords.copy()
        mask = self.present
        if mask.any():
            coords[mask] = np.asarray(fn(coords[mask]), dtype=np.float64)
        return LandmarkSet(
            list(self.names),
            coords,
            dict(self.missing_reason),
            {k: dict(v) for k, v in self.extras.items()},
        )


def lps_to_ras(points: ArrayLike) -> NDArray[np.float64]:
    """Flip the first two axes (LPS <-> RAS are each other's inverse); shape (..., 3)."""
    p = np.array(points, dtype=np.float64)
    p[..., 0] *= -1.0
    p[..., 1] *= -1.0
    return p


ras_to_lps = lps_to_ras
