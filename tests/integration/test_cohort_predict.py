"""Cohort-scale prediction: batched fine patches, streaming, resume, shards, failure report.

The model is a *synthetic* run (random weights saved as a real run directory: config.json,
plan.json, coarse and fine ``best`` checkpoints) — building it takes a second, unlike training,
and lets us use a shared fine U-Net (``fine.sharing=shared``) whose patches really are batched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, CliResult
from landmark3d.config import apply_overrides, load_config
from landmark3d.data.dataset import load_dataset
from landmark3d.data.preprocess import prepare_case
from landmark3d.engine.checkpoint import save_checkpoint
from landmark3d.errors import ConfigError, ImageError, OutputExistsError
from landmark3d.inference.batch import (
    UNCHECKED_NOTE,
    CaseRecord,
    CohortInterrupted,
    predict_cohort,
    predict_inputs,
)
from landmark3d.inference.predictor import Predictor
from landmark3d.inference.steps import fine_predict
from landmark3d.io.images import read_image
from landmark3d.io.landmarks import read_landmarks
from landmark3d.networks.coarse import CoarseRegressor
from landmark3d.networks.patch_unet import build_fine_models, fine_model_routes
from landmark3d.planning import make_plan

Cli = Callable[..., CliResult]
CASES = ["case000", "case001", "case002", "case004", "case005"]


def _make_run(phantom_dir: Path, run: Path, sharing: str) -> Path:
    """A run directory with random (seeded) weights, loadable by :class:`Predictor`."""
    torch.manual_seed(0)
    cfg = apply_overrides(
        load_config("phantom_demo"), [*TINY_OVERRIDES, f"fine.sharing={sharing}", "num_threads=1"]
    )
    ds = load_dataset(phantom_dir)
    names = list(ds.landmark_names)
    run.mkdir(parents=True)
    cfg.save_json(run / "config.json")
    make_plan(ds, cfg, ds.case_ids[:2]).save(run / "plan.json")
    meta = {"landmark_names": names, "fine_landmarks": names}
    coarse = CoarseRegressor(len(names), cfg.coarse.widths, cfg.coarse.layers)
    save_checkpoint(run / "coarse" / "checkpoints" / "best", {"coarse": coarse}, meta=meta)
    fine = build_fine_models(names, sharing, cfg.fine.channels)
    save_checkpoint(run / "fine" / "checkpoints" / "best", dict(fine.items()), meta=meta)
    return run


@pytest.fixture(scope="module")
def shared_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(phantom_dir, tmp_path_factory.mktemp("cohort") / "shared", "shared")


@pytest.fixture(scope="module")
def images(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of five phantom images (read-only: copy before breaking it)."""
    d = tmp_path_factory.mktemp("cohort") / "images"
    d.mkdir()
    for cid in CASES:
        shutil.copy(phantom_dir / "images" / f"{cid}.nii.gz", d / f"{cid}.nii.gz")
    return d


@pytest.fixture(scope="module")
def reference(shared_run: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One unsharded run over ``images``."""
    out = tmp_path_factory.mktemp("cohort") / "reference"
    result = predict_cohort(shared_run, out, input_path=images, device="cpu", threads=1)
    assert [r.status for r in result.records] == ["done"] * len(CASES)
    return out


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def _coords(path: Path) -> np.ndarray:
    return read_landmarks(path, coords="LPS").coords


# ------------------------------------------------------------------------ batched fine patches
@pytest.mark.parametrize("sharing", ["shared", "per_landmark"])
def test_fine_patches_in_chunks_give_the_same_landmarks(
    phantom_dir: Path, tmp_path: Path, sharing: str
) -> None:
    run = _make_run(phantom_dir, tmp_path / "run", sharing)
    p = Predictor(run, device="cpu", stage="fine")
    prepared = prepare_case(read_image(phantom_dir / "images" / "case003.nii.gz"), None, p.plan)
    names = p.fine_names
    routes = fine_model_routes(names, sharing)
    rng = np.random.default_rng(0)
    centers = p.predict(read_image(phantom_dir / "images" / "case003.nii.gz")).coarse
    centers = centers + rng.normal(0.0, 2.0, centers.shape)
    centers[2] = np.nan  # no centre: skipped, NaN out
    batches: list[int] = []
    hooks = [m.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0])) for m in p.fine.values()]  # fmt: skip
    results = {}
    for chunk in (1, 4, 8):
        batches.clear()
        seen: list[int] = []
        results[chunk] = fine_predict(
            p.fine, routes, names, prepared, centers, p.plan, p.config.fine.sigma_mm,
            p.config.fine.decode, p.device, chunk, lambda row, heat, seen=seen: seen.append(row),
        )  # fmt: skip
        assert sorted(seen) == [r for r in range(len(names)) if r != 2]
        # memory bounded by the chunk, not the landmark count; a single patch runs as a pair
        # (engine.device.eval_forward: oneDNN's path, 6x faster on a CPU than a batch of one)
        assert max(batches) <= max(chunk, 2)
        if sharing == "shared":  # one forward pass per chunk
            assert batches == [max(min(chunk, 5 - i), 2) for i in range(0, 5, chunk)]
        else:  # every per-landmark U-Net gets its own patch
            assert batches == [2] * 5
    for h in hooks:
        h.remove()
    world1, peaks1 = results[1]
    assert np.isnan(world1[2]).all() and np.isfinite(np.delete(world1, 2, axis=0)).all()
    for chunk in (4, 8):
        np.testing.assert_allclose(results[chunk][0], world1, atol=1e-5)
        np.testing.assert_allclose(results[chunk][1], peaks1, rtol=1e-4, atol=1e-6)


def test_predictor_patch_batch_does_not_change_predictions(
    shared_run: Path, phantom_dir: Path
) -> None:
    image = read_image(phantom_dir / "images" / "case003.nii.gz")
    one = Predictor(shared_run, device="cpu", patch_batch=1).predict(image).landmarks
    eight = Predictor(shared_run, device="cpu", patch_batch=8).predict(image).landmarks
    np.testing.assert_allclose(eight.coords, one.coords, atol=1e-5)
    for name in one.names:  # heatmap spreads come through the chunked path as well
        a, b = one.extras[name], eight.extras[name]
        assert a["model"] == "fine" and "heatmap_spread_mm" in a
        assert b["heatmap_spread_mm"] == pytest.approx(a["heatmap_spread_mm"], abs=2e-3)
    with pytest.raises(ConfigError, match="patch batch"):
        Predictor(shared_run, device="cpu", patch_batch=0)


# ------------------------------------------------------------------------ cohort runs
def test_shards_cover_the_cohort_once_and_match_one_run(
    shared_run: Path, images: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sharded"
    for n in (2, 3):
        owners: dict[str, int] = {}
        for k in range(1, n + 1):
            result = predict_cohort(
                shared_run, out / str(n), input_path=images, device="cpu", shard=f"{k}/{n}",
                threads=1,
            )  # fmt: skip
            assert result.cohort_size == len(CASES) and result.shard == (k, n)
            report = _report(out / str(n) / f"timings.shard-{k}-of-{n}.json")
            assert report["complete"] and report["shard"] == {"index": k, "count": n}
            for cid, entry in report["cases"].items():
                assert entry["status"] == "done" and cid not in owners  # no overlap
                owners[cid] = k
        assert sorted(owners) == CASES  # full coverage
        for cid in CASES:  # the shards together wrote what one run writes
            np.testing.assert_allclose(
                _coords(out / str(n) / f"{cid}.json"), _coords(reference / f"{cid}.json"),
                atol=1e-6,
            )  # fmt: skip
        assert not (out / str(n) / "timings.json").exists()  # shards never write the main one


def test_a_bad_image_is_recorded_and_the_cohort_goes_on(
    cli: Cli, shared_run: Path, images: Path, reference: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "images"
    shutil.copytree(images, inputs)
    (inputs / "case003.nii.gz").write_bytes(b"not a nifti file at all")
    out = tmp_path / "pred"
    r = cli("predict", "--model", shared_run, "--input", inputs, "--out", out, "--threads", "1")
    assert r.code == 1, r.out + r.err
    assert "case003" in r.err and "failed" in r.err and "Traceback" not in r.err
    report = _report(out / "timings.json")
    assert report["complete"] and report["cohort_size"] == 6
    assert report["counts"] == {"done": 5, "skipped-existing": 0, "failed": 1, "pending": 0}
    bad = report["cases"]["case003"]
    assert bad["status"] == "failed" and "ImageError" in bad["error"]
    assert not (out / "case003.json").exists()
    for cid in CASES:
        assert report["cases"][cid]["status"] == "done" and report["cases"][cid]["total"] > 0
        np.testing.assert_allclose(
            _coords(out / f"{cid}.json"), _coords(reference / f"{cid}.json"), atol=1e-6
        )

    # the library entry point raises the failure, after the other cases are done
    lib = tmp_path / "lib"
    with pytest.raises(ImageError):
        predict_inputs(shared_run, lib, input_path=inputs, device="cpu", threads=1)
    assert sorted(p.name for p in lib.glob("case*.json")) == [f"{c}.json" for c in CASES]


def test_resume_skips_finished_cases_and_redoes_the_rest(
    cli: Cli, shared_run: Path, images: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    shutil.copytree(reference, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = cli("predict", "--model", shared_run, "--input", images, "--out", out)
    assert again.code == 1 and "--resume" in again.err and "--overwrite" in again.err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # untouched
    both = cli("predict", "--model", shared_run, "-i", images, "--out", out, "--resume", "--overwrite")  # fmt: skip
    assert both.code == 1 and "contradict" in both.err

    (out / "case001.json").unlink()  # the case in flight when a job was killed
    (out / "case004.json").write_text('{"landmarks": [')  # not written by us: unusable
    r = cli("predict", "--model", shared_run, "-i", images, "--out", out, "--resume", "--threads", "1")  # fmt: skip
    assert r.code == 0, r.err
    report = _report(out / "timings.json")
    status = {cid: e["status"] for cid, e in report["cases"].items()}
    assert status == {
        "case000": "skipped-existing", "case001": "done", "case002": "skipped-existing",
        "case004": "done", "case005": "skipped-existing",
    }  # fmt: skip
    assert "unusable earlier output" in report["cases"]["case004"]["note"]
    earlier = _report(reference / "timings.json")["cases"]
    assert report["cases"]["case000"]["total"] == earlier["case000"]["total"]  # carried over
    for cid in CASES:
        np.testing.assert_allclose(
            _coords(out / f"{cid}.json"), _coords(reference / f"{cid}.json"), atol=1e-6
        )
    assert (out / "case000.json").stat().st_mtime_ns == stamps["case000.json"]


def test_an_interrupted_run_keeps_finished_cases_and_resumes(
    shared_run: Path, images: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    threads_seen: list[int] = []

    def crash(i: int, total: int, rec: CaseRecord | None) -> None:
        threads_seen.append(torch.get_num_threads())
        if i == 2:
            raise KeyboardInterrupt

    before = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        predict_cohort(
            shared_run, out, input_path=images, device="cpu", progress=crash, threads=2,
            flush_seconds=0.0,
        )  # fmt: skip
    assert set(threads_seen) == {2} and torch.get_num_threads() == before  # --threads, restored
    report = _report(out / "timings.json")
    assert not report["complete"]
    assert [e["status"] for e in report["cases"].values()] == ["done"] * 2 + ["pending"] * 3
    assert sorted(p.name for p in out.glob("case*")) == ["case000.json", "case001.json"]
    result = predict_cohort(shared_run, out, input_path=images, device="cpu", resume=True)
    assert [r.status for r in result.records] == ["skipped-existing"] * 2 + ["done"] * 3
    assert _report(out / "timings.json")["complete"]
    for cid in CASES:
        np.testing.assert_allclose(
            _coords(out / f"{cid}.json"), _coords(reference / f"{cid}.json"), atol=1e-6
        )


def test_cli_shard_option(cli: Cli, shared_run: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    r = cli("predict", "--model", shared_run, "-i", images, "--out", out, "--shard", "2/2")
    assert r.code == 0, r.err
    assert "shard 2/2" in r.out and "2 done" in r.out
    # sorted ids case000..case005 without case003: positions 1 and 3 are shard 2's
    assert sorted(p.name for p in out.iterdir()) == [
        "case001.json", "case004.json", "timings.shard-2-of-2.json",
    ]  # fmt: skip
    for bad in ("0/2", "3/2", "1-2", "x/y"):
        e = cli("predict", "--model", shared_run, "-i", images, "--out", out, "--shard", bad)
        lines = [ln for ln in e.err.splitlines() if ln.strip()]
        assert e.code == 1 and len(lines) == 1 and "--shard" in lines[0] and "Fix:" in lines[0]
    with pytest.raises(OutputExistsError):  # the shard's own report counts as an output
        predict_cohort(shared_run, out, input_path=images, device="cpu", shard=(2, 2))


# ------------------------------------------------------------------------ resume: same settings
def test_resume_refuses_outputs_of_another_model_or_settings(
    cli: Cli, phantom_dir: Path, shared_run: Path, images: Path, reference: Path, tmp_path: Path
) -> None:
    settings = _report(reference / "timings.json")["settings"]
    assert settings["stage"] == "fine" and settings["format"] == "json"
    assert settings["coords"] == "LPS" and settings["checkpoint"] == "best"
    assert settings["model"] == str(shared_run.resolve()) and len(settings["model_sha256"]) == 64
    assert sorted(settings["checkpoints"]) == ["coarse", "fine"] and settings["tta"] is False
    out = tmp_path / "pred"
    shutil.copytree(reference, out)
    (out / "case004.json").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = _make_run(phantom_dir, tmp_path / "other", "per_landmark")
    for args, what in (
        (["--model", shared_run, "--stage", "coarse"], "stage 'fine' (now 'coarse')"),
        (["--model", other], "model_sha256"),
        (["--model", shared_run, "--format", "csv"], "format 'json' (now 'csv')"),
        (["--model", shared_run, "--coords", "RAS"], "coords 'LPS' (now 'RAS')"),
    ):
        r = cli("predict", *args, "-i", images, "--out", out, "--resume", "--threads", "1")
        assert r.code == 1 and len(r.err_lines) == 1, r.err
        line = r.err_lines[0]
        assert what in line and "--overwrite" in line and "Fix:" in line, line
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # untouched
    with pytest.raises(OutputExistsError, match="model_sha256"):  # the library refuses too
        predict_cohort(other, out, input_path=images, device="cpu", resume=True, shard=(1, 2))

    moved = tmp_path / "moved"  # the same weights elsewhere: its own outputs, resumed
    shutil.copytree(shared_run, moved)
    result = predict_cohort(moved, out, input_path=images, device="cpu", resume=True, threads=1)
    assert [r.status for r in result.records].count("done") == 1
    report = _report(out / "timings.json")
    assert report["settings"]["model"] == str(moved.resolve())
    assert all("note" not in e for e in report["cases"].values())

    result = predict_cohort(  # --overwrite: the new model's outputs and settings
        other, out, input_path=images, device="cpu", overwrite=True, stage="coarse", threads=1
    )
    assert [r.status for r in result.records] == ["done"] * len(CASES)
    assert _report(out / "timings.json")["settings"]["stage"] == "coarse"


def test_resume_of_outputs_without_recorded_settings(
    shared_run: Path, images: Path, reference: Path, tmp_path: Path
) -> None:
    """Reports written before settings were recorded: resumed as before, noted unchecked."""
    out = tmp_path / "pred"
    shutil.copytree(reference, out)
    report = _report(out / "timings.json")
    del report["settings"]
    (out / "timings.json").write_text(json.dumps(report))
    (out / "case005.json").unlink()
    result = predict_cohort(
        shared_run, out, input_path=images, device="cpu", resume=True, shard=(1, 1), threads=1
    )
    assert [r.status for r in result.records] == ["skipped-existing"] * 4 + ["done"]
    shard_report = _report(out / "timings.shard-1-of-1.json")
    assert (
        shard_report["settings"]["model_sha256"]
        == _report(reference / "timings.json")["settings"]["model_sha256"]
    )
    notes = {cid: e.get("note") for cid, e in shard_report["cases"].items()}
    assert notes == {cid: UNCHECKED_NOTE for cid in CASES[:4]} | {"case005": None}
    # the shard report now records them: a resume with other settings is refused
    with pytest.raises(OutputExistsError, match="stage 'fine' \\(now 'coarse'\\)"):
        predict_cohort(
            shared_run, out, input_path=images, device="cpu", resume=True, stage="coarse"
        )


# ------------------------------------------------------------------------ SIGTERM (preemption)
class _PreviousHandlerRan(Exception):
    """Raised by the test's own SIGTERM handler: predict did not handle the signal."""


@pytest.fixture
def sigterm_sentinel() -> Iterator[Callable[..., None]]:
    """A SIGTERM handler of the test's own (instead of the default, which would kill pytest)."""

    def handler(signum: int, frame: object) -> None:
        raise _PreviousHandlerRan

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_between_cases_writes_the_report_and_restores_the_handler(
    shared_run: Path, images: Path, reference: Path, tmp_path: Path, sigterm_sentinel: Callable
) -> None:
    out = tmp_path / "pred"
    sigint_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background

    def preempt(i: int, total: int, rec: CaseRecord | None) -> None:
        if i == 2:  # as SLURM does on preemption (here: while no case is being predicted)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(CohortInterrupted, match="SIGTERM received: stopped after 2 of 5") as e:
        predict_cohort(shared_run, out, input_path=images, device="cpu", progress=preempt)
    assert isinstance(e.value, KeyboardInterrupt) and "--resume" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is sigterm_sentinel  # restored
    assert signal.getsignal(signal.SIGINT) is sigint_before
    report = _report(out / "timings.json")
    assert not report["complete"]
    assert [c["status"] for c in report["cases"].values()] == ["done"] * 2 + ["pending"] * 3
    assert sorted(p.name for p in out.glob("case*")) == ["case000.json", "case001.json"]
    for cid in CASES[:2]:  # finished outputs intact
        np.testing.assert_allclose(
            _coords(out / f"{cid}.json"), _coords(reference / f"{cid}.json"), atol=1e-6
        )
    result = predict_cohort(shared_run, out, input_path=images, device="cpu", resume=True)
    assert [r.status for r in result.records] == ["skipped-existing"] * 2 + ["done"] * 3


def test_sigterm_to_the_cli_during_a_prediction(
    cli: Cli,
    shared_run: Path,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sigterm_sentinel: Callable,
) -> None:
    """A signal while a case is predicted drops that case at once; the shard report is written
    and predict exits 130 with one line."""
    predict_file = Predictor.predict_file
    calls: list[Path] = []

    def slow_case(self: Predictor, path: Path) -> object:
        calls.append(path)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # a long prediction: cut short by the signal
            raise AssertionError("the signal did not stop the case in flight")
        return predict_file(self, path)

    monkeypatch.setattr(Predictor, "predict_file", slow_case)
    out = tmp_path / "pred"
    r = cli("predict", "--model", shared_run, "-i", images, "--out", out, "--shard", "1/1")
    assert r.code == 130 and "Traceback" not in r.err, r.err
    last = r.err_lines[-1]  # after the progress bar: one line, what stopped and how to continue
    assert last.startswith("interrupted: SIGTERM received") and "--resume" in last, r.err
    report = _report(out / "timings.shard-1-of-1.json")
    assert not report["complete"]
    assert report["counts"] == {"done": 1, "skipped-existing": 0, "failed": 0, "pending": 4}
    assert sorted(p.name for p in out.glob("case*")) == ["case000.json"]
    assert signal.getsignal(signal.SIGTERM) is sigterm_sentinel
