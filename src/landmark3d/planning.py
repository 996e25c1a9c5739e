"""The plan: settings the *data* dictates, derived once and stored as ``plan.json``.

What a person chooses lives in the experiment config (:mod:`landmark3d.config`); what follows
from the data — working orientation, coarse grid, fine spacing, patch size, intensity
normalisation, landmark names, correlated groups — lives here, next to every checkpoint, so
inference preprocesses exactly as training did.

Derivation rules (:func:`make_plan`), each overridden by the config when it gives a value:

* **orientation** — always "LPS": images are reoriented (axis permutation/flip only) so that
  index axes i, j, k point along L, P, S.
* **coarse grid** (``coarse.grid``) — the grid's aspect follows the median physical extent of
  the training images (in LPS axis order) and its voxel budget is 96×96×72 for CT (the paper's
  PDDCA grid) and 64³ for MR (the paper's prostate grid): ``g_a = extent_a · (budget /
  Π extent)^(1/3)`` rounded to a multiple of 8 and clipped to [32, 160]. A 500×500×375 mm
  head-and-neck CT gives exactly 96×96×72.
* **fine spacing** (``fine.spacing_mm``) — isotropic, the median over cases of each image's
  coarsest voxel spacing, rounded *down* to whole millimetres, at least 1 mm (PDDCA: 2–3 mm
  slices -> 2 mm; prostate 0.67 mm -> 1 mm — the paper's values).
* **intensity** — CT: a window ``[low, high]`` (``intensity.ct_window``, or learned: ``low`` =
  0.5th percentile of voxels sampled from every training image (air), ``high`` = 99.5th
  percentile of the sampled voxels above -500 (bone, clipping metal)); MR: per-image
  percentile clip then z-score (``intensity.mr_percentiles``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from landmark3d import __version__
from landmark3d.config import ExperimentConfig
from landmark3d.data.dataset import Dataset
from landmark3d.errors import ConfigError, DatasetError
from landmark3d.geometry.space import Geometry
from landmark3d.io.atomic import atomic_write_text

PLAN_VERSION = 1
CT_GRID_BUDGET = 96 * 96 * 72
MR_GRID_BUDGET = 64**3
CT_FOREGROUND_HU = -500.0
VOXELS_PER_CASE = 200_000


@dataclass(frozen=True)
class Plan:
    """Data-derived settings of an experiment.

    Attributes:
        orientation: working orientation of every image ("LPS").
        coarse_grid: coarse input grid (i, j, k) voxels.
        coarse_spacing_mm: median physical extent / grid (informative; each case's coarse
            spacing follows its own extent).
        fine_spacing_mm: patch voxel spacing (mm) along i, j, k.
        patch_size: fine patch voxels (i, j, k).
        intensity: ``{"mode": "ct_window", "low": float, "high": float}`` or
            ``{"mode": "mr_zscore", "percentiles": [low, high]}``.
        landmark_names: model output order.
        correlated_groups: from the dataset spec (dicts with at least ``"landmarks"``).
        modality: "CT" or "MR".
        dataset_name: name of the dataset planned on.
        dataset_fingerprint: hash of case ids and image/landmark file stats (cheap).
        case_ids: cases the plan was derived from.
        median_spacing_mm, median_extent_mm: LPS-ordered data statistics (informative).
        version: plan format version.
        landmark3d_version: package version that wrote the plan.
    """

    orientation: str
    coarse_grid: tuple[int, int, int]
    coarse_spacing_mm: tuple[float, float, float]
    fine_spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    intensity: dict[str, Any]
    landmark_names: list[str]
    correlated_groups: list[dict[str, Any]] = field(default_factory=list)
    modality: str = "CT"
    dataset_name: str = ""
    dataset_fingerprint: str = ""
    case_ids: list[str] = field(default_factory=list)
    median_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    median_extent_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    version: int = PLAN_VERSION
    landmark3d_version: str = __version__

    def __post_init__(self) -> None:
        _validate(self, None)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> Plan:
        """Inverse of :meth:`to_dict`; ConfigError for unknown/missing keys or bad values."""
        known = set(cls.__dataclass_fields__)
        if not isinstance(d, dict):
            raise ConfigError(
                "a plan must be a JSON object.",
                path=source,
                fix="re-create it with `landmark3d plan`.",
            )
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown plan key(s): {', '.join(unknown)}.",
                path=source,
                fix="re-create the plan with this landmark3d version.",
            )
        required = [
            "orientation",
            "coarse_grid",
            "coarse_spacing_mm",
            "fine_spacing_mm",
            "patch_size",
            "intensity",
            "landmark_names",
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(
                f"plan lacks key(s): {', '.join(missing)}.",
                path=source,
                fix="re-create the plan with `landmark3d plan`.",
            )
        kw = dict(d)
        try:
            for k in ("coarse_grid", "patch_size"):
                kw[k] = tuple(int(v) for v in d[k])
            for k in (
                "coarse_spacing_mm",
                "fine_spacing_mm",
                "median_spacing_mm",
                "median_extent_mm",
            ):
                if k in d:
                    kw[k] = tuple(float(v) for v in d[k])
            kw["landmark_names"] = [str(n) for n in d["landmark_names"]]
            kw["case_ids"] = [str(c) for c in d.get("case_ids", [])]
            kw["intensity"] = dict(d["intensity"])
            kw["correlated_groups"] = [dict(g) for g in d.get("correlated_groups", [])]
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"malformed plan value: {exc}.",
                path=source,
                fix="re-create the plan with `landmark3d plan`.",
            ) from None
        try:
            plan = cls(**kw)
        except ConfigError as exc:
            raise ConfigError(exc.problem, path=source, fix=exc.fix) from None
        return plan

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write ``plan.json`` atomically (OutputExistsError if it exists and not ``overwrite``)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", overwrite)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save`."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read plan: {getattr(exc, 'strerror', None) or exc}.",
                path=p,
                fix="run `landmark3d plan` first, or check the path.",
            ) from None
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"plan is not valid JSON: {exc.msg}.",
                path=p,
                line=exc.lineno,
                fix="re-create it with `landmark3d plan`.",
            ) from None
        return cls.from_dict(data, source=p)

    # ------------------------------------------------------------------ keys
    def preprocessing_key(self) -> str:
        """Hash of every field that changes how an image is preprocessed (cache key)."""
        relevant = {
            "orientation": self.orientation,
            "coarse_grid": list(self.coarse_grid),
            "fine_spacing_mm": [round(s, 6) for s in self.fine_spacing_mm],
            "intensity": self.intensity,
            "version": self.version,
        }
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def landmark_index(self, name: str) -> int:
        """Output row of landmark ``name``."""
        try:
            return self.landmark_names.index(name)
        except ValueError:
            raise KeyError(f"unknown landmark {name!r}; plan has {self.landmark_names}") from None


def _validate(plan: Plan, source: str | Path | None) -> None:
    def bad(problem: str) -> ConfigError:
        return ConfigError(problem, path=source, fix="re-create the plan with `landmark3d plan`.")

    if plan.orientation != "LPS":
        raise bad(f"plan orientation must be 'LPS', got {plan.orientation!r}.")
    for name in ("coarse_grid", "patch_size"):
        v = getattr(plan, name)
        if len(v) != 3 or min(v) < 1:
            raise bad(f"plan {name} must be 3 positive integers, got {v}.")
    for name in ("coarse_spacing_mm", "fine_spacing_mm"):
        v = getattr(plan, name)
        if len(v) != 3 or not all(math.isfinite(s) and s > 0 for s in v):
            raise bad(f"plan {name} must be 3 positive numbers, got {v}.")
    mode = plan.intensity.get("mode")
    if mode == "ct_window":
        low, high = plan.intensity.get("low"), plan.intensity.get("high")
        if not (isinstance(low, int | float) and isinstance(high, int | float) and low < high):
            raise bad(f"plan ct_window needs numbers low < high, got {plan.intensity}.")
    elif mode == "mr_zscore":
        p = plan.intensity.get("percentiles")
        if not (isinstance(p, list | tuple) and len(p) == 2 and 0 <= p[0] < p[1] <= 100):
            raise bad(f"plan mr_zscore needs percentiles [low, high], got {plan.intensity}.")
    else:
        raise bad(f"plan intensity mode must be 'ct_window' or 'mr_zscore', got {mode!r}.")
    if not plan.landmark_names or len(set(plan.landmark_names)) != len(plan.landmark_names):
        raise bad("plan landmark_names must be non-empty and unique.")
    if plan.modality not in ("CT", "MR"):
        raise bad(f"plan modality must be 'CT' or 'MR', got {plan.modality!r}.")


# ====================================================================== derivation
def lps_extent_and_spacing(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Physical extent and spacing (mm) of an image along the L, P, S world axes.

    Each index axis is assigned to the world axis its direction is closest to (what
    reorientation to LPS does), so e.g. a sagittal MR reports its slice thickness along L.
    """
    extent = np.zeros(3)
    spacing = np.zeros(3)
    for col in range(3):
        axis = int(np.argmax(np.abs(geometry.direction[:, col])))
        extent[axis] = geometry.size[col] * geometry.spacing[col]
        spacing[axis] = geometry.spacing[col]
    return extent, spacing


def derive_coarse_grid(median_extent_mm: Sequence[float], modality: str) -> tuple[int, int, int]:
    """Coarse grid whose aspect follows the median extent, budget 96·96·72 (CT) or 64³ (MR)."""
    ext = np.maximum(np.asarray(median_extent_mm, dtype=np.float64), 1e-3)
    budget = CT_GRID_BUDGET if modality == "CT" else MR_GRID_BUDGET
    scale = (budget / float(np.prod(ext))) ** (1.0 / 3.0)
    grid = np.clip(np.round(ext * scale / 8.0) * 8.0, 32, 160).astype(int)
    return (int(grid[0]), int(grid[1]), int(grid[2]))


def derive_fine_spacing(max_spacings_mm: Sequence[float]) -> tuple[float, float, float]:
    """Isotropic spacing: median of each case's coarsest spacing, floored to whole mm, >= 1."""
    s = max(1.0, math.floor(float(np.median(max_spacings_mm)) + 1e-6))
    return (s, s, s)


def learn_ct_window(samples: np.ndarray) -> tuple[float, float]:
    """``(low, high)`` HU from voxel samples: p0.5 of all, p99.5 of those above -500 HU."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        raise DatasetError(
            "no finite voxels to learn the CT intensity window from.",
            fix="check the images, or set intensity.ct_window in the config.",
        )
    low = float(np.percentile(samples, 0.5))
    fg = samples[samples > CT_FOREGROUND_HU]
    if fg.size < 0.01 * samples.size:  # not HU-like (e.g. synthetic data): use all voxels
        fg = samples
    high = float(np.percentile(fg, 99.5))
    if not high > low:
        high = low + 1.0
    return low, high


def dataset_fingerprint(dataset: Dataset, case_ids: Sequence[str]) -> str:
    """sha256 over case ids and the size/mtime of their image and landmark files."""
    h = hashlib.sha256()
    h.update(dataset.name.encode())
    h.update(json.dumps(list(dataset.landmark_names)).encode())
    for cid in case_ids:
        case = dataset.case(cid)
        h.update(cid.encode())
        sources = [case.image, dataset.landmark_source(case)]
        for p in sources:
            h.update(file_stamp(p).encode())
    return h.hexdigest()[:32]


def file_stamp(path: str | Path | None) -> str:
    """``"path|size|mtime_ns"`` of a file or directory ("-" when absent) — a cheap identity."""
    if path is None:
        return "-"
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}|missing"
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def make_plan(
    dataset: Dataset, config: ExperimentConfig, case_ids: Sequence[str] | None = None
) -> Plan:
    """Derive the plan from the images of ``case_ids`` (default: every case of the dataset).

    Reads each image once (headers for geometry; voxels for the CT window when the config
    does not fix one). Pass the *training* case ids so no validation data leaks into it.
    """
    ids = list(case_ids) if case_ids is not None else dataset.case_ids
    if not ids:
        raise DatasetError(
            "no cases to plan from.",
            path=dataset.source,
            fix="add cases to the dataset or pass training case ids.",
        )
    modality = str(dataset.modality).upper()
    learn_window = modality == "CT" and config.intensity.ct_window is None
    rng = np.random.default_rng(config.seed)
    extents, max_spacings, spacings, samples = [], [], [], []
    for cid in ids:
        image = dataset.read_image(cid)
        ext, sp = lps_extent_and_spacing(Geometry.from_sitk(image))
        extents.append(ext)
        spacings.append(sp)
        max_spacings.append(float(sp.max()))
        if learn_window:
            arr = sitk.GetArrayViewFromImage(image).ravel()
            idx = rng.integers(0, arr.size, size=min(VOXELS_PER_CASE, arr.size))
            samples.append(np.asarray(arr[idx], dtype=np.float64))
    median_extent = np.median(np.stack(extents), axis=0)
    median_spacing = np.median(np.stack(spacings), axis=0)

    grid = config.coarse.grid or derive_coarse_grid(median_extent, modality)
    fine = config.fine.spacing_mm or derive_fine_spacing(max_spacings)
    intensity: dict[str, Any]
    if modality == "CT":
        if config.intensity.ct_window is not None:
            low, high = config.intensity.ct_window
        else:
            low, high = learn_ct_window(np.concatenate(samples))
        intensity = {"mode": "ct_window", "low": float(low), "high": float(high)}
    else:
        intensity = {"mode": "mr_zscore", "percentiles": list(config.intensity.mr_percentiles)}

    return Plan(
        orientation="LPS",
        coarse_grid=(int(grid[0]), int(grid[1]), int(grid[2])),
        coarse_spacing_mm=tuple(float(e / g) for e, g in zip(median_extent, grid, strict=True)),  # type: ignore[arg-type]
        fine_spacing_mm=(float(fine[0]), float(fine[1]), float(fine[2])),
        patch_size=config.fine.patch_size,
        intensity=intensity,
        landmark_names=list(dataset.landmark_names),
        correlated_groups=[dict(g) for g in dataset.correlated_groups],
        modality=modality,
        dataset_name=dataset.name,
        dataset_fingerprint=dataset_fingerprint(dataset, ids),
        case_ids=ids,
        median_spacing_mm=tuple(float(v) for v in median_spacing),  # type: ignore[arg-type]
        median_extent_mm=tuple(float(v) for v in median_extent),  # type: ignore[arg-type]
    )
