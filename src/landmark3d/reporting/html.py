"""``report.html``: a self-contained page of tables and figures for a run or a cross-validation.

The page is one HTML file with inline CSS; its PNG figures are written beside it in
``<report stem>_files/`` (``RUN/report_files/`` for ``RUN/report.html``) and referenced by
relative paths, so the directory can be copied or zipped as a whole. Every numeric table cell
carries the exact numbers it shows (``data-metric``, see :mod:`landmark3d.reporting.tables`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from landmark3d import __version__
from landmark3d.io.atomic import atomic_write_text, check_writable
from landmark3d.reporting import figures
from landmark3d.reporting.collect import ReportData, load_report_data, read_json, worst_cases
from landmark3d.reporting.flagged import DEFAULT_FLAG_MM, flag_summary, scored_predictions
from landmark3d.reporting.slices import CONVENTION, Marker, lps_volume, triplanar_figure
from landmark3d.reporting.tables import (
    fmt_mm,
    fmt_pct,
    fold_table,
    landmark_table,
    stage_label,
    summary_table,
)

PRED_MARKERS = {"coarse": ("x", "orange"), "fine": ("+", "red"), "correlated": ("D", "cyan")}
"""Stage -> (matplotlib marker, colour) of its predictions in the worst-case slices."""
OTHER_MARKER = ("s", "magenta")
"""Marker of a stage not in :data:`PRED_MARKERS`."""
TRUTH_MARKER = ("o", "lime")
MARKER_SYMBOLS = {"o": "○", "x": "×", "+": "+", "D": "◇", "s": "□"}
"""How the caption writes a matplotlib marker (filled shapes are drawn hollow, see
:func:`~landmark3d.reporting.slices.draw_view`)."""
COLOR_NAMES = {"lime": "green"}
"""How the caption names a matplotlib colour (others by their own name)."""
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1150px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .55em}td{white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#f0f0f0}caption{text-align:left;font-weight:600;padding:.3em 0}
tbody th{background:#fafafa;text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
.note{color:#666;font-size:.85em}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em}
.fail{color:#b00}code{background:#f3f3f3;padding:0 .2em}
"""


@dataclass
class ReportResult:
    """The report written: the HTML file and the PNG figures (all under ``files_dir``)."""

    html: Path
    files_dir: Path
    figures: list[Path] = field(default_factory=list)


def _esc(text: object) -> str:
    return html.escape(str(text))


def _kv_table(items: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    return f"<table>{rows}</table>"


def _plan_rows(run: Path) -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = []
    if (run / "plan.json").is_file():
        p = read_json(run / "plan.json")
        items += [
            ("dataset", p.get("dataset_name")),
            ("dataset fingerprint", p.get("dataset_fingerprint")),
            ("planned on", f"{len(p.get('case_ids', []))} case(s)"),
            ("orientation", p.get("orientation")),
            ("coarse grid (voxels)", p.get("coarse_grid")),
            ("fine spacing (mm)", p.get("fine_spacing_mm")),
            ("patch size (voxels)", p.get("patch_size")),
            ("intensity", p.get("intensity")),
            ("modality", p.get("modality")),
        ]
    if (run / "split.json").is_file():
        s = read_json(run / "split.json")
        items += [
            ("dataset source", s.get("dataset")),
            ("fold", s.get("fold")),
            ("train / val / test cases", f"{len(s['train'])} / {len(s['val'])} / {len(s['test'])}"),
        ]
    return items


def _load_dataset_for(run: Path, cache: dict[str, Any]) -> Any:
    """The dataset named by ``run/split.json`` (None if it cannot be loaded)."""
    from landmark3d.data.dataset import load_dataset

    if not (run / "split.json").is_file():
        return None
    src = read_json(run / "split.json").get("dataset")
    if not src:
        return None
    if src not in cache:
        try:
            cache[src] = load_dataset(src)
        except Exception:  # the data moved: the report still shows everything else
            cache[src] = None
    return cache[src]


def marker_style(stage: str) -> tuple[str, str]:
    """(matplotlib marker, colour) of ``stage``'s predictions in the worst-case slices."""
    return PRED_MARKERS.get(stage, OTHER_MARKER)


def describe_marker(style: tuple[str, str]) -> str:
    """A (marker, colour) as the caption writes it, e.g. ``("x", "orange")`` -> ``orange ×``."""
    marker, color = style
    return f"{COLOR_NAMES.get(color, color)} {MARKER_SYMBOLS.get(marker, repr(marker))}"


def marker_legend(stages: list[str]) -> str:
    """The caption's key to the markers drawn for truth and ``stages`` (figure legend labels).

    Built from the same table as the figures (:func:`marker_style`), so it names exactly the
    markers drawn: e.g. ``Truth: green ○; coarse only: orange ×; coarse + fine: red +``.
    """
    parts = [f"Truth: {describe_marker(TRUTH_MARKER)}"]
    parts += [f"{stage_label(s)}: {describe_marker(marker_style(s))}" for s in stages]
    return "; ".join(parts)


def _slice_figures(data: ReportData, files: Path, n_worst: int) -> tuple[list[str], list[Path]]:
    """Tri-planar figures of the worst cases: (HTML fragments, PNG paths)."""
    parts: list[str] = []
    written: list[Path] = []
    datasets: dict[str, Any] = {}
    for rank, (run_label, case, mean_err) in enumerate(worst_cases(data, n_worst), 1):
        ds = _load_dataset_for(data.runs.get(run_label, data.root), datasets)
        if ds is None:
            parts.append(f'<p class="note">{_esc(case)}: dataset not found; no slices.</p>')
            continue
        volume = lps_volume(ds.read_image(case))
        rows = []
        for name in data.landmark_names:
            markers: list[Marker] = []
            for st in data.stages.values():
                r = next(
                    (
                        r
                        for r in st.rows
                        if r["run"] == run_label and r["case"] == case and r["landmark"] == name
                    ),
                    None,
                )
                if r is None:
                    continue
                if not markers and r["truth"] is not None:
                    markers.append(Marker("truth", np.asarray(r["truth"]), *TRUTH_MARKER))
                if r["pred"] is not None:
                    style = marker_style(st.name)
                    markers.append(Marker(stage_label(st.name), np.asarray(r["pred"]), *style))
            if markers and markers[0].label == "truth":
                rows.append((name, markers))
        if not rows:
            continue
        where = "" if data.kind == "run" else f" ({run_label})"
        last = list(data.stages)[-1]
        title = (
            f"#{rank} {case}{where}: mean radial error {mean_err:.2f} mm ({stage_label(last)}); "
            f"slices through the annotated landmark, {CONVENTION} convention"
        )
        fig, _ = triplanar_figure(volume, rows, title)
        png = figures.save_png(fig, files / f"worst{rank}_{case}.png", dpi=90)
        written.append(png)
        parts.append(_img(png, files, f"tri-planar slices of {case}"))
    return parts, written


def _shown_path(path: Path, root: Path) -> Path:
    """``path`` relative to the reported directory, or as given when it lies elsewhere."""
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def _img(png: Path, files: Path, alt: str) -> str:
    return f'<img src="{_esc(files.name)}/{_esc(png.name)}" alt="{_esc(alt)}">'


def _training_histories(data: ReportData) -> dict[str, list[dict[str, float]]]:
    curves: dict[str, list[dict[str, float]]] = {}
    for label, run in data.runs.items():
        for stage in ("coarse", "fine", "correlated"):
            rows = figures.read_metrics_csv(run / stage / "metrics.csv")
            if rows:
                curves[stage if data.kind == "run" else f"{label} {stage}"] = rows
    return curves


def _flagged_section(data: ReportData, flag_above: float, least: int = 5) -> list[str]:
    """ "Predictions to check": flagged (absent or expected error > ``flag_above``) first."""
    preds = scored_predictions(data)
    if not preds:
        return []
    flagged = [p for p in preds if p.flagged(flag_above)]
    shown = flagged or preds[:least]
    stats = flag_summary(preds, flag_above)
    head = (
        f"{stats['flagged']} of {stats['n']} predictions flagged (absent, or expected error "
        f"&gt; {flag_above:g} mm); they hold {stats['true_gt4_flagged']} of the "
        f"{stats['true_gt4']} true errors &gt; 4 mm."
        if flagged
        else f"No prediction flagged (expected error &gt; {flag_above:g} mm); the {len(shown)} "
        "least confident are listed."
    )
    rows = "".join(
        f"<tr><td>{_esc(p.run + ' / ' if data.kind == 'cv' else '')}{_esc(p.case)}</td>"
        f"<td>{_esc(p.landmark)}</td><td>{_esc(fmt_mm(p.expected_error_mm))}</td>"
        f"<td>{_esc(fmt_pct(100 * p.confidence))}</td>"
        f"<td>{_esc(fmt_mm(p.true_error_mm))}</td><td>{_esc(p.absent_reason or '')}</td></tr>"
        for p in shown
    )
    return [
        "<h2>Predictions to check</h2>",
        f'<p class="note">{head} Expected error and confidence come from the run\'s '
        "calibration (<code>calibration.json</code>); least confident first.</p>",
        '<table id="flagged"><tr><th>case</th><th>landmark</th><th>expected error (mm)</th>'
        "<th>confidence</th><th>true error (mm)</th><th>absent because</th></tr>"
        f"{rows}</table>",
    ]


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    overwrite: bool = False,
    n_worst: int = 3,
    flag_above: float = DEFAULT_FLAG_MM,
    pred_dirs: Sequence[str | Path] = (),
) -> ReportResult:
    """Write ``report.html`` and its figures for a run or cross-validation directory.

    Args:
        run_dir: the run (or ``landmark3d cv`` output) directory.
        out: the HTML file (default ``run_dir/report.html``); figures go to
            ``<out stem>_files/`` beside it.
        overwrite: replace an existing report.
        n_worst: number of worst cases shown as tri-planar slices.
        flag_above: expected error (mm) above which a prediction is listed first as one to
            check (calibrated runs; absent landmarks are always listed).
        pred_dirs: evaluated prediction directories of the run kept outside it (see
            :func:`~landmark3d.reporting.collect.load_report_data`).

    Returns:
        :class:`ReportResult`.

    Raises:
        Landmark3dError: nothing evaluated in ``run_dir`` (see
            :func:`~landmark3d.reporting.collect.load_report_data`).
        OutputExistsError: the report exists and not ``overwrite``.
    """
    root = Path(run_dir)
    html_path = Path(out) if out is not None else root / "report.html"
    check_writable(html_path, overwrite)
    data = load_report_data(root, pred_dirs)
    files = html_path.parent / f"{html_path.name.split('.')[0]}_files"
    files.mkdir(parents=True, exist_ok=True)
    summaries = {s: st.summary for s, st in data.stages.items()}
    errors = {s: st.errors for s, st in data.stages.items()}
    written: list[Path] = []
    body: list[str] = []

    kind = "cross-validation" if data.kind == "cv" else "held-out evaluation"
    body.append(f"<h1>landmark3d report — {_esc(root.name or root)}</h1>")
    body.append(
        f'<p class="note">{_esc(kind)} of <code>{_esc(root.resolve())}</code>; '
        f"landmark3d {_esc(__version__)}, {datetime.now().isoformat(timespec='seconds')}. "
        f"Numbers from {', '.join(f'<code>{_esc(_shown_path(p, root))}</code>' for p in data.source_json)}."
        "</p>"
    )
    if data.failed:
        items = "".join(f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in data.failed.items())
        body.append(f'<p class="fail">Failed (not in the tables):</p><ul>{items}</ul>')

    body += _flagged_section(data, flag_above)

    body.append("<h2>Summary</h2>")
    pooled = " (pooled over the folds)" if data.kind == "cv" else ""
    body.append(summary_table(summaries, f"All landmarks{pooled}").to_html("summary"))
    if data.per_fold:
        body.append(fold_table(data.per_fold).to_html("folds"))
    body.append("<h2>Per landmark</h2>")
    body.append(
        landmark_table(summaries, data.landmark_names, f"Per landmark{pooled}").to_html("landmarks")
    )

    body.append("<h2>Cumulative detection rate</h2>")
    png = figures.save_png(
        figures.sdr_curve_figure(errors, data.thresholds), files / "sdr_curve.png"
    )
    written.append(png)
    body.append(_img(png, files, "cumulative SDR curve"))
    body.append("<h2>Error per landmark</h2>")
    png = figures.save_png(figures.error_boxplot_figure(errors), files / "error_boxplots.png")
    written.append(png)
    body.append(_img(png, files, "per-landmark error box plots"))

    body.append(f"<h2>Worst cases ({n_worst})</h2>")
    body.append(
        '<p class="note">Axial, coronal and sagittal slices of the image reoriented to LPS, '
        "through each annotated landmark, drawn in millimetres (true aspect ratio). "
        f"<b>{CONVENTION.capitalize()} convention</b>: patient's right on the image's left "
        "(axial, coronal), anterior on the left (sagittal); letters at the edges give the "
        f"direction (R/L, A/P, S/I). {_esc(marker_legend(list(data.stages)))}. "
        "A prediction away from the slice is shown at its projection.</p>"
    )
    parts, pngs = _slice_figures(data, files, n_worst)
    written += pngs
    body += parts or ['<p class="note">no case to show.</p>']

    curves = _training_histories(data)
    body.append("<h2>Training curves</h2>")
    if curves:
        png = figures.save_png(figures.training_curves_figure(curves), files / "training.png")
        written.append(png)
        body.append(_img(png, files, "training loss and validation MRE per epoch"))
    else:
        body.append('<p class="note">no metrics.csv found.</p>')

    body.append("<h2>Configuration and data</h2>")
    for label, run in data.runs.items():
        rows = _plan_rows(run)
        if rows:
            if data.kind == "cv":
                body.append(f"<h3>{_esc(label)}</h3>")
            body.append(_kv_table(rows))
    if data.config is not None:
        text = json.dumps(data.config, indent=2)
        body.append(
            f"<details><summary>experiment config</summary><pre>{_esc(text)}</pre></details>"
        )

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>landmark3d report — {_esc(root.name)}</title><style>{CSS}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    atomic_write_text(html_path, page, overwrite=True)
    keep = {p.name for p in written}
    for old in files.glob("*.png"):  # figures of an earlier report that this one lacks
        if old.name not in keep:
            old.unlink()
    return ReportResult(html_path, files, written)
