"""The ventilator: runs the user's reader in its own process and hands out tasks.

It is forked from the student for each epoch (the reader is often a closure, which
only a fork can carry).  It cuts the reader's output into tasks
(:class:`~zdistill.tasks.TaskBuilder`) built directly in shared-memory slots
(:mod:`zdistill.shm`), and hands each task's small descriptor to a worker, keeping
every task until the student says it was consumed: that table is what lets a task
whose worker or teacher died be sent again.  A credit window (tasks and bytes) bounds
the table, so memory stays flat on an endless reader.

Tasks sockets (a DEALER of ours per worker, connected to the worker's ROUTER): we
say ``hello {in_flight}`` on connecting, workers answer and say again ``ready {credit, reset,
received}`` when they have room, and a task goes to the worker with the most room, as in the
zguide's load-balancing broker.  A slow teacher's worker thus gets fewer tasks instead
of an equal share, and a worker that is down has no credit at all.  A worker credits
whoever said hello last, never the reader process of an epoch that ended.  Workers
known up and idle when the epoch began get their first tasks without waiting for
their answer, which then counts them (``received``).

Control channel (a PAIR socket to the student, :mod:`zdistill.wire` messages):

- student -> ventilator: ``connect {endpoints}``: workers started during the epoch;
  ``consumed {upto, slots}`` frees tasks up to ``upto`` and those shared-memory slots;
  ``resend {tasks}`` sends those tasks again; ``resend_all {except}`` sends every held
  task not listed (after a worker died); ``stop``.
- ventilator -> student: ``end {tasks}`` once the reader is exhausted; ``error
  {type, module, message, traceback}`` if the reader raised.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from zdistill import wire
from zdistill.model import TensorSpec
from zdistill.shm import SlotWriter
from zdistill.tasks import ReaderType, Task, TaskBuilder

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
    in_flight: int  # tasks a worker may hold this epoch (it hears so in our hello)
    task_bytes: int
    window: int
    slots: int  # shared-memory slots: the window, plus room for arrays the training loop keeps
    taken_slots: list[int]  # slots whose arrays the training loop still holds from an earlier epoch
    max_bytes: int
    epoch: int
    worker_endpoints: list[str]
    up_endpoints: list[str]  # workers known up and idle when the epoch began: tasks go before they answer
    ctl_endpoint: str
    slots_folder: str
    parent_pid: int


class ParentGone(Exception):
    """The student process died or asked us to stop: leave at once."""


class Ventilator:
    """Owns the held-task table and the sockets of the reader process."""

    def __init__(self, cfg: VentilatorConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 1000)
        self.ctl.connect(cfg.ctl_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.ctl, zmq.POLLIN)
        self.credits: dict[zmq.Socket, int] = {}  # a worker's socket -> tasks it can take now
        self.sent: dict[zmq.Socket, int] = {}  # a worker's socket -> tasks sent to it
        up = set(cfg.up_endpoints)
        for endpoint in cfg.worker_endpoints:
            self._connect(endpoint, cfg.in_flight if endpoint in up else 0)
        self.slots = SlotWriter(cfg.slots_folder, cfg.slots)
        taken = set(cfg.taken_slots)
        self.free_slots = deque(s for s in range(cfg.slots) if s not in taken)
        self.held: OrderedDict[int, Task] = OrderedDict()
        self.held_bytes = 0  # bytes of the tasks in ``held``
        self.resends: deque[int] = deque()
        self.total: int | None = None
        self.consumed_upto = -1

    def _connect(self, endpoint: str, credit: int = 0) -> None:
        """A socket to one worker, and a hello (queued until connected) that it answers with credit.

        A worker known up and idle gets ``credit`` tasks at once, before its answer: that
        saves a round trip to every worker at each epoch's start.  Its answer then says
        how much room it really had, and :meth:`_on_credit` deducts what was sent meanwhile.
        """
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)  # a worker still starting binds soon
        sock.connect(endpoint)
        wire.send(sock, {"kind": "hello", "epoch": self.cfg.epoch, "in_flight": self.cfg.in_flight}, flags=zmq.NOBLOCK)
        self.poller.register(sock, zmq.POLLIN)
        self.credits[sock] = credit
        self.sent[sock] = 0

    def close(self) -> None:
        for sock in self.credits:
            sock.close(linger=0)
        self.ctl.close()
        self.ctx.term()

    def run(self) -> None:
        builder = TaskBuilder(self.cfg.reader_type, self.cfg.ins, self.cfg.feeds, self.cfg.task_rows,
                              self.cfg.task_bytes, self._allocate)
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
        try:
            self._tell({"kind": "end", "tasks": self.total})
            while self.consumed_upto < self.total - 1:
                self._serve(_POLL_MS)
        except ParentGone:
            return

    def _report(self, exc: BaseException) -> None:
        try:
            self._tell({
                "kind": "error",
                "type": type(exc).__name__,
                "module": type(exc).__module__,
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
            })
        except ParentGone:
            pass

    def _tell(self, header: dict[str, Any]) -> None:
        """A message to the student, waiting for room only while the student lives."""
        while True:
            try:
                wire.send(self.ctl, header, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                if os.getppid() != self.cfg.parent_pid:
                    raise ParentGone from None
                self.ctl.poll(_POLL_MS, zmq.POLLOUT)

    def _allocate(self, task_id: int, specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> tuple[
        dict[str, np.ndarray], dict[str, Any]
    ]:
        """Room for a task's arrays in a free shared-memory slot, once the credit window allows.

        It waits while task ``t - window`` is not consumed, while the tasks held would
        exceed the byte budget, and while no slot is free.
        """
        needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
        while (
            task_id - self.consumed_upto > self.cfg.window
            or (self.held and self.held_bytes + needed > self.cfg.max_bytes)
            or not self.free_slots
        ):
            self._serve(_POLL_MS)
        return self.slots.allocate(self.free_slots.popleft(), specs)

    def _hand_out(self, task: Task) -> None:
        """Hold ``task`` (until it is consumed) and send it once a worker has room for it."""
        self.held[task.task_id] = task
        self.held_bytes += task.nbytes
        self.resends.append(task.task_id)
        self._dispatch()
        while self.resends:
            self._serve(_POLL_MS)

    def _serve(self, wait_ms: int) -> None:
        """Handle control messages and workers' credits, and send queued tasks to workers with room."""
        if os.getppid() != self.cfg.parent_pid:
            raise ParentGone
        for sock, _ in self.poller.poll(wait_ms):
            while sock.poll(0):
                frames = sock.recv_multipart(copy=False)
                if sock is self.ctl:
                    self._on_control(wire.decode(frames))
                else:
                    self._on_credit(sock, wire.decode(frames))
        self._dispatch()

    def _on_credit(self, worker: zmq.Socket, msg: wire.Message) -> None:
        """``ready {credit, reset, received}``: a worker has room for ``credit`` more tasks (or,
        with ``reset``, exactly that many once the tasks still on their way to it are in)."""
        if msg.kind != "ready":
            return
        credit = max(0, int(msg.header.get("credit", 0)))
        if msg.header.get("reset"):
            in_transit = max(0, self.sent[worker] - int(msg.header.get("received", self.sent[worker])))
            self.credits[worker] = credit - in_transit
        else:
            self.credits[worker] += credit

    def _dispatch(self) -> None:
        """Queued tasks to the workers with the most room: a slow worker gets fewer (load balancing)."""
        while self.resends:
            worker = max(self.credits, key=self.credits.__getitem__, default=None)
            if worker is None or self.credits[worker] <= 0:
                return
            task = self.held.get(self.resends[0])
            if task is not None:
                header = {"kind": "task", "epoch": self.cfg.epoch, "task": task.task_id, "sizes": task.sizes,
                          "shm": task.descriptor}  # only the descriptor: the arrays are in shared memory
                try:
                    wire.send(worker, header, flags=zmq.NOBLOCK)
                except zmq.ZMQError:  # that worker is stuck: its credit is void
                    self.credits[worker] = 0
                    continue
                self.credits[worker] -= 1
                self.sent[worker] += 1
            self.resends.popleft()

    def _on_control(self, msg: wire.Message) -> None:
        if msg.kind == "connect":
            for endpoint in msg.header["endpoints"]:
                self._connect(str(endpoint))
        elif msg.kind == "consumed":
            self.free_slots.extend(int(slot) for slot in msg.header.get("slots", ()) if 0 <= int(slot) < self.cfg.slots)
            self.consumed_upto = int(msg.header["upto"])
            while self.held and next(iter(self.held)) <= self.consumed_upto:
                self.held_bytes -= self.held.popitem(last=False)[1].nbytes
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
            vent.close()
    except BaseException:  # nothing may escape into the forked copy of the student's stack
        log.exception("reader process failed")
        code = 1
    os._exit(code)
