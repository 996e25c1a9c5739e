"""Sharding a cohort (``--shard K/N``), the report file names and the thread default."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from landmark3d.errors import ConfigError
from landmark3d.inference.batch import default_threads, parse_shard, report_path, shard_items


def test_parse_shard_is_one_based_and_validated() -> None:
    assert parse_shard("1/1") == (1, 1)
    assert parse_shard(" 3 / 8 ") == (3, 8)
    assert parse_shard((8, 8)) == (8, 8)
    for bad in ("0/4", "5/4", "1/0", "-1/4", "a/b", "1-4", "1/4/2", ""):
        with pytest.raises(ConfigError) as err:
            parse_shard(bad)
        assert "--shard" in str(err.value) and err.value.fix


@given(
    ids=st.lists(st.text("abc0123_", min_size=1, max_size=6), unique=True, max_size=40),
    n=st.integers(1, 9),
)
def test_shards_partition_the_sorted_cases(ids: list[str], n: int) -> None:
    items = [(cid, Path(f"/images/{cid}.nii.gz")) for cid in ids]
    shards = [shard_items(items, (k, n)) for k in range(1, n + 1)]
    flat = [cid for s in shards for cid, _ in s]
    assert sorted(flat) == sorted(ids)  # full coverage, no case twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    for s in shards:  # original order kept inside a shard
        assert s == [it for it in items if it in s]
    # membership depends on the ids only, not on the order they were listed in
    again = [shard_items(list(reversed(items)), (k, n)) for k in range(1, n + 1)]
    assert [sorted(s) for s in again] == [sorted(s) for s in shards]
    assert shard_items(items, None) == items


def test_report_names_differ_per_shard(tmp_path: Path) -> None:
    assert report_path(tmp_path, None) == tmp_path / "timings.json"
    names = {report_path(tmp_path, (k, 4)).name for k in range(1, 5)}
    assert names == {f"timings.shard-{k}-of-4.json" for k in range(1, 5)}


def test_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads(None) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads(None) >= 1
