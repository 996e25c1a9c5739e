"""Predict many images and write one landmark file per image plus ``timings.json``.

Inputs: an image file, a DICOM series directory, a directory of image files (and DICOM series
sub-directories), or the cases of a dataset (optionally one fold's held-out cases). Output
files are named ``<case id>.<format>`` — the case id is the image file name without its image
suffix (or the dataset's case id) — so ``landmark3d evaluate`` can match them to the truth.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from landmark3d.errors import CheckpointError, ImageError
from landmark3d.inference.confidence import flag_above as flag_landmarks
from landmark3d.inference.predictor import Predictor
from landmark3d.io.atomic import atomic_write_text, check_writable
from landmark3d.io.images import IMAGE_SUFFIXES, image_suffix, is_image_path
from landmark3d.io.landmarks import LANDMARK_FORMATS, write_landmarks


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and any(
        f.is_file() and (f.suffix.lower() in (".dcm", ".ima") or f.suffix == "")
        for f in path.iterdir()
    )


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
    if files:
        return [(case_id_of(p), p) for p in files]
    subdirs = sorted(p for p in path.iterdir() if _is_dicom_dir(p))
    if subdirs:
        return [(p.name, p) for p in subdirs]
    if _is_dicom_dir(path):
        return [(path.name, path)]
    raise ImageError(
        "no images found in the directory.",
        path=path,
        fix=f"put image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders in it.",
    )


def training_landmark_format(run: Path) -> str:
    """The landmark format the run was trained from (``split.json``), default ``json``."""
    split = run / "split.json"
    if split.is_file():
        fmt = json.loads(split.read_text(encoding="utf-8")).get("landmark_format")
        if fmt in LANDMARK_FORMATS:
            return str(fmt)
    return "json"


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
) -> list[Path]:
    """Predict every input image and write ``<case id>.<fmt>`` files and ``timings.json``.

    ``tta`` and ``absence`` are passed to :class:`Predictor` (None: as the run's calibration
    says). With ``flag_above`` (mm), every landmark gets ``flagged`` = 1 where its calibrated
    ``expected_error_mm`` exceeds it (else 0), and ``(case id, landmark, expected error)`` of
    each flagged one is appended to ``flagged`` (if given).

    Raises:
        CheckpointError: the run does not fit the dataset (landmark names, modality), or
            ``flag_above`` without a calibration.
        ImageError / OutputExistsError / LandmarkFileError: bad inputs or outputs.
    """
    if (input_path is None) == (dataset_path is None):
        raise ImageError("give exactly one of --input and --dataset.", fix="choose one.")
    if stage not in ("auto", "coarse", "fine", "correlated"):
        raise CheckpointError(
            f"unknown stage {stage!r}.", fix="use --stage auto, coarse, fine or correlated."
        )
    predictor = Predictor(run, device=device, stage=stage, tta=tta, absence=absence)  # type: ignore[arg-type]
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
    ids = [cid for cid, _ in items]
    clashes = sorted({cid for cid in ids if ids.count(cid) > 1})
    if clashes:  # two images, one output file: refuse before anything is written
        raise ImageError(
            f"several input images have the case id(s) {', '.join(clashes)} (the file name "
            "without its suffix), so their predictions would overwrite each other.",
            path=input_path or dataset_path,
            fix="rename the images so that their names differ without the suffix.",
        )
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / f"{cid}.{fmt}" for cid, _ in items]
    for t in targets:  # refuse before any work is done, so nothing is written half-way
        check_writable(t, overwrite)
    check_writable(out / "timings.json", overwrite)
    timings: dict[str, dict[str, float]] = {}
    written = []
    for (cid, path), target in zip(items, targets, strict=True):
        t0 = time.perf_counter()
        pred = predictor.predict_file(path)
        if flag_above is not None:
            hits = flag_landmarks(pred.landmarks, flag_above)
            if flagged is not None:
                flagged.extend((cid, name, err) for name, err in hits)
        t1 = time.perf_counter()
        write_landmarks(pred.landmarks, target, fmt=fmt, coords=coords, overwrite=overwrite)
        timings[cid] = {
            **pred.timings,
            "write": time.perf_counter() - t1,
            "total": time.perf_counter() - t0,
        }
        written.append(target)
        if progress is not None:
            progress(cid)
    atomic_write_text(out / "timings.json", json.dumps(_timing_summary(timings), indent=2) + "\n")
    return written


def _timing_summary(per_case: dict[str, dict[str, float]]) -> dict[str, Any]:
    keys = sorted({k for t in per_case.values() for k in t})
    median = {k: statistics.median(t[k] for t in per_case.values() if k in t) for k in keys}
    return {"unit": "seconds", "median": median, "cases": per_case}


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
