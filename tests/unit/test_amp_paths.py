"""Mixed-precision and channels-last code paths, exercised on CPU (no GPU is pretended)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landmark3d.engine import Stage, TrainerConfig, fit, load_checkpoint
from landmark3d.engine.device import (
    amp_dtype,
    amp_enabled,
    autocast,
    channels_last_enabled,
    eval_forward,
    grad_scaler,
    select_device,
    to_channels_last,
)
from landmark3d.engine.distributed import SINGLE, Fed
from landmark3d.engine.trainer import _optimizer_step, _StepEnv
from landmark3d.errors import ConfigError

CPU = torch.device("cpu")


def test_amp_dtype_choice() -> None:
    assert amp_dtype(CPU) == torch.bfloat16
    assert amp_dtype(CPU, "fp16") == torch.float16 and amp_dtype(CPU, "bf16") == torch.bfloat16
    with pytest.raises(ConfigError, match="amp dtype"):
        amp_dtype(CPU, "fp8")
    assert amp_enabled(CPU, "on") is False  # CPU always trains in float32


def test_autocast_factory_on_cpu() -> None:
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert isinstance(autocast(CPU, False, torch.bfloat16), contextlib.nullcontext)
    with autocast(CPU, False, torch.bfloat16):
        assert lin(x).dtype == torch.float32
    with autocast(CPU, True, torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast(CPU, False):
        assert lin(x).dtype == torch.bfloat16  # disabled factory does not end an outer region


def test_grad_scaler_paths() -> None:
    assert not grad_scaler(CPU, False, torch.float16).is_enabled()
    assert not grad_scaler(CPU, True, torch.bfloat16).is_enabled()  # bf16 needs no scaling
    off = grad_scaler(CPU, False, torch.float16)
    loss = torch.tensor(2.0, requires_grad=True)
    assert off.scale(loss) is loss
    on = grad_scaler(CPU, True, torch.float16)
    assert on.is_enabled()
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    on.scale((w * 2).sum()).backward()
    assert float(w.grad[0]) > 2.0  # scaled
    on.unscale_(opt)
    assert torch.allclose(w.grad, torch.full((3,), 2.0))
    on.step(opt)
    on.update()
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))


def test_channels_last_helpers() -> None:
    assert channels_last_enabled(CPU) is False
    assert channels_last_enabled(torch.device("cuda")) is True  # a device object, no GPU needed
    assert channels_last_enabled(CPU, "on") and not channels_last_enabled(CPU, False)
    with pytest.raises(ConfigError, match="channels_last"):
        channels_last_enabled(CPU, "maybe")
    x = torch.randn(2, 3, 4, 5, 6)
    y = to_channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(x, y)
    flat = torch.randn(2, 3)
    assert to_channels_last(flat) is flat
    conv = nn.Conv3d(3, 4, 3, padding=1)
    ref = conv(x)
    to_channels_last(conv)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(conv(y), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        to_channels_last("x")


def test_select_device_with_local_rank_on_cpu() -> None:
    assert select_device("cpu", local_rank=1) == CPU
    if not torch.cuda.is_available():
        assert select_device("auto", local_rank=1) == CPU


class ConvStage(Stage):
    """A tiny Conv3d regression to run fit() through the channels-last path on CPU."""

    name = "conv"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.models: dict[str, nn.Module] = {
            "net": nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Flatten(), nn.LazyLinear(1))
        }
        self.models["net"](torch.zeros(1, 1, 4, 4, 4))  # materialise the lazy layer
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(8, 1, 4, 4, 4, generator=g)
        self.y = self.x.mean(dim=(1, 2, 3, 4))[:, None]

    def make_optimizers(self, cfg: TrainerConfig) -> dict[str, torch.optim.Optimizer]:
        return {"sgd": torch.optim.SGD(self.models["net"].parameters(), lr=0.1)}

    def n_batches(self, epoch: int) -> int:
        return 2

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Any:
        perm = torch.as_tensor(rng.permutation(8))
        for i in (0, 4):
            yield self.x[perm[i : i + 4]], self.y[perm[i : i + 4]]

    def train_step(self, batch: Any, device: torch.device, autocast_ctx: Any) -> torch.Tensor:
        x, y = batch
        with autocast_ctx():
            pred = self.models["net"](x.to(device))
        return F.mse_loss(pred.float(), y.to(device))

    def validate(self, device: torch.device) -> dict[str, float]:
        return {"val_mre_mm": float((self.models["net"](self.x) - self.y).abs().mean())}


def test_fit_channels_last_on_cpu_matches_and_checkpoints(tmp_path: Path) -> None:
    cfg = TrainerConfig(epochs=2, seed=1, device="cpu", channels_last="on", amp="on")
    cl = ConvStage()
    fit(cl, cfg, tmp_path / "cl", progress=False)
    assert cl.models["net"][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    plain = ConvStage()
    fit(plain, TrainerConfig(epochs=2, seed=1, device="cpu"), tmp_path / "plain", progress=False)
    for (k, a), b in zip(
        cl.models["net"].state_dict().items(),
        plain.models["net"].state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    fresh = ConvStage()
    load_checkpoint(tmp_path / "cl" / "checkpoints" / "last", fresh.models)
    assert torch.equal(fresh.models["net"][0].weight, cl.models["net"][0].weight)
    log = (tmp_path / "cl" / "train.log").read_text()
    assert "amp=False" in log and "channels_last=True" in log


def test_amp_optimizer_step_with_bf16_autocast_and_fp16_scaler_on_cpu() -> None:
    stage = ConvStage()
    opt = stage.make_optimizers(TrainerConfig(epochs=1))
    before = stage.models["net"][0].weight.detach().clone()
    env = _StepEnv(
        CPU, opt, grad_scaler(CPU, True, torch.float16), True, torch.bfloat16, 1.0, SINGLE,
        list(stage.models["net"].parameters()),
    )  # fmt: skip
    value, stop = _optimizer_step(stage, Fed((stage.x[:4], stage.y[:4]), 1.0, 4), env, "t", False)
    assert np.isfinite(value) and stop is False
    assert not torch.equal(before, stage.models["net"][0].weight)
    # a non-finite loss under AMP is not an error: the scaler skips the step
    nan_batch = (torch.full((4, 1, 4, 4, 4), float("nan")), stage.y[:4])
    weight = stage.models["net"][0].weight.detach().clone()
    value, _ = _optimizer_step(stage, Fed(nan_batch, 1.0, 4), env, "t", False)
    assert not np.isfinite(value) and torch.equal(weight, stage.models["net"][0].weight)


class _Recorder(nn.Module):
    """A 3D conv net returning a dict and a tuple, recording the batch sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3, padding=1)
        self.norm = nn.BatchNorm3d(3)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        self.seen.append(x.shape[0])
        y = self.norm(self.conv(x))
        return {"heatmaps": y, "parts": (y.mean(dim=(2, 3, 4)), [y.amax(dim=(2, 3, 4))])}


def test_eval_forward_runs_a_single_cpu_input_as_a_pair_and_returns_one_item() -> None:
    torch.manual_seed(0)
    model = _Recorder()
    model.norm.running_mean.uniform_(-1, 1)  # eval-mode statistics, not the identity
    model.norm.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(1, 2, 8, 8, 6)
    with torch.no_grad():
        direct = model(x)
        padded = eval_forward(model, x)
    assert model.seen == [1, 2]  # the second call ran a batch of two (oneDNN's path)
    assert padded["heatmaps"].shape == direct["heatmaps"].shape == (1, 3, 8, 8, 6)
    torch.testing.assert_close(padded["heatmaps"], direct["heatmaps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded["parts"][0], direct["parts"][0], rtol=1e-5, atol=1e-5)
    assert isinstance(padded["parts"], tuple) and isinstance(padded["parts"][1], list)
    torch.testing.assert_close(padded["parts"][1][0], direct["parts"][1][0], rtol=1e-5, atol=1e-5)
    # larger batches, other ranks and training mode are passed through untouched
    model.seen.clear()
    with torch.no_grad():
        eval_forward(model, torch.randn(3, 2, 8, 8, 6))
        model.train()
        eval_forward(model, x)
    assert model.seen == [3, 1]
    flat = nn.Linear(4, 2).eval()
    assert eval_forward(flat, torch.randn(1, 4)).shape == (1, 2)


class _Pair(NamedTuple):
    heat: torch.Tensor
    score: torch.Tensor


class _Odd(nn.Module):
    """Outputs eval_forward cannot cut: a batch-free 0-d loss, or a non-dict mapping."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> object:
        self.seen.append(x.shape[0])
        if self.kind == "named":
            return _Pair(x * 2, x.sum())  # a named tuple with a 0-d item
        if self.kind == "mapping":
            return MappingProxyType({"y": x + 1})
        return _Pair(x * 2, x.flatten(1).sum(1))


@pytest.mark.parametrize("kind", ["named", "mapping"])
def test_eval_forward_falls_back_to_one_item_on_outputs_it_cannot_cut(kind: str) -> None:
    model = _Odd(kind).eval()
    x = torch.randn(1, 1, 4, 4, 4)
    out = eval_forward(model, x)
    assert model.seen == [2, 1]  # tried as a pair, then run as asked: the right answer
    if kind == "named":
        assert out.score.ndim == 0 and out.score == pytest.approx(float(x.sum()))
    else:
        assert out["y"].shape == (1, 1, 4, 4, 4)


def test_eval_forward_cuts_named_tuples() -> None:
    model = _Odd("cuttable").eval()
    x = torch.randn(1, 1, 4, 4, 4)
    out = eval_forward(model, x)
    assert model.seen == [2] and isinstance(out, _Pair)
    assert out.heat.shape == (1, 1, 4, 4, 4) and out.score.shape == (1,)
    torch.testing.assert_close(out.score, x.flatten(1).sum(1))
