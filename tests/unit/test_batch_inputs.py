"""Which images ``landmark3d predict --input DIR`` finds: files, DICOM series, both."""

from __future__ import annotations

from pathlib import Path

import pytest

from landmark3d.errors import ImageError
from landmark3d.inference.batch import enumerate_images


def _dicom_dir(path: Path, n: int = 3) -> Path:
    """A directory of files that carry the DICOM signature (enough to be found, not read)."""
    path.mkdir(parents=True)
    for i in range(n):
        (path / f"slice{i:04d}.dcm").write_bytes(bytes(128) + b"DICM" + bytes(16))
    return path


def test_a_directory_mixing_image_files_and_dicom_series_yields_both(tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    _dicom_dir(d / "case009")
    _dicom_dir(d / "case002_dicom")
    (d / "c2.nrrd").write_bytes(b"x")
    (d / "notes").mkdir()  # a folder without DICOM files beside the images is not a series
    (d / "notes" / "README").write_text("not an image")
    found = enumerate_images(d)
    assert found == [
        ("c2", d / "c2.nrrd"),
        ("case002_dicom", d / "case002_dicom"),
        ("case009", d / "case009"),
    ]


def test_series_only_and_a_series_directory_itself(tmp_path: Path) -> None:
    d = tmp_path / "cohort"
    _dicom_dir(d / "a")
    _dicom_dir(d / "b")
    assert [cid for cid, _ in enumerate_images(d)] == ["a", "b"]
    assert enumerate_images(d / "a") == [("a", d / "a")]


def test_an_image_file_and_a_series_with_the_same_case_id_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "clash"
    _dicom_dir(d / "case002")
    (d / "case002.nii.gz").write_bytes(b"x")
    with pytest.raises(ImageError) as info:
        enumerate_images(d)
    assert "'case002'" in str(info.value) and "case002.nii.gz" in str(info.value)
    assert info.value.fix and "rename" in info.value.fix
