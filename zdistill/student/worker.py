"""A reader worker: one process, one teacher connection, several requests in flight.

Started by the dispatcher (``python -m zdistill.student.worker``), never forked, so it carries
none of the student's state.  A DEALER under the identity the dispatcher gave it, it says
``hello``, takes ``task`` messages, sends the feed slots straight from shared memory to its
teacher in requests of at most ``--request-rows`` rows, and answers each task with ``done``
(the predictions) or ``undone``.  It keeps no credit: the dispatcher counts what it holds.

A dropped TCP connection (socket monitor) or a request past its timeout marks the teacher
*down*: every task held goes back (``undone`` ``returned``) and ``meta`` probes follow until
it answers; each change is a ``status``.  ``busy`` is retried here, after a growing pause,
only while the task is younger than the request timeout (past it the dispatcher counts the
try as failed anyway); then it is ``undone`` ``busy``, so that no task is held for ever.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
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
from zdistill.student import batches, protocol
from zdistill.student.cache import CacheWriter, folder_for, read_fingerprint
from zdistill.student.protocol import ParentGone, send_while_parent_lives
from zdistill.student.shm import SlotReader, reclaim
from zdistill.triton_client import connect_teacher

log = logging.getLogger("zdistill.student.worker")  # not __name__: it runs as __main__

_PROBE_EVERY = 0.25
_PROBE_UNUSABLE = 2.0  # a teacher that takes other inputs is asked again this rarely (it may be redeployed)
_BUSY_FIRST = 0.02  # a request the teacher was too busy for is sent again after this...
_BUSY_MAX = 1.0  # ...doubling up to this, while the task is younger than the request timeout
_RECLAIM_WAIT = 5.0  # how long a worker of a dead student waits for the student's folders to be unlocked


@dataclass
class Job:
    """A task in progress: the feeds of each teacher request (views of shared memory) and their answers."""

    key: tuple[int, int]  # epoch, task id
    task: protocol.Task
    slots: dict[str, np.ndarray]  # the task's slot arrays (shared memory)
    misses: np.ndarray | None  # with cached rows: the rows the teacher is asked
    chunks: list[Tensors]
    parts: list[Tensors | None]
    left: int  # requests not answered yet
    started: float = field(default_factory=time.monotonic)
    busy: int = 0  # "busy" answers so far: the back-off before the next try grows with them


class Worker:
    """Owns the teacher client, the jobs in progress and the socket to the dispatcher; ``cfg`` is
    the parsed command line (:func:`build_parser`)."""

    def __init__(self, cfg: argparse.Namespace) -> None:
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
        self.fetches: list[TensorSpec] = []  # the predictions asked, as the teacher's meta declares them
        self.request_rows = cfg.request_rows
        self.up = False
        self.probe: int | None = None
        self.next_probe = 0.0
        self.jobs: dict[tuple[int, int], Job] = {}
        self.requests: dict[int, tuple[Job, int]] = {}  # request id -> (job, part)
        # heap: (when, tie-breaker, job, part) the teacher was busy; a job no longer held is skipped
        self.retries: list[tuple[float, int, Job, int]] = []
        self.retry_ids = itertools.count()
        self.stopping = False
        self.said_stop = False
        self.last_finish = 0.0  # when the last task was done
        self.cache: CacheWriter | None = None  # where answers go, while the teacher's model is the cache's
        self.status = protocol.Status(up=False)  # the last said while up
        self.no_cache = ""  # why answers are never stored again (a write failed, or an audit)

    def run(self) -> None:
        poller, polled = zmq.Poller(), None
        self._send(protocol.Hello(pid=os.getpid()))
        while not (self.stopping and not self.jobs):
            if os.getppid() != self.cfg.parent_pid:
                raise ParentGone
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
                _, _, job, part = heapq.heappop(self.retries)
                if self.jobs.get(job.key) is job and not self._submit(job, part):
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
            self._undone(task, protocol.RETURNED)
            return
        if not task.rows:  # only empty reader batches: empty predictions, without asking the teacher
            self._send(protocol.Done(epoch=task.epoch, task_id=task.task_id, elapsed=0.0, service=0.0), self.no_rows)
            return
        try:  # lengths that do not add up: a slot reused since, by a task of an epoch that ended
            slots = self.slots.read(task.shm)
            tensors = batches.slot_tensors(slots, [spec.name for spec in self.feeds if spec.name in slots])
        except (WireError, ConfigError) as exc:  # nobody waits for this one any more
            log.debug("dropping task %s: %s", (task.epoch, task.task_id), exc)
            self._undone(task, protocol.RETURNED, str(exc))
            return
        try:
            for spec in self.feeds:
                if spec.name not in tensors:
                    raise ConfigError(f"the teacher takes feed {spec.name!r}, which this reader's tasks do not hold")
                batches.check_feed(spec.name, batches.row_shape(tensors[spec.name]), spec)
        except ConfigError as exc:  # the teacher was redeployed with other inputs since its meta said
            self._undone(task, protocol.RETURNED)
            self._unusable(str(exc))
            return
        try:  # the producer checked the values against the reader's feeds; a teacher with other dtypes here
            feeds = {spec.name: batches.to_feed(tensors[spec.name], spec, check=spec not in self.cfg.feeds)
                     for spec in self.feeds}
        except ConfigError as exc:  # a value this teacher's dtype cannot hold: no other try can help
            self._undone(task, ErrorCode.BAD_REQUEST, str(exc))
            return
        misses = np.flatnonzero(~batches.CacheSlots.of(slots).hits) if task.hits else None
        if misses is not None:  # only what the cache did not answer goes to the teacher
            feeds = {name: batches.select(arr, misses) for name, arr in feeds.items()}
        step = self.request_rows
        chunks = [{name: batches.select(arr, slice(start, start + step)) for name, arr in feeds.items()}
                  for start in range(0, len(next(iter(feeds.values()))), step)]
        key = (task.epoch, task.task_id)
        job = self.jobs[key] = Job(key, task, slots, misses, chunks, [None] * len(chunks), len(chunks))
        for part in range(len(chunks)):
            if not self._submit(job, part):
                return

    def _undone(self, task: protocol.Task, code: str, message: str = "") -> None:
        """Give a task back, forgetting its job if it has one (the same task may come here again)."""
        self.jobs.pop((task.epoch, task.task_id), None)
        self._send(protocol.Undone(epoch=task.epoch, task_id=task.task_id, code=code, message=message))

    def _submit(self, job: Job, part: int) -> bool:
        """Send one request of a job to the teacher; False if the teacher turned out to be down."""
        try:
            self.requests[self.client.submit("predict", job.chunks[part])] = (job, part)
        except TeacherTimeout as exc:
            self._teacher_down(str(exc))  # hands this job back too
            return False
        return True

    def _on_completion(self, done: Completion) -> None:
        if done.req_id == self.probe:
            self._on_probe(done)
            return
        where = self.requests.pop(done.req_id, None)
        if where is None or self.jobs.get(where[0].key) is not where[0]:
            return  # a job given up or handed back
        job, part = where
        code = getattr(done.error, "code", "")
        if code == ErrorCode.BUSY:  # the teacher's queue is full: the same request again, a little later
            job.busy += 1
            now = time.monotonic()
            retry_at = now + min(_BUSY_MAX, _BUSY_FIRST * 2 ** (job.busy - 1))
            if retry_at - job.started < self.cfg.timeout:
                heapq.heappush(self.retries, (retry_at, next(self.retry_ids), job, part))
            else:  # a try the dispatcher counts as failed: it decides whether the task goes on
                self._undone(job.task, ErrorCode.BUSY,
                             f"answered busy for {now - job.started:.1f} s (its queue is full)")
        elif isinstance(done.error, TeacherTimeout) or code == ErrorCode.SHUTTING_DOWN:
            self._teacher_down(str(done.error))
        elif done.error is not None:
            self._undone(job.task, code if isinstance(done.error, TeacherError) else "error", str(done.error))
        elif why := batches.answer_problem(job.chunks[part], done.result, self.fetches):
            self._undone(job.task, ErrorCode.BAD_OUTPUT, f"teacher {self.cfg.teacher}: {why}")
        else:
            job.parts[part] = done.result
            job.left -= 1
            if not job.left:
                self._finish(job)

    def _finish(self, job: Job) -> None:
        del self.jobs[job.key]
        try:
            arrays: dict[str, Tensor] = {name: batches.join([p[name] for p in job.parts]) for name in self.cfg.predicts}
        except ValueError as exc:  # rows of other shapes from separate model calls: no retry mends it
            self._undone(job.task, ErrorCode.BAD_OUTPUT,
                         f"teacher {self.cfg.teacher}: its answers to the {len(job.parts)} requests of a task have "
                         f"rows of different shapes, which cannot be joined into one prediction ({exc})")
            return
        cached = 0
        if job.task.hits is not None:
            arrays, cached = self._with_cache(job, arrays)
        now = time.monotonic()
        # The teacher's time for this task: since it came, or since the task before it was
        # done if it queued behind that one (the student sizes tasks and queues by it).
        service = now - max(job.started, self.last_finish)
        self.last_finish = now
        self._send(protocol.Done(epoch=job.task.epoch, task_id=job.task.task_id, elapsed=now - job.started,
                                 service=service, cached=cached),  # only predictions: the student has the slots
                   {batches.predict_key(name): arr for name, arr in arrays.items()})

    def _with_cache(self, job: Job, answers: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """Store the teacher's answers in the cache; the task's full predictions (cached rows too)
        and how many of their rows came from the cache.

        Only while the slot's id (written first of a task) still names this task: a slot reused
        since may have changed under the requests, and must never be filed under this task's keys.
        Rows the producer audited (cached, asked anyway) are compared with the cache: where they
        agree, the cached answer stands (an epoch answered from the cache is the same, bit for
        bit, as the one that filled it); where not, it is another model that the fingerprint did
        not tell apart, and the cache is off for good.
        """
        slots, task = batches.CacheSlots.of(job.slots), job.task
        # Copied before the stamp is read: the producer writes a task's stamp before its keys, so keys
        # copied while the stamp still names this task are this task's, whenever the slot is reused.
        keys, audit = slots.keys.copy(), slots.audit.copy()
        if tuple(slots.stamp) != (task.epoch, task.task_id):
            return answers, 0  # stale: the dispatcher drops the answer anyway
        asked = np.arange(len(slots.hits)) if job.misses is None else job.misses  # the rows answered
        audited, kept = audit[asked], False
        if audited.any():
            for name, arr in answers.items():
                cached = batches.select(slots.answers[name], asked[audited])
                apart = rows_apart(cached, batches.select(arr, np.flatnonzero(audited)))
                if not apart <= self.cfg.cache_tolerance:
                    self._cache_off(f"teacher {self.cfg.teacher} answers a cached row otherwise than the cache "
                                    f"({name!r} apart by {apart:.3g}, tolerance {self.cfg.cache_tolerance:g}): it "
                                    "is not the model the cache was filled by")
                    break
            else:  # the audited rows' cached answers stand: only the others are the teacher's
                asked, kept = asked[~audited], True
                answers = {name: batches.select(arr, np.flatnonzero(~audited)) for name, arr in answers.items()}
        if self.cache is not None and len(asked):
            try:
                self.cache.append(keys[asked], answers)
            except OSError as exc:  # a full or read-only file system: the answers still go on
                self._cache_off(f"the worker for teacher {self.cfg.teacher} cannot write to it: {exc}")
        if job.misses is None and not kept:
            return answers, 0
        full = {}
        for name, arr in answers.items():
            full[name] = batches.copy_tensor(slots.answers[name])
            batches.place(full[name], asked, arr)
        return full, len(slots.hits) - len(asked)

    def _cache_off(self, why: str) -> None:
        """Store nothing more, for good, and tell the dispatcher why (before the task's answer):
        it turns the reader's cache off, with one warning however many workers say so."""
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        self.no_cache = why
        log.info("%s", why)
        self._send(msgspec.structs.replace(self.status, cache=why))

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
            no_rows = {batches.predict_key(f.name): batches.empty_output(f)
                       for f in meta.fetches if f.name in self.cfg.predicts}
        except (WireError, TypeError) as exc:  # TypeError: a dtype numpy does not know
            self._unusable(f"its meta is malformed ({exc})")
            return
        fetches = {f.name for f in meta.fetches}
        missing = [p for p in self.cfg.predicts if p not in fetches]
        why = f"it has no outputs {missing}, only {sorted(fetches)}" if missing else None
        why = (why or batches.feeds_mismatch(self.cfg.feeds, meta.feeds)
               or batches.fetches_mismatch(self.cfg.fetches, meta.fetches_named(self.cfg.predicts)))
        if why:
            self._unusable(why)
            return
        self.feeds, self.no_rows = meta.feeds, no_rows
        self.fetches = meta.fetches_named(self.cfg.predicts)
        self.request_rows = min(self.cfg.request_rows, meta.max_batch_size)
        self.up = True
        log.info("teacher %s is up", self.cfg.teacher)
        self.status = protocol.Status(up=True, max_batch_size=meta.max_batch_size, instances=meta.instances,
                                      cache=self._cache_for(meta))
        self._send(self.status)

    def _cache_for(self, meta: TeacherMeta) -> str:
        """Open the cache for this teacher's answers if its model is the cache's; else why not.

        Asked on every (re)connection: a teacher redeployed behind the same address may serve
        another model, under the same ``model_id`` or another.  The model is the cache's when
        its ``model_id`` names the cache folder's parent and its answers to the probe batch are
        the folder's fingerprint, within the tolerance.
        """
        if not self.cfg.cache_folder:
            return ""
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        if self.no_cache:
            return self.no_cache
        model_id, teacher, tolerance = meta.model_id, f"teacher {self.cfg.teacher}", self.cfg.cache_tolerance
        if not model_id:
            return f"{teacher} says no model_id"
        fetches = meta.fetches_named(self.cfg.predicts)  # _on_probe checked they are all there
        if folder_for(self.cfg.cache_root, model_id, fetches) != os.path.dirname(self.cfg.cache_folder):
            return f"{teacher} serves model_id {model_id!r}, not the model the cache was opened for"
        fp, why = usable(meta.fingerprint, self.cfg.predicts, teacher, tolerance)
        if fp is None:
            return why
        known = read_fingerprint(self.cfg.cache_folder)
        apart = distance(known, fp, self.cfg.predicts) if known is not None else float("inf")
        if not apart <= tolerance:
            return (f"{teacher} answers the probe batch otherwise than the model the cache was opened for "
                    f"(apart by {apart:.3g}, tolerance {tolerance:g}): another model under model_id {model_id!r}")
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
        if self.up and announce:  # first, so that the tasks handed back are not sent to us again
            log.warning("teacher %s is down: %s", self.cfg.teacher, reason)
            self._send(protocol.Status(up=False, reason=reason))
        self.up = False
        for job in list(self.jobs.values()):
            self._undone(job.task, protocol.RETURNED)
        self.client.reset()
        self.requests.clear()
        self.retries.clear()
        self.probe = None
        self.next_probe = time.monotonic() + _PROBE_EVERY

    def _send(self, msg: protocol.Msg, arrays: dict[str, Tensor] | None = None) -> None:
        send_while_parent_lives(self.sock, msg, self.cfg.parent_pid, arrays)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.client.close()
        self.ctx.destroy()  # closes self.sock, after its linger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zdistill.student.worker",
                                description="A DistillReader worker (internal).")
    p.add_argument("--teacher", required=True)
    p.add_argument("--dispatcher", required=True, help="the student's dispatcher endpoint")
    p.add_argument("--identity", required=True, type=str.encode, help="its name on the dispatcher's socket")
    p.add_argument("--slots", required=True, help="folder of the shared-memory task slots")
    p.add_argument("--predicts", required=True, type=lambda names: names.split(","))
    p.add_argument("--feeds", default="[]", type=lambda text: [TensorSpec.from_wire(f) for f in json.loads(text)],
                   help="JSON: the feeds (TensorSpec) this reader's tasks are built for")
    p.add_argument("--fetches", default="[]", type=lambda text: [TensorSpec.from_wire(f) for f in json.loads(text)],
                   help="JSON: the predictions (TensorSpec) as this reader's teachers give them")
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
    # No parent-death signal: Linux sends it when the *thread* that started us ends (the dispatcher's),
    # while the student may still hold its folders' locks; getppid() changes once it is all gone.
    worker = Worker(args)
    # SIGTERM (a retired teacher's worker): take no more tasks, finish the ones held, then leave.
    # Only a flag: the loop tells the dispatcher, as the sockets are the loop's.
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stopping", True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the student, which stops us
    try:
        worker.run()
    except ParentGone:  # nobody waits for our results any more
        log.info("student process is gone; worker for %s exits", args.teacher)
    finally:
        # A student that died without removing its slot and ipc folders (kill -9, or SIGTERM with no
        # handler): each goes once its lock is free (the student and its producer are provably gone).
        # First: closing the sockets may wait for their linger.
        if os.getppid() != args.parent_pid:
            for folder in (args.slots, os.path.dirname(args.dispatcher.removeprefix("ipc://"))):
                if reclaim(folder, wait=_RECLAIM_WAIT):
                    log.info("removed the folder %s of the student that died", folder)
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
