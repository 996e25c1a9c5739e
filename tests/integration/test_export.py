"""``landmark3d export --model RUN --format torchscript|onnx``: self-contained networks + manifest.

The session's ``tiny_run`` (coarse + per-landmark fine U-Nets + one correlated group) is
exported; every exported network is loaded back and compared with the PyTorch network on
random inputs of the right shape (max abs diff < 1e-4), the manifest's recipe is checked against
the predictor, and the output directory rules (atomic, no overwrite without --overwrite) are
exercised. ONNX tests run when onnx, onnxscript and onnxruntime are installed (the ``export``
extra).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CliResult
from landmark3d.errors import CheckpointError, Landmark3dError, OutputExistsError
from landmark3d.inference import export as export_mod
from landmark3d.inference.export import (
    MANIFEST,
    PARITY_TOLERANCE,
    export_run,
    read_export_manifest,
)
from landmark3d.inference.export_networks import (
    ExportNetwork,
    load_exported,
    load_run_networks,
    parity_check,
    write_network,
)

Cli = Callable[..., CliResult]
HAS_ONNX = all(
    importlib.util.find_spec(p) is not None for p in ("onnx", "onnxscript", "onnxruntime")
)
needs_onnx = pytest.mark.skipif(
    not HAS_ONNX, reason="the export extra (onnx, onnxscript, onnxruntime) is not installed"
)


def _outputs(net: ExportNetwork, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = net.module(torch.from_numpy(x))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _assert_parity(root: Path, manifest: dict, nets: list[ExportNetwork], fmt: str) -> None:
    """Every network of the manifest vs PyTorch on new random inputs (batch 3), < 1e-4."""
    by_name = {n.name: n for n in nets}
    rng = np.random.default_rng(123)
    for entry in manifest["networks"]:
        net = by_name[entry["name"]]
        shape = [3 if s == "batch" else s for s in entry["inputs"][0]["shape"]]
        assert tuple(shape) == net.input_shape(3)
        x = rng.standard_normal(shape).astype(np.float32)
        got = load_exported(root / entry["file"], fmt)(x)
        want = _outputs(net, x)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert len(got) == len(entry["outputs"])
        for g, w, spec in zip(got, want, entry["outputs"], strict=True):
            assert list(g.shape) == [3 if s == "batch" else s for s in spec["shape"]]
            assert g.dtype == np.float32
            assert float(np.abs(g - w).max()) < PARITY_TOLERANCE, (entry["name"], spec["name"])
        assert entry["parity_max_abs_diff"] < PARITY_TOLERANCE


@pytest.fixture(scope="module")
def ts_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported once as TorchScript through the command line."""
    from conftest import invoke_main

    out = tmp_path_factory.mktemp("export") / "ts"
    threads = torch.get_num_threads()
    try:
        code = invoke_main(["export", "--model", tiny_run, "--format", "torchscript", "--out", out])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


# ----------------------------------------------------------------------------- torchscript
def test_torchscript_export_covers_every_network_with_parity(
    tiny_run: Path, ts_export: Path
) -> None:
    manifest = read_export_manifest(ts_export)  # also checks every file's sha256
    _, plan, nets = load_run_networks(tiny_run)
    kinds = [e["kind"] for e in manifest["networks"]]
    assert kinds.count("coarse") == 1 and kinds.count("correlated") == len(plan.correlated_groups)
    assert kinds.count("fine") >= 1 and len(kinds) == len(nets)
    fine_landmarks = sorted(
        lm for e in manifest["networks"] if e["kind"] == "fine" for lm in e["landmarks"]
    )
    assert fine_landmarks == sorted(plan.landmark_names)
    assert manifest["landmark_names"] == plan.landmark_names
    assert manifest["model_format"] == "torchscript"
    assert manifest["coordinate_system"] == "LPS"
    assert manifest["plan"]["coarse_grid"] == list(plan.coarse_grid)
    assert manifest["preprocessing"]["intensity"]["mode"] == plan.intensity["mode"]
    assert manifest["preprocessing"]["fine"]["patch_size"] == list(plan.patch_size)
    coarse = manifest["networks"][0]
    assert coarse["inputs"][0]["shape"] == ["batch", 1, *plan.coarse_grid]
    assert coarse["outputs"][0]["shape"] == ["batch", len(plan.landmark_names), 3]
    for entry in manifest["networks"]:
        for spec in entry["inputs"] + entry["outputs"]:
            assert spec["dtype"] == "float32" and spec["meaning"] and spec["units"]
    corr = next(e for e in manifest["networks"] if e["kind"] == "correlated")
    assert [o["name"] for o in corr["outputs"]] == ["heatmaps", "slice_profile"]
    _assert_parity(ts_export, manifest, nets, "torchscript")
    readme = (ts_export / "README.md").read_text()
    assert "torch.jit.load" in readme and "at least 2 items per call" in readme


def test_checksums_file_and_tampering(ts_export: Path, tmp_path: Path) -> None:
    sums = (ts_export / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len(read_export_manifest(ts_export)["networks"]) + 2
    for line in sums:
        digest, name = line.split("  ")
        assert hashlib.sha256((ts_export / name).read_bytes()).hexdigest() == digest
    copy = tmp_path / "copy"
    shutil.copytree(ts_export, copy)
    target = copy / "coarse.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        read_export_manifest(copy)


def test_torchscript_files_run_without_landmark3d_or_monai(ts_export: Path) -> None:
    """A fresh interpreter in which landmark3d and monai cannot be imported runs every file."""
    script = (
        "import sys, json\n"
        "sys.modules['landmark3d'] = None; sys.modules['monai'] = None\n"
        "import torch\n"
        "root = sys.argv[1]\n"
        "m = json.load(open(root + '/manifest.json'))\n"
        "for e in m['networks']:\n"
        "    shape = [2 if s == 'batch' else s for s in e['inputs'][0]['shape']]\n"
        "    out = torch.jit.load(root + '/' + e['file'])(torch.zeros(shape))\n"
        "    outs = out if isinstance(out, tuple) else (out,)\n"
        "    assert len(outs) == len(e['outputs']), e['name']\n"
        "print('ok', len(m['networks']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(ts_export)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


def test_manifest_recipe_reproduces_the_predictor(
    tiny_run: Path, ts_export: Path, phantom_dir: Path
) -> None:
    """Exported coarse network + the manifest's to_world rule == Predictor's coarse estimate."""
    from landmark3d.data.preprocess import coarse_sample, prepare_case
    from landmark3d.inference.predictor import Predictor
    from landmark3d.io.images import read_image
    from landmark3d.planning import Plan

    image = read_image(sorted((phantom_dir / "images").iterdir())[0])
    plan = Plan.load(tiny_run / "plan.json")
    x, _, grid = coarse_sample(prepare_case(image, None, plan), plan)
    manifest = read_export_manifest(ts_export)
    coarse = next(e for e in manifest["networks"] if e["kind"] == "coarse")
    t = load_exported(ts_export / coarse["file"], "torchscript")(x[None, None])[0][0]
    size = np.asarray(manifest["preprocessing"]["coarse"]["grid"], dtype=np.float64)
    index = (t.astype(np.float64) + 1.0) * (size - 1.0) / 2.0  # the manifest's to_world rule
    world = grid.index_to_world(index)
    want = Predictor(tiny_run, device="cpu", stage="coarse").predict(image).coarse
    np.testing.assert_allclose(world, want, atol=1e-3)


# ----------------------------------------------------------------------------- output rules
def test_refuses_to_overwrite_without_flag_and_replaces_with_it(
    cli: Cli, tiny_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exp"
    args = ("export", "--model", tiny_run, "--stage", "coarse", "--no-check", "--out", out)
    first = cli(*args)
    assert first.code == 0, first.err
    assert "coarse.pt" in first.out and "not checked" in first.out
    manifest = json.loads((out / MANIFEST).read_text())
    assert [e["name"] for e in manifest["networks"]] == ["coarse"]
    assert manifest["networks"][0]["parity_max_abs_diff"] is None
    before = (out / MANIFEST).read_bytes()
    again = cli(*args)
    assert again.code == 1 and len(again.err_lines) == 1
    assert "--overwrite" in again.err and "Fix:" in again.err
    with pytest.raises(OutputExistsError):
        export_run(tiny_run, out, stages=["coarse"])
    assert (out / MANIFEST).read_bytes() == before
    replaced = cli(*args, "--overwrite")
    assert replaced.code == 0, replaced.err
    read_export_manifest(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_never_replaces_a_directory_that_is_not_an_export(
    cli: Cli, tiny_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = cli("export", "--model", tiny_run, "--stage", "coarse", "--out", out, "--overwrite")
    assert r.code == 1 and "not a landmark3d model export" in r.err
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    ok = cli("export", "--model", tiny_run, "--stage", "coarse", "--no-check", "--out", empty)
    assert ok.code == 0, ok.err
    assert (empty / "coarse.pt").is_file()


def test_failed_parity_writes_nothing(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_mod, "parity_check", lambda *a, **k: 0.5)
    out = tmp_path / "exp"
    with pytest.raises(Landmark3dError, match="differs from PyTorch"):
        export_run(tiny_run, out, stages=["coarse"])
    assert list(tmp_path.iterdir()) == []


def test_parity_check_detects_a_different_network(tiny_run: Path, tmp_path: Path) -> None:
    """The check is not vacuous: a file written from other weights fails it."""
    _, _, nets = load_run_networks(tiny_run, stages=["coarse"])
    net = nets[0]
    path = tmp_path / "coarse.pt"
    write_network(net, path, "torchscript")
    assert parity_check(net, path, "torchscript") < PARITY_TOLERANCE
    with torch.no_grad():
        for p in net.module.parameters():
            p.add_(0.05)
    assert parity_check(net, path, "torchscript") > PARITY_TOLERANCE


def test_exports_from_a_model_archive(cli: Cli, tiny_run: Path, tmp_path: Path) -> None:
    archive = tmp_path / "model.zip"
    assert cli("package", tiny_run, "--out", archive).code == 0
    r = cli("export", "-m", archive, "--stage", "coarse", "--out", tmp_path / "exp")
    assert r.code == 0, r.err
    manifest = read_export_manifest(tmp_path / "exp")
    assert manifest["source"]["model"] == str(archive)
    assert manifest["networks"][0]["parity_max_abs_diff"] < PARITY_TOLERANCE


def test_exports_the_stages_a_run_has_and_refuses_missing_ones(
    cli: Cli, tiny_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "coarse_only"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("cache", "fine", "correlated"))
    ok = cli("export", "--model", run, "--no-check", "--out", tmp_path / "exp")
    assert ok.code == 0, ok.err
    names = [e["name"] for e in read_export_manifest(tmp_path / "exp")["networks"]]
    assert names == ["coarse"]
    asked = cli("export", "--model", run, "--stage", "coarse,fine", "--out", tmp_path / "e2")
    assert asked.code == 1 and "fine" in asked.err and "Fix:" in asked.err
    assert not (tmp_path / "e2").exists()


def test_help_shows_the_model_export_and_the_layout_subcommand(cli: Cli) -> None:
    r = cli("export", "--help")
    assert r.code == 0
    assert "Example" in r.out and "landmark3d export --model" in r.out
    assert "--format" in r.out and "layout" in r.out


def test_usage_errors_are_one_line(cli: Cli, tiny_run: Path, tmp_path: Path) -> None:
    for args, text in (
        (("export", "--out", tmp_path / "x"), "--model"),
        (("export", "--model", tiny_run, "--out", tmp_path / "x", "--format", "tflite"), "tflite"),
        (("export", "--model", tiny_run, "--out", tmp_path / "x", "--stage", "bogus"), "bogus"),
        (("export", "--model", tmp_path, "--out", tmp_path / "x"), "config.json"),
        (("export", "--model", tiny_run, "layout", tmp_path, "--out", tmp_path / "y"), "layout"),
    ):
        r = cli(*args)
        assert r.code == 1, (args, r.err)
        assert len(r.err_lines) == 1 and "Fix:" in r.err and text in r.err, r.err
    assert not (tmp_path / "x").exists()


def test_onnx_without_the_extra_names_it(
    cli: Cli, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    r = cli("export", "--model", tiny_run, "--format", "onnx", "--out", tmp_path / "x")
    assert r.code == 1 and len(r.err_lines) == 1
    assert "landmark3d[export]" in r.err and "onnxscript" in r.err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- onnx
@needs_onnx
def test_onnx_export_parity_coarse_and_correlated(tiny_run: Path, tmp_path: Path) -> None:
    """The MONAI ResNet and the correlated model (two outputs) through onnxruntime."""
    result = export_run(tiny_run, tmp_path / "onnx", fmt="onnx", stages=["coarse", "correlated"])
    manifest = read_export_manifest(result.out)
    assert manifest["model_format"] == "onnx"
    assert {e["kind"] for e in manifest["networks"]} == {"coarse", "correlated"}
    assert all(e["file"].endswith(".onnx") for e in manifest["networks"])
    _, _, nets = load_run_networks(tiny_run, stages=["coarse", "correlated"])
    _assert_parity(result.out, manifest, nets, "onnx")


@needs_onnx
def test_onnx_fine_unet_parity(tiny_run: Path, tmp_path: Path) -> None:
    """A MONAI U-Net of the fine stage through onnxruntime (free batch dimension)."""
    _, _, nets = load_run_networks(tiny_run, stages=["fine"])
    path = tmp_path / f"{nets[0].name}.onnx"
    write_network(nets[0], path, "onnx")
    assert parity_check(nets[0], path, "onnx") < PARITY_TOLERANCE
    x = np.random.default_rng(5).standard_normal(nets[0].input_shape(3)).astype(np.float32)
    got = load_exported(path, "onnx")(x)
    assert float(np.abs(got[0] - _outputs(nets[0], x)[0]).max()) < PARITY_TOLERANCE
