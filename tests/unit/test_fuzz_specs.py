"""Fuzzing the two hand-written input files: ``dataset.json`` and the experiment YAML.

Every generated file either loads or raises our error type (:class:`DatasetError` /
:class:`ConfigError`) naming the file — never another exception. Misspelt keys are errors that
name the key and suggest the closest valid one; where a line is known it is reported.

The ``max_examples`` of each test are the case counts quoted in ``docs/reliability.md``
(:data:`FUZZ_CASES`); hypothesis stops early only if a strategy runs out of distinct inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from landmark3d.config import (
    AugmentConfig,
    CoarseConfig,
    CorrelatedConfig,
    ExperimentConfig,
    FineConfig,
    IntensityConfig,
    apply_overrides,
    load_config,
)
from landmark3d.data.dataset import CASE_KEYS, OPTIONAL_KEYS, REQUIRED_KEYS, load_dataset
from landmark3d.errors import ConfigError, DatasetError

#: max_examples of every fuzz test below (quoted in docs/reliability.md).
FUZZ_CASES = {
    "dataset_random_json": 200,
    "dataset_mutated_spec": 250,
    "dataset_mutated_text": 250,
    "dataset_key_typos": 150,
    "config_random_text": 200,
    "config_random_tree": 200,
    "config_mutated_text": 200,
    "config_key_typos": 150,
}


def _fuzz(name: str) -> Any:
    return settings(
        max_examples=FUZZ_CASES[name],
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ============================================================================ strategies
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_KEY_ALPHABET = string.ascii_lowercase + "_"


def _edits(word: str) -> set[str]:
    """Every string one deletion, transposition, substitution or insertion away from ``word``."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out |= {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    out |= {a + c + b[1:] for a, b in splits if b for c in _KEY_ALPHABET}
    out |= {a + c + b for a, b in splits for c in _KEY_ALPHABET}
    out.discard(word)
    return {w for w in out if w}


@functools.cache
def _typo_pairs(valid: tuple[str, ...]) -> list[tuple[str, str]]:
    return sorted((k, t) for k in valid for t in _edits(k) if t not in valid)


def _typo_of(valid: list[str]) -> st.SearchStrategy[tuple[str, str]]:
    """``(key, typo)``: a valid key and a one-edit misspelling that is not itself valid."""
    return st.sampled_from(_typo_pairs(tuple(valid)))


def _mutate_text(data: st.DataObject, text: str) -> str:
    """Up to 4 random character / line edits of ``text``."""
    for _ in range(data.draw(st.integers(1, 4), label="n_edits")):
        kind = data.draw(st.sampled_from(["delete", "insert", "replace", "dup_line", "cut"]))
        if not text:
            text = data.draw(st.text(max_size=5))
            continue
        i = data.draw(st.integers(0, len(text) - 1))
        if kind == "delete":
            j = data.draw(st.integers(i, min(len(text), i + 8)))
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + data.draw(st.text(max_size=4)) + text[i:]
        elif kind == "replace":
            text = text[:i] + data.draw(st.characters()) + text[i + 1 :]
        elif kind == "dup_line":
            lines = text.splitlines(keepends=True)
            k = data.draw(st.integers(0, len(lines) - 1))
            lines.insert(k, lines[k])
            text = "".join(lines)
        else:
            text = text[:i]
    return text


# ============================================================================ dataset.json
def _valid_spec() -> dict[str, Any]:
    return {
        "name": "toy",
        "modality": "CT",
        "landmarks": ["chin", "mand_l", "mand_r"],
        "coordinate_system": "LPS",
        "cases": [
            {"id": f"c{i}", "image": f"images/c{i}.nii.gz", "landmarks": f"landmarks/c{i}.fcsv"}
            for i in range(4)
        ],
        "folds": [["c0", "c1"], ["c2", "c3"]],
        "correlated_groups": [{"landmarks": ["mand_l", "mand_r"]}],
    }


def _load_spec_or_error(spec: Path) -> None:
    """Load ``spec``: success, or DatasetError naming it with a fix — nothing else."""
    try:
        ds = load_dataset(spec)
    except DatasetError as exc:
        assert exc.path is not None and exc.path.name == spec.name, exc
        assert exc.problem and exc.fix, exc
        assert exc.line is None or 1 <= exc.line <= spec.read_bytes().count(b"\n") + 1
        return
    assert ds.cases is not None and all(isinstance(n, str) for n in ds.landmark_names)


@_fuzz("dataset_random_json")
@given(value=_JSON)
def test_dataset_spec_random_json(tmp_path: Path, value: Any) -> None:
    spec = tmp_path / "dataset.json"
    spec.write_text(json.dumps(value))
    _load_spec_or_error(spec)


def _mutate_spec(data: st.DataObject, spec: dict[str, Any]) -> dict[str, Any]:
    """Structural mutations of a valid spec: drop, retype, add keys, edit cases and folds."""
    for _ in range(data.draw(st.integers(1, 4), label="n_mutations")):
        kind = data.draw(
            st.sampled_from(["drop", "retype", "add", "case_drop", "case_retype", "case_add"])
        )
        cases = spec.get("cases")
        if kind == "drop" and spec:
            spec.pop(data.draw(st.sampled_from(sorted(spec))))
        elif kind == "retype" and spec:
            spec[data.draw(st.sampled_from(sorted(spec)))] = data.draw(_JSON)
        elif kind == "add":
            spec[data.draw(st.text(max_size=12))] = data.draw(_JSON)
        elif isinstance(cases, list) and cases and all(isinstance(c, dict) for c in cases):
            case = cases[data.draw(st.integers(0, len(cases) - 1))]
            if kind == "case_drop" and case:
                case.pop(data.draw(st.sampled_from(sorted(case))))
            elif kind == "case_retype" and case:
                case[data.draw(st.sampled_from(sorted(case)))] = data.draw(_JSON)
            else:
                case[data.draw(st.text(max_size=10))] = data.draw(_JSON)
    return spec


@_fuzz("dataset_mutated_spec")
@given(data=st.data())
def test_dataset_spec_mutated_structure(tmp_path: Path, data: st.DataObject) -> None:
    spec = tmp_path / "dataset.json"
    spec.write_text(json.dumps(_mutate_spec(data, _valid_spec()), indent=2))
    _load_spec_or_error(spec)


@_fuzz("dataset_mutated_text")
@given(data=st.data())
def test_dataset_spec_mutated_text(tmp_path: Path, data: st.DataObject) -> None:
    text = _mutate_text(data, json.dumps(_valid_spec(), indent=2))
    spec = tmp_path / "dataset.json"
    spec.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    _load_spec_or_error(spec)


_SPEC_KEYS = list(REQUIRED_KEYS + OPTIONAL_KEYS)


@_fuzz("dataset_key_typos")
@given(top=_typo_of(_SPEC_KEYS), case=_typo_of(list(CASE_KEYS)), where=st.booleans())
def test_dataset_spec_misspelt_key_is_named_with_a_suggestion(
    tmp_path: Path, top: tuple[str, str], case: tuple[str, str], where: bool
) -> None:
    """A one-edit misspelling of a valid key: error naming it, its line, and the right key."""
    raw = _valid_spec()
    if where:
        key, typo = top
        raw[typo] = raw.pop(key) if key in raw else "x"
    else:
        key, typo = case
        raw["cases"][2][typo] = raw["cases"][2].pop(key)
    spec = tmp_path / "dataset.json"
    text = json.dumps(raw, indent=2)
    spec.write_text(text)
    with pytest.raises(DatasetError) as info:
        load_dataset(spec)
    err = info.value
    suggested = re.search(r"Did you mean '([^']*)'\?", err.problem)
    assert f"unknown key {typo!r}" in err.problem and suggested is not None, err
    assert suggested.group(1) == key or typo in _edits(suggested.group(1)), err
    assert err.path == spec.absolute()
    assert err.line is not None and f'"{typo}":' in text.splitlines()[err.line - 1]


def test_dataset_spec_odd_files_are_dataset_errors(tmp_path: Path) -> None:
    """Non-UTF-8 bytes, deep nesting, a directory named dataset.json, empty case list."""
    spec = tmp_path / "dataset.json"
    for blob in (b"\xff\xfe{", b"[" * 100_000 + b"]" * 100_000, b"", b"null"):
        spec.write_bytes(blob)
        with pytest.raises(DatasetError) as info:
            load_dataset(spec)
        assert info.value.path == spec.absolute()
    spec.write_text(json.dumps({**_valid_spec(), "cases": [], "folds": []}))
    with pytest.raises(DatasetError, match='"cases" is empty'):
        load_dataset(spec)
    spec.write_text(json.dumps({**_valid_spec(), "correlated_groups": [{"landmarks": 5}]}))
    with pytest.raises(DatasetError, match="correlated_groups"):
        load_dataset(spec)
    spec.unlink()
    spec.mkdir()
    with pytest.raises(DatasetError, match=r"neither dataset\.json nor"):
        load_dataset(spec)


# ============================================================================ YAML configs
_SECTIONS: dict[str, type] = {
    "coarse": CoarseConfig,
    "fine": FineConfig,
    "correlated": CorrelatedConfig,
    "augment": AugmentConfig,
    "intensity": IntensityConfig,
}
_TOP_KEYS = ["seed", "device", "amp", "num_threads", *_SECTIONS]


def _section_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "source"]


def _load_config_or_error(path: Path) -> None:
    """Load ``path``: success, or ConfigError naming it with a fix — nothing else."""
    try:
        cfg = ExperimentConfig.from_yaml(path)
    except ConfigError as exc:
        assert exc.path is not None and Path(exc.path).name == path.name, exc
        assert exc.problem and exc.fix, exc
        n_lines = len(path.read_text(encoding="utf-8", errors="replace").splitlines())
        assert exc.line is None or 1 <= exc.line <= n_lines + 1  # YAML breaks lines at \x85 too
        return
    assert cfg.coarse.epochs >= 1 and cfg.fine.sigma_mm > 0


@_fuzz("config_random_text")
@given(text=st.text(max_size=200))
def test_config_random_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    _load_config_or_error(path)


_YAML_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["sgd", "adam", "cosine", "dark", "auto", "cpu", "1e-3", "2001-02-30"])
    | st.text(max_size=8)
)
_YAML_VALUES = st.recursive(_YAML_SCALARS, lambda inner: st.lists(inner, max_size=4), max_leaves=6)


@st.composite
def _config_tree(draw: st.DrawFn) -> dict[str, Any]:
    """A config-shaped mapping: mostly valid keys, sometimes wrong ones, random values."""
    tree: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from([*_TOP_KEYS, "sed", "corse"]), max_size=5)):
        cls = _SECTIONS.get(key)
        if cls is None or draw(st.integers(0, 9)) == 0:
            tree[key] = draw(_YAML_VALUES)
            continue
        names = [*_section_keys(cls), "epoch", "lr_rate"]
        tree[key] = {k: draw(_YAML_VALUES) for k in draw(st.lists(st.sampled_from(names)))}
    return tree


@_fuzz("config_random_tree")
@given(tree=_config_tree())
def test_config_random_tree(tmp_path: Path, tree: dict[str, Any]) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    _load_config_or_error(path)


_DEMO_YAML = (
    Path(__file__).resolve().parents[2] / "src" / "landmark3d" / "configs" / "phantom_demo.yaml"
).read_text(encoding="utf-8")


@_fuzz("config_mutated_text")
@given(data=st.data())
def test_config_mutated_text(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes(_mutate_text(data, _DEMO_YAML).encode("utf-8", errors="surrogatepass"))
    _load_config_or_error(path)


@_fuzz("config_key_typos")
@given(
    section=st.sampled_from(["", *_SECTIONS]),
    data=st.data(),
)
def test_config_misspelt_key_is_named_with_line_and_suggestion(
    tmp_path: Path, section: str, data: st.DataObject
) -> None:
    valid = _TOP_KEYS if not section else _section_keys(_SECTIONS[section])
    key, typo = data.draw(_typo_of(valid))
    tree: dict[str, Any] = {"seed": 1, "coarse": {"epochs": 2}}
    if section:
        tree.setdefault(section, {})[typo] = 1
    else:
        tree[typo] = 1
    path = tmp_path / "exp.yaml"
    text = yaml.safe_dump(tree, sort_keys=False)
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_yaml(path)
    err = info.value
    dotted = f"{section}.{typo}" if section else typo
    assert f"unknown config key '{dotted}'" in err.problem
    suggested = re.search(r"did you mean '([^']*)'\?", err.fix or "")
    assert suggested is not None, err  # the key itself, or another valid key one edit away
    assert suggested.group(1) == key or typo in _edits(suggested.group(1)), err
    assert err.line is not None and text.splitlines()[err.line - 1].strip().startswith(typo)


def test_config_odd_files_are_config_errors(tmp_path: Path) -> None:
    """Non-UTF-8 bytes, impossible dates (PyYAML raises ValueError), deep nesting, NaN/inf."""
    path = tmp_path / "exp.yaml"
    cases = {
        b"seed: 1\n\xff\xfe": "cannot read",
        b"seed: 2001-02-30\n": "not valid YAML",
        b"[" * 1000 + b"]" * 1000: "",  # any ConfigError
        b"fine:\n  spacing_mm: [1.0, .nan, 1.0]\n": "spacing_mm",
        b"coarse:\n  lr: .inf\n": "coarse.lr",
        b"coarse:\n  momentum: -3\n": "coarse.momentum",
        b"augment:\n  rotate_deg: .nan\n": "rotate_deg",
    }
    for blob, fragment in cases.items():
        path.write_bytes(blob)
        with pytest.raises(ConfigError, match=re.escape(fragment) or None) as info:
            ExperimentConfig.from_yaml(path)
        assert info.value.path is not None and Path(info.value.path) == path
    with pytest.raises(ConfigError, match="'seed' must be int, got '2001-02-30'"):
        apply_overrides(load_config("phantom_demo"), ["seed=2001-02-30"])


def test_a_one_edit_typo_is_traced_to_its_key_not_a_similar_one() -> None:
    """``bptch_size`` is one edit from ``batch_size`` and two from ``patch_size`` (a draw
    hypothesis once found, where difflib's ratio preferred ``patch_size``)."""
    from landmark3d.naming import closest_match

    keys = ["patch_size", "spacing_mm", "batch_size", "sigma_mm"]
    assert closest_match("bptch_size", keys) == "batch_size"
    assert closest_match("pacth_size", keys) == "patch_size"  # transposition
    assert closest_match("ix", ["id", "image"]) == "id"  # short keys: one edit, below cutoff
    assert closest_match("zzz", keys) is None
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        apply_overrides(load_config("phantom_demo"), ["fine.bptch_size=3"])
