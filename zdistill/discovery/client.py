"""The student's side of discovery: which teachers this student should use, kept current.

:class:`DiscoveryClient` runs one daemon thread that owns two sockets:

- a DEALER to the balancer: ``register``, then a ``heartbeat`` every quarter of the
  student lease; every reply carries the full snapshot (``epoch``, ``version``,
  ``teachers``, ``pub``);
- a SUB to the balancer's PUB endpoint, subscribed to this student's topic, for
  ``update`` messages.

It follows the Clone pattern: updates and snapshots both carry ``(epoch, version)``;
anything with the epoch already held and a version not newer than the one held is
stale and ignored, so a republished or delayed update can never roll the list back.
A new epoch (the balancers lost their state and started a new history) is accepted
as is.  The version :meth:`current` reports is the client's own counter, bumped on
every change of the teacher list, so it only ever grows whatever the balancers do.

Failover: servers are tried in the order given (a comma list, as in EDL).  A
standby answers ``redirect`` with the leader's address, which is followed, or with
no leader and why (it cannot reach Redis, say), which :meth:`DiscoveryClient.leaderless`
keeps for the student's messages; a balancer that does not answer within ``timeout``
is left for the next in the list.
While no balancer answers, the last known teachers stay current: a student keeps
working with what it has.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

from zdistill import wire
from zdistill.client import addresses, teacher_endpoint
from zdistill.discovery import messages
from zdistill.discovery.store import MAX_TEACHERS_LIMIT, check_service, check_student
from zdistill.errors import ConfigError, ErrorCode, RequestError, WireError
from zdistill.security import client_keys_from_env, secure_client
from zdistill.wire import ErrorReply

log = logging.getLogger("zdistill.discovery.client")

LIMITS = wire.Limits(max_header_bytes=1 << 20, max_arrays=0, max_array_bytes=0)
_TICK = 0.05  # how often the thread looks at its stop flag
_BACKOFF = 0.25  # pause after a full round of servers failed or nobody leads
_CLOSE_WAIT = 0.3  # how long close() waits for the balancer to acknowledge "bye"
_live: weakref.WeakSet[DiscoveryClient] = weakref.WeakSet()


def default_student_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class DiscoveryClient:
    """Keeps ``(version, teacher addresses)`` for one student up to date; see the module doc."""

    def __init__(
        self,
        servers: str | Sequence[str],
        service_name: str,
        max_teachers: int,
        student_id: str | None = None,
        context: zmq.Context | None = None,
        timeout: float = 1.0,
    ) -> None:
        self.servers = addresses(servers, "discovery servers", "balancer")
        self.service = check_service(service_name)
        if type(max_teachers) is not int or not 1 <= max_teachers <= MAX_TEACHERS_LIMIT:
            raise ConfigError(f"max_teachers must be an integer 1..{MAX_TEACHERS_LIMIT}, got {max_teachers!r}")
        self.max_teachers = max_teachers
        self.student_id = check_student(student_id or default_student_id())
        self.timeout = timeout
        self.curve = client_keys_from_env()  # balancers with CURVE: the same key files as for teachers
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._cond = threading.Condition()
        self._version = 0
        self._teachers: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Owned by the thread:
        self._epoch: str | None = None
        self._remote_version = -1
        self._ids = itertools.count(1)
        self.leader: str | None = None  # the balancer answering us now, for logs and tests
        self._leaderless: dict[str, str] = {}  # balancer -> why it answers but names no leader (under _cond)

    # -- public API -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"zdistill-discovery-{self.student_id}", daemon=True)
        self._thread.start()
        _live.add(self)

    def current(self) -> tuple[int, list[str]]:
        with self._cond:
            return self._version, list(self._teachers)

    def leaderless(self) -> dict[str, str]:
        """The balancers that answer but name no leader, each with the reason it gave.

        A student with no teachers says this rather than "no balancer answers": the
        balancer is up, but none leads (it cannot reach Redis, say).
        """
        with self._cond:
            return dict(self._leaderless)

    def wait_for_change(self, version: int, timeout: float) -> tuple[int, list[str]]:
        """Block until the version differs from ``version`` or ``timeout`` passes; then :meth:`current`."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != version, timeout=max(0.0, timeout))
            return self._version, list(self._teachers)

    def close(self) -> None:
        """Stop the thread, tell the balancer we left (best effort), free the sockets."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        _live.discard(self)
        if self._own_ctx and (thread is None or not thread.is_alive()):
            self._ctx.term()  # every socket is closed by now (linger bounded): returns at once

    def __enter__(self) -> DiscoveryClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        session = _Session(self)
        try:
            session.run()
        except zmq.ContextTerminated:
            pass
        except Exception:  # never let the thread die loudly; the student keeps its teachers
            if not self._stop.is_set():
                log.exception("discovery thread failed; teachers stay as they are")
        finally:
            session.close()

    def _note_leaderless(self, server: str, why: str | None) -> None:
        """Keep (``why``) or forget (None) that ``server`` answered without naming a leader."""
        with self._cond:
            if why is None:
                self._leaderless.pop(server, None)
                return
            if self._leaderless.get(server) != why:
                log.warning("balancer %s is up but has no leader (%s); asking again", server, why)
            self._leaderless[server] = why

    def _apply(self, membership: messages.Membership) -> None:
        """Take a snapshot or update if it is newer than what we hold (Clone pattern)."""
        epoch, version, teachers = membership.epoch, membership.version, membership.teachers
        if epoch == self._epoch and version <= self._remote_version:
            return  # stale: an old update, or the periodic republish of what we have
        if epoch != self._epoch and self._epoch is not None:
            log.info("balancer history changed (%s -> %s)", self._epoch, epoch)
        self._epoch = epoch
        self._remote_version = version
        with self._cond:
            if teachers != self._teachers:
                self._teachers = list(teachers)
                self._version += 1
                log.info("teachers for %s (version %d): %s", self.student_id, self._version, teachers)
                self._cond.notify_all()


class _Session:
    """The thread's sockets and timers: one balancer conversation at a time."""

    def __init__(self, owner: DiscoveryClient) -> None:
        self.o = owner
        self.dealer: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self.pub_endpoint: str | None = None
        self.target: str | None = None  # the balancer we talk to now
        self.redirect: str | None = None  # a leader named by a standby, tried next
        self.rotation = 0  # index into servers of the next one to try
        self.failed_in_round = 0
        self.pending: tuple[int, str, float] | None = None  # (id, kind, deadline)
        self.registered = False
        self.interval = 1.0  # heartbeat period, from the balancer's lease
        self.next_beat = 0.0
        self.resume_at = 0.0  # backing off until then

    # sockets
    def _connect(self, address: str) -> None:
        self._close_dealer()
        sock = wire.limit_socket(self.o._ctx.socket(zmq.DEALER), LIMITS)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        secure_client(sock, self.o.curve)
        sock.connect(teacher_endpoint(address))
        self.dealer = sock
        self.target = address
        self.registered = False

    def _close_dealer(self) -> None:
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.dealer = None
        self.pending = None

    def _subscribe(self, endpoint: str) -> None:
        if endpoint == self.pub_endpoint and self.sub is not None:
            return
        if self.sub is not None:
            self.sub.close(linger=0)
        sock = wire.limit_socket(self.o._ctx.socket(zmq.SUB), LIMITS)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.SUBSCRIBE, self.o.student_id.encode() + b"\0")
        secure_client(sock, self.o.curve)
        sock.connect(endpoint)
        self.sub = sock
        self.pub_endpoint = endpoint

    def close(self) -> None:
        if self.dealer is not None and self.registered:
            self._say_goodbye()
        self._close_dealer()
        if self.sub is not None:
            self.sub.close(linger=0)
            self.sub = None

    def _say_goodbye(self) -> None:
        """Tell the balancer we left, so our teachers go to others now, not after the lease."""
        assert self.dealer is not None
        try:
            req_id = self._send("bye")
            end = time.monotonic() + _CLOSE_WAIT
            while (left := end - time.monotonic()) > 0 and self.dealer.poll(int(left * 1000)):
                reply = self._recv(self.dealer)
                if reply is not None and reply.id == req_id:
                    return
        except zmq.ZMQError:
            pass

    # messages
    def _send(self, kind: str) -> int:
        assert self.dealer is not None
        req_id = next(self.o._ids)
        header: dict[str, Any] = {"kind": kind, "id": req_id, "student": self.o.student_id}
        if kind in ("register", "heartbeat"):
            header.update(service=self.o.service, max_teachers=self.o.max_teachers)
        wire.send(self.dealer, header, flags=zmq.NOBLOCK)
        self.pending = (req_id, kind, time.monotonic() + self.o.timeout)
        return req_id

    def _recv(self, sock: zmq.Socket) -> messages.BalancerReply | None:
        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        try:
            return messages.read_reply(wire.decode(frames, LIMITS).header)
        except (WireError, RequestError) as exc:  # its request times out, and the next balancer is asked
            log.warning("ignoring a malformed reply from balancer %s: %s", self.target, exc)
            return None

    # the loop
    def run(self) -> None:
        while not self.o._stop.is_set():
            now = time.monotonic()
            if self.dealer is None and now >= self.resume_at:
                self._connect(self._next_target())
                self._send("register")
            elif self.pending is not None and now >= self.pending[2]:
                self._failed(f"no answer to {self.pending[1]} in {self.o.timeout:g} s")
                continue
            elif self.dealer is not None and self.pending is None and now >= self.next_beat:
                self._send("heartbeat")
            socks = [s for s in (self.dealer, self.sub) if s is not None]
            if not socks:
                self.o._stop.wait(_TICK)
                continue
            poller = zmq.Poller()
            for sock in socks:
                poller.register(sock, zmq.POLLIN)
            for sock, _ in poller.poll(int(_TICK * 1000)):
                if sock is self.sub:
                    self._drain_sub()
                elif sock is self.dealer:
                    self._drain_dealer()

    def _next_target(self) -> str:
        if self.redirect is not None:
            target, self.redirect = self.redirect, None
            return target
        servers = self.o.servers
        target = servers[self.rotation % len(servers)]
        self.rotation = (self.rotation + 1) % len(servers)
        return target

    def _failed(self, why: str) -> None:
        log.warning("discovery server %s: %s; trying the next", self.target, why)
        if self.target is not None:
            self.o._note_leaderless(self.target, None)  # it does not answer at all now
        self._close_dealer()
        self.failed_in_round += 1
        if self.failed_in_round >= len(self.o.servers):
            self.failed_in_round = 0
            self.resume_at = time.monotonic() + _BACKOFF

    def _drain_sub(self) -> None:
        while self.sub is not None:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                update = messages.read_update(wire.decode(frames[1:], LIMITS).header)  # frames[0] is the topic
            except (WireError, RequestError) as exc:
                log.debug("ignoring a malformed update: %s", exc)
                continue
            if update.student == self.o.student_id:
                self.o._apply(update)

    def _drain_dealer(self) -> None:
        while self.dealer is not None:
            try:
                reply = self._recv(self.dealer)
            except zmq.Again:
                return
            if reply is None or self.pending is None or reply.id != self.pending[0]:
                continue  # late or foreign: its request already timed out
            self.pending = None
            self._on_reply(reply)

    def _on_reply(self, reply: messages.BalancerReply) -> None:
        if isinstance(reply, messages.Assignment):
            if not self.registered or self.o.leader != self.target:
                log.info("student %s registered with balancer %s", self.o.student_id, self.target)
            self.registered = True
            self.failed_in_round = 0
            self.o.leader = self.target
            self.o._note_leaderless(self.target, None)
            if reply.lease_ms > 0:
                self.interval = max(0.05, reply.lease_ms / 4000)
            self.next_beat = time.monotonic() + self.interval
            fresh_sub = reply.pub != self.pub_endpoint
            self._subscribe(reply.pub)
            self.o._apply(reply)
            if fresh_sub:  # Clone pattern: subscribed first, now the snapshot
                self.next_beat = time.monotonic()
                self._send("snapshot")
        elif isinstance(reply, messages.Redirect):
            leader = reply.leader
            self._close_dealer()
            if leader and leader != self.target:
                log.info("balancer %s is standing by; following leader %s", self.target, leader)
                self.o._note_leaderless(self.target, None)
                self.redirect = leader
            else:  # nobody leads yet (or a stale record): look again soon
                # a balancer that gives no reason: the likeliest one
                self.o._note_leaderless(self.target, reply.why[:200] if reply.why else "Redis unreachable?")
                self.failed_in_round += 1
                self.resume_at = time.monotonic() + _BACKOFF
        elif isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNKNOWN_STUDENT:
            self._send("register")
        else:
            log.warning("balancer %s answered %s: %s", self.target, reply.__struct_config__.tag,
                        getattr(reply, "message", ""))
            self._close_dealer()
            self.resume_at = time.monotonic() + _BACKOFF


@atexit.register
def _close_all() -> None:
    """At interpreter exit, say goodbye for clients never closed (their teachers free up now)."""
    for client in list(_live):
        client.close()


def ask_balancer(address: str, request: messages.BalancerRequest, timeout: float) -> messages.BalancerReply | None:
    """One request to a balancer; its typed reply, or None if nothing readable came in time.

    A reply that is a message but none of the balancer's (a teacher's, or a field of the
    wrong type) comes back as an :class:`~zdistill.wire.ErrorReply` saying so: something
    answered, just not a balancer.  An ``address`` that is not a balancer address raises
    :class:`ConfigError`, before any socket is made.
    """
    endpoint = teacher_endpoint(address, "balancer")
    ctx = zmq.Context.instance()
    sock = wire.limit_socket(secure_client(ctx.socket(zmq.DEALER), client_keys_from_env()), LIMITS)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        wire.send(sock, msgspec.to_builtins(request))
        if not sock.poll(int(timeout * 1000)):
            return None
        header = wire.decode(sock.recv_multipart(), LIMITS).header
    except WireError:
        return None
    finally:
        sock.close(linger=0)
    try:
        return messages.read_reply(header)
    except RequestError as exc:
        return ErrorReply(id=header.get("id") if isinstance(header.get("id"), int) else None,
                          code=exc.code, message=str(exc))
