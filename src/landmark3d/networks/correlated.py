"""Fine stage for correlated landmarks: fused encoders, axis attention, slice detection.

The model of Pang et al. (MIDL 2023, section "correlated landmarks"; METHOD.md section 4) for a
group of landmarks annotated on one common key slice. It is written by hand because no library
implements it (the authors released no code): the building blocks (MONAI ``ResidualUnit`` and
``Convolution``) come from MONAI, the wiring and the two axis-attention modules follow the paper.

Data flow, for L patches of one group, all centred on the shared key slice and stacked as
``x`` (B, L, X, Y, Z); ``axis`` (0, 1, 2) names the patch dimension normal to the key slice,
whose length is written D below:

1. every patch goes through an encoder (its own, or one shared), giving skip features at each
   level and a bottleneck ``f_l`` (B, C, X/s, Y/s, Z/s), ``s = 2 ** (levels - 1)``;
2. *fusion*: ``F = conv3x3x3(concat_l f_l)`` (B, C, ...);
3. *axis attention*: ``F_w = F * M_s * M_c`` with the axis channel gate ``M_c`` (B, C, D/s)
   and the axis spatial gate ``M_s`` (B, 1, D/s), both broadcast over the in-slice dims;
4. each patch's decoder gets ``concat(f_l, F_w)`` at the bottleneck and its own skips, and
   regresses that landmark's 3D heatmap;
5. *slice detection*: a 1D profile over the patch's D voxels, trained against a 1D Gaussian
   centred on the key slice.

With ``use_fusion=False`` the model is L independent U-Nets (the ablation's first row); the
switches add fusion, axis attention and slice detection one at a time, so every ablation row
is this one class. Attention and slice detection work on the fused features and therefore
need ``use_fusion=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from landmark3d.geometry.heatmap import gaussian_profile_1d
from landmark3d.losses import heatmap_mse

DEFAULT_LAMBDA1 = 0.005
"""Default weight of the slice loss, see :func:`correlated_loss`."""


# ---------------------------------------------------------------------------- axis helpers
def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial dim of the patch), got {axis!r}")
    return int(axis)


def axis_pool(f: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average and max of ``f`` (B, C, X, Y, Z) over the two dims other than ``axis``.

    Returns:
        ``(avg, max)``, each (B, C, D) with D = ``f.shape[2 + axis]``.
    """
    moved = f.movedim(2 + _check_axis(axis), -1).flatten(2, 3)  # (B, C, H*W, D)
    return moved.mean(dim=2), moved.amax(dim=2)


def expand_along_axis(gate: torch.Tensor, axis: int) -> torch.Tensor:
    """A (B, C', D) gate reshaped to broadcast over (B, C, X, Y, Z) with D at dim ``2 + axis``."""
    shape = [gate.shape[0], gate.shape[1], 1, 1, 1]
    shape[2 + _check_axis(axis)] = gate.shape[2]
    return gate.reshape(shape)


# ---------------------------------------------------------------------------- attention
class AxisChannelAttention(nn.Module):
    """CBAM-style channel attention that keeps the positions along the group axis.

    ``F^c_avg``, ``F^c_max`` (B, C, D) = average / max of F over the two in-slice dims; both go
    through one shared bottleneck ``Conv1d(C -> C/r, 1) -> ReLU -> Conv1d(C/r -> C, 1)`` (a
    1x1x1 convolution applied per axis position), are summed, and a sigmoid gives
    ``M_c`` (B, C, D). With the convolutions zeroed, ``M_c = sigmoid(0) = 0.5`` everywhere:
    the gate is then the identity up to that constant factor.

    Args:
        channels: C.
        reduction: r (the hidden width is ``max(1, C // r)``).
        axis: spatial dim of F (0, 1, 2) normal to the key slice.
    """

    def __init__(self, channels: int, reduction: int = 4, axis: int = 0) -> None:
        super().__init__()
        self.axis = _check_axis(axis)
        hidden = max(1, int(channels) // int(reduction))
        self.mlp = nn.Sequential(
            nn.Conv1d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv1d(hidden, channels, 1)
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """F (B, C, X, Y, Z) -> M_c (B, C, D) in (0, 1)."""
        avg, mx = axis_pool(f, self.axis)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))


class AxisSpatialAttention(nn.Module):
    """Attention over positions along the group axis (which slices matter).

    From the axis-pooled descriptors ``F^c_avg``, ``F^c_max`` (B, C, D) (those of
    :class:`AxisChannelAttention`, computed from F in parallel, not from the channel-gated F):
    ``F^s_avg`` = mean over channels of ``F^c_avg``, ``F^s_max`` = max over channels of
    ``F^c_max``, stacked (B, 2, D) -> ``Conv1d(2 -> 1, kernel_size)`` -> sigmoid ->
    ``M_s`` (B, 1, D). With the convolution zeroed, ``M_s = 0.5`` everywhere.

    Args:
        kernel_size: odd 1D kernel length (positions along the axis).
        axis: spatial dim of F (0, 1, 2) normal to the key slice.
    """

    def __init__(self, kernel_size: int = 7, axis: int = 0) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.axis = _check_axis(axis)
        self.conv = nn.Conv1d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """F (B, C, X, Y, Z) -> M_s (B, 1, D) in (0, 1)."""
        avg, mx = axis_pool(f, self.axis)
        pooled = torch.cat([avg.mean(dim=1, keepdim=True), mx.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


# ---------------------------------------------------------------------------- slice head
class SliceDetectionHead(nn.Module):
    """1D key-slice profile along the group axis, at full patch resolution.

    As in the paper, the profile starts from the fused features: F (B, C, X/s, Y/s, Z/s) is
    averaged over the in-slice dims to (B, C, D/s) and passed through two 1D convolutions. The
    paper does not say how the bottleneck resolution D/s becomes a slice index; we upsample the
    hidden 1D features by ``scale = s`` (linear interpolation) and, when given, concatenate
    ``fine`` full-resolution features (the in-slice average of every landmark decoder's last
    feature map) before a last 1D convolution, so the profile can place the key slice to one
    voxel and better. The output is linear (no sigmoid): like the heatmaps it is regressed with
    MSE against a Gaussian whose peak is 1, and decoded with DARK, which needs no bounds.

    Args:
        channels: C of F.
        hidden: width of the 1D convolutions.
        scale: upsampling factor from F's resolution to the patch (``2 ** (levels - 1)``).
        fine_channels: channels of ``fine`` (0 = no refinement input).
        axis: spatial dim normal to the key slice.
    """

    def __init__(
        self, channels: int, hidden: int, scale: int = 1, fine_channels: int = 0, axis: int = 0
    ) -> None:
        super().__init__()
        self.axis = _check_axis(axis)
        self.scale = int(scale)
        self.fine_channels = int(fine_channels)
        self.coarse = nn.Sequential(
            nn.Conv1d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.fine = nn.Sequential(
            nn.Conv1d(hidden + self.fine_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(hidden, 1, 1),
        )

    def forward(self, f: torch.Tensor, fine: torch.Tensor | None = None) -> torch.Tensor:
        """F (B, C, X', Y', Z') [+ fine (B, fine_channels, D)] -> profile (B, D), D = D' * scale."""
        avg, _ = axis_pool(f, self.axis)
        h = self.coarse(avg)
        if self.scale > 1:
            h = nnf.interpolate(h, scale_factor=self.scale, mode="linear", align_corners=False)
        if self.fine_channels:
            if fine is None or fine.shape[1] != self.fine_channels or fine.shape[2] != h.shape[2]:
                got = None if fine is None else tuple(fine.shape)
                raise ValueError(
                    f"fine features must be (B, {self.fine_channels}, {h.shape[2]}), got {got}"
                )
            h = torch.cat([h, fine], dim=1)
        out: torch.Tensor = self.fine(h)[:, 0]
        return out


# ---------------------------------------------------------------------------- U-Net parts
def _unit(cin: int, cout: int, stride: int) -> ResidualUnit:
    # no bias: every convolution is followed by instance normalisation, which removes it
    return ResidualUnit(3, cin, cout, strides=stride, subunits=2, norm="INSTANCE", bias=False)


class _Encoder(nn.Module):
    """Patch (B, 1, X, Y, Z) -> [level 0 (B, c0, X, Y, Z), ..., bottleneck (B, cN, X/s, ...)]."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        ins = [1, *channels[:-1]]
        self.levels = nn.ModuleList(
            _unit(cin, cout, 1 if n == 0 else 2)
            for n, (cin, cout) in enumerate(zip(ins, channels, strict=True))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class _Decoder(nn.Module):
    """Skips of one patch (+ F_w) -> (heatmap (B, 1, X, Y, Z), last features (B, c0, X, Y, Z))."""

    def __init__(self, channels: Sequence[int], fused_channels: int) -> None:
        super().__init__()
        c = list(channels)
        self.merge = _unit(c[-1] + fused_channels, c[-1], 1)
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(c[n + 1], c[n], kernel_size=2, stride=2, bias=False)
            for n in reversed(range(len(c) - 1))
        )
        self.units = nn.ModuleList(_unit(2 * c[n], c[n], 1) for n in reversed(range(len(c) - 1)))
        self.head = nn.Conv3d(c[0], 1, kernel_size=1)

    def forward(
        self, skips: list[torch.Tensor], fused: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = skips[-1] if fused is None else torch.cat([skips[-1], fused], dim=1)
        x = self.merge(x)
        for up, unit, skip in zip(self.ups, self.units, reversed(skips[:-1]), strict=True):
            x = unit(torch.cat([up(x), skip], dim=1))
        return self.head(x), x


# ---------------------------------------------------------------------------- the model
class CorrelatedLandmarkNet(nn.Module):
    """Heatmaps of a correlated landmark group (+ key-slice profile) from its L patches.

    Args:
        n_landmarks: L, the group's size (patches in, heatmaps out).
        channels: feature channels per U-Net level; patch edges must be multiples of
            ``2 ** (len(channels) - 1)``.
        axis: patch dim (0, 1, 2 = X, Y, Z of the (B, L, X, Y, Z) input) normal to the key
            slice.
        shared_encoder: one encoder for all patches (else one per landmark, as in the paper).
            Decoders are always per landmark.
        use_fusion: fuse the L bottlenecks with a 3x3x3 convolution into F and feed it to
            every decoder (off: L independent U-Nets).
        use_axis_attention: gate F with :class:`AxisChannelAttention` and
            :class:`AxisSpatialAttention` (needs fusion).
        use_slice_detection: add the :class:`SliceDetectionHead` (needs fusion).
        reduction: channel-attention bottleneck ratio r.
        attention_kernel: kernel length of the axis spatial attention.
        slice_hidden: width of the slice head's 1D convolutions.

    Shapes:
        input (B, L, X, Y, Z) float patches; output dict with ``"heatmaps"`` (B, L, X, Y, Z)
        (unbounded, trained against Gaussians) and, with slice detection,
        ``"slice_profile"`` (B, D) with D = the input's size along ``axis``.
    """

    def __init__(
        self,
        n_landmarks: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        axis: int = 0,
        shared_encoder: bool = False,
        use_fusion: bool = True,
        use_axis_attention: bool = True,
        use_slice_detection: bool = True,
        reduction: int = 4,
        attention_kernel: int = 7,
        slice_hidden: int = 32,
    ) -> None:
        super().__init__()
        if n_landmarks < 1:
            raise ValueError(f"n_landmarks must be >= 1, got {n_landmarks}")
        if len(channels) < 2:
            raise ValueError(f"need at least 2 levels, got channels={tuple(channels)}")
        if (use_axis_attention or use_slice_detection) and not use_fusion:
            raise ValueError(
                "axis attention and slice detection work on the fused features: "
                "set use_fusion=True (or switch them off for independent U-Nets)"
            )
        c = [int(v) for v in channels]
        self.n_landmarks = int(n_landmarks)
        self.axis = _check_axis(axis)
        self.divisor = 2 ** (len(c) - 1)
        self.shared_encoder = bool(shared_encoder)
        self.use_fusion = bool(use_fusion)
        self.use_axis_attention = bool(use_axis_attention)
        self.use_slice_detection = bool(use_slice_detection)
        n_enc = 1 if shared_encoder else n_landmarks
        self.encoders = nn.ModuleList(_Encoder(c) for _ in range(n_enc))
        self.decoders = nn.ModuleList(
            _Decoder(c, c[-1] if use_fusion else 0) for _ in range(n_landmarks)
        )
        self.fusion = (
            Convolution(3, n_landmarks * c[-1], c[-1], kernel_size=3, norm="INSTANCE", bias=False)
            if use_fusion
            else None
        )
        self.channel_attention = (
            AxisChannelAttention(c[-1], reduction, self.axis) if use_axis_attention else None
        )
        self.spatial_attention = (
            AxisSpatialAttention(attention_kernel, self.axis) if use_axis_attention else None
        )
        self.slice_head = (
            SliceDetectionHead(c[-1], slice_hidden, self.divisor, n_landmarks * c[0], self.axis)
            if use_slice_detection
            else None
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.n_landmarks:
            raise ValueError(
                f"expected (B, {self.n_landmarks}, X, Y, Z) patches, got {tuple(x.shape)}"
            )
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"patch size {tuple(x.shape[2:])} must be a multiple of {self.divisor}"
            )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, L, X, Y, Z) patches -> {"heatmaps": (B, L, X, Y, Z)[, "slice_profile": (B, D)]}."""
        self._check_input(x)
        b, n = x.shape[:2]
        if self.shared_encoder:
            flat = self.encoders[0](x.reshape(b * n, 1, *x.shape[2:]))
            skips = [[f.reshape(b, n, *f.shape[1:])[:, m] for f in flat] for m in range(n)]
        else:
            skips = [enc(x[:, m : m + 1]) for m, enc in enumerate(self.encoders)]
        fused: torch.Tensor | None = None
        if self.fusion is not None:
            fused = self.fusion(torch.cat([s[-1] for s in skips], dim=1))
        if self.channel_attention is not None and self.spatial_attention is not None:
            assert fused is not None
            m_c = expand_along_axis(self.channel_attention(fused), self.axis)
            m_s = expand_along_axis(self.spatial_attention(fused), self.axis)
            fused = fused * m_s * m_c
        heatmaps, last = [], []
        for m, decoder in enumerate(self.decoders):
            h, feat = decoder(skips[m], fused)
            heatmaps.append(h)
            last.append(feat)
        out = {"heatmaps": torch.cat(heatmaps, dim=1)}
        if self.slice_head is not None:
            assert fused is not None
            fine = torch.cat([axis_pool(f, self.axis)[0] for f in last], dim=1)
            out["slice_profile"] = self.slice_head(fused, fine)
        return out


# ---------------------------------------------------------------------------- targets, loss
def slice_target(length: int, center_index: float, sigma_vox: float) -> torch.Tensor:
    """The slice-detection target: a 1D Gaussian (peak 1) over the patch's D voxels.

    Args:
        length: D, the patch size along the group axis.
        center_index: continuous patch index of the key slice along that axis.
        sigma_vox: standard deviation in voxels.

    Returns:
        float32 tensor (D,); all NaN when ``center_index`` is NaN (missing anchor), which
        :func:`correlated_loss` leaves out.
    """
    if math.isnan(float(center_index)):
        return torch.full((length,), float("nan"))
    return torch.from_numpy(gaussian_profile_1d(length, center_index, sigma_vox))


def balanced_lambda1(patch_size: Sequence[int], sigma_vox: float, axis: int = 0) -> float:
    """The slice-loss weight equalising the two losses of an all-zero prediction.

    With a Gaussian target of sigma s voxels, an all-zero output scores
    ``pi^(3/2) s^3 / (X Y Z)`` on the heatmap MSE and ``sqrt(pi) s / D`` on the profile MSE;
    their ratio is ``pi s^2 D / (X Y Z)`` (= pi s^2 / N^2 for an N^3 patch).
    """
    size = [int(v) for v in patch_size]
    return math.pi * sigma_vox**2 * size[_check_axis(axis)] / math.prod(size)


def correlated_loss(
    out: dict[str, torch.Tensor],
    target_heatmaps: torch.Tensor,
    target_profile: torch.Tensor | None = None,
    lambda0: float = 1.0,
    lambda1: float = DEFAULT_LAMBDA1,
    heatmap_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``L_fine = lambda0 * L_patch + lambda1 * L_slice`` (paper, section 4).

    ``L_patch`` is the heatmap MSE over the voxels of present landmarks
    (:func:`landmark3d.losses.heatmap_mse`; NaN targets or ``heatmap_mask`` False = missing);
    ``L_slice`` the MSE of the profile against the 1D Gaussian (NaN rows = missing). The paper
    gives no lambdas. Both terms are means, but the heatmap target is almost all zeros: for an
    all-zero prediction with sigma = 2 voxels on a 48^3 patch, ``L_patch ~ 4e-4`` while
    ``L_slice ~ 7e-2`` — 180 times more. ``lambda1 = 0.005`` (:func:`balanced_lambda1` gives
    0.0055 for that setting) puts both terms on the same scale, so the auxiliary slice branch guides the
    shared features without drowning the heatmap regression; the training integration
    benchmarks other values.

    Args:
        out: :class:`CorrelatedLandmarkNet` output.
        target_heatmaps: (B, L, X, Y, Z).
        target_profile: (B, D), or None to leave the slice term out.
        lambda0, lambda1: weights.
        heatmap_mask: optional (B, L) bool, False = missing landmark.

    Returns:
        dict with scalar tensors ``"loss"``, ``"patch"`` and ``"slice"`` (0 without a slice
        term).
    """
    patch = heatmap_mse(out["heatmaps"], target_heatmaps, heatmap_mask)
    slice_loss = torch.zeros((), dtype=patch.dtype, device=patch.device)
    profile = out.get("slice_profile")
    if profile is not None and target_profile is not None:
        if profile.shape != target_profile.shape:
            raise ValueError(
                f"slice profile {tuple(profile.shape)} and target "
                f"{tuple(target_profile.shape)} differ"
            )
        slice_loss = heatmap_mse(profile[:, None], target_profile[:, None].to(profile))
    return {"loss": lambda0 * patch + lambda1 * slice_loss, "patch": patch, "slice": slice_loss}
