"""The one wire format every zdistill socket speaks.

A message is a list of ZeroMQ frames: one msgpack *header* frame, then one raw frame
per numpy array.  The header is a map of plain values; its reserved key ``arrays``
lists ``[name, dtype, shape]`` for each array, in frame order.  A
:class:`~zdistill.spec.Ragged` (rows of different lengths) is listed as
``[name, dtype, values_shape, rows]`` and takes two frames: its values' raw bytes,
then its lengths as little-endian int64 (``rows * 8`` bytes).  Arrays travel as
their raw bytes (zero-copy above :data:`ZERO_COPY_THRESHOLD`, where pyzmq says it
starts to pay off) and come back as read-only ``np.frombuffer`` views of the
received frame, so a decoded array costs no copy.

Peer bytes are data, never code: there is no pickle here, dtypes are limited to
bool and numbers (those of more than a byte with their byte order), and every size
a header declares is checked against the frame that carries it and against
:class:`Limits` before anything is allocated.  Every way a message can be wrong
raises :class:`~zdistill.errors.WireError`.

Each protocol types its headers as :class:`Header` structs (the teacher's in
:mod:`zdistill.teacher_messages`, the balancer's in :mod:`zdistill.discovery.messages`),
which a receiver reads with :func:`read_header`: one checker, by msgspec, for every
field of every message, so a field of the wrong type is refused where it arrives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import msgspec
import numpy as np
import zmq

from zdistill.errors import ErrorCode, RequestError, WireError
from zdistill.spec import Ragged, Tensor

ZERO_COPY_THRESHOLD = 64 * 1024
ARRAYS_KEY = "arrays"
# bool and the fixed-size numbers every platform agrees on (no longdouble: its size
# and meaning differ between machines, so it cannot be a wire type); one of more than a
# byte says its byte order, '<' or '>': numpy reads 'f4', '=f4' and '|f4' in the
# receiver's order, so a big-endian sender's numbers would arrive as others
_DTYPE_RE = re.compile(r"^([<>|=]?(b1|[iu]1)|[<>]([iu][248]|f[248]|c(8|16)))$")
_ALLOWED_KINDS = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}
_MAX_NDIM = 16
_MAX_NAME = 256
_LENGTHS = np.dtype("<i8")  # a ragged entry's lengths frame, whatever the sender's byte order
_SNDMORE = int(zmq.SNDMORE)  # plain ints: flag arithmetic on enums costs a Python call per frame
# Dtypes already checked, by object and by wire string: every message checks its arrays,
# and there are only a few dozen valid dtypes, so these stay small.
_CHECKED: set[np.dtype] = set()
_PARSED: dict[str, np.dtype] = {}


def _refuse_ext(code: int, data: memoryview) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed in a header")


# msgspec rather than msgpack.unpackb: the same msgpack, read in a third of the time.
# Every length in a header is checked against the bytes that follow it, and the header
# is at most max_header_bytes, so nothing a header declares can allocate more than that.
_HEADER = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_refuse_ext)
# msgspec reads the timestamp extension (type -1) as a datetime instead of asking
# _refuse_ext; a header holding its marker bytes (or the same bytes inside a string) is
# read by msgpack, which refuses every extension.
_TIMESTAMP = re.compile(rb"\xd6\xff|\xd7\xff|\xc7\x0c\xff")


@dataclass(frozen=True)
class Limits:
    """Hard bounds on what a peer may send; anything beyond them is refused."""

    max_header_bytes: int = 64 * 1024
    max_arrays: int = 64
    max_array_bytes: int = 1 << 30


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message: the header map (without ``arrays``) and the named arrays."""

    header: dict[str, Any]
    arrays: dict[str, Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        kind = self.header.get("kind")
        return kind if isinstance(kind, str) else ""


def _frame_bytes(frame: zmq.Frame | bytes | memoryview) -> memoryview:
    view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    if view.ndim != 1 or view.itemsize != 1:  # len() must count bytes, not items or rows
        if view.nbytes == 0:
            return memoryview(b"")
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise WireError(f"frame buffer cannot be read as bytes: {exc}") from None
    return view


def check_dtype(dtype: np.dtype) -> np.dtype:
    """Return ``dtype`` if it may cross the wire (bool or a fixed-size number), else raise."""
    if dtype in _CHECKED:
        return dtype
    if (
        f"{dtype.kind}{dtype.itemsize}" not in _ALLOWED_KINDS
        or dtype.fields is not None
        or dtype.subdtype is not None
    ):
        raise WireError(f"dtype {dtype} is not allowed on the wire (bool and numbers only)")
    _CHECKED.add(dtype)
    return dtype


def encode(
    header: Mapping[str, Any], arrays: Mapping[str, Tensor] | None = None
) -> list[bytes | np.ndarray]:
    """Turn a header and named arrays into frames: the packed header, then raw arrays."""
    if ARRAYS_KEY in header:
        raise WireError(f"header key {ARRAYS_KEY!r} is reserved for the array table")
    table, frames = pack_arrays(arrays)
    try:
        head = msgpack.packb({**header, ARRAYS_KEY: table}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"header cannot be encoded: {exc}") from exc
    return [head, *frames]


def pack_arrays(arrays: Mapping[str, Tensor] | None) -> tuple[list[list[Any]], list[np.ndarray]]:
    """The array table and the raw frames of ``arrays``, checked.

    A dense array is listed as ``[name, dtype, shape]`` with one frame; a :class:`Ragged`
    as ``[name, dtype, values_shape, rows]`` with two (values, then ``<i8`` lengths).
    For senders that pack the header themselves (a typed header puts the table under
    :data:`ARRAYS_KEY`); :func:`encode` is the plain-map sender.
    """
    table: list[list[Any]] = []
    frames: list[np.ndarray] = []
    for name, value in (arrays or {}).items():
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
            raise WireError(f"array name {name!r:.80} is not a non-empty string of at most {_MAX_NAME} characters")
        if isinstance(value, Ragged):
            values = _contiguous(name, value.values)
            if values.ndim < 1:
                raise WireError(f"ragged array {name!r}: values must have a length axis, got a 0-d array")
            table.append([name, values.dtype.str, list(values.shape), len(value.lengths)])
            frames += [values, np.ascontiguousarray(value.lengths, dtype=_LENGTHS)]
        else:
            arr = _contiguous(name, value)
            table.append([name, arr.dtype.str, list(arr.shape)])
            frames.append(arr)
    return table, frames


def _contiguous(name: str, value: Any) -> np.ndarray:
    """``value`` as a C-contiguous array of a dtype the wire carries (0-d arrays kept 0-d)."""
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # e.g. a ragged list
        raise WireError(f"array {name!r} is not an array: {exc}") from None
    check_dtype(arr.dtype)
    if not arr.flags.c_contiguous:  # np.ascontiguousarray would turn a 0-d array into shape (1,)
        arr = arr.copy(order="C")
    if arr.dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        # numpy reads any byte but 0 as True (a uint8 mask's .view(bool), say), a model may read the
        # byte itself (Paddle: 255.0): True travels as 1, and a receiver refuses any other byte
        arr = arr.view(np.uint8) != 0
    return arr


def send(
    sock: zmq.Socket,
    header: Mapping[str, Any],
    arrays: Mapping[str, Tensor] | None = None,
    envelope: Sequence[bytes | zmq.Frame] = (),
    flags: int = 0,
) -> None:
    """Send one message, after an optional routing ``envelope`` (ROUTER identities)."""
    send_frames(sock, [*envelope, *encode(header, arrays)], flags)


def send_frames(sock: zmq.Socket, frames: Sequence[bytes | zmq.Frame | np.ndarray], flags: int = 0) -> None:
    """Send encoded frames as one message.

    Frames above :data:`ZERO_COPY_THRESHOLD` go zero-copy; pyzmq keeps a reference
    to each array until libzmq has sent it, so callers may drop theirs at once.
    """
    last = len(frames) - 1
    flags = int(flags)
    for i, frame in enumerate(frames):
        size = frame.nbytes if isinstance(frame, np.ndarray) else len(frame)
        sock.send(frame, flags | _SNDMORE if i < last else flags, copy=size < ZERO_COPY_THRESHOLD)


def decode(frames: Sequence[zmq.Frame | bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Check and decode frames (envelope already removed) into a :class:`Message`."""
    return decode_arrays(decode_header(frames, limits), frames, limits)


def decode_header(frames: Sequence[zmq.Frame | bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The header map of ``frames``, its array table not yet checked: a server that must refuse
    the arrays can still answer the request's ``id``, so its client learns why."""
    return _unpack_header(header_frame(frames, limits))


def decode_arrays(header: dict[str, Any], frames: Sequence[zmq.Frame | bytes | memoryview],
                  limits: Limits = DEFAULT_LIMITS) -> Message:
    """The :class:`Message` of ``frames`` whose header :func:`decode_header` gave (its table taken out of it)."""
    table = header.pop(ARRAYS_KEY, None)
    if not isinstance(table, list):
        raise WireError(f"header has no {ARRAYS_KEY!r} list")
    return Message(header, unpack_arrays(table, frames[1:], limits))


def header_frame(frames: Sequence[zmq.Frame | bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> memoryview:
    """The header frame's bytes, once the frame count and the header size are within ``limits``."""
    if not frames:
        raise WireError("empty message")
    if len(frames) > limits.max_arrays + 1:
        raise WireError(f"{len(frames)} frames exceed the limit of {limits.max_arrays + 1}")
    head = _frame_bytes(frames[0])
    if len(head) > limits.max_header_bytes:
        raise WireError(f"header of {len(head)} bytes exceeds the limit of {limits.max_header_bytes}")
    return head


def unpack_arrays(
    table: Sequence[Any], frames: Sequence[zmq.Frame | bytes | memoryview], limits: Limits = DEFAULT_LIMITS
) -> dict[str, Tensor]:
    """The named arrays of the array frames (those after the header), as the header's ``table`` lists them.

    A ragged entry takes two frames, so the frames are counted against the table (and,
    by :func:`header_frame`, against ``limits.max_arrays``) before any is read.
    """
    need = sum(2 if isinstance(entry, list | tuple) and len(entry) == 4 else 1 for entry in table)
    if need != len(frames):
        raise WireError(f"header lists {len(table)} arrays in {need} frames but {len(frames)} array frames came")
    arrays: dict[str, Tensor] = {}
    i = 0
    for entry in table:
        if isinstance(entry, list | tuple) and len(entry) == 4:
            name, arr = _decode_ragged(entry, _frame_bytes(frames[i]), _frame_bytes(frames[i + 1]), limits)
            i += 2
        else:
            name, arr = _decode_array(entry, _frame_bytes(frames[i]), limits)
            i += 1
        if name in arrays:
            raise WireError(f"array {name!r} appears twice")
        arrays[name] = arr
    return arrays


def _unpack_header(head: memoryview) -> dict[str, Any]:
    try:
        if _TIMESTAMP.search(head) is None:
            return _HEADER.decode(head)
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, max_ext_len=0)
    except WireError:
        raise
    except Exception as exc:  # a bad header raises many types (DecodeError, ValueError, ...): all mean the same
        raise WireError(f"header is not a valid msgpack map: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(f"header is a {type(header).__name__}, not a map")
    return header


def _decode_ragged(entry: Sequence[Any], buf: memoryview, lengths_buf: memoryview,
                   limits: Limits) -> tuple[str, Ragged]:
    """A ragged entry ``[name, dtype, values_shape, rows]`` and its two frames, every size checked first."""
    name, dtype_str, shape, rows = entry
    what = f"ragged array {name!r:.80}"
    if type(rows) is not int or rows < 0 or rows * _LENGTHS.itemsize > limits.max_array_bytes:
        raise WireError(f"{what}: rows {rows!r:.40} is not a count of at most "
                        f"{limits.max_array_bytes // _LENGTHS.itemsize}")
    if len(lengths_buf) != rows * _LENGTHS.itemsize:
        raise WireError(f"{what}: {rows} rows need a lengths frame of {rows * _LENGTHS.itemsize} bytes, "
                        f"it has {len(lengths_buf)}")
    if not isinstance(shape, list | tuple) or not shape:
        raise WireError(f"{what}: values shape {shape!r:.80} has no length axis")
    name, values = _decode_array((name, dtype_str, shape), buf, limits)
    lengths = np.frombuffer(lengths_buf, dtype=_LENGTHS)
    held = values.shape[0]
    if rows and not 0 <= int(lengths.min()) <= int(lengths.max()) <= held:
        raise WireError(f"{what}: row lengths from {int(lengths.min())} to {int(lengths.max())} do not fit "
                        f"values of {held} entries (each must be 0..{held})")
    # exact even where rows * held passes int64 (possible only under very large Limits)
    total = int(lengths.sum()) if rows * held < 2**63 else sum(int(n) for n in lengths)
    if total != held:
        raise WireError(f"{what}: lengths add up to {total} but values hold {held}")
    lengths.flags.writeable = False
    return name, Ragged(values, lengths.astype(np.int64, copy=False))


def _decode_array(entry: Any, buf: memoryview, limits: Limits) -> tuple[str, np.ndarray]:
    if not (isinstance(entry, list | tuple) and len(entry) == 3):
        raise WireError(f"array entry {entry!r:.80} is not [name, dtype, shape] or [name, dtype, values_shape, rows]")
    name, dtype_str, shape = entry
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise WireError(f"array name {name!r:.80} is not a non-empty string of at most {_MAX_NAME} characters")
    dtype = _PARSED.get(dtype_str) if isinstance(dtype_str, str) else None
    if dtype is None:
        if not isinstance(dtype_str, str) or not _DTYPE_RE.match(dtype_str):
            raise WireError(f"array {name!r}: dtype {dtype_str!r:.40} is not allowed (bool and numbers only, "
                            "one of more than a byte with its byte order, '<' or '>')")
        try:
            dtype = _PARSED[dtype_str] = check_dtype(np.dtype(dtype_str))
        except (TypeError, ValueError):
            raise WireError(f"array {name!r}: unknown dtype {dtype_str!r}") from None
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > _MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise WireError(f"array {name!r}: shape {shape!r:.80} is not a list of at most {_MAX_NDIM} sizes")
    nbytes = extent = dtype.itemsize
    for d in shape:
        nbytes *= d
        extent *= max(d, 1)
    # ``extent`` ignores zero sizes: (0, 2**62) holds no bytes, but numpy cannot even shape it
    if max(nbytes, extent) > limits.max_array_bytes:
        raise WireError(
            f"array {name!r}: shape {shape!r:.80} of {dtype} exceeds the limit of {limits.max_array_bytes} bytes"
        )
    if nbytes != len(buf):
        raise WireError(f"array {name!r}: shape {shape} {dtype} needs {nbytes} bytes, frame has {len(buf)}")
    if dtype.kind == "b" and nbytes and (odd := int(np.frombuffer(buf, np.uint8).max())) > 1:
        raise WireError(f"array {name!r}: a bool holds the byte {odd}, not 0 or 1 (which a model may read as {odd})")
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    arr.flags.writeable = False  # pyzmq frames are writable, and an inproc frame may be the sender's array
    return name, arr


def limit_socket(sock: zmq.Socket, limits: Limits = DEFAULT_LIMITS) -> zmq.Socket:
    """Make libzmq itself drop peers that send a frame larger than any message may be."""
    sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_array_bytes, limits.max_header_bytes))
    return sock


RequestId = int | str | None  # a client's own id for a request, echoed in the reply; zdistill's clients send ints


class Header(msgspec.Struct, tag_field="kind", kw_only=True, frozen=True):
    """A typed header: its class's tag is the ``kind`` it travels as.

    Fields a receiver does not know are ignored, so either side can add one without
    breaking the other.
    """

    id: RequestId = None


class ErrorReply(Header, tag="error"):
    """A refused or failed request, in every protocol: ``code`` is an :class:`~zdistill.errors.ErrorCode` value.

    A plain ``str`` here, so that a code a newer server adds still reaches the caller.
    """

    code: str
    message: str


H = TypeVar("H", bound=Header)


def by_kind(*types: type[H]) -> dict[str, type[H]]:
    """The header types of one direction of a protocol, by the ``kind`` each travels as."""
    return {t.__struct_config__.tag: t for t in types}  # type: ignore[misc]


def read_header(header: dict[str, Any], types: Mapping[str, type[H]], what: str) -> H:
    """``header`` as the type its ``kind`` names in ``types``, or :class:`RequestError` ``bad_request``.

    The type is picked by ``kind`` here, not by msgspec from a union: converting to
    one struct costs a fifth of a microsecond, to a union thirty times that.
    """
    kind = header.get("kind")
    try:
        typ = types[kind]
    except (KeyError, TypeError):  # TypeError: a kind that is a list or a map
        raise RequestError(ErrorCode.BAD_REQUEST, f"unknown {what} kind {kind!r:.40}") from None
    try:
        return msgspec.convert(header, typ)
    except msgspec.ValidationError as exc:
        raise RequestError(ErrorCode.BAD_REQUEST, f"{kind} {what}: {exc}") from None
