"""Fixtures shared by the probe tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.support import short_dir


@pytest.fixture
def directory() -> Iterator[str]:
    """A fresh directory with a short path (Unix socket paths must fit in 107 bytes)."""
    path = short_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path)
