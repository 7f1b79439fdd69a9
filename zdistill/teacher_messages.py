"""The teacher protocol's headers as types: what a student asks a teacher and what comes back.

Every message is a :mod:`zdistill.wire` message; its header's ``kind`` names one of the
:class:`msgspec.Struct` types below, and the receiver reads the header into that type
with :func:`read_request` (the teacher) or :func:`read_reply` (the client), so a field
of the wrong type is refused where it arrives, by one checker, never met deep inside
as a ``KeyError`` or an int that is really a bool.  Fields a receiver does not know
are ignored, so either side can add one without breaking the other.

The arrays travel beside the header (``predict`` carries one per feed, ``result`` one
per fetch); the body of a ``meta`` reply is checked by whoever reads it (the student
against its slots, :func:`zdistill.discovery.store.teacher_meta` for a record), and a
real teacher reports it from its own model.
"""

from __future__ import annotations

from typing import Any

import msgspec

from zdistill.errors import ErrorCode, RequestError

RequestId = int | str | None  # the client's own id, echoed in the reply; zdistill's client sends ints


class _Message(msgspec.Struct, tag_field="kind", kw_only=True, frozen=True):
    id: RequestId = None


class Predict(_Message, tag="predict"):
    """Run the model on the arrays sent with it (one per feed, the same rows in each)."""


class MetaRequest(_Message, tag="meta"):
    """Ask for the teacher's feeds, fetches, bounds, model id and stats."""


class StatsRequest(_Message, tag="stats"):
    """Ask for the teacher's counters alone."""


class Ping(_Message, tag="ping"):
    """Ask whether the teacher is serving (answered with :class:`Pong`)."""


Request = Predict | MetaRequest | StatsRequest | Ping


class Result(_Message, tag="result"):
    """The answer to :class:`Predict`: one array per fetch rides beside it."""


class MetaReply(_Message, tag="meta"):
    """The answer to :class:`MetaRequest`; its body stays a map for its reader to check."""


class StatsReply(_Message, tag="stats"):
    """The answer to :class:`StatsRequest`."""

    stats: dict[str, Any]


class Pong(_Message, tag="pong"):
    """The answer to :class:`Ping`."""


class ErrorReply(_Message, tag="error"):
    """A refused or failed request: ``code`` is an :class:`~zdistill.errors.ErrorCode` value.

    A plain ``str`` here, so that a code a newer teacher adds still reaches the caller.
    """

    code: str
    message: str


Reply = Result | MetaReply | StatsReply | Pong | ErrorReply


def _by_kind(*types: type[_Message]) -> dict[str, type[_Message]]:
    return {t.__struct_config__.tag: t for t in types}  # type: ignore[misc]


# msgspec.convert to one Struct costs a fifth of a microsecond; to a union, thirty times
# that (its lookup is not cached), so the receiver picks the type by ``kind`` itself.
REQUESTS = _by_kind(Predict, MetaRequest, StatsRequest, Ping)
REPLIES = _by_kind(Result, MetaReply, StatsReply, Pong, ErrorReply)


def read_request(header: dict[str, Any]) -> Request:
    """The typed request a teacher got, or :class:`RequestError` ``bad_request`` saying what is wrong."""
    return _read(header, REQUESTS, "request")  # type: ignore[return-value]


def read_reply(header: dict[str, Any]) -> Reply:
    """The typed reply a client got, or :class:`RequestError` ``bad_request`` saying what is wrong."""
    return _read(header, REPLIES, "reply")  # type: ignore[return-value]


def _read(header: dict[str, Any], types: dict[str, type[_Message]], what: str) -> _Message:
    kind = header.get("kind")
    try:
        typ = types[kind]
    except (KeyError, TypeError):  # TypeError: a kind that is a list or a map
        raise RequestError(ErrorCode.BAD_REQUEST, f"unknown {what} kind {kind!r:.40}") from None
    try:
        return msgspec.convert(header, typ)
    except msgspec.ValidationError as exc:
        raise RequestError(ErrorCode.BAD_REQUEST, f"{kind} {what}: {exc}") from None
