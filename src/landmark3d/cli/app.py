"""The ``landmark3d`` Typer app, shared console and formatting helpers, and the entry point.

Commands live in sibling modules (one group each) that register on :data:`app`.

Every command catches :class:`landmark3d.errors.Landmark3dError` and prints it as one
readable line (file, problem, fix) with a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import inspect
import shlex
import sys
import warnings
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from landmark3d import __version__
from landmark3d.errors import Landmark3dError

_INTERRUPTS: list[KeyboardInterrupt] = []
"""The Ctrl-C/SIGTERM that stopped the command (typer turns it into a bare exit code 130)."""

RESUMABLE = ("train", "cv")
"""Commands that continue an interrupted run with ``--resume``."""


class _Group(TyperGroup):
    """The command group, keeping the interruption that typer would swallow."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            _INTERRUPTS.append(exc)
            raise


app = typer.Typer(
    name="landmark3d",
    cls=_Group,
    help="Anatomical landmark localization in 3D medical images (CT, MRI).\n\n"
    "Coordinates are world millimetres (LPS, as ITK) from file to file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# tables stay readable when the output is piped to a file or a CI log
console = Console(width=None if sys.stdout.isatty() else 120, soft_wrap=True)
err_console = Console(stderr=True)
_STATE = {"debug": False}


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


# ----------------------------------------------------------------------------- entry point
def rerun_command(argv: list[str]) -> str | None:
    """The command line that continues an interrupted ``argv`` (``--resume`` instead of
    ``--overwrite``), or None if its command cannot resume."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in RESUMABLE:
        return None
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["landmark3d", *args])


def interruption_message(exc: KeyboardInterrupt, argv: list[str]) -> str:
    """One line for an interrupted command: what stopped and, for training, how to continue."""
    from landmark3d.engine.trainer import TrainingInterrupted

    if not isinstance(exc, TrainingInterrupted):
        return f"interrupted{f': {exc}' if str(exc) else ''}"
    command = rerun_command(argv)
    if command is None:
        return f"interrupted: {exc.detail}."
    return f"interrupted: {exc.detail}. To continue: {command}"


def _interrupted(exc: KeyboardInterrupt) -> None:
    """Print the interruption line on stderr and exit with 130."""
    message = interruption_message(exc, sys.argv[1:])
    err_console.print(escape(message), highlight=False, soft_wrap=True)
    sys.exit(130)


def reflow_help(text: str) -> str:
    """``text`` with the hard-wrapped lines of each paragraph joined, so that the terminal
    wraps them once (Typer's rich mode keeps every newline, and at 80 columns a docstring's
    lines were wrapped twice, leaving words alone on a line). Paragraphs with list items or
    indented lines are kept as written."""
    out = []
    for para in text.split("\n\n"):
        lines = para.splitlines()
        if any(line.startswith((" ", "-", "*", "|", "•")) for line in lines[1:]):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def reflow_command_help(typer_app: typer.Typer) -> None:
    """Give every registered command without an explicit help its reflowed docstring."""
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = reflow_help(inspect.getdoc(info.callback) or "")


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Show a warning as one ``warning: ...`` line (Python's default adds the source file and
    line of the ``warnings.warn`` call, which tells a command-line user nothing)."""
    err_console.print(
        f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True
    )


def main() -> None:
    """Console-script entry point: readable one-line errors and warnings, tracebacks (and
    Python's warning format) only with --debug."""
    debug = "--debug" in sys.argv[1:]
    _INTERRUPTS.clear()
    with warnings.catch_warnings():  # the one-line format only for this command
        if not debug:
            warnings.showwarning = _one_line_warning
        _run_app(debug)


def _run_app(debug: bool) -> None:
    try:
        rc = app(standalone_mode=False)
        if rc == 130 and _INTERRUPTS:
            _interrupted(_INTERRUPTS[-1])
        sys.exit(rc if isinstance(rc, int) else 0)
    except Landmark3dError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # usage errors (typer vendors click: typer._click) and the like
        show = getattr(exc, "show", None)
        if isinstance(exc, typer.TyperException) and callable(show):
            show()
            sys.exit(getattr(exc, "exit_code", 2))
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
