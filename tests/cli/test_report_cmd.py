"""`landmark3d report`: evaluated predictions outside the run (--pred), the worst-case caption.

The "run" here is a run directory without models (only its ``split.json``): the predictions are
the phantom's true landmarks shifted by a few mm, written and evaluated through the CLI, so the
report is built in seconds without training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from landmark3d.data.dataset import load_dataset
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import write_landmarks


def _run_dir(dataset: Path, run: Path, fold: int = 0) -> list[str]:
    """A run directory holding only ``split.json`` (as ``landmark3d train`` writes it)."""
    ds = load_dataset(dataset)
    train, test = ds.split(fold)
    run.mkdir(parents=True)
    split = {"dataset": str(ds.source), "fold": fold, "train": train, "val": [], "test": test}
    (run / "split.json").write_text(json.dumps(split))
    return list(test)


def _evaluated_predictions(cli, dataset: Path, out: Path, shift_mm: float) -> dict:
    """Fold 0's test cases, truth shifted by ``shift_mm`` along z, evaluated by the CLI."""
    ds = load_dataset(dataset)
    out.mkdir(parents=True)
    for cid in ds.split(0)[1]:
        truth = ds.read_landmarks(cid)
        shifted = truth.coords + np.array([0.0, 0.0, shift_mm])
        write_landmarks(LandmarkSet(list(truth.names), shifted), out / f"{cid}.json")
    res = cli("evaluate", "--pred", out, "--truth", dataset, "--fold", "0")
    assert res.code == 0, res.err
    return json.loads((out / "metrics.json").read_text())


def test_report_includes_evaluated_predictions_outside_the_run(
    phantom_dir: Path, tmp_path: Path, cli
) -> None:
    """The README's sequence: predict --out pred/, evaluate --pred pred/, report RUN --pred pred/."""
    run = tmp_path / "runs" / "f0"
    test = _run_dir(phantom_dir, run)
    pred = tmp_path / "pred"
    metrics = _evaluated_predictions(cli, phantom_dir, pred, 3.0)

    alone = cli("report", run)  # the run itself holds no evaluated predictions
    assert alone.code == 1 and "--pred" in alone.err

    res = cli("report", run, "--pred", pred, "--worst", "1")
    assert res.code == 0, res.err
    page = (run / "report.html").read_text()
    assert f"<code>{pred / 'metrics.json'}</code>" in page  # the numbers' source
    mre = metrics["summary"]["mre"]
    assert abs(mre - 3.0) < 1e-6 and f"{mre:.2f}" in page
    assert "coarse + fine" in page  # a plain directory name: the run's default predict stage
    assert len(list((run / "report_files").glob("worst1_*.png"))) == 1
    assert any(c in page for c in test)

    # repeatable: a directory named after its stage adds that stage
    coarse = tmp_path / "elsewhere" / "predictions_coarse"
    _evaluated_predictions(cli, phantom_dir, coarse, 6.0)
    res = cli("report", run, "--pred", pred, "--pred", coarse, "--overwrite")
    assert res.code == 0, res.err
    page = (run / "report.html").read_text()
    assert "coarse only" in page and "6.00" in page and "3.00" in page


def test_report_pred_errors_are_one_clear_line(phantom_dir: Path, tmp_path: Path, cli) -> None:
    run = tmp_path / "run"
    _run_dir(phantom_dir, run)
    not_evaluated = tmp_path / "raw"
    not_evaluated.mkdir()
    res = cli("report", run, "--pred", not_evaluated)
    assert res.code == 1 and "raw" in res.err and "landmark3d evaluate" in res.err
    assert "Traceback" not in res.err
    a, b = tmp_path / "a", tmp_path / "b"
    _evaluated_predictions(cli, phantom_dir, a, 1.0)
    _evaluated_predictions(cli, phantom_dir, b, 2.0)
    res = cli("report", run, "--pred", a, "--pred", b)
    assert res.code == 1 and "two --pred directories" in res.err
    assert not (run / "report.html").exists()


def test_worst_case_caption_names_exactly_the_markers_drawn(
    phantom_dir: Path, tmp_path: Path, monkeypatch, cli
) -> None:
    """The caption's key is the set of (label, marker, colour) the slice figures draw."""
    from landmark3d.reporting import html
    from landmark3d.reporting.slices import triplanar_figure

    drawn: set[tuple[str, str]] = set()

    def recording(volume, rows, title=""):  # type: ignore[no-untyped-def]
        for _, markers in rows:
            drawn.update((m.label, html.describe_marker((m.marker, m.color))) for m in markers)
        return triplanar_figure(volume, rows, title)

    monkeypatch.setattr(html, "triplanar_figure", recording)
    run = tmp_path / "run"
    _run_dir(phantom_dir, run)
    preds = []
    for stage, shift in (("fine", 2.0), ("correlated", 1.0)):
        preds += ["--pred", tmp_path / f"predictions_{stage}"]
        _evaluated_predictions(cli, phantom_dir, tmp_path / f"predictions_{stage}", shift)
    res = cli("report", run, *preds, "--worst", "1")
    assert res.code == 0, res.err
    page = (run / "report.html").read_text()
    caption = page.split("direction (R/L, A/P, S/I). ")[1].split(". A prediction")[0]
    shown = {tuple(part.split(": ")) for part in caption.split("; ")}
    drawn = {("Truth" if label == "truth" else label, style) for label, style in drawn}
    assert shown == drawn
    assert shown == {
        ("Truth", "green ○"),
        ("coarse + fine", "red +"),
        ("coarse + fine + correlated", "cyan ◇"),
    }
