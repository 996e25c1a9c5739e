"""Resource and plausibility limits on images (documented in ``docs/reliability.md``).

* **Voxel budget** — an image (or a resampled copy of one) may hold at most
  :func:`max_voxels` voxels: ``LANDMARK3D_MAX_VOXELS`` from the environment, else
  :data:`DEFAULT_MAX_VOXELS` (2**30 voxels = 4 GiB as float32). Readers check the header
  before any voxel is loaded, so a damaged header claiming a gigantic image is refused at once
  instead of exhausting memory.
* **Plausible spacing** — CT and MR voxels are between :data:`MIN_SPACING_MM` and
  :data:`MAX_SPACING_MM`; a spacing outside usually means the header is in metres or
  micrometres (or corrupt).

This module never imports torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from landmark3d.errors import ImageError

MAX_VOXELS_ENV = "LANDMARK3D_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**30
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 100.0
BYTES_PER_VOXEL = 4  # float32, the working type after reading


def max_voxels() -> int:
    """The voxel budget: ``$LANDMARK3D_MAX_VOXELS`` (a positive integer) or the default.

    Raises:
        ImageError: the environment variable is set but is not a positive integer.
    """
    raw = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(raw)) if "e" in raw.lower() else int(raw)
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise ImageError(
            f"{MAX_VOXELS_ENV}={raw!r} is not a positive number of voxels.",
            fix=f"set {MAX_VOXELS_ENV} to an integer such as {DEFAULT_MAX_VOXELS}, or unset it.",
        )
    return value


def check_voxel_count(
    size: Sequence[int],
    what: str = "image",
    *,
    path: str | Path | None = None,
    limit: int | None = None,
    components: int = 1,
) -> None:
    """Raise :class:`ImageError` if ``size`` (voxels per axis) exceeds the voxel budget.

    Args:
        size: voxels per axis (any number of axes).
        what: what is being checked, for the message ("image", "resampled image", ...).
        path: the file concerned, if any.
        limit: the budget in voxels; None = :func:`max_voxels`.
        components: values per voxel (vector images count each component).
    """
    budget = max_voxels() if limit is None else int(limit)
    count = math.prod(int(s) for s in size) * max(int(components), 1)
    if count > budget:
        shape = "x".join(str(int(s)) for s in size)
        gib = count * BYTES_PER_VOXEL / 2**30
        raise ImageError(
            f"{what} has {count} voxels ({shape}; {gib:.3g} GiB as float32), more than the "
            f"limit of {budget} voxels.",
            path=path,
            fix=f"crop or downsample the image, check its header (size, spacing), or raise the "
            f"limit with {MAX_VOXELS_ENV}=<voxels> (or read_image(..., max_voxels=...)).",
        )


def spacing_problem(spacing: Sequence[float]) -> str | None:
    """A sentence if a positive finite ``spacing`` (mm) is implausible for CT/MR, else None."""
    if all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        return None
    shown = ", ".join(f"{s:.6g}" for s in spacing)
    return (
        f"voxel spacing ({shown}) mm is outside the plausible range {MIN_SPACING_MM:g}-"
        f"{MAX_SPACING_MM:g} mm for CT/MR; the header is probably in metres or micrometres, "
        "or damaged."
    )
