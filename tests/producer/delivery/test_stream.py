"""ensure_stream against real 2.1x and 2.9 servers, and the pure configuration check."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
from nats.js.errors import APIError, NotFoundError

from producer.delivery.stream import (
    DEFAULT_DUPLICATE_WINDOW_S,
    DEFAULT_STREAM_NAME,
    DEFAULT_SUBJECT_PREFIX,
    _covers,
    _intersects,
    check_stream_config,
    ensure_stream,
    stream_config,
    stream_config_json,
    validate_stream_name,
    validate_subject_prefix,
)
from producer.errors import BrokerError, StreamConfigError
from producer.ops.embedded import EmbeddedNats
from tests.support import REPO

DEPLOY_STREAM_JSON = REPO / "deploy" / "stream.json"
PREFIX = "cellos.telemetry"
NAME = "CELLOS_TELEMETRY"
WINDOW = 120.0


@pytest.fixture(params=["nats_server", "nats_server_29"])
def server(request: pytest.FixtureRequest) -> EmbeddedNats:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture
async def nc(server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(server.url, allow_reconnect=False, connect_timeout=2)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream(timeout=5)


async def _ensure(js: JetStreamContext, *, create: bool = True) -> Any:
    return await ensure_stream(
        js, name=NAME, subject_prefix=PREFIX, duplicate_window_s=WINDOW, create=create
    )


def _good(**changes: Any) -> StreamConfig:
    return stream_config(name=NAME, subject_prefix=PREFIX, duplicate_window_s=WINDOW).evolve(
        **changes
    )


# -- the operator file --------------------------------------------------------------


def test_deploy_stream_json_matches_stream_config() -> None:
    on_disk = json.loads(DEPLOY_STREAM_JSON.read_text())
    produced = json.loads(json.dumps(stream_config().as_dict()))
    assert on_disk == produced, (
        "regenerate: python -m producer.delivery.stream > deploy/stream.json"
    )
    assert json.loads(stream_config_json()) == produced


def test_defaults_follow_spec_6() -> None:
    config = stream_config()
    assert config.name == DEFAULT_STREAM_NAME == "CELLOS_TELEMETRY"
    assert config.subjects == [f"{DEFAULT_SUBJECT_PREFIX}.>"] == ["cellos.telemetry.>"]
    assert config.storage == StorageType.FILE
    assert config.deny_delete and config.deny_purge
    assert not config.allow_rollup_hdrs
    assert config.duplicate_window == DEFAULT_DUPLICATE_WINDOW_S
    assert check_stream_config(
        config, subject_prefix=PREFIX, duplicate_window_s=DEFAULT_DUPLICATE_WINDOW_S
    ) == ([], [])


async def test_deploy_stream_json_is_accepted_verbatim(nc: Client) -> None:
    """What an operator feeds the CLI must create a stream the producer accepts."""
    body = DEPLOY_STREAM_JSON.read_bytes()
    reply = json.loads((await nc.request(f"$JS.API.STREAM.CREATE.{NAME}", body, 5)).data)
    assert "error" not in reply, reply
    check = await ensure_stream(
        nc.jetstream(timeout=5),
        name=NAME,
        subject_prefix=PREFIX,
        duplicate_window_s=DEFAULT_DUPLICATE_WINDOW_S,
        create=False,
    )
    assert not check.created


# -- argument validation ------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "a..b", "a.*", "a.>", "a b", ".a", "a."])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        validate_subject_prefix(prefix)


@pytest.mark.parametrize("name", ["", "A.B", "A*", "A>", "A B", "A/B"])
def test_bad_stream_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="stream name"):
        validate_stream_name(name)


@pytest.mark.parametrize("window", [0.0, -1.0, float("nan")])
def test_bad_window_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="duplicate window"):
        stream_config(duplicate_window_s=window)


# -- subject algebra ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        (">", "a.b.>", True),
        ("a.>", "a.b.>", True),
        ("a.b.>", "a.b.>", True),
        ("a.*.>", "a.b.>", True),
        ("a.b.c.>", "a.b.>", False),
        ("a.b.*", "a.b.>", False),
        ("a.*.>", "a.>", False),
        ("a.b", "a.b.>", False),
        ("x.>", "a.b.>", False),
        ("a.*", "a.b", True),
        ("a.b", "a.*", False),
    ],
)
def test_covers(pattern: str, subject: str, expected: bool) -> None:
    assert _covers(pattern, subject) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.>", "a.b.>", True),
        ("a.*.c", "a.b.>", True),
        (">", "x", True),
        ("a.b", "a.b.>", False),
        ("x.>", "a.>", False),
        ("a.b.c", "a.*.c", True),
    ],
)
def test_intersects(a: str, b: str, expected: bool) -> None:
    assert _intersects(a, b) is expected
    assert _intersects(b, a) is expected


# -- the pure check: each bad setting is named --------------------------------------

BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"storage": StorageType.MEMORY}, "storage is memory"),
    ({"deny_delete": False}, "deny_delete is off"),
    ({"deny_purge": False}, "deny_purge is off"),
    ({"deny_purge": False, "allow_rollup_hdrs": True}, "allow_rollup_hdrs is on"),
    ({"duplicate_window": 30.0}, "duplicate_window is 30s, shorter than"),
    ({"subjects": [f"{PREFIX}.cell-1.>"]}, "do not cover 'cellos.telemetry.>'"),
    ({"subjects": ["other.>"]}, "do not cover"),
    ({"retention": RetentionPolicy.INTEREST}, "retention is interest"),
    ({"retention": RetentionPolicy.WORK_QUEUE}, "retention is workqueue"),
    ({"no_ack": True}, "no_ack is on"),
]


@pytest.mark.parametrize(("changes", "problem"), BAD_SETTINGS)
def test_check_names_the_problem(changes: dict[str, Any], problem: str) -> None:
    problems, _ = check_stream_config(
        _good(**changes), subject_prefix=PREFIX, duplicate_window_s=WINDOW
    )
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"sealed": True}, "sealed"),
        ({"mirror": StreamSource(name="ELSEWHERE"), "subjects": None}, "mirror of 'ELSEWHERE'"),
        ({"allow_msg_counter": True}, "allow_msg_counter"),
        ({"subject_transform": SubjectTransform(src=">", dest="x.>")}, "subject_transform"),
        ({"subject_transform": SubjectTransform(src="", dest="x.>")}, "subject_transform"),
    ],
)
def test_check_names_settings_that_cannot_be_created_directly(
    changes: dict[str, Any], problem: str
) -> None:
    problems, _ = check_stream_config(
        _good(**changes), subject_prefix=PREFIX, duplicate_window_s=WINDOW
    )
    assert any(problem in p for p in problems), problems
    if "mirror" in changes:
        assert not any("do not cover" in p for p in problems), "one cause, one problem"


def test_transform_of_unrelated_subjects_is_fine() -> None:
    config = _good(
        subjects=[f"{PREFIX}.>", "legacy.>"],
        subject_transform=SubjectTransform(src="legacy.>", dest="old.>"),
    )
    assert check_stream_config(config, subject_prefix=PREFIX, duplicate_window_s=WINDOW) == ([], [])


def test_broader_subjects_cover_but_a_deeper_wildcard_does_not() -> None:
    for subjects in ([">"], ["cellos.>"], ["x.>", f"{PREFIX}.>"], [f"{PREFIX}.*.>"]):
        problems, _ = check_stream_config(
            _good(subjects=subjects), subject_prefix=PREFIX, duplicate_window_s=WINDOW
        )
        wildcard_ok = subjects != [f"{PREFIX}.*.>"]
        assert (problems == []) is wildcard_ok, (subjects, problems)


@pytest.mark.parametrize(
    ("changes", "warning"),
    [
        ({"max_age": 86400.0}, "max_age 86400s with discard old"),
        ({"max_msgs": 1000}, "max_msgs 1000 with discard old"),
        ({"max_bytes": 10**9}, "max_bytes 1000000000 with discard old"),
        ({"max_msgs_per_subject": 5}, "max_msgs_per_subject 5 with discard old"),
        ({"max_msgs": 1000, "discard": DiscardPolicy.NEW}, "discard new: once reached"),
        ({"max_msg_size": 4096}, "max_msg_size is 4096"),
        ({"allow_msg_ttl": True}, "allow_msg_ttl"),
        ({"persist_mode": "async"}, "persist_mode is async"),
        ({"allow_direct": False}, "allow_direct is off"),
    ],
)
def test_retention_limits_are_warnings(changes: dict[str, Any], warning: str) -> None:
    problems, warnings = check_stream_config(
        _good(**changes), subject_prefix=PREFIX, duplicate_window_s=WINDOW
    )
    assert problems == []
    assert any(warning in w for w in warnings), warnings


# -- against real servers -----------------------------------------------------------


async def test_creates_on_an_empty_server(js: JetStreamContext) -> None:
    check = await _ensure(js)
    assert check.created
    assert check.warnings == ()
    config = (await js.stream_info(NAME)).config
    assert config.subjects == [f"{PREFIX}.>"]
    assert config.storage == StorageType.FILE
    assert config.deny_delete and config.deny_purge and not config.allow_rollup_hdrs
    assert config.duplicate_window == WINDOW


async def test_created_stream_holds_its_promises(js: JetStreamContext, nc: Client) -> None:
    """The flags are not only reported but enforced, on both server generations."""
    await _ensure(js)
    first = await js.publish(f"{PREFIX}.cell-1.host.nftables", b"1", headers={"Nats-Msg-Id": "e1"})
    again = await js.publish(f"{PREFIX}.cell-1.host.nftables", b"1", headers={"Nats-Msg-Id": "e1"})
    assert again.duplicate and again.seq == first.seq
    purge = json.loads((await nc.request(f"$JS.API.STREAM.PURGE.{NAME}", b"", 5)).data)
    assert purge["error"]["description"] == "stream purge not permitted"
    delete = json.loads(
        (await nc.request(f"$JS.API.STREAM.MSG.DELETE.{NAME}", b'{"seq":1}', 5)).data
    )
    assert delete["error"]["description"] == "message delete not permitted"
    rollup = await nc.request(
        f"{PREFIX}.cell-1.host.nftables", b"", 5, headers={"Nats-Rollup": "sub"}
    )
    assert b"rollup not permitted" in rollup.data
    assert (await js.stream_info(NAME)).state.messages == 1


async def test_verifies_an_existing_good_stream(js: JetStreamContext) -> None:
    assert (await _ensure(js)).created
    again = await _ensure(js, create=False)
    assert not again.created
    assert again.info.config.name == NAME


async def test_accepts_a_longer_window_and_broader_subjects(js: JetStreamContext) -> None:
    await js.add_stream(_good(subjects=["cellos.>"], duplicate_window=3600.0))
    check = await _ensure(js)
    assert not check.created and check.warnings == ()


async def test_missing_without_create_is_refused(js: JetStreamContext) -> None:
    with pytest.raises(StreamConfigError, match="does not exist") as info:
        await _ensure(js, create=False)
    assert info.value.stream == NAME
    with pytest.raises(NotFoundError):
        await js.stream_info(NAME)


@pytest.mark.parametrize(("changes", "problem"), BAD_SETTINGS)
async def test_refuses_each_bad_setting(
    js: JetStreamContext, changes: dict[str, Any], problem: str
) -> None:
    await js.add_stream(_good(**changes))
    with pytest.raises(StreamConfigError) as info:
        await _ensure(js)
    assert info.value.stream == NAME
    assert any(problem in p for p in info.value.problems), info.value.problems


async def test_refuses_a_sealed_stream(js: JetStreamContext) -> None:
    await js.add_stream(_good())
    await js.update_stream(_good(sealed=True))
    with pytest.raises(StreamConfigError, match="sealed"):
        await _ensure(js)


async def test_refuses_a_mirror(js: JetStreamContext) -> None:
    await js.add_stream(StreamConfig(name="ORIGIN", subjects=["origin.>"]))
    await js.add_stream(
        StreamConfig(name=NAME, storage=StorageType.FILE, mirror=StreamSource(name="ORIGIN"))
    )
    with pytest.raises(StreamConfigError, match="mirror of 'ORIGIN'"):
        await _ensure(js)


async def test_lists_every_problem_at_once(js: JetStreamContext) -> None:
    await js.add_stream(
        StreamConfig(
            name=NAME,
            subjects=["elsewhere.>"],
            storage=StorageType.MEMORY,
            duplicate_window=10.0,
            retention=RetentionPolicy.INTEREST,
        )
    )
    with pytest.raises(StreamConfigError) as info:
        await _ensure(js)
    problems = info.value.problems
    for expected in (
        "storage is memory",
        "deny_delete is off",
        "deny_purge is off",
        "duplicate_window is 10s",
        "retention is interest",
        "do not cover",
    ):
        assert any(expected in p for p in problems), (expected, problems)
    assert len(problems) == 6
    assert all(p in str(info.value) for p in problems)


async def test_limits_are_reported_not_refused(
    js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    await js.add_stream(_good(max_age=86400.0, max_bytes=10**9))
    with caplog.at_level(logging.WARNING, logger="producer.delivery.stream"):
        check = await _ensure(js)
    assert not check.created
    assert len(check.warnings) == 1
    assert "max_age 86400s, max_bytes 1000000000 with discard old" in check.warnings[0]
    assert check.warnings[0] in caplog.text


async def test_overlapping_stream_blocks_creation(js: JetStreamContext) -> None:
    await js.add_stream(StreamConfig(name="SQUATTER", subjects=[f"{PREFIX}.cell-9.>"]))
    with pytest.raises(StreamConfigError, match="overlap with another stream") as info:
        await _ensure(js)
    assert isinstance(info.value.__cause__, APIError)


async def test_unreachable_broker_is_a_broker_error(server: EmbeddedNats) -> None:
    client = await nats.connect(server.url, allow_reconnect=True, reconnect_time_wait=10)
    try:
        server.kill()
        with pytest.raises(BrokerError) as info:
            await ensure_stream(
                client.jetstream(timeout=0.5),
                name=NAME,
                subject_prefix=PREFIX,
                duplicate_window_s=WINDOW,
                create=True,
            )
        assert not isinstance(info.value, StreamConfigError)
        assert info.value.__cause__ is not None
    finally:
        await client.close()


async def test_system_server_compat_read_only(system_nats_url: str) -> None:
    """Against the host's broker, only look: a stream name nobody uses is reported missing."""
    client = await nats.connect(system_nats_url, allow_reconnect=False, connect_timeout=2)
    try:
        with pytest.raises(StreamConfigError, match="does not exist"):
            await ensure_stream(
                client.jetstream(timeout=5),
                name="CELLOS_PRODUCER_TEST_NEVER_CREATED",
                subject_prefix="cellos.producer-test.never",
                duplicate_window_s=WINDOW,
                create=False,
            )
    finally:
        await client.close()


class _Unplaced:
    """JetStream as a cluster that is still forming answers it: no stream yet, and a
    create refused as something to ask again."""

    def __init__(self, refusal: APIError) -> None:
        self.refusal = refusal

    async def stream_info(self, name: str) -> Any:
        raise NotFoundError(code=404, description="stream not found", err_code=10059)

    async def add_stream(self, config: StreamConfig) -> Any:
        raise self.refusal


@pytest.mark.parametrize(
    "refusal",
    [
        APIError(code=503, description="JetStream system temporarily unavailable", err_code=10008),
        APIError(code=500, description="no suitable peers for placement", err_code=10005),
        APIError(code=503, description="insufficient resources", err_code=10023),
        APIError(code=503, description="a future kind of unavailable", err_code=19999),
    ],
)
async def test_a_create_the_cluster_cannot_place_yet_is_retried_not_final(
    refusal: APIError,
) -> None:
    with pytest.raises(BrokerError) as info:
        await _ensure(cast(JetStreamContext, _Unplaced(refusal)))
    assert not isinstance(info.value, StreamConfigError)  # the daemon retries BrokerError
    assert "yet" in str(info.value) and info.value.__cause__ is refusal


async def test_a_create_refused_for_good_is_final() -> None:
    refusal = APIError(code=500, description="replicas > 1 not supported", err_code=10074)
    with pytest.raises(StreamConfigError, match="refused to create it"):
        await _ensure(cast(JetStreamContext, _Unplaced(refusal)))
