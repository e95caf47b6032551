"""deploy/ is linted with the tools that will read it, and checked against the code.

systemd units and snippets with systemd-analyze / systemd-sysusers / systemd-tmpfiles,
Prometheus files with promtool (``make test`` installs it into the venv), the dashboard's
queries with promtool too, NATS configuration with nats-server's own check, and the
JetStream definitions against what the producer itself creates on a real server. A
missing tool fails these tests: they must not pass by skipping.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StreamConfig

from producer.delivery.heads import open_bucket
from producer.ops.config import SpoolConfig
from producer.ops.embedded import EmbeddedNats, find_binary
from tests.natsauth import make_pki
from tests.support import REPO

DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "cellos-producer.json"
OPERATIONS = REPO / "docs" / "operations.md"
CLI = Path(sys.executable).parent / "cellos-producer"

METRICS = {
    "cellos_producer_build_info",
    "cellos_producer_cells",
    "cellos_producer_frames_accepted_total",
    "cellos_producer_frames_rejected_total",
    "cellos_producer_events_total",
    "cellos_producer_events_signed_total",
    "cellos_producer_agents_silenced_total",
    "cellos_producer_guest_connections_refused_total",
    "cellos_producer_frame_deadline_exceeded_total",
    "cellos_producer_publish_latency_seconds",
    "cellos_producer_publish_inflight",
    "cellos_producer_publish_backlog",
    "cellos_producer_publish_retries_total",
    "cellos_producer_publish_acked_total",
    "cellos_producer_publish_duplicates_total",
    "cellos_producer_broker_connected",
    "cellos_producer_spool_events",
    "cellos_producer_spool_bytes",
    "cellos_producer_spool_oldest_age_seconds",
    "cellos_producer_spool_full",
    "cellos_producer_spool_write_errors_total",
    "cellos_producer_probe_readings_total",
    "cellos_producer_probe_errors_total",
    "cellos_producer_probe_duration_seconds",
    "cellos_producer_chains_open",
    "cellos_producer_chains_draining",
}
"""The metrics the daemon exports (issue 9); the dashboard and alerts use no others."""

HISTOGRAMS = {"cellos_producer_publish_latency_seconds", "cellos_producer_probe_duration_seconds"}

ALERTS = {
    "CellosProducerDown",
    "CellosProducerBrokerDown",
    "CellosProducerSpoolGrowing",
    "CellosProducerSpoolOldestTooOld",
    "CellosProducerSpoolFull",
    "CellosProducerSpoolWriteErrors",
    "CellosProducerAgentSilenced",
    "CellosProducerFramesRejected",
    "CellosProducerChainNotSealed",
    "CellosProducerProbeFailing",
}


def tool(name: str) -> str:
    """The venv's copy first (promtool, nats-server), then PATH; fail, never skip."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: `make test` installs it (see the Makefile)")
    return found


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


# --------------------------------------------------------------------------- systemd


def _unit_for_this_host(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's entry point: verify checks that the
    binary exists and is executable."""
    text = (DEPLOY / "cellos-producer.service").read_text()
    unit = tmp_path / "cellos-producer.service"
    unit.write_text(text.replace("/opt/cellos-producer/.venv/bin/cellos-producer", str(CLI)))
    return unit


def test_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    unit = _unit_for_this_host(tmp_path)
    done = run(tool("systemd-analyze"), "verify", str(unit))
    # verify exits 0 on unknown keys and bad values, so any output is a failure.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done


def test_unit_exposure_stays_low(tmp_path: Path) -> None:
    unit = _unit_for_this_host(tmp_path)
    done = run(tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done
    assert float(match[1]) <= 3.0, done.stdout


def _directives(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z][A-Za-z]+=", line)
    )


def test_unit_promises() -> None:
    unit = _directives((DEPLOY / "cellos-producer.service").read_text())
    assert unit["User"] == "cellos-producer"
    assert unit["ProtectSystem"] == "strict" and unit["NoNewPrivileges"] == "yes"
    assert set(unit["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    assert unit["AmbientCapabilities"] == unit["CapabilityBoundingSet"]
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["StateDirectory"] == "cellos-producer" and unit["RuntimeDirectory"]
    # systemd must not SIGKILL the suspend while it waits for PubAcks.
    assert float(unit["TimeoutStopSec"]) >= 2 * SpoolConfig().stop_grace_s
    assert "seals" not in (DEPLOY / "cellos-producer.service").read_text()


def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for kind in ("sysusers", "tmpfiles"):
        target = root / "usr" / "lib" / f"{kind}.d" / "cellos-producer.conf"
        target.parent.mkdir(parents=True)
        shutil.copy(DEPLOY / f"cellos-producer.{kind}", target)
    done = run(tool("systemd-sysusers"), f"--root={root}")
    assert done.returncode == 0, done
    assert re.search(
        r"^cellos-producer:x:\d+:\d+:.*:/usr/sbin/nologin$",
        (root / "etc" / "passwd").read_text(),
        re.MULTILINE,
    )
    done = run(tool("systemd-tmpfiles"), f"--root={root}", "--create")
    assert done.returncode == 0 and "ignoring" not in done.stderr, done
    assert (root / "etc" / "cellos-producer").stat().st_mode & 0o777 == 0o750
    assert (root / "var" / "lib" / "cellos-producer").is_dir()


# --------------------------------------------------------------------------- Prometheus


def test_alert_rules_pass_promtool() -> None:
    done = run(tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert done.returncode == 0, done


def test_alert_unit_tests_pass() -> None:
    """alerts.test.yml feeds each alert series that must and must not fire it."""
    done = run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert done.returncode == 0, done
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert tested == ALERTS


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    text = (PROMETHEUS / "scrape.yml").read_text()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        text.replace("/etc/prometheus/rules/cellos-producer.yml", str(PROMETHEUS / "alerts.yml"))
    )
    done = run(tool("promtool"), "check", "config", str(config))
    assert done.returncode == 0, done
    assert "9464" in text


def _alert_rules() -> list[dict[str, Any]]:
    text = (PROMETHEUS / "alerts.yml").read_text()
    # promtool has validated the YAML; a small reader is enough to list rule fields.
    rules: list[dict[str, Any]] = []
    for block in re.split(r"\n      - alert: ", text)[1:]:
        name, _, body = block.partition("\n")
        expr = re.search(r"expr: (?:>-\n)?((?:.|\n)*?)\n        (?:for|labels):", body)
        runbook = re.search(r'runbook_url: "docs/operations.md#([a-z-]+)"', body)
        assert expr and runbook, name
        rules.append({"alert": name.strip(), "expr": expr[1], "anchor": runbook[1]})
    return rules


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(cellos_producer_\w+|up)\b", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("cellos") else n for n in names}


def test_alerts_cover_the_issue_and_use_only_exported_metrics() -> None:
    rules = _alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert _metric_names(rule["expr"]) <= METRICS | {"up"}, rule


def _headings(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_every_alert_has_its_runbook_section() -> None:
    anchors = _headings(OPERATIONS.read_text())
    for rule in _alert_rules():
        assert rule["anchor"] in anchors, rule["alert"]
        assert rule["anchor"] == rule["alert"].lower()


def _dashboard_targets() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def test_dashboard_is_grafana_json_with_a_host_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "cellos_producer_build_info" in variables["instance"]["definition"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_queries_pass_promtool_and_show_every_metric(tmp_path: Path) -> None:
    exprs = _dashboard_targets()
    used: set[str] = set()
    rules = []
    for i, expr in enumerate(exprs):
        used |= _metric_names(expr)
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    # JSON is YAML: promtool parses every query as it would a recording rule.
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run(tool("promtool"), "check", "rules", str(rule_file))
    assert done.returncode == 0, done
    assert used == METRICS, (used - METRICS, METRICS - used)
    for histogram in HISTOGRAMS:
        assert any(f"{histogram}_bucket" in e for e in exprs), histogram


# --------------------------------------------------------------------------- NATS


def test_stream_and_bucket_definitions_are_json() -> None:
    for name in ("stream.json", "heads-bucket.json"):
        definition = json.loads((DEPLOY / name).read_text())
        assert definition["storage"] == "file" and definition["num_replicas"] == 1, name


async def test_heads_bucket_definition_is_what_the_producer_creates(tmp_path: Path) -> None:
    """Created from deploy/heads-bucket.json (as `nats stream add --config` does), the
    bucket is one the producer binds to unchanged; and it matches, field for field, the
    one the producer creates on a broker without it."""
    definition = json.loads((DEPLOY / "heads-bucket.json").read_text())
    bucket = definition["name"].removeprefix("KV_")
    async with EmbeddedNats(tmp_path / "a") as given, EmbeddedNats(tmp_path / "b") as bare:
        nc_given = await nats.connect(given.url)
        nc_bare = await nats.connect(bare.url)
        try:
            js = nc_given.jetstream()
            await js.add_stream(StreamConfig.from_response(dict(definition)))
            kv = await open_bucket(js, bucket)
            await kv.put("cell-1.run-1.chain", b"{}")
            assert (await kv.get("cell-1.run-1.chain")).value == b"{}"
            after = (await js.stream_info(definition["name"])).config.as_dict()

            created_js = nc_bare.jetstream()
            await open_bucket(created_js, bucket)
            created = (await created_js.stream_info(definition["name"])).config.as_dict()
        finally:
            await nc_given.close()
            await nc_bare.close()
    for key, value in definition.items():
        assert after[key] == value, key
        assert created[key] == value, key


def _cluster_files(tmp_path: Path) -> Path:
    """deploy/nats/ with its certificate and store paths pointed at files made here."""
    target = tmp_path / "nats"
    shutil.copytree(DEPLOY / "nats", target)
    pki = make_pki(tmp_path / "pki")
    shared = target / "cluster.conf"
    text = shared.read_text()
    for name, path in (("server.pem", pki.server_cert), ("server.key", pki.server_key)):
        text = text.replace(f"/etc/nats/tls/{name}", path)
    text = text.replace("/etc/nats/tls/ca.pem", pki.ca)
    shared.write_text(text.replace("/var/lib/nats/jetstream", str(tmp_path / "js")))
    return target


@pytest.mark.parametrize("node", ["nats-1.conf", "nats-2.conf", "nats-3.conf"])
def test_cluster_node_configs_pass_nats_server_check(tmp_path: Path, node: str) -> None:
    directory = _cluster_files(tmp_path)
    done = run(find_binary(), "-t", "-c", str(directory / node))
    assert done.returncode == 0 and "is valid" in done.stdout + done.stderr, done
    assert f"server_name: {node.removesuffix('.conf')}" in (directory / node).read_text()
