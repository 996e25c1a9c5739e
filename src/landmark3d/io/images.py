"""Reading and writing 3D medical images through SimpleITK, with validation.

Supported: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``) and a DICOM series given as a directory. Spacing, origin and direction are kept
exactly as SimpleITK reads them (world = LPS mm, see ``docs/coordinates.md``).

:func:`read_image` refuses images the rest of landmark3d cannot use and says how to fix them:
missing/empty/corrupt or truncated files, images that are not 3D (a 4D image whose 4th axis has
length 1 is squeezed to 3D), multi-component (vector/RGB/complex) images, zero-size axes,
zero/negative/non-finite spacing, non-orthonormal direction matrices, non-finite origin and
NaN/inf voxels (unless ``allow_nonfinite=True``). :func:`image_problems` is the non-raising
variant used by dataset verification.

This module never imports torch.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from landmark3d.errors import ImageError
from landmark3d.geometry.space import Volume
from landmark3d.io.atomic import atomic_path, check_writable

#: File suffixes read and written by :func:`read_image` / :func:`write_image` (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_COMPRESSED = (".nii.gz", ".nrrd", ".mha")  # written with compression
_DETACHED = (".nhdr", ".mhd")  # header + separate data file
_DICOM_FILE_SUFFIXES = (".dcm", ".ima", ".dicom")
_ORTHONORMAL_TOL = 1e-4  # NIfTI stores the direction as float32 (quaternion or sform)
_NONFINITE_FIX = (
    "clean the image: replace the non-finite voxels (e.g. by the minimum intensity) and save "
    "it again (or read it with allow_nonfinite=True)."
)
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
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        out.append(
            (
                f"voxel spacing {tuple(spacing.tolist())} is not positive and finite.",
                "correct the voxel spacing in the image header (positive, in mm).",
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
            out.append(
                (
                    f"direction matrix is not orthonormal (|D^T D - I| max {deviation:.3g}); "
                    "sheared or scaled voxel axes are not supported.",
                    "resample the image onto an orthonormal grid (e.g. in 3D Slicer) "
                    "or correct the direction in the header.",
                )
            )
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

    Checks: 3D, one scalar component, no zero-size axis, positive finite spacing, finite origin,
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


@dataclass
class _NiftiHeader:
    offset: int  # vox_offset: where the voxel data start, bytes
    nbytes: int  # voxel data size, bytes
    dtype: np.dtype[Any] | None  # set for float data (the only kind that can hold NaN/inf)
    slope: float
    inter: float


@dataclass
class _NiftiScan:
    nan: int = 0
    inf: int = 0
    positions: list[NDArray[np.int64]] = field(default_factory=list)  # flat voxel indices
    values: list[NDArray[np.floating]] = field(default_factory=list)  # their values


def _nifti_header(header: bytes) -> _NiftiHeader | None:
    """Data layout of a NIfTI-1/-2 header, or None if ``header`` is not one."""
    for e in "<>":
        if len(header) >= 348 and struct.unpack(e + "i", header[:4])[0] == 348:
            dims = struct.unpack(e + "8h", header[40:56])
            code, bitpix = struct.unpack(e + "2h", header[70:74])
            offset = int(struct.unpack(e + "f", header[108:112])[0])
            slope, inter = struct.unpack(e + "2f", header[112:120])
            break
        if len(header) >= 540 and struct.unpack(e + "i", header[:4])[0] == 540:
            code, bitpix = struct.unpack(e + "2h", header[12:16])
            dims = struct.unpack(e + "8q", header[16:80])
            offset = int(struct.unpack(e + "q", header[168:176])[0])
            slope, inter = struct.unpack(e + "2d", header[176:192])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    nvox = int(np.prod([max(int(d), 0) for d in dims[1 : ndim + 1]], dtype=np.int64))
    kind = {16: "f4", 64: "f8"}.get(int(code))
    dtype = None if kind is None else np.dtype(e + kind)
    if not (np.isfinite(slope) and slope != 0):
        slope, inter = 1.0, 0.0
    return _NiftiHeader(offset, nvox * bitpix // 8, dtype, float(slope), float(inter))


def _scan_nifti(path: Path, suffix: str, keep_positions: bool) -> _NiftiScan | None:
    """Check a NIfTI file's data ourselves, because ITK hides two kinds of damage.

    * ITK zero-fills the missing part of a **truncated** file. Raise if the file holds fewer
      data bytes than its header promises (``.nii``: file size; ``.nii.gz``: the gzip trailer,
      i.e. uncompressed size mod 2**32, and only on a mismatch a full count).
    * ITK (before 6.0) replaces every **NaN/inf** voxel by 0. For float data the voxels are
      scanned and the non-finite ones counted (with flat positions if ``keep_positions``).

    Returns the scan for float data, else None (also for files SimpleITK should judge).
    """
    opener = gzip.open if suffix == ".nii.gz" else open
    try:
        with opener(path, "rb") as fh:
            head = _nifti_header(fh.read(540))
    except (OSError, EOFError, zlib.error):
        return None  # let SimpleITK report the unreadable file
    if head is None:
        return None
    expected = head.offset + head.nbytes
    scan = None
    if head.dtype is None and suffix == ".nii":
        actual = path.stat().st_size
    elif head.dtype is None:
        with open(path, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            if struct.unpack("<I", raw.read(4))[0] == expected % 2**32:
                return None
        actual = _stream_nifti(path, opener, head, None)
    else:
        scan = _NiftiScan()
        actual = _stream_nifti(path, opener, head, (scan, keep_positions))
    if actual < expected:
        raise ImageError(
            f"image file is truncated: it holds {actual} bytes but its header needs {expected}.",
            path=path,
            fix="copy or export the image again (the transfer was probably interrupted).",
        )
    return scan


def _stream_nifti(
    path: Path, opener: Any, head: _NiftiHeader, scan: tuple[_NiftiScan, bool] | None
) -> int:
    """Read the file through; count its bytes and (with ``scan``) its non-finite voxels."""
    total, done = 0, 0  # bytes read; voxels scanned
    try:
        with opener(path, "rb") as fh:
            total = len(fh.read(head.offset))
            while chunk := fh.read(1 << 24):
                total += len(chunk)
                if scan is None or head.dtype is None:
                    continue
                usable = min(len(chunk), head.nbytes - done * head.dtype.itemsize)
                values = np.frombuffer(chunk[: usable - usable % head.dtype.itemsize], head.dtype)
                bad = np.flatnonzero(~np.isfinite(values))
                if bad.size:
                    result, keep = scan
                    result.nan += int(np.count_nonzero(np.isnan(values[bad])))
                    result.inf += int(bad.size - np.count_nonzero(np.isnan(values[bad])))
                    if keep:
                        result.positions.append(bad + done)
                        result.values.append(values[bad] * head.slope + head.inter)
                done += values.size
    except (OSError, EOFError, zlib.error):
        pass  # truncated stream: ``total`` is what could be read
    return total


def _restore_nonfinite(image: sitk.Image, scan: _NiftiScan) -> sitk.Image:
    """Put back the NaN/inf voxels that ITK's NIfTI reader replaced by 0."""
    array = sitk.GetArrayFromImage(image)
    flat = array.reshape(-1)
    for pos, vals in zip(scan.positions, scan.values, strict=True):
        flat[pos[pos < flat.size]] = vals[pos < flat.size]
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _dicom_series(directory: Path, series_uid: str | None) -> sitk.Image:
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
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise ImageError(
            f"cannot read DICOM series {series_uid}: {_sitk_message(e)}.",
            path=directory,
            fix="check that the series is complete and its files are not damaged.",
        ) from e


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
    path: str | Path, *, allow_nonfinite: bool = False, series_uid: str | None = None
) -> sitk.Image:
    """Read and validate a 3D scalar image (file or DICOM series directory).

    Args:
        path: an image file with one of :data:`IMAGE_SUFFIXES`, or a directory holding one
            DICOM series.
        allow_nonfinite: accept NaN/inf voxels instead of raising.
        series_uid: for a directory holding several DICOM series, the one to read.

    Returns:
        The image with the file's spacing, origin and direction (LPS). A 4D image whose 4th
        axis has length 1 is returned as 3D.

    Raises:
        ImageError: the file is missing, empty, unreadable, truncated, or the image is not a
            usable 3D scalar image (see :func:`image_problems`).
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(
            "image file not found.",
            path=p,
            fix="check the path (and the dataset spec's image entry).",
        )
    if p.is_dir():
        image = _dicom_series(p, series_uid)
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
        scan = None
        if suffix in (".nii", ".nii.gz"):
            scan = _scan_nifti(p, suffix, keep_positions=allow_nonfinite)
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as e:
            detail = _sitk_message(e)
            if "spacing" in detail.lower():
                fix = "correct the voxel spacing in the image header (positive, in mm)."
            else:
                kind = "" if suffix is None else f" {suffix}"
                fix = (
                    f"the file is damaged, truncated or not a valid{kind} image; export it "
                    f"again ({_FORMATS_HINT})."
                )
            raise ImageError(f"cannot read the image: {detail}.", path=p, fix=fix) from e
        if scan is not None and scan.nan + scan.inf:
            if not allow_nonfinite:
                raise ImageError(
                    f"{scan.nan + scan.inf} of {image.GetNumberOfPixels()} voxels are not "
                    f"finite ({scan.nan} NaN, {scan.inf} inf).",
                    path=p,
                    fix=_NONFINITE_FIX,
                )
            if image.GetNumberOfComponentsPerPixel() == 1:  # vector images are refused below
                image = _restore_nonfinite(image, scan)
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = _squeeze_4d(image)
    validate_image(image, p, allow_nonfinite=allow_nonfinite)
    return image


def read_volume(path: str | Path, *, allow_nonfinite: bool = False) -> Volume:
    """Read an image as a float32 :class:`Volume` in index order ``[i, j, k]``."""
    return Volume.from_sitk(read_image(path, allow_nonfinite=allow_nonfinite), np.float32)


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
