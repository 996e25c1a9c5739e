"""The docs do not claim that multi-process training of the coarse stage equals one process."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_docs_say_coarse_batch_norm_is_per_process(doc: str) -> None:
    text = " ".join((ROOT / doc).read_text(encoding="utf-8").split())
    assert "so the result equals a single-process run" not in text
    assert "no SyncBatchNorm" in text and "coarse" in text
    assert "does **not** reproduce a 1-process run" in text or "is **not** equivalent" in text
