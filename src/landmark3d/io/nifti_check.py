"""Our own checks of NIfTI files, for the damage ITK's NIfTI reader hides.

* a **truncated** file is zero-filled by ITK: :func:`scan_nifti` compares the data bytes with
  what the header promises;
* **NaN/inf** voxels become 0 in ITK (before 6.0): :func:`scan_nifti` counts them (and
  :func:`restore_nonfinite` puts them back when they are allowed);
* a header without the NIfTI **magic** is read by ITK as Analyze 7.5, silently dropping the
  origin and direction (world coordinates would be wrong): :func:`nifti_magic_problem`;
* a **sheared** sform without a qform is refused by ITK with a terse message;
  :func:`nifti_sform_shear` measures the shear so the error can say what is wrong;
* an uncompressed NIfTI named ``.nii.gz`` is scanned as the ``.nii`` it is.

Used by :func:`landmark3d.io.images.read_image`. This module never imports torch.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from landmark3d.errors import ImageError


@dataclass
class NiftiHeader:
    offset: int  # vox_offset: where the voxel data start, bytes
    nbytes: int  # voxel data size, bytes
    dtype: np.dtype[Any] | None  # set for float data (the only kind that can hold NaN/inf)
    slope: float
    inter: float


@dataclass
class NiftiScan:
    nan: int = 0
    inf: int = 0
    positions: list[NDArray[np.int64]] = field(default_factory=list)  # flat voxel indices
    values: list[NDArray[np.floating]] = field(default_factory=list)  # their values


_NIFTI_MAGICS = (b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0")
_GZIP_MAGIC = b"\x1f\x8b"


def nifti_magic_problem(header: bytes) -> str | None:
    """Why ``header`` (the first 540 bytes of a .nii) is not a NIfTI header; None if it is.

    ITK reads a 348-byte header without the NIfTI magic as an Analyze 7.5 image and silently
    drops its origin and direction (world coordinates would be wrong), and it accepts some
    headers with a damaged size field; both are refused.
    """
    if len(header) < 348:
        return None  # too short: ITK's own error is clear
    sizes = {struct.unpack(e + "i", header[:4])[0] for e in "<>"}
    if sizes.isdisjoint({348, 540}):
        return "the NIfTI header size field is damaged (neither 348 nor 540)"
    magic = header[4:8] if 540 in sizes and len(header) >= 540 else header[344:348]
    if magic not in _NIFTI_MAGICS:
        return (
            f"the NIfTI magic is {magic!r}, not 'n+1': the file is damaged, or an "
            "Analyze 7.5 image, whose origin and direction ITK cannot read"
        )
    return None


def nifti_header(header: bytes) -> NiftiHeader | None:
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
    return NiftiHeader(offset, nvox * bitpix // 8, dtype, float(slope), float(inter))


def _nifti_opener(path: Path, suffix: str) -> tuple[str, Any]:
    """``(suffix, open function)`` for reading ``path``: an uncompressed NIfTI named
    ``.nii.gz`` (no gzip magic) is read as the ``.nii`` it is, as ITK does."""
    with open(path, "rb") as raw_fh:
        if suffix == ".nii.gz" and raw_fh.read(2) != _GZIP_MAGIC:
            suffix = ".nii"
    return suffix, gzip.open if suffix == ".nii.gz" else open


def _read_first_bytes(path: Path, opener: Any, n: int = 540) -> bytes | None:
    """The first ``n`` bytes of a NIfTI file's header, read with ``opener`` (see
    :func:`_nifti_opener`); None if unreadable."""
    try:
        with opener(path, "rb") as fh:
            data: bytes = fh.read(n)
    except (OSError, EOFError, zlib.error):
        return None
    return data


def nifti_sform_shear(path: Path, suffix: str) -> float | None:
    """How far the sform's direction is from orthonormal: max ``|D^T D - I|`` (unitless).

    ``D`` is the sform's 3x3 part with unit-length columns (the spacing divided out), so
    rotations and flips give 0 and a shear gives its size. None if the file has no sform
    (``sform_code`` 0) or is not a readable NIfTI-1/-2 header. ITK refuses a sheared sform
    when there is no qform to fall back on ("No orthonormal definition found").
    """
    header = _read_first_bytes(path, _nifti_opener(path, suffix)[1])
    if header is None:
        return None
    for e in "<>":
        if len(header) >= 348 and struct.unpack(e + "i", header[:4])[0] == 348:
            code = struct.unpack(e + "h", header[254:256])[0]
            rows = struct.unpack(e + "12f", header[280:328])
            break
        if len(header) >= 540 and struct.unpack(e + "i", header[:4])[0] == 540:
            code = struct.unpack(e + "i", header[348:352])[0]
            rows = struct.unpack(e + "12d", header[400:496])
            break
    else:
        return None
    if code <= 0:
        return None
    matrix = np.asarray(rows, dtype=np.float64).reshape(3, 4)[:, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if not (np.all(np.isfinite(matrix)) and np.all(norms > 0)):
        return None
    direction = matrix / norms
    return float(np.max(np.abs(direction.T @ direction - np.eye(3))))


def scan_nifti(path: Path, suffix: str, keep_positions: bool) -> NiftiScan | None:
    """Check a NIfTI file's data ourselves, because ITK hides two kinds of damage.

    * ITK zero-fills the missing part of a **truncated** file. Raise if the file holds fewer
      data bytes than its header promises (``.nii``: file size; ``.nii.gz``: the gzip trailer,
      i.e. uncompressed size mod 2**32, and only on a mismatch a full count).
    * ITK (before 6.0) replaces every **NaN/inf** voxel by 0. For float data the voxels are
      scanned and the non-finite ones counted (with flat positions if ``keep_positions``).

    Returns the scan for float data, else None (also for files SimpleITK should judge).
    """
    suffix, opener = _nifti_opener(path, suffix)
    first = _read_first_bytes(path, opener)
    if first is None:
        return None  # let SimpleITK report the unreadable file
    problem = nifti_magic_problem(first)
    if problem is not None:
        raise ImageError(
            f"cannot read the image: not a valid NIfTI file ({problem}).",
            path=path,
            fix="export the image again as NIfTI (.nii.gz), or convert it with a current tool "
            "(e.g. 3D Slicer) that writes its orientation.",
        )
    head = nifti_header(first)
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
        scan = NiftiScan()
        actual = _stream_nifti(path, opener, head, (scan, keep_positions))
    if actual < expected:
        raise ImageError(
            f"image file is truncated: it holds {actual} bytes but its header needs {expected}.",
            path=path,
            fix="copy or export the image again (the transfer was probably interrupted).",
        )
    return scan


def _stream_nifti(
    path: Path, opener: Any, head: NiftiHeader, scan: tuple[NiftiScan, bool] | None
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


def restore_nonfinite(image: sitk.Image, scan: NiftiScan) -> sitk.Image:
    """Put back the NaN/inf voxels that ITK's NIfTI reader replaced by 0."""
    array = sitk.GetArrayFromImage(image)
    flat = array.reshape(-1)
    for pos, vals in zip(scan.positions, scan.values, strict=True):
        flat[pos[pos < flat.size]] = vals[pos < flat.size]
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out
