"""Cross-validation: train, predict and evaluate every fold; pooled and per-fold tables.

Output directory (``OUT``)::

    OUT/cv.json              config, folds (status, error, test cases, per-stage summaries),
                             pooled per-stage summaries (over the folds that evaluated them)
    OUT/cv.md                the same as Markdown tables (paper's form)
    OUT/fold<k>/             a run directory of :func:`landmark3d.engine.run.train_run`
    OUT/fold<k>/pred_<stage>/  predictions of the fold's held-out cases by ``<stage>``
                             (``coarse``: coarse only; ``fine``: coarse + fine;
                             ``correlated``: coarse + fine + correlated groups) with
                             metrics.json / metrics.csv

A fold that raises is recorded in ``cv.json`` (``"status": "failed"`` and the error message)
and the other folds go on. A fold whose training and coarse prediction worked but a later
stage's prediction failed is ``"partial"``: its evaluated stages are kept (and pooled), the
stage's error is in ``"stage_errors"``. ``resume=True`` skips folds whose predictions and
metrics are complete, continues interrupted training from its last checkpoint and redoes the
rest.
``cv.json`` and ``cv.md`` are rewritten (atomically) after every fold.

Pooled figures are computed over all landmark instances of those folds together (see
:mod:`landmark3d.metrics`), from the per-case rows of each fold's ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from landmark3d.config import ExperimentConfig
from landmark3d.data.dataset import Dataset
from landmark3d.engine.checkpoint import checkpoint_exists
from landmark3d.engine.run import STAGES, train_run
from landmark3d.errors import ConfigError, DatasetError
from landmark3d.evaluation import METRICS_JSON, evaluate, write_evaluation
from landmark3d.io.atomic import atomic_write_text, check_writable
from landmark3d.metrics import ErrorTable, Summary, summarize_table
from landmark3d.reporting.collect import table_from_metrics
from landmark3d.reporting.tables import fold_table, landmark_table, summary_table

CV_JSON = "cv.json"
CV_MD = "cv.md"
PREDICT_STAGES: tuple[str, ...] = ("coarse", "fine", "correlated")
"""Prediction stages evaluated, in pipeline order (``predict_inputs(stage=...)``): coarse
only, coarse + fine, coarse + fine + correlated groups (only for runs that trained a
correlated model, i.e. whose plan has groups)."""

STATUS_COMPLETE = "complete"
STATUS_PARTIAL = "partial"
STATUS_FAILED = "failed"


def evaluation_stages(trained: Sequence[str]) -> list[str]:
    """The prediction stages to evaluate when the models of ``trained`` stages exist."""
    return [s for s in PREDICT_STAGES if s in trained]


def trained_stages(run: Path, requested: Sequence[str]) -> list[str]:
    """The ``requested`` stages that have a checkpoint (``best`` or ``last``) in ``run``."""
    ckpt = Path(run)
    return [
        s
        for s in requested
        if any(checkpoint_exists(ckpt / s / "checkpoints" / c) for c in ("best", "last"))
    ]


def fold_dir(out_dir: Path, fold: int) -> Path:
    """``OUT/fold<k>``."""
    return Path(out_dir) / f"fold{fold}"


def prediction_dir(run_dir: Path, stage: str) -> Path:
    """``RUN/pred_<stage>``."""
    return Path(run_dir) / f"pred_{stage}"


@dataclass
class FoldOutcome:
    """One fold of a cross-validation.

    Attributes:
        fold: fold index.
        status: ``"complete"``, ``"partial"`` (a stage failed; see ``stage_errors``) or
            ``"failed"``.
        run_dir: ``OUT/fold<k>``.
        test_cases: the held-out case ids.
        tables: stage -> errors of the held-out cases (evaluated stages only).
        summaries: stage -> summary dict (``Summary.to_dict()``; evaluated stages only).
        error: ``"<ErrorType>: <message>"`` of a failed fold.
        stage_errors: stage -> error message of a stage that could not be predicted.
        resumed: True when a complete fold was taken from a previous run (not recomputed).
    """

    fold: int
    status: str
    run_dir: Path
    test_cases: list[str]
    tables: dict[str, ErrorTable] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    stage_errors: dict[str, str] = field(default_factory=dict)
    resumed: bool = False

    def to_dict(self, out_dir: Path) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "status": self.status,
            "error": self.error,
            "stage_errors": dict(self.stage_errors),
            "resumed": self.resumed,
            "run_dir": _rel(self.run_dir, out_dir),
            "test_cases": list(self.test_cases),
            "metrics_files": {
                s: _rel(prediction_dir(self.run_dir, s) / METRICS_JSON, out_dir)
                for s in self.summaries
            },
            "summaries": self.summaries,
        }


@dataclass
class CVResult:
    """What :func:`run_cv` produced.

    Attributes:
        out_dir: the output directory.
        stages: the evaluated stages, pipeline order.
        landmark_names: landmark order of the tables.
        folds: one :class:`FoldOutcome` per requested fold.
        pooled: stage -> :class:`Summary` over every instance of the folds that evaluated
            the stage (complete and partial folds).
        dataset_name, dataset_source: where the cases came from.
        config: the experiment config (dict).
    """

    out_dir: Path
    stages: list[str]
    landmark_names: list[str]
    folds: list[FoldOutcome]
    pooled: dict[str, Summary]
    dataset_name: str = ""
    dataset_source: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[FoldOutcome]:
        """Failed and partial folds."""
        return [f for f in self.folds if f.status != STATUS_COMPLETE]

    def to_dict(self) -> dict[str, Any]:
        """The content of ``cv.json``."""
        complete = [f.fold for f in self.folds if f.status == STATUS_COMPLETE]
        return {
            "kind": "cross_validation",
            "dataset": {"name": self.dataset_name, "source": self.dataset_source},
            "stages": list(self.stages),
            "landmarks": list(self.landmark_names),
            "folds_requested": [f.fold for f in self.folds],
            "folds_complete": complete,
            "folds_partial": [f.fold for f in self.folds if f.status == STATUS_PARTIAL],
            "folds_failed": [f.fold for f in self.folds if f.status == STATUS_FAILED],
            "pooled": {s: p.to_dict() for s, p in self.pooled.items()},
            "folds": {f"fold{f.fold}": f.to_dict(self.out_dir) for f in self.folds},
            "config": self.config,
        }

    def to_markdown(self) -> str:
        """The content of ``cv.md``."""
        d = self.to_dict()
        complete = ", ".join(map(str, d["folds_complete"])) or "none"
        lines = [
            f"# Cross-validation: {self.dataset_name}",
            "",
            f"Folds requested: {len(self.folds)}; complete: {complete}; "
            f"partial: {', '.join(map(str, d['folds_partial'])) or 'none'}; "
            f"failed: {', '.join(map(str, d['folds_failed'])) or 'none'}.",
            "",
        ]
        if self.pooled:
            lines.append(summary_table(d["pooled"], "Pooled over the folds").to_markdown())
            per_fold = {k: v["summaries"] for k, v in d["folds"].items() if v["summaries"]}
            lines.append(fold_table(per_fold).to_markdown())
            lines.append(
                landmark_table(
                    d["pooled"], self.landmark_names, "Per landmark (pooled)"
                ).to_markdown()
            )
        if self.failed:
            lines += ["## Failed folds and stages", ""]
            for f in self.failed:
                if f.error:
                    lines.append(f"- fold {f.fold}: {f.error}")
                lines += [f"- fold {f.fold}, {s}: {e}" for s, e in f.stage_errors.items()]
            lines.append("")
        return "\n".join(lines)


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ tables
def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and {"cases", "landmarks", "rows"} <= set(d) else None


def _complete_fold(run: Path, requested: Sequence[str], test: list[str]) -> dict[str, Any] | None:
    """``{stage: metrics dict}`` when the predictions of every trained stage were evaluated."""
    stages = evaluation_stages(trained_stages(run, requested))
    if "coarse" not in stages:
        return None
    found: dict[str, Any] = {}
    for s in stages:
        d = _read_metrics(prediction_dir(run, s) / METRICS_JSON)
        if d is None or list(d["cases"]) != list(test):
            return None
        found[s] = d
    return found


# ------------------------------------------------------------------------------ running
def _run_fold(
    dataset: Dataset,
    config: ExperimentConfig,
    run: Path,
    fold: int,
    train_stages: Sequence[str],
    resume: bool,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Train, predict and evaluate one fold: ``({stage: metrics dict}, {stage: error})``.

    A failure to train, or to predict the coarse stage, raises; a later stage's failure is
    returned in the second dict.
    """
    from landmark3d.inference.batch import predict_inputs

    if dataset.source is None:
        raise DatasetError(
            "the dataset has no source file, so its held-out cases cannot be predicted.",
            fix="load the dataset with load_dataset(path).",
        )
    result = train_run(
        dataset,
        config,
        run,
        fold=fold,
        stages=train_stages,
        resume=resume,
        overwrite=overwrite or resume,
        progress=progress,
    )
    found: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for s in evaluation_stages(list(result.results)):
        pred = prediction_dir(run, s)
        log(f"fold {fold}: predicting {len(result.split.test)} held-out case(s) ({s})")
        try:
            predict_inputs(
                run, pred, dataset_path=dataset.source, fold=fold, stage=s, overwrite=True
            )
            ev = evaluate(pred, dataset, cases=result.split.test)
            write_evaluation(ev, pred, overwrite=True)
        except Exception as exc:  # keep the stages that worked
            if not found:
                raise
            errors[s] = f"{type(exc).__name__}: {exc}"
            log(f"fold {fold}: stage {s} FAILED: {errors[s]}")
            continue
        found[s] = ev.to_dict()
    return found, errors


def run_cv(
    dataset: Dataset,
    config: ExperimentConfig,
    out_dir: str | Path,
    folds: Sequence[int] | None = None,
    resume: bool = False,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> CVResult:
    """Cross-validate ``config`` on ``dataset`` into ``out_dir`` (see the module docstring).

    Args:
        dataset: a dataset with folds (``dataset.json`` "folds" or ``setup/cv<k>``).
        config: the experiment config.
        out_dir: output directory.
        folds: fold indices to run (default: all).
        resume: continue a previous run in ``out_dir`` (same config), skipping complete folds.
        stages: training stages (``coarse``, ``fine``, ``correlated``); every trained stage is
            evaluated (``correlated`` is trained only when the fold's plan has groups).
        progress: progress bars during training.
        overwrite: start afresh in an ``out_dir`` that holds a previous cross-validation.
        log: called with one-line progress messages.

    Returns:
        :class:`CVResult` (also written to ``cv.json`` and ``cv.md``).

    Raises:
        DatasetError: the dataset has no folds, or a requested fold does not exist.
        ConfigError: unknown stage; ``resume`` with another config than the run's.
        OutputExistsError: ``out_dir`` holds a cross-validation and neither resume nor overwrite.
    """
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    n = len(dataset.folds)
    if n == 0:
        raise DatasetError(
            f"dataset {dataset.name!r} defines no cross-validation folds.",
            path=dataset.source,
            fix='add "folds" to dataset.json (or setup/cv0, setup/cv1, ... in the original layout).',
        )
    wanted = list(range(n)) if folds is None else [int(k) for k in folds]
    bad = [k for k in wanted if not 0 <= k < n]
    if bad or len(set(wanted)) != len(wanted):
        raise DatasetError(
            f"fold(s) {bad or wanted} are invalid or repeated; the dataset has folds 0..{n - 1}.",
            path=dataset.source,
            fix=f"choose distinct folds between 0 and {n - 1}.",
        )
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"unknown stage(s) {unknown}.", fix=f"choose from {list(STAGES)}.")
    cv_json = out / CV_JSON
    if resume and cv_json.exists():
        previous = json.loads(cv_json.read_text(encoding="utf-8")).get("config")
        if previous is not None and previous != json.loads(json.dumps(config.to_dict())):
            raise ConfigError(
                "the config differs from the one this cross-validation was started with.",
                path=cv_json,
                fix="resume with the same config (or start a new output directory).",
            )
    elif not resume:
        check_writable(cv_json, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    outcomes: list[FoldOutcome] = []
    result = CVResult(
        out, [], list(dataset.landmark_names), outcomes, {}, dataset.name,
        str(dataset.source or ""), config.to_dict(),
    )  # fmt: skip
    for k in wanted:
        run = fold_dir(out, k)
        test = dataset.split(k)[1]
        found = _complete_fold(run, stages, test) if resume else None
        outcome = FoldOutcome(k, STATUS_COMPLETE, run, test, resumed=found is not None)
        if found is not None:
            say(f"fold {k}: complete in {run}; skipped")
        else:
            say(f"fold {k}: training in {run}")
            try:
                found, outcome.stage_errors = _run_fold(
                    dataset, config, run, k, stages, resume, overwrite, progress, say
                )
            except Exception as exc:  # a failed fold must not lose the others
                outcome.status, outcome.error = STATUS_FAILED, f"{type(exc).__name__}: {exc}"
                say(f"fold {k}: FAILED: {outcome.error}")
            if outcome.stage_errors:
                outcome.status = STATUS_PARTIAL
        if found is not None:
            outcome.tables = {s: table_from_metrics(m) for s, m in found.items()}
            outcome.summaries = {s: m["summary"] for s, m in found.items()}
        outcomes.append(outcome)
        result.stages = [s for s in PREDICT_STAGES if any(s in f.tables for f in outcomes)]
        result.pooled = pool(outcomes, result.stages, result.landmark_names)
        write_cv(result)
    return result


def pool(
    outcomes: Sequence[FoldOutcome], stages: Sequence[str], names: Sequence[str]
) -> dict[str, Summary]:
    """Stage -> summary over all instances of the (complete or partial) folds having it."""
    done = [f for f in outcomes if f.status != STATUS_FAILED and f.tables]
    if not done:
        return {}
    pooled: dict[str, Summary] = {}
    for s in stages:  # a stage some folds lack (no correlated group found) pools the others
        tables = [f.tables[s] for f in done if s in f.tables]
        if tables:
            pooled[s] = summarize_table(ErrorTable.concat(tables), names)
    return pooled


def write_cv(result: CVResult) -> tuple[Path, Path]:
    """Write ``cv.json`` and ``cv.md`` atomically; returns their paths."""
    j, m = result.out_dir / CV_JSON, result.out_dir / CV_MD
    atomic_write_text(j, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    atomic_write_text(m, result.to_markdown())
    return j, m
