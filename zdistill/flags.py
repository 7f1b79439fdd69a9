"""Command-line flags every zdistill daemon shares, declared once so they read the same everywhere."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from zdistill.errors import ConfigError

log = logging.getLogger("zdistill.flags")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PASSWORD_ENV = "ZDISTILL_DB_PASSWD"
MAX_PASSWORD_FILE = 64 * 1024


def add_db_flags(p: argparse.ArgumentParser) -> None:
    """Where Redis is, and its password (EDL's flag names, plus dashed spellings)."""
    p.add_argument("--db_endpoints", "--db-endpoints", required=True,
                   help="Redis as HOST:PORT, or a redis:// / rediss:// / unix:// URL")
    p.add_argument("--db_passwd", "--db-passwd", default=None,
                   help="Redis password: visible to every user in the process list, so prefer "
                        f"--db_passwd_file or ${PASSWORD_ENV}")
    p.add_argument("--db_passwd_file", "--db-passwd-file", default=None, metavar="PATH",
                   help=f"read the Redis password from this file (its trailing newline dropped); "
                        f"else ${PASSWORD_ENV} is used")


def db_password(flag_value: str | None = None, path: str | None = None) -> str | None:
    """The Redis password: ``--db_passwd``, else the file ``--db_passwd_file``, else ``$ZDISTILL_DB_PASSWD``.

    A file or the variable keeps the password out of ``ps``; the file's trailing
    newline (what ``echo`` and most secret mounts leave) is not part of it.
    """
    if flag_value and path:
        raise ConfigError("give the Redis password once: --db_passwd or --db_passwd_file, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_PASSWORD_FILE + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--db_passwd_file {path!r:.200}: {getattr(exc, 'strerror', None) or exc}") from None
        password = text.rstrip("\r\n")
        if not password or len(text) > MAX_PASSWORD_FILE:
            raise ConfigError(f"--db_passwd_file {path!r:.200} must hold the password (one line, under 64 KiB)")
        return password
    return flag_value or os.environ.get(PASSWORD_ENV) or None


def password_from_args(args: argparse.Namespace) -> str | None:
    """The Redis password the flags and environment give (:func:`db_password`).

    Warns once when it came from ``--db_passwd``: EDL's flag is kept for drop-in use,
    but anyone on the machine can read it with ``ps``.
    """
    if args.db_passwd:
        log.warning("--db_passwd shows the Redis password to every user of this machine (ps); "
                    "use --db_passwd_file or $%s", PASSWORD_ENV)
    return db_password(args.db_passwd, args.db_passwd_file)


def add_log_level(p: argparse.ArgumentParser, default: str = "INFO") -> None:
    p.add_argument("--log-level", default=default, metavar="LEVEL",
                   help=f"log messages of this level and above: {', '.join(LOG_LEVELS)} (default {default})")


def add_daemon_flags(p: argparse.ArgumentParser, curve: bool) -> None:
    """Metrics, logging and (for servers) CURVE keys."""
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    if curve:
        p.add_argument("--curve-secret-key", default=None,
                       help="CURVE: this server's secret key file (python -m zdistill.security keygen); off if unset")
        p.add_argument("--curve-allow", default=None, help="CURVE: folder of the client public keys allowed in")
    add_log_level(p)


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; a level that is none exits 2 with one line, as a bad flag does."""
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        sys.stderr.write(f"{sys.argv[0].rsplit('/', 1)[-1] or 'zdistill'}: --log-level {str(level)[:40]!r} "
                         f"is not one of {', '.join(LOG_LEVELS)}\n")
        raise SystemExit(2)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("redis").setLevel(max(logging.INFO, logging.getLogger().level))
