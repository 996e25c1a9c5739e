"""Tri-planar slices through a landmark, with truth and predictions marked.

Convention: **radiological**. Every view is drawn in world LPS millimetres (matplotlib data
coordinates = mm, equal aspect), so anisotropic voxels keep their physical shape:

* axial (plane of constant S): patient's Right on the left of the image, Anterior on top;
* coronal (constant P): patient's Right on the left, Superior on top;
* sagittal (constant L): Anterior on the left, Superior on top.

The image is first reoriented to LPS with :func:`landmark3d.geometry.resample.canonical`
(permutations and flips only, no interpolation); an oblique image whose direction is still not
the identity after that is resampled (linearly) onto an axis-aligned LPS grid of the same
spacing. A landmark at world point ``p`` lies in the slice of index
``round(world_to_index(p))`` along the plane's normal, and is drawn at the in-plane world
coordinates of ``p`` (a prediction off the plane is drawn at its projection).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

from landmark3d.geometry.resample import canonical, resample
from landmark3d.geometry.space import Geometry, Volume

CONVENTION = "radiological"


@dataclass(frozen=True)
class View:
    """One slice orientation.

    Attributes:
        name: ``axial``, ``coronal`` or ``sagittal``.
        normal: LPS axis held fixed (0 = x/L, 1 = y/P, 2 = z/S).
        horizontal, vertical: LPS axes drawn left->right and along the vertical.
        top_is_low: the vertical axis runs from low world values at the top (y: Anterior up).
        left, right, top, bottom: orientation letters at the image edges.
    """

    name: str
    normal: int
    horizontal: int
    vertical: int
    top_is_low: bool
    left: str
    right: str
    top: str
    bottom: str


VIEWS: tuple[View, ...] = (
    View("axial", 2, 0, 1, True, "R", "L", "A", "P"),
    View("coronal", 1, 0, 2, False, "R", "L", "S", "I"),
    View("sagittal", 0, 1, 2, False, "A", "P", "S", "I"),
)
AXIS_NAMES = ("x (R→L) mm", "y (A→P) mm", "z (I→S) mm")


def lps_volume(image: sitk.Image) -> Volume:
    """``image`` as a :class:`Volume` with identity direction (index axes = L, P, S).

    Args:
        image: any 3D scalar image.

    Returns:
        float32 volume, array shape (ni, nj, nk) in index order, ``geometry.direction == I``.
    """
    img = canonical(image, "LPS")
    geo = Geometry.from_sitk(img)
    if not np.allclose(geo.direction, np.eye(3), atol=1e-6):
        corners = np.array(
            [[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64
        ) * (np.asarray(geo.size, dtype=np.float64) - 1)
        world = geo.index_to_world(corners)
        lo, hi = world.min(axis=0), world.max(axis=0)
        size = np.maximum(1, np.round((hi - lo) / geo.spacing).astype(int) + 1)
        grid = Geometry((int(size[0]), int(size[1]), int(size[2])), geo.spacing, lo, np.eye(3))
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(img)
        img = resample(img, grid, "linear", stats.GetMinimum(), pixel_type=sitk.sitkFloat32)
    return Volume.from_sitk(img, np.float32)


def display_window(volume: Volume) -> tuple[float, float]:
    """Grey-level window ``(low, high)``: the 1st and 99.5th percentiles of the volume."""
    values = np.asarray(volume.array, dtype=np.float64).ravel()
    if values.size > 2_000_000:
        values = values[:: values.size // 1_000_000]
    low, high = (float(v) for v in np.percentile(values, [1.0, 99.5]))
    return (low, high if high > low else low + 1.0)


def plane_slice(
    volume: Volume, view: View, point: ArrayLike
) -> tuple[NDArray[np.float32], tuple[float, float, float, float], int]:
    """The slice of ``view`` through world ``point`` (LPS mm).

    Returns:
        ``(image, extent, index)``: ``image`` shape (n_vertical, n_horizontal) for ``imshow``
        (row r = vertical voxel r, drawn with ``origin="lower"``), ``extent`` = (left, right,
        bottom, top) in world mm (voxel edges), and the slice index along the normal.
    """
    geo = volume.geometry
    idx = geo.world_to_index(np.asarray(point, dtype=np.float64).reshape(3))
    n = view.normal
    k = int(np.clip(np.round(idx[n]), 0, geo.size[n] - 1))
    arr = np.take(volume.array, k, axis=n)  # remaining axes keep their order
    rest = [a for a in range(3) if a != n]
    if rest.index(view.horizontal) == 0:  # arr[h, v] -> rows = vertical
        arr = arr.T
    h, v = view.horizontal, view.vertical
    sp, org = geo.spacing, geo.origin
    extent = (
        float(org[h] - sp[h] / 2),
        float(org[h] + (geo.size[h] - 0.5) * sp[h]),
        float(org[v] - sp[v] / 2),
        float(org[v] + (geo.size[v] - 0.5) * sp[v]),
    )
    return np.ascontiguousarray(arr, dtype=np.float32), extent, k


@dataclass
class Marker:
    """A point to mark: label, world LPS mm (3,), matplotlib marker style and colour."""

    label: str
    world: NDArray[np.float64]
    marker: str = "o"
    color: str = "lime"


def draw_view(
    ax: Any,
    volume: Volume,
    view: View,
    center: ArrayLike,
    markers: Sequence[Marker],
    window: tuple[float, float] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Draw the ``view`` slice through ``center`` on ``ax`` and mark ``markers``.

    Returns:
        ``{"image": AxesImage, "markers": {label: (PathCollection, (h_mm, v_mm))}, "index": k}``
        — the data coordinates given to matplotlib are world mm of the view's axes.
    """
    img, extent, k = plane_slice(volume, view, center)
    lo, hi = window or display_window(volume)
    image = ax.imshow(
        img,
        cmap="gray",
        vmin=lo,
        vmax=hi,
        origin="lower",
        extent=extent,
        interpolation="nearest",
        aspect="equal",
    )
    bottom, top = extent[2], extent[3]
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim((top, bottom) if view.top_is_low else (bottom, top))
    drawn: dict[str, Any] = {}
    for m in markers:
        p = np.asarray(m.world, dtype=np.float64)
        if np.isnan(p).any():
            continue
        xy = (float(p[view.horizontal]), float(p[view.vertical]))
        filled = m.marker not in ("x", "+", "1", "2", "3", "4")
        colors: dict[str, Any] = (
            {"facecolors": "none", "edgecolors": m.color} if filled else {"c": m.color}
        )
        art = ax.scatter(
            [xy[0]],
            [xy[1]],
            s=70,
            marker=m.marker,
            linewidths=1.6,
            label=m.label,
            zorder=3,
            **colors,
        )
        drawn[m.label] = (art, xy)
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, view.left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, view.right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, view.top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, view.bottom, ha="center", va="bottom", **style)
    # no ticks (they cost most of the drawing time); a 10 mm scale bar gives the size instead
    ax.set_xticks([])
    ax.set_yticks([])
    x0 = extent[0] + 0.05 * (extent[1] - extent[0])
    y_bar = bottom + (0.06 if not view.top_is_low else 0.94) * (top - bottom)
    ax.plot([x0, x0 + 10.0], [y_bar, y_bar], color="white", linewidth=2)
    ax.set_xlabel(f"{AXIS_NAMES[view.horizontal]}; bar 10 mm", fontsize=7)
    ax.set_ylabel(AXIS_NAMES[view.vertical], fontsize=7)
    if title is not None:
        ax.set_title(title, fontsize=8)
    return {"image": image, "markers": drawn, "index": k}


def triplanar_figure(
    volume: Volume,
    rows: Sequence[tuple[str, Sequence[Marker]]],
    title: str = "",
) -> tuple[Any, list[list[dict[str, Any]]]]:
    """A figure with one row per landmark and the axial, coronal, sagittal views.

    Args:
        volume: an LPS, identity-direction volume (:func:`lps_volume`).
        rows: ``(landmark name, markers)``; the slices go through the first marker (truth).
        title: figure title.

    Returns:
        ``(figure, drawn)`` with ``drawn[row][view]`` as returned by :func:`draw_view`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(rows))
    fig, axes = plt.subplots(n, 3, figsize=(9.6, 3.1 * n + 0.5), squeeze=False)
    window = display_window(volume)
    drawn: list[list[dict[str, Any]]] = []
    for r, (name, markers) in enumerate(rows):
        center = markers[0].world if markers else volume.geometry.center_world
        row = []
        for c, view in enumerate(VIEWS):
            row.append(
                draw_view(
                    axes[r][c], volume, view, center, markers, window, f"{name} — {view.name}"
                )
            )
        drawn.append(row)
    height = 3.1 * n + 1.0
    fig.set_size_inches(9.6, height)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="upper right",
            bbox_to_anchor=(0.98, 1 - 0.45 / height),
            fontsize=8,
            ncol=len(labels),
        )
    if title:
        fig.text(0.02, 1 - 0.1 / height, title, fontsize=9, ha="left", va="top", wrap=True)
    fig.subplots_adjust(
        left=0.05, right=0.98, bottom=0.25 / height, top=1 - 1.0 / height, wspace=0.18, hspace=0.3
    )
    return fig, drawn
