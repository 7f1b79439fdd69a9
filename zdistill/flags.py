"""Command-line flags every zdistill daemon shares, declared once so they read the same everywhere."""

from __future__ import annotations

import argparse
import logging
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def add_db_flags(p: argparse.ArgumentParser) -> None:
    """Where Redis is, and its password (EDL's flag names, plus dashed spellings)."""
    p.add_argument("--db_endpoints", "--db-endpoints", required=True,
                   help="Redis as HOST:PORT, or a redis:// / rediss:// URL")
    p.add_argument("--db_passwd", "--db-passwd", default=None,
                   help="Redis password (or set $ZDISTILL_DB_PASSWD, which keeps it out of the process list)")


def add_daemon_flags(p: argparse.ArgumentParser, curve: bool) -> None:
    """Metrics, logging and (for servers) CURVE keys."""
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    if curve:
        p.add_argument("--curve-secret-key", default=None,
                       help="CURVE: this server's secret key file (python -m zdistill.security keygen); off if unset")
        p.add_argument("--curve-allow", default=None, help="CURVE: folder of the client public keys allowed in")
    add_log_level(p)


def add_log_level(p: argparse.ArgumentParser, default: str = "INFO") -> None:
    p.add_argument("--log-level", default=default, metavar="LEVEL",
                   help=f"log messages of this level and above: {', '.join(LOG_LEVELS)} (default {default})")


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; a level that is none exits 2 with one line, as a bad flag does."""
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        sys.stderr.write(f"{sys.argv[0].rsplit('/', 1)[-1] or 'zdistill'}: --log-level {str(level)[:40]!r} "
                         f"is not one of {', '.join(LOG_LEVELS)}\n")
        raise SystemExit(2)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("redis").setLevel(max(logging.INFO, logging.getLogger().level))
