"""Fixtures every test file may use; the plain functions behind them are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import go_offline, threads_kept


@pytest.fixture
def keep_threads():
    """Torch's thread count as it was before the test, restored when it ends (a training run sets
    it from its config)."""
    with threads_kept():
        yield


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache for this test, with downloads off: fill it with ``helpers.populate``."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    return go_offline(monkeypatch, cache)
