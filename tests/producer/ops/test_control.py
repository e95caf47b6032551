"""The control API end to end through its real Unix socket: what a supervisor does."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from producer.chain.signing import generate_key_file
from producer.guest.simulator import run_guest
from producer.ops.control import control_socket_path, openapi_document
from producer.ops.control_client import ControlError, request
from producer.ops.daemon import Producer
from producer.ops.embedded import EmbeddedNats
from tests.producer.ops.test_cli import acli
from tests.support import REPO, cell_spec, eventually, make_config, short_dir, verified

OPENAPI = openapi_document()
SCHEMAS = Registry().with_resource(
    "urn:api", Resource.from_contents(OPENAPI, default_specification=DRAFT202012)
)


def conforms(answer: Any, component: str) -> None:
    """The answer matches the OpenAPI document's schema for it."""
    schema = {"$ref": f"urn:api#/components/schemas/{component}"}
    jsonschema.Draft202012Validator(schema, registry=SCHEMAS).validate(answer)


def body(spec: Any) -> dict[str, Any]:
    return {k: v for k, v in msgspec.to_builtins(spec).items() if v is not None}


class Daemon:
    def __init__(self, url: str) -> None:
        self.base = short_dir()
        self.signer = generate_key_file(f"{self.base}/signing.key")
        self.config = make_config(url, f"{self.base}/signing.key")
        self.producer: Producer | None = None

    async def start(self) -> Producer:
        self.producer = Producer(self.config, signer=self.signer)
        await self.producer.startup()
        return self.producer

    @property
    def socket(self) -> str:
        assert self.producer is not None
        path = control_socket_path(self.producer)
        assert path is not None
        return path

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.shutdown()
            self.producer = None


@pytest.fixture
async def daemon(nats_server: EmbeddedNats) -> Any:
    d = Daemon(nats_server.url)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()
        shutil.rmtree(d.base, ignore_errors=True)


async def test_register_serve_deregister_through_the_socket(
    daemon: Daemon, nats_server: EmbeddedNats
) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    spec = cell_spec(daemon.base, 1)
    status, cell = await request(daemon.socket, "POST", "/v1/cells", body(spec))
    assert status == 201
    conforms(cell, "CellInfo")
    assert cell["state"] == "serving" and stat.S_ISSOCK(os.stat(cell["socket_path"]).st_mode)
    assert cell["chain_id"] and cell["sequence"] == 1  # opened is sealed on registration

    await run_guest(cell["socket_path"], rate=0, count=10, seed=1)
    assert daemon.producer is not None
    served = daemon.producer.registry.cells["cell-1"]  # type: ignore[union-attr]
    await eventually(lambda: served.counters.accepted == 10)
    _, shown = await request(daemon.socket, "GET", "/v1/cells/cell-1")
    conforms(shown, "CellInfo")
    assert shown["counters"]["frames_accepted"] == 10 and shown["last_frame_at"]
    _, listed = await request(daemon.socket, "GET", "/v1/cells")
    conforms(listed, "CellList")
    assert [c["cell_id"] for c in listed["cells"]] == ["cell-1"]

    status, gone = await request(daemon.socket, "DELETE", "/v1/cells/cell-1")
    assert status == 200 and gone["state"] == "sealed", gone
    assert not os.path.exists(cell["socket_path"])
    _, after = await request(daemon.socket, "GET", "/v1/cells/cell-1")
    assert after["state"] == "sealed"
    report, events = await verified(nats_server.url, "cell-1", daemon.signer)
    assert report.ok and report.sealed, report.problems
    assert sum(e["type"].endswith(("process_spawned", "process_exited")) for e in events) <= 10
    assert report.events == 12
    _, state = await request(daemon.socket, "GET", "/v1/status")
    conforms(state, "Status")
    assert state["broker_connected"] is True and state["cells"] == 0


async def test_retries_conflicts_and_bad_input(daemon: Daemon) -> None:
    spec = body(cell_spec(daemon.base, 1))
    first = await request(daemon.socket, "POST", "/v1/cells", spec)
    again = await request(daemon.socket, "POST", "/v1/cells", spec)
    assert (first[0], again[0]) == (201, 200)  # a retried registration is harmless
    assert again[1]["chain_id"] == first[1]["chain_id"]

    async def refused(payload: Any) -> ControlError:
        with pytest.raises(ControlError) as info:
            await request(daemon.socket, "POST", "/v1/cells", payload)
        return info.value

    other_run = await refused({**spec, "run_id": "run-2"})
    assert (other_run.status, other_run.field) == (409, "run_id")
    taken = await refused(
        {**body(cell_spec(daemon.base, 2)), "vsock_uds_base": spec["vsock_uds_base"]}
    )
    assert (taken.status, taken.field) == (409, "vsock_uds_base")
    cases = {
        "cell_id": {**spec, "cell_id": "no spaces!"},
        "run_id": {k: v for k, v in spec.items() if k != "run_id"},
        "vsock_cid": {**spec, "cell_id": "c3", "vsock_cid": "seven"},
        "spec_signature_hash": {**spec, "cell_id": "c4", "spec_signature_hash": "md5:x"},
        "colour": {**spec, "cell_id": "c5", "colour": "red"},
    }
    for field, payload in cases.items():
        error = await refused(payload)
        assert (error.status, error.field) == (400, field), (field, error)
    missing = await refused(None)
    assert missing.status == 400
    with pytest.raises(ControlError) as nosuch:
        await request(daemon.socket, "DELETE", "/v1/cells/nosuch")
    assert nosuch.value.status == 404


async def test_cells_registered_through_the_api_survive_a_restart(daemon: Daemon) -> None:
    spec = cell_spec(daemon.base, 1)
    _, first = await request(daemon.socket, "POST", "/v1/cells", body(spec))
    await daemon.stop()
    producer = await daemon.start()
    assert producer.registry is not None
    _, shown = await request(daemon.socket, "GET", "/v1/cells/cell-1")
    assert shown["state"] == "serving" and shown["chain_id"] == first["chain_id"]
    assert shown["sequence"] == 2  # opened, then resumed by this start
    assert stat.S_ISSOCK(os.stat(shown["socket_path"]).st_mode)


async def test_cli_wrappers_drive_the_same_api(daemon: Daemon) -> None:
    spec = cell_spec(daemon.base, 1)
    where = ("--control-socket", daemon.socket)
    added = await acli(
        "cell", "add", "--cell-id", spec.cell_id, "--run-id", spec.run_id,
        "--spec-signature-hash", spec.spec_signature_hash,
        "--vsock-uds-base", spec.vsock_uds_base, *where,
    )  # fmt: skip
    assert added.rc == 0 and "registered: cell cell-1" in added.out, added
    listed = await acli("cell", "list", *where)
    assert listed.rc == 0 and listed.out.startswith("cell-1 run=run-1"), listed
    shown = await acli("cell", "show", "cell-1", *where)
    assert json.loads(shown.out)["cell_id"] == "cell-1"
    status = await acli("status", *where, "--json")
    assert json.loads(status.out)["cells"] == 1
    removed = await acli("cell", "remove", "cell-1", *where)
    assert removed.rc == 0 and "sealed" in removed.out, removed
    missing = await acli("cell", "remove", "cell-1", *where)
    assert missing.rc == 1 and "not registered" in missing.err, missing
    nowhere = await acli("status", "--control-socket", f"{daemon.base}/none.sock")
    assert nowhere.rc == 1 and "is the daemon running" in nowhere.err, nowhere


def test_the_committed_openapi_document_is_current() -> None:
    committed = json.loads((REPO / "docs" / "control-api.json").read_text(encoding="utf-8"))
    assert committed == OPENAPI, (
        "regenerate: python -m producer.ops.control > docs/control-api.json"
    )
    jsonschema.Draft202012Validator.check_schema(OPENAPI["components"]["schemas"]["CellSpec"])


def test_control_socket_path_rules(tmp_path: Path) -> None:
    base = make_config("nats://127.0.0.1:4222", str(tmp_path / "k"))
    default = Producer(base)
    assert control_socket_path(default) == str(tmp_path / "control.sock")
    off = Producer(
        msgspec.structs.replace(base, control=msgspec.structs.replace(base.control, socket=""))
    )
    assert control_socket_path(off) is None
