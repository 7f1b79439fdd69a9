"""The balancer protocol's typed headers: each kind read, and each refused with a field of the wrong type."""

from __future__ import annotations

from typing import Any

import pytest

from zdistill.discovery import messages as dm
from zdistill.errors import ErrorCode, RequestError

REG = {"kind": "register", "id": 1, "student": "s1", "service": "svc", "max_teachers": 2}
MEMBERSHIP = {"student": "s1", "service": "svc", "epoch": "e1", "version": 3, "teachers": ["a:1", "b:2"]}
STATUS = {"kind": "status", "id": 1, "leading": True, "leader": "h:1", "server": "h:1", "pub": "tcp://h:2",
          "epoch": None, "redis": True, "notifications": False, "students": 2, "teachers": {"svc": 3}}

# One valid header per kind, and a field of the wrong type for it.
REQUESTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "register": (REG, {"max_teachers": True}),
    "heartbeat": ({**REG, "kind": "heartbeat"}, {"service": None}),
    "snapshot": ({"kind": "snapshot", "id": 2, "student": "s1"}, {"student": 5}),
    "bye": ({"kind": "bye", "id": 3, "student": "s1"}, {"student": ["s1"]}),
    "status": ({"kind": "status", "id": 4}, {"id": 1.5}),
}
REPLIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "assignment": ({"kind": "assignment", "id": 1, **MEMBERSHIP, "pub": "tcp://h:2", "lease_ms": 3000},
                   {"teachers": "a:1"}),
    "redirect": ({"kind": "redirect", "id": 2, "leader": None, "why": "no lease yet"}, {"leader": 7}),
    "ok": ({"kind": "ok", "id": 3}, {"id": [3]}),
    "status": (STATUS, {"students": "2"}),
    "error": ({"kind": "error", "id": 5, "code": "unknown_student", "message": "register first"}, {"message": None}),
}


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_a_request_reads_as_its_type_and_a_wrong_field_is_refused(kind: str) -> None:
    good, wrong = REQUESTS[kind]
    assert type(dm.read_request(good)) is dm.REQUESTS[kind]
    with pytest.raises(RequestError) as info:
        dm.read_request({**good, **wrong})
    assert info.value.code == ErrorCode.BAD_REQUEST and f"$.{next(iter(wrong))}" in str(info.value)


@pytest.mark.parametrize("kind", list(REPLIES))
def test_a_reply_reads_as_its_type_and_a_wrong_field_is_refused(kind: str) -> None:
    good, wrong = REPLIES[kind]
    assert type(dm.read_reply(good)) is dm.REPLIES[kind]
    with pytest.raises(RequestError) as info:
        dm.read_reply({**good, **wrong})
    assert info.value.code == ErrorCode.BAD_REQUEST and f"$.{next(iter(wrong))}" in str(info.value)


def test_an_update_reads_as_its_type_and_a_wrong_field_is_refused() -> None:
    update = dm.read_update({"kind": "update", **MEMBERSHIP})
    assert update.teachers == ["a:1", "b:2"] and update.version == 3
    with pytest.raises(RequestError, match=r"\$\.version"):
        dm.read_update({"kind": "update", **MEMBERSHIP, "version": "3"})
    with pytest.raises(RequestError, match="unknown update kind"):
        dm.read_update({"kind": "assignment", **MEMBERSHIP})


def test_a_teacher_request_is_not_a_balancer_request() -> None:
    with pytest.raises(RequestError, match="unknown request kind 'ping'"):
        dm.read_request({"kind": "ping", "id": 1})
