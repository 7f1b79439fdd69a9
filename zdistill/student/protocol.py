"""Every message of the student's data plane, typed, in one place (who sends each kind, and
when: ``docs/dataplane.md``).

Each kind is a msgspec ``Struct`` tagged by its ``kind``, in the :mod:`zdistill.wire` format
(a msgpack header, raw array frames): the header frame is decoded straight into it, every
field type-checked, so a malformed message is a :class:`WireError`, never a ``KeyError`` deep
in the dispatcher; its array table (``arrays``) is checked by the wire.  Credit is implicit
(the dispatcher counts what each worker holds and which slots the producer may fill), so no
message carries credit and nothing is re-negotiated at an epoch's start.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import zmq

from zdistill import wire
from zdistill.errors import WireError
from zdistill.spec import Tensor


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", forbid_unknown_fields=True):
    """A data-plane message; its class is its ``kind`` on the wire."""

    # The wire's array table (zdistill.wire.ARRAYS_KEY), set by send, checked by decode; a row: name,
    # dtype, shape (values_shape and rows for a Ragged).
    table: list[list[str | int | list[int]]] = msgspec.field(default_factory=list, name=wire.ARRAYS_KEY)


class Grant(Message, frozen=True, kw_only=True, tag="grant"):
    """Slots the producer may build its next tasks in (credit, in slots)."""

    slots: list[int]


class Task(Message, frozen=True, kw_only=True, tag="task"):
    """A task built in shared memory: where its slot arrays are, and the reader's batch sizes."""

    epoch: int
    task_id: int
    slot: int  # the shared-memory slot it is built in
    rows: int
    nbytes: int  # bytes of its slot arrays
    sizes: list[int] | None  # the reader's batch sizes; None: a sample reader
    shm: dict[str, Any]  # the slot descriptor (zdistill.student.shm)
    hits: int | None = None  # rows answered from the teacher-output cache (None: no cache)


class RaisedError(msgspec.Struct, frozen=True, kw_only=True):
    """An exception of the user's reader, in plain strings (it is re-created by name, never unpickled)."""

    type: str
    module: str
    message: str
    traceback: str = ""


class End(Message, frozen=True, kw_only=True, tag="end"):
    """The producer is done: ``tasks`` tasks made, or the reader raised ``error``."""

    epoch: int
    tasks: int
    error: RaisedError | None = None  # what the reader raised, if it did


class Hello(Message, frozen=True, kw_only=True, tag="hello"):
    """A worker's first word: it runs (a later exit is a crash, not a failed start)."""

    pid: int


class Status(Message, frozen=True, kw_only=True, tag="status"):
    """What a worker knows of its teacher, sent on every change."""

    up: bool
    reason: str = ""  # why it is down
    unusable: str = ""  # why its teacher cannot take this reader's tasks (waiting will not help)
    max_batch_size: int = 0
    instances: int = 1
    cache: str = ""  # why its answers cannot go to the reader's cache ("" when they can, or no cache)


class Done(Message, frozen=True, kw_only=True, tag="done"):
    """A task answered; its predictions travel as the message's arrays."""

    epoch: int
    task_id: int
    elapsed: float  # since the worker got it
    service: float  # the teacher's time for it, not counting its wait behind the worker's other tasks
    cached: int = 0  # rows of the predictions taken from the teacher-output cache, not from the teacher


class Undone(Message, frozen=True, kw_only=True, tag="undone"):
    """A task not answered.  ``code`` ``returned``: the worker could not run it (teacher down,
    unusable, or the worker retiring), so it goes elsewhere without counting as a failure;
    any other code is the teacher's refusal (``TeacherError.code``)."""

    epoch: int
    task_id: int
    code: str
    message: str = ""


Msg = Grant | Task | End | Hello | Status | Done | Undone
RETURNED = "returned"

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Msg)


def encode(msg: Msg, arrays: Mapping[str, Tensor] | None = None) -> list[bytes | np.ndarray]:
    """The frames of ``msg`` and its ``arrays``: the typed header (with the array table), then raw arrays."""
    table, frames = wire.pack_arrays(arrays)
    if table:
        msg = msgspec.structs.replace(msg, table=table)
    return [_ENCODER.encode(msg), *frames]


def send(sock: zmq.Socket, msg: Msg, arrays: Mapping[str, Tensor] | None = None, envelope: Sequence[bytes] = (),
         flags: int = 0) -> None:
    """Send ``msg`` and its ``arrays`` as one message, after an optional routing ``envelope``."""
    wire.send_frames(sock, [*envelope, *encode(msg, arrays)], flags)


def decode(frames: Sequence[zmq.Frame | bytes]) -> tuple[Msg, dict[str, Tensor]]:
    """Frames (envelope removed) to a typed message and its arrays; WireError for anything malformed."""
    head = wire.header_frame(frames)
    try:
        msg = _DECODER.decode(head)
    except msgspec.DecodeError as exc:  # ValidationError included: a missing, extra or mistyped field
        raise WireError(f"data-plane message: {exc}") from None
    arrays = wire.unpack_arrays(msg.table, frames[1:]) if len(frames) > 1 or msg.table else {}
    return msg, arrays


# -- the child processes: the producer (forked) and the workers (spawned) both send to the
# dispatcher through a queue that may be full, and must leave at once when the student dies
# (nobody waits for them, and the producer holds the user's dataset).
POLL_MS = 100  # how often a blocked child looks whether the student still lives


class ParentGone(Exception):
    """The student process died: the child leaves at once."""


def send_while_parent_lives(sock: zmq.Socket, msg: Msg, parent_pid: int,
                            arrays: Mapping[str, Tensor] | None = None) -> None:
    """Send ``msg`` to the dispatcher, waiting for room in its queue only while the student
    (``parent_pid``) lives; :class:`ParentGone` once it is gone (its queue never drains)."""
    while True:
        try:
            send(sock, msg, arrays, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            if os.getppid() != parent_pid:
                raise ParentGone from None
            sock.poll(POLL_MS, zmq.POLLOUT)


def describe_exit(code: int) -> str:
    """An exit code in words (negative: the signal that killed it, as ``Popen.returncode`` and
    ``os.waitstatus_to_exitcode`` say): ``killed by signal 9 (SIGKILL)``, ``exited with code 1``."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal, or one this Python does not name
        name = "unknown"
    return f"killed by signal {-code} ({name})"
