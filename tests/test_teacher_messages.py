"""The teacher protocol's typed headers: each kind read, and each refused with a field of the wrong type."""

from __future__ import annotations

from typing import Any

import pytest

from zdistill import teacher_messages as tm
from zdistill.errors import ErrorCode, RequestError

# One valid header per kind, and a field of the wrong type for it.
REQUESTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "predict": ({"kind": "predict", "id": 1}, {"id": 1.5}),
    "meta": ({"kind": "meta", "id": "m"}, {"id": [1]}),
    "stats": ({"kind": "stats", "id": None}, {"id": {"a": 1}}),
    "ping": ({"kind": "ping", "id": 7}, {"id": b"7"}),
}
REPLIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "result": ({"kind": "result", "id": 1}, {"id": 1.0}),
    "meta": ({"kind": "meta", "id": 2, "feeds": []}, {"id": True}),
    "stats": ({"kind": "stats", "id": 3, "stats": {"requests": 1}}, {"stats": [1]}),
    "pong": ({"kind": "pong", "id": 4}, {"id": [4]}),
    "error": ({"kind": "error", "id": 5, "code": "busy", "message": "full"}, {"code": 3}),
}


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_a_request_reads_as_its_type_and_a_wrong_field_is_refused(kind: str) -> None:
    good, wrong = REQUESTS[kind]
    request = tm.read_request(good)
    assert type(request) is tm.REQUESTS[kind] and request.id == good["id"]
    with pytest.raises(RequestError) as info:
        tm.read_request({**good, **wrong})
    assert info.value.code == ErrorCode.BAD_REQUEST and f"$.{next(iter(wrong))}" in str(info.value)


@pytest.mark.parametrize("kind", list(REPLIES))
def test_a_reply_reads_as_its_type_and_a_wrong_field_is_refused(kind: str) -> None:
    good, wrong = REPLIES[kind]
    reply = tm.read_reply(good)
    assert type(reply) is tm.REPLIES[kind] and reply.id == good["id"]
    with pytest.raises(RequestError) as info:
        tm.read_reply({**good, **wrong})
    assert info.value.code == ErrorCode.BAD_REQUEST and f"$.{next(iter(wrong))}" in str(info.value)


@pytest.mark.parametrize("kind", ["bogus", 7, None])
def test_an_unknown_kind_is_refused_by_name(kind: object) -> None:
    with pytest.raises(RequestError, match="unknown request kind"):
        tm.read_request({"kind": kind, "id": 1})
    with pytest.raises(RequestError, match="unknown reply kind"):
        tm.read_reply({"kind": kind, "id": 1})


def test_unknown_fields_are_ignored_so_either_side_may_add_one() -> None:
    assert tm.read_request({"kind": "ping", "id": 1, "trace": "abc"}) == tm.Ping(id=1)


def test_an_error_reply_keeps_a_code_it_does_not_know() -> None:
    reply = tm.read_reply({"kind": "error", "id": 1, "code": "new_code", "message": "m"})
    assert isinstance(reply, tm.ErrorReply) and reply.code == "new_code"
    busy = tm.read_reply({"kind": "error", "id": 1, "code": "busy", "message": ""})
    assert isinstance(busy, tm.ErrorReply) and busy.code == ErrorCode.BUSY
