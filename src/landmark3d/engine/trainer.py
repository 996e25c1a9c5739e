"""A small, generic epoch loop: train, validate, log, checkpoint, resume.

A training stage (coarse, fine, or a toy in the tests) implements :class:`Stage`; :func:`fit`
runs it. Run directory layout written by :func:`fit`::

    <out_dir>/metrics.csv          one row per completed epoch (rewritten atomically)
    <out_dir>/train.log            timestamped plain-text lines
    <out_dir>/checkpoints/last     after every epoch: models, optimizers, schedulers, scaler,
                                   RNG, epoch, best metric and the metrics history
    <out_dir>/checkpoints/best     models + state whenever the monitored metric improves

Determinism: at the start of epoch ``e`` (0-based) the trainer seeds python ``random`` and
torch with ``seed * 1000 + e`` and hands the stage ``np.random.default_rng([seed, e])``, so a
run resumed at an epoch boundary continues exactly like an uninterrupted one (on CPU).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from landmark3d.engine.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from landmark3d.engine.device import (
    amp_enabled,
    autocast,
    seed_everything,
    select_device,
    set_num_threads,
)
from landmark3d.errors import CheckpointError, ConfigError, OutputExistsError
from landmark3d.io.atomic import atomic_write_text

AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


class Stage(Protocol):
    """What :func:`fit` needs from a training stage.

    Subclass it to inherit the defaults of :meth:`make_schedulers` and :meth:`checkpoint_meta`.

    Attributes:
        name: stage name recorded in checkpoints (e.g. ``"coarse"``); a resume checks it.
        models: the modules trained, by name (no dots); moved to the device by :func:`fit`.
    """

    name: str
    models: dict[str, nn.Module]

    def make_optimizers(self, cfg: TrainerConfig) -> dict[str, torch.optim.Optimizer]:
        """Optimizers over ``self.models`` parameters (called after the move to the device)."""
        ...

    def make_schedulers(
        self, optimizers: dict[str, torch.optim.Optimizer], cfg: TrainerConfig
    ) -> dict[str, Any]:
        """LR schedulers, stepped once per epoch (``ReduceLROnPlateau`` with the monitor)."""
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON-able meta for checkpoints, e.g. ``landmark_names``, ``config``, ``plan``.

        ``landmark_names`` (if given) must match when resuming.
        """
        return {}

    def n_batches(self, epoch: int) -> int | None:
        """Number of training batches in ``epoch`` (for the progress bar), or None."""
        ...

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]:
        """The training batches of ``epoch``; all randomness must come from ``rng``/torch."""
        ...

    def train_step(
        self, batch: Any, device: torch.device, autocast_ctx: AutocastFactory
    ) -> torch.Tensor:
        """Forward one batch and return the scalar loss (not yet backpropagated).

        Run the network forward inside ``with autocast_ctx():`` so AMP applies on CUDA.
        """
        ...

    def validate(self, device: torch.device) -> dict[str, float]:
        """Validation metrics, e.g. ``{"val_mre_mm": 2.3}``; run under ``no_grad``/``eval``."""
        ...


@dataclass(frozen=True)
class TrainerConfig:
    """Settings of the epoch loop (stage-specific settings such as lr live in the stage).

    Attributes:
        epochs: total number of epochs of the run (a resume continues up to it).
        val_every: validate every N epochs (and always after the last epoch).
        seed: base seed of all randomness.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        amp: ``"auto"``/``"on"``/``"off"`` (or bool); only ever active on CUDA.
        grad_clip: max global gradient L2 norm, or None.
        log_every: write the step loss to ``train.log`` every N steps (0 = never).
        monitor: validation metric deciding ``checkpoints/best``.
        monitor_mode: ``"min"`` (lower is better) or ``"max"``.
        num_threads: torch CPU threads, or None for torch's default.
        deterministic: ask torch for deterministic algorithms.
    """

    epochs: int
    val_every: int = 1
    seed: int = 0
    device: str = "auto"
    amp: str | bool = "auto"
    grad_clip: float | None = None
    log_every: int = 50
    monitor: str = "val_mre_mm"
    monitor_mode: Literal["min", "max"] = "min"
    num_threads: int | None = None
    deterministic: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(
                f"epochs must be a positive integer, got {self.epochs!r}.", fix="use e.g. 100."
            )
        if not isinstance(self.val_every, int) or self.val_every < 1:
            raise ConfigError(f"val_every must be >= 1, got {self.val_every!r}.", fix="use e.g. 1.")
        if not isinstance(self.log_every, int) or self.log_every < 0:
            raise ConfigError(
                f"log_every must be >= 0, got {self.log_every!r}.", fix="use e.g. 50."
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(
                f"grad_clip must be > 0 or null, got {self.grad_clip!r}.", fix="use e.g. 12."
            )
        if self.monitor_mode not in ("min", "max"):
            raise ConfigError(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}.")


@dataclass
class TrainResult:
    """Outcome of :func:`fit`.

    Attributes:
        out_dir: the run directory.
        epochs_completed: epochs completed in total (including before a resume).
        global_step: optimizer steps taken in total.
        best_metric, best_epoch: best monitored value and its (1-based) epoch, or None.
        last_checkpoint: ``checkpoints/last`` (None if no epoch completed).
        best_checkpoint: ``checkpoints/best`` (None if never written).
        history: the metrics.csv rows as dicts.
        finished: True when ``epochs_completed == cfg.epochs``.
    """

    out_dir: Path
    epochs_completed: int
    global_step: int
    best_metric: float | None
    best_epoch: int | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM; the last complete checkpoint is intact."""


class _RunLog:
    """Append-only, timestamped ``train.log`` (flushed per line), echoed to a console."""

    def __init__(self, path: Path, console: Console | None) -> None:
        self.path = path
        self.console = console

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> int:
        """Cut the log back to ``size`` bytes; returns the number of bytes removed."""
        current = self.size()
        if current > size:
            with open(self.path, "r+b") as fh:
                fh.truncate(size)
        return max(current - size, 0)

    def write(self, message: str) -> None:
        stamp = datetime.now().isoformat(timespec="seconds")
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {message}\n")
        if self.console is not None:
            self.console.log(message, markup=False, highlight=False)


class _SignalGuard:
    """Turn the first SIGINT/SIGTERM into a stop request; a second one aborts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting")
        self.received = signal.Signals(signum).name

    def __enter__(self) -> _SignalGuard:
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


def _write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def _current_lrs(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
    if len(optimizers) == 1:
        (opt,) = optimizers.values()
        return {"lr": float(opt.param_groups[0]["lr"])}
    return {f"lr_{n}": float(o.param_groups[0]["lr"]) for n, o in optimizers.items()}


def _optimizer_step(
    stage: Stage,
    batch: Any,
    device: torch.device,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    use_amp: bool,
    grad_clip: float | None,
    where: str,
) -> float:
    """One forward/backward/step; returns the loss value."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss = stage.train_step(batch, device, lambda: autocast(device, use_amp))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"{type(stage).__name__}.train_step must return a scalar tensor")
    value = float(loss.detach())
    if not math.isfinite(value) and not use_amp:
        raise ConfigError(
            f"training diverged: loss is {value} at {where}.",
            fix="lower the learning rate or set grad_clip; resume from checkpoints/last.",
        )
    scaler.scale(loss).backward()
    if grad_clip is not None:
        params = [p for o in optimizers.values() for g in o.param_groups for p in g["params"]]
        for opt in optimizers.values():
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for opt in optimizers.values():
        scaler.step(opt)
    scaler.update()
    return value


@contextlib.contextmanager
def _progress_bar(enabled: bool, console: Console) -> Iterator[Progress]:
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


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    last = out / "checkpoints" / "last"
    leftovers = [
        p for p in (out / "checkpoints", out / "metrics.csv", out / "train.log") if p.exists()
    ]
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
        for name in ("metrics.csv", "train.log"):
            (out / name).unlink(missing_ok=True)


def fit(
    stage: Stage,
    cfg: TrainerConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``stage`` for ``cfg.epochs`` epochs, checkpointing into ``out_dir``.

    Args:
        stage: the stage to train (see :class:`Stage`).
        cfg: loop settings.
        out_dir: run directory (created).
        resume: continue from ``out_dir/checkpoints/last``; metrics.csv and train.log are cut
            back to that checkpoint so they stay consistent with it.
        progress: show a Rich progress bar and log echo on stderr (only on a terminal).
        stop_after_epochs: return after this many epochs of this call (the run can be resumed).
        overwrite: start afresh in a directory that holds a previous run.

    Returns:
        :class:`TrainResult`.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM (after the current step; the last complete
            checkpoint is kept and the message says how to resume).
        OutputExistsError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite``.
        CheckpointError: ``resume`` without a usable/compatible checkpoint.
        ConfigError: bad settings, no batches, diverged loss, or the monitor metric missing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_run_dir(out, resume, overwrite)
    last_path, best_path = out / "checkpoints" / "last", out / "checkpoints" / "best"
    console = Console(stderr=True, log_path=False)
    show = progress and console.is_terminal
    log = _RunLog(out / "train.log", console if show else None)

    set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    device = select_device(cfg.device)
    use_amp = amp_enabled(device, cfg.amp)
    for model in stage.models.values():
        model.to(device)
    optimizers = stage.make_optimizers(cfg)
    schedulers = stage.make_schedulers(optimizers, cfg)
    scaler = torch.amp.GradScaler("cuda" if use_amp else device.type, enabled=use_amp)
    scalers = {"amp": scaler} if use_amp else {}
    stage_meta = dict(stage.checkpoint_meta())
    meta = {**stage_meta, "stage": stage.name, "trainer": asdict(cfg)}

    start, global_step = 0, 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = []
    if resume:
        expect: dict[str, Any] = {"stage": stage.name}
        if "landmark_names" in stage_meta:
            expect["landmark_names"] = list(stage_meta["landmark_names"])
        state, _ = load_checkpoint(
            last_path, stage.models, optimizers, schedulers, scalers, expect=expect
        )
        start, global_step = int(state["epoch"]), int(state["global_step"])
        best, best_epoch = state.get("best_metric"), state.get("best_epoch")
        history = list(state.get("history", []))
        removed = log.truncate(int(state.get("log_bytes", 0)))
        _write_metrics_csv(out / "metrics.csv", history)
        log.write(
            f"resumed {stage.name} from {last_path} after epoch {start} "
            f"(step {global_step}; {removed} bytes of log from the unfinished run removed)"
        )
    else:
        log.write(f"start {stage.name}: device={device} amp={use_amp} config={asdict(cfg)}")

    completed = start
    end = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start + stop_after_epochs)
    resume_hint = f"resume with fit(..., resume=True) / `landmark3d train --resume` on {out}"
    with _SignalGuard() as guard, _progress_bar(show, console) as bar:
        for epoch in range(start, end):
            t0 = time.monotonic()
            random.seed(cfg.seed * 1000 + epoch)
            torch.manual_seed(cfg.seed * 1000 + epoch)
            rng = np.random.default_rng([cfg.seed, epoch])
            for model in stage.models.values():
                model.train()
            lrs = _current_lrs(optimizers)
            task = bar.add_task(
                f"{stage.name} {epoch + 1}/{cfg.epochs}", total=stage.n_batches(epoch), info=""
            )
            losses: list[float] = []
            for batch in stage.train_batches(epoch, rng):
                where = f"epoch {epoch + 1} step {global_step + 1}"
                value = _optimizer_step(
                    stage, batch, device, optimizers, scaler, use_amp, cfg.grad_clip, where
                )
                losses.append(value)
                global_step += 1
                bar.update(task, advance=1, info=f"loss {value:.4g}")
                if cfg.log_every and global_step % cfg.log_every == 0:
                    log.write(f"{where} loss {value:.6g}")
                if guard.received is not None:
                    kept = last_path if completed else "none (no epoch completed yet)"
                    msg = (
                        f"{guard.received} received during epoch {epoch + 1}; stopped without "
                        f"saving the partial epoch. Last complete checkpoint: {kept}; {resume_hint}"
                    )
                    log.write(msg)
                    raise TrainingInterrupted(msg)
            if not losses:
                raise ConfigError(
                    f"stage {stage.name!r} produced no training batches in epoch {epoch + 1}.",
                    fix="check the training split and batch size.",
                )
            metrics: dict[str, float] = {}
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                for model in stage.models.values():
                    model.eval()
                with torch.no_grad():
                    metrics = {k: float(v) for k, v in stage.validate(device).items()}
                if cfg.monitor not in metrics:
                    raise ConfigError(
                        f"monitored metric {cfg.monitor!r} is not among the validation metrics "
                        f"{sorted(metrics)}.",
                        fix="set monitor to one of them.",
                    )
            for sched in schedulers.values():
                if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    if cfg.monitor in metrics:
                        sched.step(metrics[cfg.monitor])
                else:
                    sched.step()
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "global_step": global_step,
                "train_loss": float(np.mean(losses)),
                **lrs,
                **metrics,
            }
            history.append(row)
            improved = cfg.monitor in metrics and _better(
                metrics[cfg.monitor], best, cfg.monitor_mode
            )
            if improved:
                best, best_epoch = metrics[cfg.monitor], epoch + 1
            summary = ", ".join(f"{k}={v:.6g}" for k, v in row.items() if isinstance(v, float))
            log.write(
                f"epoch {epoch + 1}/{cfg.epochs} done in {time.monotonic() - t0:.1f}s: {summary}"
                + (" (best)" if improved else "")
            )
            _write_metrics_csv(out / "metrics.csv", history)
            state_out = {
                "epoch": epoch + 1,
                "global_step": global_step,
                "best_metric": best,
                "best_epoch": best_epoch,
                "monitor": cfg.monitor,
                "history": history,
                "log_bytes": log.size(),
            }
            if improved:  # best before last: a crash in between redoes this epoch on resume
                save_checkpoint(best_path, stage.models, state=state_out, meta=meta)
            save_checkpoint(
                last_path, stage.models, optimizers, schedulers, scalers, state_out, meta
            )
            completed = epoch + 1
            bar.remove_task(task)
            if guard.received is not None:
                msg = (
                    f"{guard.received} received; stopped after epoch {epoch + 1} "
                    f"(checkpoint {last_path}); {resume_hint}"
                )
                log.write(msg)
                raise TrainingInterrupted(msg)

    done = completed
    if done >= cfg.epochs:
        log.write(
            f"finished {stage.name}: {done} epochs, best {cfg.monitor}={best} (epoch {best_epoch})"
        )
    return TrainResult(
        out_dir=out,
        epochs_completed=done,
        global_step=global_step,
        best_metric=best,
        best_epoch=best_epoch,
        last_checkpoint=last_path if last_path.is_dir() else None,
        best_checkpoint=best_path if best_path.is_dir() else None,
        history=history,
        finished=done >= cfg.epochs,
    )
