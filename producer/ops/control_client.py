"""The client side of the control API, for ``cellos-producer cell ...`` and ``status``.

A supervisor can use plain ``curl --unix-socket``; this is the same over aiohttp, with
errors turned into :class:`ControlError` (the API's message and the field it names).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from producer.errors import ProducerError


class ControlError(ProducerError):
    """The control API refused a request, or could not be reached."""

    def __init__(self, reason: str, *, status: int | None = None, field: str | None = None):
        self.reason = reason
        self.status = status
        self.field = field
        where = f" (field {field})" if field else ""
        super().__init__(f"{reason}{where}")


async def request(
    socket: str, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """One request; returns the status and the decoded JSON answer."""
    data = None if body is None else msgspec.json.encode(body)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket)) as http,
            http.request(method, f"http://cellos{path}", data=data, headers=headers) as resp,
        ):
            answer = msgspec.json.decode(await resp.read())
            status = resp.status
    except (aiohttp.ClientError, OSError) as exc:
        raise ControlError(
            f"cannot reach the control socket {socket} (is the daemon running?): {exc}"
        ) from exc
    if status >= 400:
        raise ControlError(
            str(answer.get("error", answer)), status=status, field=answer.get("field")
        )
    return status, answer
