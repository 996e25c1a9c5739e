"""Cropped copies of a dataset: scans whose field of view misses some landmarks.

:func:`crop_dataset` writes a new dataset in which a random ``fraction`` of the cases have the
inferior part of their image removed (25–40 % of the extent along the image axis closest to the
patient's superior–inferior direction), so that low landmarks (on the phantom: ``chin``,
``odont_proc``) fall outside the image. The landmark files are copied unchanged: the truth of a
landmark outside the image stays in the file, beyond the image's extent — exactly what the
coarse regressor must learn to extrapolate to, and what the absence decision is tested against
(:mod:`landmark3d.inference.confidence`). Each cropped case's entry in ``dataset.json`` records
``"crop": {"side": "inferior", "removed_fraction": f, "outside": [names]}``.

Note: ``landmark3d verify`` reports landmarks outside their image as errors, as it should for
real data; a cropped dataset is for training and testing the absence decision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from landmark3d.data.dataset import Dataset, load_dataset
from landmark3d.errors import DatasetError
from landmark3d.geometry.space import Geometry
from landmark3d.io.atomic import atomic_write_text, check_writable
from landmark3d.io.images import image_suffix, write_image

CROP_RANGE = (0.25, 0.40)


def superior_axis(geometry: Geometry) -> tuple[int, bool]:
    """``(axis, increasing)``: the image axis closest to world S-I (LPS +z = superior) and
    whether the superior direction is towards increasing index along it."""
    column = geometry.direction[2, :]  # world z component of each image axis
    axis = int(np.argmax(np.abs(column)))
    return axis, bool(column[axis] > 0)


def crop_inferior(image: sitk.Image, fraction: float) -> sitk.Image:
    """``image`` without the inferior ``fraction`` (0..1) of its slices along the S-I axis;
    voxels keep their world positions (the origin moves with the crop)."""
    geometry = Geometry.from_sitk(image)
    axis, up = superior_axis(geometry)
    n = geometry.size[axis]
    remove = min(max(round(fraction * n), 0), n - 1)
    size = list(geometry.size)
    size[axis] = n - remove
    start = [0, 0, 0]
    if up:  # index 0 is the inferior end
        start[axis] = remove
    return sitk.RegionOfInterest(image, [int(s) for s in size], [int(s) for s in start])


def crop_dataset(
    src_dataset: str | Path | Dataset,
    out_dir: str | Path,
    fraction: float,
    seed: int = 0,
    crop_range: tuple[float, float] = CROP_RANGE,
    overwrite: bool = False,
) -> Path:
    """Write a copy of ``src_dataset`` to ``out_dir`` with ``fraction`` of its cases cropped.

    Args:
        src_dataset: a dataset (or its path) with landmark files per case.
        out_dir: destination (``dataset.json``, ``images/``, ``landmarks/``).
        fraction: share of cases cropped (0..1), chosen at random with ``seed``.
        seed: randomness of the case choice and of each case's crop amount.
        crop_range: the removed share of the S-I extent is uniform in this range.
        overwrite: replace existing files in ``out_dir``.

    Returns:
        The path of the written ``dataset.json``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    ds = src_dataset if isinstance(src_dataset, Dataset) else load_dataset(src_dataset)
    out = Path(out_dir)
    spec_path = out / "dataset.json"
    check_writable(spec_path, overwrite)
    rng = np.random.default_rng([seed, 11])
    n_crop = round(fraction * len(ds.cases))
    chosen = {ds.cases[i].id for i in rng.permutation(len(ds.cases))[:n_crop]}
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "landmarks").mkdir(parents=True, exist_ok=True)
    cases: list[dict[str, Any]] = []
    for case in ds.cases:
        if case.landmarks is None:
            raise DatasetError(
                f"case {case.id!r} has no landmark file of its own.",
                path=ds.source,
                fix="convert the dataset to a dataset.json with one landmark file per case first.",
            )
        entry: dict[str, Any] = {**case.extra, "id": case.id}
        lm_name = f"landmarks/{case.id}{_landmark_suffix(case.landmarks)}"
        shutil.copyfile(case.landmarks, out / lm_name)
        entry["landmarks"] = lm_name
        if case.id in chosen:
            f = float(rng.uniform(*crop_range))
            image = crop_inferior(ds.read_image(case.id), f)
            image_name = f"images/{case.id}.nii.gz"
            write_image(image, out / image_name)
            truth = ds.read_landmarks(case.id)
            inside = Geometry.from_sitk(image).contains_world(truth.coords)
            gone = [
                n for n, i, p in zip(truth.names, inside, truth.present, strict=True) if p and not i
            ]
            entry["crop"] = {"side": "inferior", "removed_fraction": round(f, 4), "outside": gone}
        else:
            suffix = image_suffix(case.image) or ""
            image_name = f"images/{case.id}{suffix}"
            if case.image.is_dir():
                shutil.copytree(case.image, out / image_name, dirs_exist_ok=overwrite)
            else:
                shutil.copyfile(case.image, out / image_name)
        entry["image"] = image_name
        cases.append(entry)
    spec: dict[str, Any] = {
        "name": f"{ds.name}-cropped",
        "modality": ds.modality,
        "landmarks": list(ds.landmark_names),
    }
    if ds.coordinate_system is not None:
        spec["coordinate_system"] = ds.coordinate_system
    spec["cases"] = cases
    spec["folds"] = [list(f) for f in ds.folds]
    spec["correlated_groups"] = [dict(g) for g in ds.correlated_groups]
    spec["cropped"] = {"source": str(ds.source), "fraction": fraction, "seed": seed}
    atomic_write_text(spec_path, json.dumps(spec, indent=2) + "\n", overwrite=overwrite)
    return spec_path


def _landmark_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".mrk.json", ".fcsv", ".csv", ".json"):
        if name.endswith(suffix):
            return suffix
    return path.suffix
