"""``zdistill-balancer``: tell each student which teachers of its service to use.

Sockets (every message in the :mod:`zdistill.wire` format, header only, typed in
:mod:`zdistill.discovery.messages`):

- a ROUTER on ``--server`` for requests from students;
- a PUB (``--pub-port``, default the next port) for membership updates.

==============  ==============================================  ===========================================
request         header                                          reply (from the leader)
==============  ==============================================  ===========================================
``register``    ``student``, ``service``, ``max_teachers``      ``assignment``: ``student``, ``service``,
``heartbeat``   the same fields (a heartbeat re-creates a       ``epoch``, ``version``, ``teachers``,
                student this balancer does not know)            ``pub`` (PUB endpoint), ``lease_ms``
``snapshot``    ``student``                                     ``assignment``, or ``error`` code
                                                                ``unknown_student`` (register again)
``bye``         ``student``                                     ``ok``; the student's teachers go to others
``status``      (nothing)                                       ``status``: leading, leader, counts
==============  ==============================================  ===========================================

A standby answers ``register``/``heartbeat``/``snapshot``/``bye`` with ``redirect``
(``leader``: the leader's ROUTER address, or ``None`` while nobody leads, with ``why``:
Redis unreachable from this balancer, or no lease taken yet).  Anything
malformed gets ``error`` (``bad_message`` for frames that are no message,
``bad_request`` for an unknown kind or a field of the wrong type or range) and the
balancer keeps serving.  Every reply echoes the request's ``id``.

Membership follows the zguide's Clone pattern: on the PUB socket, the topic frame
``student id + b"\\0"`` precedes an ``update`` message (``student``, ``service``,
``epoch``, ``version``, ``teachers``).  A student's ``version`` grows by one on every
change of its list; students subscribe, then take a snapshot, and ignore updates
with a lower version of the same ``epoch``.  The leader republishes every student's
state each ``--republish`` seconds and every heartbeat reply carries the snapshot,
so a lost update heals within a second or a heartbeat.

State and who owns it: one thread owns the sockets and all the tables below.
Teachers come from Redis (keyspace notifications for speed, where Redis allows
them, plus a full ``SCAN`` every ``--resync`` seconds so a lost event costs a
second, not forever).  Students, their assignments and versions live in memory
and, fenced by the leader lease, in Redis (:mod:`zdistill.discovery.store`), so a restarted
balancer resumes the same assignment and versions: no churn.  Several balancers
may run; one leads by a Redis lease (``SET NX PX``, refreshed every third of it),
the others stand by and redirect.  While Redis is away the leader keeps answering
from memory until its lease would have run out, and on Redis' return writes its
state back if Redis lost it; teacher removals are held off for one teacher TTL
after an outage so that registers have time to re-register.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import redis
import zmq

from zdistill import wire
from zdistill.discovery import messages
from zdistill.discovery.assignment import assign
from zdistill.discovery.store import (
    MAX_TEACHERS_LIMIT,
    SERVICE_RE,
    STUDENT_RE,
    LeaderRecord,
    Store,
    StudentRecord,
    describe,
    students_by_service,
)
from zdistill.errors import ConfigError, ErrorCode, RequestError, WireError, WrongTypeError
from zdistill.flags import add_daemon_flags, add_db_flags, password_from_args, setup_logging
from zdistill.metrics import BalancerMetrics
from zdistill.security import ServerKeys, server_keys
from zdistill.teacher_messages import REQUESTS as TEACHER_REQUESTS

log = logging.getLogger("zdistill.discovery.balancer")

# Students send headers only: tiny messages, no arrays.
LIMITS = wire.Limits(max_header_bytes=16 * 1024, max_arrays=0, max_array_bytes=0)
_DRAIN_AT_ONCE = 512
_REDIS_RETRY = 0.25
_GAUGES_EVERY = 1.0
_ERROR_LOG_EVERY = 10.0
_NAMED_IN_A_LOG_LINE = 10  # students named when many expire at once


def topic(student_id: str) -> bytes:
    """The PUB topic of one student: its id and a NUL, so no id is a prefix of another's."""
    return student_id.encode() + b"\0"


def split_address(address: str) -> tuple[str, int]:
    """``--server``: the ``IP:PORT`` to listen on (port 0: a free one), as host and port.

    No scheme: a ``tcp://`` or ``triton://`` here would reach ZeroMQ's bind as a host name.
    """
    host, sep, port = address.strip().rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--server {address!r:.80}: expected IP:PORT to listen on, without a scheme "
                          "(port 0 picks a free one)")
    return host.strip("[]"), int(port)


def _bind(sock: zmq.Socket, host: str, port: int) -> int:
    sock.bind(f"tcp://{host}:{port or '*'}")
    return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])


class Balancer:
    """The discovery service's event loop; see the module docstring for the protocol."""

    def __init__(
        self,
        store: Store,
        server: str,
        pub_port: int | None = None,
        advertise: str | None = None,
        student_lease: float = 10.0,
        leader_lease: float = 3.0,
        resync: float = 1.0,
        republish: float = 1.0,
        use_notifications: bool = True,
        context: zmq.Context | None = None,
        curve: ServerKeys | None = None,
        metrics: BalancerMetrics | None = None,
    ) -> None:
        if min(student_lease, leader_lease, resync, republish) <= 0:
            raise ConfigError("leases and intervals must be positive")
        self.store = store
        self.student_lease = student_lease
        self.leader_lease = leader_lease
        self.resync_every = resync
        self.republish_every = republish
        self.use_notifications = use_notifications
        self.metrics = metrics or BalancerMetrics()
        host, port = split_address(server)
        self._ctx = context or zmq.Context.instance()
        self.router = wire.limit_socket(self._ctx.socket(zmq.ROUTER), LIMITS)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 10_000)
        self.pub = wire.limit_socket(self._ctx.socket(zmq.PUB), LIMITS)  # what comes in: subscriptions, small
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        if curve is not None:  # both sockets: membership is as private as the requests
            curve.apply(self.router)
            curve.apply(self.pub)
        port = _bind(self.router, host, port)
        pub_port = _bind(self.pub, host, port + 1 if pub_port is None else pub_port)
        adv = advertise or (host if host not in ("0.0.0.0", "*", "::") else socket.gethostbyname(socket.gethostname()))
        self.address = f"{adv}:{port}"
        self.pub_endpoint = f"tcp://{adv}:{pub_port}"
        self.me = LeaderRecord(uuid.uuid4().hex, self.address, self.pub_endpoint, time.time())

        # State, owned by the serve() thread.
        self.leading = False
        self.leader_seen: LeaderRecord | None = None
        self.saw_leader = False  # some balancer led while this one stood by
        self._store_empty_since: float | None = None
        self.lease_confirmed = 0.0
        self.epoch: str | None = None
        self.teachers: dict[str, set[str]] = {}
        self.students: dict[str, StudentRecord] = {}
        self.by_service: dict[str, set[str]] = {}
        # Student id -> when last heard from, oldest first (an update moves it to the end),
        # so the expiry check reads only the students that are due.
        self.last_seen: dict[str, float] = {}
        # Changes waiting for the next commit (once per loop turn): services to rebalance,
        # student records to write, student ids to delete.
        self.dirty: set[str] = set()
        self.to_save: set[str] = set()
        self.to_remove: set[str] = set()
        self.unsaved = False  # a write to Redis failed: write everything when it is back
        self._committed_at = 0.0  # when the last commit that had work began (monotonic)
        self._commit_seconds = 0.0  # how long it took
        self.teacher_ttl = 0.0  # the longest TTL seen on a teacher record
        self.hold_removals_until = 0.0
        self.redis_ok = True
        self.notifications = False
        self._pubsub: Any = None
        self._stopping = False
        self._errors_logged: dict[str, float] = {}
        self._republish_queue: list[StudentRecord] = []  # still to republish this period
        self._republish_total = 0
        self._republish_from = 0.0
        self._due: dict[str, float] = {"lease": 0.0, "resync": 0.0, "republish": 0.0, "expire": 0.0, "redis": 0.0,
                                       "gauges": 0.0}

    # -- lifecycle ----------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True

    def serve(self, ready_file: str | None = None) -> None:
        """The loop: take a batch of requests, commit what they changed, answer them, tick.

        Requests change tables only; the rebalancing and the Redis write they call for
        happen in :meth:`_commit`, once for a whole batch and, under churn, at most once
        per three times what the last commit took (see :meth:`_commit_due`).  A commit due runs before the batch
        is answered, so at a quiet time a ``register`` is answered with its teachers;
        under churn it is answered at once with what the student has so far (maybe no
        teacher yet), and the teachers follow on PUB after the next commit.
        """
        log.info("balancer on %s, updates on %s; student lease %.3g s, leader lease %.3g s",
                 self.address, self.pub_endpoint, self.student_lease, self.leader_lease)
        self._subscribe()
        self._guarded(self._tick, time.monotonic())
        if ready_file:
            _write_ready(ready_file, {"server": self.address, "pub": self.pub_endpoint, "leading": self.leading})
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self._stopping:
            if poller.poll(20 if self._pubsub is not None else 50):
                answers = []
                for _ in range(_DRAIN_AT_ONCE):
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    answers.append(self._on_message(frames))
                if self._commit_due(time.monotonic()):
                    self._guarded(self._commit)
                for answer in answers:
                    self._answer(*answer)
            self._guarded(self._tick, time.monotonic())
        self._shutdown()

    def _guarded(self, step: Any, *args: Any) -> None:
        """Run one step of the loop; a bug in it is logged (every 10 s at most) and the service goes on.

        Records from Redis are checked before use, so this is the last line: without
        it, one unforeseen value would end this balancer and, read again, every standby.
        """
        try:
            step(*args)
        except Exception:
            now = time.monotonic()
            if now - self._errors_logged.get(step.__name__, -_ERROR_LOG_EVERY) >= _ERROR_LOG_EVERY:
                self._errors_logged[step.__name__] = now
                log.exception("balancer step %s failed; serving on", step.__name__)

    def _shutdown(self) -> None:
        if self.leading:
            try:
                self.store.release_leader(self.me)  # a standby may take over at once
                log.info("released the leader lease")
            except redis.RedisError:
                pass
        self._drop_pubsub()
        self.router.close()
        self.pub.close()

    def _tick(self, now: float) -> None:
        """Everything timed, then the events, then the rebalancing they asked for."""
        try:
            if not self.redis_ok:
                if now >= self._due["redis"]:
                    self._due["redis"] = now + _REDIS_RETRY
                    self._try_reconnect(now)
            else:
                if now >= self._due["lease"]:
                    self._due["lease"] = now + self.leader_lease / 3
                    self._lease(now)
                if self.leading and now >= self._due["resync"]:
                    self._due["resync"] = now + self.resync_every
                    self._resync(now)
                self._drain_events(now)
        except redis.RedisError as exc:
            self._redis_lost(exc)
        if self.leading and not self.redis_ok and now - self.lease_confirmed > self.leader_lease:
            log.warning("Redis unreachable for longer than the leader lease: standing by")
            self._step_down()
        if self.leading:
            if now >= self._due["expire"]:
                self._due["expire"] = now + min(0.1, self.student_lease / 10)
                self._expire_students(now)
            if self._commit_due(now):
                self._commit()
            if now >= self._due["gauges"]:
                self._due["gauges"] = now + _GAUGES_EVERY
                self._update_gauges()
            self._republish(now)

    # -- Redis: connection, lease, teachers ----------------------------------

    def _redis_lost(self, exc: Exception) -> None:
        if self.redis_ok:
            log.warning("lost Redis (%s: %s); serving from memory and retrying", type(exc).__name__, exc)
        self.redis_ok = False
        self._due["redis"] = time.monotonic() + _REDIS_RETRY
        self._drop_pubsub()

    def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # closing a broken connection: nothing left to do
                pass
        self._pubsub = None

    def _try_reconnect(self, now: float) -> None:
        self.store.ping()
        log.info("Redis is back")
        self.redis_ok = True
        self._after_outage(now)
        self._due["lease"] = self._due["resync"] = now

    def _after_outage(self, now: float) -> None:
        """Redis was away or restarted: re-subscribe, and hold teacher removals for a TTL.

        Registers re-register within a third of their TTL; until then an empty SCAN
        must not take every teacher away from the students.
        """
        self.hold_removals_until = now + (self.teacher_ttl or 6.0)
        self._subscribe()

    def _subscribe(self) -> None:
        """Keyspace notifications of teacher keys, where Redis lets us turn them on."""
        self._drop_pubsub()
        if not self.use_notifications:
            return
        try:
            self.notifications = self.store.enable_keyspace_events()
            if self.notifications:
                ps = self.store.r.pubsub(ignore_subscribe_messages=True)
                ps.psubscribe(self.store.keyspace_channel_pattern())
                self._pubsub = ps
        except redis.RedisError as exc:
            self._redis_lost(exc)

    def _drain_events(self, now: float) -> None:
        if self._pubsub is None:
            return
        for _ in range(10_000):
            msg = self._pubsub.get_message(timeout=0.0)
            if msg is None:
                return
            if not self.leading or msg.get("type") != "pmessage":
                continue
            parsed = self.store.parse_teacher_key(self.store.key_from_channel(str(msg.get("channel", ""))))
            if parsed is None:
                continue
            service, address = parsed
            event = msg.get("data")
            known = self.teachers.setdefault(service, set())
            if event == "set" and address not in known:
                rec = self.store.get_teacher(service, address)  # validate before trusting it
                if rec is not None:
                    log.info("teacher %s joined %s", address, service)
                    known.add(address)
                    self.teacher_ttl = max(self.teacher_ttl, rec.ttl_ms / 1000)
                    self.dirty.add(service)
            elif event in ("del", "expired") and address in known and now >= self.hold_removals_until:
                log.info("teacher %s left %s (%s)", address, service, event)
                known.discard(address)
                self.dirty.add(service)

    def _resync(self, now: float) -> None:
        found = self.store.all_teachers()
        if self.store.get_epoch() != self.epoch:
            # Redis lost its data under us (a restart our connection never noticed:
            # redis-py reconnects silently).  The SCAN saw an empty store: distrust it,
            # take the lease again and write our state back before any teacher is dropped.
            log.warning("Redis lost the assignment state (restarted?); re-taking the lease")
            self._after_outage(now)
            self._due["lease"] = now
            return
        for service in set(found) | set(self.teachers):
            records = found.get(service, {})
            for rec in records.values():
                self.teacher_ttl = max(self.teacher_ttl, rec.ttl_ms / 1000)
            new = set(records)
            old = self.teachers.get(service, set())
            if now < self.hold_removals_until:
                new |= old
            if new != old:
                added, gone = sorted(new - old), sorted(old - new)
                log.info("resync of %s: joined %s, left %s", service, added or "-", gone or "-")
                self.teachers[service] = new
                self.dirty.add(service)

    def _lease(self, now: float) -> None:
        if self.leading:
            if self.store.refresh_leader(self.me, self.leader_lease):
                self.lease_confirmed = now
            elif self.store.acquire_leader(self.me, self.leader_lease):  # the key was lost (Redis restart)
                self.lease_confirmed = now
                self._take_office(now)
            else:
                log.warning("another balancer holds the leader lease: standing by")
                self._step_down()
        elif self._may_lead(now) and self.store.acquire_leader(self.me, self.leader_lease):
            self.lease_confirmed = now
            self._take_office(now)
        else:
            self.leader_seen = self.store.get_leader()
            self.saw_leader = self.saw_leader or self.leader_seen is not None

    def _may_lead(self, now: float) -> bool:
        """Whether this standby should try for the lease now.

        After Redis lost its data, the leader that was running still has the whole state
        in memory and will write it back; a standby without it would found a new history
        and reassign everyone.  So a standby that has seen a leader, has no state of its
        own and finds the store empty gives that leader two leases to come back first.
        """
        if self.epoch is not None or not self.saw_leader or self.store.get_epoch() is not None:
            self._store_empty_since = None
            return True
        if self._store_empty_since is None:
            self._store_empty_since = now
        return now - self._store_empty_since >= 2 * self.leader_lease

    def _take_office(self, now: float) -> None:
        """Become (or stay) leader: adopt the state in Redis, or restore ours if Redis lost it."""
        stored_epoch = self.store.get_epoch()
        unreadable: list[str] = []
        if stored_epoch is None and self.epoch is not None:
            log.info("Redis lost the assignment state; restoring %d students from memory", len(self.students))
            self.unsaved = True
            self._after_outage(now)
        elif stored_epoch is None:
            self.epoch = uuid.uuid4().hex
            self.students = {}
            self.unsaved = True
            log.info("leading with a new assignment history %s", self.epoch)
        else:
            self.epoch = stored_epoch
            try:
                self.students = self.store.load_students()
                log.info("leading; resumed %d students of history %s", len(self.students), self.epoch)
                unreadable = [sid for sid in self.store.r.hkeys(self.store.students_key) if sid not in self.students]
            except WrongTypeError as exc:
                log.error("%s; leading without stored students, and replacing it", exc)
                self.students = {}
                self.unsaved = True
        self.by_service = {service: set(mine) for service, mine in students_by_service(self.students).items()}
        # Every known student gets a full lease from now: it may have been talking to
        # the old leader until a moment ago.
        self.last_seen = dict.fromkeys(self.students, now)
        self.to_save.clear()
        self.to_remove.clear()
        if unreadable:  # skipped (and logged) by load_students; this leader owns the hash, so they go
            log.warning("removing %d unreadable student records from Redis", len(unreadable))
            self.to_remove.update(unreadable)
        self.leading = True
        self.leader_seen = self.me
        self._save_all()  # writes the epoch first, so the resync below trusts the store
        self._resync(now)
        self._due["resync"] = now + self.resync_every
        self.dirty |= set(self.by_service)

    def _step_down(self) -> None:
        self.leading = False
        self.leader_seen = None
        self.metrics.leader.set(0)

    def _update_gauges(self, services: Iterable[str] | None = None) -> None:
        """The gauges; the assignment versions only of ``services`` (default all: a pass over every student)."""
        self.metrics.leader.set(1)
        self.metrics.set_counts({s: len(t) for s, t in self.teachers.items()},
                                {s: len(ids) for s, ids in self.by_service.items()})
        for service in self.by_service if services is None else services:
            ids = self.by_service.get(service, ())
            versions = [self.students[sid].version for sid in ids if sid in self.students]
            self.metrics.version.labels(service).set(max(versions, default=0))

    # -- students and assignments -------------------------------------------

    def _commit_due(self, now: float) -> bool:
        """Whether to commit now: when the last commit is three times as old as it took.

        So rebalancing takes at most about a quarter of the loop's time however fast
        students come and go (one client registering 10,000 students one after the other
        included), and the requests between two commits wait for none.  A commit takes
        about a millisecond per few hundred students of the service, so at a quiet time,
        and for a small service, every batch is committed before it is answered.
        """
        return now - self._committed_at >= 3 * self._commit_seconds

    def _commit(self) -> None:
        """Rebalance each service whose members changed, write the changed records, publish them.

        However many students joined, left or expired since the last commit, each
        service is rebalanced once and Redis gets one write of only the records that
        changed.
        """
        if not self.leading or not (self.dirty or self.to_save or self.to_remove or self.unsaved):
            return
        started = self._committed_at = time.monotonic()
        changed: list[StudentRecord] = []
        services = set(self.dirty)
        while self.dirty:
            changed += self._rebalance(self.dirty.pop())
        self._flush()
        if self.leading:
            for rec in changed:
                self._publish(rec)
            if services:
                self._update_gauges({rec.service for rec in changed})
        self._commit_seconds = time.monotonic() - started

    def _rebalance(self, service: str) -> list[StudentRecord]:
        """Assign the service's teachers anew; the records whose list changed (version bumped)."""
        ids = self.by_service.get(service, set())
        if not ids:
            return []
        wanted = {sid: self.students[sid].max_teachers for sid in ids}
        previous = {sid: self.students[sid].teachers for sid in ids}
        result = assign(sorted(self.teachers.get(service, ())), wanted, previous)
        changed = []
        for sid, teachers in result.items():
            rec = self.students[sid]
            if teachers != rec.teachers:
                rec.teachers = list(teachers)
                rec.version += 1
                changed.append(rec)
                self.to_save.add(sid)
        if changed:
            self.metrics.rebalances.inc()
            log.info("service %s: %d of %d students get new teachers", service, len(changed), len(ids))
        return changed

    def _flush(self) -> None:
        """Write what changed since the last flush, in one fenced call."""
        if not (self.to_save or self.to_remove or self.unsaved):
            return
        put = [self.students[sid] for sid in self.to_save if sid in self.students]
        remove = list(self.to_remove)
        self.to_save.clear()
        self.to_remove.clear()
        if self.unsaved or not self.redis_ok:
            self.unsaved = True  # the full write after the outage covers these too
            self._save_all()
            return
        try:
            if not self.store.write_students(self.me, put, remove):
                log.warning("lost the leader lease while saving: standing by")
                self._step_down()
        except WrongTypeError as exc:
            log.error("%s; replacing it with this leader's students", exc)
            self.unsaved = True
            self._save_all()
        except redis.RedisError as exc:
            self.unsaved = True
            self._redis_lost(exc)

    def _save_all(self) -> None:
        """Make Redis hold exactly our students and epoch (after an outage or on taking office)."""
        if not self.redis_ok or not self.unsaved or self.epoch is None:
            return
        try:
            if self.store.replace_students(self.me, self.students.values(), self.epoch):
                self.unsaved = False
            else:
                self._step_down()
        except redis.RedisError as exc:
            self._redis_lost(exc)

    def _expire_students(self, now: float) -> None:
        gone = []
        for sid, seen in self.last_seen.items():  # oldest first: stop at the first one still in time
            if now - seen <= self.student_lease:
                break
            gone.append(sid)
        if not gone:
            return
        named = ", ".join(gone[:_NAMED_IN_A_LOG_LINE]) + (f" and {len(gone) - _NAMED_IN_A_LOG_LINE} more"
                                                          if len(gone) > _NAMED_IN_A_LOG_LINE else "")
        log.info("%d students silent for over %.3g s: %s; their teachers go to others",
                 len(gone), self.student_lease, named)
        for sid in gone:
            self._remove_student(sid)

    def _remove_student(self, sid: str) -> None:
        rec = self.students.pop(sid, None)
        self.last_seen.pop(sid, None)
        if rec is None:
            return
        self.by_service.get(rec.service, set()).discard(sid)
        self.dirty.add(rec.service)
        self.to_save.discard(sid)
        self.to_remove.add(sid)

    def _seen(self, sid: str, now: float) -> None:
        self.last_seen.pop(sid, None)  # re-inserted at the end: the dict stays oldest first
        self.last_seen[sid] = now

    def _upsert_student(self, sid: str, service: str, max_teachers: int) -> StudentRecord:
        """The student's record, created or updated; the rebalance it needs waits for the commit."""
        rec = self.students.get(sid)
        if rec is not None and rec.service == service and rec.max_teachers == max_teachers:
            return rec
        if rec is None:
            log.info("student %s joined %s (at most %d teachers)", sid, service, max_teachers)
            rec = StudentRecord(sid, service, max_teachers)
            self.students[sid] = rec
        elif rec.service != service:
            self.by_service.get(rec.service, set()).discard(sid)
            self.dirty.add(rec.service)
            rec.service, rec.max_teachers, rec.teachers = service, max_teachers, []
            rec.version += 1
        else:
            rec.max_teachers = max_teachers
        self.by_service.setdefault(service, set()).add(sid)
        self.dirty.add(service)
        self.to_remove.discard(sid)
        self.to_save.add(sid)  # also with no teacher yet: a record in Redis, version 0
        return rec

    def _republish(self, now: float) -> None:
        """Publish every student's state once per ``--republish`` period, spread over its first half.

        A little each tick, not all at once: 10,000 students take ~0.1 s to publish,
        which would hold up every request waiting behind them.
        """
        if now >= self._due["republish"]:
            self._due["republish"] = now + self.republish_every
            self._republish_queue = list(self.students.values())
            self._republish_total = len(self._republish_queue)
            self._republish_from = now
        share = min(1.0, (now - self._republish_from) / (self.republish_every / 2))
        due = len(self._republish_queue) - (self._republish_total - math.ceil(self._republish_total * share))
        for _ in range(due):
            rec = self._republish_queue.pop()
            if self.students.get(rec.student_id) is rec:  # not gone since the period began
                self._publish(rec)

    def _publish(self, rec: StudentRecord) -> None:
        try:
            wire.send(self.pub, {"kind": "update", **self._state(rec)}, envelope=[topic(rec.student_id)],
                      flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB drops at its HWM; the periodic republish heals it

    def _state(self, rec: StudentRecord) -> dict[str, Any]:
        return {"student": rec.student_id, "service": rec.service, "epoch": self.epoch, "version": rec.version,
                "teachers": rec.teachers}

    # -- requests -------------------------------------------------------------

    def _on_message(self, frames: list[zmq.Frame]) -> tuple[list[zmq.Frame], Any, dict[str, Any] | StudentRecord]:
        """Handle one request: its envelope, id and answer (a student's record: send its assignment)."""
        envelope_len = 2 if len(frames) > 2 and len(frames[1]) == 0 else 1  # REQ peers add a delimiter
        envelope, body = frames[:envelope_len], frames[envelope_len:]
        req_id: Any = None
        reply: dict[str, Any] | StudentRecord
        try:
            msg = wire.decode(body, LIMITS)
            req_id = msg.header.get("id")
            reply = self._dispatch(msg)
        except WireError as exc:
            self.metrics.bad_messages.inc()
            log.debug("bad message: %s", exc)
            reply = {"kind": "error", "code": ErrorCode.BAD_MESSAGE, "message": str(exc)}
        except RequestError as exc:
            reply = {"kind": "error", "code": exc.code, "message": str(exc)}
        except Exception as exc:  # a bug must cost one request, never the service
            log.exception("failed to handle a request")
            reply = {"kind": "error", "code": ErrorCode.INTERNAL, "message": f"{type(exc).__name__}"}
        if type(req_id) not in (int, str, type(None)) or (isinstance(req_id, str) and len(req_id) > 128):
            req_id = None
        return envelope, req_id, reply

    def _answer(self, envelope: list[zmq.Frame], req_id: Any, reply: dict[str, Any] | StudentRecord) -> None:
        header = self._assignment(reply) if isinstance(reply, StudentRecord) else reply
        try:
            wire.send(self.router, {**header, "id": req_id}, envelope=envelope, flags=zmq.NOBLOCK)
        except (zmq.Again, WireError) as exc:
            log.debug("reply dropped: %s", exc)

    def _dispatch(self, msg: wire.Message) -> dict[str, Any] | StudentRecord:
        kind = msg.kind
        self.metrics.requests.labels(kind if kind in messages.REQUESTS else "other").inc()
        if kind in TEACHER_REQUESTS:  # someone took this balancer for a teacher
            raise RequestError(ErrorCode.WRONG_SERVER, "this is a zdistill balancer, not a teacher")
        request = messages.read_request(msg.header)
        if isinstance(request, messages.StatusRequest):
            return self._status()
        sid = request.student
        if not STUDENT_RE.match(sid):
            raise RequestError(ErrorCode.BAD_REQUEST,
                               f"student id {sid!r:.40} is not 1-128 characters of [A-Za-z0-9_.:@-]")
        if not self.leading:
            if self.leader_seen is not None:
                return {"kind": "redirect", "leader": self.leader_seen.server}
            why = ("this balancer cannot reach Redis, where the balancers elect their leader" if not self.redis_ok
                   else "no balancer holds the leader lease in Redis yet")
            return {"kind": "redirect", "leader": None, "why": why}
        now = time.monotonic()
        if isinstance(request, messages.Register):  # a Heartbeat is one too
            if not SERVICE_RE.match(request.service):
                raise RequestError(ErrorCode.BAD_REQUEST,
                                   f"service name {request.service!r:.40} is not 1-128 of [A-Za-z0-9_.-]")
            if not 1 <= request.max_teachers <= MAX_TEACHERS_LIMIT:
                raise RequestError(ErrorCode.BAD_REQUEST,
                                   f"max_teachers must be 1..{MAX_TEACHERS_LIMIT}, got {request.max_teachers}")
            rec = self._upsert_student(sid, request.service, request.max_teachers)
            self._seen(sid, now)
            return rec
        if isinstance(request, messages.Bye):
            if sid in self.students:
                log.info("student %s left", sid)
                self._remove_student(sid)
            return {"kind": "ok"}
        rec = self.students.get(sid)  # snapshot
        if rec is None:
            return {"kind": "error", "code": ErrorCode.UNKNOWN_STUDENT, "message": "register first"}
        self._seen(sid, now)
        return rec

    def _assignment(self, rec: StudentRecord) -> dict[str, Any]:
        return {"kind": "assignment", **self._state(rec), "pub": self.pub_endpoint,
                "lease_ms": int(self.student_lease * 1000)}

    def _status(self) -> dict[str, Any]:
        return {
            "kind": "status",
            "leading": self.leading,
            "leader": self.leader_seen.server if self.leader_seen else None,
            "server": self.address,
            "pub": self.pub_endpoint,
            "epoch": self.epoch,
            "redis": self.redis_ok,
            "notifications": self._pubsub is not None,
            "students": len(self.students),
            "teachers": {svc: len(t) for svc, t in self.teachers.items()},
        }


def _write_ready(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zdistill-balancer",
                                description="Assign registered teachers to zdistill students (discovery service).")
    add_db_flags(p)
    p.add_argument("--server", required=True, help="IP:PORT for student requests (port 0 picks a free one)")
    p.add_argument("--pub-port", type=int, default=None,
                   help="port of the membership PUB socket (default: --server's port + 1; 0 picks a free one)")
    p.add_argument("--advertise", default=None, help="host students reach this balancer at (default: --server's)")
    p.add_argument("--student-lease", type=float, default=10.0,
                   help="seconds a silent student keeps its teachers (default 10); students beat every quarter")
    p.add_argument("--leader-lease", type=float, default=3.0,
                   help="seconds the leader lease lasts without a refresh (default 3)")
    p.add_argument("--resync", type=float, default=1.0, help="seconds between full teacher resyncs (default 1)")
    p.add_argument("--republish", type=float, default=1.0, help="seconds between full republishes (default 1)")
    p.add_argument("--no-notifications", action="store_true", help="do not use Redis keyspace notifications")
    p.add_argument("--ready-file", default=None, help="write the balancer's addresses here once serving")
    add_daemon_flags(p, curve=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        store = Store.open(args.db_endpoints, password_from_args(args))
        metrics = BalancerMetrics()
        balancer = Balancer(store, args.server, args.pub_port, args.advertise, args.student_lease,
                            args.leader_lease, args.resync, args.republish, not args.no_notifications,
                            curve=server_keys(args.curve_secret_key, args.curve_allow), metrics=metrics)
        metrics.serve(args.metrics_port, split_address(args.server)[0])
    except (ConfigError, zmq.ZMQError, OSError) as exc:
        log.error("%s", exc)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: balancer.stop())
    signal.signal(signal.SIGINT, lambda *_: balancer.stop())
    log.info("using Redis at %s", describe(args.db_endpoints))
    balancer.serve(args.ready_file)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
