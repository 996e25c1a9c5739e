"""Annotation-prior discovery: which landmarks were annotated on one common key slice.

Annotators often place a landmark by reference to another one on the *same image slice*
(PDDCA: ``occ_bone`` on the sagittal slice chosen for ``chin``). Such a *correlated group*
shows up in the annotations as landmarks whose voxel coordinate along one image axis agrees in
(almost) every case. :func:`discover_groups` finds these groups from the landmark files and the
image *headers* alone (no voxel is read), and :func:`apply_groups_to_spec` writes them into
``dataset.json`` (``"correlated_groups"``), where planning and the correlated fine model pick
them up.

Axes are those of the **canonical** image: the image reoriented to LPS by axis permutation and
flips only (:func:`landmark3d.geometry.resample.canonical`, ``sitk.DICOMOrient``), so ``i``
runs (roughly) left-right, ``j`` anterior-posterior and ``k`` superior-inferior whatever the
storage order. For an oblique image the canonical axes stay oblique: the key slice is a slice of
the image the annotator looked at, not a world plane.

Algorithm, per canonical axis: two landmarks are *joined* when, in at least ``min_fraction`` of
the cases where both are annotated (and at least ``min_cases`` such cases), their continuous
canonical voxel coordinates along that axis differ by at most ``tolerance_vox``. Groups are the
maximal cliques (every pair joined) of two or more landmarks, found by Bron-Kerbosch — a
dataset has few landmarks. Landmarks that coincide along every axis (duplicate annotations)
would form the same group on all three axes; such a group is reported once, flagged
``coincident``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from landmark3d.data.dataset import SPEC_FILENAME, Dataset, did_you_mean, load_dataset
from landmark3d.errors import ConfigError, DatasetError
from landmark3d.geometry.resample import canonical
from landmark3d.geometry.space import Geometry
from landmark3d.io.atomic import atomic_write_text

AXIS_LETTERS: tuple[str, str, str] = ("i", "j", "k")
AXIS_NAMES: tuple[str, str, str] = ("L-R", "A-P", "S-I")
"""Anatomical direction of the canonical (LPS) image axes i, j, k."""


# ---------------------------------------------------------------------------- geometry
def canonical_geometry(geometry: Geometry, orientation: str = "LPS") -> Geometry:
    """The geometry :func:`~landmark3d.geometry.resample.canonical` gives an image, voxel-free.

    ``sitk.DICOMOrient`` only permutes and flips axes; which ones depends on the direction
    alone, so it is run on a 1-voxel image carrying ``geometry.direction`` and the permutation
    and flips are read off the result. Size and spacing follow the permutation; the origin is
    the world position of the original voxel that becomes canonical voxel (0, 0, 0).

    Args:
        geometry: the stored image's grid.
        orientation: target orientation code (DICOM style, default ``"LPS"``).

    Returns:
        The canonical grid; ``world_to_index`` on it gives canonical continuous indices.
    """
    dummy = sitk.Image(1, 1, 1, sitk.sitkUInt8)
    dummy.SetDirection(tuple(float(v) for v in geometry.direction.ravel()))
    target = np.asarray(canonical(dummy, orientation).GetDirection(), dtype=np.float64)
    target = target.reshape(3, 3)
    dots = geometry.direction.T @ target  # [stored axis, canonical axis]
    perm = [int(np.argmax(np.abs(dots[:, a]))) for a in range(3)]
    if sorted(perm) != [0, 1, 2]:  # pragma: no cover - DICOMOrient returns a permutation
        raise ValueError(f"reorientation is not an axis permutation: {perm}")
    flips = [bool(dots[perm[a], a] < 0) for a in range(3)]
    corner = np.zeros(3)
    for a in range(3):
        if flips[a]:
            corner[perm[a]] = geometry.size[perm[a]] - 1
    return Geometry(
        size=tuple(geometry.size[p] for p in perm),  # type: ignore[arg-type]
        spacing=geometry.spacing[perm],
        origin=geometry.index_to_world(corner),
        direction=target,
    )


def read_geometry(dataset: Dataset, case_id: str) -> Geometry:
    """The grid of a case's image from its header only (full read for DICOM directories).

    A 4D image whose 4th axis has length 1 is taken as 3D, as :func:`read_image` does. Anything
    the header reader cannot handle falls back to :meth:`Dataset.read_image`, which raises an
    :class:`~landmark3d.errors.ImageError` with a fix for unusable images.
    """
    path = dataset.case(case_id).image
    if path.is_file():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            header_ok = True
        except RuntimeError:
            header_ok = False
        if header_ok:
            dim, size = reader.GetDimension(), reader.GetSize()
            if dim == 3 or (dim == 4 and size[3] == 1):
                direction = np.asarray(reader.GetDirection(), dtype=np.float64)
                return Geometry(
                    size=(int(size[0]), int(size[1]), int(size[2])),
                    spacing=np.asarray(reader.GetSpacing()[:3]),
                    origin=np.asarray(reader.GetOrigin()[:3]),
                    direction=direction.reshape(dim, dim)[:3, :3],
                )
    return Geometry.from_sitk(dataset.read_image(case_id))


# ---------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class CorrelatedGroup:
    """Landmarks annotated on one common key slice.

    Attributes:
        landmarks: member names, in the dataset's landmark order.
        axis: ``"i"``, ``"j"`` or ``"k"`` — the canonical (LPS-reoriented) image axis normal to
            the key slice.
        axis_name: anatomical name of that axis (``"L-R"``, ``"A-P"``, ``"S-I"``).
        fraction: share of the cases (with >= 2 members annotated) in which all annotated
            members lie within the tolerance of each other along ``axis``.
        spread_mm: mean over those cases of the members' along-axis spread (max - min), mm.
        max_spread_mm: the largest such spread, mm.
        n_cases: number of cases with at least two members annotated.
        coincident: the members also agree along the two other axes (duplicate annotations
            rather than a key-slice group); such a group is reported once, on its first axis.
    """

    landmarks: list[str]
    axis: str
    axis_name: str
    fraction: float
    spread_mm: float
    max_spread_mm: float
    n_cases: int
    coincident: bool = False

    @property
    def axis_index(self) -> int:
        """0, 1 or 2 for ``axis`` i, j, k."""
        return AXIS_LETTERS.index(self.axis)

    def to_dict(self) -> dict[str, Any]:
        """The ``dataset.json`` / ``plan.json`` form."""
        return {
            "landmarks": list(self.landmarks),
            "axis": self.axis,
            "axis_name": self.axis_name,
            "fraction": round(float(self.fraction), 6),
            "spread_mm": round(float(self.spread_mm), 6),
            "max_spread_mm": round(float(self.max_spread_mm), 6),
            "n_cases": int(self.n_cases),
            "coincident": bool(self.coincident),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CorrelatedGroup:
        """Inverse of :meth:`to_dict` (statistics default to 0 when absent)."""
        axis = str(d.get("axis", ""))
        if axis not in AXIS_LETTERS:
            raise ValueError(f"group axis must be one of i, j, k, got {axis!r}")
        return cls(
            landmarks=[str(n) for n in d["landmarks"]],
            axis=axis,
            axis_name=str(d.get("axis_name", AXIS_NAMES[AXIS_LETTERS.index(axis)])),
            fraction=float(d.get("fraction", 0.0)),
            spread_mm=float(d.get("spread_mm", 0.0)),
            max_spread_mm=float(d.get("max_spread_mm", 0.0)),
            n_cases=int(d.get("n_cases", 0)),
            coincident=bool(d.get("coincident", False)),
        )


def canonical_positions(
    dataset: Dataset,
    case_ids: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], NDArray[np.float64], NDArray[np.float64]]:
    """Landmark positions as canonical continuous voxel indices, per annotated case.

    Args:
        dataset: the dataset.
        case_ids: cases to use (default: every case); cases without landmarks are skipped.
        progress: called with the number of cases done after each case.

    Returns:
        ``(case_ids_used, index, spacing)``: ``index`` of shape (C, L, 3) in the canonical
        image's (i, j, k), NaN for missing landmarks, landmarks in ``dataset.landmark_names``
        order; ``spacing`` (C, 3) canonical voxel size in mm.
    """
    ids = dataset.case_ids if case_ids is None else [dataset.case(c).id for c in case_ids]
    used: list[str] = []
    index: list[NDArray[np.float64]] = []
    spacing: list[NDArray[np.float64]] = []
    for n, cid in enumerate(ids):
        if dataset.has_landmarks(cid):
            geo = canonical_geometry(read_geometry(dataset, cid))
            coords = dataset.read_landmarks(cid).coords
            index.append(geo.world_to_index(coords))
            spacing.append(geo.spacing.copy())
            used.append(cid)
        if progress is not None:
            progress(n + 1)
    n_lm = len(dataset.landmark_names)
    if not used:
        return used, np.zeros((0, n_lm, 3)), np.zeros((0, 3))
    return used, np.stack(index), np.stack(spacing)


def _maximal_cliques(adjacency: list[set[int]]) -> list[list[int]]:
    """All maximal cliques of an undirected graph (Bron-Kerbosch with pivoting), sorted."""
    out: list[list[int]] = []

    def expand(r: set[int], p: set[int], x: set[int]) -> None:
        if not p and not x:
            out.append(sorted(r))
            return
        pivot = max(p | x, key=lambda u: len(adjacency[u] & p))
        for v in sorted(p - adjacency[pivot]):
            expand(r | {v}, p & adjacency[v], x & adjacency[v])
            p = p - {v}
            x = x | {v}

    expand(set(), set(range(len(adjacency))), set())
    return sorted(out)


def _joined(
    pos: NDArray[np.float64], tol: NDArray[np.float64], min_fraction: float, min_cases: int
) -> NDArray[np.bool_]:
    """(L, L) pairs agreeing within ``tol`` (per case) in enough of the cases with both.

    ``pos`` (C, L) coordinates along one axis in voxels, NaN = missing; ``tol`` (C,) voxels.
    """
    diff = np.abs(pos[:, :, None] - pos[:, None, :])  # (C, L, L), NaN where either is missing
    both = ~np.isnan(diff)
    agree = (diff <= tol[:, None, None]) & both
    n_both = both.sum(axis=0)
    frac = agree.sum(axis=0) / np.maximum(n_both, 1)
    ok = (n_both >= min_cases) & (frac >= min_fraction - 1e-12)
    np.fill_diagonal(ok, False)
    return np.asarray(ok, dtype=bool)


def _group_stats(
    pos_vox: NDArray[np.float64], spacing: NDArray[np.float64], tol: float
) -> tuple[float, float, float, int]:
    """(fraction, mean spread mm, max spread mm, n cases) of members' coordinates (C, M)."""
    present = ~np.isnan(pos_vox)
    usable = present.sum(axis=1) >= 2
    if not usable.any():
        return 0.0, 0.0, 0.0, 0
    p = pos_vox[usable]
    spread = np.nanmax(p, axis=1) - np.nanmin(p, axis=1)
    spread_mm = spread * spacing[usable]
    fraction = float(np.mean(spread <= tol + 1e-12))
    return fraction, float(spread_mm.mean()), float(spread_mm.max()), int(usable.sum())


def discover_groups(
    dataset: Dataset | str | Path,
    case_ids: Sequence[str] | None = None,
    tolerance_vox: float = 0.5,
    min_fraction: float = 0.9,
    *,
    min_cases: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[CorrelatedGroup]:
    """Find groups of landmarks annotated on one common slice of the canonical image.

    Args:
        dataset: a :class:`Dataset`, or a path :func:`load_dataset` accepts.
        case_ids: cases to learn from (default: all annotated cases). Use the training cases
            of a fold to keep the prior free of validation annotations.
        tolerance_vox: largest along-axis difference (canonical voxels of each case) still
            counted as "the same slice".
        min_fraction: share of the cases (where both are annotated) in which a pair must agree.
        min_cases: fewest cases with both landmarks annotated for a pair to count.
        progress: called with the number of cases read so far.

    Returns:
        Groups sorted by axis, then by their first member's position in the landmark list;
        members in the dataset's landmark order. Empty when nothing qualifies.

    Raises:
        ConfigError: a parameter is out of range.
        DatasetError: none of the chosen cases is annotated.
    """
    if not (np.isfinite(tolerance_vox) and tolerance_vox >= 0):
        raise ConfigError(
            f"tolerance_vox must be >= 0, got {tolerance_vox}.", fix="e.g. --tolerance 0.5"
        )
    if not 0.0 < min_fraction <= 1.0:
        raise ConfigError(
            f"min_fraction must be in (0, 1], got {min_fraction}.", fix="e.g. --min-fraction 0.9"
        )
    if min_cases < 1:
        raise ConfigError(f"min_cases must be >= 1, got {min_cases}.", fix="e.g. 2")
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    used, index, spacing = canonical_positions(ds, case_ids, progress)
    if not used:
        raise DatasetError(
            "none of the chosen cases has landmark annotations.",
            path=ds.source,
            fix="give cases with landmark files (check the spec's case list / --cases).",
        )
    names = ds.landmark_names
    tol = np.full(len(used), float(tolerance_vox))
    joined = [_joined(index[:, :, a], tol, min_fraction, min_cases) for a in range(3)]
    coincident_pairs = joined[0] & joined[1] & joined[2]
    found: list[CorrelatedGroup] = []
    seen_coincident: set[tuple[int, ...]] = set()
    for a in range(3):
        adjacency = [set(np.flatnonzero(row).tolist()) for row in joined[a]]
        for clique in _maximal_cliques(adjacency):
            if len(clique) < 2:
                continue
            coincident = all(coincident_pairs[u, v] for u in clique for v in clique if u != v)
            if coincident:
                if tuple(clique) in seen_coincident:
                    continue
                seen_coincident.add(tuple(clique))
            fraction, spread, worst, n = _group_stats(
                index[:, clique, a], spacing[:, a], float(tolerance_vox)
            )
            found.append(
                CorrelatedGroup(
                    landmarks=[names[m] for m in clique],
                    axis=AXIS_LETTERS[a],
                    axis_name=AXIS_NAMES[a],
                    fraction=fraction,
                    spread_mm=spread,
                    max_spread_mm=worst,
                    n_cases=n,
                    coincident=coincident,
                )
            )
    return found


# ---------------------------------------------------------------------------- spec
def apply_groups_to_spec(
    dataset_json_path: str | Path, groups: Iterable[CorrelatedGroup | Mapping[str, Any]]
) -> Path:
    """Write ``groups`` as ``"correlated_groups"`` of a ``dataset.json`` (atomically).

    Every other key of the spec is kept as it is (in order); existing groups are replaced.

    Args:
        dataset_json_path: the spec, or the directory holding ``dataset.json``.
        groups: :class:`CorrelatedGroup` objects or their dict form.

    Returns:
        The path of the spec written.

    Raises:
        DatasetError: the spec is missing, not a JSON object, or a group names a landmark the
            spec does not list.
    """
    path = Path(dataset_json_path)
    if path.is_dir():
        path = path / SPEC_FILENAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"cannot read the dataset spec: {e}",
            path=path,
            fix="give an existing dataset.json (or its directory).",
        ) from None
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"not valid JSON: {e.msg} (column {e.colno}).",
            path=path,
            line=e.lineno,
            fix="correct the JSON syntax.",
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("landmarks"), list):
        raise DatasetError(
            'the spec is not a JSON object with a "landmarks" list.',
            path=path,
            fix="give a dataset.json (see docs/dataset_format.md).",
        )
    known = [str(n) for n in data["landmarks"]]
    entries = [g.to_dict() if isinstance(g, CorrelatedGroup) else dict(g) for g in groups]
    for g in entries:
        for name in g.get("landmarks", []):
            if name not in known:
                raise DatasetError(
                    f"correlated group names {name!r}, which the spec does not list."
                    f"{did_you_mean(str(name), known)}",
                    path=path,
                    fix="discover the groups on this dataset, or add the landmark to the spec.",
                )
    data["correlated_groups"] = entries
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
