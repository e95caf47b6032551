"""Write the JSON Schemas consumers validate against, generated from the msgspec types.

``python -m schemas.generate`` rewrites them; ``tests/schemas/test_drift.py`` fails when the
committed files differ from what the types produce, so they cannot drift apart.

Each schema is a self-contained JSON Schema 2020-12 document with its own ``$id``. The
envelope schema embeds every ``data`` type and ties each event ``type`` to its ``data``
schema (and, for guest and host events, to the ``probeSource`` it must carry), so one
document validates a whole event in any language.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import msgspec

from schemas.events import DATA_TYPES, EVENT_TYPES, CloudEvent
from schemas.wire import Declaration

HERE = Path(__file__).resolve().parent
DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
BASE_ID: Final = "https://cellos.dev/schemas/telemetry/v1.1/"


def _document(name: str, title: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": DIALECT, "$id": BASE_ID + name, "title": title, **body}


def _single(name: str, tp: type[msgspec.Struct]) -> dict[str, Any]:
    """One type's schema with its definitions inlined under ``$defs``."""
    (ref,), defs = msgspec.json.schema_components([tp])
    return _document(name, tp.__name__, {**ref, "$defs": defs})


def envelope_schema() -> dict[str, Any]:
    """The envelope with ``type`` restricted to the known types and ``data`` tied to it."""
    data_types = sorted({tp for tp, _ in EVENT_TYPES.values()}, key=lambda t: t.__name__)
    (_, *refs), defs = msgspec.json.schema_components([CloudEvent, *data_types])
    envelope = dict(defs.pop("CloudEvent"))
    properties = dict(envelope["properties"])
    properties["type"] = {"enum": sorted(EVENT_TYPES)}
    envelope["properties"] = properties
    ref_of = dict(zip(data_types, refs, strict=True))
    rules = []
    for type_, (data_type, probe_source) in sorted(EVENT_TYPES.items()):
        data: dict[str, Any] = dict(ref_of[data_type])
        if probe_source is not None:
            data = {"allOf": [data, {"properties": {"probeSource": {"const": probe_source}}}]}
        rules.append(
            {
                "if": {"properties": {"type": {"const": type_}}, "required": ["type"]},
                "then": {"properties": {"data": data}},
            }
        )
    envelope["allOf"] = rules
    return _document("envelope.schema.json", "CellOS telemetry event", {**envelope, "$defs": defs})


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema for every wire and event shape."""
    out: dict[str, dict[str, Any]] = {
        "envelope.schema.json": envelope_schema(),
        "declaration.schema.json": _single("declaration.schema.json", Declaration),
    }
    for name, tp in DATA_TYPES.items():
        out[f"data.{name}.schema.json"] = _single(f"data.{name}.schema.json", tp)
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    for name, schema in schemas().items():
        (HERE / name).write_text(render(schema), encoding="utf-8")
        print(f"wrote schemas/{name}")


if __name__ == "__main__":
    main()
