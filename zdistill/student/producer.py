"""The producer: runs the user's reader in a process of its own and builds tasks.

It is forked from the student for each epoch (the reader is often a closure, which
only a fork can carry), cuts the reader's output into tasks
(:class:`~zdistill.student.batches.TaskBuilder`) built directly in shared-memory slots
(:mod:`zdistill.student.shm`) and sends each task's small descriptor to the dispatcher.
It holds no table of tasks and makes no decision, so it may exit as soon as the reader
is exhausted (resends are made from shared memory by the dispatcher).  Its only credit
is the slots the dispatcher granted it: with none left it waits for a ``grant``, which
bounds how far the reader runs ahead of the training loop.  Its last message, ``end``,
carries the reader's exception, if it raised, re-created in the training loop by
:func:`rebuild_exception`: by name, never by pickle.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import signal
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import zmq

from zdistill.errors import ReaderError
from zdistill.spec import TensorSpec
from zdistill.student import protocol
from zdistill.student.batches import (
    BuiltTask,
    CacheSlots,
    ReaderType,
    TaskBuilder,
    empty_rows,
    place,
    row_shape,
    select,
    slot_tensors,
)
from zdistill.student.cache import CacheGate, CacheIndex, key_seed, row_keys
from zdistill.student.protocol import POLL_MS, ParentGone, send_while_parent_lives
from zdistill.student.shm import SlotWriter, Specs

log = logging.getLogger(__name__)

AUDIT_EVERY = 64  # of the tasks with cached rows, the first of an epoch and then one in this many has one audited
_END_LINGER_MS = 10_000  # how long the end may wait to be delivered when the producer exits


@dataclass(kw_only=True)
class ProducerConfig:
    """Everything the producer needs, passed across the fork."""

    reader: Callable[[], Iterable[Any]]
    reader_type: ReaderType
    ins: list[str]
    feeds: list[TensorSpec]
    epoch: int
    task_rows: int
    task_bytes: int
    endpoint: str  # the dispatcher's socket for this epoch
    slots_folder: str
    slot_count: int
    grants: list[int]  # slots it may fill at once
    parent_pid: int
    cache: CacheIndex | None  # the teacher-output cache, refreshed just before the fork
    cache_feeds: list[str]  # the slots a row's cache key covers
    cache_gate: CacheGate  # closed: the cache is no longer trusted, look nothing up


class Producer:
    """Owns the reader's iteration, the slot writer and the socket to the dispatcher."""

    def __init__(self, cfg: ProducerConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.connect(cfg.endpoint)
        self.slots = SlotWriter(cfg.slots_folder, cfg.slot_count)
        self.granted: deque[int] = deque(cfg.grants)
        self.slot_of: dict[int, int] = {}  # task id -> the slot it was built in
        self.since_audit = AUDIT_EVERY  # tasks with cached rows since the last one audited
        self.rng = np.random.default_rng()  # which cached row is audited

    def run(self) -> None:
        cfg = self.cfg
        builder = TaskBuilder(cfg.reader_type, cfg.ins, cfg.feeds, cfg.task_rows, cfg.task_bytes, self._allocate)
        error = None
        try:
            for item in cfg.reader():
                for task in builder.add(item):
                    self._send(task)
            for task in builder.flush():
                self._send(task)
        except ParentGone:
            raise
        except BaseException as exc:  # the user's reader: anything it raises goes to the training loop
            error = protocol.RaisedError(type=type(exc).__name__, module=type(exc).__module__, message=str(exc),
                                         traceback="".join(traceback.format_exception(exc)))
        self._tell(protocol.End(epoch=cfg.epoch, tasks=builder.tasks_made, error=error))

    def _allocate(self, task_id: int, rows: int, specs: Specs) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Room for a task's arrays in a granted slot, waiting for a grant if none is left; a task
        laid out again (its samples turned out to need another dtype) keeps its slot."""
        slot = self.slot_of.get(task_id)
        if slot is None:
            while not self.granted:
                if os.getppid() != self.cfg.parent_pid:
                    raise ParentGone
                if self.sock.poll(POLL_MS):
                    msg, _ = protocol.decode(self.sock.recv_multipart())
                    if isinstance(msg, protocol.Grant):
                        self.granted.extend(s for s in msg.slots if 0 <= s < self.cfg.slot_count)
            slot = self.slot_of[task_id] = self.granted.popleft()
        cache = self.cfg.cache
        if cache is None:  # stamped all the same: a worker may still hold a cached task of an earlier epoch here
            arrays, descriptor = self.slots.allocate(slot, CacheSlots.stamped(specs))
        else:
            tokens = CacheSlots.tokens(specs, self.cfg.cache_feeds)
            arrays, descriptor = self.slots.allocate(slot, CacheSlots.layout(specs, rows, cache.fetches, tokens))
        # first: a worker still on the slot's last task sees that it changed
        CacheSlots.stamp_of(arrays)[:] = (self.cfg.epoch, task_id)
        return arrays, descriptor

    def _look_up(self, task: BuiltTask) -> int:
        """Answer the task's rows the cache has, in its slot; the number answered.

        In the epoch's first task with cached rows, and then in one of every :data:`AUDIT_EVERY`,
        one cached row (at random) is audited: asked of the teacher anyway, its cached answer kept
        beside it for the worker to compare (a teacher that answers otherwise turns the cache off).
        Tasks are yielded in order, so no cached row reaches the loop before the first audit is done.
        """
        cache = self.cfg.cache
        assert cache is not None
        tensors = slot_tensors(task.slots, self.cfg.cache_feeds)
        seed = key_seed({name: (a.dtype.str, row_shape(a)) for name, a in tensors.items()})
        mine = CacheSlots.of(task.slots)
        mine.set_lengths(tensors)
        mine.keys[:] = row_keys(list(tensors.values()), seed)
        found = cache.lookup(mine.keys)
        hit, audit = mine.hits, mine.audit
        hit[:] = audit[:] = False
        rows = np.flatnonzero(found >= 0)
        if not len(rows):
            return 0
        answers = {name: empty_rows(arr, rows) for name, arr in mine.answers.items()}
        served = cache.gather(found[rows], answers)  # a row its segment no longer holds is a miss
        rows, kept = rows[served], np.flatnonzero(served)
        if not len(rows):
            return 0
        for name, arr in answers.items():
            place(mine.answers[name], rows, select(arr, kept))
        hit[rows] = True
        self.since_audit += 1
        if self.since_audit >= AUDIT_EVERY:
            self.since_audit = 0
            picked = rows[self.rng.integers(len(rows))]
            audit[picked], hit[picked] = True, False
            return len(rows) - 1
        return len(rows)

    def _send(self, task: BuiltTask) -> None:
        usable = self.cfg.cache is not None and task.rows and not self.cfg.cache_gate.closed
        hits = self._look_up(task) if usable else None
        self._tell(protocol.Task(
            epoch=self.cfg.epoch, task_id=task.task_id, slot=self.slot_of.pop(task.task_id), rows=task.rows,
            nbytes=task.nbytes, sizes=task.sizes, shm=task.descriptor, hits=hits,
        ))

    def _tell(self, msg: protocol.Msg) -> None:
        send_while_parent_lives(self.sock, msg, self.cfg.parent_pid)


def run_producer(cfg: ProducerConfig) -> NoReturn:
    """Entry point of the forked producer; never returns to the caller's code."""
    code = 0
    try:
        with contextlib.suppress(OSError):  # dies with the student, even of kill -9 (not Linux: getppid())
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the training loop, which stops us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        producer = Producer(cfg)
        try:
            producer.run()
        finally:
            producer.ctx.destroy(linger=_END_LINGER_MS)  # until the end is delivered (or the dispatcher is gone)
    except ParentGone:
        pass
    except BaseException:  # nothing may escape into the forked copy of the student's stack
        log.exception("reader process failed")
        code = 1
    os._exit(code)


def rebuild_exception(error: protocol.RaisedError) -> BaseException:
    """The reader's exception, re-created by type name (no pickle), else a ReaderError."""
    exc: BaseException
    try:
        cls = getattr(importlib.import_module(error.module), error.type)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise TypeError(error.type)
        exc = cls(error.message)
    except Exception:
        exc = ReaderError(f"{error.module}.{error.type}: {error.message}")
    exc.add_note(f"raised in the DistillReader's reader process:\n{error.traceback}")
    return exc
