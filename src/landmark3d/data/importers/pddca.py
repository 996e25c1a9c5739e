"""Import the PDDCA head-and-neck CT collection into a ``dataset.json`` spec.

PDDCA (MICCAI 2015 head-and-neck auto-segmentation challenge) comes as one folder per patient::

    <src>/0522c0001/img.nrrd                 the CT (NRRD: world LPS mm)
    <src>/0522c0001/Landmarks_0001.fcsv      3D Slicer fiducials of the bony landmarks
    <src>/0522c0001/structures/*.nrrd        organ masks (ignored)

Patient folders are found anywhere under ``src`` (the collection is shipped in parts). The
importer

* maps the fiducial labels to the paper's names :data:`PDDCA_LANDMARKS` (``chin``, ``mand_l``,
  ``mand_r``, ``odont_proc``, ``occ_bone``), accepting plausible variants (``Mand_L``,
  ``left condyle``, ``odontoid process``, ``occipital``, ...) and a user ``label_map``;
* checks the coordinate system each ``.fcsv`` states (``# CoordinateSystem = 0|1|RAS|LPS``; no
  line = RAS, as 3D Slicer assumes) against the image: the landmarks must fall inside the
  image's voxel extent in that system. If they only do when x and y are negated (RAS ↔ LPS) the
  file states the wrong system; the patient is skipped with a message naming the override
  (``fcsv_coords="auto"`` or the system), unless that override is given;
* keeps the patients that have all ``require``-d landmarks and reports every skipped patient
  with the reason (no ``.fcsv``, no or unreadable image, missing landmarks, landmarks outside
  the image, ...) and a fix;
* writes ``<out>/dataset.json``, one ``<out>/landmarks/<id>.fcsv`` per kept patient (paper's
  names, LPS, stated in the file), ``<out>/images/<id>.nrrd`` (a symlink to the original, or a
  copy), ``<out>/import_report.json``, a deterministic K-fold split (seeded permutation of the
  naturally sorted ids, dealt round-robin) and the correlated group chin + occ_bone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from landmark3d.data.dataset import (
    CaseSpec,
    Dataset,
    natural_key,
    stated_coordinate_system,
    write_dataset_spec,
)
from landmark3d.errors import DatasetError, ImageError, LandmarkFileError
from landmark3d.geometry.space import Geometry
from landmark3d.io.atomic import atomic_path, atomic_write_text, check_writable
from landmark3d.io.images import image_suffix, read_image, write_image
from landmark3d.io.landmark_set import LandmarkSet, lps_to_ras
from landmark3d.io.landmarks import read_landmarks, write_landmarks

PDDCA_LANDMARKS: tuple[str, ...] = ("chin", "mand_l", "mand_r", "odont_proc", "occ_bone")
"""The paper's names, in model output order (chin, condyloid processes, odontoid, occipital)."""

CORRELATED_GROUPS: list[dict[str, Any]] = [
    {
        "landmarks": ["chin", "occ_bone"],
        "note": "Pang et al. 2023: both lie on the mid-sagittal plane and annotators place "
        "occ_bone by reference to chin (one shared axis).",
    }
]
FCSV_MODES = ("stated", "auto", "RAS", "LPS")
IMAGE_NAME = "img.nrrd"
IGNORED_DIRS = ("structures",)
_DETACHED = (".nhdr", ".mhd")

# Aliases after lower-casing and dropping every non-alphanumeric character.
_ALIASES: dict[str, str] = {  # space-separated
    "chin": "chin chintip menton pogonion gnathion mentalprotuberance",
    "mand": "mand mandible mandibular mandcond mandcondyle mandiblecondyle mandibularcondyle "
    "condyle condylar condylarprocess condyloid condyloidprocess mandcondyloid",
    "odont_proc": "odontproc odont odontoid odontoidproc odontoidprocess dens densaxis c2dens",
    "occ_bone": "occbone occ occipital occipitalbone occiput occipitalprotuberance",
}
_SIDES = {"l": "l", "left": "l", "lt": "l", "r": "r", "right": "r", "rt": "r"}
_BASE = {alias: name for name, aliases in _ALIASES.items() for alias in aliases.split()}


# ----------------------------------------------------------------------------- names
def _compact(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _base_and_side(tokens: list[str]) -> tuple[str | None, str | None]:
    sides = {_SIDES[t] for t in tokens if t in _SIDES}
    rest = "".join(t for t in tokens if t not in _SIDES)
    side = sides.pop() if len(sides) == 1 else None
    if len(sides) > 0:  # both sides named: ambiguous
        return None, None
    return _BASE.get(rest), side


def normalise_landmark_name(label: str, label_map: Mapping[str, str] | None = None) -> str | None:
    """The paper's name for a PDDCA fiducial label, or None if it is not recognised.

    ``label_map`` (label -> paper name, compared case-insensitively) is tried first. Otherwise
    case, spaces, dashes and underscores are ignored and known variants are mapped: e.g.
    ``Chin`` / ``menton`` -> ``chin``; ``Mand_L``, ``mandL``, ``left condyle``,
    ``L_condyloid_process`` -> ``mand_l``; ``odontoid process``, ``dens`` -> ``odont_proc``;
    ``occipital``, ``Occ-Bone`` -> ``occ_bone``. A mandible label without a side is None.
    """
    for key, value in (label_map or {}).items():
        if key.strip().lower() == label.strip().lower():
            return value
    tokens = re.findall(r"[a-z]+|\d+", label.lower())
    compact = "".join(tokens)
    base: str | None
    side: str | None
    if compact in _BASE:
        base, side = _BASE[compact], None
    else:
        base, side = _base_and_side(tokens)
        if base is None:  # glued side letter: "mandl", "lmand", "condyleleft", ...
            for s, v in sorted(_SIDES.items(), key=lambda kv: -len(kv[0])):
                if compact.endswith(s) and _BASE.get(compact[: -len(s)]) == "mand":
                    base, side = "mand", v
                    break
                if compact.startswith(s) and _BASE.get(compact[len(s) :]) == "mand":
                    base, side = "mand", v
                    break
    if base == "mand":
        return None if side is None else f"mand_{side}"
    return base


# ----------------------------------------------------------------------------- report
@dataclass
class SkippedPatient:
    """A patient left out of the dataset: why, and what to do about it."""

    id: str
    folder: str
    reason: str
    fix: str


@dataclass
class ImportedPatient:
    """A patient in the dataset and how its landmarks were read."""

    id: str
    folder: str
    image: str
    fcsv: str
    coordinate_system: str  # system the fcsv numbers were read in
    system_source: str  # "stated", "slicer default", "auto-flipped", "forced"
    labels: dict[str, str]  # file label -> paper name
    notes: list[str] = field(default_factory=list)


@dataclass
class PddcaImport:
    """Result of :func:`import_pddca`."""

    spec_path: Path
    kept: list[ImportedPatient]
    skipped: list[SkippedPatient]
    folds: list[list[str]]
    landmark_names: list[str]
    required: list[str]

    @property
    def kept_ids(self) -> list[str]:
        return [p.id for p in self.kept]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": str(self.spec_path),
            "landmarks": self.landmark_names,
            "required": self.required,
            "n_kept": len(self.kept),
            "n_skipped": len(self.skipped),
            "kept": [asdict(p) for p in self.kept],
            "skipped": [asdict(s) for s in self.skipped],
            "folds": self.folds,
        }


# ----------------------------------------------------------------------------- folds
def make_folds(ids: Sequence[str], n_folds: int, seed: int = 0) -> list[list[str]]:
    """A deterministic split of ``ids`` into ``n_folds`` folds of (nearly) equal size.

    The ids are sorted naturally, permuted with ``np.random.default_rng(seed)`` and dealt
    round-robin; each fold is sorted. The result depends only on the set of ids and the seed.
    """
    if n_folds < 1 or n_folds > len(ids):
        raise DatasetError(
            f"cannot split {len(ids)} case(s) into {n_folds} fold(s).",
            fix="use between 1 and the number of kept cases (or 0 for no folds).",
        )
    order = sorted(ids, key=natural_key)
    perm = np.random.default_rng(seed).permutation(len(order))
    return [sorted((order[i] for i in perm[k::n_folds]), key=natural_key) for k in range(n_folds)]


# ----------------------------------------------------------------------------- discovery
def find_patient_folders(src: Path) -> list[Path]:
    """Folders under ``src`` holding ``img.nrrd``, a ``.fcsv`` or a ``structures/`` folder."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src):
        is_patient = any(
            f.lower() == IMAGE_NAME or f.lower().endswith(".fcsv") for f in filenames
        ) or any(d.lower() in IGNORED_DIRS for d in dirnames)
        dirnames[:] = sorted(
            d for d in dirnames if d.lower() not in IGNORED_DIRS and not d.startswith(".")
        )
        if is_patient:
            found.append(Path(dirpath))
    return sorted(found, key=lambda p: (natural_key(p.name), str(p)))


class _Skip(Exception):
    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def _find_image(folder: Path) -> Path:
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    named = [f for f in files if f.name.lower() == IMAGE_NAME]
    if named:
        return named[0]
    images = [f for f in files if image_suffix(f) is not None]
    if len(images) == 1:
        return images[0]
    if not images:
        raise _Skip("no image (img.nrrd) in the folder.", "put the patient's CT there as img.nrrd.")
    names = ", ".join(f.name for f in images)
    raise _Skip(f"several images and none named img.nrrd: {names}.", "rename the CT to img.nrrd.")


def _find_fcsv(folder: Path) -> Path:
    files = sorted(f for f in folder.glob("*") if f.is_file() and f.name.lower().endswith(".fcsv"))
    if len(files) > 1:
        files = [f for f in files if "landmark" in f.name.lower()] or files
    if not files:
        raise _Skip(
            "no landmark file (*.fcsv) in the folder.",
            "add the patient's Slicer fiducial file, or leave the patient out.",
        )
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise _Skip(f"several landmark files: {names}.", "keep one .fcsv per patient folder.")
    return files[0]


# ----------------------------------------------------------------------------- landmarks
def _map_labels(
    raw: LandmarkSet, label_map: Mapping[str, str] | None, required: Sequence[str]
) -> tuple[LandmarkSet, dict[str, str], list[str]]:
    """(landmarks under the paper's names, label -> name, notes); _Skip if unusable."""
    mapped: dict[str, str] = {}
    unknown: list[str] = []
    for label in raw.names:
        name = normalise_landmark_name(label, label_map)
        if name is None:
            unknown.append(label)
            continue
        clash = [lab for lab, n in mapped.items() if n == name]
        if clash:
            raise _Skip(
                f"labels {clash[0]!r} and {label!r} both mean {name}.",
                "remove or rename one of them in the .fcsv (or map them with --map).",
            )
        mapped[label] = name
    points = {mapped[lab]: raw.get(lab) for lab in raw.names if lab in mapped}
    missing = [n for n in required if points.get(n) is None]
    if missing:
        found = ", ".join(repr(n) for n in raw.names) or "none"
        hint = (
            f" Unrecognised label(s): {', '.join(map(repr, unknown))}; map them with --map LABEL=NAME."
            if unknown
            else ""
        )
        raise _Skip(
            f"missing landmark(s) {', '.join(missing)} (labels in the file: {found}).{hint}",
            "annotate the missing landmarks, or drop them from --require.",
        )
    notes = [f"ignored unrecognised label(s): {', '.join(map(repr, unknown))}."] if unknown else []
    names = [n for n in PDDCA_LANDMARKS if points.get(n) is not None]
    return LandmarkSet.from_dict({n: points[n] for n in names}), mapped, notes


def _inside(ls: LandmarkSet, geometry: Geometry) -> bool:
    pts = ls.coords[ls.present]
    return bool(pts.size and geometry.contains_world(pts).all())


def _choose_system(
    ls: LandmarkSet, stated: str | None, geometry: Geometry, mode: str
) -> tuple[LandmarkSet, str, str, list[str]]:
    """Landmarks (LPS) in the chosen reading of the fcsv numbers; _Skip if none fits the image.

    ``ls`` was read in the system the file ``stated`` (None: RAS, as 3D Slicer does).
    Returns (landmarks, system used, how it was decided, notes).
    """
    file_system = stated or "RAS"
    how = (
        f"the file states {file_system}"
        if stated
        else "the file has no '# CoordinateSystem' line, read as RAS like 3D Slicer does"
    )
    other = "LPS" if file_system == "RAS" else "RAS"
    flipped = ls.transformed(lps_to_ras)  # the same numbers read in the other system
    notes: list[str] = []
    if mode in ("RAS", "LPS"):
        chosen = ls if mode == file_system else flipped
        if mode != file_system:
            notes.append(f"{how}; read as {mode} (--fcsv-coords {mode}).")
        if not _inside(chosen, geometry):
            raise _Skip(
                f"landmarks fall outside the image when read as {mode} (--fcsv-coords {mode}).",
                "check that the .fcsv belongs to this image, or use --fcsv-coords auto.",
            )
        return chosen, mode, "forced", notes
    if _inside(ls, geometry):
        if _inside(flipped, geometry):
            notes.append(
                f"coordinate system not confirmed: the image contains the landmarks read as "
                f"RAS and as LPS; kept {file_system} ({how})."
            )
        return ls, file_system, "stated" if stated else "slicer default", notes
    if _inside(flipped, geometry):
        if mode == "auto":
            notes.append(
                f"{how}, but the landmarks only fall inside the image read as {other}; "
                f"read as {other} (--fcsv-coords auto)."
            )
            return flipped, other, "auto-flipped", notes
        raise _Skip(
            f"landmarks fall outside the image read as {file_system} ({how}) but inside read "
            f"as {other}: the file's coordinate system is probably wrong.",
            f"check one patient in 3D Slicer, then rerun with --fcsv-coords {other} "
            "(or --fcsv-coords auto to decide per patient).",
        )
    raise _Skip(
        "landmarks fall outside the image, read as RAS and as LPS.",
        "check that the .fcsv belongs to this image (world mm, not voxel indices).",
    )


# ----------------------------------------------------------------------------- images
def _place_image(src: Path, image: sitk.Image, dest_dir: Path, cid: str, copy: bool) -> Path:
    """Copy or symlink the image into ``dest_dir`` as ``<id><suffix>``; its path."""
    suffix = image_suffix(src) or ".nrrd"
    if suffix in _DETACHED:  # header + data file: write one self-contained file
        return write_image(image, dest_dir / f"{cid}.nrrd")
    dest = dest_dir / f"{cid}{suffix}"
    dest_dir.mkdir(parents=True, exist_ok=True)
    if copy:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return dest
    tmp = dest_dir / f".{cid}.link-tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(src.absolute(), tmp)
    except OSError:  # no symlinks on this file system: copy instead
        return _place_image(src, image, dest_dir, cid, copy=True)
    os.replace(tmp, dest)
    return dest


# ----------------------------------------------------------------------------- import
def _parse_required(require: Iterable[str], label_map: Mapping[str, str] | None) -> list[str]:
    out: list[str] = []
    for r in require:
        name = r.strip() if r.strip() in PDDCA_LANDMARKS else normalise_landmark_name(r, label_map)
        if name is None:
            raise DatasetError(
                f"--require names {r!r}, which is not a PDDCA landmark.",
                fix=f"use names from {', '.join(PDDCA_LANDMARKS)}.",
            )
        if name not in out:
            out.append(name)
    return out


def import_pddca(
    src: str | Path,
    out: str | Path,
    require: Iterable[str] = PDDCA_LANDMARKS,
    n_folds: int = 3,
    seed: int = 0,
    copy: bool = False,
    fcsv_coords: str = "stated",
    label_map: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> PddcaImport:
    """Build ``<out>/dataset.json`` from a PDDCA tree at ``src`` (see the module docstring).

    Args:
        src: the PDDCA folder (patient folders anywhere below it).
        out: dataset directory to write (``dataset.json``, ``images/``, ``landmarks/``,
            ``import_report.json``).
        require: landmarks a patient must have to be kept (paper's names or variants).
        n_folds: cross-validation folds (0 = none); ``seed`` makes the split.
        copy: copy the images instead of symlinking them.
        fcsv_coords: ``"stated"`` (trust the file; default), ``"auto"`` (per patient, the
            system that puts the landmarks inside the image), ``"RAS"`` or ``"LPS"`` (read
            every file in that system, whatever it states).
        label_map: extra fiducial label -> paper name mappings.
        overwrite: replace an existing ``dataset.json`` (and files written beside it).

    Raises:
        DatasetError: ``src`` missing, no patient kept, bad ``require``/``label_map``/folds.
        OutputExistsError: ``<out>/dataset.json`` exists and ``overwrite`` is False.
    """
    src_dir, out_dir = Path(src).absolute(), Path(out).absolute()
    mode = fcsv_coords.upper() if fcsv_coords.upper() in ("RAS", "LPS") else fcsv_coords.lower()
    if mode not in FCSV_MODES:
        raise DatasetError(
            f"unknown --fcsv-coords {fcsv_coords!r}.", fix=f"use one of {', '.join(FCSV_MODES)}."
        )
    bad_targets = sorted(v for v in (label_map or {}).values() if v not in PDDCA_LANDMARKS)
    if bad_targets:
        raise DatasetError(
            f"--map targets {', '.join(map(repr, bad_targets))} are not PDDCA landmarks.",
            fix=f"map labels to one of {', '.join(PDDCA_LANDMARKS)}.",
        )
    required = _parse_required(require, label_map)
    if not src_dir.is_dir():
        raise DatasetError(
            "PDDCA folder not found.", path=src_dir, fix="give the folder holding 0522c0001/, ..."
        )
    spec_path = out_dir / "dataset.json"
    check_writable(spec_path, overwrite)
    check_writable(out_dir / "import_report.json", overwrite)

    kept: list[ImportedPatient] = []
    skipped: list[SkippedPatient] = []
    prepared: list[tuple[ImportedPatient, Path, sitk.Image, LandmarkSet]] = []
    seen: dict[str, Path] = {}
    for folder in find_patient_folders(src_dir):
        cid, rel = folder.name, folder.relative_to(src_dir).as_posix() or "."
        try:
            if cid in seen:
                raise _Skip(
                    f"patient id {cid!r} was already taken from {seen[cid]}.",
                    "remove the duplicate patient folder.",
                )
            fcsv = _find_fcsv(folder)
            image_path = _find_image(folder)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the missing header is handled below
                    raw = read_landmarks(fcsv)
            except LandmarkFileError as e:
                raise _Skip(
                    f"unreadable landmark file {fcsv.name}: {e.problem}", e.fix or ""
                ) from e
            ls, labels, notes = _map_labels(raw, label_map, required)
            try:
                image = read_image(image_path)
            except ImageError as e:
                raise _Skip(f"unreadable image {image_path.name}: {e.problem}", e.fix or "") from e
            geometry = Geometry.from_sitk(image)
            stated = stated_coordinate_system(fcsv)
            ls, system, source, more = _choose_system(ls, stated, geometry, mode)
        except _Skip as s:
            skipped.append(SkippedPatient(cid, rel, s.reason, s.fix))
            continue
        seen[cid] = folder
        patient = ImportedPatient(
            cid, rel, str(image_path), str(fcsv), system, source, labels, notes + more
        )
        prepared.append((patient, image_path, image, ls))

    if not prepared:
        reasons = "; ".join(f"{s.id}: {s.reason}" for s in skipped[:5]) or "no patient folders"
        raise DatasetError(
            f"no patient could be imported ({reasons}).",
            path=src_dir,
            fix="check the folder layout (<patient>/img.nrrd + <patient>/*.fcsv) and --require.",
        )
    folds = make_folds([p.id for p, *_ in prepared], n_folds, seed) if n_folds else []
    for patient, image_path, _, _ in prepared:  # refuse before anything is written
        suffix = image_suffix(image_path) or ".nrrd"
        suffix = ".nrrd" if suffix in _DETACHED else suffix  # as _place_image names it
        check_writable(out_dir / "images" / f"{patient.id}{suffix}", overwrite)
        check_writable(out_dir / "landmarks" / f"{patient.id}.fcsv", overwrite)

    cases: list[CaseSpec] = []
    for patient, image_path, image, ls in prepared:
        img = _place_image(image_path, image, out_dir / "images", patient.id, copy)
        lm = write_landmarks(ls, out_dir / "landmarks" / f"{patient.id}.fcsv", coords="LPS")
        origin = {
            "image": patient.image,
            "landmarks": patient.fcsv,
            "coordinate_system": patient.coordinate_system,
            "labels": patient.labels,
        }
        cases.append(CaseSpec(patient.id, img, lm, {"source": origin}))
        kept.append(patient)
    ds = Dataset(
        name="pddca",
        root=out_dir,
        landmark_names=list(PDDCA_LANDMARKS),
        modality="CT",
        cases=cases,
        folds=folds,
        coordinate_system="LPS",
        correlated_groups=[dict(g) for g in CORRELATED_GROUPS],
        extra={
            "description": "PDDCA head-and-neck CT (MICCAI 2015), imported by landmark3d import "
            f"pddca from {src_dir}: {len(kept)} patients kept, {len(skipped)} skipped "
            "(see import_report.json).",
        },
    )
    write_dataset_spec(ds, spec_path, overwrite=overwrite)
    result = PddcaImport(spec_path, kept, skipped, folds, list(PDDCA_LANDMARKS), required)
    report = json.dumps(result.to_dict(), indent=2) + "\n"
    atomic_write_text(out_dir / "import_report.json", report, overwrite=overwrite)
    return result
