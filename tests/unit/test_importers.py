"""Importers: PDDCA trees (coordinate systems, label variants, skips, folds), the original layout
both ways (lossless), and a dataset case whose image is a DICOM series directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.config import load_config
from landmark3d.data.dataset import load_dataset
from landmark3d.data.importers import (
    PDDCA_LANDMARKS,
    export_layout,
    import_layout,
    import_pddca,
    make_folds,
    normalise_landmark_name,
)
from landmark3d.data.importers.pddca import CORRELATED_GROUPS
from landmark3d.data.verify import verify_dataset
from landmark3d.errors import DatasetError, OutputExistsError
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.io.images import read_image

# Image: 20 x 20 x 16 voxels, spacing 2 x 2 x 2.5 mm, origin (10, 30, -60): LPS x in [10, 48],
# y in [30, 68], z in [-60, -22.5]. Every point below is inside; its RAS twin (-x, -y) is not.
ORIGIN = (10.0, 30.0, -60.0)
TRUTH = {
    "chin": (28.25, 35.5, -50.0),
    "mand_l": (45.0, 55.125, -30.0),
    "mand_r": (15.5, 55.0, -30.75),
    "odont_proc": (30.0, 60.0, -40.0),
    "occ_bone": (30.5, 66.0, -35.0),
}
SLICER_LABELS = {
    "chin": "Chin",
    "mand_l": "Mand_L",
    "mand_r": "Mand_R",
    "odont_proc": "Odont_Proc",
    "occ_bone": "Occ_Bone",
}


def write_nrrd(path: Path, origin: tuple[float, float, float] = ORIGIN) -> None:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, (16, 20, 20)).astype(np.int16))
    image.SetSpacing((2.0, 2.0, 2.5))
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def write_fcsv(
    path: Path,
    points: dict[str, tuple[float, float, float]],
    header: str | None,
    numbers: str,
    labels: dict[str, str] | None = None,
) -> None:
    """A Slicer 4.x style .fcsv; ``header`` = the CoordinateSystem value (None: no header
    lines at all); ``numbers`` = the system the coordinates are actually written in."""
    lines = []
    if header is not None:
        lines += [
            "# Markups fiducial file version = 4.6",
            f"# CoordinateSystem = {header}",
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
        ]
    for i, (name, (x, y, z)) in enumerate(points.items(), 1):
        if numbers == "RAS":
            x, y = -x, -y
        label = (labels or {}).get(name, name)
        lines.append(
            f"vtkMRMLMarkupsFiducialNode_{i},{x!r},{y!r},{z!r},0,0,0,1,1,1,0,{label},,vtkMRMLScalarVolumeNode1"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def build_pddca_tree(src: Path) -> Path:
    """A PDDCA-like tree in two parts, with every kind of patient the importer must handle."""
    p1, p2 = src / "PDDCA-1.4.1_part1", src / "PDDCA-1.4.1_part2"
    # good: Slicer code 0 (RAS), Slicer-style capitalised labels
    write_nrrd(p1 / "0522c0001" / "img.nrrd")
    write_fcsv(p1 / "0522c0001" / "Landmarks_0001.fcsv", TRUTH, "0", "RAS", SLICER_LABELS)
    write_nrrd(p1 / "0522c0001" / "structures" / "Mandible.nrrd")  # ignored
    # good: LPS stated
    write_nrrd(p1 / "0522c0002" / "img.nrrd")
    write_fcsv(p1 / "0522c0002" / "Landmarks_0002.fcsv", TRUTH, "LPS", "LPS")
    # good: no header at all -> RAS (Slicer's default)
    write_nrrd(p1 / "0522c0003" / "img.nrrd")
    write_fcsv(p1 / "0522c0003" / "lm.fcsv", TRUTH, None, "RAS")
    # skipped: mand_r missing
    write_nrrd(p2 / "0522c0004" / "img.nrrd")
    partial = {k: v for k, v in TRUTH.items() if k != "mand_r"}
    write_fcsv(p2 / "0522c0004" / "Landmarks_0004.fcsv", partial, "0", "RAS")
    # skipped: no fcsv
    write_nrrd(p2 / "0522c0005" / "img.nrrd")
    write_nrrd(p2 / "0522c0005" / "structures" / "BrainStem.nrrd")
    # skipped in 'stated' mode: header says LPS, numbers are RAS
    write_nrrd(p2 / "0522c0006" / "img.nrrd")
    write_fcsv(p2 / "0522c0006" / "Landmarks_0006.fcsv", TRUTH, "1", "RAS")
    # skipped: unreadable image
    (p2 / "0522c0007").mkdir(parents=True)
    (p2 / "0522c0007" / "img.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    write_fcsv(p2 / "0522c0007" / "Landmarks_0007.fcsv", TRUTH, "0", "RAS")
    # good: "RAS" spelled out, anatomical label variants, another origin
    shift = np.array([100.0, -50.0, 20.0])
    moved = {k: tuple((np.array(v) + shift).tolist()) for k, v in TRUTH.items()}
    write_nrrd(p2 / "0522c0008" / "img.nrrd", tuple((np.array(ORIGIN) + shift).tolist()))
    variants = {
        "chin": "menton",
        "mand_l": "left condyle",
        "mand_r": "Condyle R",
        "odont_proc": "Odontoid Process",
        "occ_bone": "occipital",
    }
    write_fcsv(p2 / "0522c0008" / "Landmarks_0008.fcsv", moved, "RAS", "RAS", variants)
    return src


@pytest.fixture(scope="module")
def pddca_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pddca_tree(tmp_path_factory.mktemp("pddca") / "PDDCA")


def _truth(cid: str) -> np.ndarray:
    pts = np.array([TRUTH[n] for n in PDDCA_LANDMARKS])
    return pts + (np.array([100.0, -50.0, 20.0]) if cid == "0522c0008" else 0.0)


# ---------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("label", "name"),
    [
        ("chin", "chin"),
        ("Chin", "chin"),
        ("menton", "chin"),
        ("Mand_L", "mand_l"),
        ("mandL", "mand_l"),
        ("left condyle", "mand_l"),
        ("L_condyloid_process", "mand_l"),
        ("Mandible_Right", "mand_r"),
        ("rmand", "mand_r"),
        ("odont_proc", "odont_proc"),
        ("Odontoid Process", "odont_proc"),
        ("dens", "odont_proc"),
        ("Occ-Bone", "occ_bone"),
        ("occipital", "occ_bone"),
        ("mandible", None),  # no side
        ("mand_l_r", None),  # both sides
        ("nasion", None),
    ],
)
def test_label_variants_map_to_the_papers_names(label: str, name: str | None) -> None:
    assert normalise_landmark_name(label) == name


def test_user_label_map_comes_first() -> None:
    assert normalise_landmark_name("LM 1", {"lm 1": "chin"}) == "chin"
    assert normalise_landmark_name("menton", {"Menton": "occ_bone"}) == "occ_bone"


# ---------------------------------------------------------------------------------- folds
def test_folds_are_deterministic_balanced_and_seeded() -> None:
    ids = [f"0522c{i:04d}" for i in range(1, 34)]
    folds = make_folds(ids, 3, seed=0)
    assert [len(f) for f in folds] == [11, 11, 11]
    assert sorted(c for f in folds for c in f) == ids
    assert make_folds(list(reversed(ids)), 3, seed=0) == folds  # input order does not matter
    assert make_folds(ids, 3, seed=1) != folds
    with pytest.raises(DatasetError, match="cannot split 2"):
        make_folds(ids[:2], 3)


# ---------------------------------------------------------------------------------- PDDCA
def test_import_pddca_keeps_complete_patients_and_reports_the_rest(
    pddca_src: Path, tmp_path: Path
) -> None:
    result = import_pddca(pddca_src, tmp_path / "ds")
    assert result.kept_ids == ["0522c0001", "0522c0002", "0522c0003", "0522c0008"]
    reasons = {s.id: s.reason for s in result.skipped}
    assert set(reasons) == {"0522c0004", "0522c0005", "0522c0006", "0522c0007"}
    assert "missing landmark(s) mand_r" in reasons["0522c0004"]
    assert "no landmark file" in reasons["0522c0005"]
    assert "unreadable image" in reasons["0522c0007"]
    assert "states LPS" in reasons["0522c0006"] and "inside read as RAS" in reasons["0522c0006"]
    fix6 = next(s.fix for s in result.skipped if s.id == "0522c0006")
    assert "--fcsv-coords RAS" in fix6

    how = {p.id: (p.coordinate_system, p.system_source) for p in result.kept}
    assert how["0522c0001"] == ("RAS", "stated")
    assert how["0522c0002"] == ("LPS", "stated")
    assert how["0522c0003"] == ("RAS", "slicer default")
    assert result.kept[3].labels["left condyle"] == "mand_l"

    ds = load_dataset(result.spec_path)
    assert ds.landmark_names == list(PDDCA_LANDMARKS)
    assert ds.modality == "CT"
    assert ds.correlated_groups[0]["landmarks"] == ["chin", "occ_bone"]
    assert sorted(c for f in ds.folds for c in f) == result.kept_ids
    assert len(ds.folds) == 3
    for cid in result.kept_ids:
        ls = ds.read_landmarks(cid)
        np.testing.assert_allclose(ls.coords, _truth(cid), atol=1e-9)
        geometry = Geometry.from_sitk(ds.read_image(cid))
        assert geometry.contains_world(ls.coords).all()
        assert (tmp_path / "ds" / "images" / f"{cid}.nrrd").is_symlink()  # --link default

    assert verify_dataset(ds).ok
    report = json.loads((tmp_path / "ds" / "import_report.json").read_text())
    assert report["n_kept"] == 4 and report["n_skipped"] == 4
    # deterministic: a second import gives the same spec
    again = import_pddca(pddca_src, tmp_path / "ds2")
    assert again.folds == result.folds


def test_import_pddca_refuses_to_overwrite(pddca_src: Path, tmp_path: Path) -> None:
    import_pddca(pddca_src, tmp_path / "ds", n_folds=0)
    with pytest.raises(OutputExistsError):
        import_pddca(pddca_src, tmp_path / "ds", n_folds=0)
    import_pddca(pddca_src, tmp_path / "ds", n_folds=0, overwrite=True)


def test_auto_coordinates_fix_a_wrong_header(pddca_src: Path, tmp_path: Path) -> None:
    result = import_pddca(pddca_src, tmp_path / "ds", fcsv_coords="auto", copy=True)
    assert "0522c0006" in result.kept_ids
    p6 = next(p for p in result.kept if p.id == "0522c0006")
    assert (p6.coordinate_system, p6.system_source) == ("RAS", "auto-flipped")
    assert any("states LPS" in n for n in p6.notes)
    ds = load_dataset(result.spec_path)
    np.testing.assert_allclose(ds.read_landmarks("0522c0006").coords, _truth("x"), atol=1e-9)
    image = tmp_path / "ds" / "images" / "0522c0006.nrrd"
    assert not image.is_symlink()  # --copy
    assert image.read_bytes() == (pddca_src / "PDDCA-1.4.1_part2/0522c0006/img.nrrd").read_bytes()


def test_forced_coordinates_override_the_header(tmp_path: Path) -> None:
    write_nrrd(tmp_path / "src" / "p1" / "img.nrrd")
    write_fcsv(tmp_path / "src" / "p1" / "a.fcsv", TRUTH, "LPS", "RAS")
    result = import_pddca(tmp_path / "src", tmp_path / "ds", n_folds=0, fcsv_coords="RAS")
    assert result.kept[0].system_source == "forced"
    np.testing.assert_allclose(
        load_dataset(result.spec_path).read_landmarks("p1").coords, _truth("p1"), atol=1e-9
    )
    # forcing the wrong one puts them outside the image: skipped with a clear reason
    with pytest.raises(DatasetError, match="outside the image when read as LPS"):
        import_pddca(tmp_path / "src", tmp_path / "ds2", n_folds=0, fcsv_coords="LPS")


def test_require_subset_keeps_partial_patients(pddca_src: Path, tmp_path: Path) -> None:
    result = import_pddca(pddca_src, tmp_path / "ds", require=["Chin", "occ_bone"], n_folds=0)
    assert "0522c0004" in result.kept_ids
    ls = load_dataset(result.spec_path).read_landmarks("0522c0004")
    assert ls.is_missing("mand_r") and not ls.is_missing("chin")
    with pytest.raises(DatasetError, match="not a PDDCA landmark"):
        import_pddca(pddca_src, tmp_path / "x", require=["nasion"])


def test_unrecognised_labels_are_named_and_can_be_mapped(tmp_path: Path) -> None:
    labels = dict(SLICER_LABELS, chin="LM-1")
    write_nrrd(tmp_path / "src" / "p1" / "img.nrrd")
    write_fcsv(tmp_path / "src" / "p1" / "a.fcsv", TRUTH, "0", "RAS", labels)
    with pytest.raises(DatasetError, match="LM-1"):
        import_pddca(tmp_path / "src", tmp_path / "ds", n_folds=0)
    result = import_pddca(tmp_path / "src", tmp_path / "ds", n_folds=0, label_map={"LM-1": "chin"})
    assert result.kept[0].labels["LM-1"] == "chin"
    with pytest.raises(DatasetError, match="not PDDCA landmarks"):
        import_pddca(tmp_path / "src", tmp_path / "x", label_map={"LM-1": "nose"})


def test_pddca_config_is_the_papers_protocol() -> None:
    cfg = load_config("pddca")
    assert (
        cfg.to_dict() == load_config(Path(__file__).parents[2] / "configs" / "pddca.yaml").to_dict()
    )
    assert cfg.coarse.grid == (96, 96, 72)
    assert (cfg.coarse.optimizer, cfg.coarse.lr, cfg.coarse.weight_decay) == ("sgd", 1e-3, 1e-8)
    assert cfg.coarse.epochs == cfg.fine.epochs == 300
    assert cfg.fine.patch_size == (48, 48, 48) and cfg.fine.spacing_mm == (2.0, 2.0, 2.0)
    assert cfg.fine.weight_decay == 1e-8 and cfg.fine.decode == "dark"
    k = cfg.correlated
    assert k.use_fusion and k.use_axis_attention and k.use_slice_detection
    assert not k.shared_encoder and k.epochs == 300 and k.weight_decay == 1e-8
    assert [g["landmarks"] for g in CORRELATED_GROUPS] == [["chin", "occ_bone"]]


# ---------------------------------------------------------------------------------- layout
def _write_layout(root: Path) -> None:
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "setup").mkdir()
    for cid in ("case1", "case2", "case10", "case3"):
        image = sitk.GetImageFromArray(rng.normal(size=(6, 7, 8)).astype(np.float32))
        image.SetSpacing((1.5, 1.25, 2.0))
        image.SetOrigin((-5.0, 3.0, 7.0))
        sitk.WriteImage(image, str(root / "images" / f"{cid}.nii.gz"))
    rows = [
        "# CoordinateSystem = RAS",
        "# Modality = MR",
        "case,landmark,x,y,z",
        "case1,occ_bone,0.1,-80.333333333333,-40.0",
        "case1,chin,12.5,-80.25,-40.123456789",
        "case2,occ_bone,1e-7,2.5,3.5",
        "case2,chin,,,",
        "case10,occ_bone,-3.25,4.0,5.0",
        "case10,chin,6.0,7.0,8.0",
        "case3,chin,9.0,10.0,11.0",
        "case3,occ_bone,12.0,13.0,14.0",
    ]
    (root / "setup" / "landmark.csv").write_text("\n".join(rows) + "\n")
    (root / "setup" / "cv0").write_text("case1\ncase10\n")
    (root / "setup" / "cv1").write_text("# held out\ncase2\n")
    (root / "setup" / "cv2").write_text("case3\n")


def _table(path: Path) -> tuple[str, list[tuple[str, str, list[float | None]]]]:
    lines = path.read_text().splitlines()
    system = next(ln.split("=")[1].strip() for ln in lines if "CoordinateSystem" in ln)
    body = [ln for ln in lines if not ln.startswith("#")]
    rows = []
    for r in list(csv.DictReader(body)):
        xyz: list[float | None] = [float(r[a]) if r[a] else None for a in "xyz"]
        rows.append((r["case"], r["landmark"], xyz))
    return system, rows


def test_layout_round_trip_is_lossless(tmp_path: Path) -> None:
    _write_layout(tmp_path / "orig")
    spec = import_layout(tmp_path / "orig", tmp_path / "spec")
    ds = load_dataset(spec)
    original = load_dataset(tmp_path / "orig")
    assert ds.landmark_names == ["occ_bone", "chin"] == original.landmark_names
    assert ds.folds == [["case1", "case10"], ["case2"], ["case3"]] == original.folds
    assert ds.modality == "MR"
    for cid in original.case_ids:
        np.testing.assert_array_equal(
            ds.read_landmarks(cid).coords, original.read_landmarks(cid).coords
        )
        assert ds.case(cid).image == original.case(cid).image  # images stay where they are

    out = export_layout(spec, tmp_path / "back")
    system, rows = _table(out / "setup" / "landmark.csv")
    _, want = _table(tmp_path / "orig" / "setup" / "landmark.csv")
    assert system == "RAS"  # the system recorded at import
    assert sorted(r[:2] for r in rows) == sorted(w[:2] for w in want)
    got = {(c, n): xyz for c, n, xyz in rows}
    for c, n, xyz in want:
        if xyz[0] is None:
            assert got[c, n] == [None, None, None]
        else:
            np.testing.assert_allclose(got[c, n], xyz, rtol=0, atol=1e-6)  # type: ignore[arg-type]
    for k in range(3):
        cv = (out / "setup" / f"cv{k}").read_text().split()
        assert cv == original.folds[k]
    for cid in original.case_ids:
        assert (out / "images" / f"{cid}.nii.gz").read_bytes() == (
            tmp_path / "orig" / "images" / f"{cid}.nii.gz"
        ).read_bytes()
    back = load_dataset(out)
    assert back.landmark_names == original.landmark_names and back.folds == original.folds


def test_export_layout_coords_overwrite_and_stale_folds(tmp_path: Path) -> None:
    _write_layout(tmp_path / "orig")
    out = export_layout(tmp_path / "orig", tmp_path / "lps", coords="LPS", image_format=".nii")
    system, rows = _table(out / "setup" / "landmark.csv")
    assert system == "LPS"
    assert ("case1", "chin", [-12.5, 80.25, -40.123456789]) in rows
    image = read_image(out / "images" / "case1.nii")
    assert image.GetSize() == (8, 7, 6)
    with pytest.raises(OutputExistsError):
        export_layout(tmp_path / "orig", tmp_path / "lps")
    (out / "setup" / "cv7").write_text("case1\n")
    with pytest.raises(DatasetError, match="cv7"):
        export_layout(tmp_path / "orig", tmp_path / "lps", overwrite=True)
    with pytest.raises(DatasetError, match="not an original-layout"):
        import_layout(tmp_path / "nowhere", tmp_path / "spec")


# ---------------------------------------------------------------------------------- DICOM
def write_dicom_series(directory: Path, volume: Volume, series_uid: str) -> None:
    """One CT DICOM file per k-slice (int16) with the geometry tags a reader needs."""
    directory.mkdir(parents=True, exist_ok=True)
    g = volume.geometry
    image = sitk.Cast(volume.to_sitk(), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = [*g.direction[:, 0], *g.direction[:, 1]]
    for k in range(g.size[2]):
        plane = image[:, :, k : k + 1]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.8.498.77",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in g.index_to_world([0, 0, k])),
            "0020|0037": "\\".join(f"{v:.8f}" for v in orientation),
            "0028|0030": f"{g.spacing[1]:.6f}\\{g.spacing[0]:.6f}",
            "0018|0050": f"{g.spacing[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(directory / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


def test_dataset_case_with_a_dicom_series_directory(tmp_path: Path) -> None:
    geometry = Geometry((10, 9, 7), (1.5, 1.5, 3.0), (-20.0, 15.0, 40.0), np.eye(3))
    array = np.random.default_rng(1).integers(-500, 500, (10, 9, 7)).astype(np.float32)
    write_dicom_series(tmp_path / "dicom" / "p1", Volume(array, geometry), "1.2.3.4.5.6")
    spec = {
        "name": "dicom",
        "modality": "CT",
        "landmarks": ["chin"],
        "cases": [{"id": "p1", "image": "dicom/p1", "landmarks": None}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    ds = load_dataset(tmp_path)
    assert ds.case("p1").image.is_dir()
    image = ds.read_image("p1")
    assert Geometry.from_sitk(image).is_close(geometry, atol=1e-4)
    np.testing.assert_array_equal(Volume.from_sitk(image).array, array)
