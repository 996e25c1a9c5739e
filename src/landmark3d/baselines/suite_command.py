"""One entry point for the comparison table, shared by ``landmark3d bench`` and
``benchmarks/bench_suite.py``: choose the data, run :func:`~landmark3d.baselines.suite.run_suite`,
write ``<out>/<date>-<suite>.json`` and ``.md``.

Suites:

* ``phantom``: the embedded synthetic phantom (``cases`` cases, seed 0, ``size`` voxels along
  the longest axis), generated into the work directory; with ``reuse`` the coarse/fine runs of
  ``benchmarks/bench_detector.py`` are reused when their config (correlated section aside) and
  split match, and their phantom is then the data.
* ``dataset``: any dataset spec or original layout the user points at, with its folds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from landmark3d.baselines.atlas import AtlasConfig
from landmark3d.baselines.onestage import OneStageConfig
from landmark3d.baselines.suite import METHODS, SuiteSettings, run_suite
from landmark3d.baselines.suite_report import markdown
from landmark3d.config import ExperimentConfig
from landmark3d.errors import ConfigError, OutputExistsError

SUITES = ("phantom", "dataset")


@dataclass(frozen=True)
class BenchRequest:
    """What to run.

    Attributes:
        suite: ``"phantom"`` or ``"dataset"``.
        config: the experiment config of the learned methods (one budget for all).
        work: working directory (runs, predictions); wiped unless ``keep``.
        out: where ``<date>-<suite>.json`` / ``.md`` are written.
        dataset: dataset spec or original layout (suite ``dataset`` only).
        fold: the held-out test fold.
        cases, size: phantom size (suite ``phantom`` only).
        methods: subset of :data:`~landmark3d.baselines.suite.METHODS`.
        repeat, atlas_repeat: timing repeats per case (learned methods / atlas).
        atlas_k: atlases fused by the median.
        onestage_epochs, onestage_grid, onestage_channels: one-stage U-Net settings
            (``None``: the coarse stage's epochs, the baseline's defaults).
        reuse: a ``bench_detector.py`` work dir whose coarse/fine runs may be reused.
        isolate: run every job in a fresh child process (peak memory per job).
        keep: keep (resume) an existing work directory instead of wiping it.
        command: the command line recorded in the results.
    """

    suite: str
    config: ExperimentConfig
    work: Path
    out: Path
    dataset: Path | None = None
    fold: int = 0
    cases: int = 30
    size: int = 96
    methods: Sequence[str] = METHODS
    repeat: int = 3
    atlas_repeat: int = 1
    atlas_k: int = 5
    onestage_epochs: int | None = None
    onestage_grid: tuple[int, int, int] | None = None
    onestage_channels: tuple[int, ...] | None = None
    reuse: Path | None = None
    isolate: bool = True
    keep: bool = False
    overwrite: bool = False
    command: str = ""
    extra_meta: dict[str, Any] = field(default_factory=dict)


def _check(req: BenchRequest) -> None:
    if req.suite not in SUITES:
        raise ConfigError(f"unknown suite {req.suite!r}.", fix=f"choose from {list(SUITES)}.")
    if req.suite == "dataset" and req.dataset is None:
        raise ConfigError(
            "the dataset suite needs a dataset.",
            fix="pass --dataset PATH (a dataset.json or an original layout).",
        )
    unknown = [m for m in req.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}.", fix=f"choose from {list(METHODS)}.")
    if req.repeat < 1 or req.atlas_repeat < 1:
        raise ConfigError("timing repeats must be at least 1.", fix="pass --repeat 1 or more.")


def _data(req: BenchRequest) -> tuple[Path, Path | None]:
    """The dataset spec to use and the reusable detector work dir (or None)."""
    from landmark3d.data.phantom import generate_phantom

    if req.suite == "dataset":
        assert req.dataset is not None
        return req.dataset, None
    if req.reuse is not None and (req.reuse / "phantom" / "dataset.json").is_file():
        return req.reuse / "phantom" / "dataset.json", req.reuse
    spec = req.work / "phantom" / "dataset.json"
    if not spec.is_file():
        generate_phantom(req.work / "phantom", n_cases=req.cases, seed=0, size=req.size)
    return spec, None


def machine_line(threads: int | None) -> str:
    """``"x86_64, <cpu>, 2 threads, torch 2.13.0+cpu"``: the machine a result was measured on."""
    import torch

    return (
        f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{threads or torch.get_num_threads()} threads, torch {torch.__version__}"
    )


def run_bench(
    req: BenchRequest, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], Path, Path]:
    """Run the suite; returns ``(result, json_path, md_path)``.

    Raises:
        ConfigError: unknown suite/method, the dataset suite without a dataset.
        OutputExistsError: today's result files exist and ``overwrite`` is false (checked
            before anything runs).
    """
    import torch

    from landmark3d.io.atomic import atomic_write_text

    _check(req)
    date = dt.date.today().isoformat()
    stem = req.out / f"{date}-{req.suite}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    for path in (json_path, md_path):
        if path.exists() and not req.overwrite:
            raise OutputExistsError(
                "a benchmark result of today already exists.",
                path=path,
                fix="pass --overwrite to replace it, or choose another --out.",
            )
    torch.set_num_threads(req.config.num_threads or 2)
    if req.work.exists() and not req.keep:
        shutil.rmtree(req.work)
    req.work.mkdir(parents=True, exist_ok=True)
    spec, reuse = _data(req)
    onestage = OneStageConfig(epochs=req.onestage_epochs or req.config.coarse.epochs)
    if req.onestage_grid:
        onestage = dataclasses.replace(onestage, grid=req.onestage_grid)
    if req.onestage_channels:
        onestage = dataclasses.replace(onestage, channels=tuple(req.onestage_channels))
    settings = SuiteSettings(
        spec=spec,
        config=req.config,
        fold=req.fold,
        work=req.work,
        onestage=onestage,
        atlas=AtlasConfig(k=req.atlas_k, threads=req.config.num_threads),
        methods=tuple(req.methods),
        repeat=req.repeat,
        atlas_repeat=req.atlas_repeat,
        isolate=req.isolate,
        reuse=reuse,
    )
    result = run_suite(settings, log=log)
    meta = result["meta"]
    meta.update(req.extra_meta)
    meta["date"] = date
    meta["suite"] = req.suite
    if req.suite == "phantom":
        meta["phantom"] = {"cases": req.cases, "size": req.size, "seed": 0}
    meta["machine"] = machine_line(req.config.num_threads)
    meta["command"] = req.command
    req.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(md_path, markdown(result))
    return result, json_path, md_path
