"""``zdistill``: questions to a running system from a shell (and for Kubernetes probes).

- ``zdistill ping teacher HOST:PORT`` exits 0 when the teacher answers a ``ping`` (its
  model is loaded and has run), 1 otherwise: a readiness/liveness probe.
- ``zdistill ping balancer HOST:PORT`` exits 0 when the balancer answers ``status``.
- ``zdistill status --db_endpoints HOST:PORT`` prints, per service, the teachers
  (address, device, heartbeat age, load), the students and their teachers, and the
  leading balancer; ``--json`` for scripts.  Exits 0 when Redis (and the balancer
  given with ``--balancer``) answered, 1 when Redis did not, 3 when the balancer did
  not (:mod:`zdistill.discovery.status`).

Every command exits 2, with one line on stderr, on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from zdistill.client import teacher_endpoint
from zdistill.discovery.client import ask_balancer
from zdistill.discovery.messages import StatusReply, StatusRequest
from zdistill.errors import ConfigError, ErrorCode, TeacherError, TeacherTimeout
from zdistill.flags import add_db_flags, password_from_args
from zdistill.triton_client import connect_teacher
from zdistill.wire import ErrorReply


def ping(kind: str, address: str, timeout: float) -> int:
    """0 if a ``kind`` answers at ``address``; else 1 and one line saying what answered, if anything.

    An address that is none of :data:`~zdistill.client.ADDRESS_FORMS` raises :class:`ConfigError` (exit 2).
    """
    if kind == "teacher":
        client = connect_teacher(address, timeout=timeout)
        try:
            client.ping()
        except TeacherError as exc:
            # str(exc) names the teacher already: "teacher ADDR: what it said"
            wrong = exc.code == ErrorCode.WRONG_SERVER
            line = f"{address}: a zdistill balancer answered, not a teacher" if wrong else exc
            sys.stderr.write(f"{line}\n")
            return 1
        except TeacherTimeout:
            sys.stderr.write(f"teacher {address}: no answer in {timeout:g} s\n")
            return 1
        finally:
            client.close()
        return 0
    reply = ask_balancer(address, StatusRequest(id=1), timeout)
    if reply is None:
        sys.stderr.write(f"balancer {address}: no answer in {timeout:g} s\n")
        return 1
    if not isinstance(reply, StatusReply):
        said = reply.message if isinstance(reply, ErrorReply) else reply.__struct_config__.tag
        sys.stderr.write(f"{address}: answered, but not as a zdistill balancer ({said[:200]})\n")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zdistill", description="Ask a running zdistill system questions.")
    sub = p.add_subparsers(dest="command", required=True)
    pg = sub.add_parser("ping", help="exit 0 if a teacher or balancer answers (for probes)",
                        description="Exit 0 if a teacher or balancer answers at HOST:PORT, else 1; 2 on bad arguments.")
    pg.add_argument("kind", choices=["teacher", "balancer"])
    pg.add_argument("address", help="HOST:PORT")
    pg.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)")
    st = sub.add_parser("status", help="teachers, students and balancers, per service",
                        description="Teachers, students and balancers, per service.  Exit codes: 0 all answered, "
                                    "1 Redis unreachable or refusing the password, 2 bad arguments, "
                                    "3 the --balancer did not answer.")
    add_db_flags(st)
    st.add_argument("--balancer", default=None, help="also ask this balancer (HOST:PORT) for its view")
    st.add_argument("--json", action="store_true", help="print JSON for scripts")
    st.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for Redis and the balancer (default 2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ping":
            return ping(args.kind, args.address, args.timeout)
        from zdistill.discovery.status import collect_status, exit_code, render_status

        if args.balancer:
            teacher_endpoint(args.balancer, "balancer")
        report = collect_status(args.db_endpoints, password_from_args(args), args.balancer, args.timeout, time.time())
        sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_status(report))
        return exit_code(report)
    except ConfigError as exc:
        sys.stderr.write(f"zdistill: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
