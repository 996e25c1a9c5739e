"""The importable predictor: image in, world (LPS mm) landmarks out.

``Predictor(run_dir)`` loads a trained run (``config.json``, ``plan.json``, the ``best``
checkpoints of the coarse and fine stages — safetensors, never unpickled) and maps a 3D image
of any storage orientation to landmark coordinates::

    image ──canonical LPS, normalise, fine spacing──▶ prepared case
          ──coarse grid──▶ ResNet ──▶ coarse world coords
          ──patch per landmark at the coarse estimate──▶ U-Net heatmap ──DARK──▶ world mm

Everything after loading happens in world coordinates, so the same anatomy stored with
flipped or permuted axes or another direction matrix gives the same prediction. A landmark
predicted outside the image is kept but flagged (``extras["outside_image"] = 1``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
import torch

from landmark3d.config import ExperimentConfig
from landmark3d.data.preprocess import prepare_case
from landmark3d.engine.checkpoint import load_weights_only, read_checkpoint_meta
from landmark3d.engine.device import select_device
from landmark3d.errors import CheckpointError
from landmark3d.inference.steps import coarse_predict, fine_predict
from landmark3d.io.images import read_image
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.networks.coarse import CoarseRegressor
from landmark3d.networks.patch_unet import build_fine_models, fine_model_routes
from landmark3d.planning import Plan

Stage = Literal["coarse", "fine"]


@dataclass
class Prediction:
    """One image's prediction.

    Attributes:
        landmarks: LPS mm; extras per landmark: ``coarse_x/y/z`` is not stored, but
            ``heatmap_peak`` (fine), ``coarse_fine_shift_mm`` and ``outside_image``.
        coarse: (N, 3) coarse estimates, LPS mm.
        timings: seconds per step (load, preprocess, coarse, fine).
    """

    landmarks: LandmarkSet
    coarse: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def _checkpoint(run: Path, stage: str, which: str) -> Path:
    path = run / stage / "checkpoints" / which
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
        run_dir: the ``--out`` directory of ``landmark3d train``.
        device: "auto" (CUDA when present), "cpu", "cuda".
        checkpoint: "best" (selected on the validation cases) or "last".
        stage: "fine" (coarse + fine) or "coarse" (coarse only).
    """

    def __init__(
        self,
        run_dir: str | Path,
        device: str = "auto",
        checkpoint: str = "best",
        stage: Stage = "fine",
    ) -> None:
        self.run = Path(run_dir)
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
        self.stage: Stage = stage
        names = list(self.plan.landmark_names)
        expect = {"landmark_names": names}
        c = self.config.coarse
        self.coarse = CoarseRegressor(len(names), c.widths, c.layers)
        meta = load_weights_only(
            _checkpoint(self.run, "coarse", checkpoint), {"coarse": self.coarse}, expect
        )
        self.coarse.to(self.device).eval()
        self.fine: dict[str, torch.nn.Module] = {}
        self.fine_names: list[str] = []
        self.routes: dict[str, tuple[str, int]] = {}
        if stage == "fine":
            fine_ckpt = _checkpoint(self.run, "fine", checkpoint)
            fmeta = read_checkpoint_meta(fine_ckpt)
            self.fine_names = list(fmeta.get("fine_landmarks", names))
            f = self.config.fine
            modules = build_fine_models(self.fine_names, f.sharing, f.channels)
            load_weights_only(fine_ckpt, dict(modules.items()), expect)
            self.fine = {k: m.to(self.device).eval() for k, m in modules.items()}
            self.routes = fine_model_routes(self.fine_names, f.sharing)
        self.meta = meta

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
        if self.stage == "fine" and self.fine_names:
            rows = [self.landmark_names.index(n) for n in self.fine_names]
            f = self.config.fine
            fine, peaks = fine_predict(
                self.fine,
                self.routes,
                self.fine_names,
                prepared,
                coarse[rows],
                self.plan,
                f.sigma_mm,
                f.decode,
                self.device,
            )
            for r, name, p, peak in zip(rows, self.fine_names, fine, peaks, strict=True):
                if np.isfinite(p).all():
                    coords[r] = p
                    extras[name]["heatmap_peak"] = round(float(peak), 4)
                    extras[name]["coarse_fine_shift_mm"] = round(
                        float(np.linalg.norm(p - coarse[r])), 3
                    )
        t3 = time.perf_counter()
        inside = prepared.canonical_geometry.contains_world(coords)
        for name, ok in zip(self.landmark_names, inside.tolist(), strict=True):
            extras[name]["outside_image"] = 0 if ok else 1
        landmarks = LandmarkSet(list(self.landmark_names), coords, extras=extras)
        return Prediction(
            landmarks,
            coarse,
            {"preprocess": t1 - t0, "coarse": t2 - t1, "fine": t3 - t2},
        )
