"""Reporting commands: cross-validation (``cv``), the HTML report (``report``), the comparison
table (``bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from landmark3d.cli.app import app, console, err_console, print_summary_table
from landmark3d.cli.model_cmds import ConfigOption, OverrideOption, _load_config


@app.command()
def cv(
    config: ConfigOption,
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="Dataset with folds.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (one run per fold).")],
    folds: Annotated[
        int | None,
        typer.Option("--folds", help="Run the first N folds (default: all of the dataset's)."),
    ] = None,
    fold: Annotated[
        list[int] | None, typer.Option("--fold", help="Run only this fold (repeatable).")
    ] = None,
    stage: Annotated[
        list[str] | None,
        typer.Option(
            "--stage", help="Train only this stage: coarse, fine, correlated (repeatable)."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip complete folds; continue interrupted ones.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh in an existing output directory.")
    ] = False,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write OUT/report.html at the end.")
    ] = True,
    overrides: OverrideOption = None,
) -> None:
    """Cross-validate: train, predict and evaluate every fold; pooled and per-fold tables.

    Writes OUT/cv.json and OUT/cv.md: MRE (SD), SDR@2/2.5/3/4/8 mm, per landmark, coarse vs fine vs correlated.

    A fold (or one stage of a fold) that fails is recorded, the others go on, and the exit code is 1; --resume redoes only what is missing.

    Example: [bold]landmark3d cv --config phantom_demo --dataset data/phantom --folds 3 --out runs/cv[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.engine.cv import CV_JSON, CV_MD, run_cv
    from landmark3d.engine.run import STAGES
    from landmark3d.errors import DatasetError

    ds = load_dataset(dataset)
    cfg = _load_config(config, overrides)
    chosen: list[int] | None = list(fold) if fold else None
    if folds is not None:
        if folds < 1 or folds > len(ds.folds):
            raise DatasetError(
                f"--folds {folds}: the dataset has {len(ds.folds)} fold(s).",
                path=ds.source,
                fix=f"use --folds between 1 and {len(ds.folds)}.",
            )
        chosen = [k for k in (chosen or range(folds)) if k < folds]
    result = run_cv(
        ds,
        cfg,
        out,
        folds=chosen,
        resume=resume,
        stages=tuple(stage or STAGES),
        overwrite=overwrite,
        log=lambda msg: err_console.print(msg, highlight=False),
    )
    for name, summary in result.pooled.items():
        print_summary_table(summary, title=f"{name}: pooled over the folds")
    console.print(f"wrote {out / CV_JSON} and {out / CV_MD}")
    if report and result.pooled:
        from landmark3d.reporting.html import build_report

        rep = build_report(out, overwrite=True)
        console.print(f"report: {rep.html}")
    if result.failed:
        for f in result.failed:
            if f.error:
                err_console.print(f"[red]fold {f.fold} failed:[/] {f.error}", highlight=False)
            for s, e in f.stage_errors.items():
                err_console.print(f"[red]fold {f.fold}, stage {s} failed:[/] {e}", highlight=False)
        raise typer.Exit(1)


@app.command()
def report(
    run: Annotated[
        Path, typer.Argument(help="A run directory (with evaluated predictions) or a cv output.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="HTML file (default RUN/report.html).")
    ] = None,
    worst: Annotated[
        int, typer.Option("--worst", help="Number of worst cases shown as slices.")
    ] = 3,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing report.")
    ] = False,
    flag_above: Annotated[
        float,
        typer.Option(
            "--flag-above", help="List first the predictions expected to be off by more (mm)."
        ),
    ] = 4.0,
    pred: Annotated[
        list[Path] | None,
        typer.Option(
            "--pred",
            help="An evaluated prediction directory of this run kept outside it (repeatable; "
            "predictions_<stage> / pred_<stage> name their stage, any other name is the "
            "run's default `predict` stage).",
        ),
    ] = None,
) -> None:
    """Write a self-contained HTML report (tables, SDR curve, box plots, slices, training curves).

    Figures are PNG files in <report>_files/ beside the HTML file. The run's own evaluated
    predictions (RUN/predictions*/, RUN/pred_*/) are found by themselves; add those written
    elsewhere with --pred.

    Example: [bold]landmark3d report runs/demo[/]  (then open runs/demo/report.html), or
    [bold]landmark3d report runs/f0 --pred pred/[/]
    """
    from landmark3d.reporting.html import build_report

    result = build_report(
        run, out, overwrite=overwrite, n_worst=worst, flag_above=flag_above, pred_dirs=pred or ()
    )
    console.print(f"wrote {result.html} ({len(result.figures)} figure(s) in {result.files_dir})")


@app.command()
def bench(
    suite: Annotated[
        str, typer.Argument(help="phantom (the embedded data) or dataset (yours, --dataset).")
    ] = "phantom",
    dataset: Annotated[
        Path | None,
        typer.Option("--dataset", "-d", help="Dataset spec or original layout (suite dataset)."),
    ] = None,
    fold: Annotated[int, typer.Option("--fold", help="Held-out test fold.")] = 0,
    config: ConfigOption = "phantom_demo",
    overrides: OverrideOption = None,
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="Comma-separated subset of the methods (default all)."),
    ] = None,
    cases: Annotated[int, typer.Option("--cases", help="Phantom cases.")] = 30,
    size: Annotated[int, typer.Option("--size", help="Phantom voxels (longest axis).")] = 96,
    repeat: Annotated[int, typer.Option("--repeat", help="Timing repeats per case.")] = 3,
    atlas_k: Annotated[int, typer.Option("--atlas-k", help="Atlases fused (median).")] = 5,
    onestage_epochs: Annotated[
        int | None, typer.Option("--onestage-epochs", help="Default: the coarse stage's.")
    ] = None,
    work: Annotated[
        Path, typer.Option("--work", help="Working directory (runs, predictions).")
    ] = Path("runs/bench"),
    out: Annotated[
        Path, typer.Option("--out", help="Where <date>-<suite>.json/.md are written.")
    ] = Path("bench_results"),
    keep: Annotated[
        bool, typer.Option("--keep", help="Resume in an existing --work instead of wiping it.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace today's result files.")
    ] = False,
) -> None:
    """The comparison table: every method on the same data, split, seed and CPU budget.

    Rows: one-stage 3D U-Net, atlas registration, coarse only, coarse + fine (per-landmark and
    shared U-Nets), the full prior-guided method. Columns: MRE (SD), median, SDR@2/2.5/3/4/8 mm,
    per-landmark MRE, training time, inference time per case and over the image read time,
    peak memory.

    Example: [bold]landmark3d bench[/]  or  [bold]landmark3d bench dataset --dataset data/PDDCA[/]
    """
    import shlex
    import sys

    from landmark3d.baselines.suite import METHODS
    from landmark3d.baselines.suite_command import BenchRequest, run_bench

    cfg = _load_config(config, overrides)
    chosen = [m.strip() for m in (methods or ",".join(METHODS)).split(",") if m.strip()]
    req = BenchRequest(
        suite=suite,
        config=cfg,
        work=work / suite,
        out=out,
        dataset=dataset,
        fold=fold,
        cases=cases,
        size=size,
        methods=chosen,
        repeat=repeat,
        atlas_k=atlas_k,
        onestage_epochs=onestage_epochs,
        keep=keep,
        overwrite=overwrite,
        command="landmark3d " + shlex.join(sys.argv[1:]),
    )
    _, json_path, md_path = run_bench(req, log=lambda m: err_console.print(m, highlight=False))
    console.print(md_path.read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(f"wrote {json_path} and {md_path}")
