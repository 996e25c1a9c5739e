"""Datasets: the spec (``dataset.json`` or the original method's layout), folds, verification.

* :mod:`landmark3d.data.dataset` — :class:`~landmark3d.data.dataset.Dataset`,
  :class:`~landmark3d.data.dataset.CaseSpec`, :func:`~landmark3d.data.dataset.load_dataset`,
  :func:`~landmark3d.data.dataset.write_dataset_spec`.
* :mod:`landmark3d.data.original_layout` — the original method's ``images/`` + ``setup/`` layout.
* :mod:`landmark3d.data.verify` — :func:`~landmark3d.data.verify.verify_dataset`, a report of
  every problem in a dataset with what to do about it.

Both layouts are described in ``docs/dataset_format.md``.
"""
