"""Experiment config: strict YAML loading, packaged configs, overrides, JSON round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from landmark3d.config import (
    ExperimentConfig,
    apply_overrides,
    load_config,
    packaged_configs,
)
from landmark3d.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_paper_values() -> None:
    cfg = ExperimentConfig()
    assert cfg.coarse.widths == (64, 128, 256, 512)
    assert cfg.coarse.layers == (3, 4, 6, 3)
    assert cfg.coarse.lr == 1e-3 and cfg.coarse.weight_decay == 1e-8
    assert cfg.fine.patch_size == (48, 48, 48)
    assert cfg.fine.jitter_fraction == pytest.approx(1 / 6, abs=1e-3)
    assert cfg.augment.translate == 0.1 and cfg.augment.intensity == 0.1


@pytest.mark.parametrize("name", ["phantom_demo", "pddca", "prostate"])
def test_packaged_configs_load_by_name_and_match_repo_copies(name: str) -> None:
    assert name in packaged_configs()
    cfg = load_config(name)
    repo_copy = REPO / "configs" / f"{name}.yaml"
    assert cfg == load_config(repo_copy)
    assert cfg == load_config(f"{name}.yaml")
    pkg_copy = REPO / "src" / "landmark3d" / "configs" / f"{name}.yaml"
    assert pkg_copy.read_text() == repo_copy.read_text()


def test_paper_configs() -> None:
    pddca = load_config("pddca")
    assert pddca.coarse.grid == (96, 96, 72)
    assert pddca.coarse.widths == (64, 128, 256, 512)
    assert pddca.fine.spacing_mm == (2.0, 2.0, 2.0)
    assert pddca.fine.patch_size == (48, 48, 48)
    assert pddca.coarse.epochs == 300
    prostate = load_config("prostate")
    assert prostate.coarse.grid == (64, 64, 64)
    assert prostate.fine.spacing_mm == (1.0, 1.0, 1.0)
    assert prostate.coarse.epochs == 50 and prostate.fine.epochs == 50
    demo = load_config("phantom_demo")
    assert demo.coarse.widths == (16, 32, 64, 128)
    assert demo.fine.channels == (8, 16, 32, 64)
    assert demo.device == "cpu"


def test_unknown_key_names_key_file_line_and_suggestion(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\nfine:\n  epochs: 3\n  patch_sise: [32, 32, 32]\n")
    with pytest.raises(ConfigError) as ei:
        ExperimentConfig.from_yaml(p)
    msg = str(ei.value)
    assert "fine.patch_sise" in msg
    assert "patch_size" in msg
    assert str(p) in msg
    assert ei.value.line == 4


def test_unknown_section(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("augmnet:\n  scale: 0.2\n")
    with pytest.raises(ConfigError, match="augment"):
        ExperimentConfig.from_yaml(p)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("seed: one\n", "seed"),
        ("coarse:\n  epochs: 2.5\n", "coarse.epochs"),
        ("coarse:\n  grid: [64, 64]\n", "3 values"),
        ("fine:\n  sharing: everyone\n", "per_landmark"),
        ("augment:\n  enabled: maybe\n", "augment.enabled"),
        ("coarse:\n  epochs: true\n", "coarse.epochs"),
        ("fine: 3\n", "mapping"),
        ("fine:\n  patch_size: [30, 30, 30]\n", "multiples of 8"),
        ("coarse:\n  widths: [8, 16, 32]\n", "4 values"),
        ("intensity:\n  ct_window: [100, -100]\n", "low < high"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_values_raise_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        ExperimentConfig.from_yaml(p)


def test_yaml_exponent_without_dot_and_int_for_float(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("coarse:\n  lr: 1e-4\nfine:\n  sigma_mm: 2\n")
    cfg = ExperimentConfig.from_yaml(p)
    assert cfg.coarse.lr == pytest.approx(1e-4)
    assert isinstance(cfg.fine.sigma_mm, float) and cfg.fine.sigma_mm == 2.0


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\ncoarse:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError) as ei:
        ExperimentConfig.from_yaml(p)
    assert ei.value.line is not None


def test_json_round_trip(tmp_path: Path) -> None:
    cfg = load_config("phantom_demo")
    path = cfg.save_json(tmp_path / "config.json")
    back = ExperimentConfig.from_json(path)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert load_config(path) == cfg


def test_overrides() -> None:
    cfg = load_config("phantom_demo")
    new = apply_overrides(
        cfg,
        [
            "fine.epochs=3",
            "coarse.grid=[32,32,48]",
            "seed=7",
            "intensity.ct_window=[-100, 300]",
            "amp=true",
        ],
    )
    assert new.fine.epochs == 3 and new.coarse.grid == (32, 32, 48) and new.seed == 7
    assert new.intensity.ct_window == (-100.0, 300.0) and new.amp is True
    assert cfg.fine.epochs == 100  # original untouched
    with pytest.raises(ConfigError, match="epochs"):
        apply_overrides(cfg, ["fine.epoch=3"])
    with pytest.raises(ConfigError, match="fine"):
        apply_overrides(cfg, ["fien.epochs=3"])
    with pytest.raises(ConfigError, match="="):
        apply_overrides(cfg, ["fine.epochs"])
    with pytest.raises(ConfigError, match=r"coarse\.epochs"):
        apply_overrides(cfg, ["coarse.epochs=0"])


def test_replace() -> None:
    cfg = ExperimentConfig()
    new = cfg.replace(seed=3, fine={"epochs": 2}, **{"coarse.batch_size": 2})
    assert (new.seed, new.fine.epochs, new.coarse.batch_size) == (3, 2, 2)
    assert new.fine.patch_size == cfg.fine.patch_size
    with pytest.raises(ConfigError):
        cfg.replace(sede=3)


def test_unknown_name_suggests_packaged(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="phantom_demo"):
        load_config("phantom_dem")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "nope.yaml")
