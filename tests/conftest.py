"""Shared test fixtures.

* ``phantom_dir`` — a small phantom dataset (6 cases, ~48 voxels per axis, 3 folds), generated
  once per test session. Treat it as read-only: copy it (``shutil.copytree``) before breaking it.
* ``tiny_run`` — a run trained once per session through the command line
  (``landmark3d train``) on ``phantom_dir`` fold 0 with tiny networks and 2 epochs per stage
  (:data:`TINY_OVERRIDES`). Read-only too: copy it before resuming or retraining it.
* ``cli`` — runs the ``landmark3d`` console-script entry point in-process and returns the exit
  code with the captured stdout and stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

PHANTOM_CASES = 6
PHANTOM_SIZE = 48
PHANTOM_SEED = 0

TINY_OVERRIDES: tuple[str, ...] = (
    "coarse.epochs=2",
    "fine.epochs=2",
    "coarse.widths=[4,4,8,8]",
    "coarse.layers=[1,1,1,1]",
    "coarse.grid=[32,32,32]",
    "coarse.val_every=1",
    "fine.channels=[4,8]",
    "fine.patch_size=[16,16,16]",
    "fine.val_every=1",
    "correlated.epochs=2",
    "correlated.channels=[4,8]",
    "correlated.val_every=1",
)
"""``--set`` overrides of ``phantom_demo`` that make a whole training run take seconds."""


def set_args(overrides: Sequence[str]) -> list[str]:
    """``["--set", o1, "--set", o2, ...]``."""
    return [arg for o in overrides for arg in ("--set", o)]


def tiny_train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    """Arguments of ``landmark3d train`` for the tiny run (fold 0) plus ``extra``."""
    return [
        "train",
        "--config",
        "phantom_demo",
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--fold",
        "0",
        *set_args(TINY_OVERRIDES),
        *extra,
    ]


def invoke_main(argv: Sequence[str | Path]) -> int:
    """Run ``landmark3d.cli.main`` with ``sys.argv = ["landmark3d", *argv]``; the exit code."""
    from landmark3d.cli import main

    saved = sys.argv
    sys.argv = ["landmark3d", *(str(a) for a in argv)]
    try:
        main()
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return 0


@dataclass
class CliResult:
    """Exit code and captured output of one in-process ``landmark3d`` call."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        """The non-blank lines of stderr."""
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli("verify", path)`` -> :class:`CliResult` (main() run in-process)."""

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()  # drop whatever was printed before
        code = invoke_main(args)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom dataset directory (dataset.json, images/, landmarks/), made once."""
    from landmark3d.data.phantom import generate_phantom

    out = tmp_path_factory.mktemp("data") / "phantom"
    generate_phantom(out, n_cases=PHANTOM_CASES, seed=PHANTOM_SEED, size=PHANTOM_SIZE)
    return out


@pytest.fixture(scope="session")
def tiny_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A coarse + fine run trained once through ``landmark3d train`` (tiny, 2 epochs each)."""
    import torch

    run = tmp_path_factory.mktemp("runs") / "tiny"
    threads = torch.get_num_threads()
    try:
        code = invoke_main(tiny_train_args(phantom_dir, run))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, f"training the tiny run failed with exit code {code}"
    return run
