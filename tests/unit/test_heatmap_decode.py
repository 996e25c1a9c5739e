"""Tests of Gaussian heatmap targets and argmax / DARK decoding."""

from __future__ import annotations

import numpy as np
import pytest

from landmark3d.geometry import Geometry
from landmark3d.geometry.decode import (
    argmax_decode,
    dark_decode,
    dark_decode_1d,
    decode_world,
    gaussian_smooth,
)
from landmark3d.geometry.heatmap import gaussian_heatmap, gaussian_heatmaps, gaussian_profile_1d

GRID = Geometry((28, 28, 28), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def _oblique_geometry(seed: int = 3) -> Geometry:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return Geometry((30, 24, 20), (0.7, 0.5, 2.0), (10.0, -5.0, 3.0), q)


def _analytic(shape, center, sigma):
    """exp(-sum_a (x_a - c_a)^2 / (2 sigma_a^2)) on an index grid (independent of the module)."""
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),))
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    q = sum((g - c) ** 2 / (2 * s * s) for g, c, s in zip(grids, center, sig, strict=True))
    return np.exp(-q)


# ------------------------------------------------------------------ heatmap targets
def test_heatmap_peaks_at_voxel_centre_with_value_one():
    h = gaussian_heatmap(GRID, [10.0, 12.0, 7.0], sigma_mm=2.0)
    assert h.dtype == np.float32 and h.shape == GRID.size
    assert np.unravel_index(np.argmax(h), h.shape) == (10, 12, 7)
    assert h[10, 12, 7] == pytest.approx(1.0)
    assert h[11, 12, 7] == pytest.approx(np.exp(-1 / 8), rel=1e-6)


def test_heatmap_is_round_in_mm_on_oblique_anisotropic_grid():
    g = _oblique_geometry()
    center = g.index_to_world([12.3, 11.6, 9.4])
    sigma = 3.0
    h = gaussian_heatmap(g, center, sigma)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.size], indexing="ij"), axis=-1)
    world = g.index_to_world(idx)
    expected = np.exp(-np.sum((world - center) ** 2, axis=-1) / (2 * sigma**2))
    np.testing.assert_allclose(h, expected, atol=1e-6)


def test_batched_heatmaps_nan_centre_gives_zero_map_and_per_landmark_sigma():
    centers = np.array([[5.0, 5.0, 5.0], [np.nan] * 3, [20.0, 20.0, 20.0]])
    hs = gaussian_heatmaps(GRID, centers, sigma_mm=[1.0, 2.0, 3.0])
    assert hs.shape == (3, *GRID.size) and hs.dtype == np.float32
    assert not hs[1].any()
    np.testing.assert_allclose(hs[2], gaussian_heatmap(GRID, centers[2], 3.0))
    assert hs[0][6, 5, 5] == pytest.approx(np.exp(-0.5), rel=1e-6)


def test_heatmap_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma"):
        gaussian_heatmap(GRID, [1.0, 1.0, 1.0], 0.0)


def test_profile_1d():
    p = gaussian_profile_1d(10, 3.5, 1.0)
    assert p.shape == (10,) and p.dtype == np.float32
    assert p[3] == pytest.approx(p[4]) and p[3] == pytest.approx(np.exp(-0.125), rel=1e-6)
    assert not gaussian_profile_1d(5, float("nan"), 1.0).any()


# ------------------------------------------------------------------ decoding
@pytest.mark.parametrize("sigma", [1.5, 2.0, (1.5, 2.5, 3.0)])
@pytest.mark.parametrize("smooth", [False, True])
def test_dark_recovers_subvoxel_centre_and_beats_argmax(sigma, smooth):
    rng = np.random.default_rng(7)
    centers = rng.uniform(10, 18, size=(6, 3))
    maps = np.stack([_analytic(GRID.size, c, sigma) for c in centers]).astype(np.float32)
    dark = dark_decode(maps, sigma, smooth=smooth)
    arg, peak = argmax_decode(maps)
    assert dark.shape == (6, 3) and arg.shape == (6, 3) and peak.shape == (6,)
    assert np.abs(dark - centers).max() < 0.05
    assert np.abs(arg - centers).max() <= 0.5 + 1e-9
    assert np.abs(arg - centers).max() > 0.05  # sub-voxel information argmax throws away
    np.testing.assert_array_equal(arg, np.round(centers))


def test_dark_on_target_generated_on_oblique_grid_returns_world_position():
    g = _oblique_geometry()
    centers = g.index_to_world([[12.3, 11.6, 9.4], [15.8, 12.2, 10.6]])
    maps = gaussian_heatmaps(g, centers, sigma_mm=3.0)
    world, peak = decode_world(maps, g, sigma_mm=3.0, smooth=False)
    np.testing.assert_allclose(world, centers, atol=0.02)  # mm
    assert peak.shape == (2,) and (peak > 0.5).all()
    world_s, _ = decode_world(maps, g, sigma_mm=3.0)
    np.testing.assert_allclose(world_s, centers, atol=0.05)
    world_a, _ = decode_world(maps, g, sigma_mm=3.0, method="argmax")
    assert np.linalg.norm(world_a - centers, axis=1).max() > 0.05
    with pytest.raises(ValueError, match="method"):
        decode_world(maps, g, 3.0, method="soft")  # type: ignore[arg-type]


def test_dark_1d():
    rng = np.random.default_rng(2)
    for c in rng.uniform(5, 25, size=5):
        p = _analytic((32,), [c], 2.0)
        assert abs(dark_decode_1d(p, smooth=False) - c) < 0.05
        assert abs(dark_decode_1d(p, 2.0) - c) < 0.05
        assert abs(dark_decode_1d(gaussian_profile_1d(32, c, 2.0), 2.0) - c) < 0.05


def test_dark_falls_back_to_argmax_on_border():
    h = _analytic(GRID.size, [0.3, 14.2, 13.7], 2.0)
    np.testing.assert_array_equal(dark_decode(h, smooth=False), argmax_decode(h)[0])
    assert argmax_decode(h)[0][0] == 0
    assert dark_decode_1d(_analytic((16,), [15.2], 1.5), smooth=False) == 15.0


def test_flat_and_nonpositive_heatmaps_do_not_crash():
    flat = np.full((8, 8, 8), 0.25)
    np.testing.assert_array_equal(dark_decode(flat, 2.0), argmax_decode(flat)[0])
    zero = np.zeros((8, 8, 8))
    np.testing.assert_array_equal(dark_decode(zero, 2.0), [0.0, 0.0, 0.0])
    negative = -_analytic((8, 8, 8), [4.2, 3.7, 4.1], 1.5)  # a pit, not a peak
    np.testing.assert_array_equal(dark_decode(negative, smooth=False), argmax_decode(negative)[0])


def test_dark_falls_back_when_hessian_not_negative_definite():
    # Interior maximum at (4, 4, 4) whose log-heatmap has a strong i-j cross term: every
    # neighbour is lower, yet H is indefinite (H_ii = H_jj = -0.02, H_ij ~ +5).
    logh = np.full((9, 9, 9), -10.0)
    logh[4, 4, 4] = 0.0
    for idx in [(5, 4, 4), (3, 4, 4), (4, 5, 4), (4, 3, 4), (5, 5, 4), (3, 3, 4)]:
        logh[idx] = -0.01
    logh[4, 4, 5] = logh[4, 4, 3] = -1.0
    h = np.exp(logh)
    np.testing.assert_array_equal(argmax_decode(h)[0], [4.0, 4.0, 4.0])
    np.testing.assert_array_equal(dark_decode(h, smooth=False), [4.0, 4.0, 4.0])


def test_dark_step_is_clipped_to_one_voxel():
    # Interior maximum whose log-Hessian is negative definite but nearly singular along (1, 1, 0):
    # the Newton step would go tens of voxels; it is clipped to 1 voxel per axis.
    logh = np.full((9, 9, 9), -10.0)
    logh[4, 4, 4] = 0.0
    logh[5, 4, 4] = logh[4, 5, 4] = -0.001
    logh[3, 4, 4] = logh[4, 3, 4] = -0.1
    logh[5, 5, 4] = logh[3, 3, 4] = -0.0005
    logh[5, 3, 4] = logh[3, 5, 4] = -0.2
    logh[4, 4, 5] = logh[4, 4, 3] = -1.0
    h = np.exp(logh)
    np.testing.assert_array_equal(argmax_decode(h)[0], [4.0, 4.0, 4.0])
    np.testing.assert_allclose(dark_decode(h, smooth=False), [5.0, 5.0, 4.0])
    # In 1D the step from a discrete maximum never exceeds half a sample.
    p = np.array([0.1, 0.5, 1.0, 1.0 - 1e-9, 0.2])
    assert dark_decode_1d(p, smooth=False) == pytest.approx(2.5, abs=1e-6)


def test_nonfinite_heatmap_decodes_to_nan_and_smooth_needs_sigma():
    h = _analytic((8, 8, 8), [4.0, 4.0, 4.0], 1.5)
    h[0, 0, 0] = np.nan
    assert np.isnan(dark_decode(h, 1.5)).all()
    idx, peak = argmax_decode(h)
    assert np.isnan(idx).all() and np.isnan(peak)
    with pytest.raises(ValueError, match="sigma_vox"):
        dark_decode(_analytic((8, 8, 8), [4.0, 4.0, 4.0], 1.5))
    with pytest.raises(ValueError, match="axes"):
        argmax_decode(np.zeros((4, 4)))


def test_gaussian_smooth_preserves_mass_and_centre():
    x = np.zeros((21, 21, 21))
    x[10, 10, 10] = 1.0
    s = gaussian_smooth(x, (1.0, 2.0, 0.0))
    assert s.sum() == pytest.approx(1.0)
    assert np.unravel_index(np.argmax(s), s.shape) == (10, 10, 10)
    assert s[10, 10, 10] == pytest.approx(s[10, 10, 10])
    assert s[11, 10, 10] / s[10, 10, 10] == pytest.approx(np.exp(-0.5), rel=1e-2)
    assert not s[10, 10, 9]  # sigma 0 leaves the k axis alone


@pytest.mark.parametrize("distance", [4.3, 6.3])
def test_smoothing_near_border_biases_little(distance):
    """Zero padding keeps DARK within 0.05 voxel of a peak 4+ voxels (2 sigma) from the edge."""
    for c in (distance, 47.0 - distance):
        p = _analytic((48,), [c], 2.0)
        assert abs(dark_decode_1d(p, 2.0) - c) < 0.05
    h = _analytic((48, 48, 48), [distance, 24.4, 47.0 - distance], 2.0)
    assert np.abs(dark_decode(h, 2.0) - [distance, 24.4, 47.0 - distance]).max() < 0.05
