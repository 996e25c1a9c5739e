"""Tests of landmark3d.engine.checkpoint: round trips, corruption, compatibility, atomicity."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from landmark3d.engine import checkpoint as ck
from landmark3d.engine.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_weights_only,
    read_checkpoint_meta,
    save_checkpoint,
)
from landmark3d.errors import CheckpointError

NAMES = ["nasion", "sella", "menton"]


def make_models(width: int = 6) -> dict[str, nn.Module]:
    return {
        "coarse": nn.Sequential(nn.Conv3d(1, width, 3), nn.BatchNorm3d(width)),
        "fine": nn.Linear(width, 3),
    }


def trained(seed: int = 0) -> tuple[dict[str, nn.Module], torch.optim.Optimizer, Any]:
    """Models with a few Adam steps taken, so optimizer state has tensors."""
    torch.manual_seed(seed)
    models = make_models()
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(2, 1, 5, 5, 5)
        feat = models["coarse"](x).mean(dim=(2, 3, 4))
        models["fine"](feat).square().sum().backward()
        opt.step()
        sched.step()
    return models, opt, sched


class OddState:
    """A stateful object whose state uses int keys, tuples, non-finite floats and tensors."""

    def __init__(self) -> None:
        self.state: dict[Any, Any] = {}

    def state_dict(self) -> dict[Any, Any]:
        return {
            0: (1, 2.5, None),
            "inf": float("inf"),
            "nan": float("nan"),
            "flag": True,
            "t": torch.arange(3, dtype=torch.int16),
            "scalar": torch.tensor(1.5),
            "__tuple__": "tricky key",
        }

    def load_state_dict(self, sd: dict[Any, Any]) -> None:
        self.state = sd


def save_full(path: Path, seed: int = 0, **meta: Any) -> tuple[dict[str, nn.Module], Any, Any]:
    models, opt, sched = trained(seed)
    save_checkpoint(
        path,
        models,
        {"adam": opt},
        {"step": sched},
        {"odd": OddState()},
        state={"epoch": 3, "global_step": 30, "best_metric": 1.25, "history": [{"epoch": 1}]},
        meta={"stage": "coarse", "landmark_names": tuple(NAMES), "config": {"lr": 0.01}, **meta},
    )
    return models, opt, sched


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    models, opt, sched = save_full(path)
    assert sorted(os.listdir(path)) == sorted(ck.REQUIRED_FILES)
    fresh = make_models()
    params = [p for m in fresh.values() for p in m.parameters()]
    opt2 = torch.optim.Adam(params, lr=1.0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=9, gamma=0.1)
    odd = OddState()
    state, meta = load_checkpoint(
        path, fresh, {"adam": opt2}, {"step": sched2}, {"odd": odd},
        expect={"stage": "coarse", "landmark_names": tuple(NAMES)},
    )  # fmt: skip
    assert state == {"epoch": 3, "global_step": 30, "best_metric": 1.25, "history": [{"epoch": 1}]}
    assert meta["format_version"] == FORMAT_VERSION and meta["landmark_names"] == NAMES
    assert json.loads((path / "meta.json").read_text())["landmark_names"] == NAMES
    assert (
        meta["models"] == ["coarse", "fine"] and "created" in meta and "landmark3d_version" in meta
    )
    for name in models:
        for k, v in models[name].state_dict().items():
            assert torch.equal(v, fresh[name].state_dict()[k]), f"{name}.{k}"
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])
    assert sched2.state_dict() == sched.state_dict()
    got = odd.state
    assert got[0] == (1, 2.5, None) and got["inf"] == float("inf") and np.isnan(got["nan"])
    assert got["flag"] is True and got["__tuple__"] == "tricky key"
    assert torch.equal(got["t"], torch.arange(3, dtype=torch.int16))
    assert got["scalar"].shape == () and float(got["scalar"]) == 1.5
    # stepping both optimizers now gives identical parameters
    for o in (opt, opt2):
        for g in o.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        o.step()
    assert torch.equal(models["fine"].state_dict()["weight"], fresh["fine"].state_dict()["weight"])


def test_rng_states_are_restored(tmp_path: Path) -> None:
    models = make_models()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "c", models, state={"epoch": 0})
    draws = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    state, _ = load_checkpoint(tmp_path / "c", make_models())
    assert "rng" not in state
    assert random.random() == draws[0] and np.random.rand() == draws[1]
    assert torch.equal(torch.rand(2), draws[2])


def test_load_weights_only_and_meta(tmp_path: Path) -> None:
    models, _, _ = save_full(tmp_path / "c")
    (tmp_path / "c" / "optimizer.safetensors").unlink()  # not needed for inference
    fresh = {"fine": make_models()["fine"]}
    meta = load_weights_only(tmp_path / "c", fresh, expect={"stage": "coarse"})
    assert meta["config"] == {"lr": 0.01}
    assert torch.equal(fresh["fine"].state_dict()["weight"], models["fine"].state_dict()["weight"])
    assert read_checkpoint_meta(tmp_path / "c")["landmark_names"] == NAMES
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is missing"):
        load_checkpoint(tmp_path / "c", make_models())


def test_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_full(tmp_path / "c")

    def forbidden(*a: Any, **k: Any) -> None:
        raise AssertionError("unpickling is forbidden")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    m = make_models()
    opt = torch.optim.Adam([p for x in m.values() for p in x.parameters()])
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    load_checkpoint(tmp_path / "c", m, {"adam": opt}, {"step": sched}, {"odd": OddState()})


@pytest.mark.parametrize(
    ("name", "damage", "match"),
    [
        ("weights.safetensors", "truncate", "safetensors"),
        ("weights.safetensors", "header", "safetensors"),
        ("optimizer.safetensors", "truncate", "safetensors"),
        ("state.json", "garbage", "cannot read"),
        ("optimizer.json", "garbage", "cannot read"),
        ("meta.json", "garbage", "cannot read"),
        ("meta.json", "delete", "meta.json is missing"),
        ("meta.json", "version", "format version 99"),
        ("meta.json", "unversioned", "not a landmark3d checkpoint"),
        ("optimizer.json", "dangling", "missing from optimizer.safetensors"),
    ],
)
def test_corrupt_checkpoint(tmp_path: Path, name: str, damage: str, match: str) -> None:
    path = tmp_path / "c"
    save_full(path)
    f = path / name
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "header":
        f.write_bytes((2**40).to_bytes(8, "little") + f.read_bytes()[8:])
    elif damage == "garbage":
        f.write_text('{"epoch": 3,,,')
    elif damage == "delete":
        f.unlink()
    elif damage == "version":
        f.write_text(json.dumps({**json.loads(f.read_text()), "format_version": 99}))
    elif damage == "unversioned":
        f.write_text(json.dumps({"stage": "coarse"}))
    elif damage == "dangling":
        f.write_text(f.read_text().replace('"optimizer/adam/state/0/exp_avg"', '"nope"'))
    m = make_models()
    opt = torch.optim.Adam([p for x in m.values() for p in x.parameters()])
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path, m, {"adam": opt})
    assert info.value.path is not None and info.value.fix


def test_incompatible_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c"
    save_full(path)
    with pytest.raises(CheckpointError, match="landmark_names") as info:
        load_checkpoint(
            path, make_models(), expect={"landmark_names": ["nasion", "sella", "gonion"]}
        )
    assert "gonion" in str(info.value) and "menton" in str(info.value)
    with pytest.raises(CheckpointError, match="stage: expected 'fine'"):
        load_weights_only(path, make_models(), expect={"stage": "fine"})
    with pytest.raises(CheckpointError, match="different order"):
        load_weights_only(path, make_models(), expect={"landmark_names": NAMES[::-1]})
    with pytest.raises(CheckpointError, match=r"coarse.0.weight has shape \(6, 1, 3, 3, 3\)"):
        load_weights_only(path, make_models(width=4))
    with pytest.raises(CheckpointError, match="no weights for model 'other'"):
        load_weights_only(path, {"other": nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights_only(path, {"fine": nn.Linear(6, 3, bias=False)})
    m = make_models()
    sgd = torch.optim.SGD(m["fine"].parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer state 'adam' does not fit"):
        load_checkpoint(path, m, {"adam": sgd})
    with pytest.raises(CheckpointError, match="not found"):
        load_weights_only(tmp_path / "nothing", m)


def test_unstorable_things_are_refused(tmp_path: Path) -> None:
    models = make_models()
    with pytest.raises(CheckpointError, match="without pickling"):
        save_checkpoint(tmp_path / "a", models, state={"fn": object()})
    with pytest.raises(CheckpointError, match="JSON part"):
        save_checkpoint(tmp_path / "b", models, meta={"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="model name"):
        save_checkpoint(tmp_path / "c", {"a.b": nn.Linear(1, 1)})
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_replace_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last"
    old, _, _ = save_full(path, seed=0)
    new, _, _ = trained(seed=1)
    save_checkpoint(path, new, state={"epoch": 4})
    assert load_checkpoint(path, make_models())[0]["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp/backup left
    save_full(path, seed=0)

    # 1. crash while writing the new files: the old checkpoint is untouched
    real_write = ck._write_json

    def crash_on_meta(p: Path, obj: Any) -> None:
        if p.name == "meta.json":
            raise OSError("disk full")
        real_write(p, obj)

    monkeypatch.setattr(ck, "_write_json", crash_on_meta)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new, state={"epoch": 5})
    monkeypatch.setattr(ck, "_write_json", real_write)
    fresh = make_models()
    assert load_checkpoint(path, fresh)[0]["epoch"] == 3
    assert torch.equal(fresh["fine"].state_dict()["weight"], old["fine"].state_dict()["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    # 2. crash between the two renames of the swap: the old one is recovered on load
    real_rename = os.rename

    def crash_on_second(src: Any, dst: Any) -> None:
        if Path(dst) == path:
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, new, state={"epoch": 6})
    monkeypatch.setattr(ck.os, "rename", real_rename)
    assert not path.exists() and (tmp_path / ".last.old").is_dir()
    assert ck.checkpoint_exists(path) and path.is_dir()  # recovers the old one
    assert not ck.checkpoint_exists(tmp_path / "other")
    fresh = make_models()
    assert load_checkpoint(path, fresh)[0]["epoch"] == 3
    assert torch.equal(fresh["fine"].state_dict()["weight"], old["fine"].state_dict()["weight"])
    # and a later save works normally
    save_checkpoint(path, new, state={"epoch": 7})
    assert load_checkpoint(path, make_models())[0]["epoch"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
