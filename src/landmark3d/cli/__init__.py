"""The ``landmark3d`` command line: one Typer app, a thin layer over the library.

Every command catches :class:`landmark3d.errors.Landmark3dError` and prints it as one
readable line (file, problem, fix) with a non-zero exit code; ``--debug`` shows the traceback.
Each command group is a module registering on the shared :data:`app`; importing this package
registers them all.
"""

from landmark3d.cli import data_cmds, io_cmds, model_cmds, report_cmds  # noqa: F401  (register commands)
from landmark3d.cli.app import app, main, reflow_command_help

reflow_command_help(app)  # after every command module has registered

__all__ = ["app", "main"]
