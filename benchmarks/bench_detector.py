"""Benchmark of the coarse-to-fine detector on the synthetic phantom (``make bench``).

What it does, all on this machine's CPU, in one run so that every ratio compares numbers
measured side by side:

1. generates the phantom (30 cases, seed 0) and splits it by its fold 0 (test) — the other
   folds train (a validation subset of them picks the best checkpoint);
2. trains the coarse stage and the fine stage with ``configs/phantom_demo.yaml``
   (``per_landmark`` U-Nets, as the paper), then the fine stage again with ``shared`` weights
   on the same coarse model;
3. predicts the held-out cases coarse-only, coarse + fine (per-landmark, DARK), coarse + fine
   with argmax decoding, and coarse + fine (shared);
4. evaluates each (MRE, SD, median, SDR@2/2.5/3/4/8 mm, per landmark) and times training and
   inference (median over cases; inference excludes reading the image, which is reported
   alongside as the reference).

Writes ``benchmarks/results/<date>-detector.json`` and ``.md`` and prints the table.
Usage: ``python benchmarks/bench_detector.py [--cases 30] [--work DIR] [--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from landmark3d.config import apply_overrides, load_config
from landmark3d.data.dataset import load_dataset
from landmark3d.data.phantom import generate_phantom
from landmark3d.engine.run import train_run
from landmark3d.evaluation import evaluate
from landmark3d.inference.predictor import Predictor
from landmark3d.io.images import read_image
from landmark3d.io.landmarks import write_landmarks
from landmark3d.metrics import format_mre

ROOT = Path(__file__).resolve().parent
THRESHOLDS = ("2", "2.5", "3", "4", "8")


def _predict_all(predictor: Predictor, ds: Any, ids: list[str], out: Path) -> dict[str, float]:
    """Predict ``ids`` into ``out``; returns median seconds for load and inference."""
    out.mkdir(parents=True, exist_ok=True)
    loads, infers = [], []
    for cid in ids:
        t0 = time.perf_counter()
        image = read_image(ds.case(cid).image)
        t1 = time.perf_counter()
        pred = predictor.predict(image)
        t2 = time.perf_counter()
        write_landmarks(pred.landmarks, out / f"{cid}.json", overwrite=True)
        loads.append(t1 - t0)
        infers.append(t2 - t1)
    return {"load_s": statistics.median(loads), "inference_s": statistics.median(infers)}


def _row(name: str, result: Any, times: dict[str, float], train_s: float) -> dict[str, Any]:
    s = result.summary.to_dict()
    return {
        "method": name,
        "mre_mm": s["mre"],
        "sd_mm": s["sd"],
        "median_mm": s["median"],
        "sdr_percent": s["sdr"],
        "per_landmark_mre_mm": {k: v["mre"] for k, v in s["per_landmark"].items()},
        "n_missing_prediction": s["n_missing_prediction"],
        "train_s": train_s,
        **times,
        "mre_sd": format_mre(result.summary),
    }


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    names = list(rows[0]["per_landmark_mre_mm"])
    head = (
        "| method | MRE (SD) mm | median | "
        + " | ".join(f"SDR@{t}" for t in THRESHOLDS)
        + " | "
        + " | ".join(names)
        + " | train s | inference s/case | load s/case |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        sdr = " | ".join(f"{r['sdr_percent'][t]:.1f}" for t in THRESHOLDS)
        per = " | ".join(f"{r['per_landmark_mre_mm'][n]:.2f}" for n in names)
        lines.append(
            f"| {r['method']} | {r['mre_sd']} | {r['median_mm']:.2f} | {sdr} | {per} | "
            f"{r['train_s']:.0f} | {r['inference_s']:.2f} | {r['load_s']:.2f} |"
        )
    ratios = meta["ratios"]
    lines += [
        "",
        f"Ratios: coarse-only MRE / coarse+fine MRE = **{ratios['coarse_over_fine_mre']:.2f}×**; "
        f"DARK vs argmax MRE = {ratios['dark_over_argmax_mre']:.2f}; shared / per-landmark "
        f"fine MRE = {ratios['shared_over_per_landmark_mre']:.2f}; inference / image load time "
        f"= {ratios['inference_over_load']:.2f}.",
        f"Total training (coarse + per-landmark fine): {meta['total_train_s'] / 60:.1f} min. "
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--work", type=Path, default=ROOT / ".work" / "detector")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--config", default="phantom_demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    work: Path = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    spec = generate_phantom(work / "phantom", n_cases=args.cases, seed=0, size=args.size)
    ds = load_dataset(spec)
    cfg = apply_overrides(load_config(args.config), args.overrides)

    t0 = time.perf_counter()
    run_a = train_run(
        ds, cfg, work / "run_per_landmark", fold=0, stages=("coarse",), progress=False
    )
    coarse_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_run(
        ds, cfg, work / "run_per_landmark", fold=0, stages=("fine",), resume=True, progress=False
    )
    fine_s = time.perf_counter() - t0
    shared_dir = work / "run_shared"
    shared_dir.mkdir()
    shutil.copytree(work / "run_per_landmark" / "coarse", shared_dir / "coarse")
    cfg_shared = replace(cfg, fine=replace(cfg.fine, sharing="shared"))
    t0 = time.perf_counter()
    train_run(ds, cfg_shared, shared_dir, fold=0, stages=("fine",), progress=False)
    shared_s = time.perf_counter() - t0

    test_ids = run_a.split.test
    rows = []
    variants = [
        ("coarse only (ResNet regression)", work / "run_per_landmark", "coarse", None, coarse_s),
        (
            "coarse + fine per-landmark, DARK",
            work / "run_per_landmark",
            "fine",
            None,
            coarse_s + fine_s,
        ),
        (
            "coarse + fine per-landmark, argmax",
            work / "run_per_landmark",
            "fine",
            "argmax",
            coarse_s + fine_s,
        ),
        ("coarse + fine shared, DARK", shared_dir, "fine", None, coarse_s + shared_s),
    ]
    for name, run, stage, decode, train_s in variants:
        predictor = Predictor(run, device="cpu", stage=stage)  # type: ignore[arg-type]
        if decode is not None:
            predictor.config = replace(
                predictor.config, fine=replace(predictor.config.fine, decode=decode)
            )
        pred_dir = work / "pred" / name.split(",")[0].replace(" ", "_") / (decode or "dark")
        times = _predict_all(predictor, ds, test_ids, pred_dir)
        result = evaluate(pred_dir, ds, cases=test_ids)
        rows.append(_row(name, result, times, train_s))
        print(f"{name}: MRE {format_mre(result.summary)} mm", flush=True)

    coarse, fine, argmax, shared = rows
    meta = {
        "date": dt.date.today().isoformat(),
        "suite": "phantom",
        "cases": args.cases,
        "size": args.size,
        "test_cases": test_ids,
        "config": cfg.to_dict(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "make bench  (python benchmarks/bench_detector.py "
        + " ".join(sys.argv[1:])
        + ")",
        "total_train_s": coarse_s + fine_s,
        "ratios": {
            "coarse_over_fine_mre": coarse["mre_mm"] / fine["mre_mm"],
            "dark_over_argmax_mre": fine["mre_mm"] / argmax["mre_mm"],
            "shared_over_per_landmark_mre": shared["mre_mm"] / fine["mre_mm"],
            "inference_over_load": fine["inference_s"] / fine["load_s"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-detector"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = _markdown(rows, meta)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
