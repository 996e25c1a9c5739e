"""The ``landmark3d`` command line: one Typer app, a thin layer over the library.

Every command catches :class:`landmark3d.errors.Landmark3dError` and prints it as one
readable line (file, problem, fix) with a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from landmark3d import __version__
from landmark3d.errors import Landmark3dError

app = typer.Typer(
    name="landmark3d",
    help="Anatomical landmark localization in 3D medical images (CT, MRI).\n\n"
    "Coordinates are world millimetres (LPS, as ITK) from file to file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# tables stay readable when the output is piped to a file or a CI log
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)
_STATE = {"debug": False}

CoordsOption = Annotated[
    str | None,
    typer.Option(
        "--coords",
        help="Coordinate system of CSV landmark files without a '# CoordinateSystem' line: LPS or RAS.",
    ),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"landmark3d {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """landmark3d — prior-guided coarse-to-fine landmark localization."""
    _STATE["debug"] = debug


def _fmt_mm(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.2f}"  # None/NaN -> dash


def _fmt_pct(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.1f}%"


# ----------------------------------------------------------------------------- phantom
@app.command()
def phantom(
    out: Annotated[Path, typer.Option("--out", help="Directory to create the dataset in.")],
    cases: Annotated[int, typer.Option("--cases", min=3, help="Number of cases.")] = 30,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same data).")] = 0,
    size: Annotated[int, typer.Option("--size", min=24, help="Approximate voxels per axis.")] = 96,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing dataset.")
    ] = False,
) -> None:
    """Write the synthetic head-like phantom dataset (images, landmarks, spec, 3 folds).

    Example: [bold]landmark3d phantom --out data/phantom --cases 30 --seed 0[/]
    """
    from rich.progress import Progress

    from landmark3d.data.phantom import generate_phantom

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("generating phantom", total=cases)
        spec = generate_phantom(
            out,
            n_cases=cases,
            seed=seed,
            size=size,
            overwrite=overwrite,
            progress=lambda i: bar.update(task, completed=i),
        )
    console.print(f"wrote {cases} cases: {spec}")


# ----------------------------------------------------------------------------- verify
@app.command()
def verify(
    dataset: Annotated[
        Path, typer.Argument(help="dataset.json, its directory, or an original-layout directory.")
    ],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the full report as JSON here.")
    ] = None,
    no_images: Annotated[
        bool, typer.Option("--no-images", help="Check landmark files and the spec only.")
    ] = False,
) -> None:
    """Check a dataset and report every problem with its file and fix (exit 1 on errors).

    Example: [bold]landmark3d verify data/phantom[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.data.verify import verify_dataset
    from landmark3d.io.atomic import atomic_write_text

    ds = load_dataset(dataset)
    report = verify_dataset(ds, check_images=not no_images)
    summary = report.to_dict().get("summary", {})
    _print_verify_summary(ds.name, len(ds.cases), summary)
    for p in report.problems:
        where = p.case or "-"
        path = f" [{p.path}]" if p.path else ""
        style = "red" if p.severity == "error" else "yellow"
        console.print(f"[{style}]{p.severity}[/] {where}{path}: {p.message} Fix: {p.fix}")
    n_err = sum(p.severity == "error" for p in report.problems)
    n_warn = len(report.problems) - n_err
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report.to_dict(), indent=2, default=str))
    console.print(f"{n_err} error(s), {n_warn} warning(s)")
    if not report.ok:
        raise typer.Exit(1)


def _print_verify_summary(name: str, n_cases: int, summary: dict[str, Any]) -> None:
    table = Table(title=f"dataset {name!r}: {n_cases} cases")
    table.add_column("property")
    table.add_column("value")
    for key, value in summary.items():
        if key in ("cases", "per_landmark"):
            continue
        table.add_row(str(key), str(value))
    console.print(table)
    per_lm = summary.get("per_landmark") or {}
    if per_lm:
        t2 = Table(title="landmarks")
        t2.add_column("landmark")
        for col in next(iter(per_lm.values())):
            t2.add_column(str(col), justify="right")
        for lm, vals in per_lm.items():
            t2.add_row(lm, *(f"{v:.2f}" if isinstance(v, float) else str(v) for v in vals.values()))
        console.print(t2)


# ----------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    pred: Annotated[
        Path, typer.Option("--pred", help="Directory of prediction files named <case id>.<format>.")
    ],
    truth: Annotated[Path, typer.Option("--truth", help="The dataset with the true landmarks.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write metrics.json/csv (default: --pred)."),
    ] = None,
    fold: Annotated[
        int | None, typer.Option("--fold", help="Evaluate only this fold's held-out cases.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing metrics files.")
    ] = False,
) -> None:
    """Compare predictions with the truth: per-landmark table, metrics.json and metrics.csv.

    Example: [bold]landmark3d evaluate --pred runs/demo/pred --truth data/phantom[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.evaluation import evaluate as run_evaluation
    from landmark3d.evaluation import write_evaluation

    ds = load_dataset(truth)
    cases = ds.split(fold)[1] if fold is not None else None
    result = run_evaluation(pred, ds, cases=cases)
    write_evaluation(result, out or pred, overwrite=overwrite)
    print_summary_table(result.summary, title=f"{ds.name}: {pred}")
    console.print(f"wrote {(out or pred) / 'metrics.json'} and metrics.csv")


def print_summary_table(summary: object, title: str) -> None:
    """Print the per-landmark and overall table of a metrics summary (paper's form)."""
    d = summary.to_dict() if hasattr(summary, "to_dict") else dict(summary)  # type: ignore[call-overload]
    thresholds = list(d["sdr"].keys())
    table = Table(title=title)
    table.add_column("landmark")
    table.add_column("n", justify="right")
    table.add_column("MRE (SD) mm", justify="right")
    table.add_column("median", justify="right")
    for t in thresholds:
        table.add_column(f"SDR@{t}", justify="right")
    for name, row in d["per_landmark"].items():
        table.add_row(
            name,
            str(row["n"]),
            f"{_fmt_mm(row['mre'])} ({_fmt_mm(row['sd'])})",
            _fmt_mm(row["median"]),
            *(_fmt_pct(row["sdr"][t]) for t in thresholds),
        )
    table.add_row(
        "[bold]all[/]",
        str(d["n_evaluated"]),
        f"[bold]{_fmt_mm(d['mre'])} ({_fmt_mm(d['sd'])})[/]",
        _fmt_mm(d["median"]),
        *(_fmt_pct(d["sdr"][t]) for t in thresholds),
    )
    console.print(table)
    missing = d.get("n_missing_prediction", 0)
    if missing:
        console.print(
            f"[yellow]{missing} landmark(s) without a prediction (counted as failures in SDR)[/]"
        )


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
) -> None:
    """Derive the plan (orientation, coarse grid, fine spacing, patch size, intensity window).

    Example: [bold]landmark3d plan data/phantom --config phantom_demo --out runs/plan.json[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.planning import make_plan

    ds = load_dataset(dataset)
    cfg = _load_config(config, overrides)
    ids = ds.split(fold)[0] if fold is not None else None
    p = make_plan(ds, cfg, ids)
    console.print_json(json.dumps(p.to_dict()))
    if out is not None:
        p.save(out)
        console.print(f"wrote {out}")


# ----------------------------------------------------------------------------- train
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
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.engine.run import STAGES, train_run

    ds = load_dataset(dataset)
    cfg = _load_config(config, overrides)
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
    for name, r in result.results.items():
        best = "—" if r.best_metric is None else f"{r.best_metric:.2f} mm (epoch {r.best_epoch})"
        console.print(f"{name}: {r.epochs_completed} epochs, best validation MRE {best}")
    console.print(f"run directory: {out}")


# ----------------------------------------------------------------------------- predict
@app.command()
def predict(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Run directory of `landmark3d train`.")
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
        str, typer.Option("--stage", help="fine (coarse + fine) or coarse (coarse only).")
    ] = "fine",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing prediction files.")
    ] = False,
) -> None:
    """Predict landmarks in world coordinates; writes one file per image and timings.json.

    Example: [bold]landmark3d predict --model runs/f0 --input scan.nii.gz --out pred/ --format fcsv[/]
    """
    from landmark3d.inference.batch import predict_inputs

    written = predict_inputs(
        model,
        out,
        input_path=input,
        dataset_path=dataset,
        fold=fold,
        fmt=fmt,
        coords=coords,
        stage=stage,
        device=device,
        overwrite=overwrite,
        progress=lambda name: err_console.print(f"predicted {name}", highlight=False),
    )
    console.print(f"wrote {len(written)} prediction file(s) and timings.json to {out}")


# ----------------------------------------------------------------------------- demo
QUICK_OVERRIDES = [
    "coarse.epochs=3",
    "fine.epochs=3",
    "coarse.widths=[8,16,32,64]",
    "fine.channels=[4,8,16,32]",
    "coarse.val_every=1",
    "fine.val_every=1",
]


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
) -> None:
    """The whole job on the embedded phantom: generate, verify, plan, train, predict, evaluate.

    Example: [bold]landmark3d demo[/]  (or [bold]landmark3d demo --quick[/])
    """
    from landmark3d.config import apply_overrides, load_config
    from landmark3d.data.dataset import load_dataset
    from landmark3d.data.phantom import generate_phantom
    from landmark3d.data.verify import verify_dataset
    from landmark3d.engine.run import train_run
    from landmark3d.evaluation import evaluate as run_evaluation
    from landmark3d.evaluation import write_evaluation
    from landmark3d.inference.batch import predict_inputs

    n_cases, size = (9, 64) if quick else (30, 96)
    spec = data / "dataset.json"
    if spec.exists():
        ds = load_dataset(spec)
        if len(ds.cases) != n_cases:
            spec = generate_phantom(data, n_cases=n_cases, seed=0, size=size, overwrite=True)
    else:
        spec = generate_phantom(data, n_cases=n_cases, seed=0, size=size, overwrite=True)
    ds = load_dataset(spec)
    console.print(f"[bold]1/5[/] phantom dataset: {spec} ({len(ds.cases)} cases)")
    report = verify_dataset(ds)
    if not report.ok:
        raise typer.Exit(1)
    console.print(f"[bold]2/5[/] verified: {len(report.problems)} problem(s)")
    cfg = apply_overrides(load_config("phantom_demo"), QUICK_OVERRIDES if quick else [])
    console.print("[bold]3/5[/] training coarse and fine stages (config phantom_demo)")
    result = train_run(ds, cfg, out, fold=fold, overwrite=True, cache_dir=out / "cache")
    pred_dir = out / "predictions"
    console.print(f"[bold]4/5[/] predicting {len(result.split.test)} held-out case(s)")
    predict_inputs(out, pred_dir, dataset_path=spec, fold=fold, overwrite=True)
    coarse_dir = out / "predictions_coarse"
    predict_inputs(out, coarse_dir, dataset_path=spec, fold=fold, stage="coarse", overwrite=True)
    console.print("[bold]5/5[/] evaluating")
    for name, d in (("coarse only", coarse_dir), ("coarse + fine", pred_dir)):
        ev = run_evaluation(d, ds, cases=result.split.test)
        write_evaluation(ev, d, overwrite=True)
        print_summary_table(ev.summary, title=f"{name}: held-out fold {fold}")
    console.print(f"metrics: {pred_dir / 'metrics.json'}; run: {out}")


# ----------------------------------------------------------------------------- entry point
def main() -> None:
    """Console-script entry point: readable one-line errors, tracebacks only with --debug."""
    debug = "--debug" in sys.argv[1:]
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except Landmark3dError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if debug:
            raise
        err_console.print(
            f"[red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback "
            "and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
