"""The original method's layout to a ``dataset.json`` spec and back, losslessly.

Layout (``docs/dataset_format.md``)::

    <root>/images/<case>.nii.gz   <root>/setup/landmark.csv   <root>/setup/cv0, cv1, ...

:func:`import_layout` writes a spec whose landmark files (``landmarks/<case>.mrk.json``, LPS)
hold exactly the table's values (JSON keeps every float bit); the spec refers to the layout's
images where they are, keeps the landmark order and the folds, and records the table's
coordinate system under ``"original_layout"`` so that :func:`export_layout` writes the table
back in it. :func:`export_layout` turns any dataset (spec or layout) into the layout: images as
NIfTI (copied byte for byte when they already are, converted otherwise), ``setup/landmark.csv``
with ``repr`` floats (exact) and one ``setup/cvK`` per fold.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path

from landmark3d.data.dataset import SPEC_FILENAME, Dataset, load_dataset, write_dataset_spec
from landmark3d.data.original_layout import LANDMARK_CSV, load_original_layout
from landmark3d.errors import DatasetError
from landmark3d.io.atomic import atomic_path, atomic_write_text, check_writable
from landmark3d.io.images import image_suffix, read_image, write_image
from landmark3d.io.landmark_set import lps_to_ras

NIFTI_FORMATS = (".nii.gz", ".nii")
LAYOUT_KEY = "original_layout"


def import_layout(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert the original layout at ``src`` into a spec at ``out`` (directory or ``.json``).

    Landmark values, landmark order, modality and folds are kept exactly; images stay where they
    are (the spec refers to them by relative path).

    Returns:
        The path of the written ``dataset.json``.

    Raises:
        DatasetError: ``src`` is not in the original layout (or is malformed).
        OutputExistsError: the spec or a landmark file exists and ``overwrite`` is False.
    """
    root = Path(src).absolute()
    if (root / SPEC_FILENAME).is_file() or not (root / "images").is_dir():
        raise DatasetError(
            "not an original-layout directory (images/, setup/landmark.csv, setup/cvK).",
            path=root,
            fix="give the directory holding images/ and setup/; a dataset.json needs no import.",
        )
    ds = load_original_layout(root)
    ds.extra[LAYOUT_KEY] = {
        "source": str(root),
        "coordinate_system": ds.coordinate_system,
        "landmark_table": LANDMARK_CSV.as_posix(),
    }
    return write_dataset_spec(ds, out, overwrite=overwrite)


def _check_case_id(cid: str, source: Path | None) -> None:
    bad = (
        not cid
        or cid != cid.strip()
        or cid.startswith(".")
        or any(ch in cid for ch in "/\\#\r\n")
        or cid in (".", "..")
    )
    if bad:
        raise DatasetError(
            f"case id {cid!r} cannot be a file name in images/ and a line in setup/cvK.",
            path=source,
            fix="rename the case: no slashes, '#', line breaks, leading dot or outer spaces.",
        )


def _export_image(src: Path, dest: Path, overwrite: bool) -> None:
    """NIfTI image at ``dest``: the same bytes if ``src`` has its format, else converted."""
    if src.is_file() and image_suffix(src) == image_suffix(dest):
        with atomic_path(dest, overwrite) as tmp:
            shutil.copyfile(src, tmp)
    else:
        write_image(read_image(src), dest, overwrite=overwrite)


def _landmark_table(ds: Dataset, system: str) -> str:
    buf = io.StringIO()
    buf.write(f"# CoordinateSystem = {system}\n# Modality = {ds.modality}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "landmark", "x", "y", "z"])
    for case in ds.cases:
        if not ds.has_landmarks(case):
            continue
        ls = ds.read_landmarks(case)
        coords = lps_to_ras(ls.coords) if system == "RAS" else ls.coords
        for name, xyz in zip(ls.names, coords, strict=True):
            if any(math.isnan(v) for v in xyz):
                writer.writerow([case.id, name, "", "", ""])
            else:
                writer.writerow([case.id, name, *(repr(float(v)) for v in xyz)])
    return buf.getvalue()


def export_layout(
    dataset: str | Path | Dataset,
    out: str | Path,
    coords: str | None = None,
    image_format: str = ".nii.gz",
    overwrite: bool = False,
) -> Path:
    """Write ``dataset`` in the original layout under ``out``.

    Args:
        dataset: a ``dataset.json``, its directory, a layout directory, or a loaded Dataset.
        out: directory to create (``images/``, ``setup/landmark.csv``, ``setup/cvK``).
        coords: system of ``landmark.csv`` (``"LPS"``/``"RAS"``); default: the system recorded
            by :func:`import_layout` (or the layout's own), else LPS.
        image_format: ``".nii.gz"`` or ``".nii"``.
        overwrite: replace existing files.

    Returns:
        ``out`` as a Path.

    Raises:
        DatasetError: bad case ids, unknown landmark names, bad ``coords``/``image_format``.
        ImageError / LandmarkFileError: a case's image or landmark file is unreadable.
        OutputExistsError: an output file exists and ``overwrite`` is False.
    """
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    fmt = "." + image_format.lower().lstrip(".")
    if fmt not in NIFTI_FORMATS:
        raise DatasetError(
            f"image format {image_format!r} is not NIfTI.", fix="use .nii.gz or .nii."
        )
    recorded = ds.extra.get(LAYOUT_KEY, {})
    default = recorded.get("coordinate_system") if isinstance(recorded, dict) else None
    if default is None and ds.layout == "original":
        default = ds.coordinate_system
    system = str(coords or default or "LPS").upper()
    if system not in ("LPS", "RAS"):
        raise DatasetError(f"unknown coordinate system {coords!r}.", fix="use LPS or RAS.")
    root = Path(out).absolute()
    for c in ds.cases:
        _check_case_id(c.id, ds.source)
    images = {c.id: root / "images" / f"{c.id}{fmt}" for c in ds.cases}
    setup = root / "setup"
    fold_files = [setup / f"cv{k}" for k in range(len(ds.folds))]
    for target in [*images.values(), setup / "landmark.csv", *fold_files]:
        check_writable(target, overwrite)
    stale = (
        sorted(p.name for p in setup.glob("cv*") if p not in fold_files) if setup.is_dir() else []
    )
    if stale:
        raise DatasetError(
            f"setup/ already holds fold files {', '.join(stale)} beyond this dataset's "
            f"{len(ds.folds)} fold(s); they would be read as folds.",
            path=setup,
            fix="export into an empty directory (or delete the stale cv files).",
        )
    table = _landmark_table(ds, system)  # reads every landmark file before writing anything
    (root / "images").mkdir(parents=True, exist_ok=True)
    for case in ds.cases:
        _export_image(case.image, images[case.id], overwrite)
    for path, fold in zip(fold_files, ds.folds, strict=True):
        atomic_write_text(path, "".join(f"{cid}\n" for cid in fold), overwrite=overwrite)
    atomic_write_text(setup / "landmark.csv", table, overwrite=overwrite)
    return root
