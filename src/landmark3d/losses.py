"""Training losses. Missing targets (NaN) are masked out, never zero-filled."""

from __future__ import annotations

import torch


def masked_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's coordinate loss over present landmarks.

    ``L = mean over present (sample, landmark) of |dx| + |dy| + |dz|`` — i.e. the paper's
    ``(1/N) Σ_i (|x_i − x̂_i| + |y_i − ŷ_i| + |z_i − ẑ_i|)`` with N counting only landmarks that
    have a target.

    Args:
        pred: (B, N, 3) predicted coordinates.
        target: (B, N, 3) targets; a NaN anywhere in a row marks that landmark missing.

    Returns:
        scalar tensor; 0 (still attached to ``pred``'s graph) if nothing is present.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    present = ~torch.isnan(target).any(dim=-1, keepdim=True)  # (B, N, 1)
    safe = torch.where(present, target, torch.zeros_like(target))
    err = (pred - safe).abs() * present
    n = present.sum()
    if n == 0:
        return (pred * 0.0).sum()
    return err.sum() / n


def heatmap_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over voxels of present heatmap channels.

    Args:
        pred: (B, C, X, Y, Z) predicted heatmaps.
        target: (B, C, X, Y, Z) Gaussian targets; a channel containing NaN counts as missing.
        mask: optional (B, C) bool, False = missing channel (combined with the NaN rule).

    Returns:
        scalar: mean of (pred - target)² over the voxels of present channels; 0 (attached to
        the graph) if no channel is present.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    present = ~torch.isnan(target).flatten(2).any(dim=-1)  # (B, C)
    if mask is not None:
        if mask.shape != present.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != (B, C) {tuple(present.shape)}")
        present = present & mask.to(torch.bool)
    w = present.to(pred.dtype).view(*present.shape, *([1] * (pred.ndim - 2)))
    safe = torch.where(w > 0, target, torch.zeros_like(target))
    sq = (pred - safe) ** 2 * w
    n_vox = present.sum() * pred[0, 0].numel()
    if n_vox == 0:
        return (pred * 0.0).sum()
    return sq.sum() / n_vox
