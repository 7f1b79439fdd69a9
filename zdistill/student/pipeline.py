"""The student side of a DistillReader: the processes and threads of one reader, and its epochs.

A :class:`Pipeline` is the facade :class:`~zdistill.reader.DistillReader` drives.  It
owns a private ZeroMQ context, a folder of ipc endpoints, the folder of shared-memory
task slots, and the :class:`~zdistill.student.dispatcher.Dispatcher` thread, which owns
everything else (workers, tasks in flight, credit, slots: see ``docs/dataplane.md``).
:meth:`Pipeline.epoch` forks the epoch's producer (:mod:`zdistill.student.producer`) and
yields EDL's output through an :class:`EpochSink`, the training loop's side of the epoch:
it puts finished tasks back in the reader's order, lends the loop their slot arrays and
cuts them back into the reader's batches; everything else (resends, duplicates, slots,
workers) is the dispatcher's.

Cleanup does not depend on the caller: :func:`weakref.finalize` stops every process
by PID on :meth:`close`, on garbage collection, at interpreter exit and on SIGTERM, in
the process that made the pipeline only (a child it forked inherits the finalizer and
must leave its parent's processes and folders alone).  :meth:`close` may come from any
thread: a training loop waiting on an epoch raises :class:`~zdistill.errors.ClosedError`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import zmq

from zdistill.errors import ClosedError
from zdistill.fingerprint import usable
from zdistill.spec import TeacherMeta, TensorSpec
from zdistill.student import dispatcher as d
from zdistill.student import protocol
from zdistill.student.batches import CacheSlots, ReaderType, predict_key, slot_forms, slot_tensors, split_output
from zdistill.student.cache import CacheIndex, cacheable, default_max_bytes, evict, namespace_for, stored_bytes
from zdistill.student.options import PipelineOptions
from zdistill.student.producer import ProducerConfig, run_producer
from zdistill.student.shm import PrivateFolder, SlotReader, make_private_folder, make_slot_folder

log = logging.getLogger(__name__)

_PLAN_WAIT = 30.0  # seconds the training loop waits for the dispatcher to plan an epoch
_CLOSED_CHECK = 0.1  # seconds between a waiting loop's looks at whether the reader was closed
_STORED_BYTES_EVERY = 5.0  # seconds between walks of the cache folder for stats()' bytes_stored
_COUNTERS = ("tasks", "samples", "resent", "returned", "failed", "timed_out", "straggler_resends",
             "duplicates_dropped")  # of Scheduler.counters, as stats() names them
T = TypeVar("T")


def _shutdown(dispatcher: d.Dispatcher, folders: list[PrivateFolder], ctx: zmq.Context, owner: int) -> None:
    """Stop the dispatcher (it stops every process by PID) and remove the folders; safe twice and at exit.
    Only in the ``owner`` process: in a child forked from it (``os.fork``, a multiprocessing helper) they
    are its parent's, still in use."""
    _live.pop(id(dispatcher), None)
    if os.getpid() != owner:
        return
    dispatcher.close()
    ctx.destroy(linger=0)
    for folder in folders:
        folder.remove()


# Every open pipeline's clean-up, by id of its dispatcher, for the SIGTERM handler below.
_live: dict[int, Callable[[], None]] = {}
_sigterm_installed = False
_sigterm_before: Any = None  # the handler _on_sigterm replaced


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM: the handler that was there before decides, but its default (dying) first
    removes every pipeline's processes, shared memory and endpoints.

    A handler of the user's own runs as before (if it ends the program, the finalizers
    clean up at exit).  Without a Python handler (the default, or one set in C, as Paddle
    does) the process would die with the folders left behind, so they are removed first.
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
    """Install :func:`_on_sigterm` once, from the main thread: the only one that may set signal handlers."""
    global _sigterm_installed, _sigterm_before
    if not _sigterm_installed and threading.current_thread() is threading.main_thread():
        _sigterm_before = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


class Pipeline:
    """Owns the folders, the context and the dispatcher of one DistillReader (see the module docstring)."""

    def __init__(self, ins: Sequence[str], predicts: Sequence[str], options: PipelineOptions) -> None:
        self.ins, self.predicts, self.options = list(ins), list(predicts), options
        self.ctx = zmq.Context()
        ipc = make_private_folder("ipc")  # ipc endpoints (mode 0700)
        slots = make_slot_folder(options.max_inflight_bytes)  # kept across epochs (zdistill.student.shm)
        self.folder, self.slots_folder = ipc.path, slots.path
        self.feeds: list[TensorSpec] = []  # what the teachers take: workers check each teacher against it
        self.fetches: list[TensorSpec] = []  # the predictions as the teachers give them: ...and against it
        self.cache: CacheIndex | None = None  # the teacher-output cache, if the reader has one (use_cache)
        self.cache_root, self.cache_max_bytes, self.cache_tolerance = "", 0, 0.0
        self._stored_bytes = (-_STORED_BYTES_EVERY, 0)  # (when, bytes): the cache folder's size, walked now and then
        self.dispatcher = d.Dispatcher(self.ctx, self.folder, options, self._worker_command)
        self.slot_reader = SlotReader(self.slots_folder)
        self.lent: set[int] = set()  # slots whose views the loop may still hold, across epochs (EpochSink._lend)
        self.epochs = 0
        self.wait_seconds = 0.0  # time the training loop spent waiting for data
        self.busy_seconds = 0.0  # time inside epochs, for samples/s
        self._epoch_started: float | None = None
        self._sink: EpochSink | None = None  # the epoch running
        self._finalizer = weakref.finalize(self, _shutdown, self.dispatcher, [ipc, slots], self.ctx, os.getpid())
        _live[id(self.dispatcher)] = self._finalizer
        _clean_up_on_sigterm()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop every process and remove the folders; from any thread (see :meth:`_check_open`)."""
        self._finalizer()
        if self.cache is not None:
            self.cache.close()

    def _check_open(self) -> None:
        """Raise :class:`ClosedError` once :meth:`close` began: the training loop checks while it waits."""
        if self.closed:
            raise ClosedError("the DistillReader was closed (close() was called, from another thread or a "
                              "finalizer) while this epoch ran")

    def set_teachers(self, teachers: Iterable[str],
                     membership: Callable[[], list[str] | None] | None = None) -> None:
        """Workers for these teachers (and, for dynamic teachers, where to hear of changes)."""
        self.dispatcher.set_teachers(list(teachers), membership)

    def use_cache(self, root: str, meta: TeacherMeta, max_bytes: int | None, tolerance: float) -> None:
        """Answer rows from the teacher-output cache under ``root``, keyed by the model ``meta``
        names and by its fingerprint (:mod:`zdistill.fingerprint`), which every teacher must
        reproduce within ``tolerance``.  Where the cache cannot be used (no ``model_id`` or
        fingerprint, a teacher that does not reproduce its own answers, outputs
        :func:`cache.cacheable` refuses, a folder that cannot be made), that is logged once and
        the reader runs without.
        """
        fetches = meta.fetches_named(self.predicts)  # the reader checked they are all there
        fp, why = usable(meta.fingerprint, self.predicts, "the teacher", tolerance)
        why = cacheable(fetches, meta.feeds) or why
        if not meta.model_id:
            why = "the teacher's meta has no model_id (a zdistill-teacher older than the cache?)"
        if why or fp is None:
            log.warning("the teacher-output cache at %s is not used: %s", root, why)
            return
        try:  # a cache that cannot be written (a read-only file system) is not used
            os.makedirs(root, mode=0o700, exist_ok=True)
            cache_root = os.path.abspath(root)
            limit = max_bytes if max_bytes is not None else default_max_bytes(cache_root)
            evict(cache_root, limit)
            cache = CacheIndex(namespace_for(cache_root, meta.model_id, fetches, fp, tolerance), fetches)
        except OSError as exc:
            log.warning("the teacher-output cache at %s is not used: %s", root, exc)
            return
        self.cache, self.cache_root, self.cache_max_bytes, self.cache_tolerance = cache, cache_root, limit, tolerance

    def _worker_command(self, teacher: str, identity: bytes) -> list[str]:
        o = self.options
        cache = [] if self.cache is None else [
            "--cache-root", self.cache_root, "--cache-folder", self.cache.folder,
            "--cache-max-bytes", str(self.cache_max_bytes), "--cache-tolerance", repr(self.cache_tolerance),
        ]
        return [
            sys.executable, "-m", "zdistill.student.worker", "--teacher", teacher,
            "--dispatcher", self.dispatcher.endpoint, "--identity", identity.decode(), "--slots", self.slots_folder,
            "--predicts", ",".join(self.predicts), "--feeds", json.dumps([f.to_wire() for f in self.feeds]),
            "--fetches", json.dumps([f.to_wire() for f in self.fetches]),
            "--request-rows", str(o.request_rows), "--timeout", str(o.request_timeout),
            "--share-weight", repr(o.share_weight), "--parent-pid", str(os.getpid()),
            "--log-level", logging.getLevelName(max(logging.getLogger("zdistill").getEffectiveLevel(), logging.INFO)),
            *cache,
        ]

    def snapshot(self) -> dict[str, Any]:
        """What :meth:`DistillReader.stats` reports: throughput, waits, resends, per teacher."""
        now = time.monotonic()
        busy = self.busy_seconds + (now - self._epoch_started if self._epoch_started else 0.0)
        # The cache folder's size, walked outside the lock and at most every few seconds: stats() may be
        # called every step, and the folder may hold millions of rows (other readers add to it too).
        if self.cache_root and now - self._stored_bytes[0] >= _STORED_BYTES_EVERY:
            self._stored_bytes = (now, stored_bytes(self.cache_root))
        sink = self._sink
        with self.dispatcher.lock:  # the dispatcher thread's state, read while it waits
            sched, pool, c = self.dispatcher.sched, self.dispatcher.pool, self.dispatcher.sched.counters
            task_rows, in_flight = sched.plan(len(sched.workers))
            return {
                **{name: getattr(c, name) for name in _COUNTERS},
                "workers_restarted": pool.restarted,
                "samples_per_s": c.samples / busy if busy else 0.0,
                "wait_s": self.wait_seconds + (sink.wait_seconds if sink else 0.0),
                "task_rows": task_rows,  # rows per task of the next epoch (see Scheduler.plan)
                "in_flight": in_flight,  # tasks per worker of the next epoch
                "tasks_in_flight": len(sched.pending),  # built, not yet answered
                "tasks_buffered": len(sink.buffer) if sink else 0,  # answered, waiting for an earlier one
                "reader_pid": self.dispatcher.producer_pid,  # the producer of the epoch running, if any
                "workers": {p.teacher: p.popen.pid for p in pool.workers.values()},  # teacher -> PID
                "workers_spawned": pool.spawned,
                "folders": [self.folder, self.slots_folder],
                # the teacher-output cache: rows answered from it, rows asked, bytes on disk
                "cache": {"hits": c.cache_hits, "misses": c.cache_misses, "bytes_stored": self._stored_bytes[1],
                          "enabled": self.cache is not None and self.dispatcher.cache_ok},
                "teachers": {
                    name: {
                        "up": t.up, "in_use": name in pool.workers, "tasks": t.tasks, "samples": t.samples,
                        "samples_per_s": t.samples / busy if busy else 0.0,
                        "failed": t.failed, "timed_out": t.timed_out, "returned": t.returned, "reason": t.reason,
                        "state_age_s": now - t.changed_at if t.changed_at else None,
                        "first_task_at": t.first_task_at or None, "changed_at": t.changed_at or None,
                    }
                    for name, t in sched.teachers.items()
                },
            }

    def epoch(self, reader: Callable[[], Iterable[Any]], reader_type: ReaderType) -> Iterator[Any]:
        """Run the reader once through the teachers and yield EDL's output, in order."""
        self._check_open()
        self.epochs += 1
        epoch = self.epochs
        sink = EpochSink(self, epoch, reader_type)
        # From the begin on, every way out stops the epoch: one begun and never stopped (a Ctrl-C
        # while it starts) would keep its grants and its producer, and the next epoch wait for ever.
        try:
            self.dispatcher.begin(epoch)
            planned = sink.planned()
            cache = self.cache if planned.cache else None
            if cache is not None:
                cache.refresh()  # what the workers stored so far: the producer inherits it across the fork
            cfg = ProducerConfig(
                cache=cache, cache_feeds=[f.name for f in self.feeds if f.name in self.ins],
                cache_gate=self.dispatcher.gate, parent_pid=os.getpid(),
                reader=reader, reader_type=reader_type, ins=self.ins, feeds=self.feeds, epoch=epoch,
                task_rows=planned.plan.task_rows, task_bytes=self.options.task_bytes, endpoint=planned.endpoint,
                slots_folder=self.slots_folder, slot_count=planned.slot_count, grants=planned.grants,
            )
            with self.dispatcher.lock:  # no lock of the dispatcher thread is inherited held, and no close() missed
                pid = os.fork()
                if pid != 0:
                    self.dispatcher.started(pid)
            if pid == 0:
                run_producer(cfg)
            self._check_open()
            self._epoch_started, self._sink = time.monotonic(), sink
            yield from sink.outputs()
        finally:
            self.dispatcher.stop(epoch, frozenset(self.lent))
            if self._epoch_started is not None:
                self.busy_seconds += time.monotonic() - self._epoch_started
            self.wait_seconds += sink.wait_seconds
            self._epoch_started = self._sink = None


class ReorderBuffer(Generic[T]):
    """Holds finished tasks of one epoch until every earlier task has been yielded."""

    def __init__(self) -> None:
        self._held: dict[int, T] = {}
        self.next_id = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, task_id: int, value: T) -> None:
        if task_id >= self.next_id:
            self._held[task_id] = value

    def pop_next(self) -> T | None:
        """The next task in order, or None if it has not finished yet."""
        value = self._held.pop(self.next_id, None)
        if value is not None:
            self.next_id += 1
        return value


class EpochSink:
    """One epoch's outputs, in order, from the dispatcher's events (the sink of ``docs/dataplane.md``)."""

    def __init__(self, pipeline: Pipeline, epoch: int, reader_type: ReaderType) -> None:
        self.pipeline, self.epoch, self.reader_type = pipeline, epoch, reader_type
        self.events, self.check_open = pipeline.dispatcher.events, pipeline._check_open
        self.plan: d.Planned | None = None
        self.keep_limit = 0  # slots the loop may hold views of (the plan's)
        self.gate = pipeline.dispatcher.gate  # closed: the cache's answers are no longer trusted
        self.buffer: ReorderBuffer[d.Answered] = ReorderBuffer()
        self.total: int | None = None  # the epoch's tasks, once every one is answered
        self.wait_seconds = 0.0  # time the training loop spent waiting for data

    def planned(self) -> d.Planned:
        """The dispatcher's plan of the epoch, once :meth:`Dispatcher.begin` made it."""
        deadline = time.monotonic() + _PLAN_WAIT
        while self.plan is None:
            self.check_open()
            if time.monotonic() >= deadline:
                raise RuntimeError("the DistillReader's dispatcher thread does not answer")
            self._wait()
        self.keep_limit, self.wait_seconds = self.plan.plan.keep_limit, 0.0  # only the waits for data count
        return self.plan

    def outputs(self) -> Iterator[Any]:
        while self.total is None or self.buffer.next_id < self.total:
            self.check_open()  # at least every 0.1 s while it waits: nothing comes once it is closed
            result = self.buffer.pop_next()
            if result is None:
                self._wait()
                continue
            yield from self._task_outputs(self._trusted(result))

    def _task_outputs(self, result: d.Answered) -> Iterator[Any]:
        """One task's reader batches with their predictions.  A task with cached rows keeps its slot
        until its last batch is yielded: should the gate close meanwhile, the batches not yet yielded
        get a teacher's answers instead (:meth:`_trusted`), and the teacher reads the rows from the slot.
        """
        p, cached = self.pipeline, bool(result.cached)
        shared = self._lend(result.task, hold=cached)
        slots = list(slot_tensors(shared, p.ins).values())
        forms = [slot_forms(shared, n) for n in p.ins]
        if isinstance(result, d.CachedAnswer):
            answers = CacheSlots.of(shared).answers
            preds = [answers[n] for n in p.predicts]
        else:
            preds = [result.arrays[predict_key(n)] for n in p.predicts]
        del shared
        if not cached:
            yield from split_output(self.reader_type, slots, preds, result.task.sizes, forms)
            return
        yielded = 0
        try:
            while True:
                for batch in itertools.islice(split_output(self.reader_type, slots, preds, result.task.sizes, forms),
                                              yielded, None):
                    if result.cached and self.gate.closed:
                        break
                    yield batch
                    yielded += 1
                else:
                    return
                result = self._trusted(result)
                assert isinstance(result, d.Answer)  # a task asked again is answered by a teacher
                preds = [result.arrays[predict_key(n)] for n in p.predicts]
        finally:  # a copy held for a teacher is let go of now; views, once the loop drops them
            if result.task.slot not in p.lent:
                p.dispatcher.release(result.task.slot)

    def _lend(self, task: protocol.Task, hold: bool) -> dict[str, np.ndarray]:
        """The task's slot arrays: views, or copies past ``keep_limit`` slots lent.  Views cost nothing,
        but their slot stays taken while the loop holds them, and a loop that keeps everything
        (``list(dr())``) would take every slot; a copied task's slot is free at once, unless ``hold``
        (a teacher may have to read it again)."""
        p = self.pipeline
        slot, arrays, mapping = p.slot_reader.view(task.shm)
        if len(p.lent) < self.keep_limit:
            p.lent.add(slot)
            p.dispatcher.lend(slot)  # before the finalizer can post its release
            weakref.finalize(mapping, _returned, p.lent, p.dispatcher.release, slot)
            return arrays
        copies = {name: np.array(arr) for name, arr in arrays.items()}
        del arrays
        mapping.close()
        if not hold:
            p.dispatcher.release(slot)
        return copies

    def _trusted(self, result: d.Answered) -> d.Answered:
        """``result``, or, if it holds cached rows no longer trusted, a teacher's answer of the task."""
        while result.cached and self.gate.closed:
            self.buffer.next_id = result.task.task_id  # wait for another answer of it
            self.pipeline.dispatcher.redo(result.task)
            while (again := self.buffer.pop_next()) is None:
                self.check_open()
                self._wait()
            result = again
        return result

    def _wait(self) -> None:
        started = time.monotonic()
        try:
            event = self.events.get(timeout=_CLOSED_CHECK)
        except queue.Empty:
            return
        finally:
            self.wait_seconds += time.monotonic() - started
        while True:
            if event.epoch == self.epoch:  # else a late word of an epoch that ended
                if isinstance(event, d.Answered):
                    self.buffer.add(event.task.task_id, event)
                elif isinstance(event, d.Planned):
                    self.plan = event
                elif isinstance(event, d.AllAnswered):
                    self.total = event.tasks
                elif isinstance(event, d.Failed):
                    raise event.error
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return


def _returned(lent: set[int], release: Callable[[int], None], slot: int) -> None:
    """The finalizer of a lent slot's mapping (any thread): the loop let go of the slot."""
    lent.discard(slot)
    release(slot)
