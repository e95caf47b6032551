"""Log lines: JSON objects a collector can parse, readable text on a terminal."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.ops.logs import event, get_logger, setup_logging

TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_line_has_fixed_keys_and_fields() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    event(get_logger("producer.ops.registry"), logging.INFO, "cell_registered", cell_id="c1", n=3)
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["event"] == "cell_registered"
    assert record["level"] == "info"
    assert record["logger"] == "producer.ops.registry"
    assert TS_RE.fullmatch(record["ts"])
    assert record["cell_id"] == "c1" and record["n"] == 3


def test_extra_fields_form_is_equivalent() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    get_logger("x").warning("spool_full", extra={"fields": {"cell_id": "c1"}})
    record = json.loads(stream.getvalue())
    assert (record["level"], record["event"], record["cell_id"]) == ("warning", "spool_full", "c1")


def test_json_escapes_guest_controlled_text() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    comm = 'evil\n{"event": "forged"}'
    event(get_logger("x"), logging.INFO, "frame", guest_comm=comm, path=Path("/a"))
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["guest_comm"] == comm
    assert record["path"] == "/a"  # non-JSON types are written as str()


def test_fields_cannot_shadow_fixed_keys() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    event(get_logger("x"), logging.INFO, "real", event="fake", level="fake")
    record = json.loads(stream.getvalue())
    assert (record["event"], record["level"]) == ("real", "info")
    assert record["field_event"] == "fake"


def test_exception_is_included_on_one_line() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("x").exception("publish_failed", extra={"fields": {"subject": "s"}})
    (line,) = lines(stream)
    record = json.loads(line)
    assert "RuntimeError: boom" in record["exc"]
    assert record["subject"] == "s"


def test_unencodable_field_still_logs() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    event(get_logger("x"), logging.INFO, "odd", mapping={(1, 2): "tuple key"})
    assert json.loads(stream.getvalue())["event"] == "odd"


def test_third_party_records_use_same_format() -> None:
    stream = io.StringIO()
    setup_logging("debug", "json", stream)
    logging.getLogger("nats.aio.client").debug("connected to %s", "nats://a")
    assert json.loads(stream.getvalue())["event"] == "connected to nats://a"


def test_level_filters() -> None:
    stream = io.StringIO()
    setup_logging("warning", "json", stream)
    log = get_logger("x")
    event(log, logging.INFO, "quiet")
    event(log, logging.ERROR, "loud")
    assert [json.loads(line)["event"] for line in lines(stream)] == ["loud"]


def test_setup_is_idempotent() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "json", first)
    setup_logging("info", "json", second)
    setup_logging("info", "json", second)
    event(get_logger("x"), logging.INFO, "once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_auto_is_text_on_tty_json_otherwise() -> None:
    tty, pipe = Tty(), io.StringIO()
    setup_logging("info", "auto", tty)
    event(get_logger("producer.x"), logging.INFO, "started", host_id="hv 1", port=9001)
    line = tty.getvalue().strip()
    assert TS_RE.match(line)
    assert line.endswith('INFO    producer.x started host_id="hv 1" port=9001')

    setup_logging("info", "auto", pipe)
    event(get_logger("producer.x"), logging.INFO, "started")
    assert json.loads(pipe.getvalue())["event"] == "started"


def test_text_escapes_newlines() -> None:
    stream = io.StringIO()
    setup_logging("info", "text", stream)
    event(get_logger("x"), logging.INFO, "frame", guest_comm="a\nb")
    assert len(lines(stream)) == 1
    assert 'guest_comm="a\\nb"' in stream.getvalue()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="level"):
        setup_logging("loud", "json", io.StringIO())
    with pytest.raises(ValueError, match="format"):
        setup_logging("info", "xml", io.StringIO())
