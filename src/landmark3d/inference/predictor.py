"""The importable predictor: image in, world (LPS mm) landmarks out.

``Predictor(run_dir)`` loads a trained run (``config.json``, ``plan.json``, the ``best``
checkpoints of the coarse and fine stages — safetensors, never unpickled) and maps a 3D image
of any storage orientation to landmark coordinates::

    image ──canonical LPS, normalise, fine spacing──▶ prepared case
          ──coarse grid──▶ ResNet ──▶ coarse world coords
          ──patch per landmark at the coarse estimate──▶ U-Net heatmap ──DARK──▶ world mm

Everything after loading happens in world coordinates, so the same anatomy stored with
flipped or permuted axes or another direction matrix gives the same prediction. A landmark
predicted outside the image is kept but flagged (``extras["outside_image"] = 1``) — unless the
absence decision is on (see :mod:`landmark3d.inference.confidence`): then a landmark predicted
beyond the image by more than the calibrated margin is reported missing ("outside field of
view"). With ``RUN/calibration.json`` every landmark also gets ``confidence``,
``expected_error_mm`` and ``p_error_gt_4mm`` extras.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch

from landmark3d.config import ExperimentConfig
from landmark3d.data.preprocess import PreparedCase, prepare_case
from landmark3d.engine.checkpoint import load_weights_only, read_checkpoint_meta
from landmark3d.engine.correlated_stage import build_group_models
from landmark3d.engine.device import select_device
from landmark3d.errors import CheckpointError, ConfigError
from landmark3d.geometry.space import Geometry
from landmark3d.inference.calibration import TTA_KEY
from landmark3d.inference.confidence import (
    DEFAULT_ABSENCE_MARGIN_MM,
    HeatmapCapture,
    annotate_prediction,
    flat_heatmap_spread_mm,
    heatmap_spread_mm,
    load_calibration,
    tta_offsets,
    tta_spread,
)
from landmark3d.inference.steps import (
    DEFAULT_PATCH_BATCH,
    coarse_predict,
    correlated_predict,
    correlated_predict_many,
    fine_predict,
)
from landmark3d.io.images import read_image
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.networks.coarse import CoarseRegressor
from landmark3d.networks.patch_unet import build_fine_models, fine_model_routes
from landmark3d.packaging import extract_model_archive, is_model_archive
from landmark3d.planning import Plan

Stage = Literal["auto", "coarse", "fine", "correlated"]


@dataclass
class Prediction:
    """One image's prediction.

    Attributes:
        landmarks: LPS mm; extras per landmark: ``coarse_x/y/z`` is not stored, but
            ``heatmap_peak``, ``heatmap_spread_mm`` (fine), ``coarse_fine_shift_mm``,
            ``tta_spread_mm`` (with TTA), ``outside_image``, ``beyond_image_mm`` and, with a
            calibration, ``confidence``, ``expected_error_mm``, ``p_error_gt_4mm``.
        coarse: (N, 3) coarse estimates, LPS mm.
        timings: seconds per step (load, preprocess, coarse, fine, confidence).
        geometry: the image's geometry (LPS-reoriented; the same physical extent).
    """

    landmarks: LandmarkSet
    coarse: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    geometry: Geometry | None = None


def _checkpoint(run: Path, stage: str, which: str, archive: Path | None = None) -> Path:
    """The ``which`` checkpoint directory of ``stage``; names ``archive`` (not the temporary
    directory it was unpacked into) when the run came from a model archive."""
    path = run / stage / "checkpoints" / which
    if not path.is_dir() and archive is not None:
        only_best = " (archives hold only 'best' checkpoints)" if which != "best" else ""
        raise CheckpointError(
            f"the model archive has no {which!r} checkpoint of the {stage} stage{only_best}.",
            path=archive,
            fix="load its 'best' checkpoint."
            if which != "best"
            else f"predict with a stage the archive holds (--stage), or package a run whose "
            f"{stage} stage is trained: landmark3d package RUN --out {archive.name}",
        )
    if not path.is_dir():
        raise CheckpointError(
            f"no {which!r} checkpoint of the {stage} stage.",
            path=path,
            fix=f"train it first: landmark3d train ... --out {run}",
        )
    return path


class Predictor:
    """Landmark prediction with a trained run.

    Args:
        run_dir: the ``--out`` directory of ``landmark3d train``, or a model archive
            (``model.zip`` of ``landmark3d package``), unpacked into a temporary directory
            that lives as long as the predictor (only its 'best' checkpoints are inside).
        device: "auto" (CUDA when present), "cpu", "cuda".
        checkpoint: "best" (selected on the validation cases) or "last".
        stage: "coarse" (coarse only), "fine" (coarse + independent fine U-Nets for every
            landmark), "correlated" (as "fine", but the members of each correlated group come
            from the group's key-slice model), or "auto" (default): "correlated" when the run
            has a correlated model, else "fine".
        tta: also compute ``tta_spread_mm`` (the fine stage rerun from 4 shifted patch
            centres: ~5x the fine cost); None: when the calibration used (fitted for this
            stage) scores the TTA spread, else off. A
            calibration fitted with TTA scores predictions made without it with its TTA-free
            refit (``Calibration.without_tta``).
        calibrated: use ``RUN/calibration.json`` (if present and fitted for this stage).
        absence: report landmarks predicted beyond the image, or whose fine heatmap is flat
            (no peak: "not found"), as missing; None: as the calibration says (on when the
            run was trained on cropped scans), else off.
        patch_batch: fine patches per forward pass and in memory at once (>= 1; see
            :func:`landmark3d.inference.steps.fine_predict`): bounds the memory whatever the
            number of landmarks; the predictions do not depend on it. With TTA a landmark's
            4 shifted patches go through together, so at least 4 are (and a correlated
            group's 4 shifted patch sets); on a CPU, a single patch runs as a pair
            (:func:`landmark3d.engine.device.eval_forward`). Settable later as the
            ``patch_batch`` attribute.
    """

    def __init__(
        self,
        run_dir: str | Path,
        device: str = "auto",
        checkpoint: str = "best",
        stage: Stage = "auto",
        tta: bool | None = None,
        calibrated: bool = True,
        absence: bool | None = None,
        patch_batch: int = DEFAULT_PATCH_BATCH,
    ) -> None:
        if isinstance(patch_batch, bool) or not isinstance(patch_batch, int) or patch_batch < 1:
            raise ConfigError(
                f"the patch batch must be a positive integer, got {patch_batch!r}.",
                fix=f"use e.g. --patch-batch {DEFAULT_PATCH_BATCH}.",
            )
        self.patch_batch = patch_batch
        self.run = Path(run_dir)
        self.archive: Path | None = None
        if is_model_archive(self.run):  # a `landmark3d package` zip: checked, then unpacked
            self.archive = self.run
            self._unpacked = tempfile.TemporaryDirectory(prefix="landmark3d-model-")
            self.run = extract_model_archive(self.archive, self._unpacked.name)
        for name in ("config.json", "plan.json"):
            if not (self.run / name).is_file():
                raise CheckpointError(
                    f"{name} not found: this is not a landmark3d run directory.",
                    path=self.run,
                    fix="pass the --out directory of `landmark3d train`.",
                )
        self.config = ExperimentConfig.from_json(self.run / "config.json")
        self.plan = Plan.load(self.run / "plan.json")
        self.device = select_device(device)
        if stage == "auto":
            has_groups = (self.run / "correlated" / "checkpoints" / checkpoint).is_dir()
            stage = "correlated" if has_groups and self.plan.correlated_groups else "fine"
        self.stage: Stage = stage
        names = list(self.plan.landmark_names)
        expect = {"landmark_names": names}
        c = self.config.coarse
        self.coarse = CoarseRegressor(len(names), c.widths, c.layers)
        self.checkpoint = checkpoint
        self.checkpoints: dict[str, Path] = {}  # stage -> the checkpoint directory loaded
        self.checkpoints["coarse"] = _checkpoint(self.run, "coarse", checkpoint, self.archive)
        meta = load_weights_only(self.checkpoints["coarse"], {"coarse": self.coarse}, expect)
        self.coarse.to(self.device).eval()
        self.fine: dict[str, torch.nn.Module] = {}
        self.fine_names: list[str] = []
        self.routes: dict[str, tuple[str, int]] = {}
        if stage in ("fine", "correlated"):
            fine_ckpt = _checkpoint(self.run, "fine", checkpoint, self.archive)
            self.checkpoints["fine"] = fine_ckpt
            fmeta = read_checkpoint_meta(fine_ckpt)
            self.fine_names = list(fmeta.get("fine_landmarks", names))
            f = self.config.fine
            modules = build_fine_models(self.fine_names, f.sharing, f.channels)
            load_weights_only(fine_ckpt, dict(modules.items()), expect)
            self.fine = {k: m.to(self.device).eval() for k, m in modules.items()}
            self.routes = fine_model_routes(self.fine_names, f.sharing)
        self.groups: list[dict[str, Any]] = []
        self.group_models: dict[str, torch.nn.Module] = {}
        if stage == "correlated":
            self.groups = [dict(g) for g in self.plan.correlated_groups]
            models = build_group_models(self.groups, self.config.correlated)
            ckpt = _checkpoint(self.run, "correlated", checkpoint, self.archive)
            self.checkpoints["correlated"] = ckpt
            load_weights_only(ckpt, dict(models), expect)
            self.group_models = {k: m.to(self.device).eval() for k, m in models.items()}
        self.meta = meta
        cal = load_calibration(self.run) if calibrated else None
        fitted = cal if cal is not None and cal.stage == stage else None
        # by default TTA runs only when the calibration in use scores its spread: it costs
        # several fine passes, which are wasted on a stage the calibration was not fitted for
        uses_tta = fitted is not None and TTA_KEY in fitted.keys
        self.tta = bool(tta if tta is not None else uses_tta)
        self.calibration = fitted.for_prediction(self.tta) if fitted is not None else None
        self.absence = bool(absence if absence is not None else (cal and cal.absence_enabled))
        self.absence_margin_mm = cal.absence_margin_mm if cal else DEFAULT_ABSENCE_MARGIN_MM
        self.flat_spread_mm = (  # a fine heatmap this wide has no peak: "not found"
            flat_heatmap_spread_mm(self.plan.patch_size, self.plan.fine_spacing_mm)
            if stage != "coarse"
            else None
        )

    @property
    def landmark_names(self) -> list[str]:
        return list(self.plan.landmark_names)

    def predict_file(self, path: str | Path) -> Prediction:
        """Read an image (file or DICOM directory) and predict."""
        t0 = time.perf_counter()
        image = read_image(path)
        loaded = time.perf_counter() - t0
        pred = self.predict(image)
        pred.timings = {"load": loaded, **pred.timings}
        return pred

    @torch.no_grad()
    def predict(self, image: sitk.Image) -> Prediction:
        """Predict all landmarks of a 3D image (any storage orientation)."""
        t0 = time.perf_counter()
        prepared = prepare_case(image, None, self.plan)
        t1 = time.perf_counter()
        coarse = coarse_predict(self.coarse, [prepared], self.plan, self.device)[0]
        t2 = time.perf_counter()
        coords = coarse.copy()
        extras: dict[str, dict[str, float | str]] = {n: {} for n in self.landmark_names}
        for names, world, peaks, spreads, model in self._refine(prepared, coarse, capture=True):
            for name, p, peak, spread in zip(names, world, peaks, spreads, strict=True):
                if np.isfinite(p).all():
                    r = self.landmark_names.index(name)
                    coords[r] = p
                    extras[name]["heatmap_peak"] = round(float(peak), 4)
                    if np.isfinite(spread):
                        extras[name]["heatmap_spread_mm"] = round(float(spread), 3)
                    extras[name]["coarse_fine_shift_mm"] = round(
                        float(np.linalg.norm(p - coarse[r])), 3
                    )
                    extras[name]["model"] = model
        t3 = time.perf_counter()
        if self.tta and (self.fine_names or self.groups):
            offsets = tta_offsets(self.plan.patch_size, self.plan.fine_spacing_mm)
            spread = tta_spread(
                lambda cs: self._refined_many(prepared, cs), coarse, coords, offsets
            )
            for name, s in zip(self.landmark_names, spread.tolist(), strict=True):
                if np.isfinite(s):
                    extras[name]["tta_spread_mm"] = round(float(s), 3)
        inside = prepared.canonical_geometry.contains_world(coords)
        for name, ok in zip(self.landmark_names, inside.tolist(), strict=True):
            extras[name]["outside_image"] = 0 if ok else 1
        landmarks = annotate_prediction(
            LandmarkSet(list(self.landmark_names), coords, extras=extras),
            coarse, prepared.canonical_geometry, self.calibration, self.absence,
            self.absence_margin_mm, self.flat_spread_mm,
        )  # fmt: skip
        t4 = time.perf_counter()
        return Prediction(
            landmarks,
            coarse,
            {"preprocess": t1 - t0, "coarse": t2 - t1, "fine": t3 - t2, "confidence": t4 - t3},
            prepared.canonical_geometry,
        )

    def _refine(
        self, prepared: PreparedCase, centers: np.ndarray, capture: bool = False
    ) -> list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray, str]]:
        """Fine and correlated estimates from patch centres (N, 3) LPS mm, one entry per model
        kind: ``(names, world (L, 3), peaks (L,), heatmap spreads (L,) mm, model)``; later
        entries (correlated groups) override earlier ones (fine). Spreads are NaN unless
        ``capture``."""
        f = self.config.fine
        spacing = self.plan.fine_spacing_mm
        out = []
        if self.fine_names:
            rows = [self.landmark_names.index(n) for n in self.fine_names]
            spreads = np.full(len(rows), np.nan)

            def spread(row: int, heat: np.ndarray) -> None:
                spreads[row] = heatmap_spread_mm(heat, spacing)

            fine, peaks = fine_predict(
                self.fine, self.routes, self.fine_names, prepared, centers[rows], self.plan,
                f.sigma_mm, f.decode, self.device, self.patch_batch, spread if capture else None,
            )  # fmt: skip
            out.append((self.fine_names, fine, peaks, spreads, "fine"))
        for g, group in enumerate(self.groups):
            key = f"group{g}"
            rows = [self.landmark_names.index(n) for n in group["landmarks"]]
            with HeatmapCapture({key: self.group_models[key]}, capture) as cap:
                gp = correlated_predict(
                    self.group_models[key], group, prepared, centers[rows], self.plan,
                    f.sigma_mm, f.decode, self.config.correlated.combine, self.device,
                )  # fmt: skip
            spreads = cap.group_spreads(key, len(rows), spacing)
            out.append((list(group["landmarks"]), gp.world, gp.peaks, spreads, f"correlated:{key}"))
        return out

    def _refined_many(
        self, prepared: PreparedCase, center_sets: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Refined positions (N, 3) LPS mm for each of K sets of patch centres (N, 3), NaN rows
        for landmarks no fine/correlated model refines (test-time augmentation).

        All K sets go through each network together: the fine patches landmark by landmark,
        in chunks of ``max(patch_batch, K)``, each correlated group as one batch of K —
        several times faster on a CPU than K separate passes.
        """
        k, n = len(center_sets), len(self.landmark_names)
        out = [np.full((n, 3), np.nan) for _ in range(k)]
        f = self.config.fine
        grouped = {name for group in self.groups for name in group["landmarks"]}
        fine_names = [name for name in self.fine_names if name not in grouped]  # else overridden
        if fine_names:
            rows = [self.landmark_names.index(name) for name in fine_names]
            names = [name for name in fine_names for _ in range(k)]
            centers = np.stack([c[r] for r in rows for c in center_sets])
            fine, _ = fine_predict(
                self.fine, self.routes, names, prepared, centers, self.plan, f.sigma_mm,
                f.decode, self.device, max(self.patch_batch, k),
            )  # fmt: skip
            for i, r in enumerate(rows):
                for j in range(k):
                    out[j][r] = fine[i * k + j]
        for g, group in enumerate(self.groups):
            rows = [self.landmark_names.index(name) for name in group["landmarks"]]
            gps = correlated_predict_many(
                self.group_models[f"group{g}"], group, prepared, [c[rows] for c in center_sets],
                self.plan, f.sigma_mm, f.decode, self.config.correlated.combine, self.device,
            )  # fmt: skip
            for j, gp in enumerate(gps):
                for r, position in zip(rows, gp.world, strict=True):
                    if np.isfinite(position).all():
                        out[j][r] = position
        return out
