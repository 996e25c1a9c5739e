"""Dataset verification: every problem in the data, each with what to do about it.

:func:`verify_dataset` never raises on bad data — unreadable images, NaN voxels, landmarks
outside the image, misspelt landmark names, fold mistakes all become :class:`Problem` entries
of a :class:`VerifyReport` (``error`` = the dataset cannot be used as is; ``warning`` = it can,
but look). It also summarises the data: per-case size, spacing and intensity range, and
per-landmark spread of the annotations. The checks are listed in ``docs/dataset_format.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from landmark3d.data.dataset import (
    CaseSpec,
    Dataset,
    did_you_mean,
    fold_issues,
    stated_coordinate_system,
)
from landmark3d.errors import DatasetError, ImageError, LandmarkFileError
from landmark3d.geometry.space import Geometry
from landmark3d.io import images as image_io
from landmark3d.io.landmark_set import LandmarkSet, lps_to_ras
from landmark3d.io.landmarks import LandmarkWarning

Severity = Literal["error", "warning"]
ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, case_id)``, called after each case."""


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`verify_dataset`.

    Attributes:
        severity: ``"error"`` (must be fixed before use) or ``"warning"``.
        case: the case concerned, or None for dataset-wide problems.
        path: the file concerned, if any.
        message: what is wrong.
        fix: what to do about it.
        code: a stable name for the kind of problem, where code acts on it (e.g.
            ``"landmarks_mirrored"``, see :data:`COORDINATE_MISTAKES`); "" otherwise.
    """

    severity: Severity
    case: str | None
    path: Path | None
    message: str
    fix: str
    code: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "case": self.case,
            "path": None if self.path is None else str(self.path),
            "message": self.message,
            "fix": self.fix,
            **({"code": self.code} if self.code else {}),
        }


def _vec(values: NDArray[np.float64] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


@dataclass
class CaseSummary:
    """What verification saw of one case (None where the image could not be read).

    Attributes:
        size: voxels along (i, j, k).
        spacing: voxel size in mm along (i, j, k).
        intensity: (min, max) of the finite voxel values.
        landmarks_present: number of the dataset's landmarks the case has coordinates for.
    """

    id: str
    size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    intensity: tuple[float, float] | None = None
    landmarks_present: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size": None if self.size is None else list(self.size),
            "spacing": None if self.spacing is None else list(self.spacing),
            "intensity": None if self.intensity is None else list(self.intensity),
            "landmarks_present": self.landmarks_present,
        }


@dataclass
class LandmarkSummary:
    """Spread of one landmark's annotations over the cases, world LPS mm.

    Attributes:
        count: cases with coordinates for it.
        mean_mm: mean position, shape (3,).
        sd_mm: sample standard deviation per axis (x, y, z), shape (3,); None if count < 2.
        spread_mm: RMS distance from the mean, ``sqrt(sum(sd_mm**2))``; None if count < 2.
    """

    name: str
    count: int
    mean_mm: NDArray[np.float64] | None = None
    sd_mm: NDArray[np.float64] | None = None
    spread_mm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "mean_mm": _vec(self.mean_mm),
            "sd_mm": _vec(self.sd_mm),
            "spread_mm": self.spread_mm,
        }


@dataclass
class DatasetSummary:
    """Aggregate table data: per-axis spacing min/median/max (mm), size min/max (voxels),
    overall intensity range, and per-landmark spread."""

    n_cases: int = 0
    n_annotated: int = 0
    n_folds: int = 0
    cases: list[CaseSummary] = field(default_factory=list)
    landmarks: list[LandmarkSummary] = field(default_factory=list)
    spacing_min: NDArray[np.float64] | None = None
    spacing_median: NDArray[np.float64] | None = None
    spacing_max: NDArray[np.float64] | None = None
    size_min: NDArray[np.int64] | None = None
    size_max: NDArray[np.int64] | None = None
    intensity_range: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_cases": self.n_cases,
            "n_annotated": self.n_annotated,
            "n_folds": self.n_folds,
            "spacing_min": _vec(self.spacing_min),
            "spacing_median": _vec(self.spacing_median),
            "spacing_max": _vec(self.spacing_max),
            "size_min": None if self.size_min is None else [int(v) for v in self.size_min],
            "size_max": None if self.size_max is None else [int(v) for v in self.size_max],
            "intensity_range": None if self.intensity_range is None else list(self.intensity_range),
            "landmarks": [s.to_dict() for s in self.landmarks],
            "cases": [c.to_dict() for c in self.cases],
        }


@dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`: the problems found and a summary of the data."""

    dataset: str
    source: Path | None
    problems: list[Problem]
    summary: DatasetSummary

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``json.dumps`` works on it)."""
        return {
            "dataset": self.dataset,
            "source": None if self.source is None else str(self.source),
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "summary": self.summary.to_dict(),
        }


# ---------------------------------------------------------------------------- checks
class _Collector:
    """Problems of one verification run, grouped so the report reads top to bottom."""

    def __init__(self) -> None:
        self.general: list[Problem] = []
        self.per_case: dict[str, list[Problem]] = {}
        self.folds: list[Problem] = []

    def case(
        self, severity: Severity, case: str, path: Path | None, msg: str, fix: str, code: str = ""
    ) -> None:
        self.per_case.setdefault(case, []).append(Problem(severity, case, path, msg, fix, code))

    def ordered(self, case_ids: list[str]) -> list[Problem]:
        out = list(self.general)
        for cid in case_ids:
            out.extend(self.per_case.get(cid, []))
        return out + self.folds


def _image_fix(message: str) -> str:
    text = message.lower()
    if "nan" in text or "inf" in text or "finite" in text:
        return "replace the non-finite voxels (e.g. by the minimum intensity) and save the image again."
    if "spacing" in text:
        return "correct the voxel spacing in the image header (it must be positive, in mm)."
    return "repair or re-export the image."


def _usable(geometry: Geometry) -> bool:
    """Whether the geometry can map world points to indices (positive spacing, invertible)."""
    return bool(np.all(geometry.spacing > 0)) and abs(np.linalg.det(geometry.direction)) > 1e-6


def _check_image(
    ds: Dataset, case: CaseSpec, check_images: bool, out: _Collector, summary: CaseSummary
) -> Geometry | None:
    """Image checks for one case; fills ``summary`` and returns the geometry if usable."""
    path = case.image
    if not path.exists():
        where = "images/ (as <case>.nii.gz)" if ds.layout == "original" else '"image" in the spec'
        others = [c.id for c in ds.cases if c.id != case.id and c.image.exists()]
        hint = did_you_mean(case.id, others)  # e.g. 'case03' in landmark.csv for 'case003'
        out.case(
            "error", case.id, path, f"image file not found.{hint}", f"check {where} for this case."
        )
        return None
    if path.is_file() and path.stat().st_size == 0:
        out.case(
            "error", case.id, path, "image file is empty (0 bytes).", "copy or export it again."
        )
        return None
    if not check_images:
        if not path.is_file():
            return None  # a DICOM directory: no cheap header read
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            msg = f"image header unreadable: {str(e).strip().splitlines()[-1]}"
            out.case("error", case.id, path, msg, "repair or re-export the image.")
            return None
        if reader.GetDimension() != 3:
            out.case(
                "error",
                case.id,
                path,
                f"image is {reader.GetDimension()}D, not 3D.",
                "use 3D volumes.",
            )
            return None
        geometry = Geometry(
            reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
        )
    else:
        try:
            image = image_io.read_image(path, allow_nonfinite=True)
        except ImageError as e:
            fix = e.fix or "re-export the image in a format SimpleITK reads (.nii.gz, .nrrd, .mha)."
            out.case("error", case.id, path, e.problem, fix)
            return None
        for msg in image_io.image_problems(image):
            out.case("error", case.id, path, msg, _image_fix(msg))
        geometry = Geometry.from_sitk(image)
        values = sitk.GetArrayViewFromImage(image)
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if finite.size:
            summary.intensity = (float(finite.min()), float(finite.max()))
    summary.size = geometry.size
    summary.spacing = (
        float(geometry.spacing[0]),
        float(geometry.spacing[1]),
        float(geometry.spacing[2]),
    )
    return geometry if _usable(geometry) else None


def _flip_fix(ds: Dataset, case: CaseSpec, source: Path | None) -> str:
    """The fix for landmarks that fit the image only with x and y negated."""
    if source is None:
        return "convert the landmarks between RAS and LPS (negate x and y)."
    stated = None if case.landmarks is None else stated_coordinate_system(source)
    assumed = stated or ds.coordinate_system
    name = source.name.lower()
    if assumed is None:  # the reader's defaults for files without a statement
        assumed = "RAS" if name.endswith(".fcsv") else "LPS" if name.endswith(".mrk.json") else None
    if assumed is None:
        return "state the landmark file's coordinate system (RAS or LPS) in it."
    probable = "RAS" if assumed == "LPS" else "LPS"
    if name.endswith(".mrk.json"):
        how = f'set "coordinateSystem": "{probable}"'
    elif name.endswith(".json"):
        how = f'set "coordinate_system": "{probable}"'
    else:
        how = f"set '# CoordinateSystem = {probable}'"
    return f"the landmark file's coordinate system is probably {probable}: {how} in {source.name}."


def _check_inside(
    ds: Dataset, case: CaseSpec, ls: LandmarkSet, geometry: Geometry, out: _Collector
) -> None:
    """Landmarks outside the image, with a RAS/LPS or voxel-index diagnosis."""
    mask = ls.present
    if not mask.any():
        return
    pts = ls.coords[mask]
    names = [n for n, m in zip(ls.names, mask, strict=True) if m]
    inside = geometry.contains_world(pts)
    if inside.all():
        return
    outside = [n for n, i in zip(names, inside, strict=True) if not i]
    source = ds.landmark_source(case)
    msg = f"{len(outside)} of {len(names)} landmarks lie outside the image: {', '.join(outside)}."
    if geometry.contains_world(lps_to_ras(pts)).all():
        msg += " With x and y negated (RAS <-> LPS) all of them would lie inside."
        fix, code = _flip_fix(ds, case, source), "landmarks_mirrored"
    elif geometry.contains_index(pts).all():
        msg += " As voxel indices they would all lie inside: they look like indices, not mm."
        fix = "convert the landmarks to world coordinates in mm (origin + direction @ (spacing * index))."
        code = "landmarks_as_indices"
    else:  # also a cropped scan's landmarks, which training treats as absent
        fix = "check that the landmark file belongs to this image and is in world mm."
        code = "landmarks_outside"
    out.case("error", case.id, source, msg, fix, code)


def _check_landmarks(
    ds: Dataset, case: CaseSpec, geometry: Geometry | None, out: _Collector
) -> LandmarkSet | None:
    """Landmark checks for one case; the case's landmarks (dataset order, LPS) if readable."""
    if not ds.has_landmarks(case):
        return None
    source = ds.landmark_source(case)
    if case.landmarks is not None:
        if not case.landmarks.exists():
            fix = 'check "landmarks" for this case in the spec (null = not annotated).'
            out.case("error", case.id, case.landmarks, "landmark file not found.", fix)
            return None
        if case.landmarks.is_file() and case.landmarks.stat().st_size == 0:
            out.case(
                "error", case.id, case.landmarks, "landmark file is empty.", "export it again."
            )
            return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LandmarkWarning)
        try:
            raw = ds.read_raw_landmarks(case)
        except (LandmarkFileError, DatasetError) as e:
            fix = e.fix or "repair the landmark file."
            at = f" (line {e.line})" if e.line is not None else ""
            msg = f"landmarks unreadable{at}: {e.problem}"
            out.case("error", case.id, e.path or source, msg, fix)
            return None
    for w in caught:
        if issubclass(w.category, LandmarkWarning):
            text = str(w.message).removeprefix(f"{source}: ")
            fix = "state the coordinate system in the file to silence this."
            out.case("warning", case.id, source, text, fix)
    for name in raw.names:
        if name not in ds.landmark_names:
            hint = did_you_mean(name, ds.landmark_names)
            msg = f"unknown landmark {name!r} (known: {', '.join(ds.landmark_names)}).{hint}"
            fix = "rename it in the landmark file, or add it to the dataset's landmarks."
            out.case("error", case.id, source, msg, fix)
    ls = raw.subset(ds.landmark_names)
    if geometry is not None:
        _check_inside(ds, case, ls, geometry, out)
    return ls


def _check_sets(ds: Dataset, sets: dict[str, LandmarkSet], out: _Collector) -> None:
    """Missing landmarks, and landmarks only a minority of the cases have."""
    n = len(sets)
    counts = {
        name: sum(1 for ls in sets.values() if not ls.is_missing(name))
        for name in ds.landmark_names
    }
    for cid, ls in sets.items():
        source = ds.landmark_source(cid)
        missing = [name for name in ls.names if ls.is_missing(name)]
        if missing:
            parts = [
                f"{name} ({ls.missing_reason.get(name, 'missing')}; annotated in {counts[name]} of {n - 1} other cases)"
                for name in missing
            ]
            msg = f"missing landmark(s): {', '.join(parts)}."
            fix = "annotate them if they are visible; otherwise nothing to do (missing landmarks are skipped)."
            out.case("warning", cid, source, msg, fix)
        rare = [
            name for name in ls.names if not ls.is_missing(name) and n >= 3 and 2 * counts[name] < n
        ]
        if rare:
            detail = ", ".join(f"{name} (only {counts[name]} of {n} cases)" for name in rare)
            msg = f"landmark set differs from the rest: has {detail}."
            fix = "check the name (a variant spelling of another landmark?) and whether the other cases lack it."
            out.case("warning", cid, source, msg, fix)


def _check_folds(ds: Dataset, out: _Collector) -> None:
    ids = ds.case_ids
    fix = "edit the folds so that every case id is listed once, in at most one fold."
    for issue in fold_issues(ds.folds, ids):
        out.folds.append(Problem("error", None, ds.source, issue, fix))
    if not ds.folds:
        fix = 'add "folds" to dataset.json (original layout: setup/cv0, setup/cv1, ...).'
        out.folds.append(Problem("warning", None, ds.source, "no cross-validation folds.", fix))
        return
    if len(ds.folds) == 1:
        msg = "only one fold: its training set (the other folds) is empty."
        out.folds.append(Problem("warning", None, ds.source, msg, "define at least two folds."))
    known = set(ids)
    in_folds = {cid for fold in ds.folds for cid in fold}
    for k, fold in enumerate(ds.folds):
        for cid in fold:
            if cid in known and not ds.has_landmarks(cid):
                msg = f"case is in fold {k} but has no landmarks: it can be neither trained nor evaluated."
                out.folds.append(
                    Problem("error", cid, ds.source, msg, "annotate it or remove it from the fold.")
                )
    loose = [cid for cid in ids if cid not in in_folds and ds.has_landmarks(cid)]
    if loose:
        shown = ", ".join(loose[:10]) + (" ..." if len(loose) > 10 else "")
        msg = (
            f"{len(loose)} annotated case(s) in no fold take no part in cross-validation: {shown}."
        )
        out.folds.append(
            Problem("warning", None, ds.source, msg, "add them to a fold if they should.")
        )


def _check_general(ds: Dataset, out: _Collector) -> None:
    def error(msg: str, fix: str) -> None:
        out.general.append(Problem("error", None, ds.source, msg, fix))

    if not ds.cases:
        error("the dataset has no cases.", "add cases to the spec (or images to images/).")
    if not ds.landmark_names:
        error("the dataset names no landmarks.", "list the landmark names in the spec.")
    for what, items in (("landmark name", ds.landmark_names), ("case id", ds.case_ids)):
        for dup in sorted({x for x in items if items.count(x) > 1}):
            error(f"{what} {dup!r} appears more than once.", f"make every {what} unique.")
    for g in ds.correlated_groups:
        for name in g.get("landmarks", []):
            if name not in ds.landmark_names:
                hint = did_you_mean(str(name), ds.landmark_names)
                error(
                    f"correlated group names unknown landmark {name!r}.{hint}",
                    "use the dataset's landmark names.",
                )


def _summarise(
    ds: Dataset, cases: list[CaseSummary], sets: dict[str, LandmarkSet]
) -> DatasetSummary:
    s = DatasetSummary(len(ds.cases), len(sets), len(ds.folds), cases)
    spacings = np.array([c.spacing for c in cases if c.spacing is not None], dtype=np.float64)
    if spacings.size:
        s.spacing_min, s.spacing_max = spacings.min(axis=0), spacings.max(axis=0)
        s.spacing_median = np.median(spacings, axis=0)
    sizes = np.array([c.size for c in cases if c.size is not None], dtype=np.int64)
    if sizes.size:
        s.size_min, s.size_max = sizes.min(axis=0), sizes.max(axis=0)
    ranges = [c.intensity for c in cases if c.intensity is not None]
    if ranges:
        s.intensity_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    for name in ds.landmark_names:
        pts = np.array([p for ls in sets.values() if (p := ls.get(name)) is not None]).reshape(
            -1, 3
        )
        lm = LandmarkSummary(name, int(pts.shape[0]))
        if lm.count:
            lm.mean_mm = pts.mean(axis=0)
        if lm.count >= 2:
            lm.sd_mm = pts.std(axis=0, ddof=1)
            lm.spread_mm = float(np.sqrt(np.sum(lm.sd_mm**2)))
        s.landmarks.append(lm)
    return s


#: Problems that are coordinate mistakes beyond reasonable doubt (every landmark outside the
#: image would lie inside in the other convention, or as voxel indices): training refuses them.
COORDINATE_MISTAKES = ("landmarks_mirrored", "landmarks_as_indices")


def coordinate_mistakes(ds: Dataset, case_ids: list[str]) -> list[Problem]:
    """The :data:`COORDINATE_MISTAKES` among ``case_ids`` (image headers and landmark files
    only: fast). Landmarks simply outside the image are not among them: a cropped scan's
    landmarks are trained as absent."""
    out = _Collector()
    for cid in case_ids:
        case = ds.case(cid)
        geometry = _check_image(ds, case, False, out, CaseSummary(case.id))
        if geometry is not None:
            _check_landmarks(ds, case, geometry, out)
    return [p for p in out.ordered(case_ids) if p.code in COORDINATE_MISTAKES]


def verify_dataset(
    ds: Dataset, check_images: bool = True, progress: ProgressFn | None = None
) -> VerifyReport:
    """Check every case of ``ds`` and the folds; never raises on bad data.

    Args:
        ds: the dataset (see :func:`landmark3d.data.dataset.load_dataset`).
        check_images: read every image fully (voxel checks, intensity range). If False, only
            image headers are read (geometry for the landmark-inside check), much faster.
        progress: called as ``progress(done, total, case_id)`` after each case.

    Returns:
        The report; ``report.ok`` is True when no error was found.
    """
    out = _Collector()
    _check_general(ds, out)
    summaries: list[CaseSummary] = []
    sets: dict[str, LandmarkSet] = {}
    for i, case in enumerate(ds.cases):
        summary = CaseSummary(case.id)
        geometry = _check_image(ds, case, check_images, out, summary)
        ls = _check_landmarks(ds, case, geometry, out)
        if ls is not None:
            sets[case.id] = ls
            summary.landmarks_present = int(ls.present.sum())
        summaries.append(summary)
        if progress is not None:
            progress(i + 1, len(ds.cases), case.id)
    _check_sets(ds, sets, out)
    _check_folds(ds, out)
    unannotated = [c.id for c in ds.cases if not ds.has_landmarks(c) and ds.fold_of(c) is None]
    if unannotated:
        shown = ", ".join(unannotated[:10]) + (" ..." if len(unannotated) > 10 else "")
        msg = f"{len(unannotated)} case(s) have no landmarks and are in no fold: {shown}."
        fix = "nothing to do if they are for prediction only; otherwise annotate them."
        out.folds.append(Problem("warning", None, ds.source, msg, fix))
    problems = out.ordered(ds.case_ids)
    return VerifyReport(ds.name, ds.source, problems, _summarise(ds, summaries, sets))
