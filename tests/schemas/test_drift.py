"""The committed JSON Schemas are exactly what the msgspec types generate."""

from __future__ import annotations

import pytest

from schemas.generate import HERE, render, schemas


@pytest.mark.parametrize("name", sorted(schemas()))
def test_committed_schema_matches_types(name: str) -> None:
    committed = (HERE / name).read_text(encoding="utf-8")
    assert committed == render(schemas()[name]), f"run `make schemas`: {name} drifted"


def test_no_stale_schema_files() -> None:
    on_disk = {p.name for p in HERE.glob("*.schema.json")}
    assert on_disk == set(schemas())
