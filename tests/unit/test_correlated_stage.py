"""The correlated-landmark stage: key-slice reset, training samples, combine rules, training.

* :func:`reset_onto_key_slice` in an oblique, anisotropic grid;
* :func:`group_training_sample` on real phantom cases (shared key slice, heatmap peaks,
  key index, missing members);
* :func:`correlated_predict`'s combine rules with a stub model whose heatmaps and slice
  profile are hand-made, so every expected world position is known exactly;
* :class:`CorrelatedStage` trained for a few epochs through :func:`fit` (checkpoint meta,
  exact resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_OVERRIDES
from landmark3d.config import CorrelatedConfig, ExperimentConfig, apply_overrides, load_config
from landmark3d.data.dataset import Dataset, load_dataset
from landmark3d.data.phantom import PLANTED_GROUP
from landmark3d.data.preprocess import CaseCache, PreparedCase, fine_patch
from landmark3d.engine import correlated_stage as cs
from landmark3d.engine.checkpoint import read_checkpoint_meta
from landmark3d.engine.correlated_stage import (
    CorrelatedStage,
    build_group_models,
    group_training_sample,
)
from landmark3d.engine.trainer import TrainerConfig, fit
from landmark3d.geometry.resample import resample, rotation_matrix
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.inference.steps import (
    GroupPrediction,
    correlated_predict,
    correlated_predict_many,
    group_axis,
    reset_onto_key_slice,
)
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.networks.correlated import CorrelatedLandmarkNet
from landmark3d.planning import Plan, make_plan

GROUP = {"landmarks": list(PLANTED_GROUP), "axis": "i"}
OBLIQUE = rotation_matrix([0.3, -0.5, 0.8], math.radians(27.0))
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny networks run fastest (and reproducibly) on one thread on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- phantom setup
@dataclasses.dataclass
class Setup:
    dataset: Dataset
    config: ExperimentConfig
    plan: Plan
    cache: CaseCache


@pytest.fixture(scope="module")
def setup(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The session phantom with the tiny config, a plan carrying the planted group, a cache."""
    dataset = load_dataset(phantom_dir)
    config = apply_overrides(load_config("phantom_demo"), list(TINY_OVERRIDES))
    plan = make_plan(dataset, config)
    plan = dataclasses.replace(plan, correlated_groups=[dict(GROUP)])
    cache = CaseCache(tmp_path_factory.mktemp("corr-cache"), plan, keep_in_memory=True)
    return Setup(dataset, config, plan, cache)


# ---------------------------------------------------------------------------- axis, reset
def test_group_axis() -> None:
    assert [group_axis({"axis": a}) for a in ("i", "j", "k")] == [0, 1, 2]
    assert group_axis({"axis": 2}) == 2
    for bad in ("L", 3, None, "x"):
        with pytest.raises(ValueError, match="axis"):
            group_axis({"landmarks": ["a", "b"], "axis": bad})


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reset_onto_key_slice_oblique_anisotropic(axis: int) -> None:
    geom = Geometry((40, 50, 30), np.array([0.7, 1.3, 2.5]), np.array([-20.0, 5.0, 11.0]), OBLIQUE)
    rng = np.random.default_rng(axis)
    centers = geom.index_to_world(rng.uniform(0, 30, (4, 3)))
    before = geom.world_to_index(centers)

    out = reset_onto_key_slice(geom, centers, axis)
    after = geom.world_to_index(out)
    np.testing.assert_allclose(after[:, axis], before[:, axis].mean(), rtol=0, atol=1e-9)
    others = [a for a in range(3) if a != axis]
    np.testing.assert_allclose(after[:, others], before[:, others], rtol=0, atol=1e-9)
    # the move is along the image axis's world direction, not a world axis
    step = out - centers
    expected = np.outer(after[:, axis] - before[:, axis], geom.spacing[axis] * OBLIQUE[:, axis])
    np.testing.assert_allclose(step, expected, rtol=0, atol=1e-9)
    assert np.abs(step).max() > 1.0  # the test moves something

    shifted = reset_onto_key_slice(geom, centers, axis, shift_vox=1.75)
    idx = geom.world_to_index(shifted)
    np.testing.assert_allclose(idx[:, axis], before[:, axis].mean() + 1.75, rtol=0, atol=1e-9)
    np.testing.assert_allclose(idx[:, others], before[:, others], rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        shifted - out, np.tile(1.75 * geom.spacing[axis] * OBLIQUE[:, axis], (4, 1)), atol=1e-9
    )
    assert centers.shape == out.shape == (4, 3)  # the input is not modified in place
    np.testing.assert_array_equal(geom.world_to_index(centers), before)


# ---------------------------------------------------------------------------- training sample
def _recording(monkeypatch: pytest.MonkeyPatch) -> list[Geometry]:
    """Record the patch grids group_training_sample builds."""
    seen: list[Geometry] = []
    original = cs.patch_geometry

    def wrapper(*args: Any, **kwargs: Any) -> Geometry:
        g = original(*args, **kwargs)
        seen.append(g)
        return g

    monkeypatch.setattr(cs, "patch_geometry", wrapper)
    return seen


def test_group_training_sample_on_phantom_cases(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, f = setup.plan, setup.config.fine
    names, axis = list(PLANTED_GROUP), 0
    size = np.asarray(plan.patch_size)
    seen = _recording(monkeypatch)
    probe = np.random.default_rng(99)
    peaks_checked = 0
    for cid in setup.dataset.case_ids:
        prepared = setup.cache.get(setup.dataset, cid)
        truth = prepared.landmarks.subset(names).coords
        for seed in range(3):
            seen.clear()
            rng = np.random.default_rng(seed)
            sample = group_training_sample(
                prepared, names, axis, plan, f.sigma_mm, f.jitter_fraction, rng
            )
            assert sample is not None
            patches, heatmaps, key_index = sample
            assert patches.shape == heatmaps.shape == (2, *plan.patch_size)
            assert patches.dtype == heatmaps.dtype == np.float32
            assert len(seen) == 2
            g0, g1 = seen
            # both patch grids agree on every world point's index along the axis ...
            points = prepared.geometry.index_to_world(
                probe.uniform(0, 1, (20, 3)) * np.asarray(prepared.geometry.size)
            )
            np.testing.assert_allclose(
                g0.world_to_index(points)[:, axis], g1.world_to_index(points)[:, axis], atol=1e-6
            )
            # ... and not in general along the others (the centres are jittered)
            assert not np.allclose(
                g0.world_to_index(points)[:, 1:], g1.world_to_index(points)[:, 1:]
            )
            np.testing.assert_allclose(g0.spacing, plan.fine_spacing_mm)
            np.testing.assert_allclose(g0.direction, prepared.geometry.direction, atol=1e-12)
            for row, g in enumerate(seen):
                # the patches are the image sampled on those grids (no intensity augmentation)
                ref = Volume.from_sitk(resample(prepared.image, g, "linear", prepared.background))
                np.testing.assert_allclose(patches[row], ref.array, atol=1e-6)
                t_idx = g.world_to_index(truth[row])
                # the key index is each member's true patch index along the axis
                assert key_index == pytest.approx(t_idx[axis], abs=1e-3)
                if np.all((t_idx >= 1) & (t_idx <= size - 2)):
                    peak = np.unravel_index(int(np.argmax(heatmaps[row])), heatmaps[row].shape)
                    assert np.abs(np.asarray(peak) - t_idx).max() <= 1.0, (cid, seed, row)
                    assert heatmaps[row].max() > 0.8
                    peaks_checked += 1
    assert peaks_checked >= 20


def test_group_training_sample_intensity_and_determinism(setup: Setup) -> None:
    prepared = setup.cache.get(setup.dataset, setup.dataset.case_ids[0])
    names, f = list(PLANTED_GROUP), setup.config.fine

    def draw(seed: int, intensity: float) -> tuple[np.ndarray, np.ndarray, float]:
        s = group_training_sample(
            prepared,
            names,
            0,
            setup.plan,
            f.sigma_mm,
            f.jitter_fraction,
            np.random.default_rng(seed),
            intensity,
        )
        assert s is not None
        return s

    a, b, c = draw(5, 0.0), draw(5, 0.0), draw(5, 0.3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2] == c[2]  # augmentation draws after the geometry: same grids
    np.testing.assert_array_equal(a[1], c[1])
    assert not np.allclose(a[0], c[0])
    assert draw(6, 0.0)[2] != a[2]


def test_group_training_sample_missing_member(setup: Setup) -> None:
    prepared = setup.cache.get(setup.dataset, setup.dataset.case_ids[0])
    lms = prepared.landmarks
    coords = lms.coords.copy()
    coords[lms.index("occ_bone")] = np.nan
    broken = dataclasses.replace(prepared, landmarks=LandmarkSet(list(lms.names), coords))
    f = setup.config.fine
    rng = np.random.default_rng(0)
    args = (setup.plan, f.sigma_mm, f.jitter_fraction, rng)
    assert group_training_sample(broken, list(PLANTED_GROUP), 0, *args) is None
    # the other members are still usable on their own
    assert group_training_sample(broken, ["chin", "nasion"], 0, *args) is not None


# ---------------------------------------------------------------------------- combine rules
SPACING = (1.0, 1.5, 2.0)
PATCH = (16, 16, 16)
SIGMA_MM = 3.0


def _synthetic_case() -> tuple[PreparedCase, Plan]:
    """A prepared case in an oblique grid at an anisotropic fine spacing (a smooth ramp)."""
    size = (40, 36, 30)
    origin = np.array([-15.0, 20.0, -8.0])
    geom = Geometry(size, np.array(SPACING), origin, OBLIQUE)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    arr = (idx @ np.array([0.01, 0.02, 0.03])).astype(np.float32)
    image = Volume(arr, geom).to_sitk()
    plan = Plan(
        orientation="LPS",
        coarse_grid=(16, 16, 16),
        coarse_spacing_mm=(3.0, 3.0, 3.0),
        fine_spacing_mm=SPACING,
        patch_size=PATCH,
        intensity={"mode": "ct_window", "low": 0.0, "high": 1.0},
        landmark_names=["a", "b", "c"],
    )
    lms = LandmarkSet.empty(plan.landmark_names, "not annotated")
    prepared = PreparedCase("synthetic", image, image, geom, lms, 0.0)
    return prepared, plan


def _gauss(shape: tuple[int, ...], center: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    d2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, center, sigma_vox, strict=True))
    return np.exp(-0.5 * d2)


class StubGroupModel(nn.Module):
    """Returns hand-made outputs: Gaussian heatmaps at ``positions`` (L, 3 patch voxels) and a
    1D Gaussian profile at ``slice_at`` along ``axis`` (None: no profile)."""

    def __init__(self, positions: np.ndarray, axis: int, slice_at: float | None) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # a module with a parameter, like a net
        sigma_vox = SIGMA_MM / np.asarray(SPACING)
        heat = np.stack([_gauss(PATCH, p, sigma_vox) for p in positions])
        self.heat = torch.from_numpy(heat.astype(np.float32))[None]
        self.profile = None
        if slice_at is not None:
            prof = _gauss((PATCH[axis],), np.array([slice_at]), sigma_vox[axis : axis + 1])
            self.profile = torch.from_numpy(prof.astype(np.float32))[None]
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.inputs.append(x.clone())
        b = x.shape[0]
        out = {"heatmaps": self.heat.expand(b, *self.heat.shape[1:]).clone()}
        if self.profile is not None:
            out["slice_profile"] = self.profile.expand(b, -1).clone()
        return out


def _predict(
    axis: int, combine: str, slice_at: float | None, decode: str = "argmax"
) -> tuple[GroupPrediction, list[Geometry], np.ndarray, StubGroupModel, PreparedCase]:
    prepared, plan = _synthetic_case()
    centers = prepared.geometry.index_to_world(np.array([[14.0, 12.0, 9.0], [22.0, 20.0, 17.5]]))
    positions = np.array([[6.0, 5.0, 9.0], [10.0, 8.0, 4.0]])
    positions[:, axis] = [5.0, 8.0]  # members' heatmaps disagree along the axis
    model = StubGroupModel(positions, axis, slice_at)
    group = {"landmarks": ["a", "b"], "axis": "ijk"[axis]}
    pred = correlated_predict(model, group, prepared, centers, plan, SIGMA_MM, decode, combine, CPU)
    reset = reset_onto_key_slice(prepared.geometry, centers, axis)
    grids = [fine_patch(prepared, c, plan).geometry for c in reset]
    return pred, grids, positions, model, prepared


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_combine_heatmap(axis: int) -> None:
    pred, grids, positions, model, prepared = _predict(axis, "heatmap", 11.0)
    expected = np.stack([g.index_to_world(p) for g, p in zip(grids, positions, strict=True)])
    np.testing.assert_allclose(pred.heatmap_world, expected, atol=1e-9)
    np.testing.assert_array_equal(pred.world, pred.heatmap_world)
    np.testing.assert_allclose(pred.peaks, 1.0, atol=1e-6)
    assert pred.slice_index == pytest.approx(11.0)
    # the model saw both patches together, cut on the shared key slice
    (x,) = model.inputs  # one sample, run as a pair on the CPU (engine.device.eval_forward)
    assert tuple(x.shape) == (2, 2, *PATCH) and torch.equal(x[0], x[1])
    for row, g in enumerate(grids):
        ref = Volume.from_sitk(resample(prepared.image, g, "linear", 0.0)).array
        np.testing.assert_allclose(x[0, row].numpy(), ref, atol=1e-5)
    assert grids[0].world_to_index(grids[1].origin)[axis] == pytest.approx(0.0, abs=1e-9)


def test_many_centre_sets_in_one_batch_equal_separate_calls() -> None:
    """Test-time augmentation runs K shifted centre sets as one batch of K."""
    prepared, plan = _synthetic_case()
    base = prepared.geometry.index_to_world(np.array([[14.0, 12.0, 9.0], [22.0, 20.0, 17.5]]))
    sets = [base, base + np.array([1.5, -1.0, 0.5]), base + np.array([-2.0, 0.5, 1.0])]
    model = StubGroupModel(np.array([[6.0, 5.0, 9.0], [10.0, 8.0, 4.0]]), 1, 9.0)
    group = {"landmarks": ["a", "b"], "axis": "j"}
    args = (plan, SIGMA_MM, "dark", "slice", CPU)
    many = correlated_predict_many(model, group, prepared, sets, *args)
    (x,) = model.inputs
    assert tuple(x.shape) == (3, 2, *PATCH)  # one forward pass for the three sets
    assert correlated_predict_many(model, group, prepared, [], *args) == []
    for centers, got in zip(sets, many, strict=True):
        one = correlated_predict(model, group, prepared, centers, *args)
        np.testing.assert_allclose(got.world, one.world, atol=1e-9)
        np.testing.assert_allclose(got.heatmap_world, one.heatmap_world, atol=1e-9)
        assert got.slice_index == pytest.approx(one.slice_index)
    # the shifted sets give shifted answers (each item decoded on its own patch grids)
    assert not np.allclose(many[0].world, many[1].world)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("decode", ["argmax", "dark"])
def test_combine_slice(axis: int, decode: str) -> None:
    pred, grids, positions, _, prepared = _predict(axis, "slice", 11.0, decode)
    if decode == "argmax":
        assert pred.slice_index == 11.0
    else:  # DARK is sub-voxel (its zero-padded smoothing pulls a peak near a border inwards)
        assert pred.slice_index == pytest.approx(11.0, abs=0.25)
    unit = OBLIQUE[:, axis]
    for row, g in enumerate(grids):
        idx = g.world_to_index(pred.world[row])
        heat_idx = g.world_to_index(pred.heatmap_world[row])
        if decode == "argmax":
            np.testing.assert_allclose(heat_idx, positions[row], atol=1e-9)
        assert idx[axis] == pytest.approx(pred.slice_index, abs=1e-9)
        # only the index along the axis changed: the step is along the axis direction, by
        # (key slice - heatmap index) x spacing mm
        step = pred.world[row] - pred.heatmap_world[row]
        expected_mm = (pred.slice_index - heat_idx[axis]) * SPACING[axis]
        np.testing.assert_allclose(step, expected_mm * unit, atol=1e-9)
        assert abs(expected_mm) > 2.0
    # both members end on one slice of the prepared image
    idx = prepared.geometry.world_to_index(pred.world)
    assert idx[0, axis] == pytest.approx(idx[1, axis], abs=1e-9)


@pytest.mark.parametrize("axis", [0, 2])
def test_combine_mean(axis: int) -> None:
    pred, grids, positions, _, _ = _predict(axis, "mean", 11.0)
    halfway = 0.5 * (positions[:, axis].mean() + 11.0)  # 0.5 * (6.5 + 11) = 8.75
    for row, g in enumerate(grids):
        idx = g.world_to_index(pred.world[row])
        hidx = g.world_to_index(pred.heatmap_world[row])
        assert idx[axis] == pytest.approx(halfway, abs=1e-9)
        others = [a for a in range(3) if a != axis]
        np.testing.assert_allclose(idx[others], hidx[others], atol=1e-9)


def test_combine_without_profile_and_unknown_rule() -> None:
    for combine in ("slice", "mean"):
        pred, *_ = _predict(1, combine, None)
        assert math.isnan(pred.slice_index)
        np.testing.assert_array_equal(pred.world, pred.heatmap_world)
    prepared, plan = _synthetic_case()
    centers = prepared.geometry.index_to_world(np.array([[14.0, 12.0, 9.0], [22.0, 20.0, 17.5]]))
    for slice_at in (11.0, None):
        model = StubGroupModel(np.full((2, 3), 7.0), 1, slice_at)
        with pytest.raises(ValueError, match="combine rule 'median'"):
            correlated_predict(
                model, {"axis": "j"}, prepared, centers, plan, SIGMA_MM, "dark", "median", CPU
            )
        assert model.inputs == []  # refused before any work


# ---------------------------------------------------------------------------- the stage
def test_build_group_models() -> None:
    groups = [
        {"landmarks": ["a", "b"], "axis": "i"},
        {"landmarks": ["c", "d", "e"], "axis": "k"},
    ]
    models = build_group_models(groups, CorrelatedConfig(channels=(4, 8)))
    assert list(models) == ["group0", "group1"]
    assert all(isinstance(m, CorrelatedLandmarkNet) for m in models.values())
    assert (models["group0"].n_landmarks, models["group0"].axis) == (2, 0)
    assert (models["group1"].n_landmarks, models["group1"].axis) == (3, 2)
    out = models["group1"](torch.zeros(1, 3, 8, 8, 8))
    assert tuple(out["heatmaps"].shape) == (1, 3, 8, 8, 8)
    assert tuple(out["slice_profile"].shape) == (1, 8)


def _stage(setup: Setup, plan: Plan | None = None) -> CorrelatedStage:
    """A stage on 3 training and 2 validation cases; initial weights seeded (the stage
    draws them from torch's global generator)."""
    ids = setup.dataset.case_ids
    torch.manual_seed(0)
    return CorrelatedStage(
        setup.dataset, plan or setup.plan, setup.config, setup.cache, ids[:3], ids[3:5]
    )


def _weights(stage: CorrelatedStage) -> dict[str, torch.Tensor]:
    return {
        f"{key}.{name}": t.detach().clone()
        for key, model in stage.models.items()
        for name, t in model.state_dict().items()
    }


def test_stage_needs_groups(setup: Setup) -> None:
    with pytest.raises(ValueError, match="no correlated groups"):
        _stage(setup, dataclasses.replace(setup.plan, correlated_groups=[]))


def test_stage_batches_and_step(setup: Setup) -> None:
    stage = _stage(setup)
    assert list(stage.models) == ["group0"]
    assert stage.n_batches(1) == 1  # 3 cases, batch 4
    (batch,) = list(stage.train_batches(1, np.random.default_rng(0)))
    patches, heatmaps, profiles = batch["group0"]
    assert tuple(patches.shape) == tuple(heatmaps.shape) == (3, 2, *setup.plan.patch_size)
    assert tuple(profiles.shape) == (3, setup.plan.patch_size[0])
    assert float(profiles.max()) > 0.5  # the key slice lies inside the patches of this draw
    loss = stage.train_step(batch, CPU, contextlib.nullcontext)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    # a batch in which no case has a complete group gives a zero loss that still backprops
    empty = stage.train_step({}, CPU, contextlib.nullcontext)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def _trainer(epochs: int) -> TrainerConfig:
    return TrainerConfig(epochs=epochs, seed=3, device="cpu", amp=False, num_threads=1)


def test_stage_trains_checkpoints_and_resumes_exactly(setup: Setup, tmp_path: Path) -> None:
    straight = _stage(setup)
    res = fit(straight, _trainer(2), tmp_path / "straight", progress=False)
    assert res.finished and res.epochs_completed == 2
    meta = read_checkpoint_meta(tmp_path / "straight" / "checkpoints" / "last")
    assert meta["groups"] == [GROUP]
    assert meta["landmark_names"] == setup.plan.landmark_names
    rows = (tmp_path / "straight" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and "val_mre_mm" in rows[0]
    assert all(math.isfinite(float(r.split(",")[-1])) for r in rows[1:])
    assert (tmp_path / "straight" / "checkpoints" / "best").is_dir()

    run = tmp_path / "resumed"
    fit(_stage(setup), _trainer(2), run, progress=False, stop_after_epochs=1)
    resumed = _stage(setup)
    fit(resumed, _trainer(2), run, resume=True, progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    assert (run / "metrics.csv").read_text() == (tmp_path / "straight" / "metrics.csv").read_text()


def test_validate_measures_world_error(setup: Setup) -> None:
    stage = _stage(setup)
    metrics = stage.validate(CPU)
    assert set(metrics) == {"val_mre_mm"} and 0 < metrics["val_mre_mm"] < 100
    assert stage.validate(CPU) == metrics  # seeded centres: repeatable
    no_val = CorrelatedStage(
        setup.dataset, setup.plan, setup.config, setup.cache, setup.dataset.case_ids[:3], []
    )
    assert no_val.validate(CPU) == {}
