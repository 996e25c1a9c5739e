"""One-stage baseline: a 3D U-Net regressing every landmark's heatmap on the whole volume.

The paper's "3D U-Net" row: the whole image, downsampled to one grid (as large as the memory
budget allows — by default the plan's coarse grid, 64³ in ``phantom_demo``), goes through a
U-Net with one output channel per landmark, trained against Gaussian heatmaps (σ in mm) with
the masked MSE of :func:`landmark3d.losses.heatmap_mse`; predictions are decoded with DARK on
that grid and mapped to world LPS mm. Input sampling and augmentation are exactly the coarse
stage's (:func:`landmark3d.data.preprocess.coarse_sample`: random translate/scale/rotate of the
sampling grid + intensity jitter), so the comparison isolates the method, not the data.

Run directory: the stage trains into ``RUN/onestage/`` (``metrics.csv``, ``train.log``,
``checkpoints/{best,last}``), next to the main method's stages when ``RUN`` is shared;
``RUN/plan.json`` and ``RUN/split.json`` are reused when present (same plan, same split) and
written otherwise. The checkpoint meta carries the plan and the baseline's settings, so
:class:`OneStagePredictor` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch

from landmark3d.config import ExperimentConfig
from landmark3d.data.dataset import Dataset
from landmark3d.data.preprocess import CaseCache, PreparedCase, coarse_sample, prepare_case
from landmark3d.engine.batching import batch_sizes, split_batches
from landmark3d.engine.checkpoint import (
    checkpoint_exists,
    load_weights_only,
    read_checkpoint_meta,
)
from landmark3d.engine.device import eval_forward, select_device
from landmark3d.engine.run import make_split
from landmark3d.engine.stages import _StageBase, make_optimizer, make_scheduler
from landmark3d.engine.trainer import AutocastFactory, TrainerConfig, TrainResult, fit
from landmark3d.errors import CheckpointError, ConfigError
from landmark3d.geometry.decode import decode_world
from landmark3d.geometry.heatmap import gaussian_heatmaps
from landmark3d.inference.predictor import Prediction
from landmark3d.io.atomic import atomic_write_text
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.losses import heatmap_mse
from landmark3d.networks.patch_unet import PatchUNet
from landmark3d.planning import Plan, make_plan

STAGE_NAME = "onestage"
SEED_OFFSET = 10  # the stage's seed is config.seed + 10 (the main stages use +0, +1, +2)


@dataclass(frozen=True)
class OneStageConfig:
    """Settings of the one-stage U-Net baseline.

    Attributes:
        grid: input grid (i, j, k) voxels over the whole image; None = the plan's coarse grid.
            Each edge must be a multiple of ``2 ** (len(channels) - 1)``.
        channels: U-Net feature channels per level.
        sigma_mm: Gaussian target σ in mm; None = 2 × the plan's largest coarse spacing (two
            grid voxels).
        epochs, batch_size, optimizer, lr, weight_decay, lr_schedule, val_every: as the
            coarse stage's settings of the same names.
        decode: ``"dark"`` (sub-voxel, as the paper) or ``"argmax"``.
    """

    grid: tuple[int, int, int] | None = None
    channels: tuple[int, ...] = (16, 32, 64, 128)
    sigma_mm: float | None = None
    epochs: int = 120
    batch_size: int = 2
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-8
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    val_every: int = 10
    decode: Literal["dark", "argmax"] = "dark"

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OneStageConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown one-stage setting(s) {unknown}.", fix=f"use {sorted(known)}."
            )
        kw = dict(d)
        for key in ("grid", "channels"):
            if kw.get(key) is not None:
                kw[key] = tuple(int(v) for v in kw[key])
        return cls(**kw)

    def resolved(self, plan: Plan) -> OneStageConfig:
        """A copy with ``grid`` and ``sigma_mm`` filled in from ``plan``; checks the grid."""
        grid = tuple(self.grid or plan.coarse_grid)
        sigma = self.sigma_mm or 2.0 * max(plan.coarse_spacing_mm)
        divisor = 2 ** (len(self.channels) - 1)
        if len(grid) != 3 or any(g < divisor or g % divisor for g in grid):
            raise ConfigError(
                f"one-stage grid {list(grid)} must be 3 multiples of {divisor} "
                f"(U-Net with {len(self.channels)} levels).",
                fix=f"choose e.g. grid [{4 * divisor}, {4 * divisor}, {4 * divisor}].",
            )
        if not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"one-stage sigma_mm must be > 0, got {sigma}.")
        return dataclasses.replace(self, grid=(grid[0], grid[1], grid[2]), sigma_mm=float(sigma))


def grid_plan(plan: Plan, cfg: OneStageConfig) -> Plan:
    """``plan`` with the baseline's grid as ``coarse_grid`` (what :func:`coarse_sample` uses)."""
    g = cfg.grid or plan.coarse_grid
    return dataclasses.replace(plan, coarse_grid=(int(g[0]), int(g[1]), int(g[2])))


@torch.no_grad()
def onestage_predict(
    model: torch.nn.Module,
    prepared: PreparedCase,
    plan: Plan,
    cfg: OneStageConfig,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """World LPS mm (N, 3) and raw heatmap peaks (N,) of one prepared case (no augmentation).

    ``plan`` is the run's plan; ``cfg`` must be :meth:`OneStageConfig.resolved`.
    """
    assert cfg.sigma_mm is not None
    image, _, geom = coarse_sample(prepared, grid_plan(plan, cfg))
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(image[None, None]).to(device)
        heat = eval_forward(model, x).float().cpu().numpy()[0]  # the predictor's CPU fast path
    finally:
        model.train(was_training)
    world, peaks = decode_world(heat, geom, cfg.sigma_mm, method=cfg.decode)
    return world, peaks


class OneStageStage(_StageBase):
    """The baseline as a :class:`landmark3d.engine.trainer.Stage` for :func:`fit`."""

    name = STAGE_NAME

    def __init__(
        self,
        dataset: Dataset,
        plan: Plan,
        config: ExperimentConfig,
        onestage: OneStageConfig,
        cache: CaseCache,
        train_ids: Sequence[str],
        val_ids: Sequence[str],
    ) -> None:
        super().__init__(dataset, plan, config, cache, train_ids, val_ids)
        self.onestage = onestage.resolved(plan)
        self.sample_plan = grid_plan(plan, self.onestage)
        n = len(plan.landmark_names)
        self.models = {"unet": PatchUNet(n, self.onestage.channels)}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "onestage": self.onestage.to_dict()}

    def make_optimizers(self, cfg: TrainerConfig) -> dict[str, torch.optim.Optimizer]:
        o = self.onestage
        params = self.models["unet"].parameters()
        return {"unet": make_optimizer(params, o.optimizer, o.lr, 0.9, o.weight_decay)}

    def make_schedulers(
        self, optimizers: dict[str, torch.optim.Optimizer], cfg: TrainerConfig
    ) -> dict[str, Any]:
        sched = make_scheduler(optimizers["unet"], self.onestage.lr_schedule, cfg.epochs)
        return {} if sched is None else {"unet": sched}

    def _batches(self, rng: np.random.Generator) -> list[list[str]]:
        order = [self.train_ids[i] for i in rng.permutation(len(self.train_ids))]
        return split_batches(order, self.onestage.batch_size)

    def batch_sizes(self) -> list[int]:
        """Sizes of an epoch's global training batches (every training case once)."""
        return batch_sizes(len(self.train_ids), self.onestage.batch_size)

    def n_batches(self, epoch: int) -> int | None:
        return len(self.batch_sizes())

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]:
        sigma = self.onestage.sigma_mm
        assert sigma is not None
        for ids in self._batches(rng):
            images, targets = [], []
            for cid in ids:
                prepared = self.case(cid)
                image, _, geom = coarse_sample(prepared, self.sample_plan, rng, self.config.augment)
                coords = prepared.landmarks.coords
                heat = gaussian_heatmaps(geom, coords, sigma)
                heat[np.isnan(coords).any(axis=1)] = np.nan  # missing landmark: masked
                images.append(image)
                targets.append(heat)
            # (B, 1, X, Y, Z) images, (B, N, X, Y, Z) heatmaps
            yield torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(targets))

    def train_step(
        self, batch: Any, device: torch.device, autocast_ctx: AutocastFactory
    ) -> torch.Tensor:
        x, target = (t.to(device) for t in batch)
        target = target * self.config.fine.heatmap_amplitude  # same target scale as the fine stage
        with autocast_ctx():
            pred = self.models["unet"](x)
        return heatmap_mse(pred.float(), target)

    def validate(self, device: torch.device) -> dict[str, float]:
        if not self.val_ids:
            return {}
        errors = []
        for cid in self.val_ids:
            prepared = self.case(cid)
            world, _ = onestage_predict(
                self.models["unet"], prepared, self.plan, self.onestage, device
            )
            errors.append(np.linalg.norm(world - prepared.landmarks.coords, axis=-1))
        return {"val_mre_mm": float(np.nanmean(np.stack(errors)))}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def train_onestage(
    dataset: Dataset,
    config: ExperimentConfig,
    run_dir: str | Path,
    fold: int | None = 0,
    onestage: OneStageConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.15,
) -> TrainResult:
    """Train the one-stage baseline into ``run_dir/onestage`` on the split of
    :func:`landmark3d.engine.run.train_run` (same seed, fold and validation subset).

    ``run_dir/plan.json`` is reused if present (e.g. a main-method run), else planned on the
    training + validation cases and written; the same for ``split.json``, which must agree.
    ``resume`` continues ``run_dir/onestage`` from its last checkpoint if it has one (and
    starts afresh otherwise).

    Raises:
        ConfigError: ``split.json`` in ``run_dir`` names another split.
        OutputExistsError / CheckpointError: from :func:`fit`.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    split = make_split(dataset, fold, config.seed, val_fraction)
    split_path = run / "split.json"
    if split_path.is_file():
        saved = json.loads(split_path.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in ("fold", "train", "val", "test")} != split.to_dict():
            raise ConfigError(
                "this run directory was made with another split (fold, seed or cases).",
                path=split_path,
                fix="use the same dataset, fold and seed, or another run directory.",
            )
    else:
        _write_json(split_path, {"dataset": str(dataset.source), **split.to_dict()})
    plan_path = run / "plan.json"
    if plan_path.is_file():
        plan = Plan.load(plan_path)
    else:
        plan = make_plan(dataset, config, split.train + split.val)
        plan.save(plan_path)
    cache = CaseCache(Path(cache_dir) if cache_dir else run / "cache", plan, keep_in_memory=True)
    cfg = onestage or OneStageConfig()
    seed = config.seed + SEED_OFFSET
    torch.manual_seed(seed)  # initial weights
    stage = OneStageStage(dataset, plan, config, cfg, cache, split.train, split.val)
    trainer = TrainerConfig(
        epochs=cfg.epochs,
        val_every=cfg.val_every,
        seed=seed,
        device=config.device,
        amp=config.amp,
        num_threads=config.num_threads,
    )
    out = run / STAGE_NAME
    resume = resume and checkpoint_exists(out / "checkpoints" / "last")
    return fit(stage, trainer, out, resume=resume, progress=progress, overwrite=overwrite)


class OneStagePredictor:
    """Predict with a trained one-stage baseline (``RUN/onestage/checkpoints/<checkpoint>``).

    Args:
        run_dir: the run directory given to :func:`train_onestage`.
        device: "auto", "cpu", "cuda".
        checkpoint: "best" or "last".
    """

    def __init__(self, run_dir: str | Path, device: str = "auto", checkpoint: str = "best"):
        self.run = Path(run_dir)
        path = self.run / STAGE_NAME / "checkpoints" / checkpoint
        if not path.is_dir():
            raise CheckpointError(
                f"no {checkpoint!r} checkpoint of the one-stage baseline.",
                path=path,
                fix="train it first (landmark3d.baselines.onestage.train_onestage).",
            )
        meta = read_checkpoint_meta(path)
        try:
            self.plan = Plan.from_dict(meta["plan"], source=path)
            self.onestage = OneStageConfig.from_dict(meta["onestage"]).resolved(self.plan)
        except KeyError as exc:
            raise CheckpointError(
                f"checkpoint meta lacks {exc}: not a one-stage baseline checkpoint.", path=path
            ) from None
        self.device = select_device(device)
        self.model = PatchUNet(len(self.plan.landmark_names), self.onestage.channels)
        load_weights_only(
            path, {"unet": self.model}, {"landmark_names": list(self.plan.landmark_names)}
        )
        self.model.to(self.device).eval()

    @property
    def landmark_names(self) -> list[str]:
        return list(self.plan.landmark_names)

    @torch.no_grad()
    def predict(self, image: sitk.Image) -> Prediction:
        """All landmarks of a 3D image (any storage orientation), world LPS mm."""
        t0 = time.perf_counter()
        prepared = prepare_case(image, None, self.plan)
        t1 = time.perf_counter()
        world, peaks = onestage_predict(self.model, prepared, self.plan, self.onestage, self.device)
        t2 = time.perf_counter()
        inside = prepared.canonical_geometry.contains_world(world)
        extras: dict[str, dict[str, float | str]] = {
            n: {"heatmap_peak": round(float(p), 4), "outside_image": 0 if ok else 1}
            for n, p, ok in zip(self.landmark_names, peaks, inside.tolist(), strict=True)
        }
        landmarks = LandmarkSet(self.landmark_names, world, extras=extras)
        return Prediction(landmarks, world.copy(), {"preprocess": t1 - t0, "onestage": t2 - t1})
