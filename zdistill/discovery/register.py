"""``zdistill-register``: keep one teacher's record in Redis for as long as it really serves.

Runs beside a teacher.  The record is a promise to students that the teacher answers,
so it is only written after the teacher has answered a ``ping`` (an open port is not
enough), and it is only refreshed while the teacher keeps answering: a teacher that
hangs or dies drops out of Redis within one TTL, with no one having to notice.

Lifecycle::

    wait for ping ──▶ meta ──▶ SET record PX ttl ──▶ every ttl/3: ping, SET again
                                                     │ ping fails: stop refreshing
                                                     │ (record expires within ttl);
                                                     │ ping answers again: meta, SET
    SIGTERM / SIGINT ──▶ delete the record (if still ours) ──▶ exit 0

Each refresh is the same single ``SET`` with ``GET``: if Redis says the key was gone
(it restarted, or the record expired while the teacher was sick) the record is simply
back, and the log says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
import zmq

from zdistill.client import Completion, teacher_endpoint
from zdistill.discovery.store import (
    Store,
    TeacherRecord,
    check_address,
    check_service,
    describe,
    teacher_meta,
)
from zdistill.errors import ConfigError, RecordError, TeacherError, TeacherTimeout
from zdistill.flags import add_daemon_flags, add_db_flags, password_from_args, setup_logging
from zdistill.metrics import RegisterMetrics
from zdistill.triton_client import connect_teacher

log = logging.getLogger("zdistill.discovery.register")

DEFAULT_TTL = 6.0
_POLL = 0.05  # how often a wait looks at the stop flag


class Registrar:
    """Owns one teacher's record: the health checks, the refresh timer and the removal."""

    def __init__(
        self,
        store: Store,
        service: str,
        address: str,
        ttl: float = DEFAULT_TTL,
        ping_timeout: float | None = None,
        context: zmq.Context | None = None,
        db_label: str = "Redis",
        metrics: RegisterMetrics | None = None,
    ) -> None:
        if ttl <= 0:
            raise ConfigError(f"--ttl must be positive, got {ttl}")
        self.store = store
        self.metrics = metrics or RegisterMetrics()
        self._db = db_label  # where Redis is, for log lines: never holds the password
        self.ttl = ttl
        self.interval = ttl / 3
        self.ping_timeout = ping_timeout if ping_timeout is not None else max(0.2, ttl / 3)
        endpoint = teacher_endpoint(address)  # says why a URL (http://) is no teacher address
        if endpoint.startswith("triton://"):
            address = endpoint  # a model on Triton, recorded in the form students get it in
        self.record = TeacherRecord(check_address(address), check_service(service))  # IP:PORT, as students reach it
        self.stop_event = threading.Event()
        self.client = connect_teacher(address, context=context, timeout=self.ping_timeout)
        self.registered = False  # our record should be in Redis now
        self.healthy = False  # the teacher answered the last check, with sane meta
        self.bad_meta: tuple[Any, ...] = ()  # what was wrong with the teacher's meta, as last logged
        self.redis_ok = True

    # -- talking to the teacher -----------------------------------------------

    def _call(self, kind: str) -> Completion | None:
        """One request, given up early if we are told to stop; None on stop."""
        try:
            req_id = self.client.submit(kind)
        except TeacherTimeout as exc:  # nothing could even be queued: the teacher is long gone
            self.client.reset()
            return Completion(0, error=exc)
        while not self.stop_event.is_set():
            for done in self.client.collect(_POLL):
                if done.req_id == req_id:
                    if done.error is not None:
                        self.client.reset()  # drop whatever is queued for a dead peer
                    return done
        return None

    def check_teacher(self) -> bool:
        """Ping; on the first answer after a failure also read ``meta`` for the record.

        A teacher whose ``meta`` is not sane (a ``max_batch_size`` of "lots", feeds that
        are a number) fails the check: it is not written to Redis, where every balancer
        and ``zdistill status`` would have to read it, and it is asked again next time.
        """
        done = self._call("ping")
        if done is None or done.error is not None:
            if done is not None:
                log.debug("teacher %s did not answer a ping: %s", self.record.address, done.error)
            if isinstance(done and done.error, TeacherError) and self.registered:
                # It answered that it does not serve (a Triton model unloaded): no student should wait a TTL for it
                log.warning("teacher %s says it does not serve (%s): record removed", self.record.address, done.error)
                self.remove()
            return False
        if self.healthy:
            return True
        done = self._call("meta")
        if done is None or done.error is not None:
            return False
        try:
            fields = teacher_meta(done.header or {})
        except RecordError as exc:
            if exc.args != self.bad_meta:
                log.error("teacher %s answers, but its meta is not sane (%s): not registering it until it is",
                          self.record.address, exc)
                self.bad_meta = exc.args
            self.remove()  # a record from before, with the old meta, must not outlive this
            return False
        if self.bad_meta:
            log.info("teacher %s now has sane meta", self.record.address)
            self.bad_meta = ()
        for name, value in fields.items():
            setattr(self.record, name, value)
        return True

    # -- talking to Redis -------------------------------------------------------

    def refresh(self) -> bool:
        """Write the record with its TTL; False if Redis cannot be reached."""
        try:
            existed = self.store.register_teacher(self.record, self.ttl)
        except redis.RedisError as exc:
            self.metrics.redis_errors.inc()
            self.metrics.registered.set(0)
            if self.redis_ok:
                log.warning("cannot write to Redis at %s (%s); will retry", self._db, exc)
            self.redis_ok = False
            return False
        if not self.redis_ok:
            log.info("Redis at %s reachable again", self._db)
            self.redis_ok = True
        if not self.registered:
            log.info("registered %s for service %s (ttl %.3g s, device %s)", self.record.address,
                     self.record.service, self.ttl, self.record.device)
        elif not existed:
            log.warning("the record of %s was gone from Redis (restart or expiry); registered again",
                        self.record.address)
        self.registered = True
        self.metrics.registered.set(1)
        (self.metrics.refreshes if existed else self.metrics.registrations).inc()
        return True

    def remove(self) -> None:
        if not self.registered:
            return
        try:
            removed = self.store.unregister_teacher(self.record)
            self.metrics.registered.set(0)
            log.info("record of %s %s", self.record.address, "removed" if removed else "already gone")
        except redis.RedisError as exc:
            log.warning("could not remove the record (%s); it expires within %.3g s", exc, self.ttl)
        self.registered = False

    # -- the loop ---------------------------------------------------------------

    def run(self, ready_file: str | None = None) -> None:
        log.info("waiting for teacher %s to answer a ping", self.record.address)
        announced = False
        while not self.stop_event.is_set():
            started = time.monotonic()
            ok = self.check_teacher()
            if self.stop_event.is_set():
                break
            self.metrics.checks.labels("ok" if ok else "failed").inc()
            if ok and not self.healthy:
                log.info("teacher %s answers (%s)", self.record.address, self.record.description or "no description")
            elif not ok and self.healthy:
                log.warning("teacher %s stopped answering; not refreshing, its record expires within %.3g s",
                            self.record.address, self.ttl)
            self.healthy = ok
            if ok and self.refresh() and not announced and ready_file:
                _write_ready(ready_file, self.store.teacher_key(self.record.service, self.record.address),
                             self.record.registered_at)
                announced = True
            # Healthy and written: next refresh in ttl/3; otherwise look again soon.
            wait = self.interval if ok and self.redis_ok else min(self.interval, 0.5)
            self.stop_event.wait(max(0.0, started + wait - time.monotonic()))
        self.remove()
        self.client.close()


def _write_ready(path: str, key: str, registered_at: float) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"key": key, "registered_at": registered_at}, f)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zdistill-register",
        description="Register a running zdistill teacher in Redis under a service name, for as long as it answers.",
    )
    add_db_flags(p)
    p.add_argument("--service_name", "--service-name", required=True, help="the service students ask for")
    p.add_argument("--server", required=True, help="the teacher's IP:PORT, as students will reach it")
    p.add_argument("--ttl", type=float, default=DEFAULT_TTL,
                   help=f"seconds the record lives without a refresh (default {DEFAULT_TTL:g}); refreshed every ttl/3")
    p.add_argument("--ping-timeout", type=float, default=None, help="seconds to wait for a ping (default ttl/3)")
    p.add_argument("--ready-file", default=None, help="write the record's key here once first registered")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address the metrics endpoint binds (default all)")
    add_daemon_flags(p, curve=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        store = Store.open(args.db_endpoints, password_from_args(args))
        metrics = RegisterMetrics()
        registrar = Registrar(store, args.service_name, args.server, args.ttl, args.ping_timeout,
                              db_label=describe(args.db_endpoints), metrics=metrics)
        metrics.serve(args.metrics_port, args.metrics_host)
    except (ConfigError, OSError) as exc:
        log.error("%s", exc)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: registrar.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: registrar.stop_event.set())
    log.info("registering %s as %s in Redis at %s", args.server, args.service_name, describe(args.db_endpoints))
    registrar.run(args.ready_file)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
