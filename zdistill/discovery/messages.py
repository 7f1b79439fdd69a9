"""The balancer protocol's headers as types: what students and ``zdistill status`` ask a balancer, and its answers.

Every message is a :mod:`zdistill.wire` message without arrays, whose header is one of
the :class:`~zdistill.wire.Header` types below.  The balancer reads a request with
:func:`read_request`; a student's discovery client reads a reply with
:func:`read_reply` and the updates the balancer publishes with :func:`read_update`.
What a field may hold beyond its type (a student id's characters, the range of
``max_teachers``) the balancer checks itself, with the rest of its rules.
"""

from __future__ import annotations

from typing import Any

from zdistill.wire import ErrorReply, Header, by_kind, read_header


class Register(Header, tag="register"):
    """A student asks for teachers of ``service``, at most ``max_teachers`` of them."""

    student: str
    service: str
    max_teachers: int


class Heartbeat(Register, tag="heartbeat"):
    """A registered student is still there (and may change its service or its count)."""


class Snapshot(Header, tag="snapshot"):
    """A student asks for its assignment as it is now (after subscribing to updates)."""

    student: str


class Bye(Header, tag="bye"):
    """A student leaves: its teachers go to the others now, not after its lease."""

    student: str


class StatusRequest(Header, tag="status"):
    """``zdistill status`` asks how the balancer stands."""


BalancerRequest = Register | Heartbeat | Snapshot | Bye | StatusRequest


class Membership(Header):
    """A student's teachers, as of the balancer history ``epoch`` and its own ``version`` counter."""

    student: str
    service: str
    epoch: str | None
    version: int
    teachers: list[str]


class Assignment(Membership, tag="assignment"):
    """The answer to a register, heartbeat or snapshot: the teachers, and where updates are published."""

    pub: str
    lease_ms: int


class Update(Membership, tag="update"):
    """Published (topic: the student id) whenever a student's teachers change, and now and then again."""


class Redirect(Header, tag="redirect"):
    """A standby balancer's answer: ask ``leader`` (None: no leader yet, ``why`` says why)."""

    leader: str | None
    why: str | None = None


class Ok(Header, tag="ok"):
    """The answer to :class:`Bye`."""


class StatusReply(Header, tag="status"):
    """The answer to :class:`StatusRequest`."""

    leading: bool
    leader: str | None
    server: str
    pub: str
    epoch: str | None
    redis: bool
    notifications: bool
    students: int
    teachers: dict[str, int]


BalancerReply = Assignment | Redirect | Ok | StatusReply | ErrorReply

REQUESTS = by_kind(Register, Heartbeat, Snapshot, Bye, StatusRequest)
REPLIES = by_kind(Assignment, Redirect, Ok, StatusReply, ErrorReply)
UPDATES = by_kind(Update)


def read_request(header: dict[str, Any]) -> BalancerRequest:
    """The typed request a balancer got, or :class:`~zdistill.errors.RequestError` ``bad_request``."""
    return read_header(header, REQUESTS, "request")  # type: ignore[return-value]


def read_reply(header: dict[str, Any]) -> BalancerReply:
    """The typed reply from a balancer, or :class:`~zdistill.errors.RequestError` ``bad_request``."""
    return read_header(header, REPLIES, "reply")  # type: ignore[return-value]


def read_update(header: dict[str, Any]) -> Update:
    """A typed update the balancer published, or :class:`~zdistill.errors.RequestError` ``bad_request``."""
    return read_header(header, UPDATES, "update")
