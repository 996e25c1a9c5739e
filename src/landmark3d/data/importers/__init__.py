"""Importers: public datasets and other layouts in, a ``dataset.json`` spec out (and back).

* :mod:`landmark3d.data.importers.pddca` — the PDDCA head-and-neck CT collection (per patient
  ``img.nrrd`` + a Slicer ``.fcsv`` of five bony landmarks) → ``dataset.json`` with normalised
  landmark names, a checked coordinate system, a skip report and a deterministic K-fold split.
* :mod:`landmark3d.data.importers.layout` — the original method's ``images/`` + ``setup/``
  layout → ``dataset.json`` and back, losslessly.
"""

from landmark3d.data.importers.layout import export_layout, import_layout
from landmark3d.data.importers.pddca import (
    PDDCA_LANDMARKS,
    PddcaImport,
    import_pddca,
    make_folds,
    normalise_landmark_name,
)

__all__ = [
    "PDDCA_LANDMARKS",
    "PddcaImport",
    "export_layout",
    "import_layout",
    "import_pddca",
    "make_folds",
    "normalise_landmark_name",
]
