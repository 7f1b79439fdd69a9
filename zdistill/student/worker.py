"""A reader worker: one process, one teacher connection, several requests in flight.

Started by the student's dispatcher (``python -m zdistill.student.worker``), never forked, so
it carries none of the student's state.  For its whole life it talks to one peer,
the dispatcher (a DEALER connected to its ROUTER, under an identity the dispatcher
gave it): it says ``hello``, then takes ``task`` messages, sends the feed slots
straight from shared memory to its teacher in requests of at most ``--request-rows``
rows, and answers each task with ``done`` (the predictions; the slots stay in shared
memory) or ``undone``.  It keeps no credit: the dispatcher counts what it holds.

Health is judged in-band: a dropped TCP connection (socket monitor) or a request
past its timeout marks the teacher *down*; the worker then hands back every task it
holds (``undone`` with code ``returned``: sent elsewhere without counting a retry)
and probes the teacher with ``meta`` until it answers again.  The dispatcher hears a
``status`` on each change.  Requests the teacher refuses come back as ``undone`` with
the teacher's error code, for the dispatcher to retry or give up on.  A ``busy`` answer
is retried here, after a growing pause, but only while the task is younger than the
request timeout: past it the dispatcher counts the try as failed anyway, so the task
comes back as ``undone`` ``busy`` and this worker holds nothing for ever.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np
import zmq

from zdistill.client import Completion
from zdistill.errors import ConfigError, ErrorCode, TeacherError, TeacherTimeout, WireError
from zdistill.fingerprint import distance, rows_apart, usable
from zdistill.flags import add_log_level, setup_logging
from zdistill.spec import TeacherMeta, Tensor, Tensors, TensorSpec
from zdistill.student import protocol
from zdistill.student.batches import (
    CacheSlots,
    answer_problem,
    check_feed,
    copy_tensor,
    empty_output,
    feeds_mismatch,
    join,
    place,
    predict_key,
    row_shape,
    select,
    slot_tensors,
    to_feed,
)
from zdistill.student.cache import CacheWriter, folder_for, read_fingerprint
from zdistill.student.children import ParentGone, send_while_parent_lives
from zdistill.student.shm import SlotReader, reclaim
from zdistill.triton_client import connect_teacher

log = logging.getLogger("zdistill.student.worker")  # not __name__: it runs as __main__

_PROBE_EVERY = 0.25
_PROBE_UNUSABLE = 2.0  # a teacher that takes other inputs is asked again this rarely (it may be redeployed)
_BUSY_FIRST = 0.02  # a request the teacher was too busy for is sent again after this...
_BUSY_MAX = 1.0  # ...doubling up to this, while the task is younger than the request timeout
_RECLAIM_WAIT = 5.0  # how long a worker of a dead student waits for the student's folders to be unlocked


@dataclass(kw_only=True)
class WorkerConfig:
    """What a worker is told on its command line."""

    teacher: str
    dispatcher: str  # the dispatcher's endpoint
    identity: bytes
    slots: str  # folder of the shared-memory task slots
    predicts: list[str]
    feeds: list[TensorSpec]  # what this reader's tasks are built for
    request_rows: int
    timeout: float
    parent_pid: int
    share_weight: float = 1.0  # this student's share of the teacher (PipelineOptions.share_weight)
    cache_root: str = ""  # the reader's teacher-output cache ("": none)
    cache_folder: str = ""  # where its answers go: the teacher's must be the same to write there
    cache_max_bytes: int = 0
    cache_tolerance: float = 0.0  # how far a teacher's fingerprint may be from the cache folder's

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerConfig:
        return cls(
            teacher=args.teacher, dispatcher=args.dispatcher, identity=args.identity.encode(), slots=args.slots,
            predicts=args.predicts.split(","), feeds=[TensorSpec.from_wire(f) for f in json.loads(args.feeds)],
            request_rows=args.request_rows, timeout=args.timeout, parent_pid=args.parent_pid,
            cache_root=args.cache_root, cache_folder=args.cache_folder, cache_max_bytes=args.cache_max_bytes,
            cache_tolerance=args.cache_tolerance, share_weight=args.share_weight,
        )


@dataclass
class Job:
    """A task in progress: its message and the parts its teacher requests answered."""

    task: protocol.Task
    chunks: list[Tensors]  # the feeds of each teacher request (views of shared memory)
    parts: list[Tensors | None]
    pending: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    busy: int = 0  # "busy" answers so far: the back-off before the next try grows with them
    slots: dict[str, np.ndarray] = field(default_factory=dict)  # the task's slot arrays (shared memory)
    misses: np.ndarray | None = None  # with the cache: the rows it did not answer, sent to the teacher


class Worker:
    """Owns the teacher client, the jobs in progress and the socket to the dispatcher."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, cfg.identity)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(cfg.dispatcher)
        self.client = connect_teacher(cfg.teacher, self.ctx, timeout=cfg.timeout, watch=True, weight=cfg.share_weight,
                                      outputs=cfg.predicts)
        self.slots = SlotReader(cfg.slots)
        self.feeds: list[TensorSpec] = []  # what the teacher takes, from its meta
        self.no_rows: Tensors = {}  # the answer to a task of no rows: its outputs, empty
        self.request_rows = cfg.request_rows
        self.up = False
        self.probe: int | None = None
        self.next_probe = 0.0
        self.jobs: dict[tuple[int, int], Job] = {}
        self.requests: dict[int, tuple[tuple[int, int], int]] = {}  # request id -> (job key, part)
        self.retries: list[tuple[float, tuple[int, int], int]] = []  # heap: (when, job key, part) the teacher was busy
        self.stopping = False
        self.said_stop = False
        self.last_finish = 0.0  # when the last task was done
        self.cache: CacheWriter | None = None  # where answers go, while the teacher's model is the cache's
        self.status = protocol.Status(up=False)  # the last said while up
        self.cache_failed = ""  # why the cache cannot be written (a write failed): it never is again
        self.audit_failed = ""  # why the teacher's answers are not the cache's, found by an audit

    # -- main loop ----------------------------------------------------------

    def run(self) -> None:
        poller, polled = zmq.Poller(), None
        self._send(protocol.Hello(pid=os.getpid()))
        while not (self.stopping and not self.jobs):
            if os.getppid() != self.cfg.parent_pid:
                log.info("student process is gone; worker for %s exits", self.cfg.teacher)
                return
            if self.stopping and not self.said_stop:
                self._send(protocol.Status(up=False, reason="its teacher left this reader's list"))
                self.said_stop = True
            if not self.up and self.probe is None and time.monotonic() >= self.next_probe:
                try:
                    self.probe = self.client.submit("meta", timeout=1.0)
                except TeacherTimeout:
                    self._teacher_down("the teacher cannot be reached")
            if polled is not self.client.socket:  # a new poller only when the client reconnected
                polled, poller = self.client.socket, zmq.Poller()
                for sock in (self.client.socket, self.sock, self.client.monitor):
                    if sock is not None:
                        poller.register(sock, zmq.POLLIN)
            deadline = self.client.next_deadline()
            if self.retries:
                deadline = min(deadline or self.retries[0][0], self.retries[0][0])
            wait = 0.1 if deadline is None else min(0.1, max(0.0, deadline - time.monotonic()))
            events = dict(poller.poll(wait * 1000))
            if self.client.monitor in events and self.client.disconnected():
                self._teacher_down("the connection to the teacher dropped")
                continue
            if self.sock in events:
                while self.sock.poll(0):
                    self._on_task(self.sock.recv_multipart(copy=False))
            if self.client.socket in events or (deadline is not None and time.monotonic() >= deadline):
                for completion in self.client.collect(0):
                    self._on_completion(completion)
            while self.retries and self.retries[0][0] <= time.monotonic():
                _, key, part = heapq.heappop(self.retries)
                if key in self.jobs and not self._submit(key, part):
                    break

    # -- tasks -----------------------------------------------------------------

    def _on_task(self, frames: list[zmq.Frame]) -> None:
        try:
            task, _ = protocol.decode(frames)
        except WireError as exc:
            log.warning("dropping a malformed message from the dispatcher: %s", exc)
            return
        if not isinstance(task, protocol.Task):
            return
        if not self.up or self.stopping:
            self._hand_back(task)
            return
        if not task.rows:  # only empty reader batches: empty predictions, without asking the teacher
            self._send(protocol.Done(epoch=task.epoch, task_id=task.task_id, elapsed=0.0, service=0.0), self.no_rows)
            return
        key = (task.epoch, task.task_id)
        try:
            slots = self.slots.read(task.shm)
            tensors = slot_tensors(slots, self._fed(slots))  # lengths that do not add up: a slot reused since
        except (WireError, ConfigError) as exc:  # a task of an epoch that ended: nobody waits for it any more
            log.debug("dropping task %s: %s", key, exc)
            self._send(protocol.Undone(epoch=task.epoch, task_id=task.task_id, code=protocol.RETURNED,
                                       message=str(exc)))
            return
        try:
            for spec in self.feeds:
                self._check_feed(tensors, spec)
        except ConfigError as exc:  # the teacher was redeployed with other inputs since its meta said
            self._hand_back(task)
            self._unusable(str(exc))
            return
        try:  # the producer checked the values against the reader's feeds; a teacher with other dtypes here
            feeds = {spec.name: to_feed(tensors[spec.name], spec, check=spec not in self.cfg.feeds)
                     for spec in self.feeds}
        except ConfigError as exc:  # a value this teacher's dtype cannot hold: no other try can help
            self._send(protocol.Undone(epoch=task.epoch, task_id=task.task_id, code=ErrorCode.BAD_REQUEST,
                                       message=str(exc)))
            return
        misses = np.flatnonzero(~CacheSlots.of(slots).hits) if task.hits else None
        if misses is not None:  # only what the cache did not answer goes to the teacher
            feeds = {name: select(arr, misses) for name, arr in feeds.items()}
        rows = len(next(iter(feeds.values())))
        starts = range(0, rows, self.request_rows)
        chunks = [{name: select(arr, slice(start, start + self.request_rows)) for name, arr in feeds.items()}
                  for start in starts]
        self.jobs[key] = Job(task, chunks, [None] * len(chunks), slots=slots, misses=misses)
        for part in range(len(chunks)):
            if not self._submit(key, part):
                return

    def _hand_back(self, task: protocol.Task) -> None:
        self._send(protocol.Undone(epoch=task.epoch, task_id=task.task_id, code=protocol.RETURNED))

    def _fed(self, slots: dict[str, np.ndarray]) -> list[str]:
        """The teacher's feeds among the task's slots."""
        return [spec.name for spec in self.feeds if spec.name in slots]

    @staticmethod
    def _check_feed(tensors: Tensors, spec: TensorSpec) -> None:
        if spec.name not in tensors:
            raise ConfigError(f"the teacher takes feed {spec.name!r}, which this reader's tasks do not hold")
        check_feed(spec.name, row_shape(tensors[spec.name]), spec)

    def _submit(self, key: tuple[int, int], part: int) -> bool:
        """Send one request of a job to the teacher; False if the teacher turned out to be down."""
        job = self.jobs[key]
        try:
            req_id = self.client.submit("predict", job.chunks[part])
        except TeacherTimeout as exc:
            self._teacher_down(str(exc))  # hands this job back too
            return False
        self.requests[req_id] = (key, part)
        job.pending.add(req_id)
        return True

    def _on_completion(self, done: Completion) -> None:
        if done.req_id == self.probe:
            self._on_probe(done)
            return
        where = self.requests.pop(done.req_id, None)
        if where is None:
            return
        key, part = where
        job = self.jobs.get(key)
        if job is None:
            return
        job.pending.discard(done.req_id)
        code = getattr(done.error, "code", "")
        if code == ErrorCode.BUSY:  # the teacher's queue is full: the same request again, a little later
            job.busy += 1
            now = time.monotonic()
            retry_at = now + min(_BUSY_MAX, _BUSY_FIRST * 2 ** (job.busy - 1))
            if retry_at - job.started < self.cfg.timeout:
                heapq.heappush(self.retries, (retry_at, key, part))
            else:  # a try the dispatcher counts as failed: it decides whether the task goes on
                self._drop_job(key)
                self._send(protocol.Undone(epoch=job.task.epoch, task_id=job.task.task_id, code=ErrorCode.BUSY,
                                           message=f"answered busy for {now - job.started:.1f} s (its queue is full)"))
        elif isinstance(done.error, TeacherTimeout) or code == ErrorCode.SHUTTING_DOWN:
            self._teacher_down(str(done.error))
        elif done.error is not None:
            self._drop_job(key)
            code = code if isinstance(done.error, TeacherError) else "error"
            self._send(protocol.Undone(epoch=job.task.epoch, task_id=job.task.task_id, code=code,
                                       message=str(done.error)))
        elif why := answer_problem(job.chunks[part], done.result, self.cfg.predicts):
            self._drop_job(key)
            self._send(protocol.Undone(epoch=job.task.epoch, task_id=job.task.task_id, code=ErrorCode.BAD_OUTPUT,
                                       message=f"teacher {self.cfg.teacher}: {why}"))
        else:
            job.parts[part] = done.result
            if not job.pending:
                self._finish(key, job)

    def _finish(self, key: tuple[int, int], job: Job) -> None:
        del self.jobs[key]
        answers = {}
        for name in self.cfg.predicts:
            parts = [p[name] for p in job.parts if p is not None]
            answers[name] = join(parts)
        arrays, cached = self._with_cache(job, answers) if job.task.hits is not None else (answers, 0)
        arrays = {predict_key(name): arr for name, arr in arrays.items()}  # the student reads the slots itself
        now = time.monotonic()
        # The teacher's time for this task: since it came, or since the task before it was
        # done if it queued behind that one (the student sizes tasks and queues by it).
        service = now - max(job.started, self.last_finish)
        self.last_finish = now
        self._send(protocol.Done(epoch=job.task.epoch, task_id=job.task.task_id, elapsed=now - job.started,
                                 service=service, cached=cached), arrays)

    def _with_cache(self, job: Job, answers: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """Store the teacher's answers in the cache; the task's full predictions (cached rows too)
        and how many of their rows came from the cache.

        Only while the slot still holds this task: a slot reused by a later one (the
        epoch ended meanwhile) may have changed under the requests, and its answers must
        never be filed under this task's keys.  The slot's id is written before anything
        else of a new task, so an unchanged id means unchanged inputs.

        Rows the producer audited (cached, asked anyway) are compared with the cache
        (:meth:`_audit`); where they agree, the cached answer stands, so an epoch answered
        from the cache is the same, bit for bit, as the one that filled it.
        """
        slots, task = CacheSlots.of(job.slots), job.task
        if tuple(slots.stamp) != (task.epoch, task.task_id):
            return answers, 0  # stale: the dispatcher drops the answer anyway
        asked = np.arange(len(slots.hits)) if job.misses is None else job.misses  # the rows answered
        audited = slots.audit[asked]
        kept = bool(audited.any()) and self._audit(asked[audited], slots, {
            name: select(arr, np.flatnonzero(audited)) for name, arr in answers.items()})
        if kept:  # the audited rows' cached answers stand: only the others are the teacher's
            asked = asked[~audited]
            answers = {name: select(arr, np.flatnonzero(~audited)) for name, arr in answers.items()}
        if self.cache is not None and len(asked):
            try:
                self.cache.append(slots.keys[asked], answers)
            except OSError as exc:
                self._cache_off(exc)
        if job.misses is None and not kept:
            return answers, 0
        full = {}
        for name, arr in answers.items():
            full[name] = copy_tensor(slots.answers[name])
            place(full[name], asked, arr)
        return full, len(slots.hits) - len(asked)

    def _audit(self, where: np.ndarray, slots: CacheSlots, answers: dict[str, Tensor]) -> bool:
        """Whether the teacher's answers to cached rows asked anyway (the producer's audit) are the
        cache's, within the tolerance.  If not, it is another model (one its fingerprint did not
        tell apart): the cache is off for good, nothing more is stored, and the dispatcher hears
        why before this task's answer."""
        for name, fresh in answers.items():
            apart = rows_apart(select(slots.answers[name], where), fresh)
            if apart <= self.cfg.cache_tolerance:
                continue
            self.audit_failed = (f"teacher {self.cfg.teacher} answers a cached row otherwise than the cache ({name!r} "
                                 f"apart by {apart:.3g}, tolerance {self.cfg.cache_tolerance:g}): it is not the "
                                 "model the cache was filled by")
            if self.cache is not None:
                self.cache.close()
                self.cache = None
            self._send(msgspec.structs.replace(self.status, cache=self.audit_failed))
            return False
        return True

    def _cache_off(self, exc: OSError) -> None:
        """Stop writing to a cache that cannot be written (a full or read-only file system):
        the answers go on to the student, and the status tells the reader, which turns the
        cache off with one warning (one per reader, however many workers fail)."""
        assert self.cache is not None
        self.cache.close()
        self.cache = None
        self.cache_failed = f"the worker for teacher {self.cfg.teacher} cannot write to it: {exc}"
        log.info("%s", self.cache_failed)
        if self.up:
            self._send(msgspec.structs.replace(self.status, cache=self.cache_failed))

    def _drop_job(self, key: tuple[int, int]) -> None:
        """Forget a job, its requests and its busy retries (the same task may come here again)."""
        job = self.jobs.pop(key)
        for req_id in job.pending:
            self.requests.pop(req_id, None)
        if any(k == key for _, k, _ in self.retries):
            self.retries = [r for r in self.retries if r[1] != key]
            heapq.heapify(self.retries)

    # -- teacher health -----------------------------------------------------

    def _on_probe(self, done: Completion) -> None:
        self.probe = None
        self.next_probe = time.monotonic() + _PROBE_EVERY
        if isinstance(done.error, TeacherError) and done.error.code == ErrorCode.BAD_REQUEST:
            self._unusable(str(done.error))  # it answers, with a model zdistill cannot feed (a Triton teacher's)
            return
        if done.error is not None or done.header is None:
            return
        try:
            meta = TeacherMeta.parse(done.header)
            no_rows = {predict_key(f.name): empty_output(f) for f in meta.fetches if f.name in self.cfg.predicts}
        except (WireError, TypeError) as exc:  # TypeError: a dtype numpy does not know
            self._unusable(f"its meta is malformed ({exc})")
            return
        feeds, fetches = meta.feeds, {f.name for f in meta.fetches}
        missing = [p for p in self.cfg.predicts if p not in fetches]
        why = f"it has no outputs {missing}, only {sorted(fetches)}" if missing else None
        why = why or feeds_mismatch(self.cfg.feeds, feeds)
        if why:
            self._unusable(why)
            return
        self.feeds, self.no_rows = feeds, no_rows
        self.request_rows = min(self.cfg.request_rows, meta.max_batch_size)
        self.up = True
        log.info("teacher %s is up", self.cfg.teacher)
        cache = self._cache_for(meta)
        self.status = protocol.Status(up=True, max_batch_size=meta.max_batch_size, instances=meta.instances,
                                      cache=cache)
        self._send(self.status)

    def _cache_for(self, meta: TeacherMeta) -> str:
        """Open the cache for this teacher's answers if its model is the cache's; else why not.

        Asked on every (re)connection: a teacher redeployed behind the same address may
        serve another model, under the same ``model_id`` or another.  The model is the
        cache's when its ``model_id`` names the cache folder's parent and its answers to
        the probe batch are the folder's fingerprint, within the tolerance.
        """
        if not self.cfg.cache_folder:
            return ""
        if self.cache_failed:
            return self.cache_failed
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        if self.audit_failed:
            return self.audit_failed
        model_id = meta.model_id
        if not model_id:
            return f"teacher {self.cfg.teacher} says no model_id"
        fetches = meta.fetches_named(self.cfg.predicts)  # _on_probe checked they are all there
        if folder_for(self.cfg.cache_root, model_id, fetches) != os.path.dirname(self.cfg.cache_folder):
            return f"teacher {self.cfg.teacher} serves model_id {model_id!r}, not the model the cache was opened for"
        tolerance = self.cfg.cache_tolerance
        fp, why = usable(meta.fingerprint, self.cfg.predicts, f"teacher {self.cfg.teacher}", tolerance)
        if fp is None:
            return why
        known = read_fingerprint(self.cfg.cache_folder)
        apart = distance(known, fp, self.cfg.predicts) if known is not None else float("inf")
        if not apart <= tolerance:
            return (f"teacher {self.cfg.teacher} answers the probe batch otherwise than the model the cache was "
                    f"opened for (apart by {apart:.3g}, tolerance {tolerance:g}): another model under model_id "
                    f"{model_id!r}")
        self.cache = CacheWriter(self.cfg.cache_folder, fetches, self.cfg.cache_max_bytes, self.cfg.cache_root)
        return ""

    def _unusable(self, why: str) -> None:
        """The teacher answers but cannot take this reader's tasks: say so, hand back what we
        hold, and ask again only now and then (it may be redeployed with the right model)."""
        reason = f"it cannot take this reader's tasks: {why}"
        log.warning("teacher %s %s", self.cfg.teacher, reason)
        self._send(protocol.Status(up=False, reason=reason, unusable=why))
        if self.up:
            self._teacher_down(reason, announce=False)
        self.next_probe = time.monotonic() + _PROBE_UNUSABLE

    def _teacher_down(self, reason: str, announce: bool = True) -> None:
        """Hand back every task held, start afresh, and probe until the teacher answers."""
        was_up = self.up
        self.up = False
        if was_up and announce:  # first, so that the tasks handed back are not sent to us again
            log.warning("teacher %s is down: %s", self.cfg.teacher, reason)
            self._send(protocol.Status(up=False, reason=reason))
        for key in list(self.jobs):
            job = self.jobs[key]
            self._drop_job(key)
            self._hand_back(job.task)
        self.client.reset()
        self.requests.clear()
        self.retries.clear()
        self.probe = None
        self.next_probe = time.monotonic() + _PROBE_EVERY

    def _send(self, msg: protocol.Msg, arrays: dict[str, np.ndarray] | None = None) -> None:
        send_while_parent_lives(self.sock, msg, self.cfg.parent_pid, arrays)

    def stop(self) -> None:
        """Take no more tasks, finish the ones held, then leave (a retired teacher's worker).

        Called from the SIGTERM handler, so it only sets a flag: the loop tells the
        dispatcher, as sockets belong to the loop.
        """
        self.stopping = True

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.client.close()
        self.sock.close()
        self.ctx.term()


def _remove_folders_of_dead_student(cfg: WorkerConfig) -> None:
    """The student died without removing its folders (``kill -9``, or SIGTERM where its
    handler could not be installed: a reader made in a thread other than the main one).

    Its workers outlive it by moments, so they remove its slot and ipc folders, each
    only once its lock is free (:func:`zdistill.student.shm.reclaim`): the student is provably
    gone, and so is the producer it forked, which dies with it.
    """
    ipc = os.path.dirname(cfg.dispatcher.removeprefix("ipc://"))
    for folder in (cfg.slots, ipc):
        if reclaim(folder, wait=_RECLAIM_WAIT):
            log.info("removed the folder %s of the student that died", folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zdistill.student.worker",
                                description="A DistillReader worker (internal).")
    p.add_argument("--teacher", required=True)
    p.add_argument("--dispatcher", required=True, help="the student's dispatcher endpoint")
    p.add_argument("--identity", required=True, help="this worker's name on the dispatcher's socket")
    p.add_argument("--slots", required=True, help="folder of the shared-memory task slots")
    p.add_argument("--predicts", required=True)
    p.add_argument("--feeds", default="[]", help="JSON: the feeds (TensorSpec) this reader's tasks are built for")
    p.add_argument("--request-rows", type=int, default=256)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--share-weight", type=float, default=1.0, help="this student's share of the teacher")
    p.add_argument("--cache-root", default="", help="the reader's teacher-output cache, if it has one")
    p.add_argument("--cache-folder", default="", help="where this reader's model's answers go in it")
    p.add_argument("--cache-max-bytes", type=int, default=0)
    p.add_argument("--cache-tolerance", type=float, default=0.0,
                   help="how far a teacher's answers to the probe batch may be from the cache folder's fingerprint")
    p.add_argument("--parent-pid", type=int, required=True)
    add_log_level(p, default="WARNING")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    # No parent-death signal: Linux sends it when the *thread* that started us ends (the
    # dispatcher's), while the student may still be dying and hold its folders' locks.
    # Each turn of the loop (at most 0.1 s) checks getppid(), which changes only once the
    # whole student is gone.
    worker = Worker(WorkerConfig.from_args(args))
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the student, which stops us
    try:
        worker.run()
    except ParentGone:  # nobody waits for our results any more
        log.info("student process is gone; worker for %s exits", args.teacher)
    finally:
        if os.getppid() != worker.cfg.parent_pid:  # first: closing the sockets may wait for their linger
            _remove_folders_of_dead_student(worker.cfg)
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
