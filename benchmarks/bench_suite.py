"""The comparison table: every method on the same data, split, seed and CPU budget (``make bench``).

Rows: one-stage 3D U-Net (heatmaps on the whole downsampled volume), atlas registration
(SimpleITK affine MI, median of the k best atlases), coarse-only ResNet regression, coarse +
independent fine U-Nets (per-landmark and shared), and the full prior-guided method
(correlated groups). Columns: MRE (SD), median, SDR@2/2.5/3/4/8 mm, per-landmark MRE, training
time, inference time per case (median of repeats), inference / image-read time, peak memory
(``ru_maxrss`` of a fresh process per job). See :mod:`landmark3d.baselines.suite`.

Suites:

* ``phantom`` (default): the embedded synthetic phantom (30 cases, seed 0, 96 voxels), fold 0,
  ``configs/phantom_demo.yaml``. ``--reuse [DIR]`` reuses the coarse/fine runs of
  ``bench_detector.py`` (default ``benchmarks/.work/detector``) when their config and split
  match (their phantom is then the data); everything else is trained here.
* ``dataset --dataset PATH [--fold k]``: any dataset spec or original layout.

Writes ``benchmarks/results/<date>-<suite>.json`` and ``.md`` and prints the table.
Usage: ``python benchmarks/bench_suite.py [phantom|dataset] [--dataset PATH] [--fold 0]
[--cases 30] [--size 96] [--reuse [DIR]] [--methods onestage,atlas,...] [--set key=value]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

from landmark3d.baselines.atlas import AtlasConfig
from landmark3d.baselines.onestage import OneStageConfig
from landmark3d.baselines.suite import METHODS, SuiteSettings, run_suite
from landmark3d.baselines.suite_report import markdown
from landmark3d.config import apply_overrides, load_config
from landmark3d.data.phantom import generate_phantom

ROOT = Path(__file__).resolve().parent


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("suite", nargs="?", default="phantom", choices=("phantom", "dataset"))
    p.add_argument("--dataset", type=Path, help="dataset.json or original layout (suite dataset)")
    p.add_argument("--fold", type=int, default=0, help="test fold")
    p.add_argument("--cases", type=int, default=30, help="phantom cases")
    p.add_argument("--size", type=int, default=96, help="phantom voxels along the longest axis")
    p.add_argument("--config", default="phantom_demo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats per case")
    p.add_argument("--atlas-repeat", type=int, default=1, help="timing repeats (atlas)")
    p.add_argument("--atlas-k", type=int, default=5)
    p.add_argument("--onestage-epochs", type=int, default=None, help="default: coarse.epochs")
    p.add_argument("--onestage-grid", type=int, nargs=3, default=None)
    p.add_argument("--onestage-channels", type=int, nargs="+", default=None)
    p.add_argument(
        "--reuse",
        type=Path,
        nargs="?",
        const=ROOT / ".work" / "detector",
        default=None,
        help="reuse bench_detector.py runs from DIR (default benchmarks/.work/detector)",
    )
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--no-isolate", action="store_true", help="run every job in this process")
    p.add_argument("--keep", action="store_true", help="keep (resume) an existing work dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cfg = apply_overrides(load_config(args.config), args.overrides)
    torch.set_num_threads(cfg.num_threads or 2)
    work: Path = args.work or ROOT / ".work" / f"suite-{args.suite}"
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    reuse = args.reuse
    if args.suite == "dataset":
        if args.dataset is None:
            raise SystemExit("the dataset suite needs --dataset PATH")
        spec = args.dataset
        reuse = None
    elif reuse is not None and (reuse / "phantom" / "dataset.json").is_file():
        spec = reuse / "phantom" / "dataset.json"
    else:
        reuse = None
        spec = work / "phantom" / "dataset.json"
        if not spec.is_file():
            generate_phantom(work / "phantom", n_cases=args.cases, seed=0, size=args.size)
    onestage = OneStageConfig(epochs=args.onestage_epochs or cfg.coarse.epochs)
    if args.onestage_grid:
        onestage = dataclasses.replace(onestage, grid=tuple(args.onestage_grid))
    if args.onestage_channels:
        onestage = dataclasses.replace(onestage, channels=tuple(args.onestage_channels))
    settings = SuiteSettings(
        spec=spec,
        config=cfg,
        fold=args.fold,
        work=work,
        onestage=onestage,
        atlas=AtlasConfig(k=args.atlas_k, threads=cfg.num_threads),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        repeat=args.repeat,
        atlas_repeat=args.atlas_repeat,
        isolate=not args.no_isolate,
        reuse=reuse,
    )
    result = run_suite(settings, log=lambda m: print(m, flush=True))
    meta = result["meta"]
    meta["date"] = dt.date.today().isoformat()
    meta["suite"] = args.suite
    if args.suite == "phantom":
        meta["phantom"] = {"cases": args.cases, "size": args.size, "seed": 0}
    meta["machine"] = (
        f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{cfg.num_threads or torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    meta["command"] = "python benchmarks/bench_suite.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-{args.suite}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
