"""A reader worker: one process, one teacher connection, several requests in flight.

Started by the student (``python -m zdistill.worker``), never forked, so it carries
none of the student's state.  It takes tasks from each epoch's ventilator (on a
ROUTER it binds, announcing its free room as credit), sends the feed slots straight from shared memory
to its teacher in requests of at most ``--request-rows`` rows, and PUSHes each
finished task's predictions (the slots stay in shared memory) to the student's sink.

Health is judged in-band: a dropped TCP connection (socket monitor) or a request
past its timeout marks the teacher *down*; the worker then hands back every task it
holds (``returned``: the student sends it elsewhere without counting a retry) and
probes the teacher with ``meta`` until it answers again.  The student hears ``status``
messages on each change.  Requests the teacher refuses come back as ``failed`` with
the teacher's error code, for the student to retry or give up on.
"""

from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from zdistill import wire
from zdistill.client import Completion, TeacherClient
from zdistill.errors import ConfigError, TeacherError, TeacherTimeout, WireError
from zdistill.flags import add_log_level, setup_logging
from zdistill.model import TensorSpec
from zdistill.shm import SlotReader
from zdistill.tasks import check_feed, feeds_mismatch, predict_key, to_feed

log = logging.getLogger("zdistill.worker")

_PROBE_EVERY = 0.25
_PROBE_UNUSABLE = 2.0  # a teacher that takes other inputs is asked again this rarely (it may be redeployed)
_IDLE_CREDIT = 0.2
_BUSY_FIRST = 0.02  # a request the teacher was too busy for is sent again after this...
_BUSY_MAX = 1.0  # ...doubling up to this


@dataclass
class Job:
    """A task in progress: its message and the parts its teacher requests answered."""

    header: dict[str, Any]
    chunks: list[dict[str, np.ndarray]]  # the feeds of each teacher request (views of shared memory)
    parts: list[dict[str, np.ndarray] | None]
    pending: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    busy: int = 0  # "busy" answers so far: the back-off before the next try grows with them


class StudentGone(Exception):
    """The student process died: nobody waits for our results any more."""


class Worker:
    """Owns the teacher client, the jobs in progress and the worker's two pipeline sockets."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.predicts: list[str] = args.predicts.split(",")
        self.ctx = zmq.Context()
        # Bound here, connected to by each epoch's reader process, which says hello: a new
        # reader reaches us at once, and credit goes to the reader that said hello last,
        # never to one of an epoch that ended (whose connection may linger a moment).
        self.tasks = self.ctx.socket(zmq.ROUTER)
        self.tasks.setsockopt(zmq.LINGER, 0)
        self.tasks.setsockopt(zmq.ROUTER_MANDATORY, 1)  # credit for a reader that is gone is an error: dropped
        self.tasks.bind(args.tasks)
        self.reader: bytes | None = None  # the identity of the current epoch's reader process
        self.in_flight: int = args.in_flight  # tasks we may hold: each epoch's hello says
        self.last_task = 0.0  # when the last task came: an idle worker repeats its credit
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.connect(args.results)
        self.client = TeacherClient(args.teacher, self.ctx, timeout=args.timeout, watch=True)
        self.slots = SlotReader(args.slots)
        self.expected = [TensorSpec.from_wire(f) for f in json.loads(args.feeds)]  # what the tasks are built for
        self.feeds: list[TensorSpec] = []
        self.request_rows = args.request_rows
        self.up = False
        self.probe: int | None = None
        self.next_probe = 0.0
        self.jobs: dict[tuple[int, int], Job] = {}
        self.requests: dict[int, tuple[tuple[int, int], int]] = {}  # request id -> (job key, part)
        self.retries: list[tuple[float, tuple[int, int], int]] = []  # heap: (when, job key, part) the teacher was busy
        self.stopping = False
        self.said_stop = False
        self.unsaid_room = 0  # tasks finished since the last credit message
        self.received = 0  # task messages from the current reader: lets it square a reset with tasks in transit
        self.last_finish = 0.0  # when the last task was done

    # -- main loop ----------------------------------------------------------

    def run(self) -> None:
        poller, polled = zmq.Poller(), None
        self._send_result({"kind": "status", "worker": self.args.teacher, "up": False, "started": True})
        while not (self.stopping and not self.jobs):
            if os.getppid() != self.args.parent_pid:
                log.info("student process is gone; worker for %s exits", self.args.teacher)
                return
            if self.stopping and not self.said_stop:
                self._credit(0, reset=True)
                self.said_stop = True
            if not self.up and self.probe is None and time.monotonic() >= self.next_probe:
                try:
                    self.probe = self.client.submit("meta", timeout=1.0)
                except TeacherTimeout:
                    self._teacher_down("the teacher cannot be reached")
            if polled is not self.client.socket:  # a new poller only when the client reconnected
                polled, poller = self.client.socket, zmq.Poller()
                for sock in (self.client.socket, self.tasks, self.client.monitor):
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
            if not self.jobs and self.up and time.monotonic() - self.last_task > _IDLE_CREDIT:
                # Idle: nothing can be in transit to us, so our full room is exact. Saying it
                # again heals a credit lost while a new ventilator was still connecting.
                self._credit(self._room(), reset=True)
                self.last_task = time.monotonic()
            if self.tasks in events:
                while self.tasks.poll(0):
                    self._on_task(self.tasks.recv_multipart(copy=False))
            if self.client.socket in events or (deadline is not None and time.monotonic() >= deadline):
                for completion in self.client.collect(0):
                    self._on_completion(completion)
            while self.retries and self.retries[0][0] <= time.monotonic():
                _, key, part = heapq.heappop(self.retries)
                if key in self.jobs and not self._submit(key, part):
                    break

    # -- credit -----------------------------------------------------------------

    def _room(self) -> int:
        return max(0, self.in_flight - len(self.jobs)) if self.up and not self.stopping else 0

    def _freed(self) -> None:
        """A task is off our hands: give its room back, two at a time to halve the messages."""
        if not self.up or self.stopping:  # no room to give: the reset to 0 already said so
            return
        self.unsaid_room += 1
        if self.unsaid_room >= max(1, self.in_flight // 2) or not self.jobs:
            self._credit(self.unsaid_room)

    def _credit(self, credit: int, reset: bool = False) -> None:
        self.unsaid_room = 0
        if self.reader is None:
            return  # no reader yet: the first one hears from us when it says hello
        try:
            wire.send(self.tasks, {"kind": "ready", "credit": credit, "reset": reset, "received": self.received},
                      envelope=[self.reader], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.reader = None  # that reader is gone: the next one says hello

    def _on_task(self, frames: list[zmq.Frame]) -> None:
        self.last_task = time.monotonic()
        msg = wire.decode(frames[1:])
        if msg.kind == "hello":  # a new epoch's reader process: it gets our credit from now on
            self.reader = bytes(frames[0])
            self.received = 0
            self.in_flight = max(1, int(msg.header.get("in_flight", self.in_flight)))
            self._credit(self._room(), reset=True)
            return
        if frames[0].bytes == self.reader:  # not a late task of the epoch before
            self.received += 1
        if not self.up or self.stopping:
            self._send_result({**msg.header, "kind": "returned", "worker": self.args.teacher})
            return
        key = (int(msg.header.get("epoch", 0)), int(msg.header["task"]))
        try:
            slots = self.slots.read(msg.header.get("shm") or {})
        except WireError as exc:  # a task of an epoch that ended: nobody waits for it any more
            log.debug("dropping task %s: %s", key, exc)
            self._freed()
            return
        try:
            feeds = {spec.name: self._feed(slots, spec) for spec in self.feeds}
        except ConfigError as exc:  # the teacher was redeployed with other inputs since its meta said
            self._send_result({**msg.header, "kind": "returned", "worker": self.args.teacher})
            self._unusable(str(exc))
            return
        rows = len(next(iter(feeds.values())))
        starts = range(0, rows, self.request_rows)
        chunks = [{name: arr[start : start + self.request_rows] for name, arr in feeds.items()} for start in starts]
        self.jobs[key] = Job(msg.header, chunks, [None] * len(chunks))
        for part in range(len(chunks)):
            if not self._submit(key, part):
                return

    @staticmethod
    def _feed(slots: dict[str, np.ndarray], spec: TensorSpec) -> np.ndarray:
        if spec.name not in slots:
            raise ConfigError(f"the teacher takes feed {spec.name!r}, which this reader's tasks do not hold")
        check_feed(spec.name, slots[spec.name].shape[1:], spec)
        return to_feed(slots[spec.name], spec)

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
        if code == "busy":  # the teacher's queue is full: the same request again, a little later
            job.busy += 1
            heapq.heappush(self.retries, (time.monotonic() + min(_BUSY_MAX, _BUSY_FIRST * 2 ** (job.busy - 1)), key,
                                          part))
        elif isinstance(done.error, TeacherTimeout) or code == "shutting_down":
            self._teacher_down(str(done.error))
        elif done.error is not None:
            self._drop_job(key)
            self._freed()
            code = code if isinstance(done.error, TeacherError) else "error"
            self._send_result({**job.header, "kind": "failed", "code": code, "message": str(done.error),
                               "worker": self.args.teacher})
        else:
            job.parts[part] = done.result
            if not job.pending:
                self._finish(key, job)

    def _finish(self, key: tuple[int, int], job: Job) -> None:
        del self.jobs[key]
        arrays = {}  # the predictions alone: the student reads the slots from shared memory
        for name in self.predicts:
            parts = [p[name] for p in job.parts if p is not None]
            arrays[predict_key(name)] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._freed()
        now = time.monotonic()
        # The teacher's time for this task: since it came, or since the task before it was
        # done if it queued behind that one (the student sizes tasks and queues by it).
        service = now - max(job.started, self.last_finish)
        self.last_finish = now
        self._send_result({**job.header, "kind": "done", "worker": self.args.teacher, "elapsed": now - job.started,
                           "service": service}, arrays)

    def _drop_job(self, key: tuple[int, int]) -> None:
        job = self.jobs.pop(key)
        for req_id in job.pending:
            self.requests.pop(req_id, None)

    # -- teacher health -----------------------------------------------------

    def _on_probe(self, done: Completion) -> None:
        self.probe = None
        self.next_probe = time.monotonic() + _PROBE_EVERY
        if done.error is not None or done.header is None:
            return
        meta = done.header
        try:
            feeds = [TensorSpec.from_wire(f) for f in meta.get("feeds", [])]
            fetches = {str(f["name"]) for f in meta.get("fetches", [])}
            max_batch = int(meta.get("max_batch_size", 1))
            instances = int(meta.get("instances", 1))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            self._unusable(f"its meta is malformed ({type(exc).__name__}: {exc})")
            return
        missing = [p for p in self.predicts if p not in fetches]
        why = f"it has no outputs {missing}, only {sorted(fetches)}" if missing else None
        why = why or feeds_mismatch(self.expected, feeds)
        if why:
            self._unusable(why)
            return
        self.feeds = feeds
        self.request_rows = max(1, min(self.args.request_rows, max_batch))
        self.up = True
        log.info("teacher %s is up", self.args.teacher)
        self._credit(self._room(), reset=True)
        self._send_result({"kind": "status", "worker": self.args.teacher, "up": True, "reason": "",
                           "max_batch_size": max_batch, "instances": max(1, instances)})

    def _unusable(self, why: str) -> None:
        """The teacher answers but cannot take this reader's tasks: say so, hand back what we
        hold, and ask again only now and then (it may be redeployed with the right model)."""
        reason = f"it cannot take this reader's tasks: {why}"
        if self.up:
            self._teacher_down(reason, announce=False)
        self.next_probe = time.monotonic() + _PROBE_UNUSABLE
        log.warning("teacher %s %s", self.args.teacher, reason)
        self._send_result({"kind": "status", "worker": self.args.teacher, "up": False, "reason": reason,
                           "unusable": why})

    def _teacher_down(self, reason: str, announce: bool = True) -> None:
        """Hand back every task held, start afresh, and probe until the teacher answers."""
        was_up = self.up
        self.up = False
        self._credit(0, reset=True)
        for key in list(self.jobs):
            job = self.jobs[key]
            self._drop_job(key)
            self._send_result({**job.header, "kind": "returned", "worker": self.args.teacher})
        self.client.reset()
        self.requests.clear()
        self.retries.clear()
        self.probe = None
        self.next_probe = time.monotonic() + _PROBE_EVERY
        if was_up and announce:
            log.warning("teacher %s is down: %s", self.args.teacher, reason)
            self._send_result({"kind": "status", "worker": self.args.teacher, "up": False, "reason": reason})

    def _send_result(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        """To the student's sink; waits while the sink is full, but only while the student lives."""
        header = {**header, "pid": os.getpid()}
        while True:
            try:
                wire.send(self.push, header, arrays, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                if os.getppid() != self.args.parent_pid:
                    raise StudentGone from None
                self.push.poll(100, zmq.POLLOUT)

    def stop(self) -> None:
        """Take no more tasks, finish the ones held, then leave (a retired teacher's worker).

        Called from the SIGTERM handler, so it only sets a flag: the loop tells the
        ventilator, as sockets belong to the loop.
        """
        self.stopping = True

    def close(self) -> None:
        self.client.close()
        self.tasks.close(linger=0)
        self.push.close()
        self.ctx.term()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the student dies, even by kill -9."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the getppid() check in the loop still catches it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zdistill.worker", description="A DistillReader worker (internal).")
    p.add_argument("--teacher", required=True)
    p.add_argument("--tasks", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--slots", required=True, help="folder of the shared-memory task slots")
    p.add_argument("--predicts", required=True)
    p.add_argument("--feeds", default="[]", help="JSON: the feeds (TensorSpec) this reader's tasks are built for")
    p.add_argument("--request-rows", type=int, default=256)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--parent-pid", type=int, required=True)
    add_log_level(p, default="WARNING")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    _die_with_parent()
    worker = Worker(args)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the student, which stops us
    try:
        worker.run()
    except StudentGone:
        log.info("student process is gone; worker for %s exits", args.teacher)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
