"""Multi-process training (torchrun, gloo on CPU), batch sharding, prefetch and timing.

The two-process tests start ``python -m torch.distributed.run --nproc_per_node=2`` on a free
local port and check that both ranks end with the weights of a single-process run with the
same global batch, that a resume under torchrun continues it exactly, and (with an audit hook
in every worker) that only rank 0 created, changed or removed anything in the run directory.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landmark3d.engine import Stage, TrainerConfig, fit
from landmark3d.engine.correlated_stage import CorrelatedStage
from landmark3d.engine.distributed import (
    SINGLE,
    DistContext,
    Prefetcher,
    batch_length,
    env_context,
    shard_batch,
    shard_range,
)
from landmark3d.errors import ConfigError

HERE = Path(__file__).resolve().parent


class LinearStage(Stage):
    """A deterministic MLP regression (no torch randomness in the step): batches of 5 samples
    over 24 cases, so the last batch (4) and every 5-batch split unevenly over 2 ranks."""

    name = "linear"

    def __init__(self, batch: int = 5, init_seed: int = 11, slow_batches: float = 0.0) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(24, 4, generator=g)
        w = torch.randn(4, 2, generator=g)
        self.y = torch.tanh(self.x @ w) + 0.1
        torch.manual_seed(init_seed)
        self.models: dict[str, nn.Module] = {
            "net": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        }
        self.batch, self.slow_batches, self.slow_step = batch, slow_batches, 0.0

    def make_optimizers(self, cfg: TrainerConfig) -> dict[str, torch.optim.Optimizer]:
        return {"adam": torch.optim.Adam(self.models["net"].parameters(), lr=0.02)}

    def n_batches(self, epoch: int) -> int:
        return -(-24 // self.batch)

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[Any]:
        perm = torch.as_tensor(rng.permutation(24))
        for i in range(0, 24, self.batch):
            if self.slow_batches:
                time.sleep(self.slow_batches)
            idx = perm[i : i + self.batch]
            noise = torch.from_numpy(rng.normal(0, 0.01, (len(idx), 4)).astype(np.float32))
            yield self.x[idx] + noise, self.y[idx]

    def train_step(self, batch: Any, device: torch.device, autocast_ctx: Any) -> torch.Tensor:
        if self.slow_step:
            time.sleep(self.slow_step)
        x, y = batch
        with autocast_ctx():
            pred = self.models["net"](x.to(device))
        return F.mse_loss(pred.float(), y.to(device))

    def validate(self, device: torch.device) -> dict[str, float]:
        pred = self.models["net"](self.x.to(device))
        return {"val_mre_mm": float(torch.linalg.norm(pred - self.y, dim=1).mean())}


def tcfg(epochs: int = 3, **kw: Any) -> TrainerConfig:
    return TrainerConfig(epochs=epochs, seed=5, device="cpu", log_every=1, num_threads=1, **kw)


WORKER = """
import json, os, runpy, sys
roots = {{"toy": os.path.realpath(sys.argv[1]), "cli": os.path.realpath(sys.argv[2])}}
results = sys.argv[3]
events = []

def audit(event, args):
    paths = []
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        )
        if writing:
            paths = [path]
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree",
                   "os.truncate", "os.symlink", "os.link"):
        paths = [a for a in args[:2] if isinstance(a, (str, os.PathLike))]
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            continue
        real = os.path.realpath(p)
        for tag, root in roots.items():
            if real.startswith(root):
                events.append([tag, event, os.path.relpath(real, root)])

sys.addaudithook(audit)
sys.path.insert(0, {here!r})
import torch
from landmark3d.engine import fit
from landmark3d.engine.distributed import current
from test_distributed import LinearStage, tcfg

# 1. the toy stage: 2 epochs, then a resume to 3 (from other initial weights)
first = fit(LinearStage(), tcfg(3), roots["toy"], progress=False, stop_after_epochs=2)
stage = LinearStage(init_seed=99)
res = fit(stage, tcfg(3), roots["toy"], resume=True, progress=False)
ctx = current()
out = os.path.join(results, f"rank{{ctx.rank}}")
torch.save({{k: v.clone() for k, v in stage.models["net"].state_dict().items()}}, out + ".pt")

# 2. the command line, as `torchrun -m landmark3d train ...` runs it
sys.argv = ["landmark3d", *sys.argv[4:]]
code = 0
try:
    runpy.run_module("landmark3d", run_name="__main__")
except SystemExit as exc:
    code = exc.code
with open(out + ".json", "w") as fh:
    json.dump({{"events": events, "world": ctx.world_size, "history": res.history,
               "first_epochs": first.epochs_completed, "timing": res.timing,
               "cli_code": code}}, fh)
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``torchrun --nproc_per_node=2`` (gloo) running the toy fit + resume and the CLI."""
    sys.path.insert(0, str(HERE.parent))
    from conftest import TINY_OVERRIDES, set_args

    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "worker.py"
    script.write_text(WORKER.format(here=str(HERE)))
    (tmp / "results").mkdir()
    overrides = [*TINY_OVERRIDES, "coarse.epochs=1", "coarse.batch_size=4"]
    overrides += ["coarse.samples_per_epoch=4", "device=cpu", "num_threads=1"]
    cli = ["train", "--config", "phantom_demo", "--dataset", str(phantom_dir)]
    cli += ["--out", str(tmp / "cli"), "--fold", "0", "--stage", "coarse", *set_args(overrides)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(script), str(tmp / "toy"), str(tmp / "cli"), str(tmp / "results"), *cli,
    ]  # fmt: skip
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_global_batch(two_ranks: Path, tmp_path: Path) -> None:
    results = two_ranks / "results"
    ref = LinearStage()
    ref_res = fit(ref, tcfg(3), tmp_path / "single", progress=False)
    w0 = torch.load(results / "rank0.pt")
    w1 = torch.load(results / "rank1.pt")
    for key, value in ref.models["net"].state_dict().items():
        assert torch.equal(w0[key], w1[key]), f"ranks differ in {key}"
        torch.testing.assert_close(w0[key], value, rtol=1e-5, atol=1e-6)
    info0 = json.loads((results / "rank0.json").read_text())
    info1 = json.loads((results / "rank1.json").read_text())
    assert info0["world"] == info1["world"] == 2 and info0["first_epochs"] == 2
    for a, b, r in zip(info0["history"], info1["history"], ref_res.history, strict=True):
        assert a == b  # every rank keeps the same (broadcast/all-reduced) history
        assert a["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert a["val_mre_mm"] == pytest.approx(r["val_mre_mm"], rel=1e-5)
    assert [t["world_size"] for t in info0["timing"]] == [2, 2, 2]
    log = (two_ranks / "toy" / "train.log").read_text()
    assert "world_size=2" in log and "resumed linear" in log and log.count("epoch 3/3 done") == 1
    assert len((two_ranks / "toy" / "metrics.csv").read_text().splitlines()) == 4


@pytest.mark.slow
def test_only_rank0_writes(two_ranks: Path) -> None:
    info0 = json.loads((two_ranks / "results" / "rank0.json").read_text())
    info1 = json.loads((two_ranks / "results" / "rank1.json").read_text())
    assert info0["cli_code"] in (0, None) and info1["cli_code"] in (0, None)
    assert info1["events"] == [], f"rank 1 wrote into a run directory: {info1['events'][:5]}"
    toy = {e[2].split("/")[0] for e in info0["events"] if e[0] == "toy"}
    assert {"metrics.csv", "train.log", "timing.csv", "checkpoints"} <= toy
    cli = {e[2].split("/")[0] for e in info0["events"] if e[0] == "cli"}
    assert {"config.json", "plan.json", "split.json", "cache", "coarse"} <= cli
    run = two_ranks / "cli"
    assert (run / "coarse" / "checkpoints" / "last").is_dir()
    assert "world_size=2" in (run / "coarse" / "train.log").read_text()


# ----------------------------------------------------------------------------- single process
def test_env_context() -> None:
    assert env_context({}) == SINGLE and not SINGLE.is_distributed and SINGLE.is_main
    ctx = env_context({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ctx == DistContext(3, 4, 1) and ctx.is_distributed and not ctx.is_main
    with pytest.raises(ConfigError, match="inconsistent"):
        env_context({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="integers"):
        env_context({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_range_partitions(world: int) -> None:
    for n in range(0, 20):
        spans = [shard_range(n, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        sizes = [b - a for a, b in spans]
        assert max(sizes) - min(sizes) <= 1


def test_shard_batch_slices_and_weights() -> None:
    batch = (torch.arange(10).reshape(5, 2), {"t": np.arange(5.0)}, [torch.ones(5, 3)])
    assert batch_length(batch) == 5
    shares = [shard_batch(batch, r, 2) for r in range(2)]
    assert [w for _, w in shares] == [0.6, 0.4]
    joined = torch.cat([s[0][0] for s in shares])
    assert torch.equal(joined, batch[0])
    assert np.array_equal(np.concatenate([s[0][1]["t"] for s in shares]), batch[1]["t"])
    assert shard_batch(torch.zeros(1, 3), 1, 2) == (None, 0.0)
    with pytest.raises(ValueError, match="shard_batch"):
        shard_batch((torch.zeros(3), torch.zeros(4)), 0, 2)


def test_correlated_groups_shard_with_their_own_weights() -> None:
    batch = {
        "group0": (torch.zeros(3, 2), torch.ones(3, 2), torch.ones(3)),
        "group1": (torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1)),
    }
    r0, w0 = CorrelatedStage.shard_batch(None, batch, 0, 2)  # type: ignore[arg-type]
    r1, w1 = CorrelatedStage.shard_batch(None, batch, 1, 2)  # type: ignore[arg-type]
    assert w0 == w1 == 1.0
    assert r0["group0"][3] == pytest.approx(2 / 3) and r1["group0"][3] == pytest.approx(1 / 3)
    assert r0["group1"][3] == 1.0 and "group1" not in r1
    assert CorrelatedStage.shard_batch(None, {}, 1, 2) == ({}, 1.0)  # type: ignore[arg-type]


def _draws(rng: np.random.Generator, fail_at: int | None = None) -> Iterator[np.ndarray]:
    for i in range(6):
        if i == fail_at:
            raise ConfigError("batch construction failed")
        yield rng.normal(size=3)


def test_prefetch_keeps_order_and_content_and_raises() -> None:
    inline = list(_draws(np.random.default_rng(1)))
    with Prefetcher(_draws(np.random.default_rng(1)), depth=2) as pre:
        threaded = list(pre)
    assert len(threaded) == 6
    assert all(np.array_equal(a, b) for a, b in zip(inline, threaded, strict=True))
    with (
        pytest.raises(ConfigError, match="failed"),
        Prefetcher(_draws(np.random.default_rng(1), 3)) as pre,
    ):
        list(pre)
    pre = Prefetcher(_draws(np.random.default_rng(1)), depth=1)
    next(iter(pre))
    pre.close()  # stops the producer blocked on a full queue
    assert pre._thread is None


def test_prefetch_gives_identical_training(tmp_path: Path) -> None:
    a, b = LinearStage(), LinearStage()
    fit(a, tcfg(2, prefetch=0), tmp_path / "a", progress=False)
    fit(b, tcfg(2, prefetch=2), tmp_path / "b", progress=False)
    for key, value in a.models["net"].state_dict().items():
        assert torch.equal(value, b.models["net"].state_dict()[key])
    assert (tmp_path / "a" / "metrics.csv").read_text() == (
        tmp_path / "b" / "metrics.csv"
    ).read_text()
    with pytest.raises(ConfigError, match="prefetch"):
        tcfg(1, prefetch=-1)


def test_data_wait_is_measured_and_hidden_by_prefetch(tmp_path: Path) -> None:
    slow = LinearStage(slow_batches=0.05)
    slow.slow_step = 0.05
    inline = fit(slow, tcfg(1, prefetch=0), tmp_path / "inline", progress=False)
    t = inline.timing[0]
    assert t["data_wait_s"] >= 5 * 0.05 * 0.9 and t["compute_s"] >= 5 * 0.05 * 0.9
    assert t["samples"] == 24 and t["samples_per_s"] > 0 and t["world_size"] == 1
    rows = (tmp_path / "inline" / "timing.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "data_wait_s", "compute_s"] and len(rows) == 2
    assert "data wait" in (tmp_path / "inline" / "train.log").read_text()
    slow2 = LinearStage(slow_batches=0.05)
    slow2.slow_step = 0.05
    ahead = fit(slow2, tcfg(1, prefetch=2), tmp_path / "ahead", progress=False)
    assert ahead.timing[0]["data_wait_s"] < t["data_wait_s"]


def test_resume_restores_timing_rows(tmp_path: Path) -> None:
    fit(LinearStage(), tcfg(3), tmp_path, progress=False, stop_after_epochs=2)
    res = fit(LinearStage(), tcfg(3), tmp_path, resume=True, progress=False)
    assert [t["epoch"] for t in res.timing] == [1, 2, 3]
    assert len((tmp_path / "timing.csv").read_text().splitlines()) == 4


def test_a_single_sample_per_process_under_batch_norm_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network whose batch norm would see one value per channel cannot train on one sample
    per process: refused with a fix that works, before anything is written, instead of torch's
    mid-epoch "Expected more than 1 value per channel". Splits that do train are let through."""
    import landmark3d.engine.trainer as trainer
    from landmark3d.engine.batching import batch_sizes
    from landmark3d.engine.distributed import check_batch_norm_shares, fails_on_one_sample
    from landmark3d.networks.coarse import CoarseRegressor

    net = CoarseRegressor(2, [4, 4, 8, 8], [1, 1, 1, 1])
    # the ResNet's last stage is 1x1x1 on a 32³ input (one value per channel), 2x2x2 on 64³
    assert fails_on_one_sample(net, (1, 32, 32, 32))
    assert not fails_on_one_sample(net, (1, 48, 48, 48))
    assert not fails_on_one_sample(net, (1, 64, 64, 64))
    assert fails_on_one_sample(net, None)  # cannot be told: refuse rather than crash
    assert not fails_on_one_sample(nn.Linear(4, 2), None)  # no batch norm
    assert next(net.parameters()).device.type == "cpu"  # the probe used a meta copy
    # the premise, for real: one 32³ sample fails in training mode, one 64³ sample trains
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net.train()(torch.zeros(1, 1, 32, 32, 32))
    net(torch.zeros(1, 1, 64, 64, 64)).sum().backward()

    resnet = {"coarse": net}
    small, large = {"coarse": (1, 32, 32, 32)}, {"coarse": (1, 64, 64, 64)}
    check_batch_norm_shares("coarse", resnet, small, [4, 5], 2)  # 2/2 and 3/2: fine
    check_batch_norm_shares("coarse", resnet, small, [6], 3)  # 2/2/2
    check_batch_norm_shares("coarse", resnet, small, [1, 3], 1)  # one process: no split
    check_batch_norm_shares("coarse", resnet, large, [4, 3], 2)  # 2/1, but 64³ trains on one
    check_batch_norm_shares("linear", {"net": nn.Linear(4, 2)}, {}, [3], 2)  # no batch norm
    with pytest.raises(ConfigError) as info:
        check_batch_norm_shares("coarse", resnet, small, batch_sizes(7, 4), 2)  # 4, 3 -> 2/1
    assert "batches of 3 sample(s) (of 7 per epoch) split over 2 processes" in str(info.value)
    fix = str(info.value.fix)
    assert "--set coarse.batch_size=6" in fix and "--set coarse.samples_per_epoch=8" in fix
    # the suggested settings do pass the check
    check_batch_norm_shares("coarse", resnet, small, batch_sizes(7, 6), 2)  # 7 -> 4/3
    check_batch_norm_shares("coarse", resnet, small, batch_sizes(8, 4), 2)  # 2/2, 2/2

    stage = LinearStage()
    stage.models["net"] = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    stage.batch_sizes = lambda: [5, 5, 5, 5, 4]  # type: ignore[attr-defined]
    monkeypatch.setattr(trainer, "init_distributed", lambda device: DistContext(0, 4, 0))
    with pytest.raises(ConfigError, match="the linear stage"):
        fit(stage, tcfg(1), tmp_path / "run", progress=False)  # 5 over 4: 2/1/1/1
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
