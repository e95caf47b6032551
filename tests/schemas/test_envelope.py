"""The envelope schema accepts every real event and refuses each way of getting one wrong:
it is the one document a consumer in another language validates against."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from schemas.generate import BASE_ID, DIALECT, HERE, schemas
from tests.support import ENVELOPE_VALIDATOR
from tests.vectors.test_event_vectors import VECTORS

Mutation = Callable[[dict[str, Any]], None]


def _by_name(name: str) -> dict[str, Any]:
    return copy.deepcopy(next(v["event"] for v in VECTORS if v["name"] == name))


def _set(path: str, value: Any) -> Mutation:
    *parents, leaf = path.split(".")

    def mutate(event: dict[str, Any]) -> None:
        node = event
        for part in parents:
            node = node[part]
        node[leaf] = value

    return mutate


def _drop(path: str) -> Mutation:
    *parents, leaf = path.split(".")

    def mutate(event: dict[str, Any]) -> None:
        node = event
        for part in parents:
            node = node[part]
        del node[leaf]

    return mutate


WRONG: list[tuple[str, str, Mutation]] = [
    ("guest-signed", "signature null instead of absent", _set("signature", None)),
    ("guest-unsigned", "signkid null instead of absent", _set("signkid", None)),
    ("guest-signed", "u64 as a JSON number", _set("data.guestMonotonicNs", 2**64 - 1)),
    ("guest-signed", "u64 string with a sign", _set("data.guestMonotonicNs", "-1")),
    ("guest-signed", "probeSource of another type", _set("data.probeSource", "process.exited")),
    ("guest-signed", "unknown type", _set("type", "dev.cellos.events.cell.observability.x")),
    ("guest-signed", "unknown attribute", _set("color", "red")),
    ("guest-signed", "missing data field", _drop("data.guestPid")),
    ("guest-signed", "unknown data field", _set("data.extra", 1)),
    ("agent-silenced", "number beyond 2**53", _set("data.silentForMs", 2**53)),
    ("checkpoint", "short sequence", _set("data.headSequence", "7")),
    ("opened", "data of another type", _set("data", _by_name("sealed")["data"])),
    ("host-nftables", "host probeSource of another probe", _set("data.probeSource", "host.cgroup")),
    ("resumed", "clean as a string", _set("data.clean", "yes")),
    ("opened-superseding", "supersedes without reason", _drop("data.supersedes.reason")),
    ("gap", "datacontenttype other than json", _set("datacontenttype", "text/plain")),
]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_every_vector_event_is_valid(vector: dict[str, Any]) -> None:
    ENVELOPE_VALIDATOR.validate(vector["event"])


@pytest.mark.parametrize(("name", "what", "mutate"), WRONG, ids=[w[1] for w in WRONG])
def test_a_wrong_event_is_refused(name: str, what: str, mutate: Mutation) -> None:
    event = _by_name(name)
    ENVELOPE_VALIDATOR.validate(event)
    mutate(event)
    with pytest.raises(jsonschema.ValidationError):
        ENVELOPE_VALIDATOR.validate(event)


@pytest.mark.parametrize("name", sorted(schemas()))
def test_every_schema_declares_dialect_and_id(name: str) -> None:
    schema = json.loads((HERE / name).read_text(encoding="utf-8"))
    assert schema["$schema"] == DIALECT
    assert schema["$id"] == BASE_ID + name
    jsonschema.Draft202012Validator.check_schema(schema)
