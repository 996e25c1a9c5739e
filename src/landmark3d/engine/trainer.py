"""A small, generic epoch loop: train, validate, log, checkpoint, resume.

A training stage (coarse, fine, or a toy in the tests) implements :class:`Stage`; :func:`fit`
runs it. Run directory layout written by :func:`fit`::

    <out_dir>/metrics.csv          one row per completed epoch (rewritten atomically)
    <out_dir>/train.log            timestamped plain-text lines
    <out_dir>/timing.csv           per epoch: data_wait_s (waiting for the next batch),
                                   compute_s (forward/backward/step), validate_s, epoch_s,
                                   samples, samples_per_s, world_size
    <out_dir>/checkpoints/last     after every epoch: models, optimizers, schedulers, scaler,
                                   RNG, epoch, best metric and the metrics history
    <out_dir>/checkpoints/best     models + state whenever the monitored metric improves

Determinism: at the start of epoch ``e`` (0-based) the trainer seeds python ``random`` and
torch with ``seed * 1000 + e`` and hands the stage ``np.random.default_rng([seed, e])``, so a
run resumed at an epoch boundary continues exactly like an uninterrupted one (on CPU).
Batches are built in a background thread (``TrainerConfig.prefetch``) from that generator
alone, so their order and content do not depend on the thread.

Multi-process runs (``torchrun``): see :mod:`landmark3d.engine.distributed`. Every rank draws
the same global batches and trains on its share; gradients are summed over ranks so K
processes do the optimisation of one process with the same global batch, except for batch
norm (the coarse ResNet): it is not synchronised, each rank normalises its share with the
share's own statistics, so such a stage does not reproduce a 1-process run. Rank 0 alone
validates (the metrics are broadcast) and writes every file; the others only read.
AMP (bfloat16, or float16 with loss scaling) and channels-last 3D are automatic on CUDA;
CPU stays float32.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from rich.console import Console
from torch import nn

from landmark3d.engine.checkpoint import load_checkpoint
from landmark3d.engine.device import (
    amp_dtype,
    amp_enabled,
    autocast,
    channels_last_enabled,
    grad_scaler,
    seed_everything,
    select_device,
    set_num_threads,
    to_channels_last,
)
from landmark3d.engine.distributed import (
    DistContext,
    Fed,
    Prefetcher,
    agree,
    broadcast_state,
    check_batch_norm_shares,
    feed,
    has_batch_norm,
    init_distributed,
    on_main,
    shard_batch,
    sync_gradients,
    unique_parameters,
)
from landmark3d.engine.run_files import (
    EpochWriter,
    RunLog,
    SignalGuard,
    prepare_run_dir,
    progress_bar,
    write_metrics_csv,
)
from landmark3d.errors import ConfigError

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
        """The (global) training batches of ``epoch``; all randomness must come from ``rng``.

        May run in a background thread (:class:`~landmark3d.engine.distributed.Prefetcher`):
        do not draw from torch's global RNG here. In a multi-process run each rank trains on
        its share (``shard_batch(batch, rank, world) -> (local batch | None, loss weight)``
        if the stage defines it, else the generic
        :func:`~landmark3d.engine.distributed.shard_batch` slicing every tensor's first axis).
        """
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
        amp_dtype: ``"auto"`` (bfloat16 where supported, else float16 + loss scaling),
            ``"bf16"`` or ``"fp16"``.
        channels_last: ``"auto"`` (CUDA only), ``"on"``/``"off"``: 3D conv weights in
            ``channels_last_3d`` memory format.
        prefetch: batches built ahead in a background thread (0 = build them inline).
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
    amp_dtype: str = "auto"
    channels_last: str | bool = "auto"
    prefetch: int = 2

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
        if (
            isinstance(self.prefetch, bool)
            or not isinstance(self.prefetch, int)
            or self.prefetch < 0
        ):
            raise ConfigError(f"prefetch must be >= 0, got {self.prefetch!r}.", fix="use e.g. 2.")
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
        timing: the timing.csv rows (data wait, compute, samples/s per epoch).
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
    timing: list[dict[str, Any]] = field(default_factory=list)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM; the last complete checkpoint is intact.

    Attributes:
        detail: what happened (signal, stage, epoch) and which checkpoint was kept.
        hint: how to continue (the ``resume_hint`` given to :func:`fit`).
    """

    def __init__(self, detail: str, hint: str = "") -> None:
        super().__init__(f"{detail}; {hint}" if hint else detail)
        self.detail = detail
        self.hint = hint


def _better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def _current_lrs(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
    if len(optimizers) == 1:
        (opt,) = optimizers.values()
        return {"lr": float(opt.param_groups[0]["lr"])}
    return {f"lr_{n}": float(o.param_groups[0]["lr"]) for n, o in optimizers.items()}


@dataclass
class _StepEnv:
    """What every optimizer step needs besides the batch."""

    device: torch.device
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    use_amp: bool
    dtype: torch.dtype
    grad_clip: float | None
    ctx: DistContext
    params: list[nn.Parameter]


def _diverged(value: float, where: str) -> ConfigError:
    return ConfigError(
        f"training diverged: loss is {value} at {where}.",
        fix="lower the learning rate or set grad_clip; resume from checkpoints/last.",
    )


def _optimizer_step(
    stage: Stage, fed: Fed, env: _StepEnv, where: str, stop: bool
) -> tuple[float, bool]:
    """One forward/backward/(all-reduce)/step.

    Returns:
        ``(loss, stop)``: the loss of the global batch (in a multi-process run the weighted sum
        over ranks) and whether any rank asked to stop.
    """
    for opt in env.optimizers.values():
        opt.zero_grad(set_to_none=True)
    value = 0.0
    if fed.local is not None:
        loss = stage.train_step(
            fed.local, env.device, lambda: autocast(env.device, env.use_amp, env.dtype)
        )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"{type(stage).__name__}.train_step must return a scalar tensor")
        value = float(loss.detach())
        if not env.ctx.is_distributed and not math.isfinite(value) and not env.use_amp:
            raise _diverged(value, where)
        if env.ctx.is_distributed:  # sum over ranks of weight * mean = mean of the global batch
            loss, value = loss * fed.weight, value * fed.weight
        env.scaler.scale(loss).backward()
    if env.ctx.is_distributed:
        value, stop = sync_gradients(env.params, value, stop, env.ctx)
        if not math.isfinite(value) and not env.use_amp:
            raise _diverged(value, where)
    if env.grad_clip is not None:
        for opt in env.optimizers.values():
            env.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(env.params, env.grad_clip)
    for opt in env.optimizers.values():
        env.scaler.step(opt)
    env.scaler.update()
    if env.device.type == "cuda":  # so that compute_s measures the work, not its launch
        torch.cuda.synchronize(env.device)
    return value, stop


def fit(
    stage: Stage,
    cfg: TrainerConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    overwrite: bool = False,
    resume_hint: str | None = None,
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
        resume_hint: how to continue after an interruption, for the message and train.log
            (default: ``fit(..., resume=True)`` on ``out_dir``); the caller that knows the
            command and run directory the user gave (e.g. ``train_run``) says it better.

    Returns:
        :class:`TrainResult`.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM (after the current step; the last complete
            checkpoint is kept and the message says how to resume: ``resume_hint``).
        OutputExistsError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite``.
        CheckpointError: ``resume`` without a usable/compatible checkpoint.
        ConfigError: bad settings, no batches, diverged loss, or the monitor metric missing.
    """
    out = Path(out_dir)
    ctx = init_distributed(cfg.device)  # no-op unless torchrun started several processes
    sizes = getattr(stage, "batch_sizes", None)
    if ctx.is_distributed and callable(sizes) and has_batch_norm(stage.models):
        # before any work: a clear error, not torch's mid-epoch crash
        shapes: Mapping[str, Sequence[int]] = getattr(stage, "sample_shapes", dict)()
        check_batch_norm_shares(stage.name, stage.models, shapes, sizes(), ctx.world_size)

    def prepare() -> None:
        out.mkdir(parents=True, exist_ok=True)
        prepare_run_dir(out, resume, overwrite)

    on_main(prepare, ctx)
    last_path, best_path = out / "checkpoints" / "last", out / "checkpoints" / "best"
    console = Console(stderr=True, log_path=False)
    show = progress and console.is_terminal and ctx.is_main
    log = RunLog(out / "train.log" if ctx.is_main else None, console if show else None)

    set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    device = select_device(cfg.device, ctx.local_rank if ctx.is_distributed else None)
    use_amp = amp_enabled(device, cfg.amp)
    dtype = amp_dtype(device, cfg.amp_dtype)
    channels_last = channels_last_enabled(device, cfg.channels_last)
    for model in stage.models.values():
        model.to(device)
        if channels_last:
            to_channels_last(model)
    optimizers = stage.make_optimizers(cfg)
    schedulers = stage.make_schedulers(optimizers, cfg)
    scaler = grad_scaler(device, use_amp, dtype)
    scalers = {"amp": scaler} if scaler.is_enabled() else {}
    env = _StepEnv(
        device, optimizers, scaler, use_amp, dtype, cfg.grad_clip, ctx,
        unique_parameters(optimizers.values()),
    )  # fmt: skip
    stage_meta = dict(stage.checkpoint_meta())
    meta = {**stage_meta, "stage": stage.name, "trainer": asdict(cfg)}
    sharder = getattr(stage, "shard_batch", None) or shard_batch

    start, global_step = 0, 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
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
        timing = list(state.get("timing", []))

        def rewind() -> None:
            removed = log.truncate(int(state.get("log_bytes", 0)))
            write_metrics_csv(out / "metrics.csv", history)
            write_metrics_csv(out / "timing.csv", timing)
            log.write(
                f"resumed {stage.name} from {last_path} after epoch {start} "
                f"(step {global_step}; {removed} bytes of log from the unfinished run removed)"
            )

        on_main(rewind, ctx)
    else:
        log.write(
            f"start {stage.name}: device={device} amp={use_amp}"
            f"{f' ({dtype})' if use_amp else ''} channels_last={channels_last} "
            f"world_size={ctx.world_size} config={asdict(cfg)}"
        )
    broadcast_state(stage.models, ctx)  # every rank starts from rank 0's weights

    completed = start
    end = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start + stop_after_epochs)
    hint = resume_hint or f"to continue, call fit(..., resume=True) on {out}"
    with SignalGuard() as guard, progress_bar(show, console) as bar:
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
            wait_s = compute_s = 0.0
            samples = 0
            fed_batches = feed(stage.train_batches(epoch, rng), ctx, sharder)
            with Prefetcher(fed_batches, cfg.prefetch) as prefetched:
                batches = iter(prefetched)
                while True:
                    t_wait = time.monotonic()
                    fed = next(batches, None)
                    t_step = time.monotonic()
                    wait_s += t_step - t_wait
                    if fed is None:
                        break
                    where = f"epoch {epoch + 1} step {global_step + 1}"
                    value, stop = _optimizer_step(
                        stage, fed, env, where, guard.received is not None
                    )
                    compute_s += time.monotonic() - t_step
                    samples += fed.samples
                    losses.append(value)
                    global_step += 1
                    bar.update(task, advance=1, info=f"loss {value:.4g}")
                    if cfg.log_every and global_step % cfg.log_every == 0:
                        log.write(f"{where} loss {value:.6g}")
                    if stop:
                        kept = last_path if completed else "none (no epoch completed yet)"
                        detail = (
                            f"{guard.received or 'stop on another rank'} received during epoch "
                            f"{epoch + 1} of the {stage.name} stage; stopped without saving the "
                            f"partial epoch. Last complete checkpoint: {kept}"
                        )
                        log.write(f"{detail}; {hint}")
                        raise TrainingInterrupted(detail, hint)
            train_s = time.monotonic() - t0
            if not losses:
                raise ConfigError(
                    f"stage {stage.name!r} produced no training batches in epoch {epoch + 1}.",
                    fix="check the training split and batch size.",
                )
            broadcast_state(stage.models, ctx, buffers_only=True)
            metrics: dict[str, float] = {}
            t_val = time.monotonic()
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                for model in stage.models.values():
                    model.eval()

                def validate() -> dict[str, float]:
                    with torch.no_grad():
                        return {k: float(v) for k, v in stage.validate(device).items()}

                metrics = on_main(validate, ctx)  # rank 0 validates; every rank gets the result
                if cfg.monitor not in metrics:
                    raise ConfigError(
                        f"monitored metric {cfg.monitor!r} is not among the validation metrics "
                        f"{sorted(metrics)}.",
                        fix="set monitor to one of them.",
                    )
            validate_s = time.monotonic() - t_val
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
            timing.append(
                {
                    "epoch": epoch + 1,
                    "data_wait_s": wait_s,
                    "compute_s": compute_s,
                    "validate_s": validate_s,
                    "epoch_s": time.monotonic() - t0,
                    "samples": samples,
                    "samples_per_s": samples / train_s if train_s > 0 else 0.0,
                    "world_size": ctx.world_size,
                }
            )
            improved = cfg.monitor in metrics and _better(
                metrics[cfg.monitor], best, cfg.monitor_mode
            )
            if improved:
                best, best_epoch = metrics[cfg.monitor], epoch + 1
            summary = ", ".join(f"{k}={v:.6g}" for k, v in row.items() if isinstance(v, float))
            t = timing[-1]
            line = (
                f"epoch {epoch + 1}/{cfg.epochs} done in {time.monotonic() - t0:.1f}s: {summary}"
                f"{' (best)' if improved else ''}; data wait {t['data_wait_s']:.2f}s, "
                f"compute {t['compute_s']:.2f}s, {t['samples_per_s']:.3g} samples/s"
            )
            state_out = {
                "epoch": epoch + 1,
                "global_step": global_step,
                "best_metric": best,
                "best_epoch": best_epoch,
                "monitor": cfg.monitor,
                "history": history,
                "timing": timing,
            }
            saver = EpochWriter(out, log, stage.models, optimizers, schedulers, scalers, meta)
            on_main(lambda: saver.write(line, state_out, improved), ctx)  # noqa: B023
            completed = epoch + 1
            bar.remove_task(task)
            if agree(guard.received is not None, ctx):
                detail = (
                    f"{guard.received or 'stop on another rank'} received; stopped the "
                    f"{stage.name} stage after epoch {epoch + 1} (checkpoint {last_path})"
                )
                log.write(f"{detail}; {hint}")
                raise TrainingInterrupted(detail, hint)

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
        timing=timing,
    )
