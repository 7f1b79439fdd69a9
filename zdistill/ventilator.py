"""The ventilator: runs the user's reader in its own process and hands out tasks.

It is forked from the student for each epoch (the reader is often a closure, which
only a fork can carry).  It cuts the reader's output into tasks
(:class:`~zdistill.tasks.TaskBuilder`) and PUSHes them to the workers, keeping every
task it sent until the student says it was consumed: that table is what lets a task
whose worker or teacher died be sent again.  A credit window bounds the table, so
memory stays flat on an endless reader.

Control channel (a PAIR socket to the student, :mod:`zdistill.wire` messages):

- student -> ventilator: ``consumed {upto}`` frees tasks up to ``upto``;
  ``resend {tasks}`` sends those tasks again; ``resend_all {except}`` sends every held
  task not listed (after a worker died); ``stop``.
- ventilator -> student: ``end {tasks}`` once the reader is exhausted; ``error
  {type, module, message, traceback}`` if the reader raised.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from zdistill import wire
from zdistill.model import TensorSpec
from zdistill.tasks import ReaderType, Task, TaskBuilder, slot_key

log = logging.getLogger("zdistill.ventilator")

_POLL_MS = 100


@dataclass
class VentilatorConfig:
    """Everything the reader process needs, passed across the fork."""

    reader: Callable[[], Iterable[Any]]
    reader_type: ReaderType
    ins: list[str]
    feeds: list[TensorSpec]
    task_rows: int
    window: int
    epoch: int
    tasks_endpoint: str
    ctl_endpoint: str
    parent_pid: int


class ParentGone(Exception):
    """The student process died or asked us to stop: leave at once."""


class Ventilator:
    """Owns the held-task table and the two sockets of the reader process."""

    def __init__(self, cfg: VentilatorConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 2)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind(cfg.tasks_endpoint)
        self.ctl = self.ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 1000)
        self.ctl.connect(cfg.ctl_endpoint)
        self.held: OrderedDict[int, Task] = OrderedDict()
        self.resends: deque[int] = deque()
        self.total: int | None = None
        self.consumed_upto = -1

    def run(self) -> None:
        builder = TaskBuilder(self.cfg.reader_type, self.cfg.ins, self.cfg.feeds, self.cfg.task_rows)
        try:
            for item in self.cfg.reader():
                for task in builder.add(item):
                    self._hand_out(task)
            for task in builder.flush():
                self._hand_out(task)
        except ParentGone:
            return
        except BaseException as exc:  # the user's reader: anything it raises goes to the training loop
            self._report(exc)
            return
        self.total = builder.tasks_made
        wire.send(self.ctl, {"kind": "end", "tasks": self.total})
        try:
            while self.consumed_upto < self.total - 1:
                self._serve(_POLL_MS)
        except ParentGone:
            return

    def _report(self, exc: BaseException) -> None:
        wire.send(
            self.ctl,
            {
                "kind": "error",
                "type": type(exc).__name__,
                "module": type(exc).__module__,
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
            },
        )

    def _hand_out(self, task: Task) -> None:
        """Hold ``task`` and send it, once the credit window allows."""
        while len(self.held) >= self.cfg.window:
            self._serve(_POLL_MS)
        self.held[task.task_id] = task
        self.resends.append(task.task_id)
        while self.resends:
            self._serve(_POLL_MS)

    def _serve(self, wait_ms: int) -> None:
        """Handle control messages and send queued tasks while the workers take them."""
        if os.getppid() != self.cfg.parent_pid:
            raise ParentGone
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        if self.resends:
            poller.register(self.push, zmq.POLLOUT)
        events = dict(poller.poll(wait_ms))
        if self.ctl in events:
            while self.ctl.poll(0):
                self._on_control(wire.decode(self.ctl.recv_multipart(copy=False)))
        if self.push in events:
            while self.resends and self.push.poll(0, zmq.POLLOUT):
                task = self.held.get(self.resends.popleft())
                if task is not None:
                    self._send(task)

    def _send(self, task: Task) -> None:
        header = {"kind": "task", "epoch": self.cfg.epoch, "task": task.task_id, "sizes": task.sizes}
        wire.send(self.push, header, {slot_key(k): v for k, v in task.slots.items()})

    def _on_control(self, msg: wire.Message) -> None:
        if msg.kind == "consumed":
            self.consumed_upto = int(msg.header["upto"])
            while self.held and next(iter(self.held)) <= self.consumed_upto:
                self.held.popitem(last=False)
        elif msg.kind == "resend":
            self.resends.extend(int(t) for t in msg.header["tasks"] if int(t) in self.held)
        elif msg.kind == "resend_all":
            keep = set(msg.header.get("except", []))
            self.resends.extend(t for t in self.held if t not in keep)
        elif msg.kind == "stop":
            raise ParentGone


def run_reader_process(cfg: VentilatorConfig) -> None:
    """Entry point of the forked reader process; never returns to the caller's code."""
    code = 0
    try:
        vent = Ventilator(cfg)
        try:
            vent.run()
        finally:
            vent.push.close(linger=0)
            vent.ctl.close()
            vent.ctx.term()
    except BaseException:  # nothing may escape into the forked copy of the student's stack
        log.exception("reader process failed")
        code = 1
    os._exit(code)
