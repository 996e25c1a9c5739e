"""Result tables in the paper's form: MRE (SD) in mm and SDR@2/2.5/3/4/8 mm in percent.

Tables are built from *summary dicts* — the ``Summary.to_dict()`` form found in
``metrics.json`` (``"summary"``) and ``cv.json`` (``"pooled"``, ``"folds"``) — and rendered as
Markdown (``cv.md``) or HTML (``report.html``). Every numeric HTML cell carries the exact
numbers it shows in a ``data-metric`` attribute (JSON), so a test can check the page against
the JSON it came from. This module imports neither torch nor matplotlib.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STAGE_LABELS: dict[str, str] = {
    "coarse": "coarse only",
    "fine": "coarse + fine",
    "correlated": "coarse + fine + correlated",
}
"""Human names of the evaluated stages (any other stage name is shown as it is)."""


def stage_label(stage: str) -> str:
    """``"fine"`` -> ``"coarse + fine"``; unknown names unchanged."""
    return STAGE_LABELS.get(stage, stage)


def fmt_mm(value: float | None) -> str:
    """A distance in mm with 2 decimals; ``—`` for a missing value (None/NaN)."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.2f}"


def fmt_pct(value: float | None) -> str:
    """A percentage with 1 decimal; ``—`` for a missing value."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.1f}"


@dataclass
class Cell:
    """One table cell.

    Attributes:
        text: what is shown.
        metrics: the numbers shown, each ``{"stage", "scope", "field", "value"}`` (plus
            ``"sdr"`` = threshold key for SDR, ``"fold"`` for per-fold tables); ``scope`` is
            ``"all"`` or a landmark name. Empty for text cells.
        header: render as a row header.
        rowspan: HTML rowspan (Markdown repeats nothing: the following rows show "").
    """

    text: str
    metrics: list[dict[str, Any]] = field(default_factory=list)
    header: bool = False
    rowspan: int = 1


@dataclass
class Table:
    """A titled table: column names and rows of :class:`Cell` (spanned cells omitted)."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    note: str = ""

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown (spanned cells repeated as empty cells)."""
        lines = [f"### {self.title}", ""] if self.title else []
        lines.append("| " + " | ".join(self.columns) + " |")
        text_columns = {"stage", "landmark", "fold"}
        lines.append(
            "|"
            + "|".join(
                "---" if i == 0 or c in text_columns else "---:" for i, c in enumerate(self.columns)
            )
            + "|"
        )
        pending: dict[int, int] = {}  # column -> rows still covered by a rowspan above
        for row in self.rows:
            cells: list[str] = []
            it = iter(row)
            for col in range(len(self.columns)):
                if pending.get(col, 0) > 0:
                    pending[col] -= 1
                    cells.append("")
                    continue
                cell = next(it)
                if cell.rowspan > 1:
                    pending[col] = cell.rowspan - 1
                cells.append(f"**{cell.text}**" if cell.header and col == 0 else cell.text)
            lines.append("| " + " | ".join(cells) + " |")
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def to_html(self, table_id: str = "") -> str:
        """An HTML ``<table>``; numeric cells carry ``data-metric`` (JSON list)."""
        ident = f' id="{html.escape(table_id)}"' if table_id else ""
        out = [f"<table{ident}>"]
        if self.title:
            out.append(f"<caption>{html.escape(self.title)}</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in self.columns))
        out.append("</tr></thead><tbody>")
        for row in self.rows:
            parts = []
            for cell in row:
                tag = "th" if cell.header else "td"
                attrs = f' rowspan="{cell.rowspan}"' if cell.rowspan > 1 else ""
                if cell.metrics:
                    payload = json.dumps(cell.metrics, allow_nan=False)
                    attrs += f' class="num" data-metric="{html.escape(payload, quote=True)}"'
                parts.append(f"<{tag}{attrs}>{html.escape(cell.text)}</{tag}>")
            out.append("<tr>" + "".join(parts) + "</tr>")
        out.append("</tbody></table>")
        if self.note:
            out.append(f'<p class="note">{html.escape(self.note)}</p>')
        return "\n".join(out)


# ----------------------------------------------------------------------------- cells
def _metric(
    stage: str, scope: str, fld: str, value: Any, fold: str | None, sdr: str | None = None
) -> dict[str, Any]:
    m: dict[str, Any] = {"stage": stage, "scope": scope, "field": fld, "value": value}
    if sdr is not None:
        m["sdr"] = sdr
    if fold is not None:
        m["fold"] = fold
    return m


def _number_cells(
    d: Mapping[str, Any],
    stage: str,
    scope: str,
    thresholds: Sequence[str],
    fold: str | None = None,
    counts: bool = True,
) -> list[Cell]:
    """n [missing], MRE (SD), median, SDR@t... of one summary dict."""

    def m(fld: str, sdr: str | None = None) -> dict[str, Any]:
        value = d["sdr"].get(sdr) if sdr is not None else d.get(fld)
        return _metric(stage, scope, fld, value, fold, sdr)

    cells: list[Cell] = []
    if counts:
        n_field = "n_evaluated" if scope == "all" else "n"
        cells.append(Cell(str(d.get(n_field)), [m(n_field)]))
        cells.append(Cell(str(d.get("n_missing_prediction")), [m("n_missing_prediction")]))
    cells.append(Cell(f"{fmt_mm(d.get('mre'))} ({fmt_mm(d.get('sd'))})", [m("mre"), m("sd")]))
    cells.append(Cell(fmt_mm(d.get("median")), [m("median")]))
    cells.append(Cell(fmt_mm(d.get("max")), [m("max")]))
    cells += [Cell(fmt_pct(d["sdr"].get(t)), [m("sdr", t)]) for t in thresholds]
    return cells


def threshold_keys(summary: Mapping[str, Any]) -> list[str]:
    """The SDR threshold keys of a summary dict, in order (``["2", "2.5", ...]``)."""
    return list(summary.get("sdr", {}).keys())


def _metric_columns(thresholds: Sequence[str], counts: bool = True) -> list[str]:
    head = ["n", "missing"] if counts else []
    return [*head, "MRE (SD) mm", "median mm", "max mm", *(f"SDR@{t} mm %" for t in thresholds)]


# ----------------------------------------------------------------------------- tables
def summary_table(summaries: Mapping[str, Mapping[str, Any]], title: str = "Summary") -> Table:
    """One row per stage: ``{stage: summary dict}`` -> table (all landmarks together)."""
    if not summaries:
        return Table(title, ["stage"], [], note="no evaluated stage")
    thr = threshold_keys(next(iter(summaries.values())))
    rows = [
        [Cell(stage_label(s), header=True), *_number_cells(d, s, "all", thr)]
        for s, d in summaries.items()
    ]
    return Table(
        title,
        ["stage", *_metric_columns(thr)],
        rows,
        note="MRE (SD): mean radial error and sample SD over evaluated landmark instances; "
        "SDR@r: % of instances within r mm, missing predictions counted as failures.",
    )


def landmark_table(
    summaries: Mapping[str, Mapping[str, Any]],
    landmark_names: Sequence[str] | None = None,
    title: str = "Per landmark",
) -> Table:
    """Rows landmark x stage (landmark cell spanning its stages), plus an ``all`` block."""
    if not summaries:
        return Table(title, ["landmark"], [], note="no evaluated stage")
    first = next(iter(summaries.values()))
    thr = threshold_keys(first)
    names = list(landmark_names or first.get("per_landmark", {}).keys())
    rows: list[list[Cell]] = []
    for name in names:
        for i, (s, d) in enumerate(summaries.items()):
            per = d.get("per_landmark", {}).get(name)
            if per is None:
                continue
            lead = [Cell(name, header=True, rowspan=len(summaries))] if i == 0 else []
            rows.append([*lead, Cell(stage_label(s)), *_number_cells(per, s, name, thr)])
    for i, (s, d) in enumerate(summaries.items()):
        lead = [Cell("all", header=True, rowspan=len(summaries))] if i == 0 else []
        rows.append([*lead, Cell(stage_label(s)), *_number_cells(d, s, "all", thr)])
    return Table(title, ["landmark", "stage", *_metric_columns(thr)], rows)


def fold_table(
    per_fold: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str = "Per fold"
) -> Table:
    """``{fold: {stage: summary dict}}`` -> rows fold x stage."""
    folds = {k: v for k, v in per_fold.items() if v}
    if not folds:
        return Table(title, ["fold"], [], note="no complete fold")
    first = next(iter(next(iter(folds.values())).values()))
    thr = threshold_keys(first)
    rows: list[list[Cell]] = []
    for fold, stages in folds.items():
        for i, (s, d) in enumerate(stages.items()):
            lead = [Cell(fold, header=True, rowspan=len(stages))] if i == 0 else []
            rows.append([*lead, Cell(stage_label(s)), *_number_cells(d, s, "all", thr, fold)])
    return Table(title, ["fold", "stage", *_metric_columns(thr)], rows)


def resolve_metric(summary: Mapping[str, Any], metric: Mapping[str, Any]) -> Any:
    """The number a cell's ``metric`` entry points to inside a summary dict (for checks)."""
    d = summary if metric["scope"] == "all" else summary["per_landmark"][metric["scope"]]
    if metric["field"] == "sdr":
        return d["sdr"][metric["sdr"]]
    return d[metric["field"]]
