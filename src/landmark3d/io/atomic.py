"""Atomic file output: a crash never leaves a half-written prediction, metric or checkpoint.

Data are written to a temporary file in the destination directory and moved into place with
``os.replace`` (atomic on POSIX). An existing destination is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from landmark3d.errors import OutputExistsError


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is False."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(
            "output exists and would be overwritten.",
            path=p,
            fix="pass --overwrite or choose another output.",
        )
    return p


def current_umask() -> int:
    """The process's file-creation mask (e.g. 0o022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: str | Path) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would have given it.

    ``tempfile.mkstemp``/``mkdtemp`` create owner-only files (0600) and directories (0700);
    an output moved into place from one would stay private whatever the user's umask, and
    colleagues on a shared cluster could not read the models or predictions.
    """
    p = Path(path)
    if p.is_symlink() or not p.exists():
        return
    base = 0o777 if p.is_dir() else 0o666
    os.chmod(p, base & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``.

    The temporary keeps the destination's full suffix (e.g. ``.nii.gz``) so that writers that
    choose a format by extension keep working. On an exception the temporary is removed and
    ``path`` is untouched.
    """
    dest = check_writable(path, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(dest.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dest.name.split('.')[0]}-", suffix=suffix, dir=dest.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        publish_mode(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)
