"""The dispatcher: one thread of the student that owns the data plane's state.

It owns the worker processes (:class:`~zdistill.student.worker_pool.WorkerPool`), the
bookkeeping of tasks, credit and slots (:class:`~zdistill.student.scheduler.Scheduler`),
the ROUTER socket every worker talks to for its whole life (it lives as long as the reader,
so workers never re-handshake at an epoch's start) and the current producer's socket.  A
thread, not a process: it mostly waits in ``zmq_poll`` (which releases the GIL), so it keeps
the teachers fed while the training step holds the GIL, and hands answers to the loop
without a further hop (docs/dataplane.md).

Other threads call its public methods: each queues the call for the thread and wakes it;
the thread tells the training loop what happened on :attr:`events`.  :attr:`lock` is held
while the thread works: the training loop holds it to fork the producer (so no lock of
this thread is inherited held), to call :meth:`started` and to read its state for ``stats()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from zdistill.errors import ReaderError, WireError
from zdistill.spec import Tensors
from zdistill.student import protocol
from zdistill.student.cache import CacheGate
from zdistill.student.options import PipelineOptions
from zdistill.student.producer import rebuild_exception
from zdistill.student.protocol import describe_exit
from zdistill.student.scheduler import Plan, Scheduler, cached_whole, uncached
from zdistill.student.worker_pool import WorkerPool

log = logging.getLogger(__name__)

_SUPERVISE_EVERY = 0.05  # seconds: workers, membership, producer, stragglers (each wake-up costs ~50 us of CPU)
_BURST = 64  # messages read from one socket before the others get a turn
_IN, _IN_OUT = int(zmq.POLLIN), int(zmq.POLLIN | zmq.POLLOUT)


@dataclass(frozen=True)
class Planned:
    epoch: int
    plan: Plan
    endpoint: str  # where the producer connects
    slot_count: int
    grants: list[int]  # the slots the producer may fill at once
    cache: bool  # the teacher-output cache may be used (every teacher agrees with it)


@dataclass(frozen=True)
class Answer:
    """A task's first answer from a worker (later ones are dropped)."""

    epoch: int
    task: protocol.Task
    arrays: Tensors  # the predictions
    cached: int = 0  # rows of them the worker took from the teacher-output cache


@dataclass(frozen=True)
class CachedAnswer:
    """A task the cache answered whole, with no worker: its predictions are in its slot."""

    epoch: int
    task: protocol.Task
    cached: int  # every row: task.rows


@dataclass(frozen=True)
class AllAnswered:
    """Every task the epoch's producer made is answered: the epoch has ``tasks`` tasks."""

    epoch: int
    tasks: int


@dataclass(frozen=True)
class Failed:
    epoch: int
    error: BaseException


Answered = Answer | CachedAnswer
Event = Planned | Answered | AllAnswered | Failed


class Dispatcher:
    """Owns the scheduler, the workers, their socket and the producer's (see the module docstring)."""

    def __init__(self, ctx: zmq.Context, folder: str, options: PipelineOptions,
                 worker_command: Callable[[str, bytes], list[str]]) -> None:
        self.ctx, self.folder = ctx, folder
        self.endpoint = f"ipc://{folder}/dispatch"
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.sched = Scheduler(options)
        self.pool = WorkerPool(worker_command)
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a worker gone fails instead of vanishing
        self._router.bind(self.endpoint)
        self._poller = zmq.Poller()  # the dispatcher thread's
        self._calls: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()  # from other threads
        self._wakeup = os.eventfd(0)  # written after each call queued: the thread polls it beside its sockets
        self._membership: Callable[[], list[str] | None] | None = None
        self._producer: zmq.Socket | None = None
        self.producer_pid: int | None = None  # the producer of the epoch running
        self._producers: set[int] = set()  # forked, not yet reaped
        self._grants: list[int] = []  # granted, not yet sent (the producer was not connected)
        self._error: BaseException | None = None  # failed between epochs: told at the next one
        self._said_finished = False
        self._supervised_at = 0.0
        self.cache_ok = True  # every teacher's answers may go to the reader's cache (if it has one)
        self.gate = CacheGate()  # closed with cache_ok: from then on no cached row is served (made before any fork)
        self._closing = False  # close() was called: the thread ends, then the wake-up fd is closed
        self.stopped = False  # every process stopped, under the lock: a producer forked now is the forker's to stop
        self._thread = threading.Thread(target=self._run, name="zdistill-dispatcher", daemon=True)
        self._thread.start()

    # -- what other threads call ---------------------------------------------------

    def set_teachers(self, teachers: Sequence[str], membership: Callable[[], list[str] | None] | None) -> None:
        """Workers for these teachers; ``membership`` (dynamic teachers): polled for a new list, or None."""
        self._post(self._set_teachers, list(teachers), membership)

    def begin(self, epoch: int) -> None:
        """Plan ``epoch`` and bind its producer's socket: :class:`Planned` (or :class:`Failed`) follows."""
        self._post(self._begin, epoch)

    def started(self, pid: int) -> None:
        """The loop forked the epoch's producer, and calls this holding :attr:`lock` (taken for
        the fork): once the thread stopped, nobody else would ever stop that producer."""
        if self.stopped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        else:
            self.producer_pid = pid
            self._producers.add(pid)

    def stop(self, epoch: int, lent: frozenset[int]) -> None:
        """The loop is done with ``epoch`` (to its end, by a break, or by an error); it still holds ``lent``."""
        self._post(self._end_epoch, epoch, lent)

    def redo(self, task: protocol.Task) -> None:
        """The task's answer holds cached rows the cache's gate no longer lets through: a teacher answers it whole."""
        self._post(self.sched.redo, task)

    def lend(self, slot: int) -> None:
        """The training loop holds views of a slot's arrays (its bytes leave the bound) until :meth:`release`."""
        self._post(self.sched.lend, slot)

    def release(self, slot: int) -> None:
        """A slot is free again (called by the finalizer of its arrays, in any thread)."""
        self._post(self.sched.release, slot)

    def close(self) -> None:
        """Stop the thread; it stops every worker and producer by PID on its way out."""
        if not self._closing:
            self._closing = True
            os.eventfd_write(self._wakeup, 1)
            self._thread.join(10.0)
            os.close(self._wakeup)

    def _post(self, call: Callable[..., None], *args: Any) -> None:
        self._calls.append((call, args))
        if not self._closing:  # else a finalizer after close(): nothing to wake
            with contextlib.suppress(OSError):  # closed meanwhile
                os.eventfd_write(self._wakeup, 1)

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wakeup, zmq.POLLIN)
        polled: tuple[zmq.Socket | None, int] = (None, 0)  # the producer's socket and the events it is polled for
        try:
            while not self._closing:
                if self._producer is not None:  # for room too while grants wait: it may not be connected yet
                    events = _IN_OUT if self._grants else _IN
                    if polled != (self._producer, events):
                        self._poller.register(self._producer, events)
                        polled = (self._producer, events)
                ready = dict(self._poller.poll(_SUPERVISE_EVERY * 1000))
                with self.lock:
                    try:
                        self._step(ready)
                    except Exception as exc:  # noqa: BLE001 - every failure ends the epoch, never the thread
                        self._fail(exc)
        finally:
            with self.lock:
                self._shutdown()

    def _step(self, ready: dict[Any, int]) -> None:
        if self._wakeup in ready:
            os.eventfd_read(self._wakeup)  # zero again
        while self._calls:
            call, args = self._calls.popleft()
            call(*args)
        now = time.monotonic()
        if self._router in ready:
            self._read_workers(now)
        if self._producer is not None and self._producer in ready:
            self._read_producer()
        if now - self._supervised_at >= _SUPERVISE_EVERY:
            self._supervised_at = now
            self._supervise(now)
        self._send_tasks()
        self._send_grants()
        s = self.sched
        if s.active and s.finished and not self._said_finished:
            self._said_finished = True
            self.events.put(AllAnswered(s.epoch, s.total or 0))

    def _begin(self, epoch: int) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self.events.put(Failed(epoch, error))
            return
        plan = self.sched.begin(epoch, time.monotonic())
        self._said_finished = False
        self._producer = self.ctx.socket(zmq.PAIR)
        self._producer.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{self.folder}/producer-{epoch}"
        self._producer.bind(endpoint)
        self._poller.register(self._producer, _IN)  # now: a stop in the same step unregisters it
        self.events.put(Planned(epoch, plan, endpoint, self.sched.slot_count, self.sched.grants(), self.cache_ok))

    def _end_epoch(self, epoch: int, lent: frozenset[int]) -> None:
        if epoch != self.sched.epoch:
            return  # a generator of an earlier epoch, collected late
        self.sched.stop(set(lent))
        self._grants.clear()
        if self._producer is not None:
            self._poller.unregister(self._producer)
            self._producer.close(linger=0)
            self._producer = None
        pid, self.producer_pid = self.producer_pid, None
        if pid is not None and pid in self._producers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # it may still be building tasks nobody will take
        self._reap_producers()

    def _fail(self, exc: BaseException) -> None:
        """An error the training loop must hear: it ends the epoch (or the next one, between epochs);
        an epoch fails once: a second error before the loop stopped it is only logged."""
        if self.sched.active:
            self.sched.active = False
            self.events.put(Failed(self.sched.epoch, exc))
        elif self._producer is not None:  # the epoch failed already; its stop is on its way
            log.debug("epoch %d already failed; also: %s", self.sched.epoch, exc)
        else:
            self._error = exc

    def _set_teachers(self, teachers: Sequence[str], membership: Callable[[], list[str] | None] | None) -> None:
        self._membership = membership
        started, retired = self.pool.set_teachers(teachers)
        for proc in started:
            self.sched.add_worker(proc.identity, proc.teacher)
        for proc in retired:
            self.sched.retire_worker(proc.identity)

    def _read_workers(self, now: float) -> None:
        for _ in range(_BURST):
            if not self._router.get(zmq.EVENTS) & _IN:  # cheaper than the exception of an empty recv
                return
            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            identity = frames[0].bytes
            try:
                msg, arrays = protocol.decode(frames[1:])
            except WireError as exc:
                log.warning("dropping a malformed message from a worker: %s", exc)
                continue
            if isinstance(msg, protocol.Hello | protocol.Status):
                self.pool.mark_started(identity)
            if isinstance(msg, protocol.Done):
                counts = {len(a) for a in arrays.values()} or {0}
                rows = counts.pop() if len(counts) == 1 else -1
                held = self.sched.on_done(identity, msg, rows, now)
                if held is not None and msg.cached and self.gate.closed:
                    self.sched.redo(held.task)  # its cached rows may be another model's
                elif held is not None:
                    self.events.put(Answer(msg.epoch, held.task, arrays, msg.cached))
            elif isinstance(msg, protocol.Undone):
                self.sched.on_undone(identity, msg, time.monotonic())
            elif isinstance(msg, protocol.Status):
                self.sched.on_status(identity, msg, now)
                if msg.cache and self.cache_ok:
                    self.cache_ok = False
                    self.gate.close()
                    log.warning("the teacher-output cache is off: a teacher's answers cannot go to it (%s); from "
                                "now on no cached answer is served, and the teachers answer every row", msg.cache)

    def _send_tasks(self) -> None:
        for identity, held in self.sched.assignments(time.monotonic()):
            try:
                self._router.send_multipart([identity, *held.wire], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # gone, or not connected yet: the task waits for another
                log.debug("could not send task %d to worker %r: %s", held.task.task_id, identity, exc)
                self.sched.unsent(identity, held.task.task_id)

    def _supervise(self, now: float) -> None:
        if self._membership is not None:
            teachers = self._membership()
            if teachers is not None:
                log.info("teachers now: %s", ", ".join(teachers) or "none")
                self._set_teachers(teachers, self._membership)
        died, started, failed = self.pool.reap(now)
        for proc in died:
            self.sched.worker_gone(proc.identity)
        for proc in started:
            self.sched.add_worker(proc.identity, proc.teacher)
        if failed is not None:
            raise failed
        self._reap_producers()
        self.sched.check(now)

    def _read_producer(self) -> None:
        assert self._producer is not None
        for _ in range(_BURST):
            if not self._producer.get(zmq.EVENTS) & _IN:
                return
            frames = self._producer.recv_multipart(zmq.NOBLOCK)
            msg, _ = protocol.decode(frames)
            if isinstance(msg, protocol.Task):
                if msg.hits and self.gate.closed:  # looked up before the producer saw the gate close
                    msg, frames = uncached(msg)
                if self.sched.on_task(msg, frames) and cached_whole(msg):
                    self.events.put(CachedAnswer(msg.epoch, msg, msg.rows))
            elif isinstance(msg, protocol.End):
                if msg.error is not None:
                    raise rebuild_exception(msg.error)
                self.sched.on_end(msg)

    def _send_grants(self) -> None:
        self._grants += self.sched.grants()
        if self._grants and self._producer is not None:
            with contextlib.suppress(zmq.Again):  # not connected yet: polled for POLLOUT
                protocol.send(self._producer, protocol.Grant(slots=self._grants), flags=zmq.NOBLOCK)
                self._grants = []

    def _reap_producers(self) -> None:
        """Reap exited producers; one that died before its end fails the epoch, saying how it died."""
        for pid in list(self._producers):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            self._producers.discard(pid)
            if pid == self.producer_pid and self.sched.active and self.sched.total is None:  # no end came
                if self._producer is not None and self._producer.poll(200):  # its last words may be in transit
                    self._read_producer()
                if self.sched.total is None:
                    how = describe_exit(os.waitstatus_to_exitcode(status))
                    raise ReaderError(f"the reader process (pid {pid}) {how} before the end of the epoch; if "
                                      "the machine ran out of memory, the kernel's log (dmesg) names it")

    def _shutdown(self) -> None:
        for pid in self._producers:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        self._producers.clear()
        if self._producer is not None:
            self._producer.close(linger=0)
        self.pool.close()
        self._router.close(linger=0)
        self.stopped = True
