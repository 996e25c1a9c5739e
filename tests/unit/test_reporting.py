"""Reporting: tables (numbers traceable to the summaries), SDR curve, tri-planar slices."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.geometry.resample import rotation_matrix
from landmark3d.geometry.space import Geometry
from landmark3d.metrics import summarize
from landmark3d.reporting import figures, tables
from landmark3d.reporting.slices import (
    VIEWS,
    Marker,
    draw_view,
    lps_volume,
    plane_slice,
    triplanar_figure,
)

NAMES = ["a", "b", "c"]


class CellParser(HTMLParser):
    """Collects (data-metric list, text) of every numeric cell and every <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[list[dict], str]] = []
        self.images: list[str] = []
        self._metric: list[dict] | None = None
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


def _summary_dict() -> dict:
    errors = np.array([[1.0, 2.4, np.nan], [3.1, 0.5, 9.0], [2.0, np.nan, 4.2]])
    missing_pred = np.array([[0, 0, 1], [0, 0, 0], [0, 0, 0]], bool)
    missing_truth = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]], bool)
    return summarize(
        errors, NAMES, missing_pred_mask=missing_pred, missing_truth_mask=missing_truth
    ).to_dict()


def test_html_table_cells_carry_the_exact_summary_numbers() -> None:
    fine = _summary_dict()
    coarse = summarize(np.full((3, 3), 5.0), NAMES).to_dict()
    summaries = {"coarse": coarse, "fine": fine}
    page = tables.summary_table(summaries).to_html() + tables.landmark_table(summaries).to_html()
    page += tables.fold_table({"fold0": summaries}).to_html()
    parser = CellParser()
    parser.feed(page)
    assert len(parser.cells) > 50
    seen = set()
    for metrics, text in parser.cells:
        for m in metrics:
            value = tables.resolve_metric(summaries[m["stage"]], m)
            assert m["value"] == value
            if m["field"] == "sdr":
                assert tables.fmt_pct(value) in text
            elif m["field"].startswith("n"):
                assert str(value) in text
            else:
                assert tables.fmt_mm(value) in text
            seen.add((m["stage"], m["scope"], m["field"], m.get("sdr")))
    # every landmark x stage x SDR threshold is shown
    for stage in summaries:
        for scope in [*NAMES, "all"]:
            for t in ("2", "2.5", "3", "4", "8"):
                assert (stage, scope, "sdr", t) in seen
    assert fine["sd"] is not None and f"({tables.fmt_mm(fine['sd'])})" in page


def test_markdown_table_keeps_columns_with_row_spans() -> None:
    summaries = {"coarse": _summary_dict(), "fine": _summary_dict()}
    md = tables.landmark_table(summaries, NAMES).to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in rows}
    assert len(widths) == 1, md
    assert len(rows) == 2 + 2 * (len(NAMES) + 1)
    assert "| **a** | coarse only |" in md and "|  | coarse + fine |" in md


def test_cumulative_sdr_matches_sdr_definition() -> None:
    d = _summary_dict()
    errors = np.array([[1.0, 2.4, np.nan], [3.1, 0.5, 9.0], [2.0, np.nan, 4.2]])
    missing = np.array([[0, 0, 1], [0, 0, 0], [0, 0, 0]], bool)
    errors_eval = errors.copy()
    errors_eval[2, 1] = np.nan  # missing truth: not counted at all
    curve = figures.cumulative_sdr(errors_eval, missing, np.array([0.0, 2.0, 2.5, 3.0, 4.0, 8.0]))
    assert curve[0] == 0.0
    for got, key in zip(curve[1:], ["2", "2.5", "3", "4", "8"], strict=True):
        assert got == pytest.approx(d["sdr"][key])
    # exactly at a threshold counts (error <= r)
    assert figures.cumulative_sdr(np.array([[2.0]]), np.zeros((1, 1), bool), np.array([2.0]))[
        0
    ] == pytest.approx(100.0)


def test_figures_write_png(tmp_path: Path) -> None:
    errors = figures.StageErrors(
        np.array([[1.0, 2.0], [3.0, np.nan]]), np.array([[0, 0], [0, 1]], bool), ["p", "q"]
    )
    stages = {"coarse": errors, "fine": errors}
    out = [
        figures.save_png(figures.sdr_curve_figure(stages, [2, 2.5, 3, 4, 8]), tmp_path / "a.png"),
        figures.save_png(figures.error_boxplot_figure(stages), tmp_path / "b.png"),
        figures.save_png(
            figures.training_curves_figure(
                {
                    "coarse": [
                        {"epoch": 1, "train_loss": 1.0, "val_mre_mm": 5.0},
                        {"epoch": 2, "train_loss": 0.5},
                    ]
                }
            ),
            tmp_path / "c.png",
        ),
    ]
    for p in out:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


# ----------------------------------------------------------------------------- slices
def _image(direction: np.ndarray, spacing: tuple[float, float, float], blob: tuple[int, int, int]):
    """A (30, 20, 12) image, value 1 everywhere and 1000 in a 3x3x3 blob centred at ``blob``."""
    arr = np.ones((30, 20, 12), np.float32)  # index order [i, j, k]
    i, j, k = blob
    arr[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 500.0
    arr[i, j, k] = 1000.0
    img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)).copy())
    geo = Geometry((30, 20, 12), np.array(spacing), np.array([12.0, -30.0, 40.0]), direction)
    geo.apply_to(img)
    return img, geo.index_to_world(np.array(blob, dtype=np.float64))


def _value_at(image_artist, x: float, y: float) -> float:
    """The pixel value an AxesImage shows at data coordinates (x, y) (origin='lower')."""
    arr = np.asarray(image_artist.get_array())
    left, right, bottom, top = image_artist.get_extent()
    col = int((x - left) / (right - left) * arr.shape[1])
    row = int((y - bottom) / (top - bottom) * arr.shape[0])
    return float(arr[row, col])


# stored with i -> Superior, j -> Right, k -> Anterior: a permuted, flipped, anisotropic image
PERMUTED = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def test_triplanar_marker_at_the_landmark_pixel_on_anisotropic_permuted_image() -> None:
    spacing = (0.7, 1.3, 2.9)
    img, world = _image(PERMUTED, spacing, (14, 6, 4))
    vol = lps_volume(img)
    assert np.allclose(vol.geometry.direction, np.eye(3))
    # LPS axes now carry the stored spacings: x <- j (1.3), y <- k (2.9), z <- i (0.7)
    assert np.allclose(vol.geometry.spacing, [1.3, 2.9, 0.7])
    fig, drawn = triplanar_figure(vol, [("lm", [Marker("truth", world)])])
    try:
        for view, d in zip(VIEWS, drawn[0], strict=True):
            art, xy = d["markers"]["truth"]
            expect = (world[view.horizontal], world[view.vertical])
            assert xy == pytest.approx(expect)
            assert np.asarray(art.get_offsets())[0] == pytest.approx(expect)
            # the image shows the blob centre under the marker
            assert _value_at(d["image"], *expect) == 1000.0
            ax = art.axes
            assert ax.get_aspect() == 1.0  # data units are mm: physical aspect
            left, right, bottom, top = d["image"].get_extent()
            h, v = view.horizontal, view.vertical
            assert right - left == pytest.approx(vol.geometry.size[h] * vol.geometry.spacing[h])
            assert top - bottom == pytest.approx(vol.geometry.size[v] * vol.geometry.spacing[v])
            # radiological: x (R->L) grows to the right; A (low y) at the top of the axial view
            x0, x1 = ax.get_xlim()
            y0, y1 = ax.get_ylim()
            assert x1 > x0
            assert (y0 > y1) if view.name == "axial" else (y1 > y0)
            letters = {(t.get_position(), t.get_text()) for t in ax.texts}
            assert ((0.98, 0.5), view.right) in letters and ((0.02, 0.5), view.left) in letters
        assert [v.right for v in VIEWS] == ["L", "L", "P"]
    finally:
        plt.close(fig)


def test_oblique_image_is_resampled_axis_aligned_and_marker_stays_on_the_blob() -> None:
    direction = rotation_matrix([0.3, 0.2, 1.0], math.radians(25.0))
    img, world = _image(direction, (1.0, 1.5, 2.5), (15, 10, 6))
    vol = lps_volume(img)
    assert np.allclose(vol.geometry.direction, np.eye(3))
    fig, ax = plt.subplots()
    try:
        for view in VIEWS:
            ax.clear()
            d = draw_view(ax, vol, view, world, [Marker("truth", world)])
            _, xy = d["markers"]["truth"]
            assert xy == pytest.approx((world[view.horizontal], world[view.vertical]))
            # interpolated blob: clearly brighter than the background at the marker
            assert _value_at(d["image"], *xy) > 200.0
    finally:
        plt.close(fig)


def test_plane_slice_goes_through_the_point() -> None:
    img, world = _image(np.eye(3), (1.0, 2.0, 3.0), (5, 7, 9))
    vol = lps_volume(img)
    for view, expected in zip(VIEWS, (9, 7, 5), strict=True):
        arr, _, k = plane_slice(vol, view, world)
        assert k == expected
        assert arr.max() == 1000.0
        h, v = view.horizontal, view.vertical
        assert arr.shape == (vol.geometry.size[v], vol.geometry.size[h])


def test_prediction_dirs_name_their_stage(tmp_path: Path) -> None:
    from landmark3d.reporting.collect import default_prediction_stage, prediction_dirs

    run = tmp_path / "run"
    for name in ("predictions", "predictions_coarse", "pred_x", "other", "predictions_empty"):
        (run / name).mkdir(parents=True)
        if name != "predictions_empty":
            (run / name / "metrics.json").write_text("{}")
    (run / "plan.json").write_text(json.dumps({"correlated_groups": [{"landmarks": ["a"]}]}))
    assert default_prediction_stage(run) == "fine"  # no correlated model
    assert list(prediction_dirs(run)) == ["coarse", "fine", "x"]
    (run / "correlated" / "checkpoints" / "best").mkdir(parents=True)
    assert default_prediction_stage(run) == "correlated"
    assert prediction_dirs(run)["correlated"] == run / "predictions"
    (run / "predictions_correlated").mkdir()
    (run / "predictions_correlated" / "metrics.json").write_text("{}")
    assert prediction_dirs(run)["correlated"] == run / "predictions_correlated"  # explicit wins
    (run / "plan.json").write_text(json.dumps({"correlated_groups": []}))
    assert default_prediction_stage(run) == "fine"
