"""The student side of a DistillReader: worker processes, the sink, and one epoch at a time.

One :class:`Pipeline` owns everything the reader starts: a private ZeroMQ context, a
folder of ipc endpoints, one worker process per teacher (kept across epochs), the
sink socket where workers deliver finished tasks, and the reader process of the
current epoch.  :meth:`Pipeline.epoch` is a generator: it forks the reader process,
then receives finished tasks, puts them back in order, yields them as EDL's output,
and credits the ventilator as each task is consumed.  It also supervises: a dead
worker is replaced and its tasks sent again, a returned task goes to another worker,
a refused task is retried a few times, a stalled epoch re-sends what is missing.

Cleanup does not depend on the caller: :func:`weakref.finalize` stops every process
by PID on :meth:`close`, on garbage collection and at interpreter exit.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from zdistill import wire
from zdistill.errors import ConfigError, ReaderError, TeacherError, TeacherTimeout
from zdistill.model import TensorSpec
from zdistill.shm import SlotReader, make_private_folder, make_slot_folder
from zdistill.sink import ReorderBuffer
from zdistill.tasks import ReaderType, predict_key, split_output
from zdistill.ventilator import VentilatorConfig, run_reader_process
from zdistill.worker_pool import WorkerPool, WorkerProc

log = logging.getLogger("zdistill.reader")

FATAL_CODES = frozenset({"bad_request", "too_large", "bad_message"})
_SUPERVISE_EVERY = 0.01  # seconds: how often a waiting sink checks workers, teachers and stragglers
_DEEP_MAX = 8  # tasks per worker the teacher time alone asks for, at most (unless max_in_flight says)


@dataclass
class PipelineOptions:
    """Knobs of the pipeline; the defaults are chosen for throughput on small machines."""

    request_rows: int = 256  # rows per teacher request (the teacher's max batch caps it)
    task_rows: int = 1024  # rows per task at most: whole reader batches are packed up to this
    task_seconds: float = 0.01  # teacher time per task: slow teachers get smaller tasks (see Pipeline.plan)
    task_bytes: int = 4 << 20  # ...or up to this many bytes
    window: int = 16  # tasks in flight per epoch, at least 3 x in_flight per worker (memory bound)
    max_inflight_bytes: int = 512 << 20  # bytes of tasks in flight (memory bound for big samples)
    in_flight: int = 2  # tasks in flight per worker, at least (each is one or more teacher requests)
    max_in_flight: int | None = None  # ...and at most (None: up to 8, more to fill a teacher's batches; see plan)
    queue_seconds: float = 0.04  # teacher time a worker holds in flight (see Pipeline.plan)
    request_timeout: float = 30.0  # a teacher silent this long is treated as down
    max_retries: int = 3  # refusals of one task before the error reaches the training loop
    teacher_wait: float = 300.0  # how long an epoch waits with no teacher up before it fails
    stall_timeout: float = 60.0  # no progress this long: send every missing task again
    straggler_factor: float = 4.0  # the next task late by this many typical task times is sent again
    straggler_min: float = 0.5  # ...but never sooner than this many seconds


@dataclass
class TeacherStats:
    """What the sink saw of one teacher (through its worker), for :meth:`Pipeline.snapshot`."""

    tasks: int = 0
    samples: int = 0
    failed: int = 0
    returned: int = 0
    up: bool = False
    changed_at: float = 0.0  # monotonic time of the last up/down change
    first_task_at: float = 0.0  # monotonic time its first finished task reached the sink
    reason: str = ""  # why it is not up, as its worker said


def _shutdown(pool: WorkerPool, reader_pids: set[int], folders: list[str], ctx: zmq.Context) -> None:
    """Stop every process by PID and free the endpoints; safe to call twice and at exit."""
    _live.pop(id(pool), None)
    for pid in list(reader_pids):
        _kill_reader(pid)
    reader_pids.clear()
    pool.close()
    ctx.destroy(linger=0)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


# Every open pipeline's clean-up, by id of its pool, for the SIGTERM handler below.
_live: dict[int, Callable[[], None]] = {}
_sigterm_lock = threading.Lock()
_sigterm_installed = False
_sigterm_before: Any = None


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM: the handler that was there before decides, but its default (dying) first
    removes every pipeline's processes, shared memory and endpoints.

    A handler of the user's own runs as before: if it ends the program, the pipelines'
    finalizers clean up at exit; if it does not, the pipelines go on.  Without a Python
    handler (the default, or one set in C, as Paddle does) the process would die with
    the folders left behind, so they are removed first, and then the process dies of
    the same signal.
    """
    before = _sigterm_before
    if callable(before):
        before(signum, frame)
        return
    if before == signal.SIG_IGN:
        return
    for cleanup in list(_live.values()):
        cleanup()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _clean_up_on_sigterm() -> None:
    """Install :func:`_on_sigterm` once (only the main thread may set signal handlers)."""
    global _sigterm_installed, _sigterm_before
    with _sigterm_lock:
        if _sigterm_installed or threading.current_thread() is not threading.main_thread():
            return
        _sigterm_before = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


def describe_exit(status: int) -> str:
    """A wait status in words: ``killed by signal 9 (SIGKILL)``, ``exited with code 1``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {number} ({name})"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def _kill_reader(pid: int, wait: bool = True) -> bool:
    """SIGKILL a reader process; True once it is reaped (``wait=False`` only tries)."""
    try:
        os.kill(pid, signal.SIGKILL)
        return os.waitpid(pid, 0 if wait else os.WNOHANG)[0] == pid
    except (ProcessLookupError, ChildProcessError):
        return True


def rebuild_exception(header: dict[str, Any]) -> BaseException:
    """The reader's exception, re-created by type name (no pickle), else a ReaderError."""
    name, module, message = str(header.get("type")), str(header.get("module")), str(header.get("message"))
    remote = str(header.get("traceback", ""))
    exc: BaseException
    try:
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise TypeError(name)
        exc = cls(message)
    except Exception:
        exc = ReaderError(f"{module}.{name}: {message}")
    exc.add_note(f"raised in the DistillReader's reader process:\n{remote}")
    return exc


class Pipeline:
    """Owns the processes and sockets of one DistillReader (see the module docstring)."""

    def __init__(self, ins: Sequence[str], predicts: Sequence[str], options: PipelineOptions) -> None:
        self.ins, self.predicts, self.options = list(ins), list(predicts), options
        self.ctx = zmq.Context()
        self.folder = make_private_folder("ipc")  # ipc endpoints (mode 0700)
        # Shared-memory task slots (kept across epochs; see zdistill.shm).
        self.slots_folder = make_slot_folder(options.max_inflight_bytes)
        self.slot_reader = SlotReader(self.slots_folder)
        # Slots whose arrays the training loop may still hold (zdistill.shm): taken until
        # the finalizer of their mapping puts them on ``released`` (from any thread).
        self.taken_slots: set[int] = set()
        self.released: deque[int] = deque()
        self.results_endpoint = f"ipc://{self.folder}/results"
        self.sink = self.ctx.socket(zmq.PULL)
        self.sink.setsockopt(zmq.LINGER, 0)
        self.sink.bind(self.results_endpoint)
        self.pool = WorkerPool(self._worker_command, self.folder)
        self.feeds: list[TensorSpec] = []  # what the teachers take: workers check each teacher against it
        self.reader_pids: set[int] = set()
        self.epochs = 0
        self.settled = True  # every epoch so far ran to its end: no worker still holds a task of one
        self.stats: Counter[str] = Counter()
        self.membership: Callable[[], list[str] | None] | None = None  # dynamic teachers: new list or None
        # How long workers took for recent tasks; their median is the typical task time.
        # A median, because the stragglers it is used to spot must not raise it.
        self.task_times: deque[float] = deque(maxlen=64)
        # The teacher time per row those tasks took (not counting their wait behind the worker's others).
        self.row_service: deque[float] = deque(maxlen=64)
        self.row_bytes = 0  # shared-memory bytes per row of the last task (all its slots)
        self.task_sizes: deque[int] = deque(maxlen=64)  # rows of recent tasks (a task ends at task_bytes)
        self.teacher_stats: dict[str, TeacherStats] = {}
        self.wait_seconds = 0.0  # time the training loop spent waiting for data
        self.busy_seconds = 0.0  # time inside epochs, for samples/s
        self._epoch_started: float | None = None
        self._finalizer = weakref.finalize(
            self, _shutdown, self.pool, self.reader_pids, [self.folder, self.slots_folder], self.ctx
        )
        _live[id(self.pool)] = self._finalizer
        _clean_up_on_sigterm()

    @property
    def workers(self) -> dict[str, WorkerProc]:
        """The current teachers' workers, by teacher address."""
        return self.pool.workers

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def snapshot(self) -> dict[str, Any]:
        """Counters for :meth:`DistillReader.stats`: throughput, waits, resends, per teacher."""
        busy = self.busy_seconds + (time.monotonic() - self._epoch_started if self._epoch_started else 0.0)
        now = time.monotonic()
        task_rows, in_flight = self.plan(len(self.workers))
        return {
            "samples": self.stats["samples"],
            "tasks": self.stats["tasks"],
            "samples_per_s": self.stats["samples"] / busy if busy else 0.0,
            "wait_s": self.wait_seconds,
            "task_rows": task_rows,  # rows per task of the next epoch (see plan())
            "in_flight": in_flight,  # tasks per worker of the next epoch
            "tasks_in_flight": self.stats["in_flight"],  # handed out, not yet consumed (as the sink knows)
            "tasks_buffered": self.stats["buffered"],  # finished, waiting for an earlier task or the loop
            "resent": self.stats["resent"] + self.stats["resend_all"],
            "returned": self.stats["returned"],
            "failed": self.stats["failed"],
            "straggler_resends": self.stats["straggler_resends"],
            "duplicates_dropped": self.stats["duplicates"],
            "workers_restarted": self.stats["workers_restarted"],
            "teachers": {
                name: {
                    "up": t.up,
                    "in_use": name in self.workers,
                    "tasks": t.tasks,
                    "samples": t.samples,
                    "samples_per_s": t.samples / busy if busy else 0.0,
                    "failed": t.failed,
                    "returned": t.returned,
                    "reason": t.reason,
                    "state_age_s": now - t.changed_at if t.changed_at else None,
                }
                for name, t in self.teacher_stats.items()
            },
        }

    # -- workers ------------------------------------------------------------

    def set_teachers(self, teachers: Iterable[str]) -> None:
        """Start a worker for each new teacher; retire the workers of teachers gone."""
        self.pool.set_teachers(teachers)

    def _worker_command(self, teacher: str, endpoint: str) -> list[str]:
        o = self.options
        return [
            sys.executable, "-m", "zdistill.worker", "--teacher", teacher,
            "--tasks", endpoint, "--results", self.results_endpoint, "--slots", self.slots_folder,
            "--predicts", ",".join(self.predicts), "--feeds", json.dumps([f.to_wire() for f in self.feeds]),
            "--request-rows", str(o.request_rows), "--in-flight", str(o.in_flight), "--timeout", str(o.request_timeout),
            "--parent-pid", str(os.getpid()),
            "--log-level", logging.getLevelName(max(logging.getLogger("zdistill").getEffectiveLevel(), logging.INFO)),
        ]

    # -- slots ----------------------------------------------------------------

    def lend(self, descriptor: dict[str, Any], keep_limit: int) -> dict[str, np.ndarray]:
        """A task's slot arrays for the training loop: views while few slots are lent, else copies.

        Views cost nothing, but their slot stays taken while the loop holds them; a loop
        that keeps everything (``list(dr())``) would take every slot.  So past
        ``keep_limit`` slots lent, the loop gets copies and the slot is free at once.
        """
        slot, arrays, mapping = self.slot_reader.view(descriptor)
        lent = len(self.taken_slots) - len(self.released)  # every released slot is still in taken_slots
        self.taken_slots.add(slot)
        if lent < keep_limit:
            weakref.finalize(mapping, self.released.append, slot)
            return arrays
        copies = {name: np.array(arr) for name, arr in arrays.items()}
        del arrays
        mapping.close()
        self.released.append(slot)
        return copies

    def collect_released(self) -> list[int]:
        """Slots given back since the last call (their arrays are gone)."""
        freed = []
        while self.released:
            slot = self.released.popleft()
            self.taken_slots.discard(slot)
            freed.append(slot)
        return freed

    # -- one epoch ----------------------------------------------------------

    def plan(self, workers: int) -> tuple[int, int]:
        """Rows per task and tasks per worker for the next epoch, from the teacher time measured.

        A task is the unit of load balancing: one teacher runs it, and the epoch cannot
        end before its slowest task.  With fast teachers big tasks are cheapest (the
        pipeline's cost is per message).  With slow ones (a 10 ms GPU call per 256 rows
        makes a 1024-row task 40 ms of one teacher) big tasks leave teachers idle at the
        start of an epoch, until each has one, and at its end, while the last few run on
        some teachers only.  So a task holds about ``task_seconds`` of teacher time, but
        never fewer rows than one request, and at most ``task_rows``.

        A worker holds about ``queue_seconds`` (40 ms) of teacher time in flight, so its
        teacher never waits while one task's result travels to the student and the next
        task to the worker, even while other processes hold the cores for a while (four
        10 ms tasks per worker keep teachers busier under load than two: "Under load" in
        bench/README.md).  Short tasks thus get deeper queues, up to 8 (or
        ``max_in_flight``), as long as all workers together hold no more bytes than
        ``window`` full-size tasks (``window * task_bytes``, 64 MiB by default).

        A teacher also needs enough rows queued to fill a batch on each of its model
        instances, and one more batch waiting: ``(instances + 1) * max_batch_size`` rows
        (from its meta).  Tasks of big samples hold few rows (a task ends at ``task_bytes``:
        one reader batch of 32 images of 150 KB), so that can take many more tasks; they are
        kept in flight within ``max_inflight_bytes`` over all workers (and within
        ``max_in_flight`` if it is set).
        """
        o = self.options
        if not self.row_service:
            return o.task_rows, o.in_flight
        per_row = statistics.median(self.row_service)
        floor = min(o.request_rows, o.task_rows)
        fit = int(o.task_seconds / per_row) if per_row > 0 else o.task_rows
        rows = max(floor, min(o.task_rows, fit // floor * floor))
        cap = o.max_in_flight or _DEEP_MAX
        deep = math.ceil(o.queue_seconds / (per_row * rows)) if per_row > 0 else cap
        task_bytes = min(o.task_bytes, rows * self.row_bytes)
        fits = o.window * o.task_bytes // (max(1, workers) * task_bytes) if task_bytes > 0 else cap
        return rows, max(o.in_flight, min(cap, deep, fits), self._fill(rows, workers))

    def _fill(self, rows: int, workers: int) -> int:
        """Tasks per worker that keep ``(instances + 1) * max_batch_size`` rows at each teacher."""
        o = self.options
        wanted = max(((p.instances + 1) * p.max_batch_size for p in self.workers.values()), default=0)
        if not wanted or not self.row_bytes:
            return 0
        per_task = max(1, int(statistics.median(self.task_sizes)) if self.task_sizes else rows)
        tasks = math.ceil(wanted / per_task)
        if o.max_in_flight is not None:
            tasks = min(tasks, o.max_in_flight)
        return min(tasks, o.max_inflight_bytes // (max(1, workers) * per_task * self.row_bytes))

    def epoch(
        self, reader: Callable[[], Iterable[Any]], reader_type: ReaderType, feeds: Sequence[TensorSpec]
    ) -> Iterator[Any]:
        """Run the reader once through the teachers and yield EDL's output, in order."""
        self.epochs += 1
        run = _EpochRun(self, self.epochs, reader, reader_type, feeds)
        self._epoch_started = time.monotonic()
        try:
            yield from run.outputs()
        finally:
            self.busy_seconds += time.monotonic() - self._epoch_started
            self._epoch_started = None
            run.stop()


class _EpochRun:
    """The sink and supervisor of one epoch (one reader process, one control socket)."""

    def __init__(
        self, pipe: Pipeline, epoch: int, reader: Callable[[], Iterable[Any]], reader_type: ReaderType,
        feeds: Sequence[TensorSpec],
    ) -> None:
        self.pipe, self.epoch, self.reader_type = pipe, epoch, reader_type
        o = pipe.options
        self.ctl = pipe.ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 0)
        ctl_endpoint = f"ipc://{pipe.folder}/ctl-{epoch}"
        self.ctl.bind(ctl_endpoint)
        task_rows, self.in_flight = pipe.plan(len(pipe.workers))
        window = max(o.window, 3 * self.in_flight * len(pipe.workers))  # every worker busy, and as much again queued
        self.window = window
        self.keep_limit = max(1, window // 4)  # slots the training loop may hold views of
        pipe.collect_released()  # the new reader process starts from the slots free now
        cfg = VentilatorConfig(
            reader, reader_type, pipe.ins, list(feeds), task_rows, self.in_flight, o.task_bytes,
            window, window + self.keep_limit, sorted(pipe.taken_slots), o.max_inflight_bytes,
            epoch, [p.endpoint for p in pipe.workers.values()],
            [p.endpoint for p in pipe.workers.values() if p.up and pipe.settled], ctl_endpoint, pipe.slots_folder,
            os.getpid(),
        )
        pipe.settled = False
        pipe.pool.unannounced.clear()
        self.buffer: ReorderBuffer[wire.Message] = ReorderBuffer()
        self.total: int | None = None
        self.retries: Counter[int] = Counter()
        self.parked: set[int] = set()
        self.last_progress = time.monotonic()
        self.down_since: float | None = None
        self.credited = -1  # the last task the ventilator was told was consumed
        self.highest_seen = -1  # the highest task id any worker reported on
        self.blocked: tuple[int, float] | None = None  # (next task, since when later tasks are done)
        self.supervised_at = 0.0
        self.reader_exit: str | None = None  # how the reader process ended, once it has
        self.reader_pid = self._fork_reader(cfg)
        self.poller = zmq.Poller()
        self.poller.register(pipe.sink, zmq.POLLIN)
        self.poller.register(self.ctl, zmq.POLLIN)

    def _fork_reader(self, cfg: VentilatorConfig) -> int:
        pid = os.fork()
        if pid == 0:  # the child: the user's reader and the ventilator, nothing else
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            run_reader_process(cfg)
        self.pipe.reader_pids.add(pid)
        return pid

    def outputs(self) -> Iterator[Any]:
        while self.total is None or self.buffer.next_id < self.total:
            msg = self.buffer.pop_next()
            if msg is None:
                self._pump()
                continue
            shared = self.pipe.lend(msg.header["shm"], self.keep_limit)
            slots = [shared[n] for n in self.pipe.ins]
            self.pipe.row_bytes = sum(a.nbytes for a in slots) // max(1, len(slots[0]))
            del shared
            preds = [msg.arrays[predict_key(n)] for n in self.pipe.predicts]
            yield from split_output(self.reader_type, slots, preds, msg.header.get("sizes"))
            self.pipe.stats["tasks"] += 1
            self.pipe.stats["samples"] += len(slots[0])
            self.last_progress = time.monotonic()
            self._credit_ventilator(waiting=False)
        self.pipe.settled = True

    def stop(self) -> None:
        self.pipe.stats["duplicates"] += self.buffer.duplicates
        try:
            wire.send(self.ctl, {"kind": "stop"}, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        # Tearing down a big forked process takes milliseconds: the training loop does
        # not wait for it.  The next epoch, or close(), reaps what is left.
        for pid in list(self.pipe.reader_pids):
            if _kill_reader(pid, wait=False):
                self.pipe.reader_pids.discard(pid)
        self.ctl.close(linger=0)

    # -- receiving ------------------------------------------------------------

    def _credit_ventilator(self, waiting: bool) -> None:
        """Tell the ventilator what was consumed and which slots are free again: every
        few tasks, and always before waiting.

        Each message wakes two processes; a quarter of the window late is still early.
        """
        upto = self.buffer.next_id - 1
        due = waiting or upto - self.credited >= max(1, self.window // 4)
        if due and (upto > self.credited or self.pipe.released):
            self._tell({"kind": "consumed", "upto": upto, "slots": self.pipe.collect_released()})
            self.credited = upto

    def _tell(self, header: dict[str, Any]) -> None:
        """A message to the reader process, waiting for room only while that process lives.

        A blocking send to a reader process that died (the OOM killer's favourite: it
        holds the dataset) would wait for ever; so the send never blocks, and while the
        socket has no room the reader process is checked every 100 ms.
        """
        while True:
            try:
                wire.send(self.ctl, header, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                self._check_reader()
                self.ctl.poll(100, zmq.POLLOUT)

    def _pump(self) -> None:
        self._credit_ventilator(waiting=True)
        started = time.monotonic()
        events = dict(self.poller.poll(100))
        if self.pipe.sink in events:
            while self.pipe.sink.poll(0):
                self._on_result(wire.decode(self.pipe.sink.recv_multipart(copy=False)))
        if self.ctl in events:
            while self.ctl.poll(0):
                self._on_control(wire.decode(self.ctl.recv_multipart(copy=False)))
        if started - self.supervised_at >= _SUPERVISE_EVERY:
            self.supervised_at = started
            self._supervise()
        self.pipe.stats["buffered"] = len(self.buffer)
        self.pipe.stats["in_flight"] = max(0, self.highest_seen + 1 - self.buffer.next_id)
        self.pipe.wait_seconds += time.monotonic() - started

    def _teacher(self, header: dict[str, Any]) -> TeacherStats:
        name = str(header.get("worker"))
        return self.pipe.teacher_stats.setdefault(name, TeacherStats())

    def _on_result(self, msg: wire.Message) -> None:
        if msg.kind == "status":
            self._on_status(msg.header)
            return
        if msg.header.get("epoch") != self.epoch:
            return  # a late answer from an earlier epoch
        task = int(msg.header["task"])
        self.highest_seen = max(self.highest_seen, task)
        if msg.kind == "done":
            stats = self._teacher(msg.header)
            rows = len(next(iter(msg.arrays.values()), ()))
            stats.tasks += 1
            stats.samples += rows
            stats.first_task_at = stats.first_task_at or time.monotonic()
            if self.buffer.add(task, msg):
                self.pipe.task_sizes.append(rows)
                self.pipe.task_times.append(float(msg.header.get("elapsed", 0.0)))
                self.pipe.row_service.append(float(msg.header.get("service", 0.0)) / max(1, rows))
            self.last_progress = time.monotonic()
        elif msg.kind == "returned":
            self._teacher(msg.header).returned += 1
            self.pipe.stats["returned"] += 1
            self.parked.add(task)
        elif msg.kind == "failed":
            self._teacher(msg.header).failed += 1
            self._on_failed(task, msg.header)

    def _on_failed(self, task: int, header: dict[str, Any]) -> None:
        code, message = str(header.get("code")), str(header.get("message"))
        self.retries[task] += 1
        self.pipe.stats["failed"] += 1
        if code in FATAL_CODES or self.retries[task] > self.pipe.options.max_retries:
            raise TeacherError(f"task {task} failed {self.retries[task]} time(s); last error: {message}", code)
        log.warning("task %d failed (%s), sending it again: %s", task, code, message)
        self._resend([task])

    def _on_status(self, header: dict[str, Any]) -> None:
        proc = self.pipe.pool.by_pid(header.get("pid"))
        if proc is None:
            return  # a retired worker's last words
        proc.started = True
        if header.get("started"):
            return  # its first word: it runs, and knows nothing of its teacher yet
        proc.up = bool(header.get("up"))
        proc.unusable = str(header.get("unusable") or "")
        proc.max_batch_size = _int(header.get("max_batch_size"), proc.max_batch_size)
        proc.instances = max(1, _int(header.get("instances"), proc.instances))
        stats = self._teacher(header)
        stats.up, stats.changed_at, stats.reason = proc.up, time.monotonic(), str(header.get("reason") or "")
        if not proc.up and stats.reason:
            log.warning("teacher %s unavailable: %s", proc.teacher, stats.reason)

    def _on_control(self, msg: wire.Message) -> None:
        if msg.kind == "end":
            self.total = int(msg.header["tasks"])
        elif msg.kind == "error":
            raise rebuild_exception(msg.header)

    # -- supervising ------------------------------------------------------------

    def _resend(self, tasks: list[int]) -> None:
        self.pipe.stats["resent"] += len(tasks)
        self._tell({"kind": "resend", "tasks": tasks})

    def _resend_missing(self) -> None:
        self.pipe.stats["resend_all"] += 1
        self._tell({"kind": "resend_all", "except": self.buffer.held_ids()})

    def _supervise(self) -> None:
        now = time.monotonic()
        if self.pipe.membership is not None:
            teachers = self.pipe.membership()
            if teachers is not None:
                log.info("teachers now: %s", ", ".join(teachers) or "none")
                self.pipe.set_teachers(teachers)
        self._chase_straggler(now)
        pool = self.pipe.pool
        if pool.reap(now):
            self._resend_missing()
        self.pipe.stats["workers_restarted"] = pool.restarted
        if pool.unannounced:
            self._tell({"kind": "connect", "endpoints": pool.unannounced})
            pool.unannounced.clear()
        self._check_teachers(now)
        self._check_reader()
        if now - self.last_progress > self.pipe.options.stall_timeout:
            log.warning("no task finished for %.0f s; sending the missing ones again", now - self.last_progress)
            self.last_progress = now
            self._resend_missing()

    def _check_teachers(self, now: float) -> None:
        """Resend parked tasks while a teacher is up; fail when none can be, or none came back in time.

        Teachers that answer but take other inputs than this reader's (another model
        deployed at the address) cannot come back by waiting: when every teacher is
        such a one, the epoch fails at once, naming them and why.
        """
        workers = list(self.pipe.workers.values())
        if any(p.up for p in workers):
            self.down_since = None
            if self.parked:
                self._resend(sorted(self.parked))
                self.parked.clear()
            return
        if workers and all(p.unusable for p in workers):
            reasons = "; ".join(f"{p.teacher}: {p.unusable}" for p in workers)
            raise ConfigError(f"no teacher can take this reader's inputs ({reasons})")
        self.down_since = self.down_since or now
        if now - self.down_since > self.pipe.options.teacher_wait:
            why = {p.teacher: self.pipe.teacher_stats.get(p.teacher, TeacherStats()).reason for p in workers}
            names = ", ".join(f"{t} ({r})" if r else t for t, r in why.items()) or "none"
            raise TeacherTimeout(f"no teacher answered for {self.pipe.options.teacher_wait:.0f} s (teachers: {names})")

    def _chase_straggler(self, now: float) -> None:
        """Send the next task again when later ones finished long before it (first answer wins)."""
        if not len(self.buffer):
            self.blocked = None
            return
        if self.blocked is None or self.blocked[0] != self.buffer.next_id:
            self.blocked = (self.buffer.next_id, now)
        typical = statistics.median(self.pipe.task_times) if self.pipe.task_times else 0.0
        limit = max(self.pipe.options.straggler_min, self.pipe.options.straggler_factor * typical)
        if now - self.blocked[1] > limit:
            self.pipe.stats["straggler_resends"] += 1
            self._resend([self.buffer.next_id])
            self.blocked = (self.buffer.next_id, now)

    def _check_reader(self) -> None:
        """Raise if the reader process ended before the epoch can (its last words first).

        The reader process holds every task not yet consumed: once it is gone, a task
        whose teacher fails can never be sent again, so the epoch ends here, with how the
        process ended (the OOM killer's SIGKILL is the usual one).
        """
        if self.reader_exit is None:
            try:
                pid, status = os.waitpid(self.reader_pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.reader_pid, 0
            if pid == 0:
                return
            self.pipe.reader_pids.discard(self.reader_pid)
            self.reader_exit = describe_exit(status)
        if self._can_finish():
            return
        while self.ctl.poll(200):  # its last words (end or error) may still be in transit
            self._on_control(wire.decode(self.ctl.recv_multipart(copy=False)))
        if not self._can_finish():
            raise ReaderError(
                f"the reader process (pid {self.reader_pid}) {self.reader_exit} before the end of the epoch; "
                "if the machine ran out of memory, the kernel's log (dmesg) names it"
            )

    def _can_finish(self) -> bool:
        """Every task still to be yielded has arrived (nothing more is needed from the reader process)."""
        if self.total is None:
            return False
        held = set(self.buffer.held_ids())
        return all(t in held for t in range(self.buffer.next_id, self.total))


def _int(value: Any, default: int) -> int:
    return value if type(value) is int else default
