"""The wire format: round trips, zero-copy receipt, and refusal of every malformed message.

Every socket in zdistill speaks :mod:`zdistill.wire`, and every daemon trusts it to turn a
peer's bad bytes into one :class:`~zdistill.errors.WireError` (never a crash, never a huge
allocation, never code execution), so these tests attack it from both sides: random arrays
must come back bit-for-bit, and random or hand-crafted bad messages must raise only WireError.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zdistill import wire
from zdistill.errors import WireError
from zdistill.spec import Ragged

RECV_TIMEOUT_MS = 5000
PACKAGE = Path(__file__).resolve().parent.parent / "zdistill"

# every dtype the wire allows, in both byte orders where byte order means something
DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="?", sizes=(64, 128)),
)
# 0-d arrays, empty arrays (a zero in any axis) and a few larger ones
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
NAMES = st.text(min_size=1, max_size=20)
ARRAY_MAPS = st.dictionaries(
    NAMES, hnp.arrays(DTYPES, SHAPES), max_size=5
)
HEADERS = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k != wire.ARRAYS_KEY),
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=20),
              st.binary(max_size=20), st.lists(st.integers(-100, 100), max_size=4)),
    max_size=5,
)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality: dtype, byte order, shape and bytes (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A connected PUSH/PULL pair over ipc, so frames really cross libzmq (not Python objects)."""
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for sock in (push, pull):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        sock.setsockopt(zmq.SNDTIMEO, RECV_TIMEOUT_MS)
    wire.limit_socket(pull)
    pull.bind("ipc://*")  # a fresh abstract-free path chosen by libzmq
    push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    yield push, pull
    push.close()
    pull.close()
    ctx.term()


def send_recv(pair: tuple[zmq.Socket, zmq.Socket], header: dict, arrays: dict) -> tuple[list[zmq.Frame], wire.Message]:
    push, pull = pair
    wire.send(push, header, arrays)
    frames = pull.recv_multipart(copy=False)
    return frames, wire.decode(frames)


def reaches(obj: object, target: object) -> bool:
    """True when ``target`` is on ``obj``'s chain of buffer owners (ndarray.base, memoryview.obj)."""
    seen = 0
    while obj is not None and seen < 32:
        if obj is target:
            return True
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        seen += 1
    return False


# -- round trips ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(header=HEADERS, arrays=ARRAY_MAPS)
def test_encode_decode_round_trip(header: dict, arrays: dict) -> None:
    msg = wire.decode(wire.encode(header, arrays))
    assert msg.header == header
    assert list(msg.arrays) == list(arrays)
    for name, arr in arrays.items():
        assert same(msg.arrays[name], arr), name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=HEADERS, arrays=ARRAY_MAPS)
def test_socket_round_trip(pair, header: dict, arrays: dict) -> None:
    _, msg = send_recv(pair, header, arrays)
    assert msg.header == header
    assert list(msg.arrays) == list(arrays)
    for name, arr in arrays.items():
        assert same(msg.arrays[name], arr), name


@pytest.mark.parametrize("size", [0, 1, 100, wire.ZERO_COPY_THRESHOLD // 8 + 1, 300_000])
def test_socket_round_trip_around_zero_copy_threshold(pair, size: int) -> None:
    """Both send paths (copied below the threshold, zero-copy above) deliver the same bytes."""
    arr = np.random.default_rng(size).standard_normal(size)
    _, msg = send_recv(pair, {"kind": "x"}, {"a": arr})
    assert same(msg.arrays["a"], arr)


def test_zero_d_and_non_contiguous_arrays_keep_their_shape() -> None:
    """A 0-d array stays 0-d (np.ascontiguousarray would make it (1,)); strided views are packed."""
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    arrays = {"scalar": np.array(2.5), "flag": np.array(True), "cols": base[:, ::2], "t": base.T}
    msg = wire.decode(wire.encode({}, arrays))
    for name, arr in arrays.items():
        assert msg.arrays[name].shape == arr.shape
        assert np.array_equal(msg.arrays[name], arr)


# -- zero copy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (32, 784), (256, 784), ()])
def test_decoded_array_is_a_view_of_the_received_frame(pair, shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    frames, msg = send_recv(pair, {}, {"x": arr})
    got = msg.arrays["x"]
    frame = frames[1]
    assert reaches(got, frame), "the decoded array does not own the frame's memory chain"
    assert np.shares_memory(got, np.frombuffer(frame.buffer, dtype=np.uint8))
    assert not got.flags.writeable  # a view of a received frame must not be scribbled on
    assert same(got, arr)


# -- what encode refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.array([object(), 1], dtype=object),
        np.array(["a", "bc"]),
        np.array([b"a"]),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
        np.zeros(2, dtype="datetime64[ns]"),
        np.zeros(2, dtype="V4"),
        np.zeros(2, dtype=np.longdouble),
        [[1, 2], [3]],
    ],
    ids=["object", "str", "bytes", "structured", "datetime", "void", "longdouble", "ragged"],
)
def test_encode_refuses_non_numeric_arrays(value) -> None:
    with pytest.raises(WireError):
        wire.encode({}, {"x": value})


def test_encode_refuses_the_reserved_key_and_bad_names() -> None:
    with pytest.raises(WireError, match="reserved"):
        wire.encode({wire.ARRAYS_KEY: []})
    for name in ("", 7, "n" * 300):
        with pytest.raises(WireError, match="name"):
            wire.encode({}, {name: np.zeros(1)})


def test_encode_refuses_a_header_msgpack_cannot_carry() -> None:
    with pytest.raises(WireError, match="cannot be encoded"):
        wire.encode({"x": object()})


# -- what decode refuses -------------------------------------------------------------------------


def message(arrays: list, frames: list[bytes], **header) -> list[bytes]:
    """A hand-built message: header with the given array table, then the given frames."""
    return [msgpack.packb({**header, wire.ARRAYS_KEY: arrays}), *frames]


F4x10 = np.arange(10, dtype="<f4").tobytes()

MALFORMED = {
    "empty message": [],
    "non-msgpack header": [b"\xc1\xc1garbage"],
    "truncated msgpack header": [msgpack.packb({"kind": "predict", "arrays": []})[:-3]],
    "trailing bytes after the header": [msgpack.packb({"arrays": []}) + b"\x00"],
    "header is a list": [msgpack.packb([1, 2, 3])],
    "header is an int": [msgpack.packb(5)],
    "non-string map key": [msgpack.packb({1: 2, "arrays": []})],
    "ext type in header": [msgpack.packb({"arrays": [], "x": msgpack.ExtType(5, b"abcd")})],
    "timestamp in header": [msgpack.packb({"arrays": [], "x": msgpack.Timestamp(1, 0)})],
    "timestamp deep in header": [msgpack.packb({"arrays": [], "x": [{"t": msgpack.Timestamp(2**40, 5)}]})],
    "missing arrays table": [msgpack.packb({"kind": "predict"})],
    "arrays table not a list": [msgpack.packb({"arrays": {"x": 1}})],
    "array entry not a list": message(["x"], [F4x10]),
    "array entry of 2 items": message([["x", "<f4"]], [F4x10]),
    "array name not a string": message([[5, "<f4", [10]]], [F4x10]),
    "array name empty": message([["", "<f4", [10]]], [F4x10]),
    "array name too long": message([["n" * 300, "<f4", [10]]], [F4x10]),
    "fewer frames than arrays": message([["x", "<f4", [10]], ["y", "<f4", [10]]], [F4x10]),
    "more frames than arrays": message([["x", "<f4", [10]]], [F4x10, F4x10]),
    "frames but no arrays": message([], [F4x10]),
    "too many frames": message([[f"a{i}", "|u1", [0]] for i in range(70)], [b""] * 70),
    "oversized header": [msgpack.packb({"arrays": [], "pad": "x" * (wire.DEFAULT_LIMITS.max_header_bytes + 1)})],
    "huge shape, empty frame": message([["x", "<f4", [2**40, 2**40]]], [b""]),
    "huge shape hidden by a zero": message([["x", "<f4", [0, 2**62]]], [b""]),
    "uint64-max dim": message([["x", "|u1", [0, 2**64 - 1]]], [b""]),
    "dtype object": message([["x", "|O", [2]]], [b"\x00" * 16]),
    "dtype object, bare": message([["x", "O", [2]]], [b"\x00" * 16]),
    "dtype structured": message([["x", [["a", "<f4"]], [2]]], [b"\x00" * 8]),
    "dtype structured string": message([["x", "[('a', '<f4')]", [2]]], [b"\x00" * 8]),
    "dtype str": message([["x", "<U1", [2]]], [b"\x00" * 8]),
    "dtype bytes": message([["x", "|S4", [2]]], [b"\x00" * 8]),
    "dtype void": message([["x", "|V4", [2]]], [b"\x00" * 8]),
    "dtype datetime": message([["x", "<M8[ns]", [1]]], [b"\x00" * 8]),
    "dtype longdouble": message([["x", "<f16", [1]]], [b"\x00" * 16]),
    "dtype unknown": message([["x", "<f3", [1]]], [b"\x00" * 3]),
    "dtype garbage": message([["x", "hello", [1]]], [b"\x00"]),
    "dtype not a string": message([["x", 4, [1]]], [b"\x00" * 4]),
    # a multi-byte dtype must say its byte order: numpy reads these in the receiver's, whatever the sender's was
    "dtype without byte order": message([["x", "f4", [10]]], [F4x10]),
    "dtype in the receiver's byte order": message([["x", "=f4", [10]]], [F4x10]),
    "dtype with byte order not applicable": message([["x", "|f4", [10]]], [F4x10]),
    # numpy reads such a byte as True, a Paddle model as the number (2.0, 255.0 cast to float32)
    "bool byte other than 0 and 1": message([["x", "|b1", [3]]], [b"\x00\x01\x02"]),
    "bool byte 255 in ragged values": message([["x", "|b1", [2], 1]], [b"\x01\xff", np.array([2], "<i8").tobytes()]),
    "negative dim": message([["x", "<f4", [-10]]], [F4x10]),
    "negative dims cancelling": message([["x", "<f4", [-2, -5]]], [F4x10]),
    "float dim": message([["x", "<f4", [10.0]]], [F4x10]),
    "string dim": message([["x", "<f4", ["10"]]], [F4x10]),
    "bool dim": message([["x", "|u1", [True]]], [b"\x00"]),
    "none dim": message([["x", "<f4", [None]]], [F4x10]),
    "shape not a list": message([["x", "<f4", 10]], [F4x10]),
    "too many dims": message([["x", "|u1", [1] * 17]], [b"\x00"]),
    "truncated frame": message([["x", "<f4", [10]]], [F4x10[:-1]]),
    "frame longer than declared": message([["x", "<f4", [10]]], [F4x10 + b"\x00" * 4]),
    "frame for empty array not empty": message([["x", "<f4", [0, 3]]], [b"\x00" * 4]),
    "duplicate names": message([["x", "<f4", [10]], ["x", "<f4", [10]]], [F4x10, F4x10]),
}


@pytest.mark.parametrize("frames", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_messages_raise_wire_error(frames: list[bytes]) -> None:
    with pytest.raises(WireError) as info:
        wire.decode(frames)
    assert str(info.value), "a WireError must say what was wrong"


@pytest.mark.parametrize("dtype", ["|b1", "b1", "=b1", "|u1", "i1", "=i1", "<u1", ">i1"])
def test_a_one_byte_dtype_needs_no_byte_order(dtype: str) -> None:
    """Byte order means nothing for one byte: any prefix numpy takes is read the same everywhere."""
    got = wire.decode(message([["x", dtype, [3]]], [b"\x00\x01\x00"])).arrays["x"]
    assert got.dtype.itemsize == 1 and got.astype(np.int64).tolist() == [0, 1, 0]


def test_a_multi_byte_dtype_without_byte_order_is_refused_naming_it() -> None:
    """A big-endian sender's float32 labelled ``f4`` would read as other numbers here: it is refused."""
    big = np.arange(10, dtype=">f4").tobytes()
    for dtype in ("f4", "=f4", "|f4", "i8", "=c16"):
        with pytest.raises(WireError, match="byte order"):
            wire.decode(message([["x", dtype, [10]]], [big[: 10 * np.dtype(dtype).itemsize]]))
    assert wire.decode(message([["x", ">f4", [10]]], [big])).arrays["x"].tolist() == list(range(10))


def test_a_bool_array_travels_as_bytes_0_and_1_whatever_the_sender_holds() -> None:
    """A reader's mask made by ``.view(bool)`` of uint8 0/255 is True where numpy reads it, and
    must reach a model as 1: it is sent as 0 and 1 (a receiver refuses any other byte)."""
    held = np.array([[0, 255], [2, 1]], np.uint8).view(bool)
    frames = wire.encode({}, {"mask": held, "rows": Ragged(held.ravel(), np.array([1, 3]))})
    assert [bytes(f) for f in frames[1:3]] == [b"\x00\x01\x01\x01", b"\x00\x01\x01\x01"]
    got = wire.decode(frames).arrays
    assert got["mask"].view(np.uint8).tolist() == [[0, 1], [1, 1]] and got["rows"].values.tolist() == [0, 1, 1, 1]
    assert held.view(np.uint8).tolist() == [[0, 255], [2, 1]]  # the sender's array as it was


def test_malformed_message_over_a_real_socket(pair) -> None:
    """The same refusal for frames received zero-copy from libzmq (zmq.Frame, not bytes)."""
    push, pull = pair
    push.send_multipart(MALFORMED["truncated frame"])
    with pytest.raises(WireError, match="needs 40 bytes"):
        wire.decode(pull.recv_multipart(copy=False))


def test_limits_are_configurable() -> None:
    """A tighter Limits (what a daemon may set) refuses what the defaults accept."""
    small = wire.Limits(max_header_bytes=64, max_arrays=1, max_array_bytes=16)
    ok = wire.encode({}, {"x": np.zeros(4, "<f4")})
    assert wire.decode(ok, small).arrays["x"].shape == (4,)
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.decode(wire.encode({}, {"x": np.zeros(5, "<f4")}), small)
    with pytest.raises(WireError, match="frames exceed"):
        wire.decode(wire.encode({}, {"x": np.zeros(1), "y": np.zeros(1)}), small)
    with pytest.raises(WireError, match="header of"):
        wire.decode(wire.encode({"pad": "x" * 80}), small)


def refused_with_peak(frames: list[bytes], match: str) -> int:
    """Decode ``frames``, which must be refused with ``match``; the most bytes Python held meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(WireError, match=match):
            wire.decode(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_a_huge_declared_shape_allocates_nothing() -> None:
    """The size check runs before numpy sees the shape: refusing 2**80 bytes must be instant and tiny."""
    frames = message([["x", "<f8", [2**20, 2**20, 2**20, 2**20]]], [b""])
    assert refused_with_peak(frames, "exceeds the limit") < 1 << 20


@settings(max_examples=300, deadline=None)
@given(head=st.binary(max_size=200), rest=st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes_raise_only_wire_error(head: bytes, rest: list[bytes]) -> None:
    """Fuzz: whatever a peer sends, decode either succeeds or raises WireError, nothing else."""
    try:
        wire.decode([head, *rest])
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(
        st.lists(
            st.one_of(st.text(max_size=4), st.sampled_from(["<f4", "|b1", "<c16", "|O", "<U2", "<M8"]),
                      st.lists(st.integers(-3, 2**64 - 1), max_size=5), st.integers(-(2**63), 2**64 - 1), st.none()),
            min_size=0, max_size=4),
        max_size=3),
    frames=st.lists(st.binary(max_size=64), max_size=4),
)
def test_random_array_tables_raise_only_wire_error(table: list, frames: list[bytes]) -> None:
    """Fuzz the array table with well-formed msgpack but arbitrary entries."""
    try:
        msg = wire.decode([msgpack.packb({wire.ARRAYS_KEY: table}), *frames])
    except WireError:
        return
    for arr in msg.arrays.values():  # whatever got through is a real, consistent array
        assert arr.nbytes == arr.dtype.itemsize * arr.size


# -- no pickle, anywhere -------------------------------------------------------------------------


def test_no_pickle_in_the_package() -> None:
    """Peer bytes are data, never code: the package must not import pickle or its cousins."""
    pattern = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|marshal|shelve)\b", re.M)
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders
    assert "pickle.loads" not in "".join(p.read_text() for p in PACKAGE.rglob("*.py"))


# -- ragged arrays: rows of different lengths ------------------------------------------------------

RAGGED_ROWS = st.lists(st.integers(0, 7), min_size=0, max_size=6)


def same_ragged(a: Ragged, b: Ragged) -> bool:
    return same(a.values, b.values) and np.array_equal(a.lengths, b.lengths) and a.lengths.dtype == np.int64


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=RAGGED_ROWS, dtype=DTYPES, inner=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
       dense=hnp.arrays(DTYPES, SHAPES))
def test_ragged_round_trip_beside_dense_arrays(pair, lengths: list[int], dtype: np.dtype,
                                               inner: tuple[int, ...], dense: np.ndarray) -> None:
    values = np.arange(sum(lengths) * int(np.prod(inner)), dtype=np.int64).astype(dtype).reshape(-1, *inner)
    ragged = Ragged.checked(values, np.array(lengths, dtype=np.int64), "ids")
    arrays = {"before": dense, "ids": ragged, "after": dense}
    for msg in (wire.decode(wire.encode({"k": 1}, arrays)), send_recv(pair, {"k": 1}, arrays)[1]):
        assert list(msg.arrays) == ["before", "ids", "after"]
        assert isinstance(msg.arrays["ids"], Ragged)
        assert same_ragged(msg.arrays["ids"], ragged)
        assert same(msg.arrays["before"], dense) and same(msg.arrays["after"], dense)


def test_ragged_lengths_travel_little_endian_and_as_int64_whatever_the_sender_holds() -> None:
    ragged = Ragged(np.arange(5, dtype="<f4"), np.array([2, 0, 3], dtype=">i4"))
    table, frames = wire.pack_arrays({"x": ragged})
    assert table == [["x", "<f4", [5], 3]]
    assert frames[1].dtype == np.dtype("<i8") and frames[1].tobytes() == np.array([2, 0, 3], "<i8").tobytes()
    got = wire.decode(wire.encode({}, {"x": ragged})).arrays["x"]
    assert got.lengths.tolist() == [2, 0, 3] and got.lengths.dtype == np.int64
    assert [r.tolist() for r in got.rows()] == [[0, 1], [], [2, 3, 4]]


def test_decoded_ragged_is_read_only_views_of_the_received_frames(pair) -> None:
    ragged = Ragged.from_rows([np.arange(n * 4, dtype=np.float32).reshape(n, 4) for n in (3000, 1, 5000)])
    frames, msg = send_recv(pair, {}, {"tokens": ragged})
    got = msg.arrays["tokens"]
    assert reaches(got.values, frames[1]) and reaches(got.lengths, frames[2])
    assert not got.values.flags.writeable and not got.lengths.flags.writeable
    assert same_ragged(got, ragged)
    for row, want in zip(got.rows(), ragged.rows(), strict=True):
        assert np.shares_memory(row, got.values) and same(row, want)


def test_encode_refuses_ragged_values_the_wire_cannot_carry() -> None:
    with pytest.raises(WireError, match="not allowed"):
        wire.encode({}, {"x": Ragged(np.array(["a", "b"]), np.array([1, 1]))})
    with pytest.raises(WireError, match="length axis"):
        wire.encode({}, {"x": Ragged(np.array(2.0), np.array([0]))})


I8x3 = np.array([2, 0, 3], "<i8").tobytes()

MALFORMED_RAGGED = {
    "a row claiming 10**9 tokens": (
        message([["ids", "<i8", [5], 3]], [F4x10, np.array([10**9, 0, 3], "<i8").tobytes()]), "do not fit"),
    "a negative length": (message([["ids", "<f4", [10], 3]], [F4x10, np.array([12, -5, 3], "<i8").tobytes()]),
                          "do not fit"),
    "lengths not adding up": (message([["ids", "<f4", [10], 3]], [F4x10, I8x3]), "add up to 5"),
    "lengths overflowing int64 to the right sum": (
        message([["ids", "<f4", [10], 3]], [F4x10, np.array([2**62, 2**62, 10], "<i8").tobytes()]), "do not fit"),
    "missing lengths frame": (message([["ids", "<f4", [10], 3]], [F4x10]), "2 frames but 1"),
    "lengths frame too short": (message([["ids", "<f4", [10], 3]], [F4x10, I8x3[:-1]]), "lengths frame of 24"),
    "lengths frame too long": (message([["ids", "<f4", [10], 2]], [F4x10, I8x3]), "lengths frame of 16"),
    "rows beyond any frame": (message([["ids", "<f4", [10], 2**40]], [F4x10, b""]), "at most"),
    "negative rows": (message([["ids", "<f4", [10], -1]], [F4x10, b""]), "not a count"),
    "rows not an int": (message([["ids", "<f4", [10], "3"]], [F4x10, I8x3]), "not a count"),
    "rows a bool": (message([["ids", "<f4", [10], True]], [F4x10, b"\0" * 8]), "not a count"),
    "values without a length axis": (message([["ids", "<f4", [], 0]], [F4x10[:4], b""]), "no length axis"),
    "values shape lying": (message([["ids", "<f4", [11], 3]], [F4x10, I8x3]), "needs 44 bytes"),
    "values beyond the limit": (message([["ids", "<f8", [2**40], 1]], [b"", np.array([2**40], "<i8").tobytes()]),
                                "exceeds the limit"),
    "ragged dtype object": (message([["ids", "|O", [1], 1]], [b"\0" * 8, b"\1" + b"\0" * 7]), "not allowed"),
    "ragged name twice": (message([["x", "<f4", [10], 1], ["x", "<f4", [10]]],
                                  [F4x10, np.array([10], "<i8").tobytes(), F4x10]), "twice"),
    "two frames per ragged entry beyond max_arrays": (
        message([[f"r{i}", "<f4", [0], 0] for i in range(33)], [b""] * 66), "frames exceed"),
}


@pytest.mark.parametrize("frames,match", list(MALFORMED_RAGGED.values()), ids=list(MALFORMED_RAGGED))
def test_malformed_ragged_entries_raise_wire_error_naming_the_array(frames: list[bytes], match: str) -> None:
    with pytest.raises(WireError, match=match) as info:
        wire.decode(frames)
    if "frames" not in match and "twice" not in match:
        assert "'ids'" in str(info.value), "the error must name the array"


def test_a_row_claiming_a_billion_tokens_allocates_nothing() -> None:
    frames = message([["ids", "<i8", [2**27], 1]], [b"", np.array([10**9], "<i8").tobytes()])
    assert refused_with_peak(frames, "needs") < 1 << 20


def test_ragged_limits_count_values_and_rows() -> None:
    small = wire.Limits(max_arrays=2, max_array_bytes=16)
    ok = Ragged(np.zeros(4, "<f4"), np.array([1, 3]))
    assert wire.decode(wire.encode({}, {"x": ok}), small).arrays["x"].lengths.tolist() == [1, 3]
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.decode(wire.encode({}, {"x": Ragged(np.zeros(5, "<f4"), np.array([5]))}), small)
    with pytest.raises(WireError, match="at most 2"):
        wire.decode(wire.encode({}, {"x": Ragged(np.zeros(0, "<f4"), np.zeros(3, np.int64))}), small)
    with pytest.raises(WireError, match="frames exceed"):
        wire.decode(wire.encode({}, {"x": ok, "y": np.zeros(1, "<f4")}), small)


def test_hostile_mutations_of_ragged_messages_raise_only_wire_error() -> None:
    """The fuzzer's mutations of messages holding ragged entries: decoded, or refused by WireError."""
    from tests import fuzzing

    ragged = Ragged.from_rows([np.arange(n, dtype=np.int64) for n in (3, 0, 7)])
    valid = [fuzzing.frames_of({"kind": "predict", "id": 1}, {"ids": ragged}),
             fuzzing.frames_of({"kind": "predict", "id": 2}, {"ids": ragged, "mask": np.ones((3, 2), "<f4")})]
    decoded = 0
    for frames in fuzzing.hostile_messages(seed=21, count=3000, valid_examples=valid):
        try:
            msg = wire.decode(frames)
        except WireError:
            continue
        decoded += 1
        for value in msg.arrays.values():  # whatever got through is consistent
            if isinstance(value, Ragged):
                assert int(value.lengths.sum()) == len(value.values) and (value.lengths >= 0).all()
    assert decoded < 3000
