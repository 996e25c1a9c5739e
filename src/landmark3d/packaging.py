"""Model archives: a trained run as one shareable ``model.zip``, loaded without running its code.

:func:`package_run` writes (atomically) a zip holding only JSON, CSV, Markdown and safetensors::

    manifest.json                        format, landmark names, modality, sha256 + size per file
    MODEL_CARD.md                        landmarks, modality, training data, metrics, use, limits
    config.json  plan.json  split.json  calibration.json   as in the run directory
    coarse/checkpoints/best/{weights.safetensors, meta.json, state.json}
    fine/checkpoints/best/{weights.safetensors, meta.json, state.json}
    coarse/metrics.csv  fine/metrics.csv                                 (if present)

(and the same for any further training stage of ``landmark3d.engine.run.STAGES``).
Only complete runs are packaged: coarse and fine, and correlated when the plan has correlated
groups, must each have their ``best`` checkpoint (:func:`required_stages`); otherwise the
archive would fail at prediction time, or its model card would advertise a model it lacks.

Optimizer state is left out: an archive is for prediction, not for resuming training.

:func:`extract_model_archive` unpacks an archive into an empty directory after checking every
member: only the names above (so no ``.py``, pickle or other file can ride along), relative
paths without ``..``, no symlinks, no encryption, no duplicates, size limits (also enforced
while decompressing), and every file's sha256 against the manifest. Nothing in the archive is
ever imported, executed or unpickled; weights are read with safetensors only.
``Predictor("model.zip")`` uses it to load a model into a temporary directory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import landmark3d
from landmark3d.config import ExperimentConfig
from landmark3d.engine.checkpoint import checkpoint_exists, read_checkpoint_meta
from landmark3d.engine.run import STAGES
from landmark3d.errors import CheckpointError, ConfigError
from landmark3d.io.atomic import atomic_path
from landmark3d.planning import Plan

ARCHIVE_FORMAT = "landmark3d-model"
ARCHIVE_VERSION = 1
MANIFEST = "manifest.json"
MODEL_CARD = "MODEL_CARD.md"
CHECKPOINT_FILES = ("weights.safetensors", "meta.json", "state.json")
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md", ".csv")
MAX_WEIGHTS_BYTES = 4 << 30  # one safetensors file
MAX_TEXT_BYTES = 64 << 20  # one JSON / CSV / Markdown file
MAX_TOTAL_BYTES = 8 << 30
_STAGE_RE = "|".join(re.escape(st) for st in STAGES)  # every training stage of a run
_MEMBER = re.compile(
    r"(config|plan|split|calibration)\.json|MODEL_CARD\.md|manifest\.json"
    rf"|({_STAGE_RE})/metrics\.csv"
    rf"|({_STAGE_RE})/checkpoints/best/(weights\.safetensors|meta\.json|state\.json)"
)
_REQUIRED = ("config.json", "plan.json", "coarse/checkpoints/best/weights.safetensors")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: the same run gives the same archive bytes
_FIX_SOURCE = "only load model archives written by `landmark3d package` from a source you trust."


# ----------------------------------------------------------------------------- packaging
def _run_files(run: Path) -> list[str]:
    """Archive member names taken from the run directory (validated)."""
    for name in ("config.json", "plan.json"):
        if not (run / name).is_file():
            raise CheckpointError(
                f"{name} not found: this is not a landmark3d run directory.",
                path=run,
                fix="pass the --out directory of `landmark3d train`.",
            )
    try:
        plan = Plan.load(run / "plan.json")
        ExperimentConfig.from_json(run / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"cannot package the run: {e.problem}", path=e.path, fix=e.fix) from e
    names = ["config.json", "plan.json"] + [
        extra for extra in ("split.json", "calibration.json") if (run / extra).is_file()
    ]
    needed = required_stages(plan)
    for stage in STAGES:
        ckpt = run / stage / "checkpoints" / "best"
        if not checkpoint_exists(ckpt):
            if stage in needed:
                why = (
                    f" (the plan has {len(plan.correlated_groups)} correlated group(s), which "
                    "predict uses it for)"
                    if stage == "correlated"
                    else ""
                )
                raise CheckpointError(
                    f"cannot package an incomplete run: the {stage} stage has no 'best' "
                    f"checkpoint{why}.",
                    path=ckpt,
                    fix=f"finish training first (landmark3d train ... --out {run} --resume), "
                    "then package again.",
                )
            continue
        read_checkpoint_meta(ckpt)  # refuses foreign or unsupported checkpoints
        for f in CHECKPOINT_FILES:
            if not (ckpt / f).is_file():
                raise CheckpointError(
                    f"checkpoint is incomplete: {f} is missing.", path=ckpt, fix="retrain it."
                )
            names.append(f"{stage}/checkpoints/best/{f}")
        if (run / stage / "metrics.csv").is_file():
            names.append(f"{stage}/metrics.csv")
    return names


def required_stages(plan: Plan) -> tuple[str, ...]:
    """The stages whose ``best`` checkpoint an archive of a run with ``plan`` must hold:
    coarse and fine, and correlated when the plan has correlated groups (what ``predict
    --stage auto`` loads and the model card describes)."""
    return ("coarse", "fine", "correlated") if plan.correlated_groups else ("coarse", "fine")


def _stage_metrics(run: Path, stage: str) -> dict[str, Any] | None:
    """Best and last validation numbers of a stage (checkpoint state + metrics.csv)."""
    state_path = run / stage / "checkpoints" / "best" / "state.json"
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {
        "monitor": state.get("monitor", "val_mre_mm"),
        "best": state.get("best_metric"),
        "best_epoch": state.get("best_epoch"),
        "epochs": None,
        "last": None,
    }
    csv_path = run / stage / "metrics.csv"
    if csv_path.is_file():
        rows = list(csv.DictReader(csv_path.read_text(encoding="utf-8").splitlines()))
        if rows:
            out["epochs"] = rows[-1].get("epoch")
            values = [r.get(out["monitor"], "") for r in rows if r.get(out["monitor"], "")]
            out["last"] = float(values[-1]) if values else None
    return out


def _fmt(values: Iterable[float], digits: int = 2) -> str:
    return " × ".join(f"{v:.{digits}f}" for v in values)


def model_card(run: str | Path) -> str:
    """The ``MODEL_CARD.md`` text for a run directory."""
    run = Path(run)
    plan = Plan.load(run / "plan.json")
    cfg = ExperimentConfig.from_json(run / "config.json")
    split: dict[str, Any] = {}
    if (run / "split.json").is_file():
        split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    fine_names = plan.landmark_names
    fine_meta = run / "fine" / "checkpoints" / "best"
    has_fine = checkpoint_exists(fine_meta)
    if has_fine:
        fine_names = list(read_checkpoint_meta(fine_meta).get("fine_landmarks", fine_names))
    grouped: dict[str, str] = {}
    if checkpoint_exists(run / "correlated" / "checkpoints" / "best"):
        for g in plan.correlated_groups:
            members = [str(m) for m in g.get("landmarks", [])]
            grouped |= {m: "correlated group " + " + ".join(members) for m in members}

    def refinement(name: str) -> str:
        if name in grouped:
            return grouped[name]
        return "independent patch U-Net" if has_fine and name in fine_names else "coarse only"

    n_train, n_val, n_test = (len(split.get(k, [])) for k in ("train", "val", "test"))
    groups = ", ".join(" + ".join(g.get("landmarks", [])) for g in plan.correlated_groups)
    lines = [
        f"# Model card: landmark3d model for {plan.dataset_name or 'an unnamed dataset'}",
        "",
        f"Written by landmark3d {landmark3d.__version__}. Load it with "
        "`landmark3d predict --model model.zip --input scan.nrrd --out pred/ --format fcsv` or "
        '`Predictor("model.zip")`; predictions are world coordinates in mm (LPS, or RAS with '
        "`--coords RAS`) that open in 3D Slicer.",
        "",
        "## Landmarks",
        "",
        "| # | landmark | fine-stage model |",
        "|---|---|---|",
        *(f"| {i + 1} | {n} | {refinement(n)} |" for i, n in enumerate(plan.landmark_names)),
        "",
        f"Correlated groups: {groups or 'none'}.",
        "",
        "## Input",
        "",
        f"- Modality: **{plan.modality}** (3D scalar volume: NIfTI, NRRD, MetaImage or a DICOM "
        "series directory; any storage orientation).",
        f"- Preprocessing (plan.json): reoriented to {plan.orientation}; coarse grid "
        f"{' × '.join(map(str, plan.coarse_grid))} voxels covering the whole image; fine "
        f"patches of {' × '.join(map(str, plan.patch_size))} voxels at "
        f"{_fmt(plan.fine_spacing_mm, 1)} mm; intensity {json.dumps(plan.intensity)}.",
        "",
        "## Training data",
        "",
        f"- Dataset: {plan.dataset_name or 'unnamed'} (fingerprint "
        f"`{plan.dataset_fingerprint or '—'}`).",
        f"- Cases: {len(plan.case_ids)} used for planning and training "
        f"({n_train} training, {n_val} validation for checkpoint selection); "
        f"{n_test} held-out test case(s) of fold {split.get('fold', '—')}, not seen in training.",
        f"- Median voxel spacing {_fmt(plan.median_spacing_mm)} mm and median extent "
        f"{_fmt(plan.median_extent_mm, 1)} mm (L, P, S) over those cases; the plan stores "
        "medians only, not the range.",
        f"- Coarse network: 3D ResNet, widths {list(cfg.coarse.widths)}, blocks "
        f"{list(cfg.coarse.layers)}, {cfg.coarse.epochs} epochs. Fine networks: U-Net "
        f"({cfg.fine.sharing}), channels {list(cfg.fine.channels)}, {cfg.fine.epochs} epochs, "
        f"{cfg.fine.decode} decoding.",
        "",
        "## Validation metrics",
        "",
        "Mean radial error (mm) on the validation cases used to select the checkpoint — an "
        "optimistic estimate; evaluate on held-out cases (`landmark3d evaluate`) for a fair one.",
        "",
        "| stage | monitored | best | at epoch | last | epochs run |",
        "|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        m = _stage_metrics(run, stage)
        if m is None:
            lines.append(f"| {stage} | — | not trained | | | |")
            continue

        def num(v: Any) -> str:
            return "—" if v is None else f"{float(v):.2f}"

        lines.append(
            f"| {stage} | {m['monitor']} | {num(m['best'])} | {m['best_epoch'] or '—'} | "
            f"{num(m['last'])} | {m['epochs'] or '—'} |"
        )
    lines += [
        "",
        "## Intended use",
        "",
        f"Research: locating these {len(plan.landmark_names)} landmarks in {plan.modality} "
        "images resembling the training data (anatomy, field of view, resolution), e.g. to "
        "initialise or check manual annotation in 3D Slicer.",
        "",
        "## Limitations",
        "",
        "- Not a medical device; not validated for clinical decisions.",
        f"- Trained on {len(plan.case_ids)} case(s) of one dataset; accuracy on other scanners, "
        "protocols, fields of view, pathologies or populations is unknown.",
        "- A landmark outside the field of view is still predicted (flagged `outside_image=1`).",
        "- The validation metrics above come from the checkpoint-selection cases.",
        "",
    ]
    return "\n".join(lines)


def package_run(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the run at ``run_dir`` as a model archive ``out`` (see the module docstring).

    Raises:
        CheckpointError: not a run directory, unreadable config.json / plan.json, a stage
            of :func:`required_stages` without its ``best`` checkpoint (an incomplete run),
            a foreign checkpoint.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
    """
    run = Path(run_dir)
    names = _run_files(run)
    plan = Plan.load(run / "plan.json")
    contents: dict[str, bytes] = {n: (run / n).read_bytes() for n in names}
    contents[MODEL_CARD] = model_card(run).encode("utf-8")
    manifest = {
        "format": ARCHIVE_FORMAT,
        "format_version": ARCHIVE_VERSION,
        "landmark3d_version": landmark3d.__version__,
        "landmark_names": list(plan.landmark_names),
        "modality": plan.modality,
        "files": {
            n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
            for n, b in sorted(contents.items())
        },
    }
    contents[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    with atomic_path(out, overwrite) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name in sorted(contents):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, contents[name])
    return Path(out)


# ----------------------------------------------------------------------------- loading
def _refuse(archive: Path, problem: str, fix: str = _FIX_SOURCE) -> CheckpointError:
    return CheckpointError(problem, path=archive, fix=fix)


def _check_member(archive: Path, info: zipfile.ZipInfo) -> None:
    """Refuse a member whose name, type or size a landmark3d archive never has."""
    name = info.filename
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or "\\" in name:
        raise _refuse(archive, f"member {name!r} has an absolute or non-POSIX path.")
    if ".." in parts or "." in parts or "" in name.split("/"):
        raise _refuse(archive, f"member {name!r} has a path outside the archive root ('..').")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise _refuse(archive, f"member {name!r} is a symbolic link.")
    if info.flag_bits & 0x1:
        raise _refuse(archive, f"member {name!r} is encrypted.")
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in ALLOWED_SUFFIXES:
        raise _refuse(
            archive,
            f"member {name!r} is a {suffix or 'suffix-less'} file; a model archive holds only "
            f"{', '.join(ALLOWED_SUFFIXES)} files (nothing executable or pickled).",
        )
    if not _MEMBER.fullmatch(name):
        raise _refuse(archive, f"member {name!r} is not a file a landmark3d model archive holds.")
    limit = MAX_WEIGHTS_BYTES if suffix == ".safetensors" else MAX_TEXT_BYTES
    if info.file_size > limit:
        raise _refuse(archive, f"member {name!r} is {info.file_size} bytes (limit {limit}).")


def _open_archive(archive: Path) -> zipfile.ZipFile:
    if not archive.is_file():
        raise CheckpointError(
            "model archive not found.", path=archive, fix="give a model.zip or a run directory."
        )
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise _refuse(
            archive, f"not a readable zip archive ({e}).", "give a model.zip written by package."
        ) from e


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path) -> bytes:
    """The member's bytes, stopping at its declared size (a lying header cannot bomb us)."""
    chunks, total = [], 0
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
                if total > info.file_size:
                    raise _refuse(archive, f"member {info.filename!r} is larger than declared.")
                chunks.append(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _refuse(archive, f"member {info.filename!r} is damaged ({e}).") from e
    return b"".join(chunks)


def read_manifest(archive: str | Path) -> dict[str, Any]:
    """The checked ``manifest.json`` of a model archive (no other member is read)."""
    path = Path(archive)
    with _open_archive(path) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_member(path, info)
        return _manifest(zf, {i.filename: i for i in infos}, path)


def _manifest(zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], archive: Path) -> Any:
    if MANIFEST not in infos:
        raise _refuse(archive, f"{MANIFEST} is missing: not a landmark3d model archive.")
    try:
        manifest = json.loads(_read_member(zf, infos[MANIFEST], archive).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(archive, f"{MANIFEST} is not valid JSON ({e}).") from e
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise _refuse(archive, f"{MANIFEST} does not describe a landmark3d model archive.")
    if manifest.get("format_version") != ARCHIVE_VERSION:
        raise _refuse(
            archive,
            f"archive format version {manifest.get('format_version')!r} is not supported "
            f"(this landmark3d reads version {ARCHIVE_VERSION}).",
            "use the landmark3d version that wrote it, or package the run again.",
        )
    if not isinstance(manifest.get("files"), dict):
        raise _refuse(archive, f"{MANIFEST} has no file list.")
    return manifest


def extract_model_archive(archive: str | Path, dest: str | Path) -> Path:
    """Check every member of ``archive`` and unpack it into the empty directory ``dest``.

    Returns:
        ``dest``, now a run directory that ``Predictor`` can load.

    Raises:
        CheckpointError: not a zip, an unexpected/unsafe member (see the module docstring),
            a missing required file, or a file whose sha256 differs from the manifest.
    """
    path, root = Path(archive), Path(dest)
    if root.exists() and any(root.iterdir()):
        raise CheckpointError(
            "extraction directory is not empty.", path=root, fix="give an empty directory."
        )
    with _open_archive(path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        for info in infos:
            _check_member(path, info)
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in by_name:
                raise _refuse(path, f"member {info.filename!r} appears twice.")
            by_name[info.filename] = info
        if sum(i.file_size for i in infos) > MAX_TOTAL_BYTES:
            raise _refuse(path, f"the archive unpacks to more than {MAX_TOTAL_BYTES} bytes.")
        manifest = _manifest(zf, by_name, path)
        listed = set(manifest["files"])
        present = set(by_name) - {MANIFEST}
        if listed != present:
            raise _refuse(
                path,
                f"members differ from {MANIFEST}: unlisted {sorted(present - listed)}, "
                f"missing {sorted(listed - present)}.",
            )
        for name in _REQUIRED:
            if name not in by_name:
                raise _refuse(path, f"required member {name!r} is missing.")
        root.mkdir(parents=True, exist_ok=True)
        for name, info in sorted(by_name.items()):
            data = _read_member(zf, info, path)
            expected = manifest["files"].get(name, {}) if name != MANIFEST else None
            if expected is not None and hashlib.sha256(data).hexdigest() != expected.get("sha256"):
                raise _refuse(path, f"member {name!r} does not match its sha256 in {MANIFEST}.")
            target = root.joinpath(*PurePosixPath(name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return root


def is_model_archive(path: str | Path) -> bool:
    """Whether ``path`` should be loaded as a model archive (a file, not a run directory)."""
    return Path(path).is_file()


__all__ = [
    "ALLOWED_SUFFIXES",
    "MANIFEST",
    "MODEL_CARD",
    "extract_model_archive",
    "is_model_archive",
    "model_card",
    "package_run",
    "read_manifest",
    "required_stages",
]
