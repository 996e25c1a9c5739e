"""The files and signals of a training run: ``train.log``, ``metrics.csv``, ``timing.csv``,
the end-of-epoch checkpoint writes, the progress bar, and Ctrl-C/SIGTERM as a stop request.

Used by :func:`landmark3d.engine.trainer.fit` (which owns the epoch loop); the run directory
layout is described there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from landmark3d.engine.checkpoint import checkpoint_exists, save_checkpoint
from landmark3d.errors import CheckpointError, OutputExistsError
from landmark3d.io.atomic import atomic_write_text


class RunLog:
    """Append-only, timestamped ``train.log`` (flushed per line), echoed to a console.

    With ``path=None`` (ranks other than 0) nothing is written or echoed.
    """

    def __init__(self, path: Path | None, console: Console | None) -> None:
        self.path = path
        self.console = console

    def size(self) -> int:
        return self.path.stat().st_size if self.path and self.path.exists() else 0

    def truncate(self, size: int) -> int:
        """Cut the log back to ``size`` bytes; returns the number of bytes removed."""
        if self.path is None:
            return 0
        current = self.size()
        if current > size:
            with open(self.path, "r+b") as fh:
                fh.truncate(size)
        return max(current - size, 0)

    def write(self, message: str) -> None:
        if self.path is None:
            return
        stamp = datetime.now().isoformat(timespec="seconds")
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {message}\n")
        if self.console is not None:
            self.console.log(message, markup=False, highlight=False)


class SignalGuard:
    """Turn the first SIGINT/SIGTERM into a stop request; a second one aborts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting")
        self.received = signal.Signals(signum).name

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


@dataclass
class EpochWriter:
    """Rank 0's end-of-epoch writes: log line, metrics.csv, timing.csv, checkpoints."""

    out: Path
    log: RunLog
    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    scalers: dict[str, Any]
    meta: dict[str, Any]

    def write(self, line: str, state: dict[str, Any], improved: bool) -> None:
        self.log.write(line)
        write_metrics_csv(self.out / "metrics.csv", state["history"])
        write_metrics_csv(self.out / "timing.csv", state["timing"])
        state = {**state, "log_bytes": self.log.size()}
        ckpts = self.out / "checkpoints"
        if improved:  # best before last: a crash in between redoes this epoch on resume
            save_checkpoint(ckpts / "best", self.models, state=state, meta=self.meta)
        save_checkpoint(
            ckpts / "last", self.models, self.optimizers, self.schedulers, self.scalers,
            state, self.meta,
        )  # fmt: skip


@contextlib.contextmanager
def progress_bar(enabled: bool, console: Console) -> Iterator[Progress]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
        transient=False,
    ) as prog:
        yield prog


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    last = out / "checkpoints" / "last"
    files = ("metrics.csv", "train.log", "timing.csv")
    leftovers = [p for p in (out / "checkpoints", *(out / f for f in files)) if p.exists()]
    if resume:
        if not checkpoint_exists(last):
            raise CheckpointError(
                "cannot resume: no checkpoint 'last' in this run directory.",
                path=last,
                fix="start the run without --resume, or point to the run directory you resume.",
            )
    elif leftovers:
        if not overwrite:
            raise OutputExistsError(
                "the run directory already holds a training run.",
                path=out,
                fix="resume it (--resume), pass --overwrite to start again, or choose another output.",
            )
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in files:
            (out / name).unlink(missing_ok=True)
