"""The benchmark suite: every method on the same data, split, seed and CPU budget.

Methods (rows of the table, :data:`METHODS`):

* ``onestage`` — one-stage 3D U-Net heatmap regression (:mod:`landmark3d.baselines.onestage`);
* ``atlas`` — multi-atlas affine registration, median of the k best (:mod:`.atlas`); the
  atlases are the training + validation cases (the learned methods train on the training
  cases and select checkpoints on the validation cases);
* ``coarse`` — the coarse ResNet regression alone;
* ``fine_per_landmark`` / ``fine_shared`` — coarse + independent fine U-Nets, one per landmark
  or one shared (the same coarse model);
* ``full`` — the prior-guided method: coarse + fine (per landmark) + the correlated-group
  key-slice model (equal to ``fine_per_landmark`` when the plan has no group).

Measurements, each job in a fresh ``spawn`` child process when ``isolate`` (the default):

* **training time** — the sum of the epoch times in each stage's ``train.log`` (training +
  validation, without data preparation), summed over the stages a method uses; the atlas'
  "training" is preparing (downsampling) its atlases;
* **inference time per case** — each test case is predicted ``repeat`` times, the per-case
  median is taken, then the median over cases; reading the image is timed the same way and is
  the reference of the ``inference / read`` ratio (files are in the OS cache after the first
  read);
* **peak memory** — the peak resident set size (:func:`peak_rss_mb`: ``VmHWM`` on Linux,
  else ``ru_maxrss``) of the child process that ran the job (peak resident set size, MiB; includes the Python + torch runtime). A child that
  only imports the same modules and reads the test images is the reference (``reference``
  row of ``meta.memory``). tracemalloc is not used: it does not see torch's allocations.
  Without isolation the figures are the orchestrating process' cumulative peak (reported as
  None).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import re
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from landmark3d.baselines.atlas import AtlasConfig, AtlasPredictor
from landmark3d.baselines.onestage import OneStageConfig
from landmark3d.config import ExperimentConfig
from landmark3d.data.dataset import load_dataset
from landmark3d.io.images import read_image
from landmark3d.io.landmarks import write_landmarks

METHODS: tuple[str, ...] = (
    "onestage",
    "atlas",
    "coarse",
    "fine_per_landmark",
    "fine_shared",
    "full",
)
LABELS = {
    "onestage": "3D U-Net, one stage (heatmaps on the whole volume)",
    "atlas": "atlas registration (affine MI, median of k best)",
    "coarse": "coarse only (ResNet regression)",
    "fine_per_landmark": "coarse + independent fine, per-landmark U-Nets",
    "fine_shared": "coarse + independent fine, one shared U-Net",
    "full": "full prior-guided (correlated groups)",
}
THRESHOLDS = ("2", "2.5", "3", "4", "8")
_EPOCH_LINE = re.compile(r"epoch \d+/\d+ done in ([0-9.]+)s")


# ---------------------------------------------------------------------------- processes
def _budget(threads: int | None) -> None:
    """The same CPU budget in every job: torch and ITK thread counts."""
    import SimpleITK as sitk
    import torch

    if threads:
        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    On Linux ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` survives ``exec``, so a
    spawned child would report at least its parent's resident size at the fork. Elsewhere
    ``ru_maxrss`` (KiB; bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(kib) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def run_job(fn: Callable[..., dict[str, Any]], *args: Any, isolate: bool = True) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh ``spawn`` child (``isolate``) or in this process.

    The child's result gets ``peak_rss_mb``; in-process runs get None there (the process'
    peak would include every earlier job).
    """
    if not isolate:
        out = fn(*args)
        out["peak_rss_mb"] = None
        return out
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measured, fn, *args).result()


def _measured(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    out = fn(*args)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ---------------------------------------------------------------------------- training jobs
def stage_train_seconds(stage_dir: Path) -> float | None:
    """Sum of the epoch times logged in ``stage_dir/train.log`` (None if there is no log)."""
    log = stage_dir / "train.log"
    if not log.is_file():
        return None
    return sum(float(m.group(1)) for m in _EPOCH_LINE.finditer(log.read_text(encoding="utf-8")))


def _has_best(run: Path, stage: str) -> bool:
    return (run / stage / "checkpoints" / "best").is_dir()


def train_main_job(
    spec: str, config: ExperimentConfig, run: str, fold: int | None, stages: Sequence[str]
) -> dict[str, Any]:
    """Train ``stages`` of the main method into ``run`` (resuming what exists)."""
    from landmark3d.engine.run import train_run

    _budget(config.num_threads)
    t0 = time.perf_counter()
    ds = load_dataset(spec)
    for stage in stages:
        train_run(ds, config, run, fold=fold, stages=(stage,), resume=True, progress=False)
    return {"wall_s": time.perf_counter() - t0}


def train_onestage_job(
    spec: str, config: ExperimentConfig, onestage: OneStageConfig, run: str, fold: int | None,
    cache: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Train the one-stage baseline into ``run/onestage``."""
    from landmark3d.baselines.onestage import train_onestage

    _budget(config.num_threads)
    t0 = time.perf_counter()
    train_onestage(load_dataset(spec), config, run, fold, onestage, resume=True, cache_dir=cache)
    return {"wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- inference jobs
def _predictor(method: str, run: str | None, spec: str, atlas_ids: Sequence[str],
               atlas_cfg: AtlasConfig) -> Any:  # fmt: skip
    if method == "atlas":
        return AtlasPredictor.from_dataset(load_dataset(spec), atlas_ids, atlas_cfg)
    if method == "onestage":
        from landmark3d.baselines.onestage import OneStagePredictor

        return OneStagePredictor(run or "", device="cpu")
    from landmark3d.inference.predictor import Predictor

    stage = {"coarse": "coarse", "full": "auto"}.get(method, "fine")
    return Predictor(run or "", device="cpu", stage=stage)  # type: ignore[arg-type]


def infer_job(
    method: str, run: str | None, spec: str, test_ids: Sequence[str], out_dir: str,
    repeat: int, threads: int | None, atlas_ids: Sequence[str], atlas_cfg: AtlasConfig,
) -> dict[str, Any]:  # fmt: skip
    """Predict ``test_ids`` with ``method`` into ``out_dir``; timings are medians of repeats.

    Returns ``{"prepare_s", "load_s", "inference_s", "stage_used"}`` (seconds; medians over
    cases of per-case medians over ``repeat`` runs).
    """
    _budget(threads)
    ds = load_dataset(spec)
    t0 = time.perf_counter()
    predictor = _predictor(method, run, spec, atlas_ids, atlas_cfg)
    prepare_s = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loads, infers = [], []
    for cid in test_ids:
        path = ds.case(cid).image
        case_loads, case_infers = [], []
        pred = None
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            image = read_image(path)
            t1 = time.perf_counter()
            pred = predictor.predict(image)
            case_loads.append(t1 - t0)
            case_infers.append(time.perf_counter() - t1)
        assert pred is not None
        write_landmarks(pred.landmarks, out / f"{cid}.json", overwrite=True)
        loads.append(statistics.median(case_loads))
        infers.append(statistics.median(case_infers))
    return {
        "prepare_s": prepare_s,
        "load_s": statistics.median(loads),
        "inference_s": statistics.median(infers),
        "stage_used": str(getattr(predictor, "stage", method)),
    }


def reference_job(spec: str, test_ids: Sequence[str], threads: int | None) -> dict[str, Any]:
    """The memory reference: the same imports, reading the test images, nothing else."""
    import torch  # noqa: F401  (the runtime every learned method pays for)

    from landmark3d.inference.predictor import Predictor  # noqa: F401

    _budget(threads)
    ds = load_dataset(spec)
    for cid in test_ids:
        read_image(ds.case(cid).image)
    return {}


# ---------------------------------------------------------------------------- the suite
@dataclasses.dataclass
class SuiteSettings:
    """What one suite run does.

    Attributes:
        spec: dataset spec (``dataset.json``) or original-layout directory.
        config: the experiment config of every learned method.
        fold: the test fold.
        work: working directory (runs and predictions).
        onestage, atlas: baseline settings.
        methods: rows to produce (subset of :data:`METHODS`).
        repeat, atlas_repeat: timing repeats per test case (learned methods / atlas).
        isolate: run every job in a fresh child process (peak memory per job).
        reuse: a ``bench_detector.py`` work directory whose runs are reused if compatible.
    """

    spec: Path
    config: ExperimentConfig
    fold: int
    work: Path
    onestage: OneStageConfig = dataclasses.field(default_factory=OneStageConfig)
    atlas: AtlasConfig = dataclasses.field(default_factory=AtlasConfig)
    methods: tuple[str, ...] = METHODS
    repeat: int = 3
    atlas_repeat: int = 1
    isolate: bool = True
    reuse: Path | None = None


def _same_config(run: Path, config: ExperimentConfig, ignore: Sequence[str] = ()) -> bool:
    """Whether ``run`` was trained with ``config``, sections named in ``ignore`` aside."""
    path = run / "config.json"
    if not path.is_file():
        return False
    saved, want = ExperimentConfig.from_json(path).to_dict(), config.to_dict()
    return all(saved.get(k) == want.get(k) for k in set(saved) | set(want) if k not in ignore)


def _same_split(run: Path, split: dict[str, Any]) -> bool:
    path = run / "split.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text(encoding="utf-8"))
    return all(saved.get(k) == split[k] for k in ("fold", "train", "val", "test"))


def _copy_run(src: Path, dst: Path, stages: Sequence[str]) -> None:
    """Copy a run's top-level files, cache and ``stages`` into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "plan.json", "split.json"):
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
    for d in ("cache", *stages):
        if (src / d).is_dir() and not (dst / d).exists():
            shutil.copytree(src / d, dst / d)


def _reusable(settings: SuiteSettings, split: dict[str, Any]) -> dict[str, Path]:
    """Runs of a ``bench_detector.py`` work dir that match this suite (same config, split)."""
    out: dict[str, Path] = {}
    if settings.reuse is None:
        return out
    main, shared = settings.reuse / "run_per_landmark", settings.reuse / "run_shared"
    cfg_shared = dataclasses.replace(
        settings.config, fine=dataclasses.replace(settings.config.fine, sharing="shared")
    )
    # The correlated section does not shape the coarse and fine stages that are reused (the
    # correlated stage is always trained here), so a change there keeps them reusable.
    ignore = ("correlated",)
    main_ok = _same_config(main, settings.config, ignore) and _same_split(main, split)
    if main_ok and _has_best(main, "coarse") and _has_best(main, "fine"):
        out["main"] = main
    shared_ok = _same_config(shared, cfg_shared, ignore) and _same_split(shared, split)
    if "main" in out and shared_ok and _has_best(shared, "fine"):
        out["shared"] = shared
    return out


def _row(method: str, summary: dict[str, Any], times: dict[str, Any], train_s: float | None,
         train_rss: float | None, note: str) -> dict[str, Any]:  # fmt: skip
    mre, sd = summary["mre"], summary["sd"]
    return {
        "method": method,
        "label": LABELS[method],
        "mre_mm": mre,
        "sd_mm": sd,
        "median_mm": summary["median"],
        "sdr_percent": summary["sdr"],
        "per_landmark_mre_mm": {k: v["mre"] for k, v in summary["per_landmark"].items()},
        "n_evaluated": summary["n_evaluated"],
        "n_missing_prediction": summary["n_missing_prediction"],
        "train_s": train_s,
        "train_peak_rss_mb": train_rss,
        "inference_s": times["inference_s"],
        "load_s": times["load_s"],
        "prepare_s": times["prepare_s"],
        "inference_over_load": times["inference_s"] / max(times["load_s"], 1e-9),
        "peak_rss_mb": times["peak_rss_mb"],
        "mre_sd": "n/a" if mre is None else f"{mre:.2f} ({'n/a' if sd is None else f'{sd:.2f}'})",
        "note": note,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run_suite(settings: SuiteSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or reuse) and evaluate every method; returns ``{"meta": ..., "rows": [...]}``."""
    from landmark3d.engine.run import make_split
    from landmark3d.evaluation import evaluate

    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    cfg, work, spec = settings.config, settings.work, str(settings.spec)
    ds = load_dataset(spec)
    split = make_split(ds, settings.fold, cfg.seed).to_dict()
    test_ids = list(split["test"])
    if not test_ids:
        raise ValueError(f"fold {settings.fold} has no test cases")
    work.mkdir(parents=True, exist_ok=True)
    iso = settings.isolate
    threads = cfg.num_threads
    wanted = set(settings.methods)
    main, shared, one = work / "main", work / "shared", work / "onestage"
    reused = _reusable(settings, split)
    train_rss: dict[str, float | None] = {}
    train_wall: dict[str, float] = {}

    need_main = wanted & {"coarse", "fine_per_landmark", "full", "fine_shared"}
    if need_main:
        if "main" in reused:
            log(f"reusing coarse + fine from {reused['main']}")
            _copy_run(reused["main"], main, ("coarse", "fine"))
            cfg.save_json(main / "config.json")  # this suite's config (correlated may differ)
        stages = [s for s in ("coarse", "fine") if not _has_best(main, s)]
        if "full" in wanted:
            stages.append("correlated")  # resumes (or skips) when already trained
        log(f"training main method stages {stages}")
        res = run_job(train_main_job, spec, cfg, str(main), settings.fold, stages, isolate=iso)
        train_rss["main"], train_wall["main"] = res["peak_rss_mb"], res["wall_s"]
    if "fine_shared" in wanted:
        cfg_shared = dataclasses.replace(cfg, fine=dataclasses.replace(cfg.fine, sharing="shared"))
        if "shared" in reused:
            log(f"reusing the shared fine model from {reused['shared']}")
            _copy_run(reused["shared"], shared, ("coarse", "fine"))
            cfg_shared.save_json(shared / "config.json")
        else:
            _copy_run(main, shared, ("coarse",))
            (shared / "config.json").unlink(missing_ok=True)
            cfg_shared.save_json(shared / "config.json")
        if not _has_best(shared, "fine"):
            log("training the shared fine model")
            res = run_job(
                train_main_job, spec, cfg_shared, str(shared), settings.fold, ["fine"], isolate=iso
            )
            train_rss["shared"], train_wall["shared"] = res["peak_rss_mb"], res["wall_s"]
    if "onestage" in wanted and not _has_best(one, "onestage"):
        log("training the one-stage U-Net")
        one.mkdir(parents=True, exist_ok=True)
        for f in ("plan.json", "split.json"):  # the main method's plan: same preprocessing
            if (main / f).is_file() and not (one / f).exists():
                shutil.copy2(main / f, one / f)
        cache = str(main / "cache") if (main / "cache").is_dir() else None
        res = run_job(
            train_onestage_job, spec, cfg, settings.onestage, str(one), settings.fold, cache,
            isolate=iso,
        )  # fmt: skip
        train_rss["onestage"], train_wall["onestage"] = res["peak_rss_mb"], res["wall_s"]

    secs = {
        "coarse": stage_train_seconds(main / "coarse"),
        "fine": stage_train_seconds(main / "fine"),
        "correlated": stage_train_seconds(main / "correlated"),
        "shared": stage_train_seconds(shared / "fine"),
        "onestage": stage_train_seconds(one / "onestage"),
    }

    def total(*keys: str) -> float | None:
        vals = [secs[k] for k in keys]
        return None if any(v is None for v in vals) else float(sum(v for v in vals if v))

    has_groups = _has_best(main, "correlated")
    plan = {
        "onestage": (one, total("onestage"), train_rss.get("onestage"), ""),
        "atlas": (None, None, None, ""),
        "coarse": (main, total("coarse"), train_rss.get("main"), ""),
        "fine_per_landmark": (main, total("coarse", "fine"), train_rss.get("main"), ""),
        "fine_shared": (shared, total("coarse", "shared"), train_rss.get("shared"), ""),
        "full": (
            main,
            total("coarse", "fine", "correlated") if has_groups else total("coarse", "fine"),
            train_rss.get("main"),
            "" if has_groups else "no correlated group in the plan: same as per-landmark fine",
        ),
    }
    atlas_ids = list(split["train"]) + list(split["val"])
    log("memory reference (imports + reading the test images)")
    ref = run_job(reference_job, spec, test_ids, threads, isolate=iso)
    rows = []
    for method in METHODS:
        if method not in wanted:
            continue
        run, train_s, rss, note = plan[method]
        repeat = settings.atlas_repeat if method == "atlas" else settings.repeat
        pred_dir = work / "pred" / method
        if pred_dir.exists():
            shutil.rmtree(pred_dir)
        log(f"predicting the {len(test_ids)} test cases with {method}")
        times = run_job(
            infer_job, method, None if run is None else str(run), spec, test_ids, str(pred_dir),
            repeat, threads, atlas_ids, settings.atlas, isolate=iso,
        )  # fmt: skip
        if method == "atlas":
            train_s = times["prepare_s"]
        summary = evaluate(pred_dir, ds, cases=test_ids).summary.to_dict()
        rows.append(_row(method, summary, times, train_s, rss, note))
        log(f"  {LABELS[method]}: MRE {rows[-1]['mre_sd']} mm")

    by = {r["method"]: r for r in rows}

    def mre(m: str) -> float | None:
        return by[m]["mre_mm"] if m in by else None

    ratios = {
        "mre_onestage_over_full": _ratio(mre("onestage"), mre("full")),
        "mre_coarse_over_full": _ratio(mre("coarse"), mre("full")),
        "mre_atlas_over_full": _ratio(mre("atlas"), mre("full")),
        "inference_over_load": {r["method"]: r["inference_over_load"] for r in rows},
        "inference_full_over_onestage": _ratio(
            by.get("full", {}).get("inference_s"), by.get("onestage", {}).get("inference_s")
        ),
        "train_full_over_onestage": _ratio(
            by.get("full", {}).get("train_s"), by.get("onestage", {}).get("train_s")
        ),
        "peak_rss_over_reference": {
            r["method"]: _ratio(r["peak_rss_mb"], ref["peak_rss_mb"]) for r in rows
        },
    }
    mre_one, mre_coarse = ratios["mre_onestage_over_full"], ratios["mre_coarse_over_full"]
    targets = {
        "full_vs_onestage_at_least_3x": None
        if not isinstance(mre_one, float)
        else bool(mre_one >= 3.0),
        "full_vs_coarse_at_least_2x": None
        if not isinstance(mre_coarse, float)
        else bool(mre_coarse >= 2.0),
    }
    meta = {
        "dataset": spec,
        "fold": settings.fold,
        "split": split,
        "test_cases": test_ids,
        "landmarks": list(ds.landmark_names),
        "config": cfg.to_dict(),
        "onestage": settings.onestage.to_dict(),
        "atlas": dataclasses.asdict(settings.atlas),
        "repeat": settings.repeat,
        "atlas_repeat": settings.atlas_repeat,
        "isolated_processes": iso,
        "reused": {k: str(v) for k, v in reused.items()},
        "train_wall_s": train_wall,
        "memory": {
            "measure": "peak resident set size (VmHWM on Linux) of a fresh spawn child per "
            "job (MiB, includes the Python/torch runtime)",
            "reference_peak_rss_mb": ref["peak_rss_mb"],
        },
        "ratios": ratios,
        "targets": targets,
    }
    return {"meta": meta, "rows": rows}
