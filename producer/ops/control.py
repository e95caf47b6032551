"""The control API: how a supervisor registers and deregisters cells (HTTP/JSON on a Unix
socket, so ``curl --unix-socket`` works and file permissions are the access control).

The supervisor's contract, and why each answer is what it is:

- ``POST /v1/cells`` answers only once the cell's socket is bound, so the VM may boot the
  moment it has the answer: 201 with the socket path and chain id. The same ``cell_id``
  and ``run_id`` again is idempotent (200, same answer), so a supervisor can retry after a
  timeout without thinking. Another run of a cell that is registered, a run that was
  sealed, or a socket taken by someone else is 409; malformed input is 400 naming the
  field.
- ``DELETE /v1/cells/{cell_id}`` stops the listener, spools what was read and seals the
  chain, then waits briefly for JetStream to acknowledge the rest: 200 when the chain is
  sealed in the stream, 202 while it is still draining (``GET`` tells when it is done).
- ``GET /v1/cells``, ``GET /v1/cells/{cell_id}``, ``GET /v1/status``: what is served,
  with counters, chain head, acknowledged sequence, last frame time and probe states.
- ``GET /v1/openapi.json``: the OpenAPI document of all this (``docs/control-api.json``;
  ``python -m producer.ops.control > docs/control-api.json`` regenerates it).

Cells registered here survive a restart: their registration lives in the spool with their
chain state, and the next start serves them again.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiohttp import web

from producer import __version__
from producer.chain.cell import CellRuntime
from producer.errors import ConfigError, RegistrationError
from producer.guest.listener import bind_unix_socket
from producer.ops.config import CellSpec, validate_cell
from producer.ops.logs import event

if TYPE_CHECKING:
    from producer.ops.daemon import Producer

log = logging.getLogger(__name__)

DRAIN_WAIT_S: Final = 2.0
"""How long ``DELETE`` waits for the sealed chain's last PubAcks before answering 202."""
MAX_BODY: Final = 64 * 1024


class ProbeState(msgspec.Struct, kw_only=True):
    readings: int
    skipped: int
    missed: int
    failures: dict[str, int]
    failing: bool


class CellCountersView(msgspec.Struct, kw_only=True):
    frames_accepted: int
    frames_rejected: dict[str, int]
    events: int
    host_events: int
    signed: int
    dropped: int
    connections_open: int
    connections_refused: int
    frame_deadline_exceeded: int


class CellInfo(msgspec.Struct, kw_only=True):
    """One cell as the control API reports it."""

    cell_id: str
    run_id: str
    chain_id: str
    state: str
    """``serving``; after ``DELETE``: ``draining`` until every event is acknowledged,
    then ``sealed``."""
    socket_path: str
    sequence: int
    acked_sequence: int
    head_hash: str
    last_frame_at: str | None
    counters: CellCountersView
    probes: dict[str, ProbeState]
    spec: CellSpec


class CellList(msgspec.Struct, kw_only=True):
    cells: list[CellInfo]


class SpoolStatus(msgspec.Struct, kw_only=True):
    events: int
    bytes: int
    oldest_age_s: float
    full: bool


class Status(msgspec.Struct, kw_only=True):
    version: str
    host_id: str
    started: bool
    broker_connected: bool
    publish_backlog: int
    spool: SpoolStatus
    cells: int
    chains_open: int
    chains_draining: int


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str
    field: str | None = None


def _cell_info(producer: Producer, cell: CellRuntime, state: str) -> CellInfo:
    c = cell.counters
    probes: dict[str, ProbeState] = {}
    if producer.probes is not None:
        for (cell_id, probe), st in producer.probes.stats().items():
            if cell_id == cell.cell_id:
                probes[probe] = ProbeState(
                    readings=st.readings,
                    skipped=st.skipped,
                    missed=st.missed,
                    failures=dict(st.failures),
                    failing=st.consecutive_failures > 0,
                )
    chain = cell.chain
    return CellInfo(
        cell_id=cell.cell_id,
        run_id=cell.ctx.run_id,
        chain_id=cell.ctx.chain_id,
        state=state,
        socket_path=cell.socket_path,
        sequence=chain.sequence,
        acked_sequence=chain.acked_seq,
        head_hash=chain.head_hash,
        last_frame_at=cell.last_frame_at,
        counters=CellCountersView(
            frames_accepted=c.accepted,
            frames_rejected=dict(c.rejected),
            events=c.events,
            host_events=c.host_events,
            signed=c.signed,
            dropped=c.dropped_full,
            connections_open=c.connections_open,
            connections_refused=cell.listener.refused,
            frame_deadline_exceeded=cell.listener.expired,
        ),
        probes=probes,
        spec=cell.spec,
    )


def _drained(cell: CellRuntime) -> bool:
    return cell.chain.acked_seq >= cell.chain.sequence


def status(producer: Producer) -> Status:
    spool, publisher = producer.spool, producer.publisher
    chains = list(spool.chains.values()) if spool is not None else []
    return Status(
        version=__version__,
        host_id=producer.config.host_id,
        started=producer.started,
        broker_connected=publisher is not None and publisher.connected,
        publish_backlog=publisher.backlog if publisher is not None else 0,
        spool=SpoolStatus(
            events=spool.depth() if spool else 0,
            bytes=spool.live_bytes() if spool else 0,
            oldest_age_s=round(spool.oldest_age_s(), 3) if spool else 0.0,
            full=not spool.has_space() if spool else False,
        ),
        cells=len(producer.registry.cells) if producer.registry else 0,
        chains_open=sum(not c.sealed for c in chains),
        chains_draining=sum(c.sealed and c.acked_seq < c.sequence for c in chains),
    )


def _json(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    return _json(ErrorBody(error=message, field=field), status)


def _field_of(exc: msgspec.ValidationError) -> str | None:
    text = str(exc)
    if " - at `$." in text:
        return text.rsplit(" - at `$.", 1)[1].rstrip("`").split("[", 1)[0]
    for marker in ("required field `", "unknown field `"):
        if marker in text:
            return text.split(marker, 1)[1].split("`", 1)[0]
    return None


def control_app(producer: Producer) -> web.Application:
    routes = web.RouteTableDef()

    def registry() -> Any:
        if producer.registry is None or not producer.started:
            raise web.HTTPServiceUnavailable(
                body=msgspec.json.encode(ErrorBody(error="the producer is starting")),
                content_type="application/json",
            )
        return producer.registry

    @routes.post("/v1/cells")
    async def add(request: web.Request) -> web.Response:
        reg = registry()
        raw = await request.read()
        try:
            spec = msgspec.json.decode(raw, type=CellSpec)
        except msgspec.ValidationError as exc:
            return _error(400, str(exc), _field_of(exc))
        except msgspec.DecodeError as exc:
            return _error(400, f"body is not JSON: {exc}")
        try:
            validate_cell(spec, port=producer.config.listener.port)
        except RegistrationError as exc:
            return _error(400, exc.reason, exc.field)
        current = reg.cells.get(spec.cell_id)
        if current is not None:
            if current.spec == spec:
                return _json(_cell_info(producer, current, "serving"), 200)
            if current.spec.run_id != spec.run_id:
                return _error(
                    409, f"cell {spec.cell_id!r} is registered with run {current.spec.run_id!r}",
                    "run_id",
                )  # fmt: skip
            return _error(409, f"cell {spec.cell_id!r} is registered with other fields")
        try:
            cell = await reg.register(spec, source="api")
        except RegistrationError as exc:
            return _error(409 if exc.conflict else 400, exc.reason, exc.field)
        return _json(_cell_info(producer, cell, "serving"), 201)

    @routes.get("/v1/cells")
    async def cells(_: web.Request) -> web.Response:
        reg = registry()
        listed = [_cell_info(producer, c, "serving") for _, c in sorted(reg.cells.items())]
        return _json(CellList(cells=listed))

    @routes.get("/v1/cells/{cell_id}")
    async def show(request: web.Request) -> web.Response:
        reg = registry()
        cell_id = request.match_info["cell_id"]
        cell = reg.cells.get(cell_id)
        if cell is not None:
            return _json(_cell_info(producer, cell, "serving"))
        sealed = reg.sealed.get(cell_id)
        if sealed is not None:
            state = "sealed" if _drained(sealed) else "draining"
            return _json(_cell_info(producer, sealed, state))
        return _error(404, f"cell {cell_id!r} is not registered")

    @routes.delete("/v1/cells/{cell_id}")
    async def remove(request: web.Request) -> web.Response:
        reg = registry()
        cell_id = request.match_info["cell_id"]
        if cell_id not in reg.cells:
            return _error(404, f"cell {cell_id!r} is not registered")
        cell = await reg.deregister(cell_id)
        assert producer.spool is not None
        if await producer.spool.wait_acked(cell.chain, DRAIN_WAIT_S):
            return _json(_cell_info(producer, cell, "sealed"), 200)
        return _json(_cell_info(producer, cell, "draining"), 202)

    @routes.get("/v1/status")
    async def get_status(_: web.Request) -> web.Response:
        return _json(status(producer))

    @routes.get("/v1/openapi.json")
    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    app = web.Application(client_max_size=MAX_BODY)
    app.add_routes(routes)
    return app


def openapi_document() -> dict[str, Any]:
    """The control API's OpenAPI 3.1 document, its schemas generated from the same msgspec
    types the handlers encode (``docs/control-api.json`` is this, kept in sync by a test)."""
    (spec, info, cell_list, status_ref, error), components = msgspec.json.schema_components(
        [CellSpec, CellInfo, CellList, Status, ErrorBody],
        ref_template="#/components/schemas/{name}",
    )

    def body(ref: dict[str, Any], description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": ref}}}

    cell_id = {"name": "cell_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cellos-producer control API",
            "version": __version__,
            "description": "HTTP/JSON on a Unix socket (default <data_dir>/control.sock).",
        },
        "paths": {
            "/v1/cells": {
                "post": {
                    "summary": "Register a cell; answers once its socket is bound.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": spec}},
                    },
                    "responses": {
                        "201": body(info, "Registered: the socket is bound, the chain open."),
                        "200": body(info, "Already registered with these exact fields."),
                        "400": body(error, "Invalid input; `field` names it."),
                        "409": body(
                            error, "Conflicts with a registered cell, a sealed run or a socket."
                        ),
                        "503": body(error, "The producer is still starting."),
                    },
                },
                "get": {
                    "summary": "Every served cell.",
                    "responses": {"200": body(cell_list, "The cells.")},
                },
            },
            "/v1/cells/{cell_id}": {
                "get": {
                    "summary": "One cell (also recently deregistered ones: draining or sealed).",
                    "parameters": [cell_id],
                    "responses": {"200": body(info, "The cell."), "404": body(error, "Unknown.")},
                },
                "delete": {
                    "summary": "Deregister: stop reading, seal the chain, remove the socket.",
                    "parameters": [cell_id],
                    "responses": {
                        "200": body(info, "Sealed, and every event acknowledged."),
                        "202": body(info, "Sealed; events still draining to JetStream."),
                        "404": body(error, "Not registered."),
                    },
                },
            },
            "/v1/status": {
                "get": {
                    "summary": "Broker connection, backlog, spool, cells.",
                    "responses": {"200": body(status_ref, "The status.")},
                }
            },
        },
        "components": {"schemas": components},
    }


def control_socket_path(producer: Producer) -> str | None:
    control = producer.config.control
    if control.socket == "":
        return None
    return control.socket or os.path.join(producer.config.data_dir, "control.sock")


async def serve_control(producer: Producer) -> web.AppRunner | None:
    """Bind the control socket (mode, owner and group as configured) and serve the API."""
    path = control_socket_path(producer)
    if path is None:
        return None
    control = producer.config.control
    try:
        sock = bind_unix_socket(path, mode=control.socket_mode, cell_id="control")
        if control.owner is not None or control.group is not None:
            os.chown(path, _uid(control.owner), _gid(control.group))
    except (RegistrationError, OSError, KeyError) as exc:
        reason = exc.reason if isinstance(exc, RegistrationError) else str(exc)
        raise ConfigError("control.socket", f"{path}: {reason}") from exc
    runner = web.AppRunner(control_app(producer), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    event(log, logging.INFO, "control_listening", socket=path)
    return runner


def remove_control_socket(producer: Producer) -> None:
    path = control_socket_path(producer)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _uid(owner: str | None) -> int:
    if owner is None:
        return -1
    return int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid


def _gid(group: str | None) -> int:
    if group is None:
        return -1
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


__all__ = ["control_app", "openapi_document", "serve_control", "status"]

if __name__ == "__main__":
    import json

    print(json.dumps(openapi_document(), indent=2, sort_keys=True))
