"""Landmark files: 3D Slicer ``.fcsv`` and ``.mrk.json``, plain ``.csv`` and our ``.json``.

Every reader returns a :class:`LandmarkSet` in world **LPS millimetres**, converting from the
coordinate system the file states (RAS files have x and y negated). Every writer states the
coordinate system it wrote. Malformed input raises :class:`LandmarkFileError` naming the file
and, where it applies, the line — never another exception type and never a silently wrong
coordinate.

Per-landmark extras (``LandmarkSet.extras``) are kept: as columns in CSV, as an ``extras``
object in JSON, and as ``key=value;key=value`` in the Slicer description field (``%``, ``;``,
``=`` and line breaks percent-escaped). Values that parse as numbers are read back as floats.

Landmark names must be non-empty single lines without leading/trailing whitespace; readers
strip surrounding whitespace, writers refuse names that would not survive that.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from numpy.typing import NDArray

from landmark3d.errors import LandmarkFileError
from landmark3d.io.atomic import atomic_write_text
from landmark3d.io.landmark_set import LandmarkSet, lps_to_ras, ras_to_lps

LANDMARK_FORMATS = ("fcsv", "mrk.json", "csv", "json")
COORDINATE_SYSTEMS = ("LPS", "RAS")
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
_FCSV_HEADER = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
FCSV_COLUMNS = tuple(_FCSV_HEADER.split(","))
MISSING_IN_FILE = "missing in file"
_NAME_COLUMNS = ("name", "label", "landmark")
_FORMATS_FIX = "use one of the suffixes " + ", ".join(f".{f}" for f in LANDMARK_FORMATS) + "."
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NONFINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)
_MARKUPS_STATUS = ("defined", "preview", "undefined", "missing")
# Slicer >= 5 appends an unlabelled position-status column to .fcsv rows (0 undefined,
# 1 preview, 2 defined, 3 missing) and one more unlabelled field.
_FCSV_MISSING_STATUS = ("0", "3")


class LandmarkWarning(UserWarning):
    """A landmark file was read or written with an assumption the user should know about."""


# ---------------------------------------------------------------------------------- helpers
_FIX_COORDS = (
    "drop --in-coords (Python: the coords= argument), or correct the coordinate system "
    "stated in the file."
)
_FIX_NUMBER = "write finite coordinates in mm as plain decimals; leave a missing landmark empty."
_FIX_NUMBER_FCSV = (
    "write finite coordinates in mm as plain decimals; mark a missing landmark as 3D Slicer "
    "does, with a position status column after the last one ('3' = missing, '0' = undefined) "
    "and any numbers in x, y, z."
)
_FIX_NAMES = "give every landmark a non-empty name, unique within the file."


def _bad(path: Path, problem: str, fix: str | None = None, line: int | None = None) -> Exception:
    return LandmarkFileError(problem, path=path, line=line, fix=fix)


def landmark_format(path: str | Path) -> str:
    """The format of ``path`` from its suffix: one of :data:`LANDMARK_FORMATS`."""
    name = Path(path).name.lower()
    for fmt in LANDMARK_FORMATS:  # "mrk.json" is tested before "json"
        if name.endswith("." + fmt):
            return fmt
    raise _bad(Path(path), "unknown landmark file format.", _FORMATS_FIX)


def _coords_arg(coords: str | None, path: Path) -> str | None:
    value = None if coords is None else str(coords).strip().upper()
    if value is not None and value not in COORDINATE_SYSTEMS:
        raise _bad(path, f"unknown coordinate system {coords!r}.", "use LPS or RAS.")
    return value


def _parse_system(value: Any, path: Path, line: int | None, slicer_codes: bool) -> str:
    """'LPS'/'RAS' (any case); with ``slicer_codes`` also '0' (RAS) and '1' (LPS)."""
    codes = {"LPS": "LPS", "RAS": "RAS"} | ({"0": "RAS", "1": "LPS"} if slicer_codes else {})
    text = str(value).strip().upper()
    if not isinstance(value, str) or text not in codes:
        fix = f"use {', '.join(codes)}."
        raise _bad(path, f"unknown coordinate system {value!r}.", fix, line)
    return codes[text]


def _comment(line: str, path: Path, lineno: int, stated: str | None, codes: bool) -> str | None:
    """Update ``stated`` from a ``# CoordinateSystem = X`` comment line (others are ignored)."""
    key, sep, value = line.lstrip()[1:].partition("=")
    if not sep or key.strip().lower().replace(" ", "") != "coordinatesystem":
        return stated
    system = _parse_system(value, path, lineno, codes)
    if stated is not None and system != stated:
        raise _bad(path, "conflicting CoordinateSystem lines.", None, lineno)
    return system


def _resolve_system(
    stated: str | None, declared: str | None, path: Path, default: str | None, note: str
) -> str:
    """Coordinate system to use from what the file states and what the caller declared."""
    if stated is not None and declared is not None and stated != declared:
        problem = f"the file states {stated} coordinates but {declared} was requested."
        raise _bad(path, problem, _FIX_COORDS)
    if stated is not None or declared is not None:
        return str(stated or declared)
    if default is None:
        fix = (
            f'add {note}; or declare it where the file is read: "coordinate_system": "LPS" '
            "(or RAS) in the dataset's dataset.json, `landmark3d convert --in-coords LPS|RAS`, "
            "or read_landmarks(..., coords=) in Python."
        )
        raise _bad(path, "the file does not state its coordinate system.", fix)
    warnings.warn(f"{path}: {note}", LandmarkWarning, stacklevel=4)
    return default


def _float(cell: str, what: str, path: Path, line: int | None, fix: str = _FIX_NUMBER) -> float:
    """A finite float from a text cell; LandmarkFileError (with ``fix``) otherwise."""
    text = cell.strip()
    if _NONFINITE.fullmatch(text):
        raise _bad(path, f"{what} is {text!r}, not a finite number.", fix, line)
    if not _NUMBER.fullmatch(text) or not np.isfinite(float(text)):  # e.g. 'x', '1e999'
        raise _bad(path, f"{what} {text!r} is not a number.", fix, line)
    return float(text)


def _scalar(text: str) -> float | str:
    """A float if ``text`` is a number (incl. nan/inf), else the text itself."""
    t = text.strip()
    return float(t) if _NUMBER.fullmatch(t) or _NONFINITE.fullmatch(t) else t


def _fmt_scalar(value: float | str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return str(value)
    return repr(float(value))


def _escape(text: str) -> str:
    for ch in "%;=\r\n":
        text = text.replace(ch, f"%{ord(ch):02X}")
    return text


def _encode_extras(extras: Mapping[str, float | str]) -> str:
    """``{'confidence': 0.9}`` -> ``'confidence=0.9'`` for a Slicer description field."""
    return ";".join(f"{_escape(str(k))}={_escape(_fmt_scalar(v))}" for k, v in extras.items())


def _decode_extras(desc: str) -> dict[str, float | str]:
    """Inverse of :func:`_encode_extras`; free text becomes ``{'description': text}``."""
    desc = desc.strip()
    if not desc:
        return {}
    pairs = [part.partition("=") for part in desc.split(";")]
    if not all(sep and key.strip() for key, sep, _ in pairs):
        return {"description": desc}
    return {unquote(k.strip()): _scalar(unquote(v)) for k, _, v in pairs}


def _csv_row(line: str, path: Path, lineno: int) -> list[str]:
    try:
        return next(csv.reader([line], strict=True))
    except (csv.Error, StopIteration) as exc:
        fix = "close every quoted field on the line where it starts."
        raise _bad(path, f"malformed CSV line ({exc}).", fix, lineno) from None


class _Points:
    """Accumulates landmarks in the file's coordinate system, checking names."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.names: list[str] = []
        self.rows: list[tuple[float, float, float]] = []
        self.reasons: dict[str, str] = {}
        self.extras: dict[str, dict[str, float | str]] = {}
        self.where: dict[str, str] = {}

    def add(
        self,
        name: str,
        xyz: tuple[float, float, float] | None,
        line: int | None,
        extras: dict[str, float | str],
        where: str = "",
        reason: str = MISSING_IN_FILE,
    ) -> None:
        """Add ``name`` at ``xyz`` (None = missing); ``where`` names the place if no line."""
        name, where = name.strip(), where or (f"line {line}" if line else "")
        if not name:
            raise _bad(self.path, f"empty landmark name ({where}).", _FIX_NAMES, line)
        if name in self.where:
            first = f" (first at {self.where[name]})" if self.where[name] else ""
            raise _bad(self.path, f"duplicate landmark name {name!r}{first}.", _FIX_NAMES, line)
        self.where[name] = where
        self.names.append(name)
        self.rows.append(xyz if xyz is not None else (np.nan, np.nan, np.nan))
        if xyz is None:
            self.reasons[name] = reason
        if extras:
            self.extras[name] = extras

    def build(self, system: str, scale: float = 1.0) -> LandmarkSet:
        coords = np.array(self.rows, dtype=np.float64).reshape(-1, 3) * scale
        coords = ras_to_lps(coords) if system == "RAS" else coords
        return LandmarkSet(self.names, coords, self.reasons, self.extras)


# ---------------------------------------------------------------------------------- readers
def _read_fcsv(text: str, path: Path, declared: str | None) -> LandmarkSet:
    points = _Points(path)
    columns = list(FCSV_COLUMNS)
    stated: str | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            stated = _comment(line, path, lineno, stated, codes=True)
            key, sep, value = line.lstrip()[1:].partition("=")
            if sep and key.strip().lower() == "columns":
                columns = [c.strip() for c in value.split(",")]
                if not {"x", "y", "z", "label"} <= set(columns) or len(set(columns)) < len(columns):
                    fix = "columns must be unique and include x, y, z and label."
                    raise _bad(path, f"bad columns header {value.strip()!r}.", fix, lineno)
            continue
        if not line.strip():
            continue
        row = _csv_row(line, path, lineno)
        if not len(columns) <= len(row) <= len(columns) + 2:
            problem = f"row has {len(row)} columns; expected {len(columns)}."
            raise _bad(path, problem, "match the '# columns =' header.", lineno)
        cell = dict(zip(columns, row, strict=False))
        extras = _decode_extras(cell.get("desc", ""))
        if len(row) > len(columns) and row[len(columns)].strip() in _FCSV_MISSING_STATUS:
            points.add(cell["label"], None, lineno, extras)
        else:
            xyz = tuple(
                _float(cell[a], f"coordinate {a}", path, lineno, _FIX_NUMBER_FCSV) for a in "xyz"
            )
            points.add(cell["label"], (xyz[0], xyz[1], xyz[2]), lineno, extras)
    note = "no '# CoordinateSystem' header; assuming RAS as 3D Slicer does."
    return points.build(_resolve_system(stated, declared, path, "RAS", note))


def _read_csv(text: str, path: Path, declared: str | None) -> LandmarkSet:
    points = _Points(path)
    stated: str | None = None
    header: list[str] = []
    cols: dict[str, int] = {}  # 'name', 'x', 'y', 'z' -> column index
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not header and line.lstrip().startswith("#"):
            stated = _comment(line, path, lineno, stated, codes=False)
            continue
        row = [c.strip() for c in _csv_row(line, path, lineno)]
        if not header:
            header, lower = row, [c.lower() for c in row]
            name_col = next((c for c in _NAME_COLUMNS if c in lower), None)
            if name_col is None or not {"x", "y", "z"} <= set(lower) or "" in lower:
                fix = "start with a header 'name,x,y,z' (unique, non-empty column names)."
                raise _bad(path, f"bad header row {line.strip()!r}.", fix, lineno)
            if len(set(lower)) < len(lower):
                raise _bad(path, "repeated column names in the header.", None, lineno)
            cols = {c: lower.index(c) for c in ("x", "y", "z")} | {"name": lower.index(name_col)}
            continue
        if len(row) != len(header):
            problem = f"row has {len(row)} columns; the header has {len(header)}."
            raise _bad(path, problem, "give every row all columns (empty x,y,z = missing).", lineno)
        keep = [i for i, c in enumerate(row) if c and i not in cols.values()]
        extras = {header[i]: _scalar(row[i]) for i in keep}
        cells = [row[cols[a]] for a in "xyz"]
        if not any(cells):
            points.add(row[cols["name"]], None, lineno, extras)
            continue
        if not all(cells):
            fix = "leave all three empty for a missing landmark, or fill all three."
            raise _bad(path, "some but not all of x, y, z are empty.", fix, lineno)
        xyz = tuple(
            _float(c, f"coordinate {a}", path, lineno) for a, c in zip("xyz", cells, strict=True)
        )
        points.add(row[cols["name"]], (xyz[0], xyz[1], xyz[2]), lineno, extras)
    if not header:
        raise _bad(path, "no header row.", "start the table with a header 'name,x,y,z'.")
    note = "a first line '# CoordinateSystem = LPS' (or RAS)"
    return points.build(_resolve_system(stated, declared, path, None, note))


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _load_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as exc:
        raise _bad(
            path,
            f"invalid JSON: {exc.msg} (column {exc.colno}).",
            "repair the JSON syntax.",
            exc.lineno,
        ) from None
    except _DuplicateKey as exc:
        token = json.dumps(exc.key)
        hits = [i for i, ln in enumerate(text.splitlines(), start=1) if token in ln]
        raise _bad(
            path,
            f"duplicate key {exc.key!r} (duplicate landmark names are not allowed).",
            "make keys unique.",
            hits[1] if len(hits) > 1 else None,
        ) from None
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"unreadable JSON: {exc}.") from None


def _json_xyz(value: Any, what: str, path: Path) -> tuple[float, float, float]:
    ok = isinstance(value, list) and len(value) == 3
    if not ok or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise _bad(path, f"{what} must be a list of 3 numbers, got {value!r:.80}.")
    try:
        x, y, z = (float(v) for v in value)
    except OverflowError:
        raise _bad(path, f"{what} has a number too large for a coordinate.") from None
    if not np.isfinite([x, y, z]).all():
        raise _bad(path, f"{what} is not finite: {value!r}.", "give finite coordinates in mm.")
    return x, y, z


def _json_extras(value: Any, what: str, path: Path) -> dict[str, float | str]:
    if not isinstance(value, dict):
        raise _bad(path, f"{what} must be an object of numbers/strings.")
    out: dict[str, float | str] = {}
    for key, v in value.items():
        if isinstance(v, str):
            out[key] = _scalar(v)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            try:
                out[key] = float(v)
            except OverflowError:
                raise _bad(path, f"{what}[{key!r}] is too large.") from None
        else:
            raise _bad(path, f"{what}[{key!r}] must be a number or a string, got {v!r:.60}.")
    return out


def _read_json(text: str, path: Path, declared: str | None) -> LandmarkSet:
    data = _load_json(text, path)
    if not isinstance(data, dict) or not isinstance(data.get("landmarks"), dict):
        raise _bad(path, "no 'landmarks' object.", 'write {"landmarks": {"name": [x, y, z]}}.')
    if data.get("units", "mm") != "mm":
        raise _bad(path, f"units {data.get('units')!r} are not supported.", "use mm.")
    stated = data.get("coordinate_system")
    if stated is not None:
        stated = _parse_system(stated, path, None, slicer_codes=False)
    extras, reasons = data.get("extras", {}), data.get("missing_reason", {})
    if not isinstance(extras, dict) or not isinstance(reasons, dict):
        raise _bad(path, "'extras' and 'missing_reason' must be objects keyed by name.")
    unknown = sorted(set(extras) - set(data["landmarks"]))
    if unknown:
        raise _bad(path, f"extras for unknown landmarks: {', '.join(map(repr, unknown))}.")
    points = _Points(path)
    for i, (name, value) in enumerate(data["landmarks"].items()):
        where = f"landmark #{i + 1}"
        ex = _json_extras(extras.get(name, {}), f"extras[{name!r}]", path)
        reason = reasons.get(name, MISSING_IN_FILE)
        if value is None:
            points.add(name, None, None, ex, where, str(reason))
        else:
            points.add(name, _json_xyz(value, f"landmark {name!r}", path), None, ex, where)
    note = 'a top-level "coordinate_system": "LPS" (or "RAS")'
    return points.build(_resolve_system(stated, declared, path, None, note))


def _read_mrk_json(text: str, path: Path, declared: str | None) -> LandmarkSet:
    data = _load_json(text, path)
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list):
        raise _bad(path, "not a Slicer markups file (no 'markups' list).")
    fiducials = [m for m in markups if isinstance(m, dict) and m.get("type") == "Fiducial"]
    if not fiducials:
        types = sorted({str(m.get("type")) for m in markups if isinstance(m, dict)})
        fix = "export the landmarks as a point list (Fiducial markup)."
        raise _bad(path, f"no point list (type 'Fiducial') among markups {types}.", fix)
    if len(markups) > 1:
        warnings.warn(
            f"{path}: {len(markups)} markups in the file; reading the first point list only.",
            LandmarkWarning,
            stacklevel=3,
        )
    node = fiducials[0]
    stated = node.get("coordinateSystem")
    if stated is not None:
        stated = _parse_system(stated, path, None, slicer_codes=False)
    units = node.get("coordinateUnits", "mm")
    if isinstance(units, list) and units:
        units = units[0]
    scale = {"mm": 1.0, "um": 1e-3}.get(units) if isinstance(units, str) else None
    if scale is None:
        raise _bad(path, f"coordinateUnits {units!r} not supported.", "use mm or um.")
    cps = node.get("controlPoints", [])
    if not isinstance(cps, list):
        raise _bad(path, "'controlPoints' must be a list.")
    points = _Points(path)
    for i, cp in enumerate(cps):
        where = f"control point #{i + 1}"
        if not isinstance(cp, dict):
            raise _bad(path, f"{where} is not an object.")
        label, desc = cp.get("label", ""), cp.get("description", "")
        status = cp.get("positionStatus", "defined")
        if not isinstance(label, str) or not isinstance(desc, str):
            raise _bad(path, f"{where}: 'label' and 'description' must be strings.")
        if status not in _MARKUPS_STATUS:
            raise _bad(path, f"{where}: unknown positionStatus {status!r}.")
        extras = _decode_extras(desc)
        if status in ("undefined", "missing"):
            points.add(label, None, None, extras, where)
        else:
            xyz = _json_xyz(cp.get("position"), f"{where} ({label!r}) position", path)
            points.add(label, xyz, None, extras, where)
    note = "markup has no coordinateSystem; assuming LPS (the markups schema default)."
    return points.build(_resolve_system(stated, declared, path, "LPS", note), scale)


_READERS: dict[str, Callable[[str, Path, str | None], LandmarkSet]] = {
    "fcsv": _read_fcsv,
    "mrk.json": _read_mrk_json,
    "csv": _read_csv,
    "json": _read_json,
}


def read_landmarks(path: str | Path, coords: str | None = None) -> LandmarkSet:
    """Read a landmark file (format from the suffix) into world LPS mm.

    Args:
        path: a ``.fcsv``, ``.mrk.json``, ``.csv`` or ``.json`` file.
        coords: ``"LPS"`` or ``"RAS"`` for files that do not state their coordinate system
            (required for such CSV/JSON files); an error if the file states the other one.

    Returns:
        LandmarkSet with coords shape (N, 3) in LPS mm; missing landmarks are NaN rows.
    """
    p = Path(path)
    fmt = landmark_format(p)
    declared = _coords_arg(coords, p)
    try:
        with open(p, encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise _bad(p, f"not UTF-8 text ({exc.reason}).", "save the file as UTF-8.") from None
    except OSError as exc:
        raise _bad(p, f"cannot read the file ({exc.strerror or exc}).") from None
    if not text.strip():
        raise _bad(p, "the file is empty.", "write landmarks into it or remove it.")
    return _READERS[fmt](text, p, declared)


# ---------------------------------------------------------------------------------- writers
def _check_writable_set(ls: LandmarkSet, pts: NDArray[np.float64], path: Path, fmt: str) -> None:
    for name in ls.names:
        if len(name.splitlines()) != 1 or name != name.strip():
            fix = "use non-empty single-line names without surrounding spaces."
            raise _bad(path, f"landmark name {name!r} cannot be stored.", fix)
    rows = ~np.isnan(pts).any(axis=1)
    if not np.isfinite(pts[rows]).all():
        raise _bad(path, "non-finite landmark coordinates cannot be written.")
    reserved = {"x", "y", "z", *_NAME_COLUMNS}
    for name, extras in ls.extras.items():
        for key, value in extras.items():
            bad_key = not key.strip() or len(key.splitlines()) != 1 or key != key.strip()
            if bad_key or (fmt == "csv" and key.lower() in reserved):
                raise _bad(path, f"extra field {key!r} of {name!r} cannot be stored.")
            if fmt == "csv" and len(_fmt_scalar(value).splitlines()) > 1:
                raise _bad(path, f"extra {key!r} of {name!r} has a line break; CSV cannot hold it.")


def _write_fcsv(ls: LandmarkSet, pts: NDArray[np.float64], system: str, path: Path) -> str:
    buf = io.StringIO()
    buf.write("# Markups fiducial file version = 4.11\n")
    buf.write(f"# CoordinateSystem = {system}\n")
    buf.write(f"# columns = {_FCSV_HEADER}\n")
    writer = csv.writer(buf, lineterminator="\n")
    skipped = []
    for i, name in enumerate(ls.names):
        if np.isnan(pts[i]).any():
            skipped.append(name)
            continue
        xyz = [repr(float(v)) for v in pts[i]]
        desc = _encode_extras(ls.extras.get(name, {}))
        writer.writerow([str(i + 1), *xyz, "0", "0", "0", "1", "1", "1", "0", name, desc, ""])
    if skipped:
        warnings.warn(
            f"{path}: .fcsv cannot hold missing landmarks; left out {', '.join(skipped)}.",
            LandmarkWarning,
            stacklevel=3,
        )
    return buf.getvalue()


def _write_csv(ls: LandmarkSet, pts: NDArray[np.float64], system: str, path: Path) -> str:
    keys = list(dict.fromkeys(k for n in ls.names for k in ls.extras.get(n, {})))
    buf = io.StringIO()
    buf.write(f"# CoordinateSystem = {system}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "x", "y", "z", *keys])
    for i, name in enumerate(ls.names):
        missing = np.isnan(pts[i]).any()
        xyz = ["", "", ""] if missing else [repr(float(v)) for v in pts[i]]
        ex = ls.extras.get(name, {})
        writer.writerow([name, *xyz, *(_fmt_scalar(ex[k]) if k in ex else "" for k in keys)])
    return buf.getvalue()


def _json_value(value: float | str) -> float | str:
    if isinstance(value, str):
        return value
    v = float(value)
    return v if np.isfinite(v) else repr(v)


def _write_json(ls: LandmarkSet, pts: NDArray[np.float64], system: str, path: Path) -> str:
    data: dict[str, Any] = {
        "coordinate_system": system,
        "units": "mm",
        "landmarks": {
            n: None if np.isnan(pts[i]).any() else [float(v) for v in pts[i]]
            for i, n in enumerate(ls.names)
        },
    }
    extras = {n: {k: _json_value(v) for k, v in e.items()} for n, e in ls.extras.items() if e}
    extras = {n: extras[n] for n in ls.names if n in extras}
    if extras:
        data["extras"] = extras
    reasons = {n: ls.missing_reason.get(n, "missing") for n in ls.names if ls.is_missing(n)}
    if reasons:
        data["missing_reason"] = reasons
    return json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _write_mrk_json(ls: LandmarkSet, pts: NDArray[np.float64], system: str, path: Path) -> str:
    flip = -1.0 if system == "LPS" else 1.0  # Slicer's default orientation: identity in RAS
    orient = [flip, 0.0, 0.0, 0.0, flip, 0.0, 0.0, 0.0, 1.0]
    control_points = []
    for i, name in enumerate(ls.names):
        missing = bool(np.isnan(pts[i]).any())
        cp: dict[str, Any] = {
            "id": str(i + 1),
            "label": name,
            "description": _encode_extras(ls.extras.get(name, {})),
            "associatedNodeID": "",
        }
        if not missing:
            cp["position"] = [float(v) for v in pts[i]]
        cp |= {"orientation": orient, "selected": True, "locked": False, "visibility": True}
        cp["positionStatus"] = "missing" if missing else "defined"
        control_points.append(cp)
    node = {
        "type": "Fiducial",
        "coordinateSystem": system,
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(ls.names),
        "controlPoints": control_points,
        "measurements": [],
    }
    data = {"@schema": MARKUPS_SCHEMA, "markups": [node]}
    return json.dumps(data, indent=4, allow_nan=False, ensure_ascii=False) + "\n"


_WRITERS: dict[str, Callable[[LandmarkSet, NDArray[np.float64], str, Path], str]] = {
    "fcsv": _write_fcsv,
    "mrk.json": _write_mrk_json,
    "csv": _write_csv,
    "json": _write_json,
}


def write_landmarks(
    landmarks: LandmarkSet,
    path: str | Path,
    fmt: str | None = None,
    coords: str = "LPS",
    overwrite: bool = True,
) -> Path:
    """Write ``landmarks`` (LPS mm) atomically to ``path``.

    Args:
        landmarks: the set to write; extras are stored, missing landmarks too except in .fcsv
            (left out with a :class:`LandmarkWarning`).
        path: destination file.
        fmt: one of :data:`LANDMARK_FORMATS`; default from the suffix of ``path``.
        coords: ``"LPS"`` or ``"RAS"``, the coordinate system of the file (stated in it).
        overwrite: if False, an existing ``path`` raises OutputExistsError.

    Returns:
        ``path`` as a Path.
    """
    p = Path(path)
    if fmt is None:
        fmt = landmark_format(p)
    elif fmt.lower().lstrip(".") in LANDMARK_FORMATS:
        fmt = fmt.lower().lstrip(".")
    else:
        raise _bad(p, f"unknown landmark file format {fmt!r}.", _FORMATS_FIX)
    system = _coords_arg(coords, p)
    if system is None:
        raise _bad(p, "no output coordinate system given.", "use LPS or RAS.")
    pts = landmarks.coords if system == "LPS" else lps_to_ras(landmarks.coords)
    _check_writable_set(landmarks, pts, p, fmt)
    return atomic_write_text(p, _WRITERS[fmt](landmarks, pts, system, p), overwrite)
