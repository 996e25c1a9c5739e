"""Result reporting: tables in the paper's form, figures and the HTML report.

* :mod:`~landmark3d.reporting.tables` — summary / per-landmark / per-fold tables (Markdown,
  HTML); no plotting dependency.
* :mod:`~landmark3d.reporting.figures` — cumulative SDR curve, error box plots, training curves.
* :mod:`~landmark3d.reporting.slices` — tri-planar slices with truth and predictions marked.
* :mod:`~landmark3d.reporting.collect` — reading a run or cross-validation directory.
* :mod:`~landmark3d.reporting.html` — :func:`build_report` writing ``report.html``.
"""
