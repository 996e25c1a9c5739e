"""Checkpoints: a directory of safetensors + JSON files, written atomically, never unpickled.

Layout of a checkpoint directory (format version :data:`FORMAT_VERSION`)::

    weights.safetensors    every model tensor, keyed "<model name>.<state_dict key>"
                           (e.g. "coarse.enc.0.weight"); one file for all models
    optimizer.safetensors  every other tensor: optimizer / LR-scheduler / GradScaler state
                           keyed by its place in the state ("optimizer/adam/state/0/exp_avg"),
                           and the RNG states ("rng/torch_cpu", "rng/cuda/N")
    optimizer.json         the non-tensor structure of those states; a tensor appears as
                           {"__tensor__": "<key in optimizer.safetensors>"}
    state.json             training progress (epoch, global step, best metric, ...) and the
                           numpy / python RNG states as JSON
    meta.json              landmark3d version, format version, creation time, the sha256 of
                           both safetensors files (checked on load) and what the caller
                           passed (stage, landmark names, config, plan, ...)

The directory is assembled under a temporary name beside the destination and moved into
place with ``rename``. An existing checkpoint is replaced by a rename swap
(``dest → .dest.old``, ``tmp → dest``, delete ``.dest.old``); a crash at any moment leaves
either the old or the new complete checkpoint — if it happens between the two renames, the
old one sits at ``.dest.old`` and is moved back by the next save or load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, load_file, save_file
from torch import nn

import landmark3d
from landmark3d.errors import CheckpointError
from landmark3d.io.atomic import publish_mode

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
OPT_TENSORS = "optimizer.safetensors"
OPT_JSON = "optimizer.json"
STATE = "state.json"
META = "meta.json"
REQUIRED_FILES = (WEIGHTS, OPT_TENSORS, OPT_JSON, STATE, META)
SHA256 = "sha256"  # meta.json entry: {file name: hex digest} of the two safetensors files

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"
_MARKERS = {_TENSOR, _TUPLE, _DICT, _FLOAT}


# --------------------------------------------------------------------------- encoding
def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """Turn a state-dict-like object into JSON, moving tensors into ``tensors`` under ``key``.

    ``tensors=None`` means tensors are not allowed here (``state`` and ``meta`` are JSON only).
    """
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise CheckpointError(
                f"a tensor (at {key!r}) cannot be stored in a JSON part of a checkpoint.",
                fix="convert it with .tolist() or .item() before putting it in state/meta.",
            )
        name = key
        n = 1
        while name in tensors:
            n += 1
            name = f"{key}#{n}"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: name}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
    if isinstance(obj, list) or (isinstance(obj, tuple) and tensors is None):
        # in the JSON-only parts (state, meta) tuples are stored as plain lists
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not _MARKERS & set(obj):
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {
            _DICT: [
                [_encode(k, f"{key}/key", None), _encode(v, f"{key}/{k}", tensors)]
                for k, v in obj.items()
            ]
        }
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} (at {key!r}) in a checkpoint without pickling.",
        fix="keep optimizer/scheduler state to tensors, numbers, strings, lists and dicts "
        "(e.g. use a LambdaLR with a plain function, which is not saved).",
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], path: Path) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors, path) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and _TENSOR in obj:
            name = obj[_TENSOR]
            if name not in tensors:
                raise CheckpointError(
                    f"tensor {name!r} referenced by {OPT_JSON} is missing from {OPT_TENSORS}.",
                    path=path,
                    fix=_corrupt_fix(path.parent),
                )
            return tensors[name]
        if len(obj) == 1 and _TUPLE in obj:
            return tuple(_decode(v, tensors, path) for v in obj[_TUPLE])
        if len(obj) == 1 and _FLOAT in obj:
            return float(obj[_FLOAT])
        if len(obj) == 1 and _DICT in obj:
            return {_decode(k, tensors, path): _decode(v, tensors, path) for k, v in obj[_DICT]}
        return {k: _decode(v, tensors, path) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- RNG state
def capture_rng(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Current python/numpy/torch RNG states; torch states go into ``tensors``, rest returned."""
    np_state = np.random.get_state(legacy=False)
    assert isinstance(np_state, dict)
    np_json = dict(np_state)
    np_json["state"] = {
        "key": [int(v) for v in np_state["state"]["key"]],
        "pos": int(np_state["state"]["pos"]),
    }
    version, internal, gauss = random.getstate()
    tensors["rng/torch_cpu"] = torch.get_rng_state().clone()
    n_cuda = 0
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = st.cpu().clone()
            n_cuda += 1
    return {
        "numpy": np_json,
        "python": [version, list(internal), gauss],
        "torch_cpu": "rng/torch_cpu",
        "n_cuda": n_cuda,
    }


def restore_rng(rng: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore RNG states written by :func:`capture_rng` (CUDA ones only if CUDA is present)."""
    np_state = dict(rng["numpy"])
    np_state["state"] = {
        "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "pos": int(np_state["state"]["pos"]),
    }
    np.random.set_state(np_state)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors[rng["torch_cpu"]])
    n_cuda = int(rng.get("n_cuda", 0))
    if n_cuda and torch.cuda.is_available() and torch.cuda.device_count() == n_cuda:
        torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{i}"] for i in range(n_cuda)])


# --------------------------------------------------------------------------- writing
def _write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, allow_nan=False).encode("utf-8")
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file (fsynced); returns its sha256 (hex), recorded in meta.json."""
    save_file(tensors, str(path), metadata={"format": "pt", "landmark3d": landmark3d.__version__})
    publish_mode(path)  # safetensors writes owner-only (0600) files
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _backup_of(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def _recover(dest: Path) -> None:
    """Undo a swap interrupted between its two renames (old checkpoint left at ``.dest.old``)."""
    backup = _backup_of(dest)
    if backup.is_dir() and not dest.exists():
        os.rename(backup, dest)
        _fsync_dir(dest.parent)


def checkpoint_exists(path: str | Path) -> bool:
    """Whether a checkpoint directory is at ``path`` (after recovering an interrupted swap)."""
    dest = Path(path)
    _recover(dest)
    return (dest / META).is_file()


def _model_tensors(models: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, model in models.items():
        if not name or "." in name or "/" in name:
            raise CheckpointError(
                f"model name {name!r} cannot be used as a checkpoint key prefix.",
                fix="name models with letters, digits and underscores only, e.g. 'coarse'.",
            )
        for key, t in model.state_dict().items():
            out[f"{name}.{key}"] = t.detach().to("cpu").contiguous().clone()
    return out


def save_checkpoint(
    path: str | Path,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, Any] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    scalers: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    capture_rng_state: bool = True,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing an existing one).

    Args:
        path: destination directory (e.g. ``run/checkpoints/last``).
        models: modules by name; their ``state_dict`` tensors go to ``weights.safetensors``.
        optimizers, schedulers, scalers: objects with ``state_dict()`` (torch optimizers,
            LR schedulers, ``GradScaler``), by name.
        state: JSON-able training progress (epoch, global_step, best_metric, history, ...).
        meta: JSON-able description (stage, landmark_names, config, plan, ...).
        capture_rng_state: store the python/numpy/torch RNG states in ``state.json``.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        CheckpointError: a model name or a state entry cannot be stored without pickling.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _recover(dest)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(_backup_of(dest), ignore_errors=True)

    weights = _model_tensors(models)
    extra: dict[str, torch.Tensor] = {}
    structure = {
        kind: {
            name: _encode(obj.state_dict(), f"{kind}/{name}", extra) for name, obj in objs.items()
        }
        for kind, objs in (
            ("optimizer", optimizers or {}),
            ("scheduler", schedulers or {}),
            ("scaler", scalers or {}),
        )
    }
    state_json: dict[str, Any] = _encode(dict(state or {}), "state", None)
    if capture_rng_state:
        state_json["rng"] = capture_rng(extra)
    meta_json: dict[str, Any] = {
        **_encode(dict(meta or {}), "meta", None),
        "format_version": FORMAT_VERSION,
        "landmark3d_version": landmark3d.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "models": sorted(models),
    }

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))

    publish_mode(tmp)  # mkdtemp makes it owner-only (0700)
    try:
        # the digests let a load detect bit rot or a partial overwrite of the tensor data,
        # which safetensors itself (no checksum) would load as silently wrong weights
        meta_json[SHA256] = {
            WEIGHTS: _write_tensors(tmp / WEIGHTS, weights),
            OPT_TENSORS: _write_tensors(tmp / OPT_TENSORS, extra),
        }
        _write_json(tmp / OPT_JSON, structure)
        _write_json(tmp / STATE, state_json)
        _write_json(tmp / META, meta_json)
        _fsync_dir(tmp)
        if dest.exists():
            os.rename(dest, _backup_of(dest))
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(_backup_of(dest), ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- reading
def _corrupt_fix(ckpt: Path, problem: str = "the checkpoint is corrupt") -> str:
    """The fix of a damaged checkpoint ``ckpt``: the *other* checkpoint of its run."""
    if ckpt.name == "last":
        return (
            f"{problem}; predict with the 'best' checkpoint beside it instead. To resume "
            f"training, delete {ckpt} and rerun with --resume (that stage starts over), or "
            "start the run again with --overwrite."
        )
    if ckpt.name == "best":
        return f"{problem}; use the 'last' checkpoint beside it instead, or retrain."
    return f"{problem}; use another checkpoint or retrain."


def _check_dir(path: Path, files: tuple[str, ...]) -> None:
    _recover(path)
    if not path.is_dir():
        raise CheckpointError(
            "checkpoint directory not found.",
            path=path,
            fix="give the path of a checkpoint directory (e.g. run/checkpoints/best).",
        )
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint is incomplete: {name} is missing.",
                path=path / name,
                fix=_corrupt_fix(path, "the checkpoint is incomplete"),
            )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint file ({exc}).",
            path=path,
            fix=_corrupt_fix(path.parent),
        ) from exc


def _read_tensors(path: Path, meta: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file; with ``meta``, first check its sha256 if meta records one."""
    digests = (meta or {}).get(SHA256)
    want = digests.get(path.name) if isinstance(digests, Mapping) else None
    try:
        if want is None:  # checkpoints written before digests were recorded
            return load_file(str(path), device="cpu")
        data = path.read_bytes()
        have = hashlib.sha256(data).hexdigest()
        if have != want:
            raise CheckpointError(
                f"{path.name} does not match the sha256 recorded in {META} (the file is "
                "damaged or was replaced).",
                path=path,
                fix=_corrupt_fix(path.parent),
            )
        return load(data)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(
            f"cannot read safetensors file ({exc}).",
            path=path,
            fix=_corrupt_fix(path.parent, "the checkpoint is corrupt or truncated"),
        ) from exc


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """Read and validate ``meta.json`` of the checkpoint at ``path`` (no tensors loaded).

    Raises:
        CheckpointError: missing directory/file, bad JSON, or an unsupported format version.
    """
    ckpt = Path(path)
    _check_dir(ckpt, (META,))
    meta = _read_json(ckpt / META)
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(
            "meta.json has no format_version; this is not a landmark3d checkpoint.",
            path=ckpt / META,
            fix="give a checkpoint directory written by landmark3d.",
        )
    version = meta["format_version"]
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"checkpoint format version {version!r} is not supported (this landmark3d reads "
            f"version {FORMAT_VERSION}).",
            path=ckpt / META,
            fix="upgrade landmark3d." if newer else "retrain with this landmark3d version.",
        )
    decoded: dict[str, Any] = _decode(meta, {}, ckpt / META)
    return decoded


def _describe_difference(key: str, want: Any, have: Any) -> str:
    if isinstance(want, list | tuple) and isinstance(have, list | tuple):
        missing = [x for x in want if x not in have]
        extra = [x for x in have if x not in want]
        if missing or extra:
            return f"{key}: checkpoint lacks {missing} and has extra {extra}"
        return f"{key}: same entries in a different order (checkpoint {list(have)})"
    return f"{key}: expected {want!r}, checkpoint has {have!r}"


def _check_expect(meta: Mapping[str, Any], expect: Mapping[str, Any], path: Path) -> None:
    diffs = []
    for key, want in expect.items():
        if key not in meta:
            diffs.append(f"{key}: not recorded in the checkpoint")
            continue
        have = meta[key]
        norm_want = list(want) if isinstance(want, tuple) else want
        norm_have = list(have) if isinstance(have, tuple) else have
        if norm_want != norm_have:
            diffs.append(_describe_difference(key, want, have))
    if diffs:
        raise CheckpointError(
            "checkpoint does not match: " + "; ".join(diffs) + ".",
            path=path,
            fix="use a checkpoint trained for this stage and landmark set (same names in the "
            "same order), or retrain.",
        )


def _load_models(
    models: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor], path: Path
) -> None:
    file = path / WEIGHTS
    for name, model in models.items():
        prefix = f"{name}."
        got = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if not got:
            raise CheckpointError(
                f"checkpoint has no weights for model {name!r}.",
                path=file,
                fix="load a checkpoint of the stage that contains this model.",
            )
        expected = model.state_dict()
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        if missing or extra:
            raise CheckpointError(
                f"weights of model {name!r} do not fit the network: missing {missing[:5]}, "
                f"unexpected {extra[:5]}.",
                path=file,
                fix="build the network with the architecture recorded in meta.json.",
            )
        for key, tensor in expected.items():
            if tuple(got[key].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{prefix}{key} has shape {tuple(got[key].shape)} in the checkpoint but "
                    f"the network expects {tuple(tensor.shape)}.",
                    path=file,
                    fix="build the network with the architecture recorded in meta.json.",
                )
        model.load_state_dict(got, strict=True)


def load_weights_only(
    path: str | Path, models: Mapping[str, nn.Module], expect: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load model weights (for inference); optimizer state is not read. Returns ``meta``.

    Raises:
        CheckpointError: missing/corrupt files, ``expect`` mismatch, or weights that do not fit.
    """
    ckpt = Path(path)
    _check_dir(ckpt, (WEIGHTS, META))
    meta = read_checkpoint_meta(ckpt)
    _check_expect(meta, expect or {}, ckpt / META)
    _load_models(models, _read_tensors(ckpt / WEIGHTS, meta), ckpt)
    return meta


def _load_stateful(
    kind: str,
    objs: Mapping[str, Any],
    structure: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    required: bool,
) -> None:
    saved = structure.get(kind, {})
    for name, obj in objs.items():
        if name not in saved:
            if not required:
                continue
            raise CheckpointError(
                f"checkpoint has no {kind} state named {name!r} (it has {sorted(saved)}).",
                path=path / OPT_JSON,
                fix="resume with the same stage and optimizer setup, or start a new run.",
            )
        try:
            obj.load_state_dict(_decode(saved[name], tensors, path / OPT_TENSORS))
        except CheckpointError:
            raise
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
            raise CheckpointError(
                f"{kind} state {name!r} does not fit ({exc}).",
                path=path / OPT_JSON,
                fix="resume with the same optimizer and scheduler settings, or start a new run.",
            ) from exc


def load_checkpoint(
    path: str | Path,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, Any] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    scalers: Mapping[str, Any] | None = None,
    expect: Mapping[str, Any] | None = None,
    restore_rng_state: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects.

    Args:
        path: checkpoint directory.
        models, optimizers, schedulers: loaded in place; each name must be in the checkpoint.
        scalers: GradScalers, loaded in place when the checkpoint has them (a run resumed
            from CPU onto CUDA starts with a fresh scaler).
        expect: entries that must equal ``meta`` (e.g. ``{"stage": "coarse",
            "landmark_names": [...]}``).
        restore_rng_state: restore the python/numpy/torch RNG states saved with it.

    Returns:
        ``(state, meta)``; ``state`` without its ``rng`` entry.

    Raises:
        CheckpointError: unsupported format, ``expect`` mismatch (naming what differs),
            missing/corrupt/truncated files, missing keys or shape mismatches.
    """
    ckpt = Path(path)
    _check_dir(ckpt, REQUIRED_FILES)
    meta = read_checkpoint_meta(ckpt)
    _check_expect(meta, expect or {}, ckpt / META)
    state = _read_json(ckpt / STATE)
    structure = _read_json(ckpt / OPT_JSON)
    if not isinstance(state, dict) or not isinstance(structure, dict):
        raise CheckpointError(
            "state.json / optimizer.json must hold JSON objects.",
            path=ckpt,
            fix=_corrupt_fix(ckpt),
        )
    weights = _read_tensors(ckpt / WEIGHTS, meta)
    extra = _read_tensors(ckpt / OPT_TENSORS, meta)
    _load_models(models, weights, ckpt)
    _load_stateful("optimizer", optimizers or {}, structure, extra, ckpt, True)
    _load_stateful("scheduler", schedulers or {}, structure, extra, ckpt, True)
    _load_stateful("scaler", scalers or {}, structure, extra, ckpt, False)
    rng = state.pop("rng", None)
    if restore_rng_state and rng is not None:
        try:
            restore_rng(rng, extra)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"RNG state in state.json is unusable ({exc}).",
                path=ckpt / STATE,
                fix=_corrupt_fix(ckpt),
            ) from exc
    decoded_state: dict[str, Any] = _decode(state, {}, ckpt / STATE)
    return decoded_state, meta
