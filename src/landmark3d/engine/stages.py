"""The coarse and fine training stages plugged into :func:`landmark3d.engine.trainer.fit`.

* :class:`CoarseStage` — the 3D ResNet regressing all N landmarks (3·N normalised
  coordinates, masked L1) from the whole volume on the plan's coarse grid, with augmentation
  by a randomly perturbed sampling grid (image and points move together).
* :class:`FineStage` — heatmap U-Nets on patches centred on the truth plus Gaussian jitter
  (σ = ``jitter_fraction`` × patch edge; paper: edge / 6), Gaussian targets (σ in mm), MSE.
  ``per_landmark``: one U-Net per landmark, each trained on its own landmark's patches.
  ``shared``: one U-Net with one output channel per landmark; every patch is supervised on
  *all* channels (each landmark's Gaussian in that patch's frame, which is simply absent
  (≈0) for landmarks outside it), so the shared net also learns to tell landmarks apart.

Validation metrics are in world millimetres (``val_mre_mm``). Fine-stage validation centres
each patch on the truth plus a fixed, seeded jitter of the same σ as training, so the number
measures the fine model alone, independent of the coarse model's quality.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from landmark3d.config import CoarseConfig, CorrelatedConfig, ExperimentConfig, FineConfig
from landmark3d.data.dataset import Dataset
from landmark3d.data.preprocess import (
    CaseCache,
    PreparedCase,
    centre_jitter_sd,
    coarse_sample,
    fine_training_sample,
)
from landmark3d.engine.batching import batch_sizes, split_batches
from landmark3d.engine.trainer import AutocastFactory, TrainerConfig
from landmark3d.geometry.heatmap import gaussian_heatmaps
from landmark3d.inference.steps import coarse_predict, fine_predict
from landmark3d.losses import heatmap_mse, masked_l1
from landmark3d.networks.coarse import CoarseRegressor
from landmark3d.networks.patch_unet import build_fine_models, fine_model_routes
from landmark3d.planning import Plan

VALIDATION_SEED = 12345


def make_optimizer(
    params: Iterable[nn.Parameter], name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD (paper), Adam or AdamW over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Cosine annealing over ``epochs`` (stepped per epoch), or None for a constant lr."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return None


def _epoch_order(ids: Sequence[str], rng: np.random.Generator, n: int | None) -> list[str]:
    """``n`` case ids (default: each once) in a random order drawn from ``rng``."""
    n = len(ids) if n is None else n
    reps = math.ceil(n / len(ids))
    order = np.concatenate([rng.permutation(len(ids)) for _ in range(reps)])[:n]
    return [ids[i] for i in order]


class _StageBase:
    """What both stages share: the dataset, plan, cache and case lists."""

    name = "base"

    def __init__(
        self,
        dataset: Dataset,
        plan: Plan,
        config: ExperimentConfig,
        cache: CaseCache,
        train_ids: Sequence[str],
        val_ids: Sequence[str],
    ) -> None:
        if not train_ids:
            raise ValueError("no training cases")
        self.dataset = dataset
        self.plan = plan
        self.config = config
        self.cache = cache
        self.train_ids = list(train_ids)
        self.val_ids = list(val_ids)
        self.models: dict[str, nn.Module] = {}

    def case(self, case_id: str) -> PreparedCase:
        return self.cache.get(self.dataset, case_id)

    @property
    def section(self) -> CoarseConfig | FineConfig | CorrelatedConfig:
        """The config section of this stage (optimizer, lr, batch size, epochs, ...)."""
        raise NotImplementedError

    def make_optimizers(self, cfg: TrainerConfig) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per model, as the section says."""
        s = self.section
        return {
            key: make_optimizer(m.parameters(), s.optimizer, s.lr, s.momentum, s.weight_decay)
            for key, m in self.models.items()
        }

    def make_schedulers(
        self, optimizers: dict[str, torch.optim.Optimizer], cfg: TrainerConfig
    ) -> dict[str, Any]:
        """The section's learning-rate schedule for every optimizer (none when constant)."""
        out: dict[str, Any] = {}
        for key, opt in optimizers.items():
            sched = make_scheduler(opt, self.section.lr_schedule, cfg.epochs)
            if sched is not None:
                out[key] = sched
        return out

    def n_batches(self, epoch: int) -> int | None:
        return len(self.batch_sizes())

    def batch_sizes(self) -> list[int]:
        """Sizes of an epoch's global training batches (the same every epoch)."""
        n = self.section.samples_per_epoch or len(self.train_ids)
        return batch_sizes(n, self.section.batch_size)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "landmark_names": list(self.plan.landmark_names),
            "config": self.config.to_dict(),
            "plan": self.plan.to_dict(),
            "train_ids": self.train_ids,
            "val_ids": self.val_ids,
        }


class CoarseStage(_StageBase):
    """Whole-volume coordinate regression (paper: ResNet-34, L1 loss)."""

    name = "coarse"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.config.coarse
        self.models = {"coarse": CoarseRegressor(len(self.plan.landmark_names), c.widths, c.layers)}

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """One training input's shape per network, without the batch axis: (1, X, Y, Z)."""
        return {"coarse": (1, *(int(s) for s in self.plan.coarse_grid))}

    @property
    def section(self) -> CoarseConfig:
        return self.config.coarse

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]:
        c = self.config.coarse
        order = _epoch_order(self.train_ids, rng, c.samples_per_epoch)
        for ids in split_batches(order, c.batch_size):
            images, targets = [], []
            for cid in ids:
                image, target, _ = coarse_sample(
                    self.case(cid), self.plan, rng, self.config.augment
                )
                images.append(image)
                targets.append(target)
            yield torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(targets))

    def train_step(
        self, batch: Any, device: torch.device, autocast_ctx: AutocastFactory
    ) -> torch.Tensor:
        x, target = (t.to(device) for t in batch)
        with autocast_ctx():
            pred = self.models["coarse"](x)
        return masked_l1(pred.float(), target)

    def validate(self, device: torch.device) -> dict[str, float]:
        if not self.val_ids:
            return {}
        prepared = [self.case(cid) for cid in self.val_ids]
        pred = coarse_predict(self.models["coarse"], prepared, self.plan, device)
        truth = np.stack([p.landmarks.coords for p in prepared])
        err = np.linalg.norm(pred - truth, axis=-1)
        return {"val_mre_mm": float(np.nanmean(err))}


class FineStage(_StageBase):
    """Patch heatmap regression for the independent landmarks (paper: one 3D U-Net each)."""

    name = "fine"

    def __init__(
        self, *args: Any, landmark_names: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        f = self.config.fine
        self.landmark_names = list(landmark_names or self.plan.landmark_names)
        self.routes = fine_model_routes(self.landmark_names, f.sharing)
        self.module_dict = build_fine_models(self.landmark_names, f.sharing, f.channels)
        self.models = dict(self.module_dict.items())

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["fine_landmarks"] = self.landmark_names
        meta["routes"] = {k: list(v) for k, v in self.routes.items()}
        return meta

    @property
    def section(self) -> FineConfig:
        return self.config.fine

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]:
        f = self.config.fine
        order = _epoch_order(self.train_ids, rng, f.samples_per_epoch)
        names = self.landmark_names
        for ids in split_batches(order, f.batch_size):
            patches, targets = [], []
            for cid in ids:
                prepared = self.case(cid)
                p, h, geoms = fine_training_sample(
                    prepared, names, self.plan, f, rng, self.config.augment
                )
                if f.sharing == "shared":
                    # every patch supervised on all channels, in that patch's own frame
                    truth = prepared.landmarks.subset(names).coords
                    h = np.stack(
                        [
                            gaussian_heatmaps(g, truth, f.sigma_mm)
                            if g is not None
                            else np.full((len(names), *self.plan.patch_size), np.nan, np.float32)
                            for g in geoms
                        ]
                    )  # (L patches, L channels, X, Y, Z)
                    # a landmark missing in this case has NaN truth -> all-zero map; mask it
                    missing = np.isnan(truth).any(axis=1)
                    h[:, missing] = np.nan
                patches.append(p)
                targets.append(h)
            # (B, L, X, Y, Z) patches; targets (B, L, X, Y, Z) or (B, L, L, X, Y, Z)
            yield torch.from_numpy(np.stack(patches)), torch.from_numpy(np.stack(targets))

    def train_step(
        self, batch: Any, device: torch.device, autocast_ctx: AutocastFactory
    ) -> torch.Tensor:
        patches, targets = (t.to(device) for t in batch)
        targets = targets * self.config.fine.heatmap_amplitude
        b, n_lm = patches.shape[:2]
        size = patches.shape[2:]
        if self.config.fine.sharing == "shared":
            x = patches.reshape(b * n_lm, 1, *size)
            y = targets.reshape(b * n_lm, n_lm, *size)
            with autocast_ctx():
                pred = self.models["shared"](x)
            return heatmap_mse(pred.float(), y)
        losses = []
        for row, name in enumerate(self.landmark_names):
            key, _ = self.routes[name]
            with autocast_ctx():
                pred = self.models[key](patches[:, row : row + 1])
            losses.append(heatmap_mse(pred.float(), targets[:, row : row + 1]))
        return torch.stack(losses).mean()

    def validate(self, device: torch.device) -> dict[str, float]:
        if not self.val_ids:
            return {}
        f = self.config.fine
        rng = np.random.default_rng(VALIDATION_SEED)
        jitter_sd = centre_jitter_sd(self.plan, f.jitter_fraction)
        errors = []
        for cid in self.val_ids:
            prepared = self.case(cid)
            truth = prepared.landmarks.subset(self.landmark_names).coords
            centers = truth + rng.normal(0.0, 1.0, truth.shape) * jitter_sd
            pred, _ = fine_predict(
                self.models,
                self.routes,
                self.landmark_names,
                prepared,
                centers,
                self.plan,
                f.sigma_mm,
                f.decode,
                device,
            )
            errors.append(np.linalg.norm(pred - truth, axis=-1))
        return {"val_mre_mm": float(np.nanmean(np.stack(errors)))}
