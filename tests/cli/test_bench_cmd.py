"""``landmark3d bench``: the comparison table in one command, on a dataset the user points at.

A miniature suite (tiny networks, 2 epochs, two methods) runs through the real command: the
JSON and markdown land under ``--out``, the numbers in the markdown are those of the JSON,
the command line is recorded, and a second run refuses to replace them without
``--overwrite``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

from conftest import TINY_OVERRIDES, CliResult, set_args

Cli = Callable[..., CliResult]


def test_bench_dataset_suite_writes_the_table(cli: Cli, phantom_dir: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    args = [
        "bench", "dataset", "--dataset", phantom_dir / "dataset.json",
        "--methods", "coarse,atlas", "--repeat", "1", "--atlas-k", "2",
        "--work", work, "--out", out, *set_args(TINY_OVERRIDES),
    ]  # fmt: skip
    r = cli(*args)
    assert r.code == 0, r.err
    stem = out / f"{dt.date.today().isoformat()}-dataset"
    result = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    md = stem.with_suffix(".md").read_text(encoding="utf-8")
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["atlas", "coarse"]
    for row in result["rows"]:
        assert row["mre_mm"] > 0
        assert row["label"] in md and row["mre_sd"] in md
    assert result["meta"]["command"].startswith("landmark3d bench dataset")
    assert result["meta"]["suite"] == "dataset"
    assert (work / "dataset" / "main" / "coarse" / "checkpoints" / "best").is_dir()

    again = cli(*args)
    assert again.code != 0
    assert "--overwrite" in again.err


def test_bench_refuses_a_dataset_suite_without_data_and_unknown_methods(
    cli: Cli, tmp_path: Path
) -> None:
    r = cli("bench", "dataset", "--out", tmp_path / "o", "--work", tmp_path / "w")
    assert r.code != 0 and "--dataset" in r.err
    r = cli("bench", "--methods", "coarse,magic", "--out", tmp_path / "o", "--work", tmp_path / "w")
    assert r.code != 0 and "magic" in r.err
    assert not (tmp_path / "w").exists()
