"""Tests of the correlated-landmark model (landmark3d.networks.correlated)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from landmark3d.geometry.heatmap import gaussian_heatmap
from landmark3d.geometry.resample import patch_geometry
from landmark3d.networks.correlated import (
    DEFAULT_LAMBDA1,
    AxisChannelAttention,
    AxisSpatialAttention,
    CorrelatedLandmarkNet,
    SliceDetectionHead,
    axis_pool,
    balanced_lambda1,
    correlated_loss,
    expand_along_axis,
    slice_target,
)

SMALL = (2, 4, 8)  # 3 levels: patch edges multiples of 4
SIZE = (8, 12, 16)  # different along each dim, so a wrong axis shows
ROWS = [  # (fusion, attention, slice): the ablation rows and the fusion+slice variant
    (False, False, False),
    (True, False, False),
    (True, True, False),
    (True, False, True),
    (True, True, True),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny convolutions run several times faster on one thread (and on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _net(
    axis: int = 0, row: tuple[bool, bool, bool] = ROWS[-1], **kw: object
) -> CorrelatedLandmarkNet:
    fusion, attention, slices = row
    return CorrelatedLandmarkNet(
        2,
        SMALL,
        axis=axis,
        use_fusion=fusion,
        use_axis_attention=attention,
        use_slice_detection=slices,
        **kw,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("row", ROWS)
def test_output_shapes(axis: int, row: tuple[bool, bool, bool]) -> None:
    net = _net(axis, row, shared_encoder=axis == 1)
    out = net(torch.randn(1, 2, *SIZE))
    assert out["heatmaps"].shape == (1, 2, *SIZE)
    if row[2]:
        assert out["slice_profile"].shape == (1, SIZE[axis])
    else:
        assert "slice_profile" not in out
    assert torch.isfinite(out["heatmaps"]).all()


def test_switch_and_input_checks() -> None:
    with pytest.raises(ValueError, match="use_fusion"):
        _net(row=(False, True, False))
    with pytest.raises(ValueError, match="use_fusion"):
        _net(row=(False, False, True))
    with pytest.raises(ValueError, match="axis"):
        _net(axis=3)
    net = _net()
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.randn(1, 2, 8, 10, 16))
    with pytest.raises(ValueError, match=r"\(B, 2, X, Y, Z\)"):
        net(torch.randn(1, 3, *SIZE))


def test_shared_encoder_has_one_encoder() -> None:
    own, shared = _net(), _net(shared_encoder=True)
    assert len(own.encoders) == 2 and len(shared.encoders) == 1
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in own.parameters())


def test_independent_mode_keeps_landmarks_apart() -> None:
    """Without fusion, landmark 0's heatmap ignores patch 1; with fusion it does not."""
    x = torch.randn(1, 2, *SIZE)
    x2 = x.clone()
    x2[:, 1] = torch.randn(*SIZE)
    for row, independent in ((ROWS[0], True), (ROWS[1], False)):
        net = _net(row=row).eval()
        with torch.no_grad():
            a, b = net(x)["heatmaps"], net(x2)["heatmaps"]
        assert torch.equal(a[:, 0], b[:, 0]) is independent
        assert not torch.equal(a[:, 1], b[:, 1])


# ---------------------------------------------------------------------------- gradients
def test_gradients_reach_every_parameter() -> None:
    net = _net(axis=2)
    out = net(torch.randn(2, 2, *SIZE))
    target = torch.rand(2, 2, *SIZE)
    profile = torch.stack([slice_target(SIZE[2], 7.3, 2.0), slice_target(SIZE[2], 5.0, 2.0)])
    loss = correlated_loss(out, target, profile, lambda1=1.0)["loss"]
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert float(p.grad.abs().sum()) > 0, name


# ---------------------------------------------------------------------------- attention
def test_axis_pool_and_expand() -> None:
    f = torch.randn(2, 3, 4, 5, 6)
    for axis, d in enumerate((4, 5, 6)):
        avg, mx = axis_pool(f, axis)
        assert avg.shape == mx.shape == (2, 3, d)
        other = tuple(a for a in (2, 3, 4) if a != 2 + axis)
        torch.testing.assert_close(avg, f.mean(dim=other))
        torch.testing.assert_close(mx, f.amax(dim=other))
        gate = torch.rand(2, 3, d)
        assert (f * expand_along_axis(gate, axis)).shape == f.shape
        # expanding puts gate[:, :, t] on the slice t of that axis
        sl: list[slice | int] = [slice(None)] * 5
        sl[2 + axis] = 1
        torch.testing.assert_close(
            (f * expand_along_axis(gate, axis))[tuple(sl)],
            f[tuple(sl)] * gate[:, :, 1].reshape(2, 3, 1, 1),
        )


def test_zeroed_attention_is_a_constant_half() -> None:
    """sigmoid(0) = 0.5: with zero weights both gates scale F by 0.5 (identity up to it)."""
    f = torch.randn(2, 8, 4, 6, 10)
    ca, sa = AxisChannelAttention(8, reduction=4, axis=2), AxisSpatialAttention(5, axis=2)
    for module in (ca, sa):
        for p in module.parameters():
            torch.nn.init.zeros_(p)
    m_c, m_s = ca(f), sa(f)
    assert m_c.shape == (2, 8, 10) and m_s.shape == (2, 1, 10)
    assert torch.all(m_c == 0.5) and torch.all(m_s == 0.5)
    gated = f * expand_along_axis(m_s, 2) * expand_along_axis(m_c, 2)
    torch.testing.assert_close(gated, 0.25 * f)


def test_attention_follows_the_axis() -> None:
    """The gates for axis a equal those for axis 0 on the tensor with dim a moved first."""
    f = torch.randn(1, 8, 4, 6, 10)
    ca0, sa0 = AxisChannelAttention(8, 2, axis=0), AxisSpatialAttention(3, axis=0)
    for axis in (1, 2):
        ca, sa = AxisChannelAttention(8, 2, axis=axis), AxisSpatialAttention(3, axis=axis)
        ca.load_state_dict(ca0.state_dict())
        sa.load_state_dict(sa0.state_dict())
        moved = f.movedim(2 + axis, 2)
        torch.testing.assert_close(ca(f), ca0(moved))
        torch.testing.assert_close(sa(f), sa0(moved))
    # a feature map that varies along the axis only gives a gate that varies along it
    ramp = torch.linspace(-2, 2, 10).reshape(1, 1, 1, 1, 10).expand(1, 8, 4, 6, 10)
    m_s = AxisSpatialAttention(3, axis=2)(ramp.contiguous())
    assert float(m_s.detach().std()) > 1e-3


def test_slice_head() -> None:
    head = SliceDetectionHead(16, 8, scale=4, fine_channels=6, axis=1)
    f = torch.randn(2, 16, 2, 3, 4)
    out = head(f, torch.randn(2, 6, 12))
    assert out.shape == (2, 12)
    with pytest.raises(ValueError, match="fine features"):
        head(f, torch.randn(2, 6, 11))
    assert SliceDetectionHead(16, 8, axis=0)(f).shape == (2, 2)


# ---------------------------------------------------------------------------- targets, loss
def test_slice_target() -> None:
    t = slice_target(16, 6.0, 2.0)
    assert t.dtype == torch.float32 and t.shape == (16,)
    assert int(t.argmax()) == 6 and float(t.max()) == 1.0
    assert float(t[8]) == pytest.approx(math.exp(-0.5))
    assert torch.isnan(slice_target(16, float("nan"), 2.0)).all()


def test_correlated_loss_terms_and_masks() -> None:
    out = {"heatmaps": torch.zeros(2, 2, 4, 4, 4), "slice_profile": torch.zeros(2, 4)}
    hm = torch.ones(2, 2, 4, 4, 4)
    prof = torch.full((2, 4), 2.0)
    terms = correlated_loss(out, hm, prof, lambda0=1.0, lambda1=0.5)
    assert float(terms["patch"]) == 1.0 and float(terms["slice"]) == 4.0
    assert float(terms["loss"]) == pytest.approx(1.0 + 0.5 * 4.0)
    # a missing key slice (NaN row) and a masked landmark are left out, not zero-filled
    prof[1] = float("nan")
    hm[0, 1] = 5.0
    mask = torch.tensor([[True, False], [True, True]])
    terms = correlated_loss(out, hm, prof, lambda1=1.0, heatmap_mask=mask)
    assert float(terms["slice"]) == 4.0 and float(terms["patch"]) == 1.0
    # no profile (or a model without slice head): the slice term is zero
    assert float(correlated_loss(out, hm, None)["slice"]) == 0.0
    with pytest.raises(ValueError, match="differ"):
        correlated_loss(out, hm, torch.zeros(2, 5))


def test_default_lambda1_balances_the_terms() -> None:
    """For sigma 2 voxels on 48^3, lambda1 puts both zero-prediction losses on one scale."""
    n, sigma = 48, 2.0
    geo = patch_geometry(np.zeros(3), (n, n, n), 1.0)
    hm = gaussian_heatmap(geo, np.zeros(3), sigma)
    patch0 = float(np.mean(hm.astype(np.float64) ** 2))
    slice0 = float(torch.mean(slice_target(n, (n - 1) / 2, sigma).double() ** 2))
    ratio = patch0 / slice0
    assert balanced_lambda1((n, n, n), sigma) == pytest.approx(ratio, rel=0.05)
    assert 0.5 < DEFAULT_LAMBDA1 / ratio < 2.0


def test_tiny_overfit() -> None:
    """Two synthetic 16^3 samples: a few dozen steps reduce the loss markedly."""
    n = 16
    geo = patch_geometry(np.zeros(3), (n, n, n), 1.0)
    centers = [
        np.array([[-3.0, 2.0, 1.0], [-3.0, -4.0, 3.0]]),
        np.array([[2.0, -1.0, -2.0], [2.0, 3.0, 4.0]]),
    ]
    x = torch.zeros(2, 2, n, n, n)
    hm = torch.zeros(2, 2, n, n, n)
    prof = torch.zeros(2, n)
    for b, pts in enumerate(centers):
        for m, c in enumerate(pts):
            blob = torch.from_numpy(gaussian_heatmap(geo, c, 2.5))
            x[b, m] = blob + 0.1 * torch.randn(n, n, n)
            hm[b, m] = torch.from_numpy(gaussian_heatmap(geo, c, 1.5))
        prof[b] = slice_target(n, float(geo.world_to_index(pts[0])[0]), 1.5)
    net = CorrelatedLandmarkNet(2, (4, 8), axis=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        terms = correlated_loss(net(x), hm, prof, lambda1=0.05)
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < 0.1 * losses[0], losses[::5]
