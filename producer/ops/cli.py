"""``cellos-producer`` command line.

Exit codes: 0 success; 1 a runtime failure or a chain that does not verify; 2 bad usage,
bad configuration or an unusable key file (the message names the key or file).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from audit.errors import AuditError, TrustFileError
from audit.options import add_verify_arguments
from producer import __version__
from producer.errors import ConfigError, KeyFileError, ProducerError

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
        help="run the daemon (SIGTERM/SIGINT: seal chains, drain, exit 0)",
        description="Run the producer daemon with the cells of the config file.",
    )
    run.add_argument("--config", "-c", metavar="FILE", help="TOML config file (see README)")
    run.add_argument("--nats-url", metavar="URL", help="override nats.url")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["auto", "json", "text"])

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
    demo.add_argument("--mode", choices=["adaptive", "strict"], default="adaptive")
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
    sim.add_argument("--seed", type=int, default=None)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = COMMANDS[args.command](args)
    except (ConfigError, KeyFileError, TrustFileError) as exc:
        print(f"cellos-producer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ProducerError, AuditError) as exc:
        print(f"cellos-producer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from producer.ops.config import load_config
    from producer.ops.daemon import Producer
    from producer.ops.logs import setup_logging

    config = load_config(
        args.config,
        overrides={
            "nats.url": args.nats_url,
            "log.level": args.log_level,
            "log.format": args.log_format,
        },
    )
    setup_logging(config.log.level, config.log.format)
    producer = Producer(config)
    drained = asyncio.run(producer.serve())
    # Events not acknowledged within the grace period are lost with this process: say so.
    return EXIT_OK if drained else EXIT_FAILED


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

    try:
        sent = asyncio.run(run_guest(args.socket, rate=args.rate, count=args.count, seed=args.seed))
    except KeyboardInterrupt:
        return EXIT_OK
    print(f"sent {sent} frames to {args.socket}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from audit.cli import run_verify

    return asyncio.run(run_verify(args))


COMMANDS = {
    "run": _cmd_run,
    "demo": _cmd_demo,
    "keygen": _cmd_keygen,
    "pubkey": _cmd_pubkey,
    "simulate-guest": _cmd_simulate,
    "verify": _cmd_verify,
}


if __name__ == "__main__":
    sys.exit(main())
