"""Dataset specs: which images, which landmarks, which cross-validation folds.

Two layouts are read (both described exactly in ``docs/dataset_format.md``):

* a ``dataset.json`` spec — one image file and (optionally) one landmark file per case, paths
  relative to the spec's directory;
* the **original method's layout** — ``images/<case>.nii.gz``, one long-form
  ``setup/landmark.csv`` (``case,landmark,x,y,z`` in world mm, with a
  ``# CoordinateSystem = LPS|RAS`` line) and fold files ``setup/cv0``, ``setup/cv1``, ...

Whatever the layout, landmarks come out of :meth:`Dataset.read_landmarks` as a
:class:`~landmark3d.io.landmark_set.LandmarkSet` in world **LPS** mm, ordered as
``Dataset.landmark_names``. Malformed specs raise :class:`~landmark3d.errors.DatasetError`
naming the file (and line, where there is one) and the fix; problems in the *data* (unreadable
images, landmarks outside the image, ...) are the job of :mod:`landmark3d.data.verify`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from landmark3d.errors import DatasetError
from landmark3d.io import images as image_io
from landmark3d.io import landmarks as landmark_io
from landmark3d.io.atomic import atomic_write_text, check_writable
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.naming import closest_match, one_edit_apart

SPEC_FILENAME = "dataset.json"
MODALITIES = ("CT", "MR")
COORDINATE_SYSTEMS = ("LPS", "RAS")
REQUIRED_KEYS = ("name", "modality", "landmarks", "cases")
OPTIONAL_KEYS = ("coordinate_system", "folds", "correlated_groups")
CASE_KEYS = ("id", "image", "landmarks")
_STATED_SYSTEM = re.compile(r"coordinate_?\s*system\"?\s*[=:]\s*\"?\s*(\w+)", re.IGNORECASE)


# ---------------------------------------------------------------------------- helpers
def misspelling_of(key: str, choices: Iterable[str], cutoff: float = 0.75) -> str | None:
    """The valid key that ``key`` looks like a misspelling of, or None.

    A key is a misspelling if difflib finds a match at ``cutoff`` or it is one edit (deletion,
    insertion, substitution, transposition; case-insensitive) from a valid key — the second rule
    catches typos in short keys such as ``"ix"`` for ``"id"``.
    """
    options = list(choices)
    match = closest_match(key, options, cutoff)
    if match is not None:
        return match
    near = [c for c in options if one_edit_apart(key.lower(), c.lower())]
    return near[0] if near else None


def json_key_line(text: str, key: str) -> int | None:
    """1-based line of the first ``"key":`` in JSON ``text``, or None (for error messages)."""
    for quoted in dict.fromkeys((json.dumps(key, ensure_ascii=False), json.dumps(key))):
        m = re.search(re.escape(quoted) + r"\s*:", text)
        if m is not None:
            return text.count("\n", 0, m.start()) + 1
    return None


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """``" Did you mean 'x'?"`` for the closest entry of ``choices``, or ``""``."""
    match = closest_match(name, choices, cutoff)
    return f" Did you mean {match!r}?" if match is not None else ""


def natural_key(text: str) -> list[int | str]:
    """Sort key putting ``case2`` before ``case10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def fold_issues(folds: Sequence[Sequence[str]], case_ids: Sequence[str]) -> list[str]:
    """Every structural problem of ``folds`` against ``case_ids``, as sentences (empty if fine).

    Checks: ids that are not cases (with a suggestion), an id listed twice in one fold, a case
    in two folds, an empty fold.
    """
    issues: list[str] = []
    known = set(case_ids)
    first_fold: dict[str, int] = {}
    for k, fold in enumerate(folds):
        if len(fold) == 0:
            issues.append(f"fold {k} is empty.")
        seen: set[str] = set()
        for cid in fold:
            if cid not in known:
                issues.append(
                    f"fold {k} lists {cid!r}, which is not a case.{did_you_mean(cid, known)}"
                )
            elif cid in seen:
                issues.append(f"fold {k} lists case {cid!r} twice.")
            elif cid in first_fold:
                issues.append(f"case {cid!r} is in fold {first_fold[cid]} and in fold {k}.")
            seen.add(cid)
            first_fold.setdefault(cid, k)
    return issues


def stated_coordinate_system(path: Path) -> str | None:
    """The coordinate system a landmark file states (``"LPS"``/``"RAS"``), or None.

    Looks for ``# CoordinateSystem = X`` (CSV, .fcsv; Slicer codes 0 = RAS, 1 = LPS),
    ``"coordinateSystem": "X"`` (.mrk.json) and ``"coordinate_system": "X"`` (.json).
    An unreadable file states nothing.
    """
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError:
        return None
    m = _STATED_SYSTEM.search(text)
    if m is None:
        return None
    value = {"0": "RAS", "1": "LPS"}.get(m.group(1), m.group(1).upper())
    return value if value in COORDINATE_SYSTEMS else None


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` with forward slashes (absolute if on another drive)."""
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:
        return path.as_posix()


# ---------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class CaseSpec:
    """One case of a dataset.

    Attributes:
        id: case identifier, unique in the dataset.
        image: absolute path of the image file (or DICOM directory).
        landmarks: absolute path of the landmark file, or None when the case has no file of its
            own (unannotated, or landmarks held in the dataset's table — original layout).
        extra: any other keys of the case's entry in ``dataset.json`` (kept, not interpreted).
    """

    id: str
    image: Path
    landmarks: Path | None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Dataset:
    """A set of cases with named landmarks and cross-validation folds.

    Attributes:
        name: dataset name.
        root: directory that relative paths were resolved against (the spec's directory, or
            the original layout's top directory).
        landmark_names: the landmarks of this dataset, in model output order.
        modality: ``"CT"`` or ``"MR"``.
        cases: the cases, in a fixed order.
        folds: ``folds[k]`` = ids of the cases held out (validation/test) in fold ``k``.
        coordinate_system: ``"LPS"``/``"RAS"`` for landmark CSV files that do not state one
            (for the original layout: what ``setup/landmark.csv`` declares), else None.
        correlated_groups: groups of correlated landmarks (dicts, e.g.
            ``{"landmarks": ["chin", "occ_bone"]}``).
        extra: other top-level keys of ``dataset.json``, kept as they are.
        landmark_table: case id -> landmarks (LPS mm) held in memory (original layout).
        landmark_table_path: the file ``landmark_table`` was read from.
        source: the ``dataset.json`` or layout directory this dataset was loaded from.
    """

    name: str
    root: Path
    landmark_names: list[str]
    modality: str
    cases: list[CaseSpec]
    folds: list[list[str]] = field(default_factory=list)
    coordinate_system: str | None = None
    correlated_groups: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    landmark_table: dict[str, LandmarkSet] = field(default_factory=dict, repr=False)
    landmark_table_path: Path | None = None
    source: Path | None = None

    # ------------------------------------------------------------------ cases
    @property
    def case_ids(self) -> list[str]:
        return [c.id for c in self.cases]

    @property
    def layout(self) -> str:
        """``"original"`` when landmarks come from ``setup/landmark.csv``, else ``"spec"``."""
        return "original" if self.landmark_table_path is not None else "spec"

    def case(self, case: str | CaseSpec) -> CaseSpec:
        """The case with id ``case``; DatasetError with a suggestion if there is none."""
        if isinstance(case, CaseSpec):
            return case
        for c in self.cases:
            if c.id == case:
                return c
        raise DatasetError(
            f"no case {case!r} in dataset {self.name!r}.{did_you_mean(case, self.case_ids)}",
            path=self.source,
            fix=f"use one of: {', '.join(self.case_ids[:20])}"
            + (" ..." if len(self.cases) > 20 else ""),
        )

    def has_landmarks(self, case: str | CaseSpec) -> bool:
        """Whether the case has annotations (a landmark file, or rows in the landmark table)."""
        c = self.case(case)
        return c.landmarks is not None or c.id in self.landmark_table

    def landmark_source(self, case: str | CaseSpec) -> Path | None:
        """The file the case's landmarks come from (its own file, or the shared table)."""
        c = self.case(case)
        if c.landmarks is not None:
            return c.landmarks
        return self.landmark_table_path if c.id in self.landmark_table else None

    def fold_of(self, case: str | CaseSpec) -> int | None:
        """Index of the fold holding the case out, or None if it is in no fold."""
        cid = self.case(case).id
        for k, fold in enumerate(self.folds):
            if cid in fold:
                return k
        return None

    # ------------------------------------------------------------------ reading
    def read_image(self, case: str | CaseSpec) -> sitk.Image:
        """The case's image (validated 3D scalar; ImageError if unreadable)."""
        return image_io.read_image(self.case(case).image)

    def read_raw_landmarks(self, case: str | CaseSpec) -> LandmarkSet:
        """The case's landmarks as annotated (the file's names and order), world LPS mm.

        Raises:
            DatasetError: the case has no landmarks.
            LandmarkFileError: the landmark file is unreadable or malformed.
        """
        c = self.case(case)
        if c.landmarks is not None:
            # The dataset's system is a default for files that do not state their own.
            stated = stated_coordinate_system(c.landmarks)
            coords = self.coordinate_system if stated is None else None
            return landmark_io.read_landmarks(c.landmarks, coords=coords)
        if c.id in self.landmark_table:
            ls = self.landmark_table[c.id]
            return ls.transformed(lambda p: p)  # a copy: callers may modify theirs
        raise DatasetError(
            f"case {c.id!r} has no landmarks.",
            path=self.source,
            fix="add a landmark file for it to the spec, or leave it out of the folds.",
        )

    def read_landmarks(self, case: str | CaseSpec) -> LandmarkSet:
        """The case's landmarks ordered as ``landmark_names``, world LPS mm.

        Landmarks the case lacks are NaN rows with a ``missing_reason``.

        Raises:
            DatasetError: no landmarks, or the file names a landmark the dataset does not know.
            LandmarkFileError: the landmark file is unreadable or malformed.
        """
        c = self.case(case)
        raw = self.read_raw_landmarks(c)
        unknown = [n for n in raw.names if n not in self.landmark_names]
        if unknown:
            hints = "".join(did_you_mean(n, self.landmark_names) for n in unknown)
            raise DatasetError(
                f"case {c.id!r}: unknown landmark(s) {', '.join(map(repr, unknown))}; the dataset's "
                f"landmarks are {', '.join(self.landmark_names)}.{hints}",
                path=self.landmark_source(c),
                fix='rename the landmark in the file, or add it to "landmarks" in dataset.json.',
            )
        return raw.subset(self.landmark_names)

    # ------------------------------------------------------------------ folds
    def split(self, fold: int) -> tuple[list[str], list[str]]:
        """``(train_ids, val_ids)`` of cross-validation fold ``fold``.

        ``val_ids`` are the cases of ``folds[fold]``; ``train_ids`` are the cases of all other
        folds. Cases in no fold take part in neither. Both lists follow the case order.
        """
        if not self.folds:
            raise DatasetError(
                f"dataset {self.name!r} defines no cross-validation folds.",
                path=self.source,
                fix='add "folds" to dataset.json (or setup/cv0, setup/cv1, ... in the original layout).',
            )
        if not 0 <= fold < len(self.folds):
            raise DatasetError(
                f"fold {fold} does not exist; dataset {self.name!r} has folds 0..{len(self.folds) - 1}.",
                path=self.source,
                fix=f"choose a fold between 0 and {len(self.folds) - 1}.",
            )
        val = set(self.folds[fold])
        train = {cid for k, f in enumerate(self.folds) if k != fold for cid in f}
        order = self.case_ids
        return [c for c in order if c in train], [c for c in order if c in val]

    # ------------------------------------------------------------------ writing
    def to_spec_dict(
        self, spec_dir: str | Path | None = None, landmark_paths: dict[str, Path] | None = None
    ) -> dict[str, Any]:
        """The ``dataset.json`` content, paths relative to ``spec_dir`` (default: ``root``).

        ``landmark_paths`` gives files for cases whose landmarks are held in memory (original
        layout); without one such a case cannot be written (DatasetError).
        """
        base = Path(spec_dir).absolute() if spec_dir is not None else self.root
        lm_paths = landmark_paths or {}
        cases: list[dict[str, Any]] = []
        for c in self.cases:
            lm = lm_paths.get(c.id, c.landmarks)
            if lm is None and c.id in self.landmark_table:
                raise DatasetError(
                    f"case {c.id!r}: its landmarks are held in memory (read from "
                    f"{self.landmark_table_path}); a spec can only refer to landmark files.",
                    path=self.landmark_table_path,
                    fix="use write_dataset_spec(), which writes one landmark file per case.",
                )
            entry: dict[str, Any] = {
                "id": c.id,
                "image": _relative(c.image, base),
                "landmarks": None if lm is None else _relative(Path(lm), base),
            }
            entry.update(c.extra)
            cases.append(entry)
        spec: dict[str, Any] = {
            "name": self.name,
            "modality": self.modality,
            "landmarks": list(self.landmark_names),
        }
        if self.coordinate_system is not None:
            spec["coordinate_system"] = self.coordinate_system
        spec["cases"] = cases
        spec["folds"] = [list(f) for f in self.folds]
        spec["correlated_groups"] = [dict(g) for g in self.correlated_groups]
        for key, value in self.extra.items():
            spec.setdefault(key, value)
        return spec


def write_dataset_spec(ds: Dataset, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``ds`` as a spec at ``path``: a ``.json`` file, or a directory to hold ``dataset.json``.

    Landmarks held in memory (original layout) are first written as
    ``<spec dir>/landmarks/<case>.mrk.json`` (LPS), and the spec refers to those files. All
    writes are atomic; existing files are refused (OutputExistsError) unless ``overwrite``.

    Returns:
        The path of the written spec.
    """
    dest = Path(path)
    if dest.is_dir() or dest.suffix.lower() != ".json":
        dest = dest / SPEC_FILENAME
    dest = dest.absolute()
    check_writable(dest, overwrite)
    table_cases = [c for c in ds.cases if c.landmarks is None and c.id in ds.landmark_table]
    lm_paths = {c.id: dest.parent / "landmarks" / f"{c.id}.mrk.json" for c in table_cases}
    for p in lm_paths.values():
        check_writable(p, overwrite)
    for cid, p in lm_paths.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        landmark_io.write_landmarks(ds.landmark_table[cid], p, coords="LPS")
    spec = ds.to_spec_dict(dest.parent, lm_paths)
    if lm_paths:
        spec["coordinate_system"] = "LPS"  # every file we wrote is LPS and says so
    atomic_write_text(dest, json.dumps(spec, indent=2) + "\n", overwrite=overwrite)
    return dest


# ---------------------------------------------------------------------------- loading
def load_dataset(path: str | Path) -> Dataset:
    """Load a dataset from a ``dataset.json``, a directory holding one, or the original layout.

    Raises:
        DatasetError: the path does not exist, holds neither layout, or the spec is malformed.
    """
    p = Path(path).expanduser()
    fix = "give a dataset.json, a directory containing one, or a directory with images/ and setup/."
    if not p.exists():
        raise DatasetError("dataset path does not exist.", path=p, fix=fix)
    if p.is_dir():
        if (p / SPEC_FILENAME).is_file():
            return _load_spec(p / SPEC_FILENAME)
        if (p / "images").is_dir() or (p / "setup").is_dir():
            from landmark3d.data.original_layout import load_original_layout

            return load_original_layout(p)
        raise DatasetError(
            "directory holds neither dataset.json nor the original layout (images/, setup/).",
            path=p,
            fix=fix,
        )
    return _load_spec(p)


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def parse_modality(value: object, path: Path, line: int | None = None) -> str:
    """``"CT"`` or ``"MR"`` (any case; ``MRI`` accepted); DatasetError otherwise."""
    text = str(value).strip().upper() if isinstance(value, str) else ""
    text = "MR" if text == "MRI" else text
    if text not in MODALITIES:
        raise DatasetError(
            f"modality {value!r} is not one of {', '.join(MODALITIES)}.",
            path=path,
            line=line,
            fix='set the modality to "CT" or "MR".',
        )
    return text


def parse_coordinate_system(value: object, path: Path, line: int | None = None) -> str:
    """``"LPS"`` or ``"RAS"`` (any case); DatasetError otherwise."""
    text = value.strip().upper() if isinstance(value, str) else ""
    if text not in COORDINATE_SYSTEMS:
        raise DatasetError(
            f"coordinate system {value!r} is not LPS or RAS.",
            path=path,
            line=line,
            fix="use LPS (ITK/DICOM) or RAS (3D Slicer, NIfTI tools).",
        )
    return text


def _load_spec(spec_path: Path) -> Dataset:
    spec_path = spec_path.absolute()
    try:
        text = spec_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the dataset spec: {e}", path=spec_path) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise DatasetError(
            "JSON is nested too deeply to be a dataset spec.",
            path=spec_path,
            fix="check the file is a dataset.json (see docs/dataset_format.md).",
        ) from None
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"not valid JSON: {e.msg} (column {e.colno}).",
            path=spec_path,
            line=e.lineno,
            fix="correct the JSON syntax (a JSON linter shows the exact spot).",
        ) from None
    except _DuplicateKeyError as e:
        raise DatasetError(
            f"key {e.args[0]!r} appears twice in one object.",
            path=spec_path,
            line=json_key_line(text, e.args[0]),
            fix="keep one of them.",
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(
            "the spec must be a JSON object.",
            path=spec_path,
            fix='start from {"name": ..., "modality": ..., "landmarks": [...], "cases": [...]}.',
        )

    def bad(problem: str, fix: str, key: str | None = None) -> DatasetError:
        line = None if key is None else json_key_line(text, key)
        return DatasetError(problem, path=spec_path, line=line, fix=fix)

    known = REQUIRED_KEYS + OPTIONAL_KEYS
    extra: dict[str, Any] = {}
    for key in data:
        if key in known:
            continue
        match = misspelling_of(key, known)
        if match is not None:
            raise bad(
                f"unknown key {key!r}. Did you mean {match!r}?",
                f"rename {key!r} to {match!r}.",
                key,
            )
        extra[key] = data[key]
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise bad(
            f"missing required key(s): {', '.join(missing)}.",
            f"add {', '.join(repr(k) for k in missing)} (see docs/dataset_format.md).",
        )
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise bad('"name" must be a non-empty string.', 'set "name", e.g. "pddca".', "name")
    modality = parse_modality(data["modality"], spec_path, json_key_line(text, "modality"))
    names = data["landmarks"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise bad(
            '"landmarks" must be a non-empty list of names.',
            'e.g. "landmarks": ["chin", "occ_bone"].',
            "landmarks",
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise bad(
            f"landmark name(s) listed twice: {', '.join(dup)}.",
            "list every landmark once.",
            "landmarks",
        )
    system = data.get("coordinate_system")
    if system is not None:
        system = parse_coordinate_system(
            system, spec_path, json_key_line(text, "coordinate_system")
        )
    root = spec_path.parent

    raw_cases = data["cases"]
    if not isinstance(raw_cases, list):
        raise bad(
            '"cases" must be a list.',
            'e.g. "cases": [{"id": "c1", "image": "images/c1.nii.gz", "landmarks": "landmarks/c1.fcsv"}].',
            "cases",
        )
    if not raw_cases:
        raise bad('"cases" is empty.', "list at least one case.", "cases")
    cases: list[CaseSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw_cases):
        where = f"cases[{i}]"
        if not isinstance(entry, dict):
            raise bad(
                f'{where} must be an object with "id", "image", "landmarks".', "fix that entry."
            )
        case_extra: dict[str, Any] = {}
        for key in entry:
            if key in CASE_KEYS:
                continue
            match = misspelling_of(key, CASE_KEYS)
            if match is not None:
                raise bad(
                    f"{where}: unknown key {key!r}. Did you mean {match!r}?",
                    f"rename it to {match!r}.",
                    key,
                )
            case_extra[key] = entry[key]
        cid, image, lm = entry.get("id"), entry.get("image"), entry.get("landmarks")
        if not isinstance(cid, str) or not cid:
            raise bad(f'{where}: "id" must be a non-empty string.', "give every case a unique id.")
        where = f"{where} ({cid!r})"
        if cid in seen:
            raise bad(f"case id {cid!r} appears twice.", "give every case a unique id.")
        seen.add(cid)
        if not isinstance(image, str) or not image:
            raise bad(
                f'{where}: "image" must be a path.', "give the image path relative to the spec."
            )
        if lm is not None and (not isinstance(lm, str) or not lm):
            raise bad(
                f'{where}: "landmarks" must be a path or null.',
                "give the landmark file path or null.",
            )
        lm_path = None if lm is None else Path(os.path.normpath(root / lm))
        cases.append(CaseSpec(cid, Path(os.path.normpath(root / image)), lm_path, case_extra))

    raw_folds = data.get("folds", [])
    if not (isinstance(raw_folds, list) and all(isinstance(f, list) for f in raw_folds)):
        raise bad(
            '"folds" must be a list of lists of case ids.',
            'e.g. "folds": [["c1", "c2"], ["c3", "c4"]].',
            "folds",
        )
    folds = [[str(c) for c in f] for f in raw_folds]
    issues = fold_issues(folds, [c.id for c in cases])
    if issues:
        raise bad(
            " ".join(issues), 'correct "folds": each case id once, in at most one fold.', "folds"
        )

    groups = data.get("correlated_groups", [])
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        raise bad(
            '"correlated_groups" must be a list of objects.',
            'e.g. [{"landmarks": ["chin", "occ_bone"]}].',
            "correlated_groups",
        )
    for g in groups:
        members = g.get("landmarks", [])
        if not (isinstance(members, list) and all(isinstance(n, str) for n in members)):
            raise bad(
                'every "correlated_groups" entry needs "landmarks": a list of landmark names.',
                'e.g. [{"landmarks": ["chin", "occ_bone"]}].',
                "correlated_groups",
            )
        for n in members:
            if n not in names:
                raise bad(
                    f'correlated group names {n!r}, which is not in "landmarks".{did_you_mean(n, names)}',
                    "use the dataset's landmark names.",
                    "correlated_groups",
                )
    return Dataset(
        name=name,
        root=root,
        landmark_names=list(names),
        modality=modality,
        cases=cases,
        folds=folds,
        coordinate_system=system,
        correlated_groups=groups,
        extra=extra,
        source=spec_path,
    )
