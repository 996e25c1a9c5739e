"""The networks of a trained run, described and written one by one for ``landmark3d export``.

This module knows *what* is exported (:mod:`landmark3d.inference.export` assembles the
directory): it loads every network of a run (coarse ResNet, fine U-Nets, correlated group
models) on the CPU in eval mode, describes each input and output (shape, dtype, meaning,
units) and the pre- and post-processing recipe for the manifest, writes a network as
TorchScript (``torch.jit.trace``) or ONNX (``torch.onnx.export(..., dynamo=True)``, opset
18), loads the written file back (``torch.jit.load`` / onnxruntime) and measures its parity
with PyTorch.

Every exported network takes one float32 tensor with a free batch dimension and a fixed
spatial size (the plan's coarse grid or patch size); the correlated model's dict output becomes
a tuple in the ``outputs`` order (heatmaps, slice profile).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from landmark3d.config import ExperimentConfig
from landmark3d.engine.checkpoint import SHA256, WEIGHTS, load_weights_only, read_checkpoint_meta
from landmark3d.engine.correlated_stage import build_group_models
from landmark3d.errors import CheckpointError, Landmark3dError
from landmark3d.inference.steps import group_axis
from landmark3d.networks.coarse import CoarseRegressor
from landmark3d.networks.patch_unet import build_fine_models, fine_model_routes
from landmark3d.planning import Plan

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
EXPORT_STAGES = ("coarse", "fine", "correlated")
PARITY_BATCHES = (1, 2)
"""Batch sizes of the random parity inputs (checks the free batch dimension too)."""
ONNX_OPSET = 18
ONNX_EXTRA_FIX = (
    "pip install 'landmark3d[export]' (onnx, onnxscript, onnxruntime), or use --format torchscript."
)
_INTENSITY = "normalised intensity (see preprocessing.intensity)"
_AXES = "ijk"


# ----------------------------------------------------------------------------- networks
@dataclass
class TensorSpec:
    """One input or output of an exported network (``"batch"`` marks the free dimension)."""

    name: str
    shape: list[int | str]
    meaning: str
    units: str
    dtype: str = "float32"


class _TupleOutputs(nn.Module):
    """A network returning a dict, made to return a tuple of ``keys`` (exportable)."""

    def __init__(self, net: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.keys = tuple(keys)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        return tuple(out[k] for k in self.keys)


@dataclass
class ExportNetwork:
    """A loaded network (CPU, eval mode) with its description for the manifest.

    Attributes:
        name: file stem, e.g. "coarse", "fine_chin", "correlated_group0".
        kind: "coarse", "fine" or "correlated".
        module: the module exported (dict outputs already turned into a tuple).
        landmarks: the landmarks it predicts, in output row/channel order.
        inputs, outputs: tensor descriptions (outputs in the module's return order).
        details: kind-specific facts (decoding, group axis, checkpoint digest, ...).
    """

    name: str
    kind: str
    module: nn.Module
    landmarks: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    details: dict[str, Any] = field(default_factory=dict)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        """The concrete input shape for ``batch`` samples."""
        return tuple(batch if s == "batch" else int(s) for s in self.inputs[0].shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "landmarks": list(self.landmarks),
            "inputs": [asdict(s) for s in self.inputs],
            "outputs": [asdict(s) for s in self.outputs],
            **self.details,
        }


def _patch_input(name: str, channels: int, plan: Plan, meaning: str) -> TensorSpec:
    return TensorSpec(name, ["batch", channels, *plan.patch_size], meaning, _INTENSITY)


def _heatmap_units(config: ExperimentConfig) -> str:
    f = config.fine
    return (
        f"arbitrary; trained against Gaussians of sigma {f.sigma_mm} mm with peak "
        f"{f.heatmap_amplitude} on the patch grid"
    )


def coarse_network(model: CoarseRegressor, plan: Plan, digest: str | None) -> ExportNetwork:
    """The coarse ResNet: coarse-grid volume (B, 1, *grid) -> (B, N, 3) normalised coords."""
    names = list(plan.landmark_names)
    image = TensorSpec(
        "image",
        ["batch", 1, *plan.coarse_grid],
        "the whole image (LPS, normalised) resampled onto the coarse grid covering it "
        "(preprocessing.coarse); array index order [i, j, k]",
        _INTENSITY,
    )
    coords = TensorSpec(
        "coords",
        ["batch", len(names), 3],
        "landmark positions, rows in `landmarks` order, as continuous indices along i, j, k "
        "of the coarse grid, grid-normalised (preprocessing.coarse.to_world)",
        "t = 2 * index / (grid - 1) - 1 (dimensionless; -1 / +1 = first / last voxel centre)",
    )
    return ExportNetwork(
        "coarse", "coarse", model, names, [image], [coords], {"weights_sha256": digest}
    )


def fine_networks(
    modules: Mapping[str, nn.Module],
    names: Sequence[str],
    config: ExperimentConfig,
    plan: Plan,
    digest: str | None,
) -> list[ExportNetwork]:
    """The fine U-Nets: patch (B, 1, *patch) -> heatmaps (B, C, *patch), one channel per
    landmark routed to the model (per_landmark: C = 1; shared: C = all fine landmarks)."""
    routes = fine_model_routes(names, config.fine.sharing)
    out = []
    for key, module in modules.items():
        mine = sorted((ch, n) for n, (k, ch) in routes.items() if k == key)
        lms = [n for _, n in mine]
        patch = _patch_input(
            "patch",
            1,
            plan,
            f"a patch of {list(plan.patch_size)} voxels at {list(plan.fine_spacing_mm)} mm "
            "centred on the landmark's coarse estimate (preprocessing.fine); index order "
            "[i, j, k]",
        )
        heat = TensorSpec(
            "heatmaps",
            ["batch", len(lms), *plan.patch_size],
            "one heatmap per landmark (channel c = landmarks[c]) on the patch grid; the "
            "landmark is at its peak (preprocessing.fine.decode)",
            _heatmap_units(config),
        )
        details = {"sharing": config.fine.sharing, "weights_sha256": digest}
        out.append(
            ExportNetwork(f"fine_{key}", "fine", module.eval(), lms, [patch], [heat], details)
        )
    return out


def correlated_network(
    model: nn.Module,
    index: int,
    group: Mapping[str, Any],
    config: ExperimentConfig,
    plan: Plan,
    digest: str | None,
) -> ExportNetwork:
    """A correlated group model: (B, L, *patch) -> heatmaps (B, L, *patch)[, profile (B, D)]."""
    lms = [str(n) for n in group["landmarks"]]
    axis = group_axis(group)
    patches = _patch_input(
        "patches",
        len(lms),
        plan,
        f"one patch per group member (channel = `landmarks` order), each as in "
        f"preprocessing.fine but with the members' centres first moved along index axis "
        f"{_AXES[axis]} onto their mean (the shared key slice)",
    )
    outputs = [
        TensorSpec(
            "heatmaps",
            ["batch", len(lms), *plan.patch_size],
            "one heatmap per member (channel = `landmarks` order) on its patch grid",
            _heatmap_units(config),
        )
    ]
    if getattr(model, "slice_head", None) is not None:
        outputs.append(
            TensorSpec(
                "slice_profile",
                ["batch", plan.patch_size[axis]],
                f"key-slice profile along patch axis {_AXES[axis]}; its peak (same decoding "
                "as the heatmaps, in 1D) is the key slice's patch index",
                "arbitrary; trained against a 1D Gaussian of the heatmap sigma",
            )
        )
    details = {
        "group": index,
        "axis": axis,
        "axis_name": _AXES[axis],
        "combine": config.correlated.combine,
        "weights_sha256": digest,
    }
    wrapped = _TupleOutputs(model, [o.name for o in outputs]).eval()
    return ExportNetwork(
        f"correlated_group{index}", "correlated", wrapped, lms, [patches], outputs, details
    )


def preprocessing_recipe(config: ExperimentConfig, plan: Plan) -> dict[str, Any]:
    """How inputs are made and outputs mapped back to world LPS mm (manifest section)."""
    f = config.fine
    return {
        "orientation": "reorient the image by axis permutations and flips only so that index "
        "axes i, j, k point to L, P, S (SimpleITK: DICOMOrient(image, 'LPS'))",
        "intensity": {
            **plan.intensity,
            "rule": "ct_window: clip to [low, high] HU and map linearly to [0, 1]; "
            "mr_zscore: clip to the image's own [low, high] percentiles, subtract the mean "
            "and divide by the SD of the clipped image",
            "padding": "0 for ct_window, the normalised image's minimum for mr_zscore",
        },
        "fine_image": {
            "spacing_mm": list(plan.fine_spacing_mm),
            "rule": "resample the normalised LPS image to this spacing over the same extent "
            "(linear); patches and the coarse input are sampled from it",
        },
        "coarse": {
            "grid": list(plan.coarse_grid),
            "rule": "a grid of `grid` voxels with the image's direction and centre and spacing "
            "= image extent (size * spacing) / grid; sample the fine image linearly at its "
            "voxel centres after a Gaussian low-pass of sigma 0.5 * sqrt(coarse_spacing^2 - "
            "fine_spacing^2) mm per axis",
            "to_world": "index = (t + 1) * (grid - 1) / 2 per axis; world = origin + direction "
            "@ (spacing * index) of the coarse grid",
        },
        "fine": {
            "patch_size": list(plan.patch_size),
            "spacing_mm": list(plan.fine_spacing_mm),
            "rule": "a grid of patch_size voxels at spacing_mm, direction of the LPS image, "
            "whose continuous index (patch_size - 1) / 2 lies on the centre point; sample the "
            "fine image linearly",
            "decode": f.decode,
            "decode_rule": "dark: smooth the heatmap with a Gaussian of sigma_mm, take its log "
            "and refine the integer peak by one Newton step (argmax: the integer peak)",
            "sigma_mm": f.sigma_mm,
            "to_world": "world = origin + direction @ (spacing * index) of the patch grid",
        },
        "correlated": {
            "combine": config.correlated.combine,
            "rule": "centres of a group's members = their coarse estimates moved along the "
            "group axis onto their mean slice; 'slice' puts every member's index along the "
            "axis at the decoded key slice, 'heatmap' keeps the heatmap peaks, 'mean' "
            "averages the members' peaks along the axis with the key slice",
        },
    }


# ----------------------------------------------------------------------------- loading
def load_run_networks(
    run: str | Path, checkpoint: str = "best", stages: Sequence[str] | None = None
) -> tuple[ExperimentConfig, Plan, list[ExportNetwork]]:
    """Build and load (CPU, eval mode) every network of a run directory.

    Args:
        run: the ``--out`` directory of ``landmark3d train`` (not a zip).
        checkpoint: "best" or "last".
        stages: subset of coarse / fine / correlated, each of which must have been trained;
            None = every stage the run has (coarse always; fine and correlated if trained).

    Returns:
        ``(config, plan, networks)``, networks in the order coarse, fine, correlated.

    Raises:
        CheckpointError: not a run, unknown stage, a missing checkpoint, bad weights.
    """
    root = Path(run)
    for name in ("config.json", "plan.json"):
        if not (root / name).is_file():
            raise CheckpointError(
                f"{name} not found: this is not a landmark3d run directory.",
                path=root,
                fix="pass the --out directory of `landmark3d train` or a model.zip.",
            )
    unknown = [s for s in stages or [] if s not in EXPORT_STAGES]
    if unknown or (stages is not None and not stages):
        raise CheckpointError(
            f"unknown or no stage(s) to export: {unknown or list(stages or [])}.",
            fix=f"choose from {', '.join(EXPORT_STAGES)}.",
        )
    config = ExperimentConfig.from_json(root / "config.json")
    plan = Plan.load(root / "plan.json")
    ckpt = {s: root / s / "checkpoints" / checkpoint for s in EXPORT_STAGES}
    trained = [s for s in EXPORT_STAGES if ckpt[s].is_dir()]
    if not plan.correlated_groups and "correlated" in trained:
        trained.remove("correlated")
    wanted = list(EXPORT_STAGES) if stages is None else list(stages)
    missing = [s for s in wanted if s not in trained and (stages is not None or s == "coarse")]
    if missing:
        raise CheckpointError(
            f"the run has no {checkpoint!r} checkpoint of the {', '.join(missing)} stage(s).",
            path=ckpt[missing[0]],
            fix=f"train it first (landmark3d train ... --out {root}), or choose other "
            "stages with --stage.",
        )
    names = list(plan.landmark_names)
    expect = {"landmark_names": names}
    nets: list[ExportNetwork] = []
    if "coarse" in wanted:
        coarse = CoarseRegressor(len(names), config.coarse.widths, config.coarse.layers)
        meta = load_weights_only(ckpt["coarse"], {"coarse": coarse}, expect)
        nets.append(coarse_network(coarse.eval(), plan, _weights_digest(meta)))
    if "fine" in wanted and "fine" in trained:
        fine_names = list(read_checkpoint_meta(ckpt["fine"]).get("fine_landmarks", names))
        modules = dict(build_fine_models(fine_names, config.fine.sharing, config.fine.channels))
        meta = load_weights_only(ckpt["fine"], modules, expect)
        nets += fine_networks(modules, fine_names, config, plan, _weights_digest(meta))
    if "correlated" in wanted and "correlated" in trained:
        groups = [dict(g) for g in plan.correlated_groups]
        models = build_group_models(groups, config.correlated)
        meta = load_weights_only(ckpt["correlated"], dict(models), expect)
        for g, group in enumerate(groups):
            model = models[f"group{g}"].eval()
            nets.append(correlated_network(model, g, group, config, plan, _weights_digest(meta)))
    return config, plan, nets


def _weights_digest(meta: Mapping[str, Any]) -> str | None:
    digests = meta.get(SHA256)
    value = digests.get(WEIGHTS) if isinstance(digests, Mapping) else None
    return None if value is None else str(value)


# ----------------------------------------------------------------------------- formats
def check_format_available(fmt: str, check: bool = True) -> None:
    """Raise a clear :class:`Landmark3dError` if ``fmt`` cannot be written here.

    ONNX needs onnx and onnxscript (export) and onnxruntime (parity ``check``), and a torch
    whose ``torch.onnx.export`` has the ``dynamo`` exporter.
    """
    if fmt not in FORMATS:
        raise Landmark3dError(
            f"unknown export format {fmt!r}.", fix=f"use one of: {', '.join(FORMATS)}."
        )
    if fmt != "onnx":
        return
    need = ("onnx", "onnxscript", "onnxruntime") if check else ("onnx", "onnxscript")
    missing = [p for p in need if importlib.util.find_spec(p) is None]
    if missing:
        raise Landmark3dError(
            f"--format onnx needs the optional package(s) {', '.join(missing)}, which are not "
            "installed.",
            fix=ONNX_EXTRA_FIX,
        )

    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise Landmark3dError(
            f"torch {torch.__version__} has no torch.export-based ONNX exporter.",
            fix="upgrade torch (2.6 or later), or use --format torchscript.",
        )


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Raise logger ``name`` (and children without their own level) to ERROR meanwhile: the
    ONNX exporter logs a warning per torchvision operator when torchvision is absent."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_network(net: ExportNetwork, path: Path, fmt: str) -> None:
    """Write ``net`` as TorchScript (traced) or ONNX (dynamo exporter, free batch dim).

    Raises:
        Landmark3dError: the exporter failed (the message names the network and why).
    """
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TracerWarning (shape checks in forward become constants: the spatial size is
            # fixed anyway) and torch 2.13's deprecation notice of torch.jit
            warnings.simplefilter("ignore")
            if fmt == "torchscript":
                example = torch.zeros(net.input_shape(1))
                traced = torch.jit.trace(net.module, example, check_trace=False)
                torch.jit.save(traced, str(path))
            else:
                # batch 2: torch.export would specialise a dimension of size 1
                example = torch.zeros(net.input_shape(2))
                batch = torch.export.Dim("batch", min=1)
                with contextlib.redirect_stdout(io.StringIO()), _quiet_logger("torch.onnx"):
                    torch.onnx.export(
                        net.module,
                        (example,),
                        str(path),
                        dynamo=True,
                        input_names=[s.name for s in net.inputs],
                        output_names=[s.name for s in net.outputs],
                        dynamic_shapes=({0: batch},),
                        opset_version=ONNX_OPSET,
                        external_data=False,
                    )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise Landmark3dError(
            f"exporting {net.name} as {fmt} failed: {type(exc).__name__}: {first}",
            path=path.name,
            fix="try the other --format; rerun with --debug and report it.",
        ) from exc
    if not path.is_file():
        raise Landmark3dError(f"the {fmt} exporter wrote no file for {net.name}.", fix="report it.")


Runner = Callable[[np.ndarray], list[np.ndarray]]


def load_exported(path: str | Path, fmt: str) -> Runner:
    """A function running an exported file: float32 input array -> list of output arrays."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        module.eval()

        def run_ts(x: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                out = module(torch.from_numpy(x))
            return [t.numpy() for t in (out if isinstance(out, tuple | list) else (out,))]

        return run_ts
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run_onnx(x: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(o) for o in session.run(None, {name: x})]

    return run_onnx


def parity_check(net: ExportNetwork, path: Path, fmt: str, seed: int = 0) -> float:
    """Max |exported - PyTorch| of ``net`` saved at ``path`` over random N(0, 1) float32
    inputs of batch sizes :data:`PARITY_BATCHES`.

    Raises:
        Landmark3dError: the file returns another number or shape of outputs.
    """
    runner = load_exported(path, fmt)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in PARITY_BATCHES:
        x = rng.standard_normal(net.input_shape(batch)).astype(np.float32)
        with torch.no_grad():
            ref = net.module(torch.from_numpy(x))
        want = [t.numpy() for t in (ref if isinstance(ref, tuple | list) else (ref,))]
        got = runner(x)
        if [w.shape for w in want] != [g.shape for g in got]:
            raise Landmark3dError(
                f"the exported {net.name} returns shapes {[g.shape for g in got]}, PyTorch "
                f"{[w.shape for w in want]} (batch {batch}).",
                path=path.name,
                fix="try the other --format; rerun with --debug and report it.",
            )
        for w, g in zip(want, got, strict=True):
            worst = max(worst, float(np.max(np.abs(w.astype(np.float64) - g))))
    return worst
