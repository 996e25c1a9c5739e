"""Reading and writing 3D medical images through SimpleITK, with validation.

Supported: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``) and a DICOM series given as a directory. Spacing, origin and direction are kept
exactly as SimpleITK reads them (world = LPS mm, see ``docs/coordinates.md``).

:func:`read_image` refuses images the rest of landmark3d cannot use and says how to fix them:
missing/empty/corrupt or truncated files, images that are not 3D (a 4D image whose 4th axis has
length 1 is squeezed to 3D), multi-component (vector/RGB/complex) images, zero-size axes or
fewer than 4 voxels along an axis (a single slice), zero/negative/non-finite or implausible
spacing (outside 0.01-100 mm: a header in metres or micrometres), non-orthonormal direction
matrices, non-finite origin, DICOM series whose slices are not evenly spaced (a missing or
repeated slice), NaN/inf voxels (unless ``allow_nonfinite=True``) and images larger than the
voxel budget (``LANDMARK3D_MAX_VOXELS``, checked from the header before voxels are read; see
:mod:`landmark3d.limits`). :func:`image_problems` is the non-raising variant used by dataset
verification. ITK's own warnings are not printed while reading.

This module never imports torch.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from landmark3d.errors import ImageError
from landmark3d.geometry.space import Volume
from landmark3d.io.atomic import atomic_path, check_writable
from landmark3d.io.nifti_check import nifti_sform_shear, restore_nonfinite, scan_nifti
from landmark3d.limits import check_voxel_count, spacing_problem

#: File suffixes read and written by :func:`read_image` / :func:`write_image` (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_COMPRESSED = (".nii.gz", ".nrrd", ".mha")  # written with compression
_DETACHED = (".nhdr", ".mhd")  # header + separate data file
_DICOM_FILE_SUFFIXES = (".dcm", ".ima", ".dicom")
_ORTHONORMAL_TOL = 1e-4  # NIfTI stores the direction as float32 (quaternion or sform)
_NONFINITE_FIX = (
    "repair the image: replace the NaN/inf voxels by the background value (e.g. the minimum "
    "intensity) and save it again, or leave the case out of the dataset "
    "(Python API: allow_nonfinite=True accepts them)."
)
#: Fewest voxels along any axis of an image used for landmarks (fewer: a slice, not a volume).
MIN_AXIS_VOXELS = 4
# DICOM slice positions: allowed deviation from the median slice step (fraction of the step,
# but at least this many mm; covers positions rounded in the header)
_SLICE_STEP_TOL = 0.2
_SLICE_POSITION_TOL_MM = 0.1
_FORMATS_HINT = ".nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd or a DICOM series directory"


def image_suffix(path: str | Path) -> str | None:
    """The image suffix of ``path`` from :data:`IMAGE_SUFFIXES` (case-insensitive), or None."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:  # ".nii.gz" is listed before ".nii"
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_image_path(path: str | Path) -> bool:
    """Whether ``path`` has an image file suffix (DICOM series directories are not included)."""
    return image_suffix(path) is not None


# ---------------------------------------------------------------------------------- problems
def _not_orthonormal(deviation: float | None, where: str = "") -> tuple[str, str]:
    """(problem, fix) for a sheared/scaled direction; ``deviation`` = max |D^T D - I|."""
    amount = "" if deviation is None else f" (|D^T D - I| max {deviation:.3g}{where})"
    return (
        f"direction matrix is not orthonormal{amount}; sheared or scaled voxel axes are not "
        "supported.",
        "resample the image onto an orthonormal grid (e.g. in 3D Slicer) or correct the "
        "direction in the header.",
    )


def _problems_with_fixes(image: sitk.Image, *, check_voxels: bool = True) -> list[tuple[str, str]]:
    """(problem, fix) pairs for everything that makes ``image`` unusable; empty if fine.

    ``check_voxels=False`` skips the NaN/inf voxel count (header checks only).
    """
    out: list[tuple[str, str]] = []
    dim = image.GetDimension()
    if dim != 3:
        out.append(
            (
                f"image is {dim}D (size {'x'.join(map(str, image.GetSize()))}), not 3D.",
                "use a 3D volume; split 4D series into 3D volumes and stack 2D slices.",
            )
        )
    ncomp = image.GetNumberOfComponentsPerPixel()
    pixel = image.GetPixelIDTypeAsString()
    if ncomp > 1 or "complex" in pixel.lower():
        out.append(
            (
                f"image has {ncomp} components per voxel ({pixel}), not one scalar.",
                "save a single-channel (grey-value) image, e.g. one channel or the magnitude.",
            )
        )
    size = image.GetSize()
    if any(s == 0 for s in size):
        out.append(
            (
                f"image has a zero-size axis (size {'x'.join(map(str, size))}).",
                "export the volume again; every axis needs at least one voxel.",
            )
        )
    elif dim == 3 and min(size) < MIN_AXIS_VOXELS:
        out.append(
            (
                f"image is too thin for 3D landmarks: size {'x'.join(map(str, size))}, fewer "
                f"than {MIN_AXIS_VOXELS} voxels along an axis (a single slice or slab).",
                "use the whole 3D volume (e.g. export every slice of the series, not one); "
                "landmarks cannot be localized in a single slice.",
            )
        )
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        out.append(
            (
                f"voxel spacing {tuple(spacing.tolist())} is not positive and finite.",
                "correct the voxel spacing in the image header (positive, in mm).",
            )
        )
    elif (implausible := spacing_problem(spacing[:3].tolist())) is not None:
        out.append(
            (
                implausible,
                "correct the voxel spacing in the image header (in mm: multiply metres by "
                "1000, divide micrometres by 1000).",
            )
        )
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    if not np.all(np.isfinite(origin)):
        out.append(
            (
                f"image origin {tuple(origin.tolist())} is not finite.",
                "correct the origin in the image header.",
            )
        )
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if not np.all(np.isfinite(direction)):
        out.append(("direction matrix is not finite.", "correct the direction in the header."))
    else:
        deviation = float(np.max(np.abs(direction.T @ direction - np.eye(dim))))
        if deviation > _ORTHONORMAL_TOL:
            out.append(_not_orthonormal(deviation))
    if check_voxels and ncomp == 1 and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        values = sitk.GetArrayViewFromImage(image)
        n_nan = int(np.count_nonzero(np.isnan(values)))
        n_inf = int(np.count_nonzero(np.isinf(values)))
        if n_nan or n_inf:
            out.append(
                (
                    f"{n_nan + n_inf} of {values.size} voxels are not finite "
                    f"({n_nan} NaN, {n_inf} inf).",
                    _NONFINITE_FIX,
                )
            )
    return out


def image_problems(image: sitk.Image) -> list[str]:
    """Human sentences for every problem that makes ``image`` unusable; empty if it is fine.

    Checks: 3D, one scalar component, at least :data:`MIN_AXIS_VOXELS` voxels along each axis
    (none zero), positive finite spacing within the plausible range
    (:data:`landmark3d.limits.MIN_SPACING_MM` - ``MAX_SPACING_MM``), finite origin,
    orthonormal direction, and the number of NaN / inf voxels. Never raises.
    """
    return [problem for problem, _ in _problems_with_fixes(image)]


def validate_image(
    image: sitk.Image, path: str | Path | None = None, *, allow_nonfinite: bool = False
) -> None:
    """Raise :class:`ImageError` (naming ``path``) if ``image`` has any :func:`image_problems`.

    With ``allow_nonfinite`` NaN/inf voxels are tolerated (all other checks still apply).
    """
    found = _problems_with_fixes(image, check_voxels=not allow_nonfinite)
    if found:
        fixes = list(dict.fromkeys(f for _, f in found))
        raise ImageError(" ".join(p for p, _ in found), path=path, fix=" ".join(fixes))


# ---------------------------------------------------------------------------------- reading
def _sitk_message(err: RuntimeError) -> str:
    """One readable line from a multi-line SimpleITK/ITK exception text."""
    kept: list[str] = []
    for raw in str(err).splitlines():
        line = raw.strip()
        if not line or line.startswith("Exception thrown in SimpleITK"):
            continue
        if line.startswith("Reason:") or re.search(r"\btrouble\b", line):
            continue  # errno leftovers and NRRD's "trouble reading" stack lines
        line = re.sub(r"^(sitk::ERROR:|ITK ERROR:)\s*", "", line)
        line = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
        line = re.sub(r"^\[\w+\]\s*(\w+:\s*)?", "", line)
        if line:
            kept.append(line.rstrip(":"))
    text = "; ".join(kept) or str(err).strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _header_size(path: Path) -> tuple[tuple[int, ...], int] | None:
    """``(size, components)`` from the file's header without reading voxels; None if unreadable."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # ReadImage reports the damage with its own message
    return tuple(int(s) for s in reader.GetSize()), int(reader.GetNumberOfComponents())


def _dicom_series(
    directory: Path, series_uid: str | None, max_voxels: int | None = None
) -> sitk.Image:
    """Read one DICOM series from ``directory``."""
    reader = sitk.ImageSeriesReader()
    try:
        uids = list(reader.GetGDCMSeriesIDs(str(directory)))
    except RuntimeError as e:
        raise ImageError(
            f"cannot scan the directory for DICOM series: {_sitk_message(e)}.",
            path=directory,
            fix="check the directory's permissions and DICOM files.",
        ) from e
    if not uids:
        raise ImageError(
            "directory holds no DICOM series.",
            path=directory,
            fix=f"pass a directory holding the DICOM files of one series, or an image file "
            f"({_FORMATS_HINT}).",
        )
    if series_uid is None:
        if len(uids) > 1:
            raise ImageError(
                f"directory holds {len(uids)} DICOM series: {', '.join(uids)}.",
                path=directory,
                fix="pass one series: move each series into its own directory "
                "(or call read_image(path, series_uid=...)).",
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise ImageError(
            f"DICOM series {series_uid} is not in the directory (found: {', '.join(uids)}).",
            path=directory,
            fix="pass one of the series UIDs found.",
        )
    files = reader.GetGDCMSeriesFileNames(str(directory), series_uid)
    header = _header_size(Path(files[0])) if files else None
    if header is not None:  # one slice per file
        check_voxel_count(
            (*header[0][:2], len(files)), "DICOM series", path=directory, limit=max_voxels,
            components=header[1],
        )  # fmt: skip
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the position check
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ImageError(
            f"cannot read DICOM series {series_uid}: {_sitk_message(e)}.",
            path=directory,
            fix="check that the series is complete and its files are not damaged.",
        ) from e
    _check_slice_positions(reader, list(files), directory, series_uid)
    return image


def _ds_numbers(reader: sitk.ImageSeriesReader, index: int, tag: str, n: int) -> NDArray | None:
    """The ``n`` numbers of a decimal-string tag of slice ``index``; None if absent/malformed."""
    if not reader.HasMetaDataKey(index, tag):
        return None
    try:
        values = np.array([float(v) for v in reader.GetMetaData(index, tag).split("\\")])
    except ValueError:
        return None
    return values if values.shape == (n,) and np.all(np.isfinite(values)) else None


def _slice_positions(reader: sitk.ImageSeriesReader, count: int) -> NDArray | None:
    """Each slice's ImagePositionPatient projected on the slice normal, mm; shape ``(count,)``.

    The normal is row x column of the first slice's ImageOrientationPatient. None when a slice
    lacks these tags (then ITK has no positions to misplace either).
    """
    iop = _ds_numbers(reader, 0, "0020|0037", 6)
    if iop is None:
        return None
    normal = np.cross(iop[:3], iop[3:])
    if not np.linalg.norm(normal) > 0:
        return None
    normal /= np.linalg.norm(normal)
    out = np.empty(count)
    for i in range(count):
        ipp = _ds_numbers(reader, i, "0020|0032", 3)
        if ipp is None:
            return None
        out[i] = float(ipp @ normal)
    return out


def _check_slice_positions(
    reader: sitk.ImageSeriesReader, files: list[str], directory: Path, series_uid: str
) -> None:
    """Raise :class:`ImageError` unless the slices are evenly spaced along the slice normal.

    ITK stacks the slices on a grid with the mean slice step and only prints a warning when
    they are not evenly spaced: after a missing slice every later slice would sit a whole
    slice step away from where it was acquired. Refused: a step differing from the median step
    by more than ``_SLICE_STEP_TOL`` of it (at least ``_SLICE_POSITION_TOL_MM``), or any slice
    further than that from ITK's evenly spaced grid (a drifting step).
    """
    if len(files) < 3:
        return
    positions = _slice_positions(reader, len(files))
    if positions is None:
        return
    order = np.argsort(positions, kind="stable")
    z = positions[order]
    steps = np.diff(z)
    median = float(np.median(steps))
    tol = max(_SLICE_STEP_TOL * median, _SLICE_POSITION_TOL_MM)
    grid_step = (z[-1] - z[0]) / (len(z) - 1)  # what ITK uses
    off = float(np.max(np.abs(z - (z[0] + grid_step * np.arange(len(z))))))
    bad = np.flatnonzero(np.abs(steps - median) > tol)
    if bad.size == 0 and off <= tol:
        return
    name = [Path(files[i]).name for i in order]
    found: list[str] = []
    for i in bad[:3]:
        between = f"{name[i]} ({z[i]:.2f} mm) and {name[i + 1]} ({z[i + 1]:.2f} mm)"
        if steps[i] <= tol:
            found.append(f"{between} are at the same position")
        else:
            missing = int(np.rint(steps[i] / median)) - 1 if median > tol else 0
            guess = f", {missing} slice(s) missing?" if missing >= 1 else ""
            found.append(f"{between} are {steps[i]:.2f} mm apart{guess}")
    if bad.size > 3:
        found.append(f"{bad.size - 3} more uneven step(s)")
    if not found:
        found.append(f"the slice step drifts from {steps.min():.2f} to {steps.max():.2f} mm")
    raise ImageError(
        f"DICOM series {series_uid} is not evenly spaced: {'; '.join(found)} (positions along "
        f"the slice normal; the usual step is {median:.2f} mm). Read as one volume, slices "
        f"would be misplaced by up to {off:.2f} mm.",
        path=directory,
        fix="copy or export the complete series again (a slice file is probably missing); "
        "if slices repeat, keep one acquisition per directory.",
    )


def _squeeze_4d(image: sitk.Image) -> sitk.Image:
    """A 4D image whose 4th axis has length 1 as a 3D image (upper-left 3x3 direction)."""
    array = sitk.GetArrayFromImage(image)[0]  # [t, k, j, i] -> [k, j, i]
    out = sitk.GetImageFromArray(array, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.SetOrigin(image.GetOrigin()[:3])
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(4, 4)[:3, :3]
    out.SetDirection(tuple(float(v) for v in direction.ravel()))
    spacing = image.GetSpacing()[:3]
    if all(np.isfinite(s) and s > 0 for s in spacing):
        out.SetSpacing(spacing)
    for key in image.GetMetaDataKeys():
        out.SetMetaData(key, image.GetMetaData(key))
    return out


def read_image(
    path: str | Path,
    *,
    allow_nonfinite: bool = False,
    series_uid: str | None = None,
    max_voxels: int | None = None,
) -> sitk.Image:
    """Read and validate a 3D scalar image (file or DICOM series directory).

    Args:
        path: an image file with one of :data:`IMAGE_SUFFIXES`, or a directory holding one
            DICOM series.
        allow_nonfinite: accept NaN/inf voxels instead of raising.
        series_uid: for a directory holding several DICOM series, the one to read.
        max_voxels: refuse images with more voxels (checked from the header, before any voxel
            is read); None = ``$LANDMARK3D_MAX_VOXELS`` or 2**30 (see
            :mod:`landmark3d.limits`).

    ITK's own warnings (printed straight to stderr) are switched off while reading: the
    checks here report the problems they hint at, as :class:`ImageError` with a fix.

    Returns:
        The image with the file's spacing, origin and direction (LPS). A 4D image whose 4th
        axis has length 1 is returned as 3D.

    Raises:
        ImageError: the file is missing, empty, unreadable, truncated, larger than the voxel
            budget, or the image is not a usable 3D scalar image (see :func:`image_problems`).
    """
    with _itk_warnings_off():
        return _read_image(Path(path), allow_nonfinite, series_uid, max_voxels)


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Switch ITK's global warning display off (and back to what it was afterwards)."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _read_image(
    p: Path, allow_nonfinite: bool, series_uid: str | None, max_voxels: int | None
) -> sitk.Image:
    """:func:`read_image` without the warning switch."""
    if not p.exists():
        raise ImageError(
            "image file not found.",
            path=p,
            fix="check the path (and the dataset spec's image entry).",
        )
    if p.is_dir():
        image = _dicom_series(p, series_uid, max_voxels)
    else:
        if p.stat().st_size == 0:
            raise ImageError(
                "image file is empty (0 bytes).", path=p, fix="copy or export it again."
            )
        suffix = image_suffix(p)
        if suffix is None and p.name.lower().endswith(_DICOM_FILE_SUFFIXES):
            raise ImageError(
                "a single DICOM file is one slice, not a volume.",
                path=p,
                fix="pass the directory that holds all files of the series.",
            )
        header = _header_size(p)
        if header is not None:
            check_voxel_count(header[0], "image", path=p, limit=max_voxels, components=header[1])
        scan = None
        if suffix in (".nii", ".nii.gz"):
            scan = scan_nifti(p, suffix, keep_positions=allow_nonfinite)
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as e:
            detail = _sitk_message(e)
            if "orthonormal" in detail.lower():  # ITK: a sheared NIfTI sform and no qform
                shear = nifti_sform_shear(p, suffix) if suffix in (".nii", ".nii.gz") else None
                problem, fix = _not_orthonormal(shear, " in the sform" if shear else "")
                raise ImageError(f"cannot read the image: {problem}", path=p, fix=fix) from e
            if "spacing" in detail.lower():
                fix = "correct the voxel spacing in the image header (positive, in mm)."
            else:
                kind = "" if suffix is None else f" {suffix}"
                fix = (
                    f"the file is damaged, truncated or not a valid{kind} image; export it "
                    f"again ({_FORMATS_HINT})."
                )
            raise ImageError(f"cannot read the image: {detail}.", path=p, fix=fix) from e
        if suffix in (".nii", ".nii.gz"):
            shear = nifti_sform_shear(p, suffix)
            if shear is not None and shear > _ORTHONORMAL_TOL:  # ITK fell back to the qform
                problem, fix = _not_orthonormal(shear, " in the sform")
                raise ImageError(
                    f"{problem} (ITK would silently use the qform instead.)", path=p, fix=fix
                )
        if scan is not None and scan.nan + scan.inf:
            if not allow_nonfinite:
                raise ImageError(
                    f"{scan.nan + scan.inf} of {image.GetNumberOfPixels()} voxels are not "
                    f"finite ({scan.nan} NaN, {scan.inf} inf).",
                    path=p,
                    fix=_NONFINITE_FIX,
                )
            if image.GetNumberOfComponentsPerPixel() == 1:  # vector images are refused below
                image = restore_nonfinite(image, scan)
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = _squeeze_4d(image)
    validate_image(image, p, allow_nonfinite=allow_nonfinite)
    return image


def read_volume(
    path: str | Path, *, allow_nonfinite: bool = False, max_voxels: int | None = None
) -> Volume:
    """Read an image as a float32 :class:`Volume` in index order ``[i, j, k]``."""
    image = read_image(path, allow_nonfinite=allow_nonfinite, max_voxels=max_voxels)
    return Volume.from_sitk(image, np.float32)


# ---------------------------------------------------------------------------------- writing
def _writer(path: Path, suffix: str) -> sitk.ImageFileWriter:
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(suffix in _COMPRESSED)
    return writer


def write_image(image: sitk.Image, path: str | Path, overwrite: bool = True) -> Path:
    """Write ``image`` atomically; the format follows the suffix (:data:`IMAGE_SUFFIXES`).

    ``.nii.gz``, ``.nrrd`` and ``.mha`` are compressed. The detached formats (``.nhdr``,
    ``.mhd``) are written into a temporary directory beside ``path``; the data file is moved
    into place first and the header last, so a header never points at missing data.

    Raises:
        ImageError: unknown suffix, or SimpleITK fails to write.
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
    """
    dest = Path(path)
    suffix = image_suffix(dest)
    if suffix is None:
        raise ImageError(
            "unknown image file suffix.",
            path=dest,
            fix=f"use one of {', '.join(IMAGE_SUFFIXES)}.",
        )
    try:
        if suffix in _DETACHED:
            check_writable(dest, overwrite)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".write-", dir=dest.parent) as tmp:
                _writer(Path(tmp) / dest.name, suffix).Execute(image)
                written = sorted(Path(tmp).iterdir(), key=lambda f: f.name == dest.name)
                for f in written:  # header (dest.name) last
                    os.replace(f, dest.parent / f.name)
        else:
            with atomic_path(dest, overwrite) as tmp_path:
                _writer(tmp_path, suffix).Execute(image)
    except RuntimeError as e:
        raise ImageError(
            f"cannot write the image: {_sitk_message(e)}.",
            path=dest,
            fix="check the directory is writable and the pixel type suits the format.",
        ) from e
    return dest
