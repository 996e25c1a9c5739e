"""Markdown rendering of a :func:`landmark3d.baselines.suite.run_suite` result."""

from __future__ import annotations

from typing import Any

import numpy as np

from landmark3d.baselines.suite import THRESHOLDS


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The table (one row per method) and the ratio lines, as markdown."""
    rows, meta = result["rows"], result["meta"]
    names = list(meta["landmarks"])
    head = (
        "| method | MRE (SD) mm | median | "
        + " | ".join(f"SDR@{t}" for t in THRESHOLDS)
        + " | "
        + " | ".join(names)
        + " | train s | inference s/case | inference / read | peak RSS MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sdr = " | ".join(_fmt(r["sdr_percent"].get(t), 1) for t in THRESHOLDS)
        per = " | ".join(_fmt(r["per_landmark_mre_mm"].get(n)) for n in names)
        lines.append(
            f"| {r['label']} | {r['mre_sd']} | {_fmt(r['median_mm'])} | {sdr} | {per} | "
            f"{_fmt(r['train_s'], 0)} | {_fmt(r['inference_s'])} | "
            f"{_fmt(r['inference_over_load'], 1)} | {_fmt(r['peak_rss_mb'], 0)} |"
        )
    ratios, targets = meta["ratios"], meta["targets"]

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    lines += [
        "",
        f"MRE ratios (same run): one-stage U-Net / full = "
        f"**{_fmt(ratios['mre_onestage_over_full'])}×** (target ≥ 3: "
        f"{verdict(targets['full_vs_onestage_at_least_3x'])}); coarse-only / full = "
        f"**{_fmt(ratios['mre_coarse_over_full'])}×** (target ≥ 2: "
        f"{verdict(targets['full_vs_coarse_at_least_2x'])}); atlas / full = "
        f"{_fmt(ratios['mre_atlas_over_full'])}×.",
        f"Time ratios: full / one-stage inference = "
        f"{_fmt(ratios['inference_full_over_onestage'])}, training = "
        f"{_fmt(ratios['train_full_over_onestage'])}; 'inference / read' = inference time over "
        "the time to read the same image (median of "
        f"{meta['repeat']} repeats per case, atlas {meta['atlas_repeat']}).",
        f"Peak RSS: peak resident set size (VmHWM) of a fresh process per job; reference (imports + reading the "
        f"images) {_fmt(meta['memory']['reference_peak_rss_mb'], 0)} MiB. Training time: sum "
        "of logged epoch times (atlas: preparing the atlases).",
    ]
    notes = [f"{r['label']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        lines.append("Notes: " + "; ".join(notes) + ".")
    lines.append(
        f"Held-out fold {meta['fold']} ({len(meta['test_cases'])} cases) of {meta['dataset']}. "
        f"Machine: {meta.get('machine', 'n/a')}. Command: `{meta.get('command', 'n/a')}`."
    )
    return "\n".join(lines) + "\n"
