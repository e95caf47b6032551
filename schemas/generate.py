"""Write the JSON Schemas consumers validate against, generated from the msgspec types.

``python -m schemas.generate`` rewrites them; ``tests/schemas/test_drift.py`` fails when the
committed files differ from what the types produce, so they cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from schemas.events import DATA_TYPES, CloudEvent
from schemas.wire import Declaration

HERE = Path(__file__).resolve().parent


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema for every wire and event shape."""
    out: dict[str, dict[str, Any]] = {
        "envelope.schema.json": msgspec.json.schema(CloudEvent),
        "declaration.schema.json": msgspec.json.schema(Declaration),
    }
    for name, tp in DATA_TYPES.items():
        out[f"data.{name}.schema.json"] = msgspec.json.schema(tp)
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    for name, schema in schemas().items():
        (HERE / name).write_text(render(schema), encoding="utf-8")
        print(f"wrote schemas/{name}")


if __name__ == "__main__":
    main()
