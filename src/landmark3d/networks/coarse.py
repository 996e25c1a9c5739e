"""Coarse stage: a 3D ResNet regressing every landmark's normalised grid coordinates.

The paper uses ResNet-34 (3D) whose final fully connected layer emits 3·N numbers. We build it
on :class:`monai.networks.nets.ResNet` with basic blocks.

Stem choice: MONAI's default stem is a 7³ convolution with stride 1 followed by a stride-2
max-pool. At stride 1 that first convolution runs at full input resolution, which dominates the
cost on CPU and is not what the 2D/3D ResNets of the literature do. We use
``conv1_t_stride=2`` and keep the max-pool (the classic ResNet stem, total stride 32): a 64³
grid ends at 2³ before global average pooling, the paper's 96×96×72 at 3×3×3 (ceil). Inputs
must be at least 32 voxels per axis so the last stage keeps one voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ResNet
from torch import nn

#: the smallest input edge (voxels) the stride-32 network handles.
MIN_INPUT_SIZE = 32


class CoarseRegressor(nn.Module):
    """3D ResNet mapping a volume to N landmark coordinates.

    Args:
        n_landmarks: number of landmarks N.
        widths: channels of the four residual stages ((64, 128, 256, 512) = ResNet-34).
        layers: basic blocks per stage ((3, 4, 6, 3) = ResNet-34).
        in_channels: image channels (1 for CT/MR).

    Shapes:
        input (B, in_channels, X, Y, Z) with X, Y, Z >= 32; output (B, N, 3) — coordinates in
        the grid-normalised convention of :func:`landmark3d.data.preprocess.to_normalized`
        (the network is not constrained to [-1, 1]; targets are).
    """

    def __init__(
        self,
        n_landmarks: int,
        widths: Sequence[int] = (64, 128, 256, 512),
        layers: Sequence[int] = (3, 4, 6, 3),
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if n_landmarks < 1:
            raise ValueError(f"n_landmarks must be >= 1, got {n_landmarks}")
        if len(widths) != 4 or len(layers) != 4:
            raise ValueError(f"widths and layers need 4 stages, got {widths} and {layers}")
        self.n_landmarks = int(n_landmarks)
        self.net = ResNet(
            block="basic",
            layers=list(layers),
            block_inplanes=list(widths),
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            no_max_pool=False,
            shortcut_type="B",
            num_classes=3 * self.n_landmarks,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) volume -> (B, N, 3) normalised coordinates."""
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} is below {MIN_INPUT_SIZE} voxels"
            )
        out: torch.Tensor = self.net(x)
        return out.view(x.shape[0], self.n_landmarks, 3)
