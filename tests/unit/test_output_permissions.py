"""Outputs get the permissions of the user's umask, not tempfile's owner-only 0600/0700.

Atomic writes go through ``tempfile.mkstemp``/``mkdtemp``; without care every model,
prediction and dataset file would be private, unreadable by colleagues on a shared cluster.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from landmark3d.data.phantom import generate_phantom
from landmark3d.engine.checkpoint import save_checkpoint
from landmark3d.io.atomic import atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


def test_atomic_files_and_checkpoints_follow_the_umask(tmp_path: Path, umask: int) -> None:
    text = atomic_write_text(tmp_path / "pred" / "case1.fcsv", "x\n")
    assert _mode(text) == 0o666 & ~umask
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    save_checkpoint(ckpt, {"net": nn.Linear(2, 1)})
    assert _mode(ckpt) == 0o777 & ~umask
    assert all(_mode(f) == 0o666 & ~umask for f in ckpt.iterdir())


def test_phantom_directory_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spec = generate_phantom(tmp_path / "ph", n_cases=1, seed=0, size=16)
    finally:
        os.umask(old)
    assert _mode(spec.parent) == 0o755 and _mode(spec) == 0o644
    assert all(_mode(p) in (0o644, 0o755) for p in spec.parent.rglob("*"))
