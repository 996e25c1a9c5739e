"""Ablation of the correlated-landmark model on the phantom, like the paper's ablation table.

Every row uses the same data, split, seed, coarse model, patch settings and epoch budget:

1. ``independent (fine U-Nets)`` — the fine stage's per-landmark U-Nets at the coarse centres;
2. ``independent, key-slice centres`` — the correlated model with fusion, attention and slice
   detection off (L independent U-Nets on patches reset onto the shared key slice);
3. ``+ feature fusion``;
4. ``+ axis attention``;
5. ``+ slice detection`` (the full model; final coordinates put on the detected key slice),
   also decoded with ``combine=heatmap`` and ``combine=mean`` to benchmark that choice.

Reported per row: per-landmark MRE (mm) of the held-out fold, the group's MRE, and the
disagreement of the group along its axis (mean |difference of the members' positions along
the group axis| in mm — 0 means they share a slice, as the annotators' do).
Writes ``benchmarks/results/<date>-ablation.json`` and ``.md``.
Usage: ``python benchmarks/bench_ablation.py [--cases 30] [--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landmark3d.config import ExperimentConfig, apply_overrides, load_config
from landmark3d.data.dataset import load_dataset
from landmark3d.data.phantom import generate_phantom
from landmark3d.engine.run import train_run
from landmark3d.geometry.space import Geometry
from landmark3d.inference.predictor import Predictor
from landmark3d.inference.steps import group_axis
from landmark3d.io.images import read_image
from landmark3d.prior import canonical_geometry

ROOT = Path(__file__).resolve().parent

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    (
        "independent, key-slice centres",
        dict(use_fusion=False, use_axis_attention=False, use_slice_detection=False),
    ),
    (
        "+ feature fusion",
        dict(use_fusion=True, use_axis_attention=False, use_slice_detection=False),
    ),
    ("+ axis attention", dict(use_fusion=True, use_axis_attention=True, use_slice_detection=False)),
    (
        "+ slice detection (full)",
        dict(use_fusion=True, use_axis_attention=True, use_slice_detection=True),
    ),
]


def _evaluate(
    predictor: Predictor, ds: Any, ids: list[str], group: dict[str, Any]
) -> dict[str, Any]:
    """Per-landmark MRE and the group's along-axis disagreement over ``ids``."""
    names = predictor.landmark_names
    axis = group_axis(group)
    rows = [names.index(n) for n in group["landmarks"]]
    errors, spread, times = [], [], []
    for cid in ids:
        image = read_image(ds.case(cid).image)
        t0 = time.perf_counter()
        pred = predictor.predict(image)
        times.append(time.perf_counter() - t0)
        truth = ds.read_landmarks(cid).subset(names).coords
        errors.append(np.linalg.norm(pred.landmarks.coords - truth, axis=1))
        geo = canonical_geometry(Geometry.from_sitk(image))
        along = geo.world_to_index(pred.landmarks.coords[rows])[:, axis] * geo.spacing[axis]
        pairs = [abs(a - b) for i, a in enumerate(along) for b in along[i + 1 :]]
        spread.append(float(np.mean(pairs)))
    err = np.stack(errors)
    per = {n: float(np.nanmean(err[:, i])) for i, n in enumerate(names)}
    return {
        "per_landmark_mre_mm": per,
        "group_mre_mm": float(np.nanmean(err[:, rows])),
        "other_mre_mm": float(np.nanmean(np.delete(err, rows, axis=1))),
        "mre_mm": float(np.nanmean(err)),
        "group_axis_disagreement_mm": float(np.mean(spread)),
        "inference_s": float(np.median(times)),
    }


def _markdown(rows: list[dict[str, Any]], group: list[str], meta: dict[str, Any]) -> str:
    names = list(rows[0]["per_landmark_mre_mm"])
    head = (
        "| variant | "
        + " | ".join(names)
        + " | group MRE | others MRE | group disagreement along axis (mm) | train s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per = " | ".join(f"{r['per_landmark_mre_mm'][n]:.2f}" for n in names)
        lines.append(
            f"| {r['variant']} | {per} | {r['group_mre_mm']:.2f} | {r['other_mre_mm']:.2f} | "
            f"{r['group_axis_disagreement_mm']:.2f} | {r['train_s']:.0f} |"
        )
    lines += [
        "",
        f"Group: {', '.join(group)} (axis {meta['axis']}). Held-out fold 0 of {meta['cases']} phantom "
        f"cases; MRE in mm. Ambiguous member {meta['ambiguous']}: full model vs independent "
        f"fine U-Nets = {meta['ambiguous_change_percent']:+.1f} %; other landmarks "
        f"{meta['others_change_percent']:+.1f} %.",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--work", type=Path, default=ROOT / ".work" / "ablation")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--config", default="phantom_demo")
    parser.add_argument("--ambiguous", default="occ_bone")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    work: Path = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    spec = generate_phantom(work / "phantom", n_cases=args.cases, seed=0, size=args.size)
    ds = load_dataset(spec)
    cfg: ExperimentConfig = apply_overrides(load_config(args.config), args.overrides)

    base = work / "base"
    t0 = time.perf_counter()
    result = train_run(ds, cfg, base, fold=0, stages=("coarse", "fine"), progress=False)
    base_s = time.perf_counter() - t0
    if not result.plan.correlated_groups:
        raise SystemExit("the phantom's plan has no correlated group: nothing to ablate")
    group = result.plan.correlated_groups[0]
    test_ids = result.split.test

    rows: list[dict[str, Any]] = []
    independent = _evaluate(Predictor(base, device="cpu", stage="fine"), ds, test_ids, group)
    rows.append(
        {"variant": "independent (fine U-Nets, coarse centres)", "train_s": base_s, **independent}
    )
    print(f"{rows[-1]['variant']}: group {independent['group_mre_mm']:.2f} mm", flush=True)
    full_dir = None
    for name, switches in VARIANTS:
        run = work / name.split(" (")[0].replace(" ", "_").replace("+", "plus").replace(",", "")
        run.mkdir()
        shutil.copytree(base / "coarse", run / "coarse")
        shutil.copytree(base / "fine", run / "fine")
        vcfg = replace(cfg, correlated=replace(cfg.correlated, **switches))
        t0 = time.perf_counter()
        train_run(ds, vcfg, run, fold=0, stages=("correlated",), progress=False)
        train_s = time.perf_counter() - t0
        predictor = Predictor(run, device="cpu", stage="correlated")
        rows.append(
            {"variant": name, "train_s": train_s, **_evaluate(predictor, ds, test_ids, group)}
        )
        print(f"{name}: group {rows[-1]['group_mre_mm']:.2f} mm", flush=True)
        full_dir = run
    assert full_dir is not None
    for combine in ("heatmap", "mean"):
        predictor = Predictor(full_dir, device="cpu", stage="correlated")
        predictor.config = replace(
            predictor.config, correlated=replace(predictor.config.correlated, combine=combine)
        )
        rows.append(
            {
                "variant": f"full, combine={combine}",
                "train_s": rows[4]["train_s"],
                **_evaluate(predictor, ds, test_ids, group),
            }
        )

    amb = args.ambiguous
    full = rows[4]
    others = [n for n in full["per_landmark_mre_mm"] if n not in group["landmarks"]]
    change_amb = 100.0 * (
        full["per_landmark_mre_mm"][amb] / independent["per_landmark_mre_mm"][amb] - 1.0
    )
    group_others = [n for n in group["landmarks"] if n != amb]
    change_others = 100.0 * max(
        full["per_landmark_mre_mm"][n] / independent["per_landmark_mre_mm"][n] - 1.0
        for n in group_others + others
    )
    meta = {
        "date": dt.date.today().isoformat(),
        "suite": "phantom-ablation",
        "cases": args.cases,
        "test_cases": test_ids,
        "group": group,
        "axis": group.get("axis"),
        "ambiguous": amb,
        "ambiguous_change_percent": change_amb,
        "others_change_percent": change_others,
        "config": cfg.to_dict(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "make bench  (python benchmarks/bench_ablation.py)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-ablation"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = _markdown(rows, list(group["landmarks"]), meta)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
