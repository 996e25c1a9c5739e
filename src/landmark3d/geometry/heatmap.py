"""Gaussian heatmap targets on a voxel grid, from landmark positions in world mm.

The target of a landmark at world position ``c`` (LPS mm) on a grid is

    H[i, j, k] = exp(-|x(i, j, k) - c|^2 / (2 sigma^2)),

evaluated at the world position ``x`` of every voxel *centre*, with ``sigma`` in mm. Because
the distance is measured in the world, the Gaussian is round in millimetres on anisotropic and
oblique grids alike (it is an ellipsoid in index space). The peak is 1 exactly when ``c`` falls
on a voxel centre, and below 1 otherwise; no normalisation is applied.

The quadratic form is evaluated with broadcasting over the three index axes, so the cost is
one pass over the grid. This module never imports torch.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from landmark3d.geometry.space import Geometry


def _check_sigma(sigma: float, what: str) -> float:
    s = float(sigma)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {sigma!r}")
    return s


def _squared_distance_mm(
    geometry: Geometry, center_index: NDArray[np.float64]
) -> NDArray[np.float64]:
    """|x_world - c|^2 in mm^2 on the grid, shape ``geometry.size``.

    With ``d = index - c_index`` and ``M = direction @ diag(spacing)``, the world offset is
    ``M d`` and its squared length ``d^T G d`` with ``G = M^T M``.
    """
    g = geometry.matrix.T @ geometry.matrix
    di, dj, dk = (
        np.arange(n, dtype=np.float64) - c for n, c in zip(geometry.size, center_index, strict=True)
    )
    di = di[:, None, None]
    dj = dj[None, :, None]
    dk = dk[None, None, :]
    q = g[0, 0] * di**2 + g[1, 1] * dj**2 + g[2, 2] * dk**2
    # Off-diagonal terms vanish for orthogonal directions; skip them then (exact either way).
    scale = float(np.max(np.abs(np.diag(g))))
    if abs(g[0, 1]) > 1e-12 * scale:
        q = q + 2.0 * g[0, 1] * di * dj
    if abs(g[0, 2]) > 1e-12 * scale:
        q = q + 2.0 * g[0, 2] * di * dk
    if abs(g[1, 2]) > 1e-12 * scale:
        q = q + 2.0 * g[1, 2] * dj * dk
    return np.asarray(np.broadcast_to(q, geometry.size), dtype=np.float64)


def gaussian_heatmap(
    geometry: Geometry, center_world: ArrayLike, sigma_mm: float
) -> NDArray[np.float32]:
    """One Gaussian heatmap on ``geometry``'s grid.

    Args:
        geometry: the grid (a patch or a whole image), arrays in index order [i, j, k].
        center_world: landmark position, shape (3,), LPS mm. NaN -> an all-zero map.
        sigma_mm: standard deviation of the Gaussian in mm.

    Returns:
        float32 array of shape ``geometry.size`` with values in [0, 1].
    """
    sigma = _check_sigma(sigma_mm, "sigma_mm")
    c = np.asarray(center_world, dtype=np.float64).reshape(3)
    if np.isnan(c).any():
        return np.zeros(geometry.size, dtype=np.float32)
    q = _squared_distance_mm(geometry, geometry.world_to_index(c))
    return np.exp(-q / (2.0 * sigma * sigma)).astype(np.float32)


def gaussian_heatmaps(
    geometry: Geometry, centers_world: ArrayLike, sigma_mm: float | ArrayLike
) -> NDArray[np.float32]:
    """Heatmaps of N landmarks on one grid.

    Args:
        geometry: the grid.
        centers_world: shape (N, 3) LPS mm; a NaN row (missing landmark) gives an all-zero map.
        sigma_mm: one sigma in mm, or one per landmark, shape (N,).

    Returns:
        float32 array of shape ``(N, *geometry.size)``.
    """
    centers = np.asarray(centers_world, dtype=np.float64).reshape(-1, 3)
    sigmas = np.broadcast_to(np.asarray(sigma_mm, dtype=np.float64), (centers.shape[0],))
    out = np.zeros((centers.shape[0], *geometry.size), dtype=np.float32)
    for n, (c, s) in enumerate(zip(centers, sigmas, strict=True)):
        out[n] = gaussian_heatmap(geometry, c, float(s))
    return out


def gaussian_profile_1d(length: int, center_index: float, sigma_vox: float) -> NDArray[np.float32]:
    """A 1D Gaussian profile, e.g. the key-slice target along a correlated group's axis.

    Args:
        length: number of samples.
        center_index: continuous index of the peak (may be fractional). NaN -> all zeros.
        sigma_vox: standard deviation in samples.

    Returns:
        float32 array of shape (length,), ``exp(-(t - center)^2 / (2 sigma^2))``.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    sigma = _check_sigma(sigma_vox, "sigma_vox")
    if math.isnan(float(center_index)):
        return np.zeros(length, dtype=np.float32)
    t = np.arange(length, dtype=np.float64) - float(center_index)
    return np.exp(-(t * t) / (2.0 * sigma * sigma)).astype(np.float32)
