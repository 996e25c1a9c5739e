"""One training run: plan on the training cases, then train the coarse and fine stages.

Run directory (``RUN``)::

    RUN/config.json        the experiment config used (chosen settings)
    RUN/plan.json          the plan derived from the training cases (derived settings)
    RUN/split.json         dataset, fold, train / validation / test case ids
    RUN/coarse/            trainer output of the coarse stage (metrics.csv, train.log,
                           checkpoints/best, checkpoints/last)
    RUN/fine/              the same for the fine stage (every landmark, independent U-Nets)
    RUN/correlated/        the same for the correlated groups (only when the plan has groups)
    RUN/cache/             prepared (resampled, normalised) cases, unless ``cache_dir`` is given
    RUN/calibration.json   confidence calibration fitted on the validation cases after training
                           (:mod:`landmark3d.engine.calibrate`)

Multi-process (``torchrun``): every rank computes the same split; rank 0 alone writes
config.json, split.json, plan.json (the others receive the plan), prepares the case cache
(the others then read it, and never write it), trains with the others (see
:mod:`landmark3d.engine.distributed`) and calibrates while they wait.

Resume (``resume=True``): a stage with a ``last`` checkpoint continues from it (a finished
stage is kept as is); a stage without one (stopped before its first epoch ended, e.g. while
caching cases) starts over, replacing the files it left.

Splits: with ``fold=k`` the cases of fold k are the *test* cases (never seen in training or
model selection); a validation subset is held out of the remaining annotated cases, at random
with the config's seed, to pick the ``best`` checkpoint: ``val_fraction`` of them, at least 2,
but never more than the training cases (at most half, so 3 cases split 2 + 1). Fewer than 2
training cases are refused before anything is written (batch norm cannot train on one), and
cases without landmarks are left out of training with a warning naming them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landmark3d.config import CoarseConfig, CorrelatedConfig, ExperimentConfig, FineConfig
from landmark3d.data.dataset import Dataset
from landmark3d.data.preprocess import CaseCache
from landmark3d.engine.checkpoint import checkpoint_exists
from landmark3d.engine.correlated_stage import CorrelatedStage
from landmark3d.engine.distributed import DistContext, init_distributed, on_main
from landmark3d.engine.stages import CoarseStage, FineStage
from landmark3d.engine.trainer import TrainerConfig, TrainResult, fit
from landmark3d.errors import ConfigError, DatasetError, OutputExistsError
from landmark3d.io.atomic import atomic_write_text
from landmark3d.io.landmarks import landmark_format
from landmark3d.planning import Plan, make_plan
from landmark3d.prior import discover_groups

STAGES = ("coarse", "fine", "correlated")


@dataclass
class Split:
    """Case ids of a run: ``train`` (fit), ``val`` (model selection), ``test`` (held out)."""

    fold: int | None
    train: list[str]
    val: list[str]
    test: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"fold": self.fold, "train": self.train, "val": self.val, "test": self.test}


MIN_TRAIN_CASES = 2
"""Fewest training cases of a split (batch norm needs more than one value per channel)."""


def n_validation(n_annotated: int, val_fraction: float) -> int:
    """Validation cases held out of ``n_annotated``: ``val_fraction`` of them, at least 2,
    never more than the training cases (at most half); 0 when ``val_fraction`` is 0."""
    if val_fraction <= 0:
        return 0
    return min(max(2, round(val_fraction * n_annotated)), n_annotated // 2)


def make_split(dataset: Dataset, fold: int | None, seed: int, val_fraction: float = 0.15) -> Split:
    """Train/validation/test ids for ``fold`` (None: every case trains; nothing is tested).

    Raises:
        DatasetError: fewer than :data:`MIN_TRAIN_CASES` training cases would remain.

    Warns:
        UserWarning: cases outside the test fold without landmarks (left out of training).
    """
    test: list[str] = []
    if fold is None:
        pool = dataset.case_ids
    else:
        pool, test = dataset.split(fold)
    annotated = [c for c in pool if dataset.has_landmarks(c)]
    unannotated = [c for c in pool if not dataset.has_landmarks(c)]
    where = "of the dataset" if fold is None else f"outside test fold {fold}"
    if unannotated:
        shown = ", ".join(unannotated[:5]) + (
            f" and {len(unannotated) - 5} more" if len(unannotated) > 5 else ""
        )
        warnings.warn(
            f"{dataset.source}: {len(unannotated)} case(s) {where} have no landmarks and are "
            f"left out of training and validation: {shown}",
            UserWarning,
            stacklevel=2,
        )
    n_val = n_validation(len(annotated), val_fraction)
    n_train = len(annotated) - n_val
    if n_train < MIN_TRAIN_CASES:
        without = f" ({len(unannotated)} more without landmarks)" if unannotated else ""
        raise DatasetError(
            f"{'training on every case' if fold is None else f'fold {fold}'} leaves "
            f"{len(annotated)} annotated case(s){without} for training and validation: "
            f"{n_train} training + {n_val} validation; at least {MIN_TRAIN_CASES} training "
            f"cases{' plus 1 validation case' if val_fraction > 0 else ''} are needed.",
            path=dataset.source,
            fix="add annotated cases"
            + (", or train on every case (--fold -1, fold=None)" if fold is not None else "")
            + (", or hold out no validation cases (val_fraction=0)" if n_val else "")
            + ".",
        )
    rng = np.random.default_rng([seed, 7])
    val = {annotated[i] for i in rng.permutation(len(annotated))[:n_val]}
    return Split(
        fold=fold,
        train=[c for c in annotated if c not in val],
        val=[c for c in annotated if c in val],
        test=list(test),
    )


def stage_seed(config: ExperimentConfig, stage: str) -> int:
    """Seed of a stage: its initial weights and its training randomness derive from it."""
    return config.seed + STAGES.index(stage)


def trainer_config(config: ExperimentConfig, stage: str) -> TrainerConfig:
    """Loop settings for ``stage`` from the experiment config."""
    section: CoarseConfig | FineConfig | CorrelatedConfig = config.coarse
    if stage == "fine":
        section = config.fine
    elif stage == "correlated":
        section = config.correlated
    return TrainerConfig(
        epochs=section.epochs,
        val_every=section.val_every,
        seed=stage_seed(config, stage),
        device=config.device,
        amp=config.amp,
        num_threads=config.num_threads,
    )


@dataclass
class RunResult:
    """What :func:`train_run` produced."""

    run_dir: Path
    plan: Plan
    split: Split
    results: dict[str, TrainResult]


def _landmark_format_of(dataset: Dataset) -> str:
    """Format of the dataset's landmark files (predictions default to it); ``json`` if none."""
    for case in dataset.cases:
        if case.landmarks is not None:
            return landmark_format(case.landmarks)
    return "json"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _load_or_make_plan(
    run: Path, dataset: Dataset, config: ExperimentConfig, split: Split, resume: bool
) -> Plan:
    """The run's plan; groups come from the dataset spec or, if it names none and
    ``correlated.discover`` is on, from the annotations of the training cases."""
    plan_path = run / "plan.json"
    if resume and plan_path.exists():
        return Plan.load(plan_path)
    plan = make_plan(dataset, config, split.train + split.val)
    if not plan.correlated_groups and config.correlated.discover:
        groups = discover_groups(dataset, split.train + split.val)
        found = [g.to_dict() for g in groups if not g.coincident]
        plan = dataclasses.replace(plan, correlated_groups=found)
    plan.save(plan_path)
    return plan


def _check_run_dir(
    run: Path, config: ExperimentConfig, stages: Sequence[str], resume: bool, overwrite: bool
) -> None:
    """Refuse, before anything is written, a fresh start in a directory holding a run.

    Without ``resume`` or ``overwrite``, a requested stage that already has checkpoints, logs
    or metrics is refused (the trainer would refuse it too, but only after config.json,
    split.json and plan.json had been replaced), and so is a config other than the run's saved
    one (the other stage's checkpoints would no longer match config.json).
    """
    if resume or overwrite:
        return
    for name in stages:
        stage_dir = run / name
        if any((stage_dir / f).exists() for f in ("checkpoints", "metrics.csv", "train.log")):
            raise OutputExistsError(
                f"the run directory already holds a training run ({name} stage).",
                path=run,
                fix="resume it (--resume), pass --overwrite to start again, "
                "or choose another output.",
            )
    config_path = run / "config.json"
    if config_path.exists():
        saved = ExperimentConfig.from_json(config_path)
        if saved.to_dict() != config.to_dict():
            raise ConfigError(
                "the config differs from the one this run directory was trained with.",
                path=config_path,
                fix="use the same config, pass --overwrite to start again, or choose another output.",
            )


def _check_same_split(split_path: Path, split: Split, resume: bool) -> None:
    """On resume, refuse another fold or other cases than the run was started with."""
    if not (resume and split_path.is_file()):
        return
    saved = json.loads(split_path.read_text(encoding="utf-8"))
    if {k: saved.get(k) for k in ("fold", "train", "val", "test")} != split.to_dict():
        raise ConfigError(
            f"this run was started on fold {saved.get('fold')} with other training/test cases; "
            f"resuming with fold {split.fold} would mix them.",
            path=split_path,
            fix=f"resume with --fold {saved.get('fold')} and the same dataset "
            "(or start a new run directory).",
        )


class _ReadOnlyCaseCache(CaseCache):
    """The cache as ranks other than 0 use it: rank 0's files are read, nothing is written
    (a case missing on disk, e.g. on a node that does not share the run directory, is
    prepared in memory only)."""

    def _store(self, p: Any, key: str) -> None:
        return None


def _warm_cache(cache: CaseCache, dataset: Dataset, ids: Sequence[str], ctx: DistContext) -> None:
    """In a multi-process run rank 0 prepares every case first, so no other rank has to."""
    if not ctx.is_distributed:
        return

    def prepare() -> None:
        for cid in ids:
            cache.get(dataset, cid)

    on_main(prepare, ctx)


def _refuse_coordinate_mistakes(dataset: Dataset, case_ids: list[str]) -> None:
    """Refuse, before anything is written, training cases whose landmarks are certainly in
    the wrong convention (mirrored RAS/LPS, or voxel indices): ``landmark3d verify`` reports
    them as errors, and training on them would teach mirrored anatomy."""
    from landmark3d.data.verify import coordinate_mistakes

    found = coordinate_mistakes(dataset, case_ids)
    if found:
        first = found[0]
        more = f" ({len(found) - 1} more case(s) alike)" if len(found) > 1 else ""
        raise DatasetError(
            f"case {first.case!r}: {first.message}{more}",
            path=first.path,
            fix=f"{first.fix.rstrip('.')}; `landmark3d verify {dataset.source}` lists them all.",
        )


def train_run(
    dataset: Dataset,
    config: ExperimentConfig,
    run_dir: str | Path,
    fold: int | None = 0,
    stages: Sequence[str] = STAGES,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.15,
) -> RunResult:
    """Plan and train the requested stages into ``run_dir`` (see the module docstring).

    Raises:
        ConfigError: unknown stage, or ``resume`` with another config than the run's.
        DatasetError: a training or validation case's landmarks are mirrored (RAS/LPS) or
            voxel indices (nothing is written then); and from the data.
        CheckpointError / OutputExistsError: from the trainer.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}.", fix=f"choose from {list(STAGES)}.")
    run = Path(run_dir)
    config_path = run / "config.json"
    ctx = init_distributed(config.device)  # no-op unless started by torchrun with K > 1
    split = make_split(dataset, fold, config.seed, val_fraction)
    on_main(lambda: _refuse_coordinate_mistakes(dataset, split.train + split.val), ctx)

    def set_up() -> Plan:
        _check_run_dir(run, config, stages, resume, overwrite)
        run.mkdir(parents=True, exist_ok=True)
        if resume and config_path.exists():
            saved = ExperimentConfig.from_json(config_path)
            if saved.to_dict() != config.to_dict():
                raise ConfigError(
                    "the config differs from the one this run was started with.",
                    path=config_path,
                    fix="resume with the same config (or start a new run directory).",
                )
        _check_same_split(run / "split.json", split, resume)
        _write_json(
            run / "split.json",
            {
                "dataset": str(dataset.source),
                "landmark_format": _landmark_format_of(dataset),
                **split.to_dict(),
            },
        )
        config.save_json(config_path)
        return _load_or_make_plan(run, dataset, config, split, resume)

    plan = on_main(set_up, ctx)  # rank 0 writes; every rank gets the plan
    cache_cls = CaseCache if ctx.is_main else _ReadOnlyCaseCache
    cache = cache_cls(Path(cache_dir) if cache_dir else run / "cache", plan, keep_in_memory=True)
    _warm_cache(cache, dataset, split.train + split.val, ctx)

    results: dict[str, TrainResult] = {}
    for name in STAGES:
        if name not in stages:
            continue
        if name == "correlated" and not plan.correlated_groups:
            continue  # no key-slice groups: every landmark is independent
        cls = {"coarse": CoarseStage, "fine": FineStage, "correlated": CorrelatedStage}[name]
        torch.manual_seed(stage_seed(config, name))  # initial weights: same seed, same network
        stage = cls(dataset, plan, config, cache, split.train, split.val)
        stage_dir = run / name
        last = stage_dir / "checkpoints" / "last"
        stage_resume = resume and on_main(lambda: checkpoint_exists(last), ctx)  # noqa: B023
        results[name] = fit(
            stage,
            trainer_config(config, name),
            stage_dir,
            resume=stage_resume,
            progress=progress,
            # resuming a stage stopped before its first checkpoint starts it over: the files
            # it left (train.log, metrics.csv, a 'best' without 'last') are replaced
            overwrite=overwrite or resume,
            resume_hint=f"to continue, rerun the same command with --resume (run directory {run})",
        )
    from landmark3d.engine.calibrate import calibrate_after_training  # imports the predictor

    def calibrate() -> None:
        calibrate_after_training(run, dataset, device=config.device)

    on_main(calibrate, ctx)  # rank 0 only; the others wait for it
    return RunResult(run, plan, split, results)
