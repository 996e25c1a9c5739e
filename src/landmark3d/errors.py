"""Exception types of landmark3d.

Every error we raise on purpose says *what* is wrong, *where* (file, and line where it
applies) and *how to fix it*. The CLI prints ``str(error)`` as one line and exits non-zero;
the traceback is shown only with ``--debug``.
"""

from __future__ import annotations

from pathlib import Path


class Landmark3dError(Exception):
    """Base class of every error landmark3d raises deliberately.

    Args:
        problem: what is wrong, in one sentence.
        path: the file or directory concerned, if any.
        line: 1-based line number inside ``path``, if known.
        fix: what the user should do about it.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.line = line
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}"
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        text = f"{where}{self.problem}"
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


class ImageError(Landmark3dError):
    """An image file cannot be read, written, or is unusable (NaN voxels, bad spacing, ...)."""


class LandmarkFileError(Landmark3dError):
    """A landmark file is malformed, ambiguous about its coordinate system, or inconsistent."""


class DatasetError(Landmark3dError):
    """A dataset spec or layout is malformed or refers to missing files."""


class ConfigError(Landmark3dError):
    """An experiment config or plan is malformed (unknown key, wrong type, bad value)."""


class CheckpointError(Landmark3dError):
    """A checkpoint is missing, corrupt, or incompatible with the data it is applied to."""


class OutputExistsError(Landmark3dError):
    """An output file exists and ``--overwrite`` was not given."""
