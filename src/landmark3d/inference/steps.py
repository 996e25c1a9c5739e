"""Forward steps shared by training-time validation and the predictor.

Both map prepared cases to **world LPS mm**, so validation during training measures exactly
what prediction will do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from landmark3d.data.preprocess import PreparedCase, coarse_sample, fine_patch, from_normalized
from landmark3d.geometry.decode import decode_world
from landmark3d.planning import Plan


@torch.no_grad()
def coarse_predict(
    model: nn.Module,
    prepared: Sequence[PreparedCase],
    plan: Plan,
    device: torch.device,
    batch_size: int = 2,
) -> np.ndarray:
    """Coarse estimates, shape (C, N, 3) world LPS mm, of prepared cases (no augmentation)."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        for i in range(0, len(prepared), batch_size):
            samples = [coarse_sample(p, plan) for p in prepared[i : i + batch_size]]
            x = torch.from_numpy(np.stack([s[0] for s in samples])[:, None]).to(device)
            pred = model(x).float().cpu().numpy()
            out.extend(from_normalized(s[2], t) for s, t in zip(samples, pred, strict=True))
    finally:
        model.train(was_training)
    return np.stack(out)


@torch.no_grad()
def fine_predict(
    models: Mapping[str, nn.Module],
    routes: Mapping[str, tuple[str, int]],
    names: Sequence[str],
    prepared: PreparedCase,
    centers_world: np.ndarray,
    plan: Plan,
    sigma_mm: float,
    decode: str,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Fine estimates for ``names`` from patch centres (L, 3) world mm.

    For each landmark a patch of ``plan.patch_size`` at the fine spacing is cut around its
    centre, the routed model's output channel is decoded (DARK or argmax) on the patch grid and
    mapped to the world.

    Returns:
        world (L, 3) LPS mm (NaN where the centre is NaN) and raw heatmap peaks (L,).
    """
    out = np.full((len(names), 3), np.nan)
    peaks = np.full(len(names), np.nan)
    for row, name in enumerate(names):
        center = centers_world[row]
        if np.isnan(center).any():
            continue
        vol = fine_patch(prepared, center, plan)
        key, channel = routes[name]
        model = models[key]
        was_training = model.training
        model.eval()
        try:
            x = torch.from_numpy(vol.array[None, None]).to(device)
            heat = model(x).float().cpu().numpy()[0, channel]
        finally:
            model.train(was_training)
        world, peak = decode_world(heat[None], vol.geometry, sigma_mm, method=decode)  # type: ignore[arg-type]
        out[row], peaks[row] = world[0], peak[0]
    return out, peaks
