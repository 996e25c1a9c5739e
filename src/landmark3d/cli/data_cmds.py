"""Data commands: phantom, verify, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from landmark3d.cli.app import app, console, err_console, print_summary_table


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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --json file.")
    ] = False,
) -> None:
    """Check a dataset and report every problem with its file and fix (exit 1 on errors).

    Example: [bold]landmark3d verify data/phantom[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.data.verify import verify_dataset
    from landmark3d.io.atomic import atomic_write_text, check_writable

    if json_out is not None:
        check_writable(json_out, overwrite)  # refuse before the (slow) image checks
    ds = load_dataset(dataset)
    report = verify_dataset(ds, check_images=not no_images)
    summary = report.to_dict().get("summary", {})
    _print_verify_summary(ds.name, len(ds.cases), summary)
    for p in report.problems:
        where = p.case or "-"
        path = f" [{p.path}]" if p.path else ""
        style = "red" if p.severity == "error" else "yellow"
        text = escape(f"{where}{path}: {p.message} Fix: {p.fix}")
        console.print(f"[{style}]{p.severity}[/] {text}", soft_wrap=True, highlight=False)
    n_err = sum(p.severity == "error" for p in report.problems)
    n_warn = len(report.problems) - n_err
    if json_out is not None:
        atomic_write_text(
            json_out, json.dumps(report.to_dict(), indent=2, default=str), overwrite=overwrite
        )
    console.print(f"{n_err} error(s), {n_warn} warning(s)")
    if not report.ok:
        raise typer.Exit(1)


def _print_verify_summary(name: str, n_cases: int, summary: dict[str, Any]) -> None:
    table = Table(title=f"dataset {name!r}: {n_cases} cases")
    table.add_column("property")
    table.add_column("value")
    for key, value in summary.items():
        if key in ("cases", "landmarks"):
            continue
        table.add_row(str(key), str(value))
    console.print(table)
    landmarks = summary.get("landmarks") or []
    if landmarks:
        t2 = Table(title="landmarks")
        t2.add_column("landmark")
        t2.add_column("cases", justify="right")
        t2.add_column("spread mm", justify="right")
        for lm in landmarks:
            spread = lm["spread_mm"]
            t2.add_row(
                str(lm["name"]), str(lm["count"]), "—" if spread is None else f"{spread:.2f}"
            )
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

    Example: [bold]landmark3d evaluate --pred runs/demo/predictions --truth data/phantom[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.evaluation import evaluate as run_evaluation
    from landmark3d.evaluation import write_evaluation

    ds = load_dataset(truth)
    cases = ds.split(fold)[1] if fold is not None else None
    result = run_evaluation(pred, ds, cases=cases)
    write_evaluation(result, out or pred, overwrite=overwrite)
    print_summary_table(result.summary, title=f"{ds.name}: {pred}")
    notes = [f"warning: {w}" for w in result.warnings]
    if result.cases_without_prediction:
        missing = result.cases_without_prediction
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        notes.append(f"no prediction file for {len(missing)} case(s): {shown}")
    for line in notes[:20]:
        err_console.print(escape(line))
    if len(notes) > 20:
        err_console.print(f"... and {len(notes) - 20} more warning(s): see metrics.json")
    console.print(f"wrote {(out or pred) / 'metrics.json'} and metrics.csv")
