"""End to end: a report from a tiny real run; cross-validation with a failing fold and resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import TINY_OVERRIDES

from landmark3d.reporting import tables


class PageParser(HTMLParser):
    """Every <img src> and every numeric cell (data-metric list, shown text)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[tuple[list[dict[str, Any]], str]] = []
        self._metric: list[dict[str, Any]] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(str(a["src"]))
        if tag in ("td", "th") and "data-metric" in a:
            self._metric, self._text = json.loads(str(a["data-metric"])), ""

    def handle_data(self, data: str) -> None:
        if self._metric is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._metric is not None:
            self.cells.append((self._metric, self._text))
            self._metric = None


def check_page(html_path: Path, summary_of: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Images exist; every number equals the JSON summary ``summary_of(metric)``; count."""
    parser = PageParser()
    parser.feed(html_path.read_text(encoding="utf-8"))
    assert len(parser.images) >= 4
    for src in parser.images:
        assert not src.startswith(("/", "http")), src
        img = html_path.parent / src
        assert img.is_file(), src
        assert img.read_bytes()[:4] == b"\x89PNG"
    n = 0
    for metrics, text in parser.cells:
        for m in metrics:
            expected = tables.resolve_metric(summary_of(m), m)
            assert m["value"] == expected, m
            shown = (
                tables.fmt_pct(expected)
                if m["field"] == "sdr"
                else str(expected)
                if m["field"].startswith("n")
                else tables.fmt_mm(expected)
            )
            assert shown in text
            n += 1
    return n


def _tiny_config() -> Any:
    from landmark3d.config import apply_overrides, load_config

    return apply_overrides(load_config("phantom_demo"), list(TINY_OVERRIDES))


# ----------------------------------------------------------------------------- report
def test_report_from_a_tiny_run(tiny_run: Path, phantom_dir: Path, tmp_path: Path, cli) -> None:
    from landmark3d.data.dataset import load_dataset
    from landmark3d.evaluation import evaluate, write_evaluation
    from landmark3d.inference.batch import predict_inputs
    from landmark3d.reporting.collect import default_prediction_stage

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("cache"))
    ds = load_dataset(phantom_dir)
    test = ds.split(0)[1]
    dirs = {"coarse": "predictions_coarse", "fine": "predictions_fine", "auto": "predictions"}
    for stage, name in dirs.items():
        predict_inputs(run, run / name, dataset_path=phantom_dir, fold=0, stage=stage)
        write_evaluation(evaluate(run / name, ds, cases=test), run / name)
    del dirs["auto"]
    if default_prediction_stage(run) == "correlated":  # the run has a correlated model
        dirs["correlated"] = "predictions"

    res = cli("report", run)
    assert res.code == 0, res.err
    html_path = run / "report.html"
    assert html_path.is_file() and str(html_path) in res.out.replace("\n", "")
    metrics = {s: json.loads((run / d / "metrics.json").read_text()) for s, d in dirs.items()}
    n = check_page(html_path, lambda m: metrics[m["stage"]]["summary"])
    # summary (a row per stage) + per landmark (6 landmarks + all, per stage): every number
    per_row = 6 + 5  # n, missing, mre, sd, median, max, 5 SDR
    assert n == per_row * (len(dirs) + len(dirs) * 7)
    text = html_path.read_text()
    plan = json.loads((run / "plan.json").read_text())
    assert plan["dataset_fingerprint"] in text
    assert "Radiological convention" in text
    pngs = sorted(p.name for p in (run / "report_files").glob("*.png"))
    assert {"sdr_curve.png", "error_boxplots.png", "training.png"} <= set(pngs)
    assert sum(p.startswith("worst") for p in pngs) == min(3, len(test))
    # calibrated run: the least confident predictions open the report, before the summary
    from landmark3d.evaluation import find_predictions
    from landmark3d.io.landmarks import read_landmarks
    from landmark3d.reporting.collect import load_report_data
    from landmark3d.reporting.flagged import scored_predictions

    assert text.index("Predictions to check") < text.index("<h2>Summary</h2>")
    preds = scored_predictions(load_report_data(run))
    assert len(preds) == 6 * len(test)
    expected = [p.expected_error_mm for p in preds]
    assert expected == sorted(expected, reverse=True) and all(e > 0 for e in expected)
    top = preds[0]
    final_dir = run / list(dirs.values())[-1]
    on_disk = read_landmarks(find_predictions(final_dir)[0][top.case]).extras[top.landmark]
    assert float(on_disk["expected_error_mm"]) == top.expected_error_mm
    truth = metrics[list(dirs)[-1]]["rows"]
    row = next(r for r in truth if (r["case"], r["landmark"]) == (top.case, top.landmark))
    assert row["error_mm"] == top.true_error_mm
    first_row = text.split('<table id="flagged">')[1].split("</tr>")[1]
    assert top.case in first_row and top.landmark in first_row
    # refuses to overwrite without --overwrite
    again = cli("report", run)
    assert again.code == 1 and "--overwrite" in again.err
    assert cli("report", run, "--overwrite", "--worst", "1").code == 0
    assert sum(p.name.startswith("worst") for p in (run / "report_files").glob("*.png")) == 1


def test_report_of_a_directory_without_metrics_says_what_to_do(tmp_path: Path, cli) -> None:
    res = cli("report", tmp_path)
    assert res.code == 1
    assert "no evaluated predictions" in res.err and "landmark3d evaluate" in res.err


# ----------------------------------------------------------------------------- cv
@pytest.mark.slow
def test_cv_failed_fold_resume_and_report(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    import landmark3d.engine.cv as cvmod
    from landmark3d.data.dataset import load_dataset
    from landmark3d.errors import OutputExistsError

    ds = load_dataset(phantom_dir)
    cfg = _tiny_config()
    out = tmp_path / "cv"
    real_train_run = cvmod.train_run
    calls: list[int | None] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["fold"])
        if kwargs["fold"] == 1:  # coarse trained, then a crash before the fine stage
            real_train_run(*args, **{**kwargs, "stages": ("coarse",)})
            raise RuntimeError("simulated crash in fold 1")
        return real_train_run(*args, **kwargs)

    import landmark3d.inference.batch as batch

    real_predict = batch.predict_inputs

    def flaky_predict(*args: Any, **kwargs: Any) -> Any:
        if kwargs["fold"] == 2 and kwargs["stage"] == "fine":
            raise RuntimeError("simulated prediction failure")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(cvmod, "train_run", flaky)
    monkeypatch.setattr(batch, "predict_inputs", flaky_predict)
    result = cvmod.run_cv(ds, cfg, out, progress=False)
    assert calls == [0, 1, 2]
    assert [f.status for f in result.folds] == ["complete", "failed", "partial"]
    d = json.loads((out / "cv.json").read_text())
    assert (d["folds_complete"], d["folds_partial"], d["folds_failed"]) == ([0], [2], [1])
    assert "simulated crash in fold 1" in d["folds"]["fold1"]["error"]
    assert "simulated prediction failure" in d["folds"]["fold2"]["stage_errors"]["fine"]
    assert d["stages"][:2] == ["coarse", "fine"]
    for s, folds_with_stage in (("coarse", (0, 2)), ("fine", (0,))):
        pooled = d["pooled"][s]
        folds = [d["folds"][f"fold{k}"]["summaries"][s] for k in folds_with_stage]
        assert pooled["n_evaluated"] == sum(f["n_evaluated"] for f in folds)
        assert pooled["n_cases"] == 2 * len(folds_with_stage)
        assert set(pooled["per_landmark"]) == set(ds.landmark_names)
        for k in folds_with_stage:  # per-fold numbers are those of the fold's metrics.json
            m = json.loads((out / d["folds"][f"fold{k}"]["metrics_files"][s]).read_text())
            assert d["folds"][f"fold{k}"]["summaries"][s] == m["summary"]
    assert "fine" not in d["folds"]["fold2"]["summaries"]
    md = (out / "cv.md").read_text()
    assert "MRE (SD) mm" in md and "SDR@2.5 mm %" in md
    assert "fold 1: RuntimeError" in md and "fold 2, fine: RuntimeError" in md
    assert "Per landmark (pooled)" in md and "coarse + fine" in md

    # a second run without --resume refuses to overwrite
    with pytest.raises(OutputExistsError):
        cvmod.run_cv(ds, cfg, out, progress=False)

    # --resume: the complete fold is skipped, the failed and the partial ones are redone
    calls.clear()
    monkeypatch.setattr(batch, "predict_inputs", real_predict)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["fold"])
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(cvmod, "train_run", counting)
    mtime = (out / "fold0" / "pred_fine" / "metrics.json").stat().st_mtime_ns
    resumed = cvmod.run_cv(ds, cfg, out, resume=True, progress=False)
    assert calls == [1, 2]
    assert [f.status for f in resumed.folds] == ["complete"] * 3
    assert [f.resumed for f in resumed.folds] == [True, False, False]
    assert (out / "fold0" / "pred_fine" / "metrics.json").stat().st_mtime_ns == mtime
    # fold 1 continued from its coarse checkpoint instead of training coarse again
    assert "resumed coarse" in (out / "fold1" / "coarse" / "train.log").read_text()
    assert len((out / "fold1" / "coarse" / "metrics.csv").read_text().splitlines()) == 3
    d = json.loads((out / "cv.json").read_text())
    assert d["folds_failed"] == d["folds_partial"] == [] and d["pooled"]["fine"]["n_cases"] == 6

    # the report of the cross-validation shows cv.json's numbers
    res = cli("report", out, "--worst", "1")
    assert res.code == 0, res.err

    def summary_of(m: dict[str, Any]) -> dict[str, Any]:
        if "fold" in m:
            return d["folds"][m["fold"]]["summaries"][m["stage"]]
        return d["pooled"][m["stage"]]

    assert check_page(out / "report.html", summary_of) > 100
    page = (out / "report.html").read_text()
    assert all(f"fold{k}" in page for k in range(3)) and "Failed (not in the tables)" not in page
    assert (out / "report_files" / "training.png").is_file()
