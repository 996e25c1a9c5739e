"""Export a trained run's networks as self-contained TorchScript or ONNX files.

``export_run(model, out, fmt)`` writes one file per network of the run — the coarse regressor,
every fine U-Net (one per landmark, or the shared one) and every correlated group model — plus
what someone needs to run them *without* landmark3d::

    OUT/manifest.json   every network's inputs and outputs (name, shape, dtype, meaning,
                        units), the landmark names, the plan (grid, patch size, spacings,
                        intensity normalisation), the pre- and post-processing recipe, and the
                        sha256, size and measured PyTorch parity of every file
    OUT/coarse.pt  OUT/fine_<key>.pt  OUT/correlated_group<g>.pt    (.onnx for ONNX)
    OUT/README.md       how to load and run them (generated from the manifest)
    OUT/SHA256SUMS      input of ``sha256sum -c``

Each file is loaded back and compared with the PyTorch network on random inputs of batch 1
and 2 (:func:`landmark3d.inference.export_networks.parity_check`) before anything is moved into
place; the largest absolute difference is recorded and must stay below
:data:`PARITY_TOLERANCE`. The directory is assembled under a temporary name beside ``out`` and
renamed into place, so a crash never leaves a half export. An earlier export is replaced only
with ``overwrite``; a non-empty directory that is not a landmark3d export is never replaced.

Formats: TorchScript needs nothing beyond torch (torch 2.13 marks ``torch.jit`` deprecated;
that warning is silenced, the files load fine). ONNX uses the ``torch.export``-based exporter
and needs the optional packages of the ``export`` extra: ``pip install 'landmark3d[export]'``
(onnx, onnxscript; onnxruntime for the parity check).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import landmark3d
from landmark3d.config import ExperimentConfig
from landmark3d.errors import CheckpointError, Landmark3dError, OutputExistsError
from landmark3d.inference.export_networks import (
    EXPORT_STAGES,
    FORMATS,
    SUFFIX,
    check_format_available,
    load_run_networks,
    parity_check,
    preprocessing_recipe,
    write_network,
)
from landmark3d.io.atomic import publish_mode
from landmark3d.packaging import extract_model_archive, is_model_archive
from landmark3d.planning import Plan

EXPORT_FORMAT = "landmark3d-export"
EXPORT_VERSION = 1
MANIFEST = "manifest.json"
README = "README.md"
CHECKSUMS = "SHA256SUMS"
PARITY_TOLERANCE = 1e-4
"""Largest accepted max |exported - PyTorch| on the parity inputs."""


# ----------------------------------------------------------------------------- output dir
def _is_export_dir(path: Path) -> bool:
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == EXPORT_FORMAT


def check_export_destination(out: str | Path, overwrite: bool) -> Path:
    """``out`` if it is new or an empty directory, or an earlier export and ``overwrite``.

    Raises:
        OutputExistsError: an existing export without ``overwrite``, or anything else there.
    """
    dest = Path(out)
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return dest
    if not dest.is_dir() or not _is_export_dir(dest):
        raise OutputExistsError(
            "output exists and is not a landmark3d model export; it is never replaced.",
            path=dest,
            fix="choose a new or empty directory for --out.",
        )
    if not overwrite:
        raise OutputExistsError(
            "a model export exists here and would be overwritten.",
            path=dest,
            fix="pass --overwrite or choose another --out directory.",
        )
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _move_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` onto ``dest`` (an earlier export is swapped out first)."""
    check_export_destination(dest, overwrite)  # again: it may have appeared meanwhile
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _run_directory(model: Path) -> Iterator[Path]:
    """``model`` itself, or a model.zip unpacked (checked) into a temporary directory."""
    if is_model_archive(model):
        with tempfile.TemporaryDirectory(prefix="landmark3d-export-") as tmp:
            yield extract_model_archive(model, tmp)
    else:
        yield model


# ----------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What :func:`export_run` wrote: the directory, its manifest, and per network the max
    |exported - PyTorch| (NaN when the check was skipped)."""

    out: Path
    manifest: dict[str, Any]
    parity: dict[str, float]


def export_run(
    model: str | Path,
    out: str | Path,
    fmt: str = "torchscript",
    checkpoint: str = "best",
    stages: Sequence[str] | None = None,
    overwrite: bool = False,
    check: bool = True,
) -> ExportResult:
    """Export the networks of a trained run (layout in the module docstring).

    Args:
        model: run directory of ``landmark3d train`` or model.zip of ``landmark3d package``.
        out: export directory to create.
        fmt: "torchscript" or "onnx".
        checkpoint: "best" or "last".
        stages: subset of coarse / fine / correlated, each must be trained; None = every
            stage the run has.
        overwrite: replace an earlier export at ``out``.
        check: compare every file with PyTorch (:func:`parity_check`); a difference above
            :data:`PARITY_TOLERANCE` aborts the export before anything is moved into place.

    Raises:
        OutputExistsError: see :func:`check_export_destination`.
        CheckpointError: the run cannot be loaded.
        Landmark3dError: unknown format, missing ONNX packages, failed export or parity.
    """
    check_format_available(fmt, check)
    dest = check_export_destination(out, overwrite)
    source = Path(model)
    with _run_directory(source) as run:
        config, plan, nets = load_run_networks(run, checkpoint, stages)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        publish_mode(tmp)  # mkdtemp makes it owner-only (0700)
        try:
            parity: dict[str, float] = {}
            entries = []
            for net in nets:
                path = tmp / f"{net.name}{SUFFIX[fmt]}"
                write_network(net, path, fmt)
                diff = parity_check(net, path, fmt) if check else float("nan")
                if check and not diff < PARITY_TOLERANCE:
                    raise Landmark3dError(
                        f"the exported {net.name} differs from PyTorch by up to {diff:.3g} "
                        f"(tolerance {PARITY_TOLERANCE:g}); nothing was written.",
                        path=source,
                        fix="try the other --format; rerun with --debug and report it.",
                    )
                parity[net.name] = diff
                entries.append(
                    {
                        **net.to_dict(),
                        "file": path.name,
                        "sha256": _sha256(path),
                        "bytes": path.stat().st_size,
                        "parity_max_abs_diff": diff if check else None,
                    }
                )
            manifest = _manifest(source, checkpoint, fmt, config, plan, entries)
            _write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            _write_text(tmp / README, readme_text(manifest))
            sums = [(str(e["sha256"]), str(e["file"])) for e in entries]
            sums += [(_sha256(tmp / n), n) for n in (MANIFEST, README)]
            _write_text(tmp / CHECKSUMS, "".join(f"{h}  {n}\n" for h, n in sums))
            _move_into_place(tmp, dest, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ExportResult(dest, manifest, parity)


def _manifest(
    source: Path,
    checkpoint: str,
    fmt: str,
    config: ExperimentConfig,
    plan: Plan,
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model_format": fmt,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "landmark3d_version": landmark3d.__version__,
        "torch_version": torch.__version__,
        "source": {"model": str(source), "checkpoint": checkpoint},
        "coordinate_system": "LPS",
        "array_order": "index order [i, j, k] (the transpose of SimpleITK's GetArrayFromImage)",
        "landmark_names": list(plan.landmark_names),
        "parity_tolerance": PARITY_TOLERANCE,
        "plan": plan.to_dict(),
        "preprocessing": preprocessing_recipe(config, plan),
        "networks": entries,
    }


def readme_text(manifest: Mapping[str, Any]) -> str:
    """A short Markdown guide to an export, generated from its manifest."""
    fmt = manifest["model_format"]
    lines = [
        "# Exported landmark3d networks",
        "",
        f"Format: {fmt}. Landmarks (world LPS mm): {', '.join(manifest['landmark_names'])}.",
        "`manifest.json` describes every input and output, the plan and the pre- and "
        "post-processing; `SHA256SUMS` checks the files (`sha256sum -c SHA256SUMS`).",
        "",
        "| file | landmarks | input | outputs |",
        "|---|---|---|---|",
    ]
    for e in manifest["networks"]:
        ins = ", ".join(f"{s['name']} {s['shape']}" for s in e["inputs"])
        outs = ", ".join(f"{s['name']} {s['shape']}" for s in e["outputs"])
        lines.append(f"| {e['file']} | {', '.join(e['landmarks'])} | {ins} | {outs} |")
    first = manifest["networks"][0]
    shape = ", ".join("2" if s == "batch" else str(s) for s in first["inputs"][0]["shape"])
    lines += ["", "Run one (float32 input, any batch size):", "", "```python"]
    if fmt == "torchscript":
        lines += [
            "import torch",
            f"net = torch.jit.load({first['file']!r}).eval()",
            f"out = net(torch.zeros({shape}))  # a tensor, or a tuple for several outputs",
        ]
    else:
        lines += [
            "import numpy as np, onnxruntime as ort",
            f"sess = ort.InferenceSession({first['file']!r})",
            f"outs = sess.run(None, {{{first['inputs'][0]['name']!r}: "
            f"np.zeros(({shape}), np.float32)}})",
        ]
    lines += ["```", ""]
    if fmt == "torchscript":
        lines += [
            "On a CPU, feed at least 2 items per call where you can (e.g. a case's patches "
            "together, or one item twice): PyTorch runs a batch of one 3D convolution on a "
            "generic path about 6x slower than a batch of two (landmark3d's own predictor "
            "does this; see `landmark3d.engine.device.eval_forward`).",
            "",
        ]
    return "\n".join(lines)


def read_export_manifest(out: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read ``out/manifest.json``; with ``verify``, check every network file's sha256.

    Raises:
        CheckpointError: not an export, or a file missing / not matching its sha256.
    """
    root = Path(out)
    if not _is_export_dir(root):
        raise CheckpointError(
            f"{MANIFEST} of a landmark3d model export not found.",
            path=root,
            fix="pass the --out directory of `landmark3d export --model ...`.",
        )
    manifest: dict[str, Any] = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    for entry in manifest["networks"] if verify else []:
        path = root / str(entry["file"])
        if not path.is_file() or _sha256(path) != entry["sha256"]:
            raise CheckpointError(
                f"{entry['file']} is missing or does not match its sha256 in {MANIFEST}.",
                path=path,
                fix="export the model again.",
            )
    return manifest


__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_STAGES",
    "FORMATS",
    "MANIFEST",
    "PARITY_TOLERANCE",
    "ExportResult",
    "check_export_destination",
    "export_run",
    "read_export_manifest",
]
