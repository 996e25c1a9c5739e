"""Report figures (matplotlib, Agg backend): cumulative SDR, error box plots, training curves.

Inputs are plain data (per-instance errors in mm, metrics.csv rows), so the figures can be
tested without a trained model. Each ``*_figure`` function returns a matplotlib ``Figure``;
:func:`save_png` writes it atomically and closes it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from landmark3d.io.atomic import atomic_path
from landmark3d.reporting.tables import stage_label

STAGE_COLORS = {"coarse": "tab:orange", "fine": "tab:blue", "correlated": "tab:green"}
CURVE_MAX_MM = 10.0


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_color(stage: str, i: int = 0) -> str:
    """A fixed colour per stage (matplotlib cycle for unknown stages)."""
    return STAGE_COLORS.get(stage, f"C{(i + 3) % 10}")


@dataclass
class StageErrors:
    """Per-instance errors of one stage.

    Attributes:
        errors: shape (C, N) radial errors in mm, NaN where not evaluated.
        missing_prediction: shape (C, N) bool, truth present but no prediction (a failure).
        landmark_names: the N landmark names.
    """

    errors: NDArray[np.float64]
    missing_prediction: NDArray[np.bool_]
    landmark_names: list[str]


def cumulative_sdr(
    errors: NDArray[np.float64],
    missing_prediction: NDArray[np.bool_],
    distances: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Percentage of instances within each distance (mm): ``100 * #(e <= d) / (n + missing)``.

    Same definition as SDR in :mod:`landmark3d.metrics` (missing predictions are failures,
    missing truths are not counted), so the curve at d = 2 mm equals SDR@2.
    """
    values = errors[np.isfinite(errors)]
    denominator = values.size + int(np.sum(missing_prediction))
    if denominator == 0:
        return np.full(distances.shape, math.nan)
    srt = np.sort(values)
    counts = np.searchsorted(srt, distances + 1e-9, side="right")
    return np.asarray(100.0 * counts / denominator, dtype=np.float64)


def sdr_curve_figure(
    stages: Mapping[str, StageErrors], thresholds: Sequence[float], max_mm: float = CURVE_MAX_MM
) -> Any:
    """Cumulative SDR (% within d mm, d = 0..``max_mm``) per stage; thresholds marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    d = np.linspace(0.0, max_mm, 401)
    for i, (name, se) in enumerate(stages.items()):
        curve = cumulative_sdr(se.errors, se.missing_prediction, d)
        color = stage_color(name, i)
        finite = se.errors[np.isfinite(se.errors)]
        median = f" (median {np.median(finite):.1f} mm)" if finite.size else ""
        ax.plot(d, curve, color=color, label=stage_label(name) + median, linewidth=1.8)
        thr = np.asarray([t for t in thresholds if t <= max_mm], dtype=np.float64)
        at = cumulative_sdr(se.errors, se.missing_prediction, thr)
        ax.plot(thr, at, "o", color=color, markersize=4)
    for t in thresholds:
        if t <= max_mm:
            ax.axvline(t, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlim(0, max_mm)
    ax.set_ylim(0, 100)
    ax.set_xlabel("radial error d (mm)")
    ax.set_ylabel("landmark instances within d (%)")
    ax.set_title("Cumulative successful detection rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def error_boxplot_figure(stages: Mapping[str, StageErrors]) -> Any:
    """Per-landmark radial error box plots, one box per stage side by side (log-free, mm)."""
    plt = _pyplot()
    first = next(iter(stages.values()))
    names = first.landmark_names
    n_st = max(1, len(stages))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(names) * n_st + 1.5), 4.2))
    width = 0.8 / n_st
    for i, (stage, se) in enumerate(stages.items()):
        data = [se.errors[:, j][np.isfinite(se.errors[:, j])] for j in range(len(names))]
        positions = np.arange(len(names)) + (i - (n_st - 1) / 2) * width
        keep = [k for k, v in enumerate(data) if v.size]
        if not keep:
            continue
        color = stage_color(stage, i)
        bp = ax.boxplot(
            [data[k] for k in keep],
            positions=positions[keep],
            widths=width * 0.85,
            patch_artist=True,
            showfliers=True,
            flierprops={"markersize": 3, "markeredgecolor": color},
            medianprops={"color": "black"},
        )
        for box in bp["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.6)
        ax.plot([], [], "s", color=color, label=stage_label(stage))
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("radial error (mm)")
    ax.set_ylim(bottom=0)
    ax.set_title("Radial error per landmark")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a trainer ``metrics.csv`` as floats (empty cells skipped); [] if absent."""
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, float] = {}
            for k, v in raw.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


def training_curves_figure(histories: Mapping[str, Sequence[Mapping[str, float]]]) -> Any:
    """Train loss (log scale) and validation MRE per epoch.

    Args:
        histories: curve label (e.g. ``"coarse"``, ``"fold1 fine"``) -> metrics.csv rows with
            ``epoch``, ``train_loss`` and (on validation epochs) ``val_mre_mm``.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for i, (label, rows) in enumerate(histories.items()):
        stage = label.split()[-1]
        color = stage_color(stage, i) if len(histories) <= 3 else f"C{i % 10}"
        ep = [r["epoch"] for r in rows if "train_loss" in r]
        loss = [r["train_loss"] for r in rows if "train_loss" in r]
        ax_loss.plot(ep, loss, "-", marker=".", color=color, label=label)
        vep = [r["epoch"] for r in rows if "val_mre_mm" in r]
        val = [r["val_mre_mm"] for r in rows if "val_mre_mm" in r]
        ax_val.plot(vep, val, "-", marker="o", markersize=3, color=color, label=label)
    if any(r.get("train_loss", 0) > 0 for rows in histories.values() for r in rows):
        ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    ax_loss.set_xlabel("epoch")
    ax_val.set_title("validation MRE (mm)")
    ax_val.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if histories:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_png(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG to ``path`` (atomically) and close it."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
