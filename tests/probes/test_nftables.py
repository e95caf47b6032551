"""nftables probe: parsing recorded ``nft -j`` output, and real counters in a real netns.

The fixtures in tests/fixtures/nft were recorded on this machine with Debian's nft 1.0.6
(their README has the commands). The ``_root`` tests build a cell namespace with a veth
to a peer namespace, load a per-cell table with Debian's nft, send ICMP and UDP from the
peer and check that the counters grew by exactly what was sent.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probes.base import Io, Parse, ProbeContext
from probes.nftables import NftablesProbe, parse_table, rule_repr
from tests.probes.kernel import (
    echo_request,
    in_netns,
    netns,
    netns_path,
    nft,
    run,
    unique,
    until,
    veth_between,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nft"
CTX = ProbeContext(cell_id="cell-1")


def fixture(name: str) -> dict[str, Any]:
    return parse_table((FIXTURES / name).read_bytes())


def by_handle(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["handle"]: row for row in output["rows"]}


# --------------------------------------------------------------------------- recorded


def test_every_rule_is_a_row_with_its_counter() -> None:
    handles = [row["handle"] for row in fixture("odd.json")["rows"]]
    assert handles == ["8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "19", "20", "21"]
    rows = by_handle(fixture("odd.json"))
    assert rows["10"] == {
        "family": "inet",
        "table": "cell_odd",
        "chain": "input",
        "handle": "10",
        "packets": "3",
        "bytes": "252",
        "ruleRepr": "icmp type echo-request counter",
    }


def test_rules_without_their_own_counter_have_null_counts() -> None:
    rows = by_handle(fixture("odd.json"))
    # vmap, named counter, no counter at all, jump, dynamic set update
    for handle in ("12", "13", "14", "15", "17"):
        assert (rows[handle]["packets"], rows[handle]["bytes"]) == (None, None), handle


def test_named_counters_are_listed_once() -> None:
    assert fixture("odd.json")["counters"] == [
        {
            "family": "inet",
            "table": "cell_odd",
            "name": "dns",
            "handle": "3",
            "packets": "4",
            "bytes": "512",
        }
    ]


def test_rule_reprs_follow_nft_syntax() -> None:
    reprs = {h: r["ruleRepr"] for h, r in by_handle(fixture("odd.json")).items()}
    assert reprs == {
        "8": 'ip daddr 1.2.3.4 tcp dport 443 counter accept comment "egress to api"',
        "9": "meta l4proto icmp limit rate 10/second counter accept",
        "10": "icmp type echo-request counter",
        "11": "ip saddr @allowed counter accept",
        "12": "tcp dport vmap @portmap",
        "13": 'udp dport 53 counter name "dns" accept',
        "14": "iif lo accept",
        "15": "jump common",
        "16": "ct state established,related counter accept",
        "17": "update @seen { ip saddr }",
        "19": 'ip saddr { 10.1.0.0/16, 10.2.0.1 } log prefix "dropped: " counter drop',
        "20": "tcp dport 1000-2000 counter counter reject with tcp reset",
        "21": "counter drop",
    }
    nat = [r["ruleRepr"] for r in fixture("nat.json")["rows"]]
    assert nat == [
        "oifname eth0 ip saddr 10.0.0.0/24 counter masquerade",
        "ip daddr 192.0.2.1 counter snat to 198.51.100.1",
        "tcp dport 8080 counter dnat to 10.0.0.2:80",
        "meta mark set 1 counter",
    ]


def test_unknown_expressions_are_kept_as_canonical_json() -> None:
    exprs = [{"osf": {"key": "name", "ttl": "loose"}}, {"queue": {"num": 3}}, {"accept": None}]
    assert rule_repr(exprs) == '{"osf":{"key":"name","ttl":"loose"}} {"queue":{"num":3}} accept'


def test_limit_shows_a_burst_only_when_not_the_default() -> None:
    assert rule_repr([{"limit": {"rate": 1, "per": "minute", "burst": 9}}]) == (
        "limit rate 1/minute burst 9"
    )
    assert rule_repr([{"limit": {"rate": 1, "rate_unit": "kbytes", "burst": 0, "inv": True}}]) == (
        "limit rate over 1 kbytes/second"
    )


def test_a_rule_with_two_counters_reports_the_first() -> None:
    doc = {
        "nftables": [
            {
                "rule": {
                    "family": "ip",
                    "table": "t",
                    "chain": "c",
                    "handle": 2,
                    "expr": [
                        {"counter": {"packets": 1, "bytes": 10}},
                        {"counter": {"packets": 2, "bytes": 20}},
                    ],
                }
            }
        ]
    }
    (row,) = parse_table(json.dumps(doc).encode())["rows"]
    assert (row["packets"], row["bytes"]) == ("1", "10")


def test_counters_past_2_63_come_back_unsigned() -> None:
    # nft prints 2^64 - 1 as -1 (recorded); SPEC 4 wants the counter as a decimal string.
    (row,) = fixture("big_counters.json")["rows"]
    assert (row["packets"], row["bytes"]) == ("9007199254740993", "18446744073709551615")


def test_an_empty_table_has_no_rows() -> None:
    assert fixture("empty.json") == {"rows": [], "counters": []}


def test_no_json_number_is_left_in_the_output() -> None:
    def numbers(value: object) -> Iterator[object]:
        if isinstance(value, dict):
            for item in value.values():
                yield from numbers(item)
        elif isinstance(value, list):
            for item in value:
                yield from numbers(item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield value

    for name in ("odd.json", "nat.json", "big_counters.json"):
        assert list(numbers(fixture(name))) == [], name


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        b'{"nftables": {}}',
        b'{"nftables": [{"rule": {}, "table": {}}]}',
        b'{"nftables": [{"rule": {"family": "ip", "table": "t", "chain": "c", "handle": 1}}]}',
        b'{"nftables": [{"rule": {"family": "ip", "table": "t", "chain": "c", "handle": true,'
        b' "expr": []}}]}',
        b'{"nftables": [{"rule": {"family": "ip", "table": "t", "chain": 7, "handle": 1,'
        b' "expr": []}}]}',
        b'{"nftables": [{"counter": {"family": "ip", "table": "t", "name": "n", "handle": 1,'
        b' "packets": 18446744073709551616, "bytes": 0}}]}',
        b'{"nftables": [{"counter": {"family": "ip", "table": "t", "name": "n", "handle": 1,'
        b' "packets": 1.5, "bytes": 0}}]}',
    ],
)
def test_malformed_output_is_a_parse_error(doc: bytes) -> None:
    with pytest.raises(Parse) as info:
        parse_table(doc)
    assert info.value.probe == "nftables"


# --------------------------------------------------------------------------- real


CELL_TABLE = """
table inet {table} {{
  counter named_dns {{ }}
  chain input {{
    type filter hook input priority 0; policy accept;
    icmp type echo-request counter accept
    udp dport 9999 counter drop
    udp dport 9998 drop
    udp dport 9997 counter name named_dns drop
    iif {iface} udp dport 9996 drop
  }}
}}
"""
PAYLOAD = 100
HEADERS = 20 + 8  # IPv4 + ICMP or UDP: an inet input counter counts the IP packet


@pytest.fixture
def cell_and_peer() -> Iterator[tuple[str, str, str, str]]:
    """(cell namespace, peer namespace, cell address, cell's veth): a veth between two
    test namespaces."""
    with netns("cpc") as cell, netns("cpp") as peer, veth_between(cell, peer, 7) as link:
        yield cell, peer, link[0], link[2]


async def test_counters_grow_by_what_was_sent_root(
    cell_and_peer: tuple[str, str, str, str],
) -> None:
    cell, peer, address, iface = cell_and_peer
    table = unique("cell_")
    nft(cell, CELL_TABLE.format(table=table, iface=iface))
    probe = NftablesProbe("inet", table, netns_path(cell))
    try:
        before = await probe.read(CTX)
        assert before.inputs == {
            "family": "inet",
            "table": table,
            "netns": netns_path(cell),
            "command": f"nft -j list table inet {table}",
        }
        reprs = [row["ruleRepr"] for row in before.output["rows"]]
        assert reprs == [
            "icmp type echo-request counter accept",
            "udp dport 9999 counter drop",
            "udp dport 9998 drop",
            'udp dport 9997 counter name "named_dns" drop',
            # named from the cell's namespace: its index means another link in ours
            f"iif {iface} udp dport 9996 drop",
        ]
        assert [r["packets"] for r in before.output["rows"]] == ["0", "0", None, None, None]

        icmp = in_netns(peer, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))
        udp = in_netns(peer, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with icmp, udp:
            for seq in range(3):
                icmp.sendto(echo_request(0x4242, seq, b"p" * PAYLOAD), (address, 0))
            for port, count in ((9999, 5), (9998, 4), (9997, 2)):
                for _ in range(count):
                    udp.sendto(b"u" * PAYLOAD, (address, port))

        async def arrived() -> bool:
            reading = await probe.read(CTX)
            return reading.output["counters"][0]["packets"] == "2"

        await until(arrived, "the last UDP datagrams to be counted")
        after = (await probe.read(CTX)).output
        icmp_row, udp_row, silent_row, named_row, _ = after["rows"]
        assert (icmp_row["packets"], icmp_row["bytes"]) == ("3", str(3 * (HEADERS + PAYLOAD)))
        assert (udp_row["packets"], udp_row["bytes"]) == ("5", str(5 * (HEADERS + PAYLOAD)))
        assert (silent_row["packets"], named_row["packets"]) == (None, None)
        assert after["counters"][0]["bytes"] == str(2 * (HEADERS + PAYLOAD))
        assert [r["handle"] for r in after["rows"]] == [r["handle"] for r in before.output["rows"]]
    finally:
        probe.close()


async def test_a_missing_table_is_io_root() -> None:
    with netns() as cell:
        probe = NftablesProbe("inet", "no_such_table", netns_path(cell))
        try:
            with pytest.raises(Io) as info:
                await probe.read(CTX)
        finally:
            probe.close()
    assert info.value.command == "list table inet no_such_table"
    assert "No such file or directory" in info.value.reason


async def test_a_missing_namespace_is_io_root() -> None:
    probe = NftablesProbe("inet", "t", "/run/netns/cpt-never-created")
    with pytest.raises(Io) as info:
        await probe.read(CTX)
    assert info.value.path == "/run/netns/cpt-never-created"


async def test_a_recreated_namespace_is_read_afresh_root() -> None:
    """A cell restarted under the same namespace path must not be read through the old
    namespace (which our socket would otherwise keep alive)."""
    name = unique("cpr")
    probe = NftablesProbe("inet", "cell_t", netns_path(name))
    try:
        for rule in ("udp dport 1 counter drop", "udp dport 2 counter accept"):
            run("ip", "netns", "add", name)
            try:
                nft(name, f"table inet cell_t {{ chain c {{ {rule}; }}; }}")
                (row,) = (await probe.read(CTX)).output["rows"]
                assert row["ruleRepr"] == rule
            finally:
                run("ip", "netns", "del", name)
    finally:
        probe.close()


async def test_our_own_namespace_without_netns_root() -> None:
    table = unique("cpt_")  # no chain, so no hook: inert in the host's ruleset
    run("nft", "add", "table", "ip", table)
    probe = NftablesProbe("ip", table)
    try:
        reading = await probe.read(CTX)
        assert reading.output == {"rows": [], "counters": []}
        assert reading.inputs["netns"] is None
    finally:
        probe.close()
        run("nft", "delete", "table", "ip", table)
