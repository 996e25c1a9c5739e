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
import sys
from pathlib import Path

from landmark3d.baselines.suite import METHODS
from landmark3d.baselines.suite_command import BenchRequest, run_bench
from landmark3d.config import apply_overrides, load_config

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
    req = BenchRequest(
        suite=args.suite,
        config=cfg,
        work=args.work or ROOT / ".work" / f"suite-{args.suite}",
        out=args.out,
        dataset=args.dataset,
        fold=args.fold,
        cases=args.cases,
        size=args.size,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        repeat=args.repeat,
        atlas_repeat=args.atlas_repeat,
        atlas_k=args.atlas_k,
        onestage_epochs=args.onestage_epochs,
        onestage_grid=(*args.onestage_grid,) if args.onestage_grid else None,
        onestage_channels=tuple(args.onestage_channels) if args.onestage_channels else None,
        reuse=args.reuse,
        isolate=not args.no_isolate,
        keep=args.keep,
        overwrite=True,  # a benchmark re-run of the same day replaces its own result
        command="python benchmarks/bench_suite.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    )
    _, _, md_path = run_bench(req, log=lambda m: print(m, flush=True))
    print(md_path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
