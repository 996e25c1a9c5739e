"""Baselines the benchmark suite compares the method with.

* :mod:`landmark3d.baselines.onestage` — one-stage 3D U-Net heatmap regression on the whole
  downsampled volume (the paper's "3D U-Net" row);
* :mod:`landmark3d.baselines.atlas` — multi-atlas affine (mutual information) registration with
  median fusion (no torch);
* :mod:`landmark3d.baselines.suite` — running every method on one split (``bench_suite.py``);
  :mod:`landmark3d.baselines.suite_report` renders its markdown table.

Submodules are imported explicitly (the atlas baseline does not need torch).
"""
