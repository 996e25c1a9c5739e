"""Predict a cohort of images: one landmark file per image plus a per-case report.

Inputs: an image file, a DICOM series directory, a directory of image files and/or DICOM series
sub-directories (beside image files, a sub-directory is a series when its files carry the DICOM
signature), or the cases of a dataset (optionally one fold's held-out cases). Output
files are named ``<case id>.<format>`` — the case id is the image file name without its image
suffix (or the dataset's case id) — so ``landmark3d evaluate`` can match them to the truth.

Cohort scale:

* **Streaming.** Images are read and predicted one at a time; only the model and one case
  are in memory (the fine patches of a case in chunks of ``patch_batch``).
* **Existing outputs.** By default an existing output is an error before any work is done
  (nothing is silently replaced). ``overwrite=True`` predicts every case again;
  ``resume=True`` skips cases whose output exists and parses (outputs are written
  atomically, so an existing file is a complete one; a file that does not parse is predicted
  again). Both at once is an error. A crash or kill loses at most the case in flight.
* **Sharding.** ``shard=(K, N)`` with **1-based** ``K`` (``1 <= K <= N``, as a SLURM array
  ``--array=1-N`` numbers its tasks) keeps the cases at positions ``K-1, K-1+N, K-1+2N, ...``
  of the case list sorted by case id: N runs share a cohort without overlap and together
  cover it (shard sizes differ by at most one). All shards must see the same inputs.
* **Failures.** A case that fails (e.g. an unreadable image) is recorded and the others go
  on; :func:`predict_cohort` returns every case's status, :func:`predict_inputs` raises the
  first failure's error once all cases are done.
* **Report.** ``timings.json`` (``timings.shard-K-of-N.json`` for a shard, so that shards never
  clobber each other) lists every case with its ``status`` ("done", "skipped-existing",
  "failed" with ``error``, or "pending" while the run is still going), image, output and
  seconds per step (``load``, ``preprocess``, ``coarse``, ``fine``, ``confidence``, ``write``,
  ``total``), the ``counts`` per status, ``median`` seconds of the cases predicted by this
  invocation and ``complete`` (false while running or after a crash). It is rewritten
  atomically every ``flush_seconds`` and at the end; on resume, skipped cases keep the timings
  recorded by the earlier run.
* **Signals.** While the cases run, SIGINT (Ctrl-C) and SIGTERM (what SLURM sends on
  preemption or at the time limit) stop the cohort alike: a signal during a case's prediction
  drops that case at once (it stays "pending"), one while an output or the report is being
  written takes effect right after it; finished outputs stay intact, the report is written
  (``complete`` false) and :class:`CohortInterrupted` (a ``KeyboardInterrupt``) is raised —
  ``landmark3d predict`` prints one line and exits with 130. A second signal aborts at once.
  The previous handlers are restored afterwards (main thread only; elsewhere nothing is
  installed).
* **What made the outputs.** Every report also records ``settings`` (:func:`cohort_settings`):
  the model (``model`` path, for information, and ``model_sha256``, a digest of the sha256 of
  the weights of every checkpoint used, as recorded in their ``meta.json``), ``checkpoint``,
  the resolved ``stage``, ``tta``, ``absence``, the calibration in use (``calibration_sha256``),
  ``flag_above``, ``coords`` and ``format``. ``resume=True`` refuses (before any work) when a
  report in ``out`` (``timings.json`` or any shard's) records other values for any of
  :data:`RESUME_KEYS` — the model is compared by digest, so a moved run or its ``package``
  archive resumes its own outputs. Outputs from before settings were recorded (reports without
  ``settings``, or no report at all) resume as before, unchecked: their skipped cases carry a
  ``note`` saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from landmark3d.engine.checkpoint import META, SHA256, WEIGHTS, read_checkpoint_meta
from landmark3d.engine.device import set_num_threads
from landmark3d.engine.run_files import SignalGuard
from landmark3d.errors import CheckpointError, ConfigError, ImageError, OutputExistsError
from landmark3d.inference.calibration import CALIBRATION_FILE
from landmark3d.inference.confidence import flag_above as flag_landmarks
from landmark3d.inference.predictor import Predictor
from landmark3d.inference.steps import DEFAULT_PATCH_BATCH
from landmark3d.io.atomic import atomic_write_text
from landmark3d.io.images import IMAGE_SUFFIXES, image_suffix, is_image_path
from landmark3d.io.landmarks import LANDMARK_FORMATS, read_landmarks, write_landmarks

STATUSES = ("done", "skipped-existing", "failed", "pending")
"""Case statuses in the report."""
REPORT_NAME = "timings.json"
RESUME_KEYS = (
    "model_sha256", "checkpoint", "stage", "tta", "absence", "calibration_sha256",
    "flag_above", "coords", "format",
)  # fmt: skip
"""The ``settings`` entries that must match for ``resume`` to keep earlier outputs."""
UNCHECKED_NOTE = "kept unchecked: the earlier run did not record its settings (model, stage, ...)"


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and any(
        f.is_file() and (f.suffix.lower() in (".dcm", ".ima") or f.suffix == "")
        for f in path.iterdir()
    )


def _has_dicom_file(path: Path) -> bool:
    """Whether a file directly in ``path`` carries the DICOM signature ("DICM" at byte 128)."""
    for f in path.iterdir():
        if f.is_file():
            with contextlib.suppress(OSError), f.open("rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    return True
    return False


def case_id_of(path: Path) -> str:
    """Case id of an image path: its name without the image suffix (a directory: its name)."""
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def enumerate_images(path: Path) -> list[tuple[str, Path]]:
    """``(case id, image path)`` pairs found at ``path`` (see the module docstring)."""
    if not path.exists():
        raise ImageError("input not found.", path=path, fix="give an image file or a directory.")
    if path.is_file():
        if not is_image_path(path):
            raise ImageError(
                "not a supported image file.",
                path=path,
                fix=f"use one of {', '.join(IMAGE_SUFFIXES)} or a DICOM series directory.",
            )
        return [(case_id_of(path), path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_path(p))
    if files:  # beside image files, only sub-directories that hold DICOM files are series
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and _has_dicom_file(p))
    else:
        subdirs = sorted(p for p in path.iterdir() if _is_dicom_dir(p))
    found = [(case_id_of(p), p) for p in files] + [(p.name, p) for p in subdirs]
    if found:
        _refuse_duplicate_ids(path, found)
        return sorted(found)
    if _is_dicom_dir(path):
        return [(path.name, path)]
    raise ImageError(
        "no images found in the directory.",
        path=path,
        fix=f"put image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders in it.",
    )


def _refuse_duplicate_ids(path: Path, found: list[tuple[str, Path]]) -> None:
    by_id: dict[str, list[str]] = {}
    for cid, p in found:
        by_id.setdefault(cid, []).append(p.name)
    clashes = {cid: names for cid, names in by_id.items() if len(names) > 1}
    if clashes:
        cid, names = next(iter(sorted(clashes.items())))
        raise ImageError(
            f"{len(clashes)} case id(s) would name two images, e.g. {cid!r}: "
            f"{' and '.join(names)} (outputs are named by case id).",
            path=path,
            fix="rename or move one image of each pair.",
        )


def training_landmark_format(run: Path) -> str:
    """The landmark format the run was trained from (``split.json``), default ``json``."""
    split = run / "split.json"
    if split.is_file():
        fmt = json.loads(split.read_text(encoding="utf-8")).get("landmark_format")
        if fmt in LANDMARK_FORMATS:
            return str(fmt)
    return "json"


# ------------------------------------------------------------------------------ sharding
_SHARD = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")


def parse_shard(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"K/N"`` (1-based K, ``1 <= K <= N``) -> ``(K, N)``; a tuple is validated as is.

    Raises:
        ConfigError: not of the form K/N, or K outside 1..N.
    """
    if isinstance(text, tuple):
        k, n = text
    else:
        m = _SHARD.fullmatch(text)
        if m is None:
            raise ConfigError(
                f"--shard must look like K/N (e.g. 2/8), got {text!r}.",
                fix="give the 1-based shard number and the shard count, e.g. --shard 1/4.",
            )
        k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(
            f"--shard {k}/{n} is out of range: shards are numbered 1..N (1-based) and N >= 1.",
            fix="use --shard K/N with 1 <= K <= N, e.g. --shard ${SLURM_ARRAY_TASK_ID}/N with "
            "a SLURM array --array=1-N.",
        )
    return k, n


def shard_items(
    items: Sequence[tuple[str, Path]], shard: tuple[int, int] | None
) -> list[tuple[str, Path]]:
    """The items of shard ``(K, N)`` (1-based K): positions ``K-1 (mod N)`` of the items
    sorted by case id, in their original order. ``None``: all items."""
    if shard is None:
        return list(items)
    k, n = parse_shard(shard)
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    keep = {i for pos, i in enumerate(order) if pos % n == k - 1}
    return [item for i, item in enumerate(items) if i in keep]


def report_path(out: Path, shard: tuple[int, int] | None) -> Path:
    """``out/timings.json``, or ``out/timings.shard-K-of-N.json`` for a shard."""
    if shard is None:
        return out / REPORT_NAME
    return out / f"timings.shard-{shard[0]}-of-{shard[1]}.json"


def default_threads(configured: int | None) -> int:
    """CPU threads for inference: ``configured`` (the config's ``num_threads``), else
    ``$OMP_NUM_THREADS``, else every core this process may use (a SLURM allocation's)."""
    if configured is not None:
        return int(configured)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------ records
@dataclass
class CaseRecord:
    """One case of a cohort run.

    Attributes:
        case_id: output file stem.
        image: the input image (file or DICOM directory).
        output: the landmark file.
        status: one of :data:`STATUSES`.
        error: the failure message ("Type: message") of a failed case.
        note: e.g. that an unreadable earlier output was replaced.
        timings: seconds per step (empty for a case not predicted).
        exception: the exception of a failed case (not serialised).
    """

    case_id: str
    image: Path
    output: Path
    status: str = "pending"
    error: str | None = None
    note: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The report entry: status, image, output (file name), error/note, seconds."""
        d: dict[str, Any] = {"status": self.status, "image": str(self.image)}
        d["output"] = self.output.name
        if self.error is not None:
            d["error"] = self.error
        if self.note is not None:
            d["note"] = self.note
        d.update({k: round(v, 6) for k, v in self.timings.items()})
        return d


@dataclass
class CohortResult:
    """All cases of one (shard's) cohort run, and where the report went."""

    records: list[CaseRecord]
    report: Path
    shard: tuple[int, int] | None
    cohort_size: int

    def with_status(self, status: str) -> list[CaseRecord]:
        """The records of one status."""
        return [r for r in self.records if r.status == status]

    @property
    def failed(self) -> list[CaseRecord]:
        return self.with_status("failed")


def _report(
    records: Sequence[CaseRecord],
    shard: tuple[int, int] | None,
    cohort: int,
    complete: bool,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    done = [r.timings for r in records if r.status == "done"]
    keys = sorted({k for t in done for k in t})
    median = {k: statistics.median(t[k] for t in done if k in t) for k in keys}
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    return {
        "unit": "seconds",
        "complete": complete,
        "shard": None if shard is None else {"index": shard[0], "count": shard[1]},
        "cohort_size": cohort,
        "settings": settings,
        "counts": counts,
        "median": median,
        "cases": {r.case_id: r.to_dict() for r in records},
    }


def _earlier_timings(path: Path) -> dict[str, dict[str, float]]:
    """Per-case seconds of an earlier report at ``path`` ({} if absent or unreadable)."""
    try:
        cases = json.loads(path.read_text(encoding="utf-8")).get("cases", {})
        return {
            str(cid): {k: float(v) for k, v in entry.items() if isinstance(v, int | float)}
            for cid, entry in cases.items()
            if isinstance(entry, dict)
        }
    except (OSError, ValueError, AttributeError):
        return {}


def _finished_output(path: Path, coords: str, names: Sequence[str]) -> str | None:
    """None if ``path`` is a complete earlier prediction, else why it is not."""
    try:
        ls = read_landmarks(path, coords=coords)
    except Exception as exc:  # any reason it cannot be used means: predict again
        return f"{type(exc).__name__}: {exc}"
    unknown = sorted(set(ls.names) - set(names))
    return f"landmarks {unknown} are not the model's" if unknown else None


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint_digest(ckpt: Path) -> str:
    """The sha256 of the checkpoint's weights as recorded in its meta.json (for checkpoints
    written before digests were recorded: ``meta:`` + the sha256 of meta.json, which holds
    the creation time, so it differs between any two saves)."""
    digests = read_checkpoint_meta(ckpt).get(SHA256)
    if isinstance(digests, dict) and isinstance(digests.get(WEIGHTS), str):
        return str(digests[WEIGHTS])
    return "meta:" + _sha256_file(ckpt / META)


def cohort_settings(
    predictor: Predictor, model: Path, fmt: str, coords: str, flag_above: float | None
) -> dict[str, Any]:
    """What makes a cohort's outputs: recorded in the report, compared on resume (see the
    module docstring; :data:`RESUME_KEYS` are compared)."""
    digests = {st: _checkpoint_digest(ckpt) for st, ckpt in predictor.checkpoints.items()}
    calibration = predictor.run / CALIBRATION_FILE
    return {
        "model": str(Path(model).resolve()),
        "model_sha256": hashlib.sha256(
            json.dumps(digests, sort_keys=True).encode("utf-8")
        ).hexdigest(),
        "checkpoints": digests,
        "checkpoint": predictor.checkpoint,
        "stage": predictor.stage,
        "tta": predictor.tta,
        "absence": predictor.absence,
        "calibration_sha256": _sha256_file(calibration)
        if predictor.calibration is not None and calibration.is_file()
        else None,
        "flag_above": flag_above,
        "coords": str(coords).strip().upper(),
        "format": fmt,
    }


def _earlier_settings(out: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """``(report, its settings or None)`` of every predict report in ``out`` (None: written
    before settings were recorded, or unreadable)."""
    from landmark3d.evaluation import is_predict_report

    found: list[tuple[Path, dict[str, Any] | None]] = []
    for path in sorted(out.glob("timings*.json")) if out.is_dir() else []:
        if not is_predict_report(path.name):
            continue
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("settings")
        except (OSError, ValueError, AttributeError):
            recorded = None
        found.append((path, recorded if isinstance(recorded, dict) else None))
    return found


def _check_resume_settings(out: Path, settings: dict[str, Any]) -> bool:
    """Refuse to resume outputs made with other settings; whether any report recorded them.

    Raises:
        OutputExistsError: a report in ``out`` records other values of :data:`RESUME_KEYS`.
    """
    checked = False
    for path, recorded in _earlier_settings(out):
        if recorded is None:
            continue
        checked = True
        diffs = [
            f"{key} {_show(recorded.get(key))} (now {_show(settings[key])})"
            for key in RESUME_KEYS
            if recorded.get(key) != settings[key]
        ]
        if diffs:
            made_by = recorded.get("model")
            raise OutputExistsError(
                "cannot --resume: the existing outputs were made with other settings"
                + (f" (model {made_by})" if made_by else "")
                + ": "
                + "; ".join(diffs)
                + ".",
                path=path,
                fix="resume with the same settings (model, --stage, --tta, --absence, "
                "--flag-above, --coords, --format), pass --overwrite to predict every case "
                "again, or choose another --out.",
            )
    return checked


def _show(value: Any) -> str:
    """A setting for the one-line error (digests shortened)."""
    if isinstance(value, str) and len(value) >= 64:
        return value[:12] + "…"
    return repr(value) if isinstance(value, str) else json.dumps(value)


# ------------------------------------------------------------------------------ signals
class CohortInterrupted(KeyboardInterrupt):
    """A cohort run stopped by SIGINT/SIGTERM; finished outputs and the report are written.

    Attributes:
        signal_name: "SIGINT" or "SIGTERM".
    """

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


class _Stop(KeyboardInterrupt):
    """Raised by :class:`_SignalStop`'s handler to abandon the case in flight."""


class _SignalStop(SignalGuard):
    """SIGINT/SIGTERM as a stop request (:class:`SignalGuard`'s handlers, installed in the
    main thread only and restored on exit), but raised at once inside :meth:`interruptible`
    (a case's prediction), else taken at the next :meth:`check`; a second signal raises at
    once, as :class:`_Stop` too, so the cohort's message and report follow."""

    def __init__(self) -> None:
        super().__init__()
        self._live = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        again = self.received is not None
        self.received = self.received or signal.Signals(signum).name
        if self._live or again:
            raise _Stop(self.received)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch a signal may cut short (nothing is half-written by stopping in it)."""
        self.check()
        self._live = True
        try:
            yield
        finally:
            self._live = False

    def check(self) -> None:
        """Raise :class:`_Stop` if a signal came."""
        if self.received is not None:
            raise _Stop(self.received)


# ------------------------------------------------------------------------------ prediction
def predict_cohort(
    run: Path,
    out: Path,
    input_path: Path | None = None,
    dataset_path: Path | None = None,
    fold: int | None = None,
    fmt: str | None = None,
    coords: str = "LPS",
    stage: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    shard: tuple[int, int] | str | None = None,
    patch_batch: int = DEFAULT_PATCH_BATCH,
    threads: int | None = None,
    tta: bool | None = None,
    absence: bool | None = None,
    flag_above: float | None = None,
    flagged: list[tuple[str, str, float]] | None = None,
    progress: Callable[[int, int, CaseRecord | None], None] | None = None,
    flush_seconds: float = 10.0,
) -> CohortResult:
    """Predict every input image (of one shard), writing ``<case id>.<fmt>`` and the report.

    See the module docstring for ``overwrite``/``resume``, ``shard`` and the report. ``tta``
    and ``absence`` go to :class:`Predictor` (None: as the run's calibration says);
    ``patch_batch`` bounds the fine patches in memory at once; ``threads`` sets torch's CPU
    threads for the run (None: :func:`default_threads` of the config's ``num_threads``;
    restored afterwards). With ``flag_above`` (mm), every landmark gets ``flagged`` = 1 where its
    calibrated ``expected_error_mm`` exceeds it (else 0), and ``(case id, landmark, expected
    error)`` of each flagged one (of the cases predicted now) is appended to ``flagged``.
    ``progress(i, total, record)`` is called with ``(0, total, None)`` before the first case
    and after each case.

    Raises:
        CheckpointError: the run does not fit the dataset (landmark names, modality), or
            ``flag_above`` without a calibration.
        ConfigError: ``resume`` with ``overwrite``, a bad ``shard``/``patch_batch``/``threads``.
        CohortInterrupted: SIGINT/SIGTERM while the cases run (the report is written first).
        ImageError / OutputExistsError: bad inputs, existing outputs without ``resume`` or
            ``overwrite``, or ``resume`` over outputs made with other settings. Errors of single cases are recorded instead (status "failed").
    """
    if (input_path is None) == (dataset_path is None):
        raise ImageError("give exactly one of --input and --dataset.", fix="choose one.")
    if resume and overwrite:
        raise ConfigError(
            "--resume (skip finished cases) and --overwrite (predict every case again) "
            "contradict each other.",
            fix="give one of them.",
        )
    if stage not in ("auto", "coarse", "fine", "correlated"):
        raise CheckpointError(
            f"unknown stage {stage!r}.", fix="use --stage auto, coarse, fine or correlated."
        )
    part = None if shard is None else parse_shard(shard)
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"--threads must be >= 1, got {threads!r}.", fix="use e.g. --threads 4.")
    if isinstance(patch_batch, bool) or patch_batch < 1:
        raise ConfigError(
            f"--patch-batch must be >= 1, got {patch_batch!r}.",
            fix=f"use e.g. --patch-batch {DEFAULT_PATCH_BATCH}.",
        )
    predictor = Predictor(
        run,
        device=device,
        stage=stage,  # type: ignore[arg-type]
        tta=tta,
        absence=absence,
        patch_batch=patch_batch,
    )
    if flag_above is not None and predictor.calibration is None:
        raise CheckpointError(
            f"--flag-above needs a confidence calibration for the {predictor.stage!r} stage, "
            "and the run has none.",
            path=predictor.run / "calibration.json",
            fix=f"run `landmark3d calibrate --model {run}` first (or drop --flag-above).",
        )
    fmt = fmt or training_landmark_format(predictor.run)
    if fmt not in LANDMARK_FORMATS:
        raise ImageError(
            f"unknown landmark format {fmt!r}.", fix=f"use one of {', '.join(LANDMARK_FORMATS)}."
        )
    items: list[tuple[str, Path]]
    if dataset_path is not None:
        from landmark3d.data.dataset import load_dataset

        ds = load_dataset(dataset_path)
        check_compatible(predictor, ds.landmark_names, ds.modality, ds.source)
        ids = ds.split(fold)[1] if fold is not None else ds.case_ids
        items = [(cid, ds.case(cid).image) for cid in ids]
    else:
        assert input_path is not None
        items = enumerate_images(input_path)
    seen: dict[str, int] = {}
    for cid, _ in items:
        seen[cid] = seen.get(cid, 0) + 1
    clashes = sorted(cid for cid, n in seen.items() if n > 1)
    if clashes:  # two images, one output file: refuse before anything is written
        raise ImageError(
            f"several input images have the case id(s) {', '.join(clashes)} (the file name "
            "without its suffix), so their predictions would overwrite each other.",
            path=input_path or dataset_path,
            fix="rename the images so that their names differ without the suffix.",
        )
    from landmark3d.evaluation import is_predict_report

    reserved = [cid for cid, _ in items if is_predict_report(f"{cid}.{fmt}")]
    if reserved:  # "timings.json" is the run's report; evaluation would skip the case
        raise ImageError(
            f"the case id(s) {', '.join(reserved)} would be written as JSON files named like "
            "predict's own report (timings*.json).",
            path=input_path or dataset_path,
            fix="rename the image(s), or choose another --format (fcsv, mrk.json, csv).",
        )
    cohort = len(items)
    mine = shard_items(items, part)
    records = [CaseRecord(cid, path, out / f"{cid}.{fmt}") for cid, path in mine]
    report = report_path(out, part)
    if not (overwrite or resume):  # refuse before any work, so nothing is written half-way
        existing = [r.output for r in records if r.output.exists()] + (
            [report] if report.exists() else []
        )
        if existing:
            raise OutputExistsError(
                f"{len(existing)} output file(s) exist already (e.g. {existing[0].name}).",
                path=existing[0],
                fix="pass --resume to skip the finished cases, --overwrite to predict them "
                "again, or choose another --out.",
            )
    settings = cohort_settings(predictor, run, fmt, coords, flag_above)
    checked = _check_resume_settings(out, settings) if resume else False
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_timings(report) if resume else {}

    def flush(complete: bool) -> None:
        text = json.dumps(_report(records, part, cohort, complete, settings), indent=2) + "\n"
        atomic_write_text(report, text)

    previous_threads = torch.get_num_threads()
    set_num_threads(
        threads if threads is not None else default_threads(predictor.config.num_threads)
    )
    last_flush = time.monotonic()
    complete = False
    stop = _SignalStop()
    try:
        with stop:
            if progress is not None:
                progress(0, len(records), None)
            for i, rec in enumerate(records, start=1):
                _run_case(rec, predictor, fmt, coords, resume, flag_above, flagged, earlier, stop)
                if rec.status == "skipped-existing" and not checked:
                    rec.note = UNCHECKED_NOTE
                if progress is not None:
                    progress(i, len(records), rec)
                if time.monotonic() - last_flush >= flush_seconds:
                    flush(False)
                    last_flush = time.monotonic()
                stop.check()
            complete = True
    except _Stop:
        name = stop.received or "signal"
        finished = sum(r.status != "pending" for r in records)
        raise CohortInterrupted(
            f"{name} received: stopped after {finished} of {len(records)} case(s) (finished "
            f"outputs kept, {len(records) - finished} pending); report {report} (complete: "
            "false). To continue: rerun the same command with --resume",
            name,
        ) from None
    finally:
        torch.set_num_threads(previous_threads)
        flush(complete)
    return CohortResult(records, report, part, cohort)


def _run_case(
    rec: CaseRecord,
    predictor: Predictor,
    fmt: str,
    coords: str,
    resume: bool,
    flag_above: float | None,
    flagged: list[tuple[str, str, float]] | None,
    earlier: dict[str, dict[str, float]],
    stop: _SignalStop | None = None,
) -> None:
    """Predict one case into ``rec`` (status, timings, error); never raises an Exception
    (a signal during the prediction raises ``_Stop``, leaving ``rec`` pending)."""
    if resume and rec.output.exists():
        why = _finished_output(rec.output, coords, predictor.landmark_names)
        if why is None:
            rec.status, rec.timings = "skipped-existing", earlier.get(rec.case_id, {})
            return
        rec.note = f"replaced an unusable earlier output ({why})"
    t0 = time.perf_counter()
    try:
        with stop.interruptible() if stop is not None else contextlib.nullcontext():
            pred = predictor.predict_file(rec.image)
        hits = flag_landmarks(pred.landmarks, flag_above) if flag_above is not None else []
        t1 = time.perf_counter()
        write_landmarks(pred.landmarks, rec.output, fmt=fmt, coords=coords, overwrite=True)
    except Exception as exc:  # one bad case must not stop a cohort: record it, go on
        rec.status, rec.exception = "failed", exc
        rec.error = f"{type(exc).__name__}: {exc}"
        rec.timings = {"total": time.perf_counter() - t0}
        return
    if flagged is not None:
        flagged.extend((rec.case_id, name, err) for name, err in hits)
    rec.status = "done"
    rec.timings = {
        **pred.timings,
        "write": time.perf_counter() - t1,
        "total": time.perf_counter() - t0,
    }


def predict_inputs(
    run: Path,
    out: Path,
    input_path: Path | None = None,
    dataset_path: Path | None = None,
    fold: int | None = None,
    fmt: str | None = None,
    coords: str = "LPS",
    stage: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    tta: bool | None = None,
    absence: bool | None = None,
    flag_above: float | None = None,
    flagged: list[tuple[str, str, float]] | None = None,
    resume: bool = False,
    shard: tuple[int, int] | str | None = None,
    patch_batch: int = DEFAULT_PATCH_BATCH,
    threads: int | None = None,
) -> list[Path]:
    """:func:`predict_cohort`, returning the files written now; ``progress(case id)`` after
    each predicted case.

    Raises:
        as :func:`predict_cohort`, and the first failed case's error once every case is done
        (the report lists them all).
    """

    def report(i: int, total: int, rec: CaseRecord | None) -> None:
        if progress is not None and rec is not None and rec.status == "done":
            progress(rec.case_id)

    result = predict_cohort(
        run, out, input_path=input_path, dataset_path=dataset_path, fold=fold, fmt=fmt,
        coords=coords, stage=stage, device=device, overwrite=overwrite, resume=resume,
        shard=shard, patch_batch=patch_batch, threads=threads, tta=tta, absence=absence,
        flag_above=flag_above, flagged=flagged, progress=report,
    )  # fmt: skip
    if result.failed and result.failed[0].exception is not None:
        raise result.failed[0].exception
    return [r.output for r in result.with_status("done")]


def check_compatible(
    predictor: Predictor, landmark_names: list[str], modality: str, source: object
) -> None:
    """Refuse data with other landmark names or another modality than the model's."""
    want = predictor.landmark_names
    if sorted(landmark_names) != sorted(want):
        missing = sorted(set(want) - set(landmark_names))
        extra = sorted(set(landmark_names) - set(want))
        raise CheckpointError(
            f"the model predicts landmarks {want} but the dataset has {landmark_names} "
            f"(missing {missing}, extra {extra}).",
            path=str(source) if source else None,
            fix="use a model trained on this landmark set.",
        )
    if str(modality).upper() != predictor.plan.modality:
        raise CheckpointError(
            f"the model was trained on {predictor.plan.modality} but the dataset is {modality}.",
            path=str(source) if source else None,
            fix="use a model trained on this modality.",
        )
