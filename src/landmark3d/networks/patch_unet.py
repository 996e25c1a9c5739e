"""Fine stage: a 3D U-Net mapping an image patch to landmark heatmaps.

The paper trains one 3D U-Net per landmark on a 48³ patch (``sharing="per_landmark"``); we also
offer one U-Net with one output channel per landmark (``sharing="shared"``), cheaper to train.
Built on :class:`monai.networks.nets.UNet` with stride-2 levels, so patch edges must be
multiples of ``2 ** (len(channels) - 1)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn

SHARED_KEY = "shared"


class PatchUNet(nn.Module):
    """3D U-Net heatmap regressor.

    Args:
        out_channels: heatmaps produced (1 per landmark handled by this model).
        channels: feature channels per level, e.g. (16, 32, 64, 128).
        in_channels: image channels.
        num_res_units: residual units per level (MONAI).

    Shapes:
        input (B, in_channels, X, Y, Z), each edge a multiple of ``2 ** (len(channels) - 1)``;
        output (B, out_channels, X, Y, Z) heatmaps (unbounded, trained against Gaussians).
    """

    def __init__(
        self,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        in_channels: int = 1,
        num_res_units: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"need at least 2 U-Net levels, got channels={channels}")
        self.out_channels = int(out_channels)
        self.divisor = 2 ** (len(channels) - 1)
        self.net = UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
            norm="instance",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) patch -> (B, out_channels, X, Y, Z) heatmaps."""
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"patch size {tuple(x.shape[2:])} must be a multiple of {self.divisor}"
            )
        out: torch.Tensor = self.net(x)
        return out


def _module_key(name: str) -> str:
    """A ModuleDict-safe key for a landmark name (no dots; not empty)."""
    key = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return key if key and key != SHARED_KEY else f"lm_{key}"


def fine_model_routes(names: Sequence[str], sharing: str) -> dict[str, tuple[str, int]]:
    """Landmark name -> (model key in :func:`build_fine_models`' ModuleDict, output channel).

    ``per_landmark``: every landmark has its own model with one channel (channel 0).
    ``shared``: all landmarks use model ``"shared"``; the channel is the landmark's position.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate landmark names: {names}")
    if sharing == "shared":
        return {n: (SHARED_KEY, i) for i, n in enumerate(names)}
    if sharing != "per_landmark":
        raise ValueError(f"sharing must be 'per_landmark' or 'shared', got {sharing!r}")
    routes: dict[str, tuple[str, int]] = {}
    used: set[str] = set()
    for n in names:
        key, suffix = _module_key(n), 1
        while key in used:  # names differing only in punctuation
            suffix += 1
            key = f"{_module_key(n)}_{suffix}"
        used.add(key)
        routes[n] = (key, 0)
    return routes


def build_fine_models(
    names: Sequence[str],
    sharing: str,
    channels: Sequence[int] = (16, 32, 64, 128),
    in_channels: int = 1,
    num_res_units: int = 1,
) -> nn.ModuleDict:
    """The fine-stage models for ``names``, keyed as in :func:`fine_model_routes`."""
    routes = fine_model_routes(names, sharing)
    if sharing == "shared":
        return nn.ModuleDict(
            {SHARED_KEY: PatchUNet(len(routes), channels, in_channels, num_res_units)}
        )
    return nn.ModuleDict(
        {key: PatchUNet(1, channels, in_channels, num_res_units) for key, _ in routes.values()}
    )
