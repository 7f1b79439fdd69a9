"""A client for one teacher: ``meta``, ``ping`` and pipelined ``predict`` requests.

A DEALER socket lets many requests be in flight at once; each carries an id and a
deadline.  :meth:`TeacherClient.submit` sends without waiting and
:meth:`TeacherClient.collect` hands back whatever has finished (answers, teacher
errors, or :class:`~zdistill.errors.TeacherTimeout` for requests past their
deadline), so a caller with its own event loop can poll :attr:`socket` itself.
Late answers to requests that already timed out are dropped.
"""

from __future__ import annotations

import errno
import itertools
import logging
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import zmq
from zmq.utils.monitor import recv_monitor_message

from zdistill import wire
from zdistill.errors import ConfigError, RequestError, TeacherError, TeacherTimeout, WireError
from zdistill.security import ClientKeys, client_keys_from_env, secure_client
from zdistill.spec import Tensors
from zdistill.teacher_messages import MAX_WEIGHT, MIN_WEIGHT, read_reply
from zdistill.triton_address import FORM as TRITON_FORM
from zdistill.triton_address import TritonAddress
from zdistill.wire import ErrorReply

log = logging.getLogger(__name__)

ADDRESS_FORMS = "HOST:PORT, tcp://HOST:PORT or ipc://PATH"
_HOST_PORT_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]{1,255}:([0-9]{1,5})$")  # a name, IPv4 or [IPv6], and a port
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
_NOT_SPOKEN = {  # schemes a user may try, and why zdistill cannot use them
    "triton": "a Triton Inference Server is a teacher (triton://HOST:PORT/MODEL), not a zdistill-balancer",
    "grpc": "zdistill speaks ZeroMQ, not gRPC, to a zdistill-teacher or zdistill-balancer",
    "http": "zdistill speaks ZeroMQ, not HTTP, to a zdistill-teacher or zdistill-balancer",
    "https": "zdistill speaks ZeroMQ (encrypted with CURVE), not HTTPS, to a zdistill-teacher or zdistill-balancer",
}


def teacher_endpoint(address: str, what: str = "teacher") -> str:
    """The ZeroMQ endpoint of an address a user gives: ``'10.0.0.5:9292'`` -> ``'tcp://10.0.0.5:9292'``.

    An address of a teacher or a balancer (``what`` says which, for the message) is
    ``HOST:PORT`` (a host name, an IPv4 or an ``[IPv6]`` address, a port of 1..65535),
    ``tcp://HOST:PORT`` or ``ipc://PATH``; a teacher's may also be a model on a Triton
    Inference Server, ``triton://HOST:PORT/MODEL[/VERSION]``, returned in its normal
    form (:class:`~zdistill.triton_address.TritonAddress`: no ZeroMQ endpoint, a
    :class:`~zdistill.triton_client.TritonClient` talks to it).  Anything else raises
    :class:`ConfigError` naming the address, why, and what is accepted: a typo or
    another server's URL (``http://``) is reported where the address is given, not as
    a ``ZMQError`` from deep inside a worker, nor as a connection retried until
    ``teacher_wait`` runs out.
    """
    if not isinstance(address, str):
        raise ConfigError(f"a {what} address must be a string ({ADDRESS_FORMS}), got {type(address).__name__}")
    given = address.strip()
    scheme = _SCHEME_RE.match(given)
    if scheme is None:
        rest, endpoint = given, f"tcp://{given}"
    elif scheme.group(1).lower() == "ipc" and scheme.group(2):
        return f"ipc://{scheme.group(2)}"
    elif scheme.group(1).lower() == "tcp":
        rest, endpoint = scheme.group(2), f"tcp://{scheme.group(2)}"
    elif scheme.group(1).lower() == "triton" and what == "teacher":
        try:
            return str(TritonAddress.parse(given))
        except ConfigError as exc:
            raise ConfigError(f"{exc}; a teacher address is {ADDRESS_FORMS}, or {TRITON_FORM}") from None
    else:
        name = scheme.group(1).lower()
        why = _NOT_SPOKEN.get(name, "ipc:// names no path" if name == "ipc" else f"unknown scheme {name}://")
        raise ConfigError(f"{what} address {address!r:.200}: {why}; a {what} address is {ADDRESS_FORMS}")
    port = _HOST_PORT_RE.match(rest)
    if port is None or not 0 < int(port.group(1)) <= 65535:
        raise ConfigError(f"{what} address {address!r:.200} is not {ADDRESS_FORMS} (with a port of 1..65535)")
    return endpoint


def addresses(value: str | Sequence[str], what: str, kind: str = "teacher") -> list[str]:
    """The addresses of ``kind`` (teacher, balancer) in ``value``, an ``'a,b'`` string or a list, each checked.

    Checked here, where they are given (:func:`teacher_endpoint`), so a typo is reported
    with ``what`` (the argument or variable that held it), not from deep in a worker.
    """
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise TypeError(f"{what} must be a list, tuple or 'a,b' string, got {type(value).__name__}")
    items = [v for v in items if v]
    if not items:
        raise ConfigError(f"{what} is empty")
    for address in items:
        teacher_endpoint(address, kind)
    return items


def unreachable(address: str, timeout: float = 1.0) -> str | None:
    """Why a TCP connection to ``address`` fails, or None when it connects.

    ZeroMQ retries a connection quietly for ever; a plain connect says at once whether
    nothing listens, the host is unknown, or there is no route to it.
    """
    endpoint = teacher_endpoint(address)
    if endpoint.startswith("triton://"):
        triton = TritonAddress.parse(endpoint)
        host, port = triton.host.strip("[]"), str(triton.port)
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        host = host.strip("[]")
    else:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except socket.gaierror as exc:
        return f"unknown host {host!r} ({exc.strerror})"
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except TimeoutError:
        return f"no answer to a TCP connect within {timeout:g} s (the host is down, or a firewall drops packets)"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"no route to host ({exc.strerror})"
        return f"cannot connect ({exc.strerror or exc})"


def handshake_failure(event: int, has_keys: bool) -> str:
    """What a failed ZeroMQ handshake means for a zdistill client, and what to set."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return ("CURVE handshake refused: this client's key (ZDISTILL_CURVE_CLIENT_KEY) is not on the server's "
                "allow list (--curve-allow)")
    if not has_keys:
        return "the server requires CURVE and this client has no keys: set ZDISTILL_CURVE_SERVER_KEY"
    return ("CURVE handshake refused: ZDISTILL_CURVE_SERVER_KEY is not this server's public key "
            "(or the server does not use CURVE)")


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass
class Completion:
    """A finished request: ``result`` on success, else ``error``."""

    req_id: int
    result: Tensors | None = None
    header: dict[str, Any] | None = None
    error: Exception | None = None


class TeacherClient:
    """Talks to one teacher; not thread-safe (one owner, like the socket).

    ``address``: ``HOST:PORT``, ``tcp://HOST:PORT`` or ``ipc://PATH``; anything else
    raises :class:`~zdistill.errors.ConfigError` here (:func:`teacher_endpoint`).
    ``curve``: the CURVE keys to reach a teacher that requires them; by default they
    come from the environment (:func:`zdistill.security.client_keys_from_env`).
    ``weight``: this client's share of the teacher relative to its other clients (sent
    with every ``predict``; the default 1 is not sent), from
    :data:`~zdistill.teacher_messages.MIN_WEIGHT` to :data:`~zdistill.teacher_messages.MAX_WEIGHT`.
    """

    def __init__(
        self,
        address: str,
        context: zmq.Context | None = None,
        timeout: float = 30.0,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        watch: bool = False,
        curve: ClientKeys | None | Literal["env"] = "env",
        weight: float = 1.0,
    ) -> None:
        if not MIN_WEIGHT <= weight <= MAX_WEIGHT:  # NaN fails too
            raise ConfigError(f"a client's weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, got {weight!r}")
        self.weight = float(weight)
        self.address = address
        self.endpoint = teacher_endpoint(address)
        if self.endpoint.startswith("triton://"):
            raise ConfigError(f"teacher {address!r:.200} is a model on Triton: zdistill.triton_client.connect_teacher "
                              "gives its client")
        self.timeout = timeout
        self.limits = limits
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._deadlines: dict[int, float] = {}
        self._done: dict[int, Completion] = {}
        self._watch = watch
        self._curve = client_keys_from_env() if curve == "env" else curve
        self.monitor: zmq.Socket | None = None
        self.handshake_error: str | None = None  # why the last handshake failed (``watch=True`` only)
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = wire.limit_socket(self._ctx.socket(zmq.DEALER), self.limits)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        secure_client(sock, self._curve)
        if self._watch:  # a dropped TCP connection is the fastest sign of a dead teacher
            events = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED
            self.monitor = sock.get_monitor_socket(events)
        sock.connect(self.endpoint)
        return sock

    def disconnected(self) -> bool:
        """Drain connection events (``watch=True`` only); True if the link to the teacher dropped.

        A failed handshake (CURVE keys that do not fit) is kept in :attr:`handshake_error`.
        """
        dropped = False
        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            dropped = dropped or event == zmq.EVENT_DISCONNECTED
            if event & _HANDSHAKE_FAILED:
                self.handshake_error = handshake_failure(event, self._curve is not None)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake_error = None
        return dropped

    def _close_socket(self) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.socket.close(linger=0)

    @property
    def in_flight(self) -> int:
        return len(self._deadlines)

    def reset(self) -> None:
        """Drop every request in flight and start a fresh connection (after a timeout)."""
        self._close_socket()
        self._deadlines.clear()
        self._done.clear()
        self.socket = self._connect()

    def close(self) -> None:
        self._close_socket()
        self._deadlines.clear()

    # -- pipelined use ------------------------------------------------------

    def submit(self, kind: str = "predict", arrays: Tensors | None = None, timeout: float | None = None) -> int:
        """Send a request now and return its id; the answer comes from :meth:`collect`."""
        req_id = next(self._ids)
        header: dict[str, Any] = {"kind": kind, "id": req_id}
        if kind == "predict" and self.weight != 1.0:
            header["weight"] = self.weight
        try:
            wire.send(self.socket, header, arrays, flags=zmq.NOBLOCK)
        except zmq.Again:  # the send queue is full: the teacher has not been reachable for a while
            raise TeacherTimeout(f"teacher {self.address} is not reachable (send queue full)") from None
        self._deadlines[req_id] = time.monotonic() + (self.timeout if timeout is None else timeout)
        return req_id

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values()) if self._deadlines else None

    def collect(self, wait: float = 0.0) -> list[Completion]:
        """Finished requests: waits up to ``wait`` seconds for the first, then takes all ready."""
        done = list(self._done.values())
        self._done.clear()
        return done + self._receive(0.0 if done else wait)

    def _receive(self, wait: float) -> list[Completion]:
        """Answers on the socket (waiting up to ``wait`` s for one) and requests past their deadline."""
        done: list[Completion] = []
        self.socket.poll(max(0, int(wait * 1000)))
        while self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            completion = self._on_reply(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
            if completion is not None:
                done.append(completion)
        return done + self._expire(time.monotonic())

    def _on_reply(self, frames: list[zmq.Frame]) -> Completion | None:
        try:
            msg = wire.decode(frames, self.limits)
            reply = read_reply(msg.header)
        except (WireError, RequestError) as exc:
            log.warning("dropped a broken reply from teacher %s: %s", self.address, exc)
            return None  # it cannot be matched to a request: that request's deadline will report it
        if not isinstance(reply.id, int) or self._deadlines.pop(reply.id, None) is None:
            return None  # late answer to a request that already timed out
        if isinstance(reply, ErrorReply):
            return Completion(reply.id, error=TeacherError(f"teacher {self.address}: {reply.message}", reply.code))
        return Completion(reply.id, result=msg.arrays, header=msg.header)

    def _expire(self, now: float) -> list[Completion]:
        late = [i for i, t in self._deadlines.items() if t <= now]
        for req_id in late:
            del self._deadlines[req_id]
        return [Completion(i, error=TeacherTimeout(f"teacher {self.address} did not answer in time")) for i in late]

    # -- one request at a time ----------------------------------------------

    def call(self, kind: str, arrays: Tensors | None = None, timeout: float | None = None) -> Completion:
        """Send one request and wait for its own answer (others finishing meanwhile are kept)."""
        req_id = self.submit(kind, arrays, timeout)
        while True:
            wait = max(0.0, self._deadlines.get(req_id, time.monotonic()) - time.monotonic())
            for completion in self._receive(wait):
                if completion.req_id == req_id:
                    if completion.error is not None:
                        raise completion.error
                    return completion
                self._done[completion.req_id] = completion

    def predict(self, feeds: Tensors, timeout: float | None = None) -> Tensors:
        """The teacher's fetches for ``feeds``: arrays, and a :class:`~zdistill.spec.Ragged` per-token fetch.

        A feed of rows of different lengths travels as a :class:`~zdistill.spec.Ragged`.
        """
        return self.call("predict", feeds, timeout).result or {}

    def meta(self, timeout: float | None = None) -> dict[str, Any]:
        header = self.call("meta", timeout=timeout).header
        return dict(header or {})

    def ping(self, timeout: float | None = None) -> None:
        """Return when the teacher answers; raise :class:`TeacherTimeout` if it does not."""
        self.call("ping", timeout=timeout)

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        return dict((self.call("stats", timeout=timeout).header or {}).get("stats", {}))
