"""Write a private CA and TLS certificates for an ntkdist Dask cluster.

    python deploy/tls.py ~/.ntkdist/tls --host scheduler.example.org --host 10.0.0.5

Writes ``ca.pem``, ``ca-key.pem`` and ``<role>.pem``/``<role>-key.pem`` for the
scheduler, workers and clients (keys mode 0600). Give workers ``ca.pem`` and the
worker pair, clients ``ca.pem`` and the client pair, and keep ``ca-key.pem``
to yourself. Needs the ``cryptography`` package.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ntkdist.cluster import write_tls_certificates

if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the certificates into the given directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="host name or IP for the certificates (repeatable); "
        "localhost and 127.0.0.1 are always included",
    )
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)
    hosts = ["localhost", "127.0.0.1", *args.host]
    out = write_tls_certificates(args.directory, hosts=hosts, days=args.days)
    print(f"wrote {sorted(p.name for p in out.glob('*.pem'))} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
