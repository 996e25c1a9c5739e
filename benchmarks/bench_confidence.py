"""Benchmark of per-landmark confidence and of the absence decision (``make bench``).

What it does, on this machine's CPU:

1. generates the phantom (30 cases, seed 0) and a cropped copy of it in which 40 % of the cases
   lose the inferior 25-40 % of the image (``landmark3d.data.crop``), so that ``chin`` and
   ``odont_proc`` fall outside the field of view;
2. trains a run on the cropped copy (config ``phantom_demo``, held-out fold 0); training ends
   with the calibration on the run's validation cases (``RUN/calibration.json``);
3. predicts the held-out cases — fold 0 of the run, and ``--extra-cases`` (30) new phantom
   heads of another seed, cropped the same way, that neither training nor calibration saw —
   and measures, on each set and on both together, over landmarks whose truth lies in the
   image and that were predicted present:
   * Spearman's rank correlation between confidence (and expected error) and the true error;
   * the MRE of the 90 % most confident predictions vs. all;
   * the share of the errors above 4 mm among the 10 % least confident (target >= 50 %);
   and over all held-out landmarks the precision/recall of the absence decision (positives:
   truth outside the image).

Two confidence models are compared on the same predictions: the default one, fitted with the
test-time-augmentation spread (``tta_spread_mm``), and its TTA-free refit (what
``predict --no-tta`` uses, and what the calibration was before TTA became the default); the
coordinates do not depend on TTA, so rescoring the same predictions is exactly a ``--no-tta``
run. The prediction time per case with and without TTA is measured side by side on fold 0.

With ``--run RUN`` an existing run is used instead (no training; it is calibrated first if it
has no ``calibration.json`` or one fitted without TTA, or with ``--recalibrate``): confidence on its own test cases, absence on cropped copies of
those cases (decision forced on). ``--smoke`` runs a few-second version (9 small cases, tiny
networks, 2 epochs) to check that the script works; its numbers mean nothing.

Writes ``benchmarks/results/<date>-confidence.json`` and ``.md`` (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landmark3d.config import apply_overrides, load_config
from landmark3d.data.crop import crop_dataset
from landmark3d.data.dataset import Dataset, load_dataset
from landmark3d.data.phantom import generate_phantom
from landmark3d.engine.calibrate import calibrate_run
from landmark3d.engine.run import train_run
from landmark3d.inference.confidence import Calibration, load_calibration, rank_correlation
from landmark3d.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parent
THRESHOLD_MM = 4.0
EXTRA_SEED = 11
"""Seed of the extra held-out phantom heads (the training phantom uses seed 0)."""
RAW_SCORES = ("heatmap_peak", "heatmap_spread_mm", "coarse_fine_shift_mm", "tta_spread_mm")
SMOKE_OVERRIDES = (
    "coarse.epochs=2", "fine.epochs=2", "correlated.epochs=2", "coarse.widths=[4,4,8,8]",
    "coarse.layers=[1,1,1,1]", "coarse.grid=[32,32,32]", "coarse.val_every=1",
    "fine.channels=[4,8]", "fine.patch_size=[16,16,16]", "fine.val_every=1",
    "correlated.channels=[4,8]", "correlated.val_every=1",
)  # fmt: skip


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def _collect(
    predictor: Predictor, ds: Dataset, ids: list[str], held_out: str = "fold 0"
) -> list[dict[str, Any]]:
    """One record per held-out case x annotated landmark (``set`` names the held-out set)."""
    records = []
    fallback = predictor.calibration.for_prediction(False) if predictor.calibration else None
    for cid in ids:
        image = ds.read_image(cid)
        pred = predictor.predict(image)
        truth = ds.read_landmarks(cid).subset(predictor.landmark_names)
        assert pred.geometry is not None
        outside = ~pred.geometry.contains_world(truth.coords)
        ls = pred.landmarks
        for row, name in enumerate(ls.names):
            if not truth.present[row]:
                continue
            ex = ls.extras.get(name, {})
            present = bool(ls.present[row])
            err = float(np.linalg.norm(ls.coords[row] - truth.coords[row])) if present else math.nan
            record = {
                "set": held_out, "case": cid, "landmark": name,
                "truth_outside": bool(outside[row]), "absent": not present, "error_mm": err,
                "confidence": _num(ex.get("confidence")),
                "expected_error_mm": _num(ex.get("expected_error_mm")),
                "p_error_gt_4mm": _num(ex.get("p_error_gt_4mm")),
                "beyond_image_mm": _num(ex.get("beyond_image_mm")),
                **{k: _num(ex.get(k)) for k in RAW_SCORES},
            }  # fmt: skip
            record.update(_rescored(fallback, ex, present))
            records.append(record)
    return records


def _rescored(cal: Calibration | None, extras: dict[str, Any], present: bool) -> dict[str, float]:
    """The TTA-free model's confidence fields for one landmark (NaN if absent/uncalibrated)."""
    if cal is None or not present:
        return {"confidence_no_tta": math.nan, "expected_error_mm_no_tta": math.nan}
    fields: dict[str, Any] = {k: v for k, v in extras.items() if k not in ("tta_spread_mm",)}
    cal.annotate(fields)
    return {
        "confidence_no_tta": float(fields["confidence"]),
        "expected_error_mm_no_tta": float(fields["expected_error_mm"]),
    }


def confidence_metrics(records: list[dict[str, Any]], suffix: str = "") -> dict[str, Any]:
    """Ranking quality of the confidence over present predictions of landmarks in the image.

    ``suffix`` "" scores with the run's calibration (TTA), "_no_tta" with its TTA-free refit.
    """
    ckey, ekey = "confidence" + suffix, "expected_error_mm" + suffix
    rows = [
        r for r in records if not r["truth_outside"] and not r["absent"] and math.isfinite(r[ckey])
    ]
    if not rows:
        return {"n": 0}
    err = np.array([r["error_mm"] for r in rows])
    conf = np.array([r[ckey] for r in rows])
    expected = np.array([r[ekey] for r in rows])
    order = np.lexsort((expected, -conf))  # most confident first; ties: smaller expected error
    n = len(rows)
    keep = max(1, math.ceil(0.9 * n))
    worst = order[n - max(1, math.ceil(0.1 * n)) :]
    big = err > THRESHOLD_MM
    raw = {k: rank_correlation([r[k] for r in rows], err) for k in RAW_SCORES}
    share = float(big[worst].sum() / big.sum()) if big.any() else math.nan
    return {
        "n": n,
        "spearman_confidence_error": rank_correlation(conf, err),
        "spearman_expected_error": rank_correlation(expected, err),
        "spearman_raw_scores": raw,
        "mre_all_mm": float(err.mean()),
        "mre_90pct_most_confident_mm": float(err[order[:keep]].mean()),
        "n_errors_above_4mm": int(big.sum()),
        "n_of_them_in_least_confident_10pct": int(big[worst].sum()),
        "share_of_errors_above_4mm_in_least_confident_10pct": share,
        "target_met": bool(share >= 0.5) if math.isfinite(share) else None,
        "mean_expected_error_mm": float(np.nanmean(expected)),
        "observed_rate_above_4mm": float(big.mean()),
        "mean_p_error_gt_4mm": float(np.nanmean([r["p_error_gt_4mm"] for r in rows])),
    }


def confidence_table(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Metrics per held-out set and for all of them, with TTA and without (the baseline)."""
    sets = list(dict.fromkeys(r["set"] for r in records))
    groups = {name: [r for r in records if r["set"] == name] for name in sets}
    if len(sets) > 1:
        groups["all held-out"] = records
    out = {}
    for name, rows in groups.items():
        out[f"{name}, without TTA"] = confidence_metrics(rows, "_no_tta")
        out[f"{name}, with TTA"] = confidence_metrics(rows)
    return out


def absence_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Precision/recall of "absent" against "truth outside the image"."""
    truth = np.array([r["truth_outside"] for r in records], dtype=bool)
    said = np.array([r["absent"] for r in records], dtype=bool)
    tp, fp, fn = int((truth & said).sum()), int((~truth & said).sum()), int((truth & ~said).sum())
    return {
        "n_landmarks": len(records),
        "n_truth_outside": int(truth.sum()),
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
    }


def _clean(v: Any) -> Any:
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _markdown(
    table: dict[str, dict[str, Any]], absence: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> str:
    cols = list(table)
    held = ", ".join(f"{k}: {len(v)} cases" for k, v in meta["held_out_cases"].items())
    lines = [
        f"# Confidence and absence benchmark ({meta['date']})",
        "",
        f"Command: `{meta['command']}`; {meta['machine']}; run `{meta['run']}`; held out: {held}"
        + (" — SMOKE MODE: tiny networks, numbers are meaningless." if meta["smoke"] else "."),
        "",
        "## Confidence (held-out landmarks inside the image, predicted present)",
        "",
        '"without TTA" is the calibration\'s TTA-free refit (`predict --no-tta`), scored on the '
        'same predictions; "with TTA" adds the test-time-augmentation spread (the default).',
        "",
        "| metric | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]

    def row(label: str, get: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(get(table[c]) for c in cols) + " |")

    row("predictions", lambda m: str(m.get("n", 0)))
    row(
        "Spearman(confidence, error) (want < 0)", lambda m: _fmt(m.get("spearman_confidence_error"))
    )
    row(
        "Spearman(expected error, error) (want > 0)",
        lambda m: _fmt(m.get("spearman_expected_error")),
    )
    row("MRE all (mm)", lambda m: _fmt(m.get("mre_all_mm")))
    row("MRE 90 % most confident (mm)", lambda m: _fmt(m.get("mre_90pct_most_confident_mm")))
    row("errors > 4 mm", lambda m: _fmt(m.get("n_errors_above_4mm")))
    row(
        "of them in the least confident 10 %",
        lambda m: _fmt(m.get("n_of_them_in_least_confident_10pct")),
    )
    row(
        "**share in the least confident 10 % (target >= 0.50)**",
        lambda m: _fmt(m.get("share_of_errors_above_4mm_in_least_confident_10pct")),
    )
    row("mean expected error (mm)", lambda m: _fmt(m.get("mean_expected_error_mm")))
    row(
        "mean P(error > 4 mm) vs observed rate",
        lambda m: (
            f"{_fmt(m.get('mean_p_error_gt_4mm'))} vs {_fmt(m.get('observed_rate_above_4mm'))}"
        ),
    )
    for k in RAW_SCORES:
        row(f"Spearman({k}, error)", lambda m, k=k: _fmt(m.get("spearman_raw_scores", {}).get(k)))
    t = meta["seconds_per_case"]
    lines += [
        "",
        f"Prediction time per case on fold 0 (mean of {t['cases']}): without TTA "
        f"{_fmt(t['without_tta'])} s, with TTA {_fmt(t['with_tta'])} s "
        f"(ratio {_fmt(t['ratio'])}).",
        "",
        f"## Absence ({meta['absence_on']}; margin {meta['absence_margin_mm']} mm; flat "
        f"heatmap above {_fmt(meta['flat_spread_mm'], 1)} mm)",
        "",
        "| held-out scans | landmarks | truth outside | TP | FP | FN | precision | recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in absence.items():
        lines.append(
            f"| {name} | {a['n_landmarks']} | {a['n_truth_outside']} | {a['true_positives']} "
            f"| {a['false_positives']} | {a['false_negatives']} "
            f"| {_fmt(a['precision'])} | {_fmt(a['recall'])} |"
        )
    lines.append("")
    return "\n".join(lines)


def _seconds_per_case(run: Path, ds: Dataset, ids: list[str]) -> dict[str, Any]:
    """Mean prediction time (s/case) of ``ids`` without and with TTA, measured side by side."""
    out: dict[str, Any] = {"cases": len(ids)}
    for key, tta in (("without_tta", False), ("with_tta", True)):
        predictor = Predictor(run, device="cpu", tta=tta)
        images = [ds.read_image(c) for c in ids]
        t0 = time.perf_counter()
        for image in images:
            predictor.predict(image)
        out[key] = (time.perf_counter() - t0) / max(len(ids), 1)
    out["ratio"] = out["with_tta"] / out["without_tta"] if out["without_tta"] else math.nan
    return out


def _extra_held_out(work: Path, n: int, size: int, crop_fraction: float) -> Dataset:
    """``n`` new phantom heads (seed :data:`EXTRA_SEED`), cropped like the training data."""
    phantom = generate_phantom(work / "extra-phantom", n_cases=n, seed=EXTRA_SEED, size=size)
    spec = crop_dataset(phantom, work / "extra-cropped", fraction=crop_fraction, seed=EXTRA_SEED)
    return load_dataset(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="reuse a trained run directory")
    parser.add_argument("--recalibrate", action="store_true", help="with --run: refit first")
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--extra-cases", type=int, default=30, help="new held-out heads (0: none)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--crop-fraction", type=float, default=0.4)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--config", default="phantom_demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--smoke", action="store_true", help="tiny settings; checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.size = min(args.cases, 9), min(args.size, 48)
        args.extra_cases = min(args.extra_cases, 3)
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
    work: Path = args.work or ROOT / ".work" / ("confidence-smoke" if args.smoke else "confidence")
    torch.set_num_threads(2)
    if args.run is not None and args.run.resolve().is_relative_to(work.resolve()):
        parser.error(f"--run {args.run} lies inside --work {work}, which is wiped; pass --work")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    if args.run is None:
        phantom = generate_phantom(work / "phantom", n_cases=args.cases, seed=0, size=args.size)
        spec = crop_dataset(phantom, work / "cropped", fraction=args.crop_fraction, seed=0)
        ds = load_dataset(spec)
        cfg = apply_overrides(load_config(args.config), args.overrides)
        result = train_run(ds, cfg, work / "run", fold=0, progress=False)
        run, test_ids = result.run_dir, result.split.test
        predictor = Predictor(run, device="cpu")
        records = _collect(predictor, ds, test_ids)
        absence_records = records
    else:
        run = args.run
        cal = load_calibration(run)
        if args.recalibrate or cal is None or not cal.tta:
            print(f"calibrating {run} with TTA (writes {run / 'calibration.json'})", flush=True)
            calibrate_run(run, device="cpu", tta=True)
        split = json.loads((run / "split.json").read_text(encoding="utf-8"))
        ds, test_ids = load_dataset(split["dataset"]), list(split["test"])
        predictor = Predictor(run, device="cpu")
        records = _collect(predictor, ds, test_ids)
        spec = crop_dataset(ds, work / "cropped", fraction=1.0, seed=0)
        forced = Predictor(run, device="cpu", absence=True)
        absence_records = _collect(forced, load_dataset(spec), test_ids)
        predictor = forced
    held_out = {"fold 0": list(test_ids)}
    if args.extra_cases > 0:
        extra = _extra_held_out(work, args.extra_cases, args.size, args.crop_fraction)
        held_out[f"new heads (seed {EXTRA_SEED})"] = extra.case_ids
        records = records + _collect(
            Predictor(run, device="cpu"), extra, extra.case_ids, f"new heads (seed {EXTRA_SEED})"
        )
    timing = _seconds_per_case(run, ds, list(test_ids))
    seconds = time.perf_counter() - t0
    table = confidence_table(records)
    fold_scans = "fold 0, every scan cropped" if args.run is not None else "fold 0"
    absence = {fold_scans: absence_metrics(absence_records)}
    extra_records = [r for r in records if r["set"] != "fold 0"]
    if extra_records:
        absence[f"new heads (seed {EXTRA_SEED}), {args.crop_fraction:.0%} cropped"] = (
            absence_metrics(extra_records)
        )
    cal = predictor.calibration
    fitted = load_calibration(run)
    meta = {
        "date": dt.date.today().isoformat(),
        "smoke": bool(args.smoke),
        "run": str(run),
        "cases": args.cases,
        "size": args.size,
        "crop_fraction": args.crop_fraction if args.run is None else 1.0,
        "test_cases": list(test_ids),
        "held_out_cases": held_out,
        "calibration": fitted.to_dict() if fitted is not None else None,
        "absence_on": "absence decision on" if predictor.absence else "absence decision off",
        "absence_margin_mm": predictor.absence_margin_mm,
        "flat_spread_mm": predictor.flat_spread_mm,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "command": "python benchmarks/bench_confidence.py " + " ".join(sys.argv[1:]),
        "seconds": seconds,
        "seconds_per_case": timing,
        "scored_with_tta": bool(cal is not None and cal.tta),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-confidence"
    payload = {"meta": meta, "confidence": table, "absence": absence, "records": records}
    if absence_records is not records:
        payload["absence_records"] = absence_records
    stem.with_suffix(".json").write_text(json.dumps(_clean(payload), indent=2) + "\n")
    md = _markdown(table, absence, meta)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
