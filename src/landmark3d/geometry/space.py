"""Image geometry: spacing, origin and direction, and world <-> voxel-index mapping.

Conventions (see ``docs/coordinates.md``):

* World coordinates are millimetres in **LPS** (the ITK / SimpleITK / DICOM patient frame).
* A continuous voxel index ``(i, j, k)`` follows ITK: ``i`` runs along the first image axis
  (the fastest-varying in the file), and the integer index is the *centre* of a voxel.
* ``world = origin + direction @ (spacing * index)``; the columns of ``direction`` are the
  world directions of the index axes.
* Arrays inside landmark3d are stored in **index order** ``array[i, j, k]`` — the transpose
  of ``SimpleITK.GetArrayFromImage`` (which returns ``[k, j, i]``). ``Volume`` does that
  conversion in exactly one place.

This module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Geometry:
    """The sampling grid of a 3D image in world (LPS) millimetres.

    Attributes:
        size: number of voxels along index axes (i, j, k).
        spacing: voxel size in mm along (i, j, k), shape (3,), all > 0.
        origin: world position (LPS mm) of the centre of voxel (0, 0, 0), shape (3,).
        direction: 3x3 matrix whose columns are the unit world directions of i, j, k.
    """

    size: tuple[int, int, int]
    spacing: FloatArray
    origin: FloatArray
    direction: FloatArray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", np.asarray(self.spacing, dtype=np.float64).reshape(3))
        object.__setattr__(self, "origin", np.asarray(self.origin, dtype=np.float64).reshape(3))
        object.__setattr__(
            self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        """Geometry of a 3D SimpleITK image."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            size=tuple(image.GetSize()),
            spacing=np.array(image.GetSpacing()),
            origin=np.array(image.GetOrigin()),
            direction=np.array(image.GetDirection()).reshape(3, 3),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry's spacing, origin and direction onto ``image`` (in place)."""
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in self.direction.ravel()))
        return image

    # ----------------------------------------------------------------- affine maps
    @property
    def matrix(self) -> FloatArray:
        """3x3 linear part mapping index offsets to world offsets (``direction @ diag(spacing)``)."""
        return self.direction @ np.diag(self.spacing)

    @property
    def affine(self) -> FloatArray:
        """4x4 homogeneous index -> world (LPS mm) matrix."""
        a = np.eye(4)
        a[:3, :3] = self.matrix
        a[:3, 3] = self.origin
        return a

    def index_to_world(self, index: ArrayLike) -> FloatArray:
        """Continuous voxel indices, shape (..., 3), to world LPS mm, shape (..., 3)."""
        idx = np.asarray(index, dtype=np.float64)
        return idx @ self.matrix.T + self.origin

    def world_to_index(self, points: ArrayLike) -> FloatArray:
        """World LPS mm, shape (..., 3), to continuous voxel indices, shape (..., 3)."""
        pts = np.asarray(points, dtype=np.float64)
        flat = (pts - self.origin).reshape(-1, 3).T
        solved = np.asarray(np.linalg.solve(self.matrix, flat).T, dtype=np.float64)
        return solved.reshape(pts.shape)

    def contains_index(self, index: ArrayLike, margin: float = 0.5) -> NDArray[np.bool_]:
        """Whether continuous indices (..., 3) fall inside the image (voxel edges +- ``margin``)."""
        idx = np.asarray(index, dtype=np.float64)
        upper = np.asarray(self.size, dtype=np.float64) - 1 + margin
        return np.asarray(np.all((idx >= -margin) & (idx <= upper), axis=-1), dtype=bool)

    def contains_world(self, points: ArrayLike, margin: float = 0.5) -> NDArray[np.bool_]:
        """Whether world points (..., 3) fall inside the image's voxel extent."""
        return self.contains_index(self.world_to_index(points), margin)

    @property
    def extent_mm(self) -> FloatArray:
        """Physical edge lengths of the image along i, j, k in mm (``size * spacing``)."""
        return np.asarray(self.size, dtype=np.float64) * self.spacing

    @property
    def center_world(self) -> FloatArray:
        """World position of the geometric centre of the image."""
        return self.index_to_world((np.asarray(self.size, dtype=np.float64) - 1) / 2.0)

    def is_close(self, other: Geometry, atol: float = 1e-6) -> bool:
        """Same size and (to ``atol``) the same spacing, origin and direction."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        """JSON-friendly form."""
        return {
            "size": list(self.size),
            "spacing": self.spacing.tolist(),
            "origin": self.origin.tolist(),
            "direction": self.direction.ravel().tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, list[float] | list[int]]) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            size=tuple(int(v) for v in d["size"]),  # type: ignore[arg-type]
            spacing=np.asarray(d["spacing"], dtype=np.float64),
            origin=np.asarray(d["origin"], dtype=np.float64),
            direction=np.asarray(d["direction"], dtype=np.float64).reshape(3, 3),
        )


@dataclass
class Volume:
    """A 3D image array in index order ``[i, j, k]`` with its :class:`Geometry`.

    Attributes:
        array: voxel values, shape ``geometry.size``.
        geometry: where those voxels are in the world.
    """

    array: NDArray[np.floating]
    geometry: Geometry

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != tuple(self.geometry.size):
            raise ValueError(
                f"array shape {self.array.shape} does not match geometry size {self.geometry.size}"
            )

    @classmethod
    def from_sitk(cls, image: sitk.Image, dtype: type = np.float32) -> Volume:
        """Copy a SimpleITK image into index-order numpy (the one transpose in the project)."""
        arr: NDArray[np.floating] = (
            sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(dtype, copy=False)
        )
        return cls(np.ascontiguousarray(arr), Geometry.from_sitk(image))

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this volume's voxels and geometry."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array.transpose(2, 1, 0)))
        return self.geometry.apply_to(image)
