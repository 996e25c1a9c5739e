"""Resampling images onto grids, and building the grids (coarse grid, patches, augmentation).

Every function here either builds a :class:`~landmark3d.geometry.space.Geometry` (a sampling
grid in world LPS mm) or samples an image onto one with ``sitk.Resample``. Because resampling
is defined in world space, a landmark keeps its world position through any of these
operations; its voxel index on the new grid is simply ``new_geometry.world_to_index(point)``.
Augmentation works the same way: :func:`random_affine_geometry` perturbs the *sampling grid*,
so image and landmarks move together by construction.

This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike

from landmark3d.geometry.space import FloatArray, Geometry, Volume
from landmark3d.limits import check_voxel_count

INTERPOLATORS: dict[str, int] = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}

_FLOAT_TYPES = (sitk.sitkFloat32, sitk.sitkFloat64)
_AXIS_LETTERS = ({"L", "R"}, {"P", "A"}, {"S", "I"})


def _require_3d(image: sitk.Image) -> None:
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")


def _as3(value: float | ArrayLike, what: str) -> FloatArray:
    """A scalar or 3-vector as a float64 array of shape (3,)."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(3, float(arr))
    if arr.shape != (3,):
        raise ValueError(f"{what} must be a scalar or have 3 values, got shape {arr.shape}")
    return arr


def _size3(size: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(s) for s in size)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"size must be 3 positive integers, got {tuple(size)}")
    return (values[0], values[1], values[2])


def _grid_centred_at(
    center_world: ArrayLike, size: tuple[int, int, int], spacing: FloatArray, direction: FloatArray
) -> Geometry:
    """The grid whose continuous index ``(size - 1) / 2`` lies at ``center_world``."""
    half = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
    origin = np.asarray(center_world, dtype=np.float64).reshape(3) - direction @ (spacing * half)
    return Geometry(size, spacing, origin, direction)


# ---------------------------------------------------------------------------------- sampling
def resample(
    image: sitk.Image,
    reference: Geometry,
    interpolator: str = "linear",
    default_value: float = 0.0,
    pixel_type: int | None = None,
) -> sitk.Image:
    """Sample ``image`` onto the grid ``reference`` (world positions are kept).

    Args:
        image: a 3D scalar image.
        reference: the output grid.
        interpolator: ``"linear"``, ``"nearest"`` or ``"bspline"`` (cubic).
        default_value: value of output voxels whose centre falls outside ``image``.
        pixel_type: SimpleITK pixel id of the output. Default: that of ``image`` for
            ``"nearest"`` and for float images; ``sitkFloat32`` when an integer image is
            interpolated (ITK would truncate, e.g. 3.9999 -> 3, even onto the same grid).

    Returns:
        A 3D image with ``reference``'s size, spacing, origin and direction.
    """
    _require_3d(image)
    if interpolator not in INTERPOLATORS:
        raise ValueError(
            f"unknown interpolator {interpolator!r}; choose one of {', '.join(INTERPOLATORS)}"
        )
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in reference.size])
    f.SetOutputSpacing([float(s) for s in reference.spacing])
    f.SetOutputOrigin([float(o) for o in reference.origin])
    f.SetOutputDirection([float(d) for d in reference.direction.ravel()])
    f.SetInterpolator(INTERPOLATORS[interpolator])
    f.SetDefaultPixelValue(float(default_value))
    if pixel_type is None:
        pixel_type = image.GetPixelID()
        if interpolator != "nearest" and pixel_type not in _FLOAT_TYPES:
            pixel_type = sitk.sitkFloat32
    f.SetOutputPixelType(pixel_type)
    f.SetTransform(sitk.Transform(3, sitk.sitkIdentity))
    return f.Execute(image)


def canonical(image: sitk.Image, orientation: str = "LPS") -> sitk.Image:
    """Reorient ``image`` by axis permutation and flips only (``sitk.DICOMOrient``).

    ``orientation`` names where index axes i, j, k point, DICOM style: ``"LPS"`` means i runs
    towards the patient's Left, j Posterior, k Superior (identity direction); ``"RAS"`` negates
    i and j. No interpolation: voxel values are only permuted, and every voxel keeps its world
    position. For an oblique image the closest such orientation is reached.
    """
    _require_3d(image)
    code = orientation.upper()
    letters_ok = len(code) == 3 and all(
        sum(ch in axis for ch in code) == 1 for axis in _AXIS_LETTERS
    )
    if not letters_ok:
        raise ValueError(
            f"orientation {orientation!r} must have one letter from each of L/R, A/P, S/I "
            "(e.g. 'LPS', 'RAS')"
        )
    return sitk.DICOMOrient(image, code)


def crop_patch(
    image: sitk.Image,
    center_world: ArrayLike,
    size: Sequence[int],
    spacing: float | ArrayLike,
    direction: ArrayLike | None = None,
    default_value: float | None = None,
    interpolator: str = "linear",
) -> Volume:
    """Resample a patch of ``image`` centred at a world point.

    Args:
        image: a 3D scalar image.
        center_world: LPS mm, shape (3,); becomes the patch's continuous index (size - 1) / 2.
        size: patch voxels along (i, j, k).
        spacing: patch voxel size in mm (scalar or 3 values).
        direction: 3x3 patch direction (default: that of ``image``).
        default_value: value outside the image (default: the image minimum; pass it
            explicitly in hot loops to save a pass over the image).
        interpolator: see :func:`resample`.

    Returns:
        float32 :class:`Volume` of shape ``size`` whose geometry maps patch indices to world.
    """
    _require_3d(image)
    d = (
        np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        if direction is None
        else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    )
    grid = patch_geometry(center_world, _size3(size), spacing, d)
    if default_value is None:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        default_value = stats.GetMinimum()
    out = resample(image, grid, interpolator, float(default_value), pixel_type=sitk.sitkFloat32)
    return Volume.from_sitk(out, np.float32)


# ---------------------------------------------------------------------------------- grids
def patch_geometry(
    center_world: ArrayLike,
    size: Sequence[int],
    spacing: float | ArrayLike,
    direction: ArrayLike | None = None,
) -> Geometry:
    """A grid of ``size`` voxels of ``spacing`` mm whose centre lies at ``center_world``.

    The centre is the continuous index ``(size - 1) / 2`` (a voxel centre for odd sizes, a
    voxel corner for even sizes). ``direction`` defaults to the identity (LPS axes).
    """
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    sp = _as3(spacing, "spacing")
    if np.any(sp <= 0) or not np.all(np.isfinite(sp)):
        raise ValueError(f"spacing must be positive and finite, got {sp.tolist()}")
    return _grid_centred_at(center_world, _size3(size), sp, d)


def grid_covering(geometry: Geometry, size: Sequence[int]) -> Geometry:
    """A grid of ``size`` voxels covering the same box as ``geometry``.

    Same direction and centre; spacing ``geometry.size * geometry.spacing / size`` so that the
    edge-to-edge extent ``size * spacing`` equals that of ``geometry`` (anisotropic in general).
    Used for the coarse stage (e.g. 96 x 96 x 72).
    """
    new_size = _size3(size)
    spacing = geometry.extent_mm / np.asarray(new_size, dtype=np.float64)
    return _grid_centred_at(geometry.center_world, new_size, spacing, geometry.direction)


def spacing_geometry(geometry: Geometry, spacing: float | ArrayLike) -> Geometry:
    """A grid of ``spacing`` mm covering (to within half a voxel per side) ``geometry``'s box.

    Same direction and centre; ``size = max(1, round(extent / spacing))`` per axis.
    """
    sp = _as3(spacing, "spacing")
    if np.any(sp <= 0) or not np.all(np.isfinite(sp)):
        raise ValueError(f"spacing must be positive and finite, got {sp.tolist()}")
    counts = np.maximum(1, np.round(geometry.extent_mm / sp)).astype(int)
    size = (int(counts[0]), int(counts[1]), int(counts[2]))
    return _grid_centred_at(geometry.center_world, size, sp, geometry.direction)


def resample_to_spacing(
    image: sitk.Image, spacing: float | ArrayLike, interpolator: str = "linear"
) -> sitk.Image:
    """Resample ``image`` to ``spacing`` mm over the same extent (see :func:`spacing_geometry`).

    Voxels whose centre falls just outside the original box get the image minimum.

    Raises:
        ImageError: the resampled image would exceed the voxel budget
            (:func:`landmark3d.limits.max_voxels`).
    """
    _require_3d(image)
    grid = spacing_geometry(Geometry.from_sitk(image), spacing)
    # an absurd spacing or extent must not allocate terabytes: refuse beyond the voxel budget
    check_voxel_count(grid.size, f"the image resampled to {_as3(spacing, 'spacing').tolist()} mm")
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return resample(image, grid, interpolator, stats.GetMinimum())


def rotation_matrix(axis: ArrayLike, angle_rad: float) -> FloatArray:
    """3x3 rotation by ``angle_rad`` about the (normalised) ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64).reshape(3)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.asarray(
        np.eye(3) + np.sin(angle_rad) * k + (1.0 - np.cos(angle_rad)) * (k @ k), dtype=np.float64
    )


def random_affine_geometry(
    base: Geometry,
    rng: np.random.Generator,
    translate_fraction: float,
    scale_fraction: float,
    rotate_deg: float,
) -> Geometry:
    """A randomly perturbed copy of the sampling grid ``base`` (same size) for augmentation.

    * translation: the centre moves by ``u * translate_fraction * extent`` along each grid
      axis, ``u ~ U(-1, 1)``;
    * scale: all spacings are multiplied by ``1 + U(-scale_fraction, scale_fraction)``
      (a larger spacing shows a larger field of view, so anatomy appears smaller);
    * rotation: about a uniformly random axis through the grid centre by
      ``U(-rotate_deg, rotate_deg)`` degrees.

    Resample the image onto the result; a landmark at world point ``p`` then sits at index
    ``result.world_to_index(p)``. The same ``rng`` state gives the same grid; the number of
    draws does not depend on the magnitudes.
    """
    if translate_fraction < 0 or not 0 <= scale_fraction < 1 or rotate_deg < 0:
        raise ValueError(
            "need translate_fraction >= 0, 0 <= scale_fraction < 1 and rotate_deg >= 0, got "
            f"{translate_fraction}, {scale_fraction}, {rotate_deg}"
        )
    shift = rng.uniform(-1.0, 1.0, 3) * translate_fraction * base.extent_mm
    scale = 1.0 + rng.uniform(-scale_fraction, scale_fraction)
    axis = rng.normal(size=3)
    angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
    if not np.linalg.norm(axis) > 1e-12:
        axis = np.array([0.0, 0.0, 1.0])
    center = base.center_world + base.direction @ shift
    direction = rotation_matrix(axis, float(angle)) @ base.direction
    return _grid_centred_at(center, base.size, base.spacing * scale, direction)
