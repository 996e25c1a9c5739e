"""Training stage for correlated landmark groups (the paper's key-slice fusion model).

For each group of the plan (landmarks annotated on one common slice, found by
``landmark3d prior``), one :class:`~landmark3d.networks.correlated.CorrelatedLandmarkNet`
is trained on the group's patches:

* patch centres are the truth plus Gaussian jitter (σ = ``fine.jitter_fraction`` × edge, as
  the fine stage), then **reset onto one shared key slice**: every centre's continuous index
  along the group axis is replaced by the group mean (plus one shared jitter, since at
  inference that mean comes from coarse estimates). All patches then share slice indices;
* the heatmap targets are each member's Gaussian (``fine.sigma_mm``) on its own patch grid,
  the slice target a 1D Gaussian (same σ, in voxels along the axis) at the key slice, which is
  the members' mean true index along the axis;
* loss ``λ0 · MSE(heatmaps) + λ1 · MSE(slice profile)``.

Only intensity augmentation is applied: a rotation of the patch grid would tilt the key slice
out of the grid planes the model relies on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from landmark3d.config import CorrelatedConfig
from landmark3d.data.preprocess import PreparedCase, centre_jitter_sd, intensity_augment
from landmark3d.engine.batching import split_batches
from landmark3d.engine.distributed import shard_range
from landmark3d.engine.stages import (
    VALIDATION_SEED,
    _epoch_order,
    _StageBase,
)
from landmark3d.engine.trainer import AutocastFactory
from landmark3d.geometry.heatmap import gaussian_heatmaps
from landmark3d.geometry.resample import patch_geometry, resample
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.inference.steps import correlated_predict, group_axis, reset_onto_key_slice
from landmark3d.networks.correlated import CorrelatedLandmarkNet, correlated_loss, slice_target


def build_group_models(
    groups: Sequence[dict[str, Any]], cfg: CorrelatedConfig
) -> dict[str, CorrelatedLandmarkNet]:
    """One network per group, keyed ``group0``, ``group1``, ... in plan order."""
    return {
        f"group{g}": CorrelatedLandmarkNet(
            len(group["landmarks"]),
            cfg.channels,
            axis=group_axis(group),
            shared_encoder=cfg.shared_encoder,
            use_fusion=cfg.use_fusion,
            use_axis_attention=cfg.use_axis_attention,
            use_slice_detection=cfg.use_slice_detection,
        )
        for g, group in enumerate(groups)
    }


def group_training_sample(
    prepared: PreparedCase,
    names: Sequence[str],
    axis: int,
    plan: Any,
    sigma_mm: float,
    jitter_fraction: float,
    rng: np.random.Generator,
    intensity: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Patches (L, X, Y, Z), heatmaps (L, X, Y, Z) and the key-slice patch index of a group.

    Returns None when a member is missing in this case (the group's patches need all of them).
    """
    truth = prepared.landmarks.subset(names).coords
    if np.isnan(truth).any():
        return None
    size = plan.patch_size
    spacing = np.asarray(plan.fine_spacing_mm, dtype=np.float64)
    jitter_sd = centre_jitter_sd(plan, jitter_fraction)
    centers = truth + rng.normal(0.0, 1.0, truth.shape) * jitter_sd
    geom = prepared.geometry
    shared_shift = float(rng.normal(0.0, 1.0)) * jitter_sd[axis] / spacing[axis]
    centers = reset_onto_key_slice(geom, centers, axis, shift_vox=shared_shift)
    patches = np.empty((len(names), *size), np.float32)
    geoms: list[Geometry] = []
    for row in range(len(names)):
        g = patch_geometry(centers[row], size, spacing, geom.direction)
        vol = Volume.from_sitk(resample(prepared.image, g, "linear", prepared.background))
        patch = vol.array.astype(np.float32, copy=False)
        if intensity > 0:
            patch = intensity_augment(patch, rng, intensity)
        patches[row] = patch
        geoms.append(g)
    heatmaps = np.stack(
        [gaussian_heatmaps(g, truth[row][None], sigma_mm)[0] for row, g in enumerate(geoms)]
    )
    key_index = float(
        np.mean([g.world_to_index(t)[axis] for g, t in zip(geoms, truth, strict=True)])
    )
    return patches, heatmaps, key_index


class CorrelatedStage(_StageBase):
    """Key-slice fusion models for the plan's correlated groups."""

    name = "correlated"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = [dict(g) for g in self.plan.correlated_groups]
        if not self.groups:
            raise ValueError("the plan has no correlated groups (run `landmark3d prior --write`)")
        self.models = dict(build_group_models(self.groups, self.config.correlated))

    def checkpoint_meta(self) -> dict[str, Any]:
        meta = super().checkpoint_meta()
        meta["groups"] = self.groups
        return meta

    @property
    def section(self) -> CorrelatedConfig:
        return self.config.correlated

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]:
        k, f = self.config.correlated, self.config.fine
        aug = self.config.augment
        intensity = aug.intensity if aug.enabled else 0.0
        order = _epoch_order(self.train_ids, rng, k.samples_per_epoch)
        for ids in split_batches(order, k.batch_size):
            batch: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = {}
            for cid in ids:
                prepared = self.case(cid)
                for g, group in enumerate(self.groups):
                    axis = group_axis(group)
                    sample = group_training_sample(
                        prepared, group["landmarks"], axis, self.plan, f.sigma_mm,
                        f.jitter_fraction, rng, intensity,
                    )  # fmt: skip
                    if sample is None:
                        continue
                    patches, heatmaps, key_index = sample
                    sigma_vox = f.sigma_mm / self.plan.fine_spacing_mm[axis]
                    profile = slice_target(self.plan.patch_size[axis], key_index, sigma_vox)
                    lists = batch.setdefault(f"group{g}", ([], [], []))
                    lists[0].append(patches)
                    lists[1].append(heatmaps)
                    lists[2].append(profile.numpy())
            yield {
                key: tuple(torch.from_numpy(np.stack(v)) for v in lists)
                for key, lists in batch.items()
            }

    def shard_batch(self, batch: Any, rank: int, world: int) -> tuple[Any | None, float]:
        """Rank ``rank``'s share of every group's samples (multi-process training).

        Groups have their own sample counts (a case lacking a member adds none), so each
        group's tensors are split separately and carry their loss weight ``n_g,r / n_g`` as a
        4th element: summed over ranks, ``Σ_g weight · mean_g`` is the single-process loss.
        A batch without any group stays whole on every rank (its zero loss is the same).
        """
        if not batch:
            return batch, 1.0
        local: dict[str, tuple[Any, ...]] = {}
        for key, tensors in batch.items():
            n = int(tensors[0].shape[0])
            start, stop = shard_range(n, rank, world)
            if stop > start:
                local[key] = (*(t[start:stop] for t in tensors), (stop - start) / n)
        return (local or None), 1.0

    def train_step(
        self, batch: Any, device: torch.device, autocast_ctx: AutocastFactory
    ) -> torch.Tensor:
        k = self.config.correlated
        losses = []
        for key, (patches, heatmaps, profiles, *share) in batch.items():
            with autocast_ctx():
                out = self.models[key](patches.to(device))
            out = {name: t.float() for name, t in out.items()}
            amp = self.config.fine.heatmap_amplitude  # same target scale as the fine stage
            terms = correlated_loss(
                out, heatmaps.to(device) * amp, profiles.to(device) * amp, k.lambda0, k.lambda1
            )
            losses.append(terms["loss"] * share[0] if share else terms["loss"])
        if not losses:  # no case in this batch has a complete group
            first = next(iter(self.models.values()))
            return sum(p.sum() * 0.0 for p in first.parameters())  # type: ignore[return-value]
        return torch.stack(losses).sum()

    def validate(self, device: torch.device) -> dict[str, float]:
        if not self.val_ids:
            return {}
        f = self.config.fine
        rng = np.random.default_rng(VALIDATION_SEED)
        jitter_sd = centre_jitter_sd(self.plan, f.jitter_fraction)
        errors = []
        for cid in self.val_ids:
            prepared = self.case(cid)
            for g, group in enumerate(self.groups):
                truth = prepared.landmarks.subset(group["landmarks"]).coords
                if np.isnan(truth).any():
                    continue
                centers = truth + rng.normal(0.0, 1.0, truth.shape) * jitter_sd
                pred = correlated_predict(
                    self.models[f"group{g}"], group, prepared, centers, self.plan,
                    f.sigma_mm, f.decode, self.config.correlated.combine, device,
                )  # fmt: skip
                errors.append(np.linalg.norm(pred.world - truth, axis=-1))
        if not errors:
            return {}
        return {"val_mre_mm": float(np.nanmean(np.concatenate(errors)))}
