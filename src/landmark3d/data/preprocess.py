"""Preprocessing shared by training and inference (numpy + SimpleITK; no torch).

A case is prepared once — reoriented to LPS, intensity-normalised, resampled to the plan's fine
spacing — and cached on disk; coarse inputs and fine patches are then resampled from it with
their *geometry*, so image and landmarks always move together.

Intensity normalisation (``plan.intensity``):

* CT (``ct_window``): clip to ``[low, high]`` HU and map linearly to **[0, 1]** (0 = air or
  below the window). Padding outside the image uses 0 too, so it looks like air.
* MR (``mr_zscore``): clip each image to its own ``percentiles`` and z-score it (mean 0,
  SD 1 over the whole clipped image). Padding uses the image's minimum (its dark background).

Normalised coarse coordinates: along each axis of a coarse grid of ``size`` voxels,
``t = 2 · index / (size − 1) − 1`` — −1 at the centre of the first voxel, +1 at the centre of
the last. :func:`to_normalized` and :func:`from_normalized` are the only conversions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

from landmark3d.config import AugmentConfig, FineConfig
from landmark3d.data.dataset import Dataset
from landmark3d.errors import ImageError
from landmark3d.geometry.heatmap import gaussian_heatmaps
from landmark3d.geometry.resample import (
    canonical,
    crop_patch,
    grid_covering,
    patch_geometry,
    random_affine_geometry,
    resample,
    resample_to_spacing,
)
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.io.atomic import atomic_path, atomic_write_text
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.planning import Plan, file_stamp

F32 = NDArray[np.float32]


# ====================================================================== intensity
def normalize(array: ArrayLike, intensity: Mapping[str, Any]) -> F32:
    """Normalise voxel values by the plan's intensity rule (see module docstring).

    Args:
        array: raw voxels (any shape; CT in HU).
        intensity: ``plan.intensity``.

    Returns:
        float32 array of the same shape: CT in [0, 1]; MR z-scored.
    """
    mode = intensity.get("mode")
    if mode == "ct_window":
        low, high = float(intensity["low"]), float(intensity["high"])
        # one float32 copy, then in place: a 512x512x300 CT needs 315 MB here, not 1.3 GB
        out = np.array(array, dtype=np.float32)
        np.clip(out, low, high, out=out)
        out -= np.float32(low)
        out /= np.float32(high - low)
        return out
    a = np.asarray(array, dtype=np.float32)
    if mode == "mr_zscore":
        p_lo, p_hi = (float(p) for p in intensity["percentiles"])
        lo, hi = np.percentile(a, [p_lo, p_hi])
        c = np.clip(a, lo, hi)  # float64: the percentiles are float64, so the statistics
        std = float(c.std())  # cannot overflow even for uint64 / float32-max images
        return ((c - float(c.mean())) / max(std, 1e-6)).astype(np.float32)
    raise ValueError(f"unknown intensity mode {mode!r}")


def intensity_augment(array: F32, rng: np.random.Generator, amount: float) -> F32:
    """Random intensity scale ``1 ± amount`` and shift ``± amount`` (paper: 0.1).

    ``out = array · (1 + U(−a, a)) + U(−a, a)``; float32, same shape.
    """
    if amount <= 0:
        return np.asarray(array, dtype=np.float32)
    scale = 1.0 + rng.uniform(-amount, amount)
    shift = rng.uniform(-amount, amount)
    return (np.asarray(array, dtype=np.float32) * np.float32(scale) + np.float32(shift)).astype(
        np.float32
    )


# ====================================================================== prepared case
@dataclass
class PreparedCase:
    """A case ready for sampling.

    Attributes:
        case_id: the dataset's case id.
        image: LPS-reoriented, normalised float32 image at ``plan.fine_spacing_mm``.
        coarse_image: ``image`` low-pass filtered and resampled to about half the coarse grid
            spacing — the anti-aliased source of coarse inputs.
        canonical_geometry: geometry of the LPS-reoriented original image (what the coarse grid
            covers).
        landmarks: landmarks in ``plan.landmark_names`` order, LPS mm (NaN rows = missing).
        background: normalised value used to pad outside the image.
    """

    case_id: str
    image: sitk.Image
    coarse_image: sitk.Image
    canonical_geometry: Geometry
    landmarks: LandmarkSet
    background: float = 0.0

    @property
    def geometry(self) -> Geometry:
        """Geometry of :attr:`image` (fine spacing)."""
        return Geometry.from_sitk(self.image)


def _coarse_source(fine: sitk.Image, canonical_geometry: Geometry, plan: Plan) -> sitk.Image:
    """Anti-aliased copy of ``fine`` for coarse sampling (smoothed, ~half coarse spacing)."""
    coarse = grid_covering(canonical_geometry, plan.coarse_grid)
    fine_sp = np.asarray(fine.GetSpacing(), dtype=np.float64)
    coarse_sp = coarse.spacing
    # low-pass: sigma (mm) grows with how much coarser the coarse grid is than the fine one
    sigma = 0.5 * np.sqrt(np.maximum(coarse_sp**2 - fine_sp**2, 0.0))
    out = fine
    if min(fine.GetSize()) >= 4:
        # per axis: ITK's recursive Gaussian refuses sigma 0, which happens along an axis on
        # which the coarse grid is not coarser than the fine one (e.g. a cropped scan)
        for axis, s in enumerate(sigma.tolist()):
            if s > 0.25 * fine_sp[axis]:
                out = sitk.RecursiveGaussian(
                    out, float(s), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis
                )
    target = np.maximum(fine_sp, coarse_sp / 2.0)
    if np.any(target > 1.25 * fine_sp):  # worth storing a smaller image
        out = resample_to_spacing(out, tuple(float(t) for t in target))
    return out


def prepare_case(
    image: sitk.Image, landmarks: LandmarkSet | None, plan: Plan, case_id: str = ""
) -> PreparedCase:
    """Reorient to LPS, normalise, resample to the fine spacing; build the coarse source.

    Args:
        image: the raw 3D image (any orientation).
        landmarks: its landmarks (LPS mm) or None (inference: all missing).
        plan: the plan.
        case_id: recorded in the result.
    """
    can = canonical(image, plan.orientation)
    can_geom = Geometry.from_sitk(can)
    # voxelwise normalisation: the array's axis order does not matter here
    raw = sitk.GetArrayViewFromImage(can)
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise ImageError(
                f"case {case_id!r}: image has NaN/inf voxels.", fix="repair or exclude the image."
            )
        peak = max(abs(float(raw.max())), abs(float(raw.min()))) if raw.size else 0.0
        if peak > float(np.finfo(np.float32).max):  # only float64 images can get here
            raise ImageError(
                f"case {case_id!r}: voxel values reach {peak:.3g}, beyond the float32 range "
                "(3.4e38) used for processing.",
                fix="rescale the image intensities (e.g. to HU for CT) and save it again.",
            )
    norm = normalize(raw, plan.intensity)  # float32: integers (even 64 bit) fit its range
    background = 0.0 if plan.intensity.get("mode") == "ct_window" else float(norm.min())
    norm_img = sitk.GetImageFromArray(norm)
    norm_img.CopyInformation(can)
    del norm, raw, can  # bounded memory: only the normalised image goes on to the resampling
    fine = sitk.Cast(resample_to_spacing(norm_img, plan.fine_spacing_mm), sitk.sitkFloat32)
    del norm_img
    coarse_src = sitk.Cast(_coarse_source(fine, can_geom, plan), sitk.sitkFloat32)
    if landmarks is None:
        lms = LandmarkSet.empty(plan.landmark_names, "not annotated")
    else:
        lms = landmarks.subset(plan.landmark_names)
    return PreparedCase(case_id, fine, coarse_src, can_geom, lms, background)


# ====================================================================== disk cache
def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]", "_", name)[:80] or "case"


@dataclass
class CaseCache:
    """Prepared cases on disk (``.npy`` arrays + geometry JSON; never pickle).

    Entries are keyed by case id, the image and landmark files' path/size/mtime and
    ``plan.preprocessing_key()``: editing a file or changing the plan prepares the case anew.

    Args:
        cache_dir: directory for the cache files (created on demand).
        plan: the plan the cases are prepared for.
        keep_in_memory: also keep prepared cases in a dict for this object's lifetime.
    """

    cache_dir: Path
    plan: Plan
    keep_in_memory: bool = False
    _memory: dict[str, PreparedCase] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)

    def key(self, dataset: Dataset, case_id: str) -> str:
        """Cache key of ``case_id`` (16 hex digits)."""
        case = dataset.case(case_id)
        parts = [
            case.id,
            file_stamp(case.image),
            file_stamp(dataset.landmark_source(case)),
            self.plan.preprocessing_key(),
            ",".join(self.plan.landmark_names),
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _paths(self, case_id: str, key: str) -> tuple[Path, Path, Path]:
        stem = self.cache_dir / f"{_safe(case_id)}.{key}"
        return (
            stem.with_name(stem.name + ".json"),
            stem.with_name(stem.name + ".fine.npy"),
            stem.with_name(stem.name + ".coarse.npy"),
        )

    def get(self, dataset: Dataset, case_id: str) -> PreparedCase:
        """The prepared case, from memory, disk, or by preparing (and storing) it."""
        key = self.key(dataset, case_id)
        mem_key = f"{case_id}.{key}"
        if mem_key in self._memory:
            return self._memory[mem_key]
        prepared = self._load(case_id, key)
        if prepared is None:
            lms = dataset.read_landmarks(case_id) if dataset.has_landmarks(case_id) else None
            prepared = prepare_case(dataset.read_image(case_id), lms, self.plan, case_id)
            self._store(prepared, key)
        if self.keep_in_memory:
            self._memory[mem_key] = prepared
        return prepared

    def _store(self, p: PreparedCase, key: str) -> None:
        meta_path, fine_path, coarse_path = self._paths(p.case_id, key)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fine, coarse = Volume.from_sitk(p.image), Volume.from_sitk(p.coarse_image)
        for path, vol in ((fine_path, fine), (coarse_path, coarse)):
            with atomic_path(path) as tmp:
                np.save(tmp, vol.array, allow_pickle=False)
        coords = [
            [None if math.isnan(v) else v for v in row] for row in p.landmarks.coords.tolist()
        ]
        meta = {
            "case_id": p.case_id,
            "key": key,
            "fine_geometry": fine.geometry.to_dict(),
            "coarse_geometry": coarse.geometry.to_dict(),
            "canonical_geometry": p.canonical_geometry.to_dict(),
            "background": p.background,
            "landmarks": {
                "names": p.landmarks.names,
                "coords": coords,
                "missing_reason": p.landmarks.missing_reason,
            },
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=1))  # written last: marks complete

    def _load(self, case_id: str, key: str) -> PreparedCase | None:
        meta_path, fine_path, coarse_path = self._paths(case_id, key)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            fine = Volume(
                np.load(fine_path, allow_pickle=False),
                Geometry.from_dict(meta["fine_geometry"]),
            )
            coarse = Volume(
                np.load(coarse_path, allow_pickle=False),
                Geometry.from_dict(meta["coarse_geometry"]),
            )
            lm = meta["landmarks"]
            coords = np.array(
                [[np.nan if v is None else v for v in row] for row in lm["coords"]],
                dtype=np.float64,
            ).reshape(-1, 3)
            landmarks = LandmarkSet(lm["names"], coords, dict(lm["missing_reason"]))
            return PreparedCase(
                case_id=str(meta["case_id"]),
                image=fine.to_sitk(),
                coarse_image=coarse.to_sitk(),
                canonical_geometry=Geometry.from_dict(meta["canonical_geometry"]),
                landmarks=landmarks,
                background=float(meta["background"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            # a damaged entry is rebuilt, never trusted
            for path in (meta_path, fine_path, coarse_path):
                with contextlib.suppress(OSError):
                    path.unlink()
            return None


# ====================================================================== coordinates
def to_normalized(geometry: Geometry, world: ArrayLike) -> NDArray[np.float64]:
    """World LPS mm (N, 3) -> grid-normalised coordinates (N, 3); NaN rows stay NaN.

    ``t = 2 · index / (size − 1) − 1`` per axis of ``geometry``.
    """
    pts = np.asarray(world, dtype=np.float64).reshape(-1, 3)
    out = np.full(pts.shape, np.nan)
    ok = ~np.isnan(pts).any(axis=1)
    if ok.any():
        denom = np.maximum(np.asarray(geometry.size, dtype=np.float64) - 1.0, 1.0)
        out[ok] = 2.0 * geometry.world_to_index(pts[ok]) / denom - 1.0
    return out


def from_normalized(geometry: Geometry, t: ArrayLike) -> NDArray[np.float64]:
    """Inverse of :func:`to_normalized`: (N, 3) normalised -> (N, 3) world LPS mm."""
    tt = np.asarray(t, dtype=np.float64).reshape(-1, 3)
    out = np.full(tt.shape, np.nan)
    ok = ~np.isnan(tt).any(axis=1)
    if ok.any():
        denom = np.maximum(np.asarray(geometry.size, dtype=np.float64) - 1.0, 1.0)
        out[ok] = geometry.index_to_world((tt[ok] + 1.0) * denom / 2.0)
    return out


# ====================================================================== coarse stage
def coarse_geometry(prepared: PreparedCase, plan: Plan) -> Geometry:
    """The un-augmented coarse grid: ``plan.coarse_grid`` voxels over the whole image."""
    return grid_covering(prepared.canonical_geometry, plan.coarse_grid)


def _augmenting(rng: np.random.Generator | None, augment: AugmentConfig | None) -> bool:
    return rng is not None and augment is not None and augment.enabled


def coarse_sample(
    prepared: PreparedCase,
    plan: Plan,
    rng: np.random.Generator | None = None,
    augment: AugmentConfig | None = None,
) -> tuple[F32, F32, Geometry]:
    """One coarse-stage input and target.

    With ``rng`` and an enabled ``augment``, the sampling grid is randomly translated, scaled
    and rotated (:func:`random_affine_geometry`) and intensities jittered; the target is
    computed from that same grid, so image and points move together.

    Returns:
        image: (X, Y, Z) float32 on ``plan.coarse_grid``;
        target: (N, 3) float32 normalised coordinates (NaN rows = missing landmarks);
        geometry: the grid used (needed to map predictions back with :func:`from_normalized`).
    """
    geom = coarse_geometry(prepared, plan)
    aug = _augmenting(rng, augment)
    if aug:
        assert rng is not None and augment is not None
        geom = random_affine_geometry(
            geom, rng, augment.translate, augment.scale, augment.rotate_deg
        )
    vol = Volume.from_sitk(resample(prepared.coarse_image, geom, "linear", prepared.background))
    image = vol.array.astype(np.float32, copy=False)
    if aug:
        assert rng is not None and augment is not None
        image = intensity_augment(image, rng, augment.intensity)
    target = to_normalized(geom, prepared.landmarks.coords).astype(np.float32)
    return image, target, geom


# ====================================================================== fine stage
def fine_patch(prepared: PreparedCase, center_world: ArrayLike, plan: Plan) -> Volume:
    """The inference patch around ``center_world`` (LPS mm): ``plan.patch_size`` voxels at
    ``plan.fine_spacing_mm`` in the prepared image's (canonical) orientation."""
    return crop_patch(
        prepared.image,
        np.asarray(center_world, dtype=np.float64).reshape(3),
        plan.patch_size,
        plan.fine_spacing_mm,
        direction=prepared.geometry.direction,
        default_value=prepared.background,
    )


def centre_jitter_sd(plan: Plan, jitter_fraction: float) -> NDArray[np.float64]:
    """Per-axis SD (mm, shape (3,)) of the training patch-centre jitter: ``jitter_fraction``
    × patch edge in mm (paper: edge / 6). Shared by training and validation of the fine and
    correlated stages."""
    size = np.asarray(plan.patch_size, dtype=np.float64)
    return jitter_fraction * size * np.asarray(plan.fine_spacing_mm, dtype=np.float64)


def fine_training_sample(
    prepared: PreparedCase,
    landmark_names: Sequence[str],
    plan: Plan,
    cfg: FineConfig,
    rng: np.random.Generator,
    augment: AugmentConfig | None = None,
) -> tuple[F32, F32, list[Geometry | None]]:
    """Training patches and heatmap targets for ``landmark_names``.

    Each patch centre is the true landmark plus Gaussian jitter with per-axis SD
    ``cfg.jitter_fraction × patch edge (mm)`` (paper: L/6). With an enabled ``augment`` the
    patch grid is also randomly scaled/rotated about its centre and intensities jittered; the
    heatmap is computed on the same grid (``cfg.sigma_mm``).

    Returns:
        patches: (L, X, Y, Z) float32; a missing landmark's patch is all ``background``;
        heatmaps: (L, X, Y, Z) float32 Gaussians (peak 1); a missing landmark's is all NaN
            (masked by :func:`landmark3d.losses.heatmap_mse`);
        geometries: the L patch grids; None for a missing landmark.
    """
    size = plan.patch_size
    spacing = np.asarray(plan.fine_spacing_mm, dtype=np.float64)
    jitter_sd = centre_jitter_sd(plan, cfg.jitter_fraction)
    direction = prepared.geometry.direction
    aug = _augmenting(rng, augment)
    patches = np.full((len(landmark_names), *size), prepared.background, dtype=np.float32)
    heatmaps = np.full((len(landmark_names), *size), np.nan, dtype=np.float32)
    geometries: list[Geometry | None] = []
    for row, name in enumerate(landmark_names):
        truth = prepared.landmarks.get(name) if name in prepared.landmarks else None
        if truth is None:
            geometries.append(None)
            continue
        center = truth + rng.normal(0.0, 1.0, 3) * jitter_sd
        geom = patch_geometry(center, size, spacing, direction)
        if aug:
            assert augment is not None
            geom = random_affine_geometry(geom, rng, 0.0, augment.scale, augment.rotate_deg)
        vol = Volume.from_sitk(resample(prepared.image, geom, "linear", prepared.background))
        patch = vol.array.astype(np.float32, copy=False)
        if aug:
            assert augment is not None
            patch = intensity_augment(patch, rng, augment.intensity)
        patches[row] = patch
        heatmaps[row] = gaussian_heatmaps(geom, truth[None, :], cfg.sigma_mm)[0]
        geometries.append(geom)
    return patches, heatmaps, geometries
