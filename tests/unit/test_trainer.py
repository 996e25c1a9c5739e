"""Tests of landmark3d.engine.trainer and landmark3d.engine.device with a tiny toy stage."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landmark3d.engine import (
    Stage,
    TrainerConfig,
    TrainingInterrupted,
    amp_enabled,
    autocast,
    fit,
    load_checkpoint,
    load_weights_only,
    seed_everything,
    select_device,
    set_num_threads,
)
from landmark3d.errors import CheckpointError, ConfigError, OutputExistsError


class ToyStage(Stage):
    """Regress a fixed linear target with a 2-layer MLP; seeded data, Adam + StepLR.

    ``train_step`` adds torch-random noise so the per-epoch torch reseeding matters.
    """

    name = "toy"

    def __init__(
        self,
        n: int = 64,
        batch: int = 16,
        lr: float = 0.05,
        slow: float = 0.0,
        landmark_names: tuple[str, ...] = ("nasion", "sella"),
        interrupt_at_step: int | None = None,
        val_script: list[float] | None = None,
        nan_loss: bool = False,
    ) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 4, generator=g)
        w = torch.randn(4, 2, generator=g)
        self.y = self.x @ w + 0.5
        self.xv = torch.randn(32, 4, generator=g)
        self.yv = self.xv @ w + 0.5
        torch.manual_seed(123)
        self.models: dict[str, nn.Module] = {
            "net": nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        }
        self.n, self.batch, self.lr, self.slow = n, batch, lr, slow
        self.landmark_names = landmark_names
        self.interrupt_at_step = interrupt_at_step
        self.val_script = list(val_script) if val_script else None
        self.nan_loss = nan_loss
        self.steps = 0

    def make_optimizers(self, cfg: TrainerConfig) -> dict[str, torch.optim.Optimizer]:
        return {"adam": torch.optim.Adam(self.models["net"].parameters(), lr=self.lr)}

    def make_schedulers(self, optimizers: dict[str, Any], cfg: TrainerConfig) -> dict[str, Any]:
        return {"step": torch.optim.lr_scheduler.StepLR(optimizers["adam"], 1, gamma=0.9)}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"landmark_names": list(self.landmark_names), "config": {"lr": self.lr}}

    def n_batches(self, epoch: int) -> int:
        return self.n // self.batch

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[Any]:
        perm = torch.as_tensor(rng.permutation(self.n))
        for i in range(0, self.n, self.batch):
            idx = perm[i : i + self.batch]
            yield self.x[idx], self.y[idx]

    def train_step(self, batch: Any, device: torch.device, autocast_ctx: Any) -> torch.Tensor:
        x, y = batch
        self.steps += 1
        if self.slow:
            time.sleep(self.slow)
        if self.interrupt_at_step == self.steps:
            os.kill(os.getpid(), signal.SIGINT)
        with autocast_ctx():
            pred = self.models["net"](x.to(device))
        if self.nan_loss:
            return pred.sum() * float("nan")
        return F.mse_loss(pred.float() + 0.01 * torch.randn_like(pred), y.to(device))

    def validate(self, device: torch.device) -> dict[str, float]:
        if self.val_script is not None:
            return {"val_mre_mm": self.val_script.pop(0)}
        pred = self.models["net"](self.xv.to(device))
        err = torch.linalg.norm(pred - self.yv.to(device), dim=1)
        return {"val_mre_mm": float(err.mean()), "val_sd_mm": float(err.std())}


def cfg(epochs: int = 4, **kw: Any) -> TrainerConfig:
    return TrainerConfig(epochs=epochs, seed=3, device="cpu", log_every=2, **kw)


def weights(stage: ToyStage) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in stage.models["net"].state_dict().items()}


# ----------------------------------------------------------------------------- device
def test_select_device_and_amp() -> None:
    assert select_device("cpu") == torch.device("cpu")
    auto = select_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")
    cpu = torch.device("cpu")
    assert amp_enabled(cpu, "on") is False and amp_enabled(cpu, True) is False
    assert amp_enabled(torch.device("cuda"), "auto") is True
    assert amp_enabled(torch.device("cuda"), "off") is False
    with pytest.raises(ConfigError, match="amp"):
        amp_enabled(cpu, "sometimes")
    assert isinstance(autocast(cpu, False), contextlib.nullcontext)


def test_seed_everything_and_threads() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(5)
    a = draw()
    seed_everything(5)
    assert draw() == a
    seed_everything(6)
    assert draw() != a
    with pytest.raises(ConfigError):
        seed_everything(-1)
    before = torch.get_num_threads()
    try:
        set_num_threads(1)
        assert torch.get_num_threads() == 1
        set_num_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError):
        set_num_threads(0)


def test_trainer_config_validation() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        TrainerConfig(epochs=0)
    with pytest.raises(ConfigError, match="grad_clip"):
        TrainerConfig(epochs=1, grad_clip=-1.0)
    with pytest.raises(ConfigError, match="val_every"):
        TrainerConfig(epochs=1, val_every=0)


# ----------------------------------------------------------------------------- training
def test_training_reduces_loss_and_writes_run(tmp_path: Path) -> None:
    stage = ToyStage()
    res = fit(stage, cfg(8, grad_clip=5.0), tmp_path, progress=False)
    assert res.finished and res.epochs_completed == 8 and res.global_step == 32
    losses = [r["train_loss"] for r in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert res.history[-1]["val_mre_mm"] < res.history[0]["val_mre_mm"]
    # StepLR(gamma 0.9) stepped once per epoch; lr column is the lr used during the epoch
    assert res.history[2]["lr"] == pytest.approx(0.05 * 0.9**2)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["epoch", "global_step", "train_loss", "lr"]
    assert len(lines) == 9
    log = (tmp_path / "train.log").read_text()
    assert "epoch 8/8 done" in log and "step 2 loss" in log and "finished toy" in log
    assert res.last_checkpoint == tmp_path / "checkpoints" / "last"
    fresh = ToyStage()
    state, meta = load_checkpoint(res.last_checkpoint, fresh.models)
    assert state["epoch"] == 8 and meta["stage"] == "toy"
    assert meta["landmark_names"] == ["nasion", "sella"] and meta["trainer"]["epochs"] == 8
    for k, v in weights(fresh).items():
        assert torch.equal(v, stage.models["net"].state_dict()[k])


def test_best_and_last_semantics(tmp_path: Path) -> None:
    script = [3.0, 2.0, 4.0, 1.0]
    res = fit(ToyStage(val_script=script), cfg(4), tmp_path, progress=False, stop_after_epochs=3)
    assert res.epochs_completed == 3 and not res.finished
    assert (res.best_metric, res.best_epoch) == (2.0, 2)
    best_state, _ = load_checkpoint(tmp_path / "checkpoints" / "best", ToyStage().models)
    assert best_state["epoch"] == 2 and best_state["best_metric"] == 2.0
    last_state, _ = load_checkpoint(tmp_path / "checkpoints" / "last", ToyStage().models)
    assert last_state["epoch"] == 3 and last_state["best_epoch"] == 2
    res = fit(ToyStage(val_script=script[3:]), cfg(4), tmp_path, resume=True, progress=False)
    assert res.finished and (res.best_metric, res.best_epoch) == (1.0, 4)
    probe = ToyStage()
    meta = load_weights_only(tmp_path / "checkpoints" / "best", probe.models)
    assert meta["stage"] == "toy"
    assert load_checkpoint(tmp_path / "checkpoints" / "best", ToyStage().models)[0]["epoch"] == 4
    # "best" holds weights + state only; resuming needs "last"
    s = ToyStage()
    with pytest.raises(CheckpointError, match="optimizer state"):
        load_checkpoint(tmp_path / "checkpoints" / "best", s.models, s.make_optimizers(cfg(1)))


def test_val_every_and_missing_monitor(tmp_path: Path) -> None:
    res = fit(ToyStage(), cfg(3, val_every=2), tmp_path / "a", progress=False)
    assert ["val_mre_mm" in r for r in res.history] == [False, True, True]
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert rows[1].endswith(",,")  # epoch 1 has empty validation columns
    with pytest.raises(ConfigError, match="val_loss"):
        fit(ToyStage(), cfg(1, monitor="val_loss"), tmp_path / "b", progress=False)


def test_diverged_loss_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="diverged"):
        fit(ToyStage(nan_loss=True), cfg(1), tmp_path, progress=False)


def test_resume_is_exact_and_truncates_logs(tmp_path: Path) -> None:
    straight = ToyStage()
    fit(straight, cfg(4), tmp_path / "straight", progress=False)

    run = tmp_path / "resumed"
    fit(ToyStage(), cfg(4), run, progress=False, stop_after_epochs=2)
    # simulate a crash after epoch 3 was logged but before its checkpoint was saved
    with open(run / "train.log", "a") as fh:
        fh.write("2000-01-01T00:00:00 epoch 3/4 done in 1.0s: GARBAGE\n")
    with open(run / "metrics.csv", "a") as fh:
        fh.write("3,12,999.0,0.0,1.0,1.0\n")
    resumed = ToyStage()
    res = fit(resumed, cfg(4), run, resume=True, progress=False)
    assert res.finished and res.epochs_completed == 4 and res.global_step == 16
    for k, v in weights(straight).items():
        assert torch.equal(v, resumed.models["net"].state_dict()[k]), k
    a = (tmp_path / "straight" / "metrics.csv").read_text()
    b = (run / "metrics.csv").read_text()
    assert a == b and "999.0" not in b
    log = (run / "train.log").read_text()
    assert "GARBAGE" not in log and "resumed toy" in log and log.count("epoch 4/4 done") == 1
    # already finished: a further resume does nothing and keeps the result
    again = fit(ToyStage(), cfg(4), run, resume=True, progress=False)
    assert again.finished and again.global_step == 16


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    fit(ToyStage(), cfg(1), tmp_path, progress=False)
    with pytest.raises(OutputExistsError, match="resume"):
        fit(ToyStage(), cfg(1), tmp_path, progress=False)
    res = fit(ToyStage(), cfg(2), tmp_path, progress=False, overwrite=True)
    assert res.epochs_completed == 2 and len(res.history) == 2
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(ToyStage(), cfg(1), tmp_path / "empty", resume=True, progress=False)


def test_resume_with_other_landmarks_fails(tmp_path: Path) -> None:
    fit(ToyStage(), cfg(2), tmp_path, progress=False, stop_after_epochs=1)
    with pytest.raises(CheckpointError, match="landmark_names") as info:
        fit(ToyStage(landmark_names=("nasion", "menton")), cfg(2), tmp_path, resume=True)
    assert "menton" in str(info.value) and "Fix:" in str(info.value)


def test_sigint_stops_after_step_and_resumes_exactly(tmp_path: Path) -> None:
    # 4 steps per epoch: step 7 is inside epoch 2
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup/&
    with pytest.raises(TrainingInterrupted, match="resume") as info:
        fit(ToyStage(interrupt_at_step=7), cfg(3), tmp_path / "run", progress=False)
    assert "epoch 2" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    state, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last", ToyStage().models)
    assert state["epoch"] == 1 and state["global_step"] == 4
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 2
    assert "SIGINT received" in (tmp_path / "run" / "train.log").read_text()

    resumed = ToyStage()
    fit(resumed, cfg(3), tmp_path / "run", resume=True, progress=False)
    straight = ToyStage()
    fit(straight, cfg(3), tmp_path / "straight", progress=False)
    for k, v in weights(straight).items():
        assert torch.equal(v, resumed.models["net"].state_dict()[k]), k
