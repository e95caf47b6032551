"""``cellos-producer`` command line.

Exit codes: 0 success; 1 a runtime failure or a chain that does not verify; 2 bad usage,
bad configuration or an unusable key file (the message names the key or file).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import msgspec

from audit.errors import AuditError, ConnectOptionsError, TrustFileError
from audit.options import add_verify_arguments
from producer import __version__
from producer.errors import (
    ConfigError,
    KeyFileError,
    ProducerError,
    RegistrationError,
    SpoolError,
)
from producer.ops.config import CellSpec, field_help

DEFAULT_CONTROL_SOCKET = "/var/lib/cellos-producer/control.sock"
DEFAULT_CONFIG = "/etc/cellos-producer/config.toml"
CONFIG_ENV = "CELLOS_PRODUCER_CONFIG"


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cellos-producer",
        description=(
            "Host daemon for CellOS microVM fleets: reads each cell's guest telemetry over its "
            "vsock socket, host-stamps it, and publishes hash-chained, Ed25519-signed "
            "CloudEvents to NATS JetStream (one subject tree per cell)."
        ),
        epilog="Try: cellos-producer demo  (embedded NATS, simulated cells, verified chains).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the daemon (SIGTERM/SIGINT: stop reading, spool, drain, exit 0)",
        description="Run the producer daemon with the cells of the config file.",
    )
    run.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help=f"TOML config file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG}; see README)",
    )
    run.add_argument("--nats-url", metavar="URL", help="override nats.url")
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override log.level"
    )
    run.add_argument("--log-format", choices=["auto", "json", "text"], help="override log.format")

    demo = sub.add_parser(
        "demo",
        help="embedded NATS + simulated cells, live view, then verify every chain",
        description=(
            "Start an embedded nats-server (or use --nats-url), register simulated cells, "
            "stream their guest telemetry for a while, seal the chains and verify them "
            "from JetStream. Exit 0 only if every chain verifies."
        ),
    )
    demo.add_argument("--cells", type=int, default=3, help="number of cells (default 3)")
    demo.add_argument(
        "--seconds", type=float, default=20.0, help="how long the guests run; 0 = until Ctrl-C"
    )
    demo.add_argument("--rate", type=float, default=20.0, help="frames/s per guest (default 20)")
    demo.add_argument("--nats-url", metavar="URL", help="use this server instead of embedded")
    demo.add_argument("--data-dir", metavar="DIR", help="keep key, trust.json, store here")
    demo.add_argument(
        "--mode",
        choices=["adaptive", "strict"],
        default="adaptive",
        help="signing mode (default adaptive)",
    )
    demo.add_argument("--binary", action="store_true", help="CloudEvents binary mode")

    keygen = sub.add_parser(
        "keygen",
        help="create an Ed25519 signing key file (mode 0600)",
        description=(
            "Create a new Ed25519 signing key (PEM PKCS#8, mode 0600) and print its key id "
            "and public key. Refuses to overwrite an existing file."
        ),
    )
    keygen.add_argument("--out", required=True, metavar="FILE", help="key file to create")

    pubkey = sub.add_parser(
        "pubkey",
        help="print a key's kid/public key; write a trust file",
        description=(
            "Print the key id and public key of a signing key file, and optionally create "
            "or merge the trust file verifiers use (SPEC 5.4: {kid: base64url public key})."
        ),
    )
    pubkey.add_argument("--key", required=True, metavar="FILE", help="signing key file")
    pubkey.add_argument("--kid", help="key id to use instead of the derived one")
    pubkey.add_argument(
        "--trust-file", metavar="OUT", help="create or merge this trust file (SPEC 5.4)"
    )

    sim = sub.add_parser(
        "simulate-guest",
        help="act as the in-guest agent: connect to a cell socket and send frames",
        description=(
            "Behave like the guest agent (cellos-telemetry in the VM) behind Firecracker: "
            "connect to a cell's "
            "socket (<vsock_uds_base>_9001), reconnecting if needed, and write realistic "
            "frames of every kind."
        ),
    )
    sim.add_argument("--socket", required=True, metavar="PATH", help="<vsock_uds_base>_9001")
    sim.add_argument("--rate", type=float, default=10.0, help="frames/s; 0 = as fast as possible")
    sim.add_argument("--count", type=int, default=None, help="frames to send (default: forever)")
    sim.add_argument(
        "--seed", type=int, default=None, help="seed of the made-up workload (reproducible)"
    )

    spool = sub.add_parser(
        "spool",
        help="inspect the write-ahead spool: stats, or check its integrity",
        description=(
            "Read the spool under a data dir without changing it (safe while the daemon "
            "runs). 'stats': events waiting, bytes, oldest age, backlog per cell, each "
            "chain's state. 'check': the same, and exit 1 if any byte is damaged or any "
            "chain is inconsistent."
        ),
    )
    spool.add_argument(
        "action", choices=["stats", "check"], help="stats: report; check: also exit 1 on damage"
    )
    where = spool.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", metavar="DIR", help="the daemon's data_dir")
    where.add_argument("--config", "-c", metavar="FILE", help="read data_dir from this config")
    spool.add_argument("--json", action="store_true", help="print the report as JSON")

    cell = sub.add_parser(
        "cell",
        help="register, deregister, list or show cells through the running daemon",
        description=(
            "Talk to the daemon's control API (its Unix socket). 'add' answers once the cell's "
            "socket is bound, so the VM may boot right after; 'remove' seals the chain."
        ),
    )
    cell_sub = cell.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = cell_sub.add_parser("add", help="register a cell (its socket is bound on return)")
    for field in msgspec.structs.fields(CellSpec):
        flag = "--" + field.name.replace("_", "-")
        kind = int if field.name == "vsock_cid" else str
        add.add_argument(
            flag,
            dest=field.name,
            type=kind,
            required=field.required,
            metavar=field.name.upper(),
            help=field_help(CellSpec, field.name),
        )
    remove = cell_sub.add_parser("remove", help="deregister a cell: seal its chain")
    remove.add_argument("cell_id", metavar="CELL_ID", help="the cell to deregister")
    cell_sub.add_parser("list", help="the cells being served")
    show = cell_sub.add_parser("show", help="one cell: counters, chain head, probes")
    show.add_argument("cell_id", metavar="CELL_ID", help="the cell to show")
    status = sub.add_parser(
        "status",
        help="broker connection, backlog, spool and cells of the running daemon",
        description="Ask the running daemon, over its control socket, how it is doing.",
    )
    for command in (add, remove, cell_sub.choices["list"], show, status):
        _control_options(command)

    verify = sub.add_parser(
        "verify",
        help="verify chains from JetStream or an export (exit 1 unless all intact)",
        description=(
            "Read every chain (or one cell's) back from JetStream, or from an export file, "
            "and check sequence, prevhash links, signatures against the trust file, seals "
            "and recorded heads; one verdict per chain. Exits 1 unless every chain is "
            "intact. The same command as `cellos-audit verify`."
        ),
    )
    add_verify_arguments(verify)
    return p


def _control_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--control-socket",
        metavar="PATH",
        help=f"the daemon's control socket (default: {DEFAULT_CONTROL_SOCKET})",
    )
    where.add_argument(
        "--config", "-c", metavar="FILE", help="find the control socket from this config"
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = COMMANDS[args.command](args)
    except (
        ConfigError,
        KeyFileError,
        TrustFileError,
        ConnectOptionsError,
        RegistrationError,
        SpoolError,
    ) as exc:
        print(f"cellos-producer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ProducerError, AuditError) as exc:
        print(f"cellos-producer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    return code


def config_path(args: argparse.Namespace) -> str:
    """The config file ``run`` reads: ``--config``, else ``$CELLOS_PRODUCER_CONFIG``, else
    the packaged default location. A missing default file is an error naming it (a daemon
    silently running on built-in defaults serves no cell)."""
    path = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    if not args.config and not os.path.exists(path):
        raise ConfigError(
            "config", f"{path} does not exist; pass --config FILE (or set ${CONFIG_ENV})"
        )
    return str(path)


def _cmd_run(args: argparse.Namespace) -> int:
    from producer.ops.config import load_config
    from producer.ops.daemon import Producer
    from producer.ops.logs import event, get_logger, setup_logging

    path = config_path(args)
    config = load_config(
        path,
        overrides={
            "nats.url": args.nats_url,
            "log.level": args.log_level,
            "log.format": args.log_format,
        },
    )
    setup_logging(config.log.level, config.log.format)
    event(get_logger("producer.ops.cli"), logging.INFO, "config_loaded", path=path)
    producer = Producer(config)
    asyncio.run(producer.serve())
    # Events not yet acknowledged stay in the spool for the next start: a stop loses
    # nothing. Only a failure the producer stopped on by itself is an error.
    if producer.fatal is not None:
        print(f"cellos-producer: {producer.fatal}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from producer.ops.demo import DemoOptions, run_demo

    return asyncio.run(
        run_demo(
            DemoOptions(
                cells=args.cells,
                seconds=args.seconds,
                rate=args.rate,
                nats_url=args.nats_url,
                data_dir=args.data_dir,
                mode=args.mode,
                binary=args.binary,
            )
        )
    )


def _cmd_keygen(args: argparse.Namespace) -> int:
    from producer.chain.signing import generate_key_file

    signer = generate_key_file(args.out)
    print(f"wrote {args.out} (mode 0600)")
    print(f"kid: {signer.kid}")
    print(f"public key: {signer.public_key_b64}")
    return EXIT_OK


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from audit.keys import merge_trust
    from producer.chain.signing import Signer

    signer = Signer.load(args.key, kid=args.kid)
    print(f"kid: {signer.kid}")
    print(f"public key: {signer.public_key_b64}")
    if args.trust_file:
        merge_trust(args.trust_file, signer.kid, signer.public_raw)
        print(f"trust file {args.trust_file} now lists {signer.kid}")
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    from producer.guest.simulator import run_guest

    said: set[str] = set()

    def cannot_connect(exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        if reason not in said:  # once per kind of failure, not once per retry
            said.add(reason)
            print(
                f"cannot connect to {args.socket}: {reason}; retrying (Ctrl-C to stop)",
                file=sys.stderr,
                flush=True,
            )

    try:
        sent = asyncio.run(
            run_guest(
                args.socket,
                rate=args.rate,
                count=args.count,
                seed=args.seed,
                on_connect_error=cannot_connect,
            )
        )
    except KeyboardInterrupt:
        return EXIT_OK
    print(f"sent {sent} frames to {args.socket}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from audit.cli import run_verify

    return asyncio.run(run_verify(args))


def _cmd_spool(args: argparse.Namespace) -> int:
    from producer.delivery.inspect import inspect_spool
    from producer.ops.config import load_config

    data_dir = args.data_dir or load_config(args.config).data_dir
    report = inspect_spool(os.path.join(data_dir, "spool"))
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(
            f"spool {report.directory}: state {report.state}, last stop "
            f"{'clean' if report.clean_stop else 'not clean'}"
            f"{f' at {report.stopped_at}' if report.stopped_at else ''}"
        )
        print(
            f"  {report.unacked} event(s) waiting, {report.bytes} bytes in "
            f"{len(report.segments)} segment(s), oldest waiting since "
            f"{report.oldest_unacked_at or '-'}"
        )
        for cell, behind in sorted(report.backlog_by_cell.items()):
            print(f"  backlog cell={cell} events={behind}")
        for c in report.chains:
            state = "sealed" if c.sealed else "open"
            print(
                f"  chain {c.chain_id} cell={c.cell_id} run={c.run_id} seq={c.sequence} "
                f"acked={c.acked} {state} last={c.last_event_at or '-'} ({c.source})"
            )
        for name in report.quarantined:
            print(f"  quarantined: {name}")
        for problem in report.problems:
            print(f"  PROBLEM: {problem}")
    if args.action == "check" and report.problems:
        return EXIT_FAILED
    return EXIT_OK


def _control_socket(args: argparse.Namespace) -> str:
    if args.control_socket:
        return str(args.control_socket)
    if args.config:
        from producer.ops.config import load_config

        config = load_config(args.config)
        if config.control.socket == "":
            raise ConfigError("control.socket", "the control API is turned off in this config")
        return config.control.socket or os.path.join(config.data_dir, "control.sock")
    return DEFAULT_CONTROL_SOCKET


def _cmd_cell(args: argparse.Namespace) -> int:
    from producer.ops.control_client import request

    socket = _control_socket(args)
    if args.action == "add":
        body = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(CellSpec)}
        body = {k: v for k, v in body.items() if v is not None}
        status, answer = asyncio.run(request(socket, "POST", "/v1/cells", body))
        verb = "registered" if status == 201 else "already registered"
    elif args.action == "remove":
        status, answer = asyncio.run(request(socket, "DELETE", f"/v1/cells/{args.cell_id}"))
        verb = "sealed" if status == 200 else "sealed, still draining to JetStream"
    elif args.action == "show":
        _, answer = asyncio.run(request(socket, "GET", f"/v1/cells/{args.cell_id}"))
        verb = ""
    else:
        _, answer = asyncio.run(request(socket, "GET", "/v1/cells"))
        verb = ""
    if args.json or args.action == "show":
        print(msgspec.json.format(msgspec.json.encode(answer), indent=2).decode())
    elif args.action == "list":
        for c in answer["cells"]:
            print(
                f"{c['cell_id']} run={c['run_id']} chain={c['chain_id']} {c['state']} "
                f"seq={c['sequence']} acked={c['acked_sequence']} "
                f"frames={c['counters']['frames_accepted']} last_frame={c['last_frame_at']}"
            )
        print(f"{len(answer['cells'])} cell(s)")
    else:
        print(
            f"{verb}: cell {answer['cell_id']} run {answer['run_id']} chain {answer['chain_id']}"
            f" socket {answer['socket_path']}"
        )
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from producer.ops.control_client import request

    _, answer = asyncio.run(request(_control_socket(args), "GET", "/v1/status"))
    if args.json:
        print(msgspec.json.encode(answer).decode())
        return EXIT_OK
    spool = answer["spool"]
    print(f"cellos-producer {answer['version']} on {answer['host_id']}")
    print(f"  broker: {'connected' if answer['broker_connected'] else 'NOT connected'}")
    print(
        f"  cells: {answer['cells']}, open chains: {answer['chains_open']}, "
        f"draining: {answer['chains_draining']}"
    )
    print(
        f"  spool: {spool['events']} event(s) waiting, {spool['bytes']} bytes, oldest "
        f"{spool['oldest_age_s']} s{', FULL' if spool['full'] else ''}; "
        f"publish backlog {answer['publish_backlog']}"
    )
    return EXIT_OK


COMMANDS = {
    "run": _cmd_run,
    "cell": _cmd_cell,
    "status": _cmd_status,
    "spool": _cmd_spool,
    "demo": _cmd_demo,
    "keygen": _cmd_keygen,
    "pubkey": _cmd_pubkey,
    "simulate-guest": _cmd_simulate,
    "verify": _cmd_verify,
}


if __name__ == "__main__":
    sys.exit(main())
