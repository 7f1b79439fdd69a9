"""The teacher protocol's headers as types: what a student asks a teacher and what comes back.

Every message is a :mod:`zdistill.wire` message whose header is one of the
:class:`~zdistill.wire.Header` types below; the teacher reads a request with
:func:`read_request`, the client a reply with :func:`read_reply`.  The arrays travel
beside the header (``predict`` carries one per feed, ``result`` one per fetch).  The
body of a ``meta`` reply stays a map: whoever reads it checks it (the student against
its slots, :func:`zdistill.discovery.store.teacher_meta` for a record), and a real
teacher reports it from its own model.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from zdistill.wire import ErrorReply, Header, by_kind, read_header

# the share weights a client may declare, relative to the default 1: bounded both ways so
# that fair-queueing tags (rows / weight, summed) keep their precision for ever
MAX_WEIGHT = 100.0
MIN_WEIGHT = 1 / MAX_WEIGHT


class Predict(Header, tag="predict"):
    """Run the model on the arrays sent with it (one per feed, the same rows in each).

    ``weight``: the client's share of the teacher relative to other clients (default 1):
    a client declaring 2 gets twice the rows of one declaring 1 while both keep requests
    queued.  Declared, not proven: see docs/teacher.md, Fair shares.
    """

    weight: Annotated[float, msgspec.Meta(ge=MIN_WEIGHT, le=MAX_WEIGHT)] = 1.0


class MetaRequest(Header, tag="meta"):
    """Ask for the teacher's feeds, fetches, bounds, model id and stats."""


class StatsRequest(Header, tag="stats"):
    """Ask for the teacher's counters alone."""


class Ping(Header, tag="ping"):
    """Ask whether the teacher is serving (answered with :class:`Pong`)."""


TeacherRequest = Predict | MetaRequest | StatsRequest | Ping


class PredictReply(Header, tag="result"):
    """The answer to :class:`Predict`: one array per fetch rides beside it."""


class MetaReply(Header, tag="meta"):
    """The answer to :class:`MetaRequest`; its body stays a map for its reader to check."""


class StatsReply(Header, tag="stats"):
    """The answer to :class:`StatsRequest`."""

    stats: dict[str, Any]


class Pong(Header, tag="pong"):
    """The answer to :class:`Ping`."""


TeacherReply = PredictReply | MetaReply | StatsReply | Pong | ErrorReply

REQUESTS = by_kind(Predict, MetaRequest, StatsRequest, Ping)
REPLIES = by_kind(PredictReply, MetaReply, StatsReply, Pong, ErrorReply)


def read_request(header: dict[str, Any]) -> TeacherRequest:
    """The typed request a teacher got, or :class:`~zdistill.errors.RequestError` ``bad_request``."""
    return read_header(header, REQUESTS, "request")  # type: ignore[return-value]


def read_reply(header: dict[str, Any]) -> TeacherReply:
    """The typed reply a client got, or :class:`~zdistill.errors.RequestError` ``bad_request``."""
    return read_header(header, REPLIES, "reply")  # type: ignore[return-value]
