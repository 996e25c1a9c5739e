"""Model commands: plan, prior, train, predict, calibrate, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from landmark3d.cli.app import app, console, err_console, print_summary_table

# ----------------------------------------------------------------------------- plan
ConfigOption = Annotated[
    str,
    typer.Option(
        "--config",
        "-c",
        help="Experiment YAML, or a packaged name (phantom_demo, pddca, prostate).",
    ),
]
OverrideOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set fine.epochs=5 (repeatable)."),
]


def _load_config(config: str, overrides: list[str] | None) -> Any:
    from landmark3d.config import apply_overrides, load_config

    cfg = load_config(config)
    return apply_overrides(cfg, list(overrides or []))


@app.command()
def plan(
    dataset: Annotated[
        Path, typer.Argument(help="dataset.json, its directory, or an original-layout directory.")
    ],
    config: ConfigOption = "phantom_demo",
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write plan.json (default: print only).")
    ] = None,
    fold: Annotated[
        int | None, typer.Option("--fold", help="Plan on the training cases of this fold only.")
    ] = None,
    overrides: OverrideOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out file.")
    ] = False,
) -> None:
    """Derive the plan (orientation, coarse grid, fine spacing, patch size, intensity window).

    Example: [bold]landmark3d plan data/phantom --config phantom_demo --out runs/plan.json[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.io.atomic import check_writable
    from landmark3d.planning import make_plan

    if out is not None:
        check_writable(out, overwrite)  # refuse before reading any image
    ds = load_dataset(dataset)
    cfg = _load_config(config, overrides)
    ids = ds.split(fold)[0] if fold is not None else None
    p = make_plan(ds, cfg, ids)
    console.print_json(json.dumps(p.to_dict()))
    if out is not None:
        p.save(out, overwrite=overwrite)
        console.print(f"wrote {out}")


# ----------------------------------------------------------------------------- prior
@app.command()
def prior(
    dataset: Annotated[
        Path, typer.Argument(help="dataset.json, its directory, or an original-layout directory.")
    ],
    fold: Annotated[
        int | None,
        typer.Option("--fold", min=0, help="Learn from this fold's training cases only."),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance", min=0.0, help="Largest along-axis difference (voxels) on one slice."
        ),
    ] = 0.5,
    min_fraction: Annotated[
        float,
        typer.Option(
            "--min-fraction", min=0.01, max=1.0, help="Share of cases a pair must agree in."
        ),
    ] = 0.9,
    write: Annotated[
        bool,
        typer.Option("--write", help='Store the groups as "correlated_groups" in dataset.json.'),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the groups as JSON here.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --json file.")
    ] = False,
) -> None:
    """Discover landmarks annotated on one common key slice (correlated groups).

    Reads image headers and landmark files only. Example:
    [bold]landmark3d prior data/phantom --fold 0 --write[/]
    """
    from rich.progress import Progress

    from landmark3d.data.dataset import load_dataset
    from landmark3d.errors import DatasetError
    from landmark3d.io.atomic import atomic_write_text, check_writable
    from landmark3d.prior import apply_groups_to_spec, discover_groups

    if json_out is not None:
        check_writable(json_out, overwrite)  # refuse before reading the dataset
    ds = load_dataset(dataset)
    cases = None if fold is None else ds.split(fold)[0]
    total = len(ds.cases) if cases is None else len(cases)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("reading headers and landmarks", total=total)
        groups = discover_groups(
            ds, cases, tolerance, min_fraction, progress=lambda i: bar.update(task, completed=i)
        )
    if groups:
        table = Table(title=f"correlated groups of {ds.name!r}")
        for col in ("landmarks", "axis", "agree", "spread mm (mean / max)", "cases", "note"):
            table.add_column(col)
        for g in groups:
            note = "coincident: duplicate annotations?" if g.coincident else ""
            table.add_row(
                ", ".join(g.landmarks), f"{g.axis} ({g.axis_name})", f"{g.fraction:.0%}",
                f"{g.spread_mm:.2f} / {g.max_spread_mm:.2f}", str(g.n_cases), note,
            )  # fmt: skip
        console.print(table)
    else:
        console.print(
            f"no correlated groups (tolerance {tolerance} voxel, >= {min_fraction:.0%} of cases)"
        )
    if json_out is not None:
        atomic_write_text(
            json_out, json.dumps([g.to_dict() for g in groups], indent=2) + "\n", overwrite
        )
    if write:
        if ds.layout != "spec" or ds.source is None:
            raise DatasetError(
                "groups can only be stored in a dataset.json, not in the original layout.",
                path=ds.source,
                fix="convert the dataset to a dataset.json first, or use --json.",
            )
        keep = [g for g in groups if not g.coincident]  # duplicates are not key-slice groups
        path = apply_groups_to_spec(ds.source, keep)
        console.print(f"wrote {len(keep)} group(s) to {path}")
        if fold is None:
            err_console.print(
                f"warning: the groups were learned from all {len(ds.cases)} cases, the test "
                "folds' included, and train/cv use stored groups for every fold: the test "
                "annotations took part in choosing them. For clean cross-validation learn them "
                "with --fold K, or store none (training then finds them in each fold's "
                "training cases)."
            )


# ----------------------------------------------------------------------------- train
SET_UP_ENTRIES = frozenset({"config.json", "split.json", "plan.json", "cache"})
"""What ``train_run`` writes into the run directory before the first stage starts."""


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def _remove_set_up_stub(run: Path, created: list[Path], was_empty: bool) -> None:
    """After a failed ``train``: remove what its set-up wrote, if nothing else is there.

    Only a run directory this invocation created (``created``, deepest first, with the parents
    it made) or found empty is touched, and only when it holds nothing but the set-up files
    (:data:`SET_UP_ENTRIES`); once a stage has started (its logs help, ``--resume`` continues
    it) or the directory held anything before, it is left as it is. Rank 0 only under torchrun.
    """
    import os
    import shutil

    if os.environ.get("RANK", "0") != "0" or not (created or was_empty) or not run.is_dir():
        return
    if {p.name for p in run.iterdir()} - SET_UP_ENTRIES:
        return
    for child in run.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    for d in created:  # the run directory, then the parents made for it, while empty
        try:
            d.rmdir()
        except OSError:
            break


@app.command()
def train(
    config: ConfigOption,
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="The training dataset.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory to create.")],
    fold: Annotated[
        int | None,
        typer.Option(
            "--fold", help="Hold out this fold as test cases (default 0; -1 = train on all)."
        ),
    ] = 0,
    stage: Annotated[
        list[str] | None,
        typer.Option("--stage", help="Train only this stage: coarse, fine (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh in an existing run directory.")
    ] = False,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Preprocessed-case cache (default RUN/cache).")
    ] = None,
    overrides: OverrideOption = None,
) -> None:
    """Train the coarse and fine stages; checkpoints, train.log and metrics.csv go to --out.

    Example: [bold]landmark3d train --config phantom_demo --dataset data/phantom --fold 0 --out runs/f0[/]

    Several processes / GPUs: [bold]torchrun --nproc_per_node=4 -m landmark3d train ...[/]
    (same arguments; the config's batch sizes are the global batch; rank 0 writes).
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.engine.distributed import distributed_session
    from landmark3d.engine.run import STAGES, train_run

    ds = load_dataset(dataset)
    cfg = _load_config(config, overrides)
    created = _missing_dirs(out)  # out and the parents this invocation may create
    was_empty = _is_empty_dir(out)
    try:
        with distributed_session(cfg.device) as ctx:  # torchrun: one process group for the run
            result = train_run(
                ds,
                cfg,
                out,
                fold=None if fold is not None and fold < 0 else fold,
                stages=tuple(stage or STAGES),
                resume=resume,
                overwrite=overwrite,
                cache_dir=cache,
            )
    except BaseException:
        _remove_set_up_stub(out, created, was_empty)
        raise
    if not ctx.is_main:
        return
    for name, r in result.results.items():
        best = "—" if r.best_metric is None else f"{r.best_metric:.2f} mm (epoch {r.best_epoch})"
        console.print(f"{name}: {r.epochs_completed} epochs, best validation MRE {best}")
    console.print(f"run directory: {out}")


# ----------------------------------------------------------------------------- predict
@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            "-m",
            help="Run directory of `landmark3d train`, or a model.zip of `landmark3d package`.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for one landmark file per image.")],
    input: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="An image file, a DICOM series directory, or a directory of images.",
        ),
    ] = None,
    dataset: Annotated[
        Path | None,
        typer.Option("--dataset", help="Predict the cases of a dataset instead of --input."),
    ] = None,
    fold: Annotated[
        int | None, typer.Option("--fold", help="With --dataset: only this fold's held-out cases.")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="fcsv, mrk.json, csv or json (default: the training landmarks' format).",
        ),
    ] = None,
    coords: Annotated[
        str, typer.Option("--coords", help="Coordinate system written: LPS or RAS.")
    ] = "LPS",
    stage: Annotated[
        str,
        typer.Option(
            "--stage",
            help="auto (the best the run has), coarse (coarse only), fine (independent fine "
            "models for all landmarks) or correlated (fine + key-slice models for groups).",
        ),
    ] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Predict every case again, replacing its file.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Skip cases whose prediction file exists and reads back (files are written "
            "atomically, so an existing one is complete); predict the rest. Refused when the "
            "outputs were made with other settings (model, stage, checkpoint, TTA, absence, "
            "calibration, --flag-above, coords, format; recorded in timings.json).",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="K/N",
            help="Predict only shard K of N (K is 1-based: 1..N) of the cases sorted by id, "
            "e.g. --shard ${SLURM_ARRAY_TASK_ID}/8 with --array=1-8; the report is "
            "timings.shard-K-of-N.json.",
        ),
    ] = None,
    patch_batch: Annotated[
        int,
        typer.Option(
            "--patch-batch",
            min=1,
            help="Fine patches per forward pass (bounds memory for many landmarks).",
        ),
    ] = 8,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads (default: the config's num_threads, else $OMP_NUM_THREADS, "
            "else all cores of the process).",
        ),
    ] = None,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="Test-time augmentation: rerun the fine stage from shifted patch centres and "
            "write tta_spread_mm (slower). Default: as the run's calibration was fitted.",
        ),
    ] = None,
    absence: Annotated[
        bool | None,
        typer.Option(
            "--absence/--no-absence",
            help="Report landmarks predicted beyond the image as absent. Default: on for runs "
            "trained on cropped scans (see calibration.json).",
        ),
    ] = None,
    flag_above: Annotated[
        float | None,
        typer.Option(
            "--flag-above",
            min=0.0,
            help="Mark landmarks whose calibrated expected error exceeds MM (flagged=1) and "
            "list them.",
        ),
    ] = None,
) -> None:
    """Predict landmarks in world coordinates; writes one file per image and timings.json.

    Images are processed as a stream with one progress bar. timings.json
    (timings.shard-K-of-N.json with --shard) lists every case with its status (done,
    skipped-existing, failed + error) and seconds per step. A failing case is recorded and
    the others go on; the exit code is 1 if any failed. With a calibrated run
    (RUN/calibration.json) every landmark carries confidence, expected_error_mm and
    p_error_gt_4mm next to its coordinate.

    Example: [bold]landmark3d predict --model runs/f0 --input scan.nii.gz --out pred/ --format fcsv[/]
    """
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from landmark3d.inference.batch import CaseRecord, predict_cohort

    flagged: list[tuple[str, str, float]] = []
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    bar = Progress(*columns, console=err_console)
    task = bar.add_task("predicting", total=None)

    def show(i: int, total: int, rec: CaseRecord | None) -> None:
        if rec is None:  # inputs and outputs checked: the cohort starts
            bar.start()
        bar.update(task, completed=i, total=total)
        if rec is not None and rec.status == "failed":
            bar.console.print(
                f"[red]failed[/] {escape(rec.case_id)}: {escape(rec.error or '')}",
                highlight=False,
            )
        elif rec is not None:
            bar.update(task, description=f"predicting ({rec.case_id} {rec.status})")

    try:
        result = predict_cohort(
            model, out, input_path=input, dataset_path=dataset, fold=fold, fmt=fmt,
            coords=coords, stage=stage, device=device, overwrite=overwrite, resume=resume,
            shard=shard, patch_batch=patch_batch, threads=threads, tta=tta, absence=absence,
            flag_above=flag_above, flagged=flagged, progress=show,
        )  # fmt: skip
    finally:
        bar.stop()
    if flag_above is not None:
        console.print(
            f"{len(flagged)} landmark(s) flagged (expected error > {flag_above:g} mm)",
            highlight=False,
        )
        for cid, name, err in flagged:
            console.print(f"flagged {cid} {name}: expected error {err:.1f} mm", highlight=False)
    part = "" if result.shard is None else f" (shard {result.shard[0]}/{result.shard[1]})"
    counts = ", ".join(
        f"{len(result.with_status(s))} {s}" for s in ("done", "skipped-existing", "failed")
    )
    console.print(
        f"{len(result.records)} case(s){part}: {counts}; predictions in {out}, "
        f"report {result.report}",
        highlight=False,
    )
    if result.failed:
        err_console.print(
            f"[red]{len(result.failed)} case(s) failed[/]: "
            + escape(", ".join(r.case_id for r in result.failed))
            + f" (see {escape(str(result.report))}; fix them and rerun with --resume)",
            highlight=False,
        )
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- calibrate
@app.command()
def calibrate(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Run directory of `landmark3d train`.")
    ],
    dataset: Annotated[
        Path | None,
        typer.Option("--dataset", help="The run's dataset (default: the one in split.json)."),
    ] = None,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta/--no-tta",
            help="Fit on the test-time-augmentation spread too (default; predictions then run "
            "TTA unless --no-tta, which uses a TTA-free refit stored alongside).",
        ),
    ] = True,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    views: Annotated[
        int,
        typer.Option(
            "--views", help="Re-sampled views per validation case added to the fit.", min=0
        ),
    ] = 4,
) -> None:
    """Fit the confidence calibration on the run's validation cases (RUN/calibration.json).

    `landmark3d train` does this after training; use it for older runs or to refit.
    Example: [bold]landmark3d calibrate --model runs/f0[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.engine.calibrate import calibrate_run

    ds = load_dataset(dataset) if dataset is not None else None
    cal = calibrate_run(
        model,
        ds,
        tta=tta,
        device=device,
        views=views,
        progress=lambda name: err_console.print(f"predicted {name}", highlight=False),
    )
    s = cal.stats
    rho = s.get("spearman_score_error")
    console.print(
        f"calibrated on {s.get('n_cases')} validation case(s), {s.get('n_points')} landmarks "
        f"(MRE {s.get('mre_mm') or float('nan'):.2f} mm, rank correlation score~error "
        f"{'n/a' if rho is None else f'{rho:.2f}'}); absence margin {cal.absence_margin_mm:g} mm "
        f"({'on' if cal.absence_enabled else 'off'} by default)",
        highlight=False,
    )
    console.print(f"wrote {model / 'calibration.json'}")


# ----------------------------------------------------------------------------- demo
DEMO_OVERRIDES = ["correlated.epochs=60"]
"""The full demo's time budget (15 min on 2 cores, measured 12 min): the correlated stage trains
60 epochs instead of the config's 100 (its validation curve flattens around epoch 50; the
benchmarks, which use the config as it is, show the cost: see the README)."""
QUICK_OVERRIDES = [
    "coarse.epochs=3",
    "fine.epochs=3",
    "correlated.epochs=3",
    "coarse.widths=[8,16,32,64]",
    "fine.channels=[4,8,16,32]",
    "correlated.channels=[4,8,16,32]",
    "coarse.val_every=1",
    "fine.val_every=1",
    "correlated.val_every=1",
]


DEMO_MARKER = "demo.json"
"""Written into ``--out`` by ``landmark3d demo``: marks a run directory the demo may replace."""
PHANTOM_TOOL = "landmark3d phantom"
"""``generator.tool`` of a ``dataset.json`` written by :func:`~landmark3d.data.phantom.generate_phantom`."""
PHANTOM_ENTRIES = frozenset({"dataset.json", "images", "landmarks"})
"""Everything ``generate_phantom`` writes into its directory."""


def _phantom_generator(data: Path) -> dict[str, Any] | None:
    """The ``generator`` record of a phantom directory, or None if ``data`` is anything else.

    A phantom directory holds only what ``generate_phantom`` writes (``dataset.json``,
    ``images/``, ``landmarks/``) and its ``dataset.json`` names the phantom generator; a
    directory with any other file is treated as the user's, never as a phantom.
    """
    if not data.is_dir() or {p.name for p in data.iterdir()} - PHANTOM_ENTRIES:
        return None
    try:
        spec = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    gen = spec.get("generator") if isinstance(spec, dict) else None
    if not isinstance(gen, dict) or gen.get("tool") != PHANTOM_TOOL:
        return None
    return gen


def _demo_data_action(data: Path, want: dict[str, int], overwrite: bool) -> str:
    """What the demo does with ``--data``: ``"reuse"``, ``"generate"`` or ``"regenerate"``.

    Reuses a phantom of the wanted settings, (re)generates a phantom of other settings, an
    empty or missing directory; anything else only with ``overwrite``.

    Raises:
        OutputExistsError: ``data`` holds something other than a phantom and not ``overwrite``.
    """
    from landmark3d.errors import OutputExistsError

    if not data.exists() or _is_empty_dir(data):
        return "generate"
    gen = _phantom_generator(data)
    if gen is not None and all(gen.get(k) == v for k, v in want.items()):
        return "reuse"
    if gen is None and not overwrite:
        raise OutputExistsError(
            "the --data directory exists and is not a phantom made by landmark3d; the demo "
            "would replace its contents with the phantom.",
            path=data,
            fix="choose another --data directory (e.g. --data data/phantom), or pass "
            "--overwrite to replace it.",
        )
    return "regenerate"


def _is_demo_run(out: Path, configs: list[Any]) -> bool:
    """``out`` holds a run of ``landmark3d demo``: its marker, or (runs made before the marker
    existed) a ``config.json`` equal to one of the demo's ``configs``."""
    if (out / DEMO_MARKER).is_file():
        return True
    from landmark3d.config import ExperimentConfig

    try:
        saved = ExperimentConfig.from_json(out / "config.json").to_dict()
    except Exception:  # missing, unreadable, or of another version: not recognisably a demo
        return False
    return any(saved == c.to_dict() for c in configs)


def _check_demo_out(out: Path, configs: list[Any], overwrite: bool) -> None:
    """Refuse an ``--out`` that is neither missing, empty, nor a previous demo run.

    Raises:
        OutputExistsError: ``out`` holds something else and not ``overwrite``.
    """
    from landmark3d.errors import OutputExistsError

    if overwrite or not out.exists() or _is_empty_dir(out) or _is_demo_run(out, configs):
        return
    raise OutputExistsError(
        "the --out directory exists and is not a run of landmark3d demo; the demo would "
        "replace its training run.",
        path=out,
        fix="choose another --out directory (e.g. --out runs/demo2), or pass --overwrite "
        "to replace it.",
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/demo"),
    data: Annotated[
        Path, typer.Option("--data", help="Where the phantom dataset is generated.")
    ] = Path("data/phantom"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A tiny run (minutes → seconds) to check the set-up.")
    ] = False,
    fold: Annotated[int, typer.Option("--fold", help="Held-out fold.")] = 0,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace --data and --out even if the demo did not create them "
            "(their contents are lost).",
        ),
    ] = False,
) -> None:
    """The whole job on the embedded phantom: generate, verify, plan, train, predict, evaluate.

    --data is reused when it holds the phantom of these settings and regenerated when it holds
    a phantom of other settings; --out is replaced when it holds an earlier demo run. Any other
    existing, non-empty directory is refused unless --overwrite.

    Example: [bold]landmark3d demo[/]  (or [bold]landmark3d demo --quick[/])
    """
    from landmark3d.config import apply_overrides, load_config
    from landmark3d.data.dataset import load_dataset
    from landmark3d.data.phantom import DESIGN_VERSION, generate_phantom
    from landmark3d.data.verify import verify_dataset
    from landmark3d.engine.run import train_run
    from landmark3d.evaluation import evaluate as run_evaluation
    from landmark3d.evaluation import write_evaluation
    from landmark3d.inference.batch import predict_inputs
    from landmark3d.io.atomic import atomic_write_text

    n_cases, size = (9, 48) if quick else (30, 96)
    base = load_config("phantom_demo")
    overrides = QUICK_OVERRIDES if quick else DEMO_OVERRIDES
    cfg = apply_overrides(base, overrides)
    # decide about both directories before writing anything
    action = _demo_data_action(
        data, {"seed": 0, "cases": n_cases, "size": size, "design": DESIGN_VERSION}, overwrite
    )
    demo_configs = [apply_overrides(base, o) for o in (QUICK_OVERRIDES, DEMO_OVERRIDES)]
    _check_demo_out(out, demo_configs, overwrite)
    if action == "reuse":
        spec = data / "dataset.json"
    else:
        spec = generate_phantom(
            data, n_cases=n_cases, seed=0, size=size, overwrite=action == "regenerate"
        )
    ds = load_dataset(spec)
    console.print(f"[bold]1/5[/] phantom dataset: {spec} ({len(ds.cases)} cases, {action}d)")
    report = verify_dataset(ds)
    if not report.ok:
        raise typer.Exit(1)
    console.print(f"[bold]2/5[/] verified: {len(report.problems)} problem(s)")
    console.print(
        "[bold]3/5[/] training coarse, fine and correlated stages "
        f"(config phantom_demo with {' '.join(overrides)})"
    )
    out.mkdir(parents=True, exist_ok=True)
    marker = {"tool": "landmark3d demo", "data": str(data), "quick": quick, "fold": fold}
    atomic_write_text(out / DEMO_MARKER, json.dumps(marker, indent=2) + "\n", overwrite=True)
    result = train_run(ds, cfg, out, fold=fold, overwrite=True, cache_dir=out / "cache")
    pred_dir = out / "predictions"
    console.print(f"[bold]4/5[/] predicting {len(result.split.test)} held-out case(s)")
    stage_dirs = {"coarse": out / "predictions_coarse", "fine": out / "predictions_fine"}
    for stage, d in stage_dirs.items():
        predict_inputs(out, d, dataset_path=spec, fold=fold, stage=stage, overwrite=True)
    predict_inputs(out, pred_dir, dataset_path=spec, fold=fold, overwrite=True)
    final = (
        "coarse + fine + correlated groups" if result.plan.correlated_groups else "coarse + fine"
    )
    console.print("[bold]5/5[/] evaluating")
    titles = [
        ("coarse only", stage_dirs["coarse"]),
        ("coarse + independent fine", stage_dirs["fine"]),
        (f"final: {final}", pred_dir),
    ]
    for name, d in titles:
        ev = run_evaluation(d, ds, cases=result.split.test)
        write_evaluation(ev, d, overwrite=True)
        print_summary_table(ev.summary, title=f"{name}: held-out fold {fold}")
    console.print(f"metrics: {pred_dir / 'metrics.json'}; run: {out}")
    from landmark3d.reporting.html import build_report

    html = build_report(out, overwrite=True).html
    console.print(f"report: {html}")
