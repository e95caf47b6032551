"""Command-line options shared by ``cellos-audit`` and ``cellos-producer verify``.

Kept free of NATS and crypto imports so that building a parser (``--help``) stays fast.
"""

from __future__ import annotations

import argparse
from typing import Final

DEFAULT_STREAM: Final = "CELLOS_TELEMETRY"
DEFAULT_PREFIX: Final = "cellos.telemetry"
DEFAULT_HEADS_BUCKET: Final = "CELLOS_CHAIN_HEADS"


# Flag -> NatsAuth field: the same settings as the daemon's [nats] keys of those names, so
# one set of secret files serves both; secrets only ever come from files (never argv).
SECURITY_FLAGS: Final = {
    "--user": ("user", "NAME", "user name (password from --password-file)"),
    "--password-file": ("password_file", "FILE", "file holding the user's password"),
    "--token-file": ("token_file", "FILE", "file holding an authentication token"),
    "--nkey-seed-file": ("nkey_seed_file", "FILE", "file holding an NKey user seed"),
    "--creds": ("credentials", "FILE", "NATS .creds file (user JWT + NKey seed)"),
    "--tls-ca": ("tls_ca_file", "FILE", "CA bundle that verifies the server"),
    "--tls-cert": ("tls_cert_file", "FILE", "client certificate (mutual TLS)"),
    "--tls-key": ("tls_key_file", "FILE", "client certificate's private key"),
    "--tls-hostname": ("tls_hostname", "NAME", "name the server certificate must carry"),
}


def add_connection(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group(
        "NATS connection", "security as the daemon's [nats] keys of the same names"
    )
    g.add_argument(
        "--nats-url",
        metavar="URL",
        required=required,
        help="nats://host:4222, or a cluster's servers comma-separated",
    )
    for flag, (field, metavar, text) in SECURITY_FLAGS.items():
        g.add_argument(flag, dest=f"nats_{field}", metavar=metavar, help=text)
    g.add_argument("--stream", default=DEFAULT_STREAM, help=f"stream (default {DEFAULT_STREAM})")
    g.add_argument(
        "--subject-prefix", default=DEFAULT_PREFIX, help=f"subject prefix ({DEFAULT_PREFIX})"
    )
    g.add_argument(
        "--heads-bucket",
        default=DEFAULT_HEADS_BUCKET,
        help=f"key-value bucket of recorded chain heads ({DEFAULT_HEADS_BUCKET})",
    )


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    """The ``verify`` options; shared with ``cellos-producer verify``."""
    add_connection(p, required=False)
    p.add_argument("--jsonl", metavar="FILE", help="verify an export or JSON-lines file offline")
    p.add_argument("--cell", metavar="ID", help="only this cell's chains (its subjects only)")
    p.add_argument("--trust", required=True, metavar="FILE", help="trust file (SPEC 5.4)")
    p.add_argument(
        "--require-sealed", action="store_true", help="also fail chains that are still open"
    )
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument(
        "--every-signature",
        action="store_true",
        help="check every signature directly (default: anchors, the rest through the hash links)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes checking signatures (default: one per CPU for 20,000 messages or more)",
    )
