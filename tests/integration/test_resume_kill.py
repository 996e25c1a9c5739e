"""A real training subprocess killed (SIGKILL) or stopped (SIGTERM) mid-run resumes exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from landmark3d.engine import TrainerConfig, fit

UNIT_TESTS = Path(__file__).resolve().parents[1] / "unit"
EPOCHS = 6

SCRIPT = """
import sys
sys.path.insert(0, {unit!r})
from test_trainer import ToyStage
from landmark3d.engine import TrainerConfig, fit

out, slow = sys.argv[1], float(sys.argv[2])
cfg = TrainerConfig(epochs={epochs}, seed=3, device="cpu", num_threads=1, deterministic=False)
fit(ToyStage(slow=slow), cfg, out, progress=False)
"""

pytestmark = pytest.mark.slow


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "train_toy.py"
    path.write_text(SCRIPT.format(unit=str(UNIT_TESTS), epochs=EPOCHS))
    return path


def _run_here(out: Path, resume: bool) -> dict[str, torch.Tensor]:
    """Run (or resume) the same training in this process; returns the final weights."""
    if str(UNIT_TESTS) not in sys.path:
        sys.path.insert(0, str(UNIT_TESTS))
    from test_trainer import ToyStage

    stage = ToyStage()
    cfg = TrainerConfig(epochs=EPOCHS, seed=3, device="cpu", num_threads=1, deterministic=False)
    threads = torch.get_num_threads()
    try:
        fit(stage, cfg, out, resume=resume, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {k: v.clone() for k, v in stage.models["net"].state_dict().items()}


def _start_and_stop(
    script: Path, out: Path, sig: signal.Signals
) -> subprocess.CompletedProcess[str]:
    """Start a slow run, send ``sig`` once the first checkpoint exists, return the result."""
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = out / "checkpoints" / "last" / "state.json"
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(0.07)  # land inside the next epoch
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], str]:
    tmp = tmp_path_factory.mktemp("reference")
    weights = _run_here(tmp / "run", resume=False)
    return weights, (tmp / "run" / "metrics.csv").read_text()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_run_resumes_to_the_same_result(
    tmp_path: Path, reference: tuple[dict[str, torch.Tensor], str], sig: signal.Signals
) -> None:
    script = _script(tmp_path)
    out = tmp_path / "run"
    stopped = _start_and_stop(script, out, sig)
    assert stopped.returncode != 0, "the run finished before it could be stopped"
    if sig == signal.SIGTERM:
        assert "SIGTERM received" in stopped.stderr and "resume" in stopped.stderr
        assert "SIGTERM received" in (out / "train.log").read_text()
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert 1 <= state["epoch"] < EPOCHS
    if sig == signal.SIGTERM:  # graceful stop leaves no temporary directories behind
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

    weights = _run_here(out, resume=True)
    ref_weights, ref_metrics = reference
    for key, value in ref_weights.items():
        assert torch.equal(weights[key], value), key
    assert (out / "metrics.csv").read_text() == ref_metrics
