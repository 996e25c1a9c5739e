"""`landmark3d demo` only replaces directories it created itself (a phantom, an earlier demo run).

The heavy steps (phantom generation, training) are replaced by stubs that record their call and
stop the command, so these tests check the decisions in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from landmark3d.errors import Landmark3dError


class Stopped(Landmark3dError):
    """Raised by the stubs: the demo got past its checks."""


def _stub(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> list[dict[str, Any]]:
    """Replace ``module.name`` by a stub that records its arguments and raises :class:`Stopped`."""
    import importlib

    calls: list[dict[str, Any]] = []

    def stub(*args: Any, **kwargs: Any) -> Any:
        calls.append({"args": args, **kwargs})
        raise Stopped(f"{name} reached (test stub).")

    monkeypatch.setattr(importlib.import_module(module), name, stub)
    return calls


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _user_dir(root: Path) -> Path:
    (root / "scans").mkdir(parents=True)
    (root / "scans" / "patient1.nii.gz").write_bytes(b"not really an image")
    (root / "annotations.csv").write_text("name,x,y,z\nnasion,1,2,3\n")
    return root


def _quick_phantom(phantom_dir: Path, dest: Path) -> Path:
    """A copy of the test phantom whose generator record says it is the --quick phantom."""
    shutil.copytree(phantom_dir, dest)
    spec = json.loads((dest / "dataset.json").read_text())
    spec["generator"].update(cases=9, size=48, seed=0)
    (dest / "dataset.json").write_text(json.dumps(spec))
    return dest


def test_demo_refuses_a_user_data_directory_and_leaves_it_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    generate = _stub(monkeypatch, "landmark3d.data.phantom", "generate_phantom")
    mydata = _user_dir(tmp_path / "mydata")
    before = _tree(mydata)
    res = cli("demo", "--out", tmp_path / "demo2", "--data", mydata, "--quick")
    assert res.code == 1
    assert "mydata" in res.err and "--data" in res.err and "--overwrite" in res.err
    assert "Traceback" not in res.err
    assert _tree(mydata) == before
    assert not (tmp_path / "demo2").exists() and not generate


def test_demo_refuses_a_dataset_that_is_not_a_phantom(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """A user's dataset.json (no phantom generator record) is never trained on nor replaced,
    and neither is a phantom directory the user added files to."""
    generate = _stub(monkeypatch, "landmark3d.data.phantom", "generate_phantom")
    train = _stub(monkeypatch, "landmark3d.engine.run", "train_run")
    theirs = tmp_path / "theirs"
    shutil.copytree(phantom_dir, theirs)
    spec = json.loads((theirs / "dataset.json").read_text())
    del spec["generator"]
    (theirs / "dataset.json").write_text(json.dumps(spec))
    edited = _quick_phantom(phantom_dir, tmp_path / "edited")
    (edited / "notes.txt").write_text("my annotations")
    for data in (theirs, edited):
        before = _tree(data)
        res = cli("demo", "--out", tmp_path / "run", "--data", data, "--quick")
        assert res.code == 1 and data.name in res.err and "--overwrite" in res.err
        assert _tree(data) == before
    assert not generate and not train


def test_demo_refuses_a_user_out_directory_and_leaves_it_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    generate = _stub(monkeypatch, "landmark3d.data.phantom", "generate_phantom")
    out = _user_dir(tmp_path / "runs" / "mine")
    before = _tree(out)
    res = cli("demo", "--out", out, "--data", tmp_path / "phantom", "--quick")
    assert res.code == 1
    assert "mine" in res.err and "--out" in res.err and "--overwrite" in res.err
    assert _tree(out) == before
    assert not generate and not (tmp_path / "phantom").exists()  # refused before writing


def test_demo_overwrite_replaces_a_user_directory_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    generate = _stub(monkeypatch, "landmark3d.data.phantom", "generate_phantom")
    mydata = _user_dir(tmp_path / "mydata")
    res = cli("demo", "--out", tmp_path / "o", "--data", mydata, "--quick", "--overwrite")
    assert "test stub" in res.err
    assert generate[0]["args"][0] == mydata and generate[0]["overwrite"] is True


def test_demo_regenerates_a_phantom_of_other_settings(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    generate = _stub(monkeypatch, "landmark3d.data.phantom", "generate_phantom")
    data = tmp_path / "phantom"
    shutil.copytree(phantom_dir, data)  # 6 cases: not the --quick phantom (9)
    res = cli("demo", "--out", tmp_path / "run", "--data", data, "--quick")
    assert "test stub" in res.err
    call = generate[0]
    assert call["args"][0] == data and call["overwrite"] is True
    assert (call["n_cases"], call["size"], call["seed"]) == (9, 48, 0)
    # a missing (or empty) directory is generated without overwrite
    generate.clear()
    cli("demo", "--out", tmp_path / "run", "--data", tmp_path / "new", "--quick")
    assert generate[0]["overwrite"] is False


def test_demo_reuses_its_phantom_and_replaces_an_earlier_demo_run(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    from landmark3d.cli.model_cmds import DEMO_MARKER, QUICK_OVERRIDES
    from landmark3d.config import apply_overrides, load_config

    generate = _stub(monkeypatch, "landmark3d.data.phantom", "generate_phantom")
    train = _stub(monkeypatch, "landmark3d.engine.run", "train_run")
    data = _quick_phantom(phantom_dir, tmp_path / "phantom")
    before = _tree(data)
    # an earlier demo run (with the marker) and one made before the marker existed
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / DEMO_MARKER).write_text("{}")
    (marked / "old.txt").write_text("old")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    apply_overrides(load_config("phantom_demo"), QUICK_OVERRIDES).save_json(legacy / "config.json")
    for out in (marked, legacy, tmp_path / "fresh"):
        res = cli("demo", "--out", out, "--data", data, "--quick")
        assert "test stub" in res.err, res.err
        assert "reused" in res.out
        assert train[-1]["args"][2] == out and train[-1]["overwrite"] is True
        marker = json.loads((out / DEMO_MARKER).read_text())
        assert marker["tool"] == "landmark3d demo" and marker["quick"] is True
    assert not generate and _tree(data) == before
