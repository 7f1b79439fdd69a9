"""The student's data-plane messages: each kind round-trips, and every malformed header is a WireError.

The dispatcher, the producer and the workers trust :func:`zdistill.student.protocol.decode`
to turn a peer's bad header into one :class:`~zdistill.errors.WireError` before any field
is used, so these tests break each field of each kind in every way a peer could.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zdistill import wire
from zdistill.errors import WireError
from zdistill.student import protocol

EXAMPLES: list[protocol.Msg] = [
    protocol.Grant(slots=[0, 3]),
    protocol.Task(epoch=2, task_id=7, slot=1, rows=64, nbytes=4096, sizes=[32, 32],
                  shm={"name": "slot-1", "size": 4096}, hits=8),
    protocol.End(epoch=2, tasks=9, error=protocol.RaisedError(type="ValueError", module="builtins", message="boom",
                                                              traceback="Traceback ...")),
    protocol.Hello(pid=1234),
    protocol.Status(up=True, reason="", unusable="", max_batch_size=64, instances=2, cache="read-only"),
    protocol.Done(epoch=2, task_id=7, elapsed=0.5, service=0.25, cached=3),
    protocol.Undone(epoch=2, task_id=7, code=protocol.RETURNED, message="teacher down"),
]
# one value of every msgpack type a peer can send
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)


def header_of(msg: protocol.Msg) -> dict[str, Any]:
    """The decoded header map of ``msg``, to be broken by a test."""
    return msgpack.unpackb(protocol.encode(msg)[0])


def decode_header(header: dict[str, Any]) -> protocol.Msg:
    return protocol.decode([msgpack.packb(header)])[0]


def fits(value: Any, example: Any) -> bool:
    """Whether ``value`` has the wire type of ``example`` (an int is a float, as on the wire)."""
    return type(value) is type(example) or (type(example) is float and type(value) is int)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_kind_round_trips(msg: protocol.Msg) -> None:
    decoded, arrays = protocol.decode(protocol.encode(msg))
    assert decoded == msg and type(decoded) is type(msg) and arrays == {}
    assert header_of(msg)["kind"] == type(msg).__name__.lower()


def test_arrays_travel_as_raw_frames_beside_the_typed_header() -> None:
    prob = np.arange(12, dtype=np.float32).reshape(4, 3)
    frames = protocol.encode(EXAMPLES[5], {"prob": prob})
    assert len(frames) == 2 and frames[1] is prob  # sent as is, no copy
    done, arrays = protocol.decode([bytes(frames[0]), prob.tobytes()])
    assert isinstance(done, protocol.Done) and done.cached == 3
    np.testing.assert_array_equal(arrays["prob"], prob)
    # a plain wire reader sees the same message: the typed header is an ordinary wire header
    plain = wire.decode([bytes(frames[0]), prob.tobytes()])
    assert plain.kind == "done" and plain.header["task_id"] == 7 and set(plain.arrays) == {"prob"}


@settings(max_examples=400, deadline=None)
@given(msg=st.sampled_from(EXAMPLES), data=st.data())
def test_a_field_of_another_type_is_a_wire_error(msg: protocol.Msg, data: st.DataObject) -> None:
    header = header_of(msg)
    name = data.draw(st.sampled_from(sorted(set(header) - {"kind", wire.ARRAYS_KEY})))
    value = data.draw(ANY_VALUE.filter(lambda v: v is not None and not fits(v, header[name])))
    with pytest.raises(WireError, match=name):
        decode_header({**header, name: value})


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_a_missing_or_unknown_field_is_a_wire_error(msg: protocol.Msg) -> None:
    header = header_of(msg)
    required = [f for f in type(msg).__struct_fields__ if f != "table" and f not in _defaults(msg)]
    for name in required:
        with pytest.raises(WireError, match=name):
            decode_header({k: v for k, v in header.items() if k != name})
    with pytest.raises(WireError, match="surplus"):
        decode_header({**header, "surplus": 1})


def _defaults(msg: protocol.Msg) -> set[str]:
    fields = type(msg).__struct_fields__
    return set(fields[len(fields) - len(type(msg).__struct_defaults__):])


@pytest.mark.parametrize("header", [
    {"kind": "grant", "slots": [0, "1"], "arrays": []},  # a list of the wrong items
    {"kind": "grant", "slots": [True], "arrays": []},  # a bool is not an int
    {"kind": "end", "epoch": 1, "tasks": 2, "error": {"type": 3, "module": "m", "message": ""}, "arrays": []},
    {"kind": "end", "epoch": 1, "tasks": 2, "error": {"type": "ValueError"}, "arrays": []},  # no module, message
    {"kind": "status", "up": 1, "arrays": []},  # an int is not a bool
    {"kind": "credit", "slots": [0], "arrays": []},  # no such kind
    {"slots": [0], "arrays": []},  # no kind at all
    {"kind": "hello", "pid": 1, "arrays": [["x", "<f4", [1]]]},  # an array listed, no frame for it
    {"kind": "hello", "pid": 1, "arrays": [["x", "|O", [1]]]},  # an object dtype
    ["kind", "hello"],  # not a map
], ids=repr)
def test_a_malformed_header_is_a_wire_error(header: Any) -> None:
    with pytest.raises(WireError):
        protocol.decode([msgpack.packb(header)])


@settings(max_examples=300, deadline=None)
@given(head=st.binary(max_size=64), rest=st.lists(st.binary(max_size=16), max_size=3))
def test_random_bytes_are_a_wire_error_or_a_typed_message(head: bytes, rest: list[bytes]) -> None:
    try:
        msg, arrays = protocol.decode([head, *rest])
    except WireError:
        return
    assert isinstance(msg, protocol.Message) and len(arrays) == len(rest)
