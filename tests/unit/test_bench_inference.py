"""The inference benchmark script's helpers, at tiny sizes (so ``bench_inference.py`` cannot rot).

The full benchmark (128^3 .. 512x512x300 volumes, 5-50 landmarks) is run by hand; here every
step runs on a few thousand voxels with the tiny test networks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES
from landmark3d.config import ExperimentConfig, apply_overrides, load_config
from landmark3d.data.dataset import Dataset, load_dataset
from landmark3d.errors import ConfigError
from landmark3d.geometry.space import Geometry, Volume

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_inference.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_config() -> ExperimentConfig:
    return apply_overrides(load_config("phantom_demo"), list(TINY_OVERRIDES))


@pytest.fixture(scope="module")
def dataset(phantom_dir: Path) -> Dataset:
    return load_dataset(phantom_dir / "dataset.json")


def test_parse_sizes_and_counts(bench: ModuleType) -> None:
    specs = bench.parse_sizes("128, ct,40x36x32")
    assert [s.name for s in specs] == ["128", "ct", "40x36x32"]
    assert specs[1].size == (512, 512, 300) and specs[1].spacing == (0.9, 0.9, 1.5)
    assert specs[2].size == (40, 36, 32) and specs[2].spacing == (1.5, 1.5, 1.5)
    for bad in ("huge", "4x40x40", ""):
        with pytest.raises(ConfigError):
            bench.parse_sizes(bad)
    assert bench.parse_counts("5,20,50") == [5, 20, 50]
    for bad in ("", "0,5", "five"):
        with pytest.raises(ConfigError):
            bench.parse_counts(bad)


def test_synthetic_ct_is_deterministic_and_ct_like(bench: ModuleType) -> None:
    spec = bench.VolumeSpec("t", (40, 36, 24), (1.0, 1.2, 2.0))
    image = bench.synthetic_ct(spec, seed=3, slab=5)
    vol = Volume.from_sitk(image)
    assert image.GetPixelIDTypeAsString() == "16-bit signed integer"
    assert vol.array.shape == (40, 36, 24)
    geom = Geometry.from_sitk(image)
    np.testing.assert_allclose(geom.spacing, (1.0, 1.2, 2.0))
    centre = geom.index_to_world((np.array(spec.size) - 1) / 2.0)
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)  # centred on the world origin
    assert vol.array[0, 0, 0] < -900  # a corner is air
    assert -100 < vol.array[20, 18, 2] < 200  # the body centre is soft tissue (+ noise)
    assert vol.array[20, 18, :].std() > 5  # noisy, like a scan
    again = Volume.from_sitk(bench.synthetic_ct(spec, seed=3, slab=5))
    np.testing.assert_array_equal(vol.array, again.array)
    other = Volume.from_sitk(bench.synthetic_ct(spec, seed=4, slab=5))
    assert not np.array_equal(vol.array, other.array)


def test_ensure_volume_writes_once(bench: ModuleType, tmp_path: Path) -> None:
    spec = bench.VolumeSpec("t", (16, 16, 12), (1.5, 1.5, 1.5))
    path = bench.ensure_volume(spec, tmp_path)
    assert path == tmp_path / "t.nii.gz" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert bench.ensure_volume(spec, tmp_path).stat().st_mtime_ns == stamp  # reused
    bench.ensure_volume(spec, tmp_path, seed=1)  # another recipe: written anew
    assert json.loads((tmp_path / "t.json").read_text())["seed"] == 1


def test_random_run_loads_like_a_trained_run(
    bench: ModuleType, tiny_config: ExperimentConfig, dataset: Dataset, tmp_path: Path
) -> None:
    from landmark3d.inference.predictor import Predictor

    plan = bench.base_plan(dataset, tiny_config)
    run = bench.build_random_run(tmp_path / "a", 7, tiny_config, plan, dataset)
    predictor = Predictor(run, device="cpu")
    assert predictor.stage == "fine"
    assert predictor.landmark_names == [f"lm{i:02d}" for i in range(7)]
    assert len(predictor.fine) == 7  # per-landmark U-Nets, as configured
    pred = predictor.predict(bench.synthetic_ct(bench.VolumeSpec("t", (40, 40, 32), (2, 2, 2))))
    assert pred.landmarks.names == predictor.landmark_names
    assert np.isfinite(pred.landmarks.coords).all()
    assert {"preprocess", "coarse", "fine"} <= set(pred.timings)
    # seeded as train_run seeds: a second build has the same weights
    again = bench.build_random_run(tmp_path / "b", 7, tiny_config, plan, dataset)
    for stage in ("coarse", "fine"):
        ckpt = Path("checkpoints") / "best" / "weights.safetensors"
        first, second = load_file(run / stage / ckpt), load_file(again / stage / ckpt)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


def _row(bench: ModuleType, vol: str, n: int, fine: float, rss: float) -> dict[str, Any]:
    med = {"load": 1.0, "preprocess": 0.5, "coarse": 0.25, "fine": fine, "write": 0.01}
    med["total"] = sum(med.values())
    spec = bench.VolumeSpec(vol, (8, 8, 8), (1.0, 1.0, 1.0))
    return bench.make_row(spec, n, {"median_s": med, "peak_rss_mb": rss})


def test_summary_and_markdown(bench: ModuleType) -> None:
    rows = [
        _row(bench, "128", 5, 0.5, 500.0),
        _row(bench, "128", 50, 4.0, 600.0),  # sub-linear: exponent log(8)/log(10)
        _row(bench, "ct", 5, 0.5, 1500.0),
        _row(bench, "ct", 50, 50.0, 2500.0),  # quadratic
    ]
    assert rows[0]["compute_over_load"] == pytest.approx(1.25)
    assert rows[1]["fine_s_per_landmark"] == pytest.approx(0.08)
    summary = bench.summarize(rows)
    small, ct = summary["landmark_scaling"]["128"], summary["landmark_scaling"]["ct"]
    assert small["growth_exponent"] == pytest.approx(math.log(8) / math.log(10))
    assert small["per_landmark_ratio"] == pytest.approx(0.8)
    assert small["at_most_linear"] is True
    assert ct["growth_exponent"] == pytest.approx(2.0) and ct["at_most_linear"] is False
    targets = summary["targets"]
    assert targets["fine_at_most_linear_in_landmarks"] is False
    assert targets["max_compute_over_load"] == pytest.approx(50.75)
    assert targets["max_compute_over_load_at"] == "ct, N=50"
    assert targets["compute_within_2x_load"] is False
    assert targets["ct_peak_rss_mb"] == 2500.0 and targets["ct_peak_rss_below_2gb"] is False
    train = [
        {"nproc": 1, "status": "ok", "stages": {"coarse": {"samples_per_s": 2.0,
         "cases_per_s": 2.0, "train_s": 4.0, "data_wait_s": 0.1}}},
        {"nproc": 2, "status": "not available", "reason": "no torch.distributed yet"},
    ]  # fmt: skip
    meta = {"train": train, "repeat": 3, "config_name": "phantom_demo", "machine": "m",
            "command": "python benchmarks/bench_inference.py --quick"}  # fmt: skip
    md = bench.markdown(rows, summary, meta)
    assert "| ct | 8x8x8 | 1x1x1 | 50 | 1.000 | 0.500 | 0.250 | 50.000 | 0.010 |" in md
    assert "| 128 | 100.0 | 80.0 | 0.80 | 0.90 | yes |" in md
    assert "| coarse | 1 | 2.00 | 2.00 | 4.0 | 0.10 |" in md
    assert "not available: no torch.distributed yet" in md
    assert "CT peak RSS < 2 GB: **NO** (2500 MB)" in md
    assert "Command: `python benchmarks/bench_inference.py --quick`" in md


def test_stage_rates_skip_the_warmup_epoch(bench: ModuleType) -> None:
    timing = [
        {"samples": "4", "samples_per_s": "0.5", "data_wait_s": "3.0"},  # warm-up
        {"samples": "4", "samples_per_s": "2.0", "data_wait_s": "0.1"},
        {"samples": "8", "samples_per_s": "4.0", "data_wait_s": "0.2"},
    ]
    rates = bench.stage_rates(timing, patches_per_case=6)
    assert rates["train_s"] == pytest.approx(4.0)
    assert rates["cases_per_s"] == pytest.approx(3.0)
    assert rates["samples_per_s"] == pytest.approx(18.0)
    assert rates["data_wait_s"] == pytest.approx(0.3)
    with pytest.raises(ConfigError):
        bench.stage_rates(timing[:1])


def test_distributed_support_detection(bench: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "trainer.py").write_text("def fit(): pass\n")
    ok, why = bench.distributed_train_supported(tmp_path)
    assert not ok and "does not" in why
    (tmp_path / "engine" / "dist.py").write_text("dist.init_process_group('gloo')\n")
    ok, why = bench.distributed_train_supported(tmp_path)
    assert ok and "dist.py" in why


def test_train_throughput(
    bench: ModuleType,
    tiny_config: ExperimentConfig,
    dataset: Dataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError):
        bench.train_throughput(0, dataset, tiny_config, tmp_path / "x")
    monkeypatch.setattr(bench, "distributed_train_supported", lambda: (False, "not yet"))
    out = bench.train_throughput(2, dataset, tiny_config, tmp_path / "two")
    assert out["status"] == "not available" and out["reason"] == "not yet"
    assert not (tmp_path / "two").exists()  # nothing was launched
    out = bench.train_throughput(1, dataset, tiny_config, tmp_path / "one", epochs=1, samples=2)
    assert out["status"] == "ok" and out["nproc"] == 1
    coarse, fine = out["stages"]["coarse"], out["stages"]["fine"]
    assert coarse["samples_per_s"] == pytest.approx(coarse["cases_per_s"])
    assert coarse["samples_per_s"] > 0
    n_lm = len(dataset.landmark_names)
    assert fine["samples_per_s"] == pytest.approx(fine["cases_per_s"] * n_lm)
    assert fine["samples_per_s"] > 0
    assert 0 < fine["train_s"] < 60


def test_main_end_to_end(bench: ModuleType, tmp_path: Path) -> None:
    """The whole script at a tiny size: phantom, runs, a fresh measuring process, report."""
    argv = ["--sizes", "40x36x32", "--landmarks", "2", "--repeat", "2", "--train-nproc", "",
            "--phantom-cases", "6", "--phantom-size", "32", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"),
            *[a for o in TINY_OVERRIDES for a in ("--set", o)]]  # fmt: skip
    assert bench.main(argv) == 0
    (result,) = (tmp_path / "out").glob("*-inference.json")
    md = (tmp_path / "out" / result.name.replace(".json", ".md")).read_text()
    assert "| 40x36x32 | 40x36x32 | 1.5x1.5x1.5 | 2 | " in md
    data = json.loads(result.read_text())
    (row,) = data["rows"]
    assert row["volume"] == "40x36x32" and row["n_landmarks"] == 2 and len(row["runs_s"]) == 2
    assert all(row["median_s"][s] > 0 for s in bench.STEPS)
    assert row["peak_rss_mb"] >= row["baseline_rss_mb"] > 50  # the child's own ru_maxrss
    assert data["summary"]["targets"]["ct_peak_rss_below_2gb"] is None
    pred = json.loads((tmp_path / "work" / "pred" / "40x36x32_n2" / "prediction.json").read_text())
    assert "lm01" in json.dumps(pred)
