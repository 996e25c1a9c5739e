"""The original method's dataset layout (Pang et al., MIDL 2023), read into a Dataset.

The original code was never released beyond a README naming ``images/``, ``setup/landmark.csv``
and ``setup/cv0..cv2``; the exact file formats below are ours (``docs/dataset_format.md``)::

    <root>/images/<case>.nii.gz      one image per case; case id = file name without suffix
    <root>/setup/landmark.csv        long form: case,landmark,x,y,z (world mm) with a line
                                     '# CoordinateSystem = LPS' or '= RAS'
    <root>/setup/cv0, cv1, ...       held-out case ids of fold K, one per line ('#' comments)

Landmarks are held in memory (``Dataset.landmark_table``, converted to LPS).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from landmark3d.data.dataset import (
    CaseSpec,
    Dataset,
    did_you_mean,
    natural_key,
    parse_coordinate_system,
    parse_modality,
)
from landmark3d.errors import DatasetError
from landmark3d.io import images as image_io
from landmark3d.io.landmark_set import LandmarkSet, ras_to_lps

LANDMARK_CSV = Path("setup") / "landmark.csv"
LANDMARK_CSV_COLUMNS = ("case", "landmark", "x", "y", "z")
DEFAULT_MODALITY = "CT"
_FOLD_FILE = re.compile(r"cv(\d+)(\.txt)?")
_COMMENT = re.compile(r"#\s*(\w+)\s*[=:]\s*(.*?)\s*")


def _read_landmark_csv(path: Path) -> tuple[dict[str, LandmarkSet], list[str], str, str]:
    """Parse ``setup/landmark.csv``: (case -> LPS landmarks, names, declared system, modality)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the landmark table: {e}", path=path) from None
    system: str | None = None
    modality = DEFAULT_MODALITY
    columns: dict[str, int] | None = None
    points: dict[str, dict[str, list[float] | None]] = {}
    first_line: dict[tuple[str, str], int] = {}
    names: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = _COMMENT.fullmatch(line)
            key = m.group(1).lower() if m else ""
            if m and key == "coordinatesystem":
                value = parse_coordinate_system(m.group(2), path, lineno)
                if system is not None and value != system:
                    raise DatasetError(
                        "two different coordinate systems declared.",
                        path=path,
                        line=lineno,
                        fix="keep one '# CoordinateSystem' line.",
                    )
                system = value
            elif m and key == "modality":
                modality = parse_modality(m.group(2), path, lineno)
            continue
        fields = [f.strip() for f in next(csv.reader([line]))]
        if columns is None:
            lowered = [f.lower() for f in fields]
            absent = [c for c in LANDMARK_CSV_COLUMNS if c not in lowered]
            if absent:
                raise DatasetError(
                    f"the first row must be the header {','.join(LANDMARK_CSV_COLUMNS)}; "
                    f"missing column(s): {', '.join(absent)}.",
                    path=path,
                    line=lineno,
                    fix="add the header row 'case,landmark,x,y,z' above the data.",
                )
            columns = {c: lowered.index(c) for c in LANDMARK_CSV_COLUMNS}
            continue
        if len(fields) <= max(columns.values()):
            raise DatasetError(
                f"row has {len(fields)} fields, expected {len(LANDMARK_CSV_COLUMNS)}.",
                path=path,
                line=lineno,
                fix="write case,landmark,x,y,z.",
            )
        cid, name = fields[columns["case"]], fields[columns["landmark"]]
        if not cid or not name:
            raise DatasetError(
                "empty case id or landmark name.", path=path, line=lineno, fix="fill in both."
            )
        if (cid, name) in first_line:
            raise DatasetError(
                f"landmark {name!r} of case {cid!r} is given twice (first on line {first_line[cid, name]}).",
                path=path,
                line=lineno,
                fix="keep one row per case and landmark.",
            )
        first_line[cid, name] = lineno
        xyz = [fields[columns[a]] for a in ("x", "y", "z")]
        if all(v == "" or v.lower() == "nan" for v in xyz):
            coords: list[float] | None = None
        else:
            try:
                coords = [float(v) for v in xyz]
            except ValueError:
                coords = None
            if coords is None or not np.all(np.isfinite(coords)):
                raise DatasetError(
                    f"coordinates {','.join(xyz)} are not three finite numbers.",
                    path=path,
                    line=lineno,
                    fix="give x,y,z in mm, or leave all three empty for a missing landmark.",
                )
        points.setdefault(cid, {})[name] = coords
        if name not in names:
            names.append(name)
    if columns is None or not names:
        raise DatasetError(
            "the landmark table has no landmarks.", path=path, fix="add rows case,landmark,x,y,z."
        )
    if system is None:
        raise DatasetError(
            "the landmark table does not say which coordinate system its x,y,z are in.",
            path=path,
            fix="add a line '# CoordinateSystem = LPS' (ITK/DICOM) or '# CoordinateSystem = RAS' "
            "(3D Slicer) at the top of the file.",
        )
    table: dict[str, LandmarkSet] = {}
    for cid, pts in points.items():
        ls = LandmarkSet.from_dict(
            pts, {n: "no coordinates in landmark.csv" for n, p in pts.items() if p is None}
        )
        table[cid] = ls.transformed(ras_to_lps) if system == "RAS" else ls
    return table, names, system, modality


def _read_fold_files(setup: Path, case_ids: Sequence[str]) -> list[list[str]]:
    found: dict[int, Path] = {}
    for f in sorted(setup.iterdir()) if setup.is_dir() else []:
        m = _FOLD_FILE.fullmatch(f.name)
        if m is None or not f.is_file():
            continue
        k = int(m.group(1))
        if k in found:
            raise DatasetError(
                f"fold {k} is given by two files ({found[k].name}, {f.name}).",
                path=setup,
                fix="keep one.",
            )
        found[k] = f
    if sorted(found) != list(range(len(found))):
        raise DatasetError(
            f"fold files must be numbered cv0, cv1, ... without gaps; found {', '.join(sorted(p.name for p in found.values()))}.",
            path=setup,
            fix="rename the fold files.",
        )
    known = set(case_ids)
    where: dict[str, tuple[int, Path, int]] = {}
    folds: list[list[str]] = []
    for k in range(len(found)):
        path = found[k]
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read the fold file: {e}", path=path) from None
        fold: list[str] = []
        for lineno, raw in enumerate(lines, 1):
            cid = raw.split("#", 1)[0].strip()
            if not cid:
                continue
            if cid not in known:
                raise DatasetError(
                    f"{cid!r} is not a case (no image or landmarks for it).{did_you_mean(cid, known)}",
                    path=path,
                    line=lineno,
                    fix="write case ids as the image file names without suffix.",
                )
            if cid in where:
                _, p0, l0 = where[cid]
                raise DatasetError(
                    f"case {cid!r} is already listed in {p0.name} line {l0}.",
                    path=path,
                    line=lineno,
                    fix="list every case in one fold only, once.",
                )
            where[cid] = (k, path, lineno)
            fold.append(cid)
        folds.append(fold)
    return folds


def load_original_layout(root: Path) -> Dataset:
    """Load the original layout rooted at ``root`` (DatasetError if malformed)."""
    root = root.absolute()
    images_dir, setup = root / "images", root / "setup"
    csv_path = root / LANDMARK_CSV
    for required in (images_dir, csv_path):
        if not required.exists():
            raise DatasetError(
                f"original layout: {required.relative_to(root).as_posix()} is missing.",
                path=root,
                fix="the layout is images/<case>.nii.gz, setup/landmark.csv, setup/cv0, setup/cv1, ... "
                "(docs/dataset_format.md); or write a dataset.json.",
            )
    table, names, system, modality = _read_landmark_csv(csv_path)
    images: dict[str, Path] = {}
    for f in sorted(images_dir.iterdir()):
        suffix = image_io.image_suffix(f.name)
        if f.name.startswith(".") or not f.is_file() or suffix is None:
            continue
        cid = f.name[: -len(suffix)]
        if cid in images:
            raise DatasetError(
                f"two images for case {cid!r}: {images[cid].name} and {f.name}.",
                path=images_dir,
                fix="keep one image per case.",
            )
        images[cid] = f
    ids = sorted(images, key=natural_key) + [c for c in table if c not in images]
    # A case annotated but without an image keeps the expected path: verify reports it missing.
    cases = [CaseSpec(c, images.get(c, images_dir / f"{c}.nii.gz"), None) for c in ids]
    return Dataset(
        name=root.name,
        root=root,
        landmark_names=names,
        modality=modality,
        cases=cases,
        folds=_read_fold_files(setup, ids),
        coordinate_system=system,
        landmark_table=table,
        landmark_table_path=csv_path,
        source=root,
    )
