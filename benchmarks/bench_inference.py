"""Inference speed and memory benchmark on this CPU (issue 10).

For every volume (``--sizes``) and number of landmarks N (``--landmarks``) it measures one
prediction split into its steps — **load** (read the ``.nii.gz``), **preprocess**, **coarse**,
**fine**, **write** (the landmark file) — as the median over ``--repeat`` predictions, each
(volume, N) pair in a fresh subprocess whose own peak resident memory (``ru_maxrss``) is
reported. From those it derives how the fine time grows with N (seconds per landmark and the
growth exponent ``log(t50 / t5) / log(50 / 5)``; target: <= 1, i.e. no faster than linear) and
compute time (preprocess + coarse + fine) over load time (target: within 2x); target for the
peak memory on the 512x512x300 CT: < 2 GB. It also measures training throughput (samples/s)
of the coarse and fine stages through the trainer (:func:`train_throughput`).

Networks: the ``--config`` architecture (default ``phantom_demo``) with N outputs, initialised
exactly as ``train_run`` does (same stage classes, same seeds) and saved with the engine's
checkpoint writer and meta, so :class:`~landmark3d.inference.predictor.Predictor` loads them as
a trained run. The plan (coarse grid, fine spacing, CT window) is derived from a phantom with
the landmark names replaced by ``lm00``.. Untrained weights put the heatmap maxima anywhere:
these runs are for timing only.

Volumes: deterministic CT-like images (int16 HU: air, a body with fat, lungs and spine, noise)
written once to ``benchmarks/.work/inference/`` and reused: ``128`` (128^3, 2 mm), ``256``
(256^3, 1 mm), ``ct`` (512x512x300, 0.9x0.9x1.5 mm), or ``AxBxC`` (1.5 mm).

Writes ``benchmarks/results/<date>-inference.json`` and ``.md`` and prints the table. Usage:
``python benchmarks/bench_inference.py [--sizes 128,256,ct] [--landmarks 5,20,50]
[--repeat 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

import landmark3d
from landmark3d.baselines.suite import peak_rss_mb
from landmark3d.config import ExperimentConfig, apply_overrides, load_config
from landmark3d.data.dataset import Dataset, load_dataset
from landmark3d.data.phantom import generate_phantom
from landmark3d.data.preprocess import CaseCache
from landmark3d.engine.checkpoint import save_checkpoint
from landmark3d.engine.run import make_split, stage_seed, trainer_config
from landmark3d.engine.stages import CoarseStage, FineStage
from landmark3d.engine.trainer import fit
from landmark3d.errors import ConfigError, Landmark3dError
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.inference.predictor import Predictor
from landmark3d.io.images import write_image
from landmark3d.io.landmarks import write_landmarks
from landmark3d.planning import Plan, make_plan

ROOT = Path(__file__).resolve().parent
GENERATOR_VERSION = 1
STEPS = ("load", "preprocess", "coarse", "fine", "write")
COMPUTE_STEPS = ("preprocess", "coarse", "fine")
LINEAR_TOLERANCE = 0.1  # growth exponent up to 1.1 counts as linear (timing noise)
COMPUTE_OVER_LOAD_TARGET = 2.0
PEAK_RSS_TARGET_MB = 2048.0


# ----------------------------------------------------------------------------- volumes
@dataclass(frozen=True)
class VolumeSpec:
    """A synthetic test volume: ``size`` voxels (i, j, k) of ``spacing`` mm."""

    name: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]


PRESETS = {
    "128": VolumeSpec("128", (128, 128, 128), (2.0, 2.0, 2.0)),
    "256": VolumeSpec("256", (256, 256, 256), (1.0, 1.0, 1.0)),
    "ct": VolumeSpec("ct", (512, 512, 300), (0.9, 0.9, 1.5)),
}


def parse_sizes(text: str) -> list[VolumeSpec]:
    """``"128,256,ct,64x64x48"`` -> volume specs (presets, or ``AxBxC`` at 1.5 mm)."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item in PRESETS:
            out.append(PRESETS[item])
            continue
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", item)
        if not m or min(int(g) for g in m.groups()) < 8:
            raise ConfigError(
                f"unknown volume size {item!r}.",
                fix=f"use {', '.join(PRESETS)} or AxBxC with every axis >= 8 (e.g. 64x64x48).",
            )
        size = (int(m[1]), int(m[2]), int(m[3]))
        out.append(VolumeSpec(item, size, (1.5, 1.5, 1.5)))
    if not out:
        raise ConfigError("no volume sizes given.", fix="e.g. --sizes 128,256,ct")
    return out


def parse_counts(text: str) -> list[int]:
    """``"5,20,50"`` -> ``[5, 20, 50]`` (each >= 1)."""
    try:
        counts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"bad landmark counts {text!r}.", fix="e.g. --landmarks 5,20,50")
    return counts


def synthetic_ct(spec: VolumeSpec, seed: int = 0, slab: int = 8) -> sitk.Image:
    """A deterministic CT-like image (int16 HU, LPS, centred on the world origin).

    Content, defined in world mm at every voxel centre: air (-1000), an elliptic body
    cylinder along S-I (soft tissue 40 HU inside a -100 HU fat rim), two lungs (-850 HU) in
    the middle 60 % of the S-I extent, a spine (500 HU) — with Gaussian noise (air 10 HU,
    tissue 20 HU) so the file compresses like a real scan. Built in slabs of ``slab`` slices.
    """
    size = np.array(spec.size)
    spacing = np.array(spec.spacing, dtype=float)
    fov = size * spacing
    geom = Geometry(spec.size, spacing, -(size - 1) * spacing / 2.0)
    ax, ay, hz = 0.42 * fov[0], 0.32 * fov[1], 0.5 * fov[2]
    arr = np.empty(spec.size, dtype=np.float32)  # index order [i, j, k]
    for k0 in range(0, int(size[2]), slab):
        k1 = min(k0 + slab, int(size[2]))
        axes = (np.arange(size[0]), np.arange(size[1]), np.arange(k0, k1))
        idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (X, Y, slab, 3)
        world = geom.index_to_world(idx).astype(np.float32)  # (X, Y, slab, 3) LPS mm
        x, y, z = world[..., 0], world[..., 1], world[..., 2]
        rng = np.random.default_rng([seed, k0])
        r_body = (x / ax) ** 2 + (y / ay) ** 2
        vol = np.full(x.shape, -1000.0, dtype=np.float32)
        vol += rng.normal(0.0, 10.0, x.shape).astype(np.float32)
        body = r_body < 1.0
        tissue = np.where(r_body < 0.85, 40.0, -100.0).astype(np.float32)
        mid = np.abs(z) < 0.6 * hz
        for side in (-1.0, 1.0):
            lung = ((x - side * 0.45 * ax) / (0.3 * ax)) ** 2 + (y / (0.6 * ay)) ** 2 < 1.0
            tissue[lung & mid] = -850.0
        spine = (x / (0.1 * ay)) ** 2 + ((y - 0.6 * ay) / (0.12 * ay)) ** 2 < 1.0
        tissue[spine] = 500.0
        vol[body] = tissue[body] + rng.normal(0.0, 20.0, int(body.sum())).astype(np.float32)
        arr[:, :, k0:k1] = vol
    image = Volume(np.clip(np.rint(arr), -1024, 3071), geom).to_sitk()
    return sitk.Cast(image, sitk.sitkInt16)


def ensure_volume(spec: VolumeSpec, work: Path, seed: int = 0) -> Path:
    """``work/<name>.nii.gz`` for ``spec``: generated once, reused while its recipe matches."""
    path = work / f"{spec.name}.nii.gz"
    recipe = {**asdict(spec), "seed": seed, "generator_version": GENERATOR_VERSION}
    recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as read back
    stamp = work / f"{spec.name}.json"
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return path
    work.mkdir(parents=True, exist_ok=True)
    write_image(synthetic_ct(spec, seed), path)
    stamp.write_text(json.dumps(recipe) + "\n")
    return path


def ensure_phantom(out: Path, cases: int, size: int) -> Dataset:
    """The phantom (seed 0) at ``out``, generated unless one with the same recipe is there."""
    spec = out / "dataset.json"
    if spec.is_file():
        gen = json.loads(spec.read_text()).get("generator", {})
        if (gen.get("cases"), gen.get("size"), gen.get("seed")) == (cases, size, 0):
            return load_dataset(spec)
    return load_dataset(generate_phantom(out, n_cases=cases, seed=0, size=size, overwrite=True))


# ----------------------------------------------------------------------------- runs
def landmark_names(n: int) -> list[str]:
    """``lm00``, ``lm01``, ... (``n`` names)."""
    return [f"lm{i:02d}" for i in range(n)]


def base_plan(dataset: Dataset, config: ExperimentConfig) -> Plan:
    """The plan ``train_run`` would derive for fold 0 of ``dataset`` (without groups)."""
    split = make_split(dataset, 0, config.seed)
    return replace(make_plan(dataset, config, split.train + split.val), correlated_groups=[])


def build_random_run(
    run_dir: Path, n_landmarks: int, config: ExperimentConfig, plan: Plan, dataset: Dataset
) -> Path:
    """A run directory with untrained coarse + fine networks for ``n_landmarks`` landmarks.

    The networks are built by the stage classes under the stage seeds (as ``train_run``
    does) and stored as ``best`` checkpoints with the stage's own meta (plus ``untrained``),
    next to ``config.json`` and ``plan.json`` — what :class:`Predictor` reads.
    """
    names = landmark_names(n_landmarks)
    plan = replace(plan, landmark_names=names, correlated_groups=[])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config.save_json(run_dir / "config.json")
    plan.save(run_dir / "plan.json")
    cache = CaseCache(run_dir / "cache", plan)  # never filled: no case is prepared here
    stages: tuple[tuple[str, Any], ...] = (("coarse", CoarseStage), ("fine", FineStage))
    for name, cls in stages:
        torch.manual_seed(stage_seed(config, name))
        stage = cls(dataset, plan, config, cache, dataset.case_ids, [])
        meta = {
            **stage.checkpoint_meta(),
            "train_ids": [],
            "val_ids": [],
            "stage": stage.name,
            "trainer": asdict(trainer_config(config, name)),
            "untrained": "random initial weights (benchmarks/bench_inference.py): timing only",
        }
        best = run_dir / name / "checkpoints" / "best"
        save_checkpoint(best, stage.models, meta=meta, capture_rng_state=False)
    return run_dir


# ----------------------------------------------------------------------------- inference
def _rss_mb(who: int) -> float:
    """Peak resident set size of ``who`` (RUSAGE_SELF / RUSAGE_CHILDREN) in MiB.

    For this process :func:`landmark3d.baselines.suite.peak_rss_mb` (Linux ``VmHWM``):
    ``ru_maxrss`` survives ``exec`` and so starts at the *parent's* resident size at the fork
    — after the parent generated the 512x512x300 volume, every child "peaked" at 1.7 GB before
    reading a voxel (measured here).
    """
    if who == resource.RUSAGE_SELF:
        return peak_rss_mb()
    peak = resource.getrusage(who).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


def measure_inference(run: Path, image: Path, repeat: int, out_dir: Path) -> dict[str, Any]:
    """Predict ``image`` ``repeat`` times with the run and write the landmarks each time.

    Returns seconds per step (``median_s`` and every run in ``runs_s``; steps :data:`STEPS`
    plus ``confidence`` and ``total``), ``model_load_s``, and the peak resident memory of
    this process (``peak_rss_mb``; ``baseline_rss_mb`` before the model was loaded).
    """
    baseline = _rss_mb(resource.RUSAGE_SELF)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    predictor = Predictor(run, device="cpu")
    model_load = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        pred = predictor.predict_file(image)
        t1 = time.perf_counter()
        write_landmarks(pred.landmarks, out_dir / "prediction.json", overwrite=True)
        t2 = time.perf_counter()
        runs.append({**pred.timings, "write": t2 - t1, "total": t2 - t0})
    return {
        "stage": predictor.stage,
        "n_landmarks": len(predictor.landmark_names),
        "model_load_s": model_load,
        "median_s": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
        "runs_s": runs,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _rss_mb(resource.RUSAGE_SELF),
    }


def measure_in_subprocess(
    run: Path, image: Path, repeat: int, out_dir: Path, threads: int
) -> dict[str, Any]:
    """:func:`measure_inference` in a fresh Python process (so its peak memory is its own)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / "result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--run", str(run),
           "--image", str(image), "--repeat", str(repeat), "--threads", str(threads),
           "--result", str(result)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not result.is_file():
        raise Landmark3dError(
            f"the measurement subprocess failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-1500:]}",
            path=image,
            fix=f"run it by hand to see the whole error: {' '.join(cmd)}",
        )
    data: dict[str, Any] = json.loads(result.read_text())
    return data


# ----------------------------------------------------------------------------- training
def _throughput_config(config: ExperimentConfig, epochs: int, samples: int) -> ExperimentConfig:
    sets = [f"{s}.{k}={v}" for s in ("coarse", "fine")
            for k, v in (("epochs", epochs), ("val_every", epochs), ("samples_per_epoch", samples))]  # fmt: skip
    return apply_overrides(config, [*sets, "correlated.discover=false"])


def stage_rates(timing: Sequence[dict[str, Any]], patches_per_case: int = 1) -> dict[str, float]:
    """Throughput from the trainer's per-epoch timing rows (``timing.csv``), the first
    (warm-up) epoch left out. Training seconds exclude validation and checkpointing.

    Returns ``train_s``, ``data_wait_s``, ``cases_per_s`` (the trainer's samples: volumes
    for the coarse stage, cases for the fine stage) and ``samples_per_s`` (volumes, or
    patches = cases x ``patches_per_case`` for the fine stage).
    """
    rows = list(timing)[1:]
    if not rows:
        raise ConfigError("no measured epoch (only the warm-up).", fix="measure >= 1 epoch.")
    cases = sum(float(r["samples"]) for r in rows)
    train_s = sum(float(r["samples"]) / float(r["samples_per_s"]) for r in rows)
    return {
        "train_s": train_s,
        "data_wait_s": sum(float(r["data_wait_s"]) for r in rows),
        "cases_per_s": cases / train_s,
        "samples_per_s": cases * patches_per_case / train_s,
    }


def distributed_train_supported(package_dir: Path | None = None) -> tuple[bool, str]:
    """Whether ``landmark3d train`` can run under torchrun (the package calls
    ``init_process_group`` somewhere), and why (not)."""
    pkg = package_dir or Path(landmark3d.__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        if "init_process_group" in f.read_text(encoding="utf-8", errors="replace"):
            return True, f"{f.relative_to(pkg)} initialises torch.distributed"
    return False, "`landmark3d train` does not initialise torch.distributed yet"


def _read_timing(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise Landmark3dError(
            "the trainer wrote no timing.csv.", path=path, fix="use a landmark3d with timing.csv."
        )
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def train_throughput(
    nproc: int, dataset: Dataset, config: ExperimentConfig, work: Path,
    epochs: int = 2, samples: int = 16,
) -> dict[str, Any]:  # fmt: skip
    """Training throughput of the coarse and fine stages on fold 0 of ``dataset``.

    1 warm-up epoch + ``epochs`` measured epochs of ``samples`` cases each, timed by the
    trainer itself (its ``timing.csv``; see :func:`stage_rates`). ``nproc == 1``: in this
    process, :func:`~landmark3d.engine.trainer.fit` on a :class:`CoarseStage` and a
    :class:`FineStage`. ``nproc > 1``: ``python -m torch.distributed.run
    --nproc_per_node=nproc -m landmark3d.cli train ...`` (gloo on CPU), reported as
    "not available" while the train command does not initialise torch.distributed, and as
    "failed" (with the end of stderr) when the launch fails.
    """
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}.", fix="e.g. --train-nproc 1,2")
    base: dict[str, Any] = {"nproc": nproc, "epochs_measured": epochs, "samples_per_epoch": samples}
    cfg = _throughput_config(config, epochs + 1, samples)
    n_lm = len(dataset.landmark_names)
    stages: dict[str, Any] = {}
    if nproc == 1:
        split = make_split(dataset, 0, cfg.seed)
        plan = base_plan(dataset, cfg)
        cache = CaseCache(work / "cache", plan, keep_in_memory=True)
        for cid in split.train + split.val:  # prepared once, outside the timing
            cache.get(dataset, cid)
        for name, cls in (("coarse", CoarseStage), ("fine", FineStage)):
            torch.manual_seed(stage_seed(cfg, name))
            stage = cls(dataset, plan, cfg, cache, split.train, split.val)
            fit(stage, trainer_config(cfg, name), work / name, progress=False, overwrite=True)
            timing = _read_timing(work / name / "timing.csv")
            stages[name] = stage_rates(timing, 1 if name == "coarse" else n_lm)
        return {**base, "status": "ok", "stages": stages}
    ok, why = distributed_train_supported()
    if not ok:
        return {**base, "status": "not available", "reason": why}
    work.mkdir(parents=True, exist_ok=True)
    cfg.save_json(work / "config.json")
    run = work / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "-m", "landmark3d.cli", "train", "--config", str(work / "config.json"),
           "--dataset", str(dataset.source), "--out", str(run), "--fold", "0",
           "--stage", "coarse", "--stage", "fine", "--overwrite"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {**base, "status": "failed", "reason": proc.stderr.strip()[-3000:]}
    for name in ("coarse", "fine"):
        timing = _read_timing(run / name / "timing.csv")
        stages[name] = stage_rates(timing, 1 if name == "coarse" else n_lm)
    return {**base, "status": "ok", "stages": stages}


# ----------------------------------------------------------------------------- report
def make_row(spec: VolumeSpec, n: int, measured: dict[str, Any]) -> dict[str, Any]:
    """One (volume, N) result: the measurement plus compute seconds and compute / load."""
    med = measured["median_s"]
    compute = sum(med[k] for k in COMPUTE_STEPS)
    return {
        "volume": spec.name, "size": list(spec.size), "spacing_mm": list(spec.spacing),
        "n_landmarks": n, **measured, "compute_s": compute,
        "compute_over_load": compute / med["load"] if med["load"] > 0 else math.inf,
        "fine_s_per_landmark": med["fine"] / n,
    }  # fmt: skip


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Landmark scaling per volume and the verdicts on the three targets.

    Scaling: ``growth_exponent = log(fine(N_max) / fine(N_min)) / log(N_max / N_min)`` and
    ``per_landmark_ratio`` = fine seconds per landmark at N_max over that at N_min; the cost
    grows no faster than linearly when the exponent is <= 1 (+ :data:`LINEAR_TOLERANCE`).
    """
    scaling: dict[str, dict[str, Any]] = {}
    for vol in dict.fromkeys(r["volume"] for r in rows):
        rs = sorted((r for r in rows if r["volume"] == vol), key=lambda r: r["n_landmarks"])
        entry: dict[str, Any] = {
            "fine_s_per_landmark": {str(r["n_landmarks"]): r["fine_s_per_landmark"] for r in rs}
        }
        lo, hi = rs[0], rs[-1]
        if hi["n_landmarks"] > lo["n_landmarks"]:
            exponent = math.log(hi["median_s"]["fine"] / lo["median_s"]["fine"]) / math.log(
                hi["n_landmarks"] / lo["n_landmarks"]
            )
            entry.update(
                n_range=[lo["n_landmarks"], hi["n_landmarks"]],
                per_landmark_ratio=hi["fine_s_per_landmark"] / lo["fine_s_per_landmark"],
                growth_exponent=exponent,
                at_most_linear=exponent <= 1.0 + LINEAR_TOLERANCE,
            )
        scaling[vol] = entry
    verdicts = [e["at_most_linear"] for e in scaling.values() if "at_most_linear" in e]
    ct = [r["peak_rss_mb"] for r in rows if r["volume"] == "ct"]
    worst = max(rows, key=lambda r: r["compute_over_load"])
    return {
        "landmark_scaling": scaling,
        "targets": {
            "fine_at_most_linear_in_landmarks": all(verdicts) if verdicts else None,
            "max_compute_over_load": worst["compute_over_load"],
            "max_compute_over_load_at": f"{worst['volume']}, N={worst['n_landmarks']}",
            "compute_within_2x_load": worst["compute_over_load"] <= COMPUTE_OVER_LOAD_TARGET,
            "ct_peak_rss_mb": max(ct) if ct else None,
            "ct_peak_rss_below_2gb": max(ct) < PEAK_RSS_TARGET_MB if ct else None,
        },
    }


def _reason(t: dict[str, Any]) -> str:
    """The telling line of a failure/unavailability reason (an error line if there is one)."""
    text = [ln.strip() for ln in str(t.get("reason", "")).splitlines() if ln.strip()]
    errors = [ln for ln in text if "Error" in ln and "ChildFailedError" not in ln]
    return (errors or text or [""])[-1].replace("|", "/")


def _yes(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "**NO**")


def markdown(rows: Sequence[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The results as markdown: inference table, scaling table, training table, targets."""
    lines = [
        "| volume | voxels | spacing mm | N | " + " | ".join(f"{s} s" for s in STEPS)
        + " | total s | fine ms/landmark | compute/load | peak RSS MB (before model load) |",
        "|" + "---|" * 13,
    ]  # fmt: skip
    for r in rows:
        med = r["median_s"]
        steps = " | ".join(f"{med[s]:.3f}" for s in STEPS)
        lines.append(
            f"| {r['volume']} | {'x'.join(map(str, r['size']))} | "
            f"{'x'.join(f'{s:g}' for s in r['spacing_mm'])} | {r['n_landmarks']} | {steps} | "
            f"{med['total']:.3f} | {1000 * r['fine_s_per_landmark']:.1f} | "
            f"{r['compute_over_load']:.2f} | {r['peak_rss_mb']:.0f}"
            + (f" ({r['baseline_rss_mb']:.0f})" if "baseline_rss_mb" in r else "")
            + " |"
        )
    ns = sorted({r["n_landmarks"] for r in rows})
    lines += ["", "| volume | " + " | ".join(f"fine ms/landmark N={n}" for n in ns)
              + " | per-landmark ratio | growth exponent | <= linear |", "|" + "---|" * (len(ns) + 4)]  # fmt: skip
    for vol, e in summary["landmark_scaling"].items():
        per = e["fine_s_per_landmark"]
        cells = " | ".join(f"{1000 * per[str(n)]:.1f}" if str(n) in per else "—" for n in ns)
        ratio = f"{e['per_landmark_ratio']:.2f}" if "per_landmark_ratio" in e else "—"
        expo = f"{e['growth_exponent']:.2f}" if "growth_exponent" in e else "—"
        lines.append(f"| {vol} | {cells} | {ratio} | {expo} | {_yes(e.get('at_most_linear'))} |")
    lines += ["", "| training | processes | samples/s | cases/s | measured train s | data wait s |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for t in meta["train"]:
        if t["status"] != "ok":
            lines.append(f"| coarse, fine | {t['nproc']} | {t['status']}: {_reason(t)} | | | |")
            continue
        for name, s in t["stages"].items():
            lines.append(
                f"| {name} | {t['nproc']} | {s['samples_per_s']:.2f} | {s['cases_per_s']:.2f} | "
                f"{s['train_s']:.1f} | {s['data_wait_s']:.2f} |"
            )
    tg = summary["targets"]
    ct = tg["ct_peak_rss_mb"]
    lines += [
        "",
        f"Targets: fine time grows no faster than linearly with N: "
        f"{_yes(tg['fine_at_most_linear_in_landmarks'])}; compute (preprocess + coarse + fine) "
        f"within {COMPUTE_OVER_LOAD_TARGET:g}x of the .nii.gz read: "
        f"{_yes(tg['compute_within_2x_load'])} (worst {tg['max_compute_over_load']:.2f}x at "
        f"{tg['max_compute_over_load_at']}); CT peak RSS < 2 GB: "
        f"{_yes(tg['ct_peak_rss_below_2gb'])}"
        + (f" ({ct:.0f} MB)" if ct is not None else " (not measured)") + ".",
        f"Medians of {meta['repeat']} predictions per row, each row in a fresh process; "
        f"samples/s: coarse = volumes, fine = patches (cases x landmarks); untrained "
        f"networks of the {meta['config_name']} architecture.",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def machine_line(threads: int) -> str:
    """CPU model, cores, torch threads and version."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(encoding="utf-8", errors="replace") if cpuinfo.is_file() else ""
    models = re.findall(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    model = models[0].strip() if models else platform.processor() or platform.machine()
    return (
        f"{model}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


# ----------------------------------------------------------------------------- main
def _worker(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    result = measure_inference(args.run, args.image, args.repeat, args.result.parent)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", help="128,256,ct or AxBxC (default 128,256,ct; quick 128)")
    parser.add_argument("--landmarks", help="landmark counts (default 5,20,50; quick 5,20)")
    parser.add_argument("--repeat", type=int, help="predictions per row (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default="phantom_demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--train-nproc", default="1,2", help="process counts ('' = skip)")
    parser.add_argument("--train-epochs", type=int, help="measured epochs (default 2; quick 1)")
    parser.add_argument("--train-samples", type=int, help="cases per epoch (default 16; quick 8)")
    parser.add_argument("--phantom-cases", type=int, default=10)
    parser.add_argument("--phantom-size", type=int, default=96)
    parser.add_argument("--work", type=Path, default=ROOT / ".work" / "inference")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    quick = args.quick
    sizes = parse_sizes(args.sizes or ("128" if quick else "128,256,ct"))
    counts = parse_counts(args.landmarks or ("5,20" if quick else "5,20,50"))
    repeat = args.repeat or (1 if quick else 3)
    if repeat < 1:
        raise ConfigError(f"--repeat must be >= 1, got {repeat}.", fix="e.g. --repeat 3")
    train_epochs = args.train_epochs or (1 if quick else 2)
    train_samples = args.train_samples or (8 if quick else 16)
    nprocs = parse_counts(args.train_nproc) if args.train_nproc.strip() else []

    torch.set_num_threads(args.threads)
    work: Path = args.work
    cfg = apply_overrides(load_config(args.config), args.overrides)
    dataset = ensure_phantom(work / "phantom", args.phantom_cases, args.phantom_size)
    plan = base_plan(dataset, cfg)
    runs = {n: build_random_run(work / "runs" / f"n{n}", n, cfg, plan, dataset) for n in counts}
    rows = []
    for spec in sizes:
        image = ensure_volume(spec, work)
        for n in counts:
            pred_dir = work / "pred" / f"{spec.name}_n{n}"
            measured = measure_in_subprocess(runs[n], image, repeat, pred_dir, args.threads)
            rows.append(make_row(spec, n, measured))
            med = measured["median_s"]
            print(f"{spec.name} N={n}: " + ", ".join(f"{s} {med[s]:.3f} s" for s in STEPS)
                  + f"; peak RSS {measured['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    train = []
    for nproc in nprocs:
        train.append(
            train_throughput(nproc, dataset, cfg, work / "train" / f"nproc{nproc}",
                             train_epochs, train_samples)
        )  # fmt: skip
        print(f"training, {nproc} process(es): {train[-1]['status']}", flush=True)
    summary = summarize(rows)
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": machine_line(args.threads),
        "command": "python benchmarks/bench_inference.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config_name": args.config,
        "config": cfg.to_dict(),
        "plan": plan.to_dict(),
        "repeat": repeat,
        "threads": args.threads,
        "phantom": {"cases": args.phantom_cases, "size": args.phantom_size, "seed": 0},
        "train": train,
        "landmark3d_version": landmark3d.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-inference"
    payload = {"meta": meta, "summary": summary, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown(rows, summary, meta)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
