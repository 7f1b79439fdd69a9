"""Every message of the student's data plane, typed, in one place.

Three kinds of process talk on the student's machine (see ``docs/dataplane.md``):
the *producer* (the user's reader, forked for each epoch), the *dispatcher* (a
thread of the student that owns every piece of shared state) and the *workers*
(one process per teacher).  They exchange seven kinds of message, all in the
:mod:`zdistill.wire` format (a msgpack header, raw array frames):

============  =======================  ==============================================
kind          from -> to               says
============  =======================  ==============================================
``grant``     dispatcher -> producer   these shared-memory slots are yours to fill
``task``      producer -> dispatcher,  a task is built in a slot (forwarded as is to
              dispatcher -> worker     one worker; sent again to another if needed)
``end``       producer -> dispatcher   the reader is exhausted after N tasks, or raised
``hello``     worker -> dispatcher     the worker runs (its first word)
``status``    worker -> dispatcher     its teacher is up / down / unusable, and why
``done``      worker -> dispatcher     a task's predictions (as arrays)
``undone``    worker -> dispatcher     a task not answered: handed back, or refused
============  =======================  ==============================================

Credit is implicit: the dispatcher counts what each worker holds (tasks sent, not yet
answered) and what slots the producer may fill, so no message carries credit and
nothing is re-negotiated at an epoch's start.  Each class checks the types of what a
peer sent (:func:`parse`), so a malformed message is a :class:`WireError`, never a
``KeyError`` deep in the dispatcher.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import zmq

from zdistill import wire
from zdistill.errors import WireError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grant:
    """Slots the producer may build its next tasks in (credit, in slots)."""

    kind: ClassVar[str] = "grant"
    slots: list[int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """A task built in shared memory: where its slot arrays are, and the reader's batch sizes."""

    kind: ClassVar[str] = "task"
    epoch: int
    task: int
    slot: int  # the shared-memory slot it is built in
    rows: int
    nbytes: int  # bytes of its slot arrays
    sizes: list[int] | None  # the reader's batch sizes; None: a sample reader
    shm: dict[str, Any]  # the slot descriptor (zdistill.student.shm)
    hits: int | None = None  # rows answered from the teacher-output cache (None: no cache)


@dataclasses.dataclass(frozen=True, kw_only=True)
class End:
    """The producer is done: ``tasks`` tasks made, or the reader raised ``error``."""

    kind: ClassVar[str] = "end"
    epoch: int
    tasks: int
    error: dict[str, str] | None = None  # type, module, message, traceback of the reader's exception


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hello:
    """A worker's first word: it runs (a later exit is a crash, not a failed start)."""

    kind: ClassVar[str] = "hello"
    pid: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Status:
    """What a worker knows of its teacher, sent on every change."""

    kind: ClassVar[str] = "status"
    up: bool
    reason: str = ""  # why it is down
    unusable: str = ""  # why its teacher cannot take this reader's tasks (waiting will not help)
    max_batch_size: int = 0
    instances: int = 1
    cache: str = ""  # why its answers cannot go to the reader's cache ("" when they can, or no cache)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Done:
    """A task answered; its predictions travel as the message's arrays."""

    kind: ClassVar[str] = "done"
    epoch: int
    task: int
    elapsed: float  # since the worker got it
    service: float  # the teacher's time for it, not counting its wait behind the worker's other tasks
    cached: int = 0  # rows of the predictions taken from the teacher-output cache, not from the teacher


@dataclasses.dataclass(frozen=True, kw_only=True)
class Undone:
    """A task not answered.  ``code`` ``returned``: the worker could not run it (teacher down,
    unusable, or the worker retiring), so it goes elsewhere without counting as a failure;
    any other code is the teacher's refusal (``TeacherError.code``)."""

    kind: ClassVar[str] = "undone"
    epoch: int
    task: int
    code: str
    message: str = ""


Msg = Grant | Task | End | Hello | Status | Done | Undone
KINDS: dict[str, type[Msg]] = {cls.kind: cls for cls in typing.get_args(Msg)}
RETURNED = "returned"


def header(msg: Msg) -> dict[str, Any]:
    """The wire header of ``msg`` (its fields and its kind)."""
    return {"kind": msg.kind, **{f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}}


def send(
    sock: zmq.Socket, msg: Msg, arrays: Mapping[str, np.ndarray] | None = None,
    envelope: Sequence[bytes] = (), flags: int = 0,
) -> None:
    wire.send(sock, header(msg), arrays, envelope=envelope, flags=flags)


def parse(message: wire.Message) -> Msg:
    """The typed message of a decoded wire message; WireError if any field is missing or mistyped."""
    cls = KINDS.get(message.kind)
    if cls is None:
        raise WireError(f"unknown data-plane message kind {message.kind!r:.40}")
    values = {}
    for name, check in _checks(cls):
        if name not in message.header:
            continue  # a field with a default; a required one is caught by the constructor
        value = message.header[name]
        if not check(value):
            raise WireError(f"{cls.kind} message: field {name!r} has a bad value {value!r:.80}")
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise WireError(f"{cls.kind} message: {exc}") from None


def decode(frames: Sequence[zmq.Frame | bytes]) -> tuple[Msg, dict[str, np.ndarray]]:
    """Frames (envelope removed) to a typed message and its arrays."""
    message = wire.decode(frames)
    return parse(message), message.arrays


_CHECKERS: dict[str, typing.Callable[[Any], bool]] = {
    "int": lambda v: type(v) is int,
    "int | None": lambda v: v is None or type(v) is int,
    "float": lambda v: type(v) in (int, float),
    "str": lambda v: type(v) is str,
    "bool": lambda v: type(v) is bool,
    "list[int]": lambda v: type(v) is list and all(type(x) is int for x in v),
    "list[int] | None": lambda v: v is None or (type(v) is list and all(type(x) is int for x in v)),
    "dict[str, Any]": lambda v: type(v) is dict,
    "dict[str, str] | None": lambda v: v is None or (type(v) is dict and all(type(x) is str for x in v.values())),
}
_CHECKS: dict[type, list[tuple[str, typing.Callable[[Any], bool]]]] = {}


def _checks(cls: type) -> list[tuple[str, typing.Callable[[Any], bool]]]:
    """Per field of ``cls``: a type check, from its annotation (made once per class)."""
    checks = _CHECKS.get(cls)
    if checks is None:
        checks = _CHECKS[cls] = [(f.name, _CHECKERS[str(f.type)]) for f in dataclasses.fields(cls)]
    return checks
