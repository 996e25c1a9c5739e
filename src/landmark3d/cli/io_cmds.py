"""Data in and out: ``import pddca``, ``import layout``, ``export`` (a model as TorchScript /
ONNX: ``export --model RUN --out DIR``) and ``export layout``, ``convert``, ``package``."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from landmark3d.cli.app import app, console, err_console
from landmark3d.errors import ConfigError, DatasetError

import_app = typer.Typer(
    help="Bring a dataset in as a dataset.json spec (PDDCA, the original layout).",
    no_args_is_help=True,
)
export_app = typer.Typer(no_args_is_help=True)  # help: the docstring of export_model_cmd
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")

OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing output files.")
]


def _say(text: str) -> None:
    """One output line, never wrapped (paths and counts stay greppable)."""
    console.print(text, highlight=False, soft_wrap=True, markup=False)


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        err_console.print(
            f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True
        )


def _parse_map(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        label, sep, name = item.rpartition("=")
        if not sep or not label.strip() or not name.strip():
            raise DatasetError(
                f"--map {item!r} is not LABEL=NAME.", fix="write e.g. --map 'Mandible L=mand_l'."
            )
        out[label.strip()] = name.strip()
    return out


# ----------------------------------------------------------------------------- import pddca
@import_app.command("pddca")
def import_pddca_cmd(
    src: Annotated[Path, typer.Argument(help="The PDDCA folder (patient folders below it).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write.")],
    require: Annotated[
        str,
        typer.Option("--require", help="Landmarks a patient must have (comma-separated)."),
    ] = "chin,mand_l,mand_r,odont_proc,occ_bone",
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds (0 = none).")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the fold split.")] = 0,
    copy: Annotated[
        bool,
        typer.Option("--copy/--link", help="Copy the images, or symlink them (default)."),
    ] = False,
    fcsv_coords: Annotated[
        str,
        typer.Option(
            "--fcsv-coords",
            help="How to read the .fcsv numbers: stated (what the file says; no line = RAS), "
            "auto (the system that puts the landmarks inside the image), RAS or LPS.",
        ),
    ] = "stated",
    label_map: Annotated[
        list[str] | None,
        typer.Option("--map", help="Extra label mapping LABEL=NAME (repeatable)."),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Import PDDCA (per patient img.nrrd + a Slicer .fcsv) as a dataset with a K-fold split.

    Patients lacking a required landmark, an image or an .fcsv are skipped and listed with the
    reason; each .fcsv's coordinate system is checked against its image.

    Example: [bold]landmark3d import pddca ~/data/PDDCA --out data/pddca[/]
    """
    from landmark3d.data.importers.pddca import import_pddca

    result = import_pddca(
        src,
        out,
        require=[r for r in require.split(",") if r.strip()],
        n_folds=folds,
        seed=seed,
        copy=copy,
        fcsv_coords=fcsv_coords,
        label_map=_parse_map(label_map),
        overwrite=overwrite,
    )
    systems: dict[str, int] = {}
    for p in result.kept:
        key = f"{p.coordinate_system} ({p.system_source})"
        systems[key] = systems.get(key, 0) + 1
    _say(
        f"kept {len(result.kept)} patient(s) with {', '.join(result.required)}; "
        f"skipped {len(result.skipped)}; {len(result.folds)} fold(s) of "
        f"{', '.join(str(len(f)) for f in result.folds) or '—'} case(s)"
    )
    _say("landmark files read as: " + ", ".join(f"{k}: {n}" for k, n in sorted(systems.items())))
    for p in result.kept:
        for note in p.notes:
            console.print(
                f"[yellow]note[/] {escape(f'{p.id}: {note}')}", highlight=False, soft_wrap=True
            )
    for sk in result.skipped:
        console.print(
            f"[red]skipped[/] {escape(f'{sk.id} ({sk.folder}): {sk.reason} Fix: {sk.fix}')}",
            highlight=False,
            soft_wrap=True,
        )
    _say(f"wrote {result.spec_path} and import_report.json")


# ----------------------------------------------------------------------------- layouts
@import_app.command("layout")
def import_layout_cmd(
    src: Annotated[
        Path, typer.Argument(help="Original-layout directory (images/, setup/landmark.csv).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory or .json to write.")],
    overwrite: OverwriteOption = False,
) -> None:
    """Convert the original layout into a dataset.json (landmarks, order and folds kept exactly).

    Example: [bold]landmark3d import layout data/seed_layout --out data/seed[/]
    """
    from landmark3d.data.dataset import load_dataset
    from landmark3d.data.importers.layout import import_layout

    spec = import_layout(src, out, overwrite=overwrite)
    ds = load_dataset(spec)
    _say(
        f"wrote {spec}: {len(ds.cases)} case(s), {len(ds.landmark_names)} landmark(s), "
        f"{len(ds.folds)} fold(s)"
    )


@export_app.callback(invoke_without_command=True)
def export_model_cmd(
    ctx: typer.Context,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Run directory of `landmark3d train`, or a model.zip of `landmark3d package`.",
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="torchscript, or onnx (needs landmark3d\\[export])."),
    ] = "torchscript",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory to write the export in.")
    ] = None,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="Which checkpoint: best or last.")
    ] = "best",
    stage: Annotated[
        list[str] | None,
        typer.Option(
            "--stage",
            help="Export only this stage's networks: coarse, fine, correlated (repeatable; "
            "default: every stage the run has).",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help="Compare every exported network with PyTorch on random inputs (max abs "
            "difference must stay below 1e-4).",
        ),
    ] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier export at --out.")
    ] = False,
) -> None:
    """Export a trained model as self-contained TorchScript / ONNX files, or (subcommand
    [bold]layout[/]) a dataset in the original layout.

    Every network of the run (coarse regressor, fine U-Nets, correlated group models) becomes
    one file; manifest.json describes inputs, outputs (shape, dtype, meaning, units), landmark
    names, the plan and the pre-/post-processing, with a sha256 per file, so the networks run
    without landmark3d.

    Example: [bold]landmark3d export --model runs/f0 --format torchscript --out exported/[/]
    """
    if ctx.invoked_subcommand is not None:
        if model is not None or out is not None:
            raise ConfigError(
                f"--model/--out go with `landmark3d export --model ...`, not with `export "
                f"{ctx.invoked_subcommand}`.",
                fix=f"write `landmark3d export {ctx.invoked_subcommand} ...` with the "
                "subcommand's own options.",
            )
        return
    if model is None or out is None:
        missing = " and ".join(n for n, v in (("--model", model), ("--out", out)) if v is None)
        raise ConfigError(
            f"export needs {missing}.",
            fix="write e.g. `landmark3d export --model runs/f0 --format torchscript --out "
            "exported/` (or `landmark3d export layout ...` for a dataset).",
        )
    from landmark3d.inference.export import export_run

    stages = [s.strip() for item in stage or [] for s in item.split(",") if s.strip()]
    result = export_run(
        model,
        out,
        fmt=fmt.lower(),
        checkpoint=checkpoint,
        stages=stages or None,
        overwrite=overwrite,
        check=check,
    )
    for entry in result.manifest["networks"]:
        diff = entry["parity_max_abs_diff"]
        parity = "not checked" if diff is None else f"max |diff| vs PyTorch {diff:.2g}"
        _say(
            f"  {entry['file']}: {', '.join(entry['landmarks'])} "
            f"({entry['bytes'] / 1e6:.2f} MB, {parity})"
        )
    _say(
        f"wrote {result.out}: {len(result.manifest['networks'])} {fmt.lower()} network(s), "
        "manifest.json, README.md, SHA256SUMS"
    )


@export_app.command("layout")
def export_layout_cmd(
    dataset: Annotated[Path, typer.Argument(help="dataset.json, its directory, or a layout.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the layout in.")],
    coords: Annotated[
        str | None,
        typer.Option(
            "--coords", help="System of setup/landmark.csv: LPS or RAS (default: as imported)."
        ),
    ] = None,
    image_format: Annotated[
        str, typer.Option("--image-format", help="Image files: .nii.gz or .nii.")
    ] = ".nii.gz",
    overwrite: OverwriteOption = False,
) -> None:
    """Write a dataset as images/*.nii.gz + setup/landmark.csv + setup/cv0..cvK.

    Example: [bold]landmark3d export layout data/pddca --out data/pddca_layout[/]
    """
    from landmark3d.data.importers.layout import export_layout

    root = export_layout(
        dataset, out, coords=coords, image_format=image_format, overwrite=overwrite
    )
    _say(f"wrote {root}/images, {root}/setup/landmark.csv and the fold files")


# ----------------------------------------------------------------------------- convert
@app.command()
def convert(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Landmark file to read.")],
    dst: Annotated[
        Path,
        typer.Argument(
            metavar="OUT", help="File to write; format from .fcsv/.mrk.json/.csv/.json."
        ),
    ],
    coords: Annotated[
        str | None,
        typer.Option("--coords", help="System written: LPS or RAS (default: the input's)."),
    ] = None,
    in_coords: Annotated[
        str | None,
        typer.Option(
            "--in-coords", help="System of an input that does not state one (CSV/JSON): LPS or RAS."
        ),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Convert landmarks between .fcsv, .mrk.json, .csv and .json (world mm, LPS or RAS).

    Example: [bold]landmark3d convert pred/case01.json case01.fcsv --coords RAS[/]
    """
    from landmark3d.data.dataset import stated_coordinate_system
    from landmark3d.io.landmarks import landmark_format, read_landmarks, write_landmarks

    fmt_in = landmark_format(src)
    landmark_format(dst)  # unknown output suffix: refuse before reading
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ls = read_landmarks(src, coords=in_coords)
        default = {"fcsv": "RAS", "mrk.json": "LPS"}.get(fmt_in, "LPS")
        system = (coords or stated_coordinate_system(src) or in_coords or default).upper()
        write_landmarks(ls, dst, coords=system, overwrite=overwrite)
    _print_warnings(caught)
    _say(f"wrote {dst}: {int(ls.present.sum())}/{len(ls)} landmark(s), {system}")


# ----------------------------------------------------------------------------- package
@app.command()
def package(
    run: Annotated[Path, typer.Argument(help="Run directory of `landmark3d train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model archive to write (.zip).")],
    overwrite: OverwriteOption = False,
) -> None:
    """Pack a trained run into a shareable model.zip (weights, config, plan, model card).

    The archive holds only JSON, CSV, Markdown and safetensors files; `predict --model
    model.zip` checks every member and never executes or unpickles anything from it.

    Example: [bold]landmark3d package runs/f0 --out model.zip[/]
    """
    from landmark3d.packaging import package_run, read_manifest

    path = package_run(run, out, overwrite=overwrite)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = read_manifest(path)
    _say(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(manifest['files'])} files, "
        f"sha256 {digest})"
    )
