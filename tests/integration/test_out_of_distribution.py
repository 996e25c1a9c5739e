"""An image far outside the training distribution is flagged by the calibrated confidence.

A small but working model is trained here (20 phantom heads of ~48 voxels, coarse + fine, about
80 s on 2 cores): unlike the session's 2-epoch ``tiny_run`` it localises the held-out heads
to a few mm, so "flagged" means something. It is then shown

* the held-out heads (in distribution),
* another body part: a torso-like slab (body, lungs, spine) on the same grid,
* another modality: a held-out head with MR-like contrast (air bright, bone dark),

and the calibrated expected errors must separate them: the out-of-distribution predictions are
flagged (expected error above 4 mm, or reported absent) where most in-distribution ones are not.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from landmark3d.config import apply_overrides, load_config
from landmark3d.data.dataset import Dataset, load_dataset
from landmark3d.data.phantom import generate_phantom
from landmark3d.engine.run import RunResult, train_run
from landmark3d.geometry.space import Geometry
from landmark3d.inference.predictor import Predictor
from landmark3d.io.landmark_set import LandmarkSet

pytestmark = pytest.mark.slow
FLAG_MM = 4.0
OVERRIDES = (
    "coarse.grid=[32,32,32]", "coarse.widths=[8,16,32,64]", "coarse.layers=[1,1,1,1]",
    "coarse.epochs=250", "coarse.val_every=50",
    "fine.patch_size=[16,16,16]", "fine.spacing_mm=[4.0,4.0,4.0]", "fine.channels=[8,16,32]",
    "fine.epochs=60", "fine.val_every=20", "correlated.discover=false",
    "correlated.channels=[8,16,32]", "num_threads=2",
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dataset, RunResult]]:
    """A model that works on the phantom (held-out MRE of a few mm), calibrated on validation."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("ood")
    spec = generate_phantom(root / "phantom", n_cases=20, seed=7, size=48)
    ds = load_dataset(spec)
    cfg = apply_overrides(load_config("phantom_demo"), list(OVERRIDES))
    try:
        result = train_run(ds, cfg, root / "run", fold=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    yield ds, result


def _torso_like(reference: sitk.Image) -> sitk.Image:
    """A CT-like torso slab on ``reference``'s grid: soft-tissue body, two lungs, a spine."""
    geo = Geometry.from_sitk(reference)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in geo.size], indexing="ij"), axis=-1)
    world = geo.index_to_world(idx.reshape(-1, 3)).reshape(*geo.size, 3)
    c = geo.center_world
    x, y = world[..., 0] - c[0], world[..., 1] - c[1]
    half = 0.45 * geo.extent_mm
    hu = np.full(geo.size, -1000.0, dtype=np.float32)
    hu[(x / half[0]) ** 2 + (y / (0.6 * half[1])) ** 2 < 1] = 40.0
    for side in (-1, 1):
        lung = ((x - side * 0.45 * half[0]) / (0.3 * half[0])) ** 2 + (y / (0.35 * half[1])) ** 2
        hu[lung < 1] = -800.0
    hu[((x / (0.12 * half[0])) ** 2 + ((y - 0.35 * half[1]) / (0.12 * half[1])) ** 2) < 1] = 700.0
    hu += np.random.default_rng(0).normal(0.0, 20.0, hu.shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16))
    out.CopyInformation(reference)
    return out


def _mr_like(head: sitk.Image) -> sitk.Image:
    """The same head with MR-like contrast in CT units: air bright, bone dark, tissue mid-grey."""
    hu = sitk.GetArrayFromImage(head).astype(np.float32)
    mr = np.clip(600.0 - 0.6 * (hu + 1000.0), -1000.0, 3000.0)
    out = sitk.GetImageFromArray(mr.astype(np.int16))
    out.CopyInformation(head)
    return out


def _expected_errors(ls: LandmarkSet) -> list[float]:
    """Expected error (mm) per predicted landmark; an absent one counts as +inf (flagged)."""
    out = []
    for row, name in enumerate(ls.names):
        if not ls.present[row]:
            out.append(float("inf"))
            continue
        out.append(float(ls.extras[name]["expected_error_mm"]))
    return out


def test_out_of_distribution_images_are_flagged(trained: tuple[Dataset, RunResult]) -> None:
    ds, result = trained
    predictor = Predictor(result.run_dir, device="cpu")
    assert predictor.calibration is not None
    test_ids = list(result.split.test)
    errors, inside = [], []
    for cid in test_ids:
        pred = predictor.predict(ds.read_image(cid)).landmarks
        truth = ds.read_landmarks(cid).subset(pred.names)
        errors += list(np.linalg.norm(pred.coords - truth.coords, axis=1))
        inside += _expected_errors(pred)
    mre, median = float(np.nanmean(errors)), float(np.nanmedian(errors))
    assert median < 4.0, (
        f"the model must work in distribution for the check to mean anything ({median})"
    )

    heads = [ds.read_image(cid) for cid in test_ids]
    torso = [
        e for h in heads[:2] for e in _expected_errors(predictor.predict(_torso_like(h)).landmarks)
    ]
    mr = [e for h in heads[:2] for e in _expected_errors(predictor.predict(_mr_like(h)).landmarks)]
    flagged = {
        name: float(np.mean(np.asarray(v) > FLAG_MM))
        for name, v in (("in distribution", inside), ("torso", torso), ("MR-like", mr))
    }
    print("flagged fraction:", flagged, "held-out MRE", round(mre, 2), "median", round(median, 2))
    med = {
        name: float(np.median(np.asarray(v)))
        for name, v in (("in distribution", inside), ("torso", torso), ("MR-like", mr))
    }
    print("median expected error (mm):", med)
    # measured (2026-11-25, calibration with TTA, the default): flagged 0.40 / 1.00 / 1.00 (the
    # share of true errors > 4 mm among the held-out heads is 0.36); median expected error
    # 3.0 / 25.2 / 25.2 mm (both at the cap, e x past the validation scores). Without TTA:
    # 0.36 / 1.00 / 1.00 and 3.1 / 15.1 / 21.2 mm.
    assert flagged["in distribution"] <= 0.5
    assert flagged["torso"] >= 0.9 and flagged["MR-like"] >= 0.9
    assert med["torso"] >= 3 * med["in distribution"]
    assert med["MR-like"] >= 3 * med["in distribution"]
