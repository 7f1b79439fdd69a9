"""The dispatcher's bookkeeping: tasks in flight, what each worker holds, slots, resends.

One object, owned by the dispatcher thread, that has no sockets and no clock (callers
pass ``now``), so its rules are unit-tested with plain calls (``tests/test_scheduler.py``).

- A task of the current epoch is *pending* from the moment the producer built it until
  its first answer; the queue holds those waiting for a worker, sent lowest id first
  (the training loop wants them in order).
- Each send of a task is a *try* with its own deadline (``request_timeout``): a try that
  was refused or went unanswered past it is a failure, and a task that failed more than
  ``max_retries`` tries fails the epoch.  A hand-back in time or a worker's death is not.
- What a worker holds (sent, not answered, any epoch) is its credit: it gets a task only
  while it holds fewer than the epoch's ``in_flight``, the one holding least first, so a
  slow teacher gets fewer tasks.
- A slot is granted to the producer, holds a task until the training loop lets go of its
  arrays (or the epoch ends without it), then is free; grants stop at ``max_inflight_bytes``
  of taken slots, the ones whose views the loop holds left out (that memory is the loop's).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import msgspec

from zdistill.errors import FATAL_CODES, ConfigError, ErrorCode, TeacherError, TeacherTimeout
from zdistill.student import protocol
from zdistill.student.options import PipelineOptions

log = logging.getLogger(__name__)

_DEEP_MAX = 8  # tasks per worker the teacher time alone asks for, at most (unless max_in_flight says)


@dataclass
class Try:
    """One send of a task to a worker, while that worker holds it."""

    teacher: str
    deadline: float  # sent + request_timeout: unanswered then, the try fails (and again each request_timeout more)
    failed: bool = False  # counted as a failed try already: a refusal coming later is not counted again


@dataclass
class HeldTask:
    """A pending task: its message (forwarded to workers as received), who holds it, its failed tries."""

    task: protocol.Task
    wire: list[Any]  # the producer's frames
    holders: dict[bytes, Try] = field(default_factory=dict)  # the workers it was sent to, not yet answered
    first_sent: float = 0.0  # when it was first sent (0: not yet); the error says how long it waited
    failures: list[tuple[str, str]] = field(default_factory=list)  # (teacher, why) of each failed try


@dataclass
class WorkerState:
    """One worker as the dispatcher knows it: its teacher's health and what it holds."""

    teacher: str
    up: bool = False
    retiring: bool = False  # its teacher left: it gets no more tasks
    unusable: str = ""  # why its teacher cannot take this reader's tasks ("" while it can)
    reason: str = ""  # why it is down, as it said
    max_batch_size: int = 0  # the teacher's, from its meta (0: not known yet)
    instances: int = 1
    holds: set[tuple[int, int]] = field(default_factory=set)  # (epoch, task) sent to it, not answered


@dataclass
class Counts:
    """Counted over the reader's life, for ``DistillReader.stats()``: of every teacher, and of each."""

    tasks: int = 0  # answered (first answers only)
    samples: int = 0
    failed: int = 0  # refused by a teacher
    timed_out: int = 0  # tries unanswered within request_timeout
    returned: int = 0  # handed back by a worker whose teacher could not run them


@dataclass
class TeacherStats(Counts):
    up: bool = False
    changed_at: float = 0.0  # monotonic time of the last up/down change
    first_task_at: float = 0.0  # monotonic time its first answer reached the dispatcher
    reason: str = ""


@dataclass
class Counters(Counts):
    resent: int = 0  # sends beyond the first (a worker died, a refusal, a stall)
    straggler_resends: int = 0
    duplicates_dropped: int = 0  # second answers of a task sent twice
    cache_hits: int = 0  # rows answered from the teacher-output cache
    cache_misses: int = 0  # rows looked up there and asked of a teacher (not found, or audited)


@dataclass(frozen=True)
class Plan:
    """How the next epoch is cut and queued (see :meth:`Scheduler.plan`)."""

    task_rows: int
    in_flight: int  # tasks a worker may hold
    window: int  # tasks built ahead of the training loop
    keep_limit: int  # slots the training loop may hold views of (past it, it gets copies)


def cached_whole(task: protocol.Task) -> bool:
    """Every row of ``task`` was answered from the cache (its predictions are in its slot)."""
    return task.rows > 0 and task.hits == task.rows


def uncached(task: protocol.Task) -> tuple[protocol.Task, list[Any]]:
    """``task`` to be answered whole by a teacher, its cached rows ignored, and its frames."""
    task = msgspec.structs.replace(task, hits=None)
    return task, protocol.encode(task)


class Scheduler:
    """Owns tasks in flight, per-worker holdings, slots and the measured task times."""

    def __init__(self, options: PipelineOptions) -> None:
        self.options = options
        self.workers: dict[bytes, WorkerState] = {}
        self.teachers: dict[str, TeacherStats] = {}
        self.counters = Counters()
        self.epoch = 0
        self.active = False  # an epoch runs
        self.plan_now = Plan(options.task_rows, options.in_flight, options.window, 1)
        self.pending: dict[int, HeldTask] = {}
        self._queue: set[int] = set()  # pending tasks waiting for a worker
        self.produced = 0
        self.total: int | None = None  # tasks of the epoch, once the producer said
        self.last_progress = 0.0
        self.highest_done = -1
        self._blocked: tuple[int, float] | None = None  # (lowest pending task, since when later ones are done)
        self._down_since: float | None = None
        self._next_expiry = math.inf  # no try can run out of time before this
        self.slot_count = 0
        self.free: list[int] = []  # a heap: the lowest slots are reused, so few slot files are ever made
        self.granted: set[int] = set()
        self.slot_task: dict[int, tuple[int, int]] = {}  # slot -> (epoch, nbytes) of the task in it
        # Taken slots whose arrays the training loop holds: their bytes are the loop's, outside the bound
        # (else a loop keeping views worth the bound would wait for ever for the next task's slot).
        self.lent: set[int] = set()
        self.held_bytes = 0  # of the taken slots not lent
        # Measured, kept across epochs: the plan of the next epoch follows them.
        self.task_times: deque[float] = deque(maxlen=64)  # a median: stragglers must not raise it
        self.row_service: deque[float] = deque(maxlen=64)  # teacher time per row
        self.task_sizes: deque[int] = deque(maxlen=64)
        self.recent_task_bytes: deque[int] = deque(maxlen=8)  # bytes of the latest tasks: what a grant may cost
        self.row_bytes = 0

    def add_worker(self, identity: bytes, teacher: str) -> None:
        self.workers[identity] = WorkerState(teacher)  # its teacher's stats start with its first word of it

    def retire_worker(self, identity: bytes) -> None:
        """Its teacher left: no new tasks; what it holds it finishes or hands back."""
        if identity in self.workers:  # unless it died already
            self.workers[identity].retiring = True

    def worker_gone(self, identity: bytes) -> int:
        """A worker exited: what it held of this epoch is sent again; the count resent."""
        state = self.workers.pop(identity, None)
        resent = 0
        for epoch, task in state.holds if state is not None else ():
            held = self.pending.get(task) if epoch == self.epoch else None
            if held is not None:
                held.holders.pop(identity, None)
                resent += 0 if held.holders else self._requeue(task)
        self.counters.resent += resent
        return resent

    def on_status(self, identity: bytes, status: protocol.Status, now: float) -> None:
        state = self.workers.get(identity)
        if state is None:
            return  # a worker already forgotten
        state.up, state.unusable, state.reason = status.up, status.unusable, status.reason
        state.max_batch_size = status.max_batch_size or state.max_batch_size
        state.instances = max(1, status.instances)
        stats = self.teachers.setdefault(state.teacher, TeacherStats())
        stats.up, stats.changed_at, stats.reason = status.up, now, status.unusable or status.reason
        if not status.up and stats.reason:
            log.warning("teacher %s unavailable: %s", state.teacher, stats.reason)

    def begin(self, epoch: int, now: float) -> Plan:
        """Start ``epoch``: its plan, and room for its slots (slot numbers only grow)."""
        self.epoch, self.active = epoch, True
        self.pending.clear()
        self._queue.clear()
        self._next_expiry = math.inf
        self.produced, self.total, self.highest_done = 0, None, -1
        self._blocked = self._down_since = None
        self.last_progress = now
        task_rows, in_flight = self.plan(len(self.workers))
        window = max(self.options.window, 3 * in_flight * len(self.workers))  # every worker busy, as much queued
        self.plan_now = Plan(task_rows, in_flight, window, max(1, window // 4))
        wanted = window + self.plan_now.keep_limit
        self.free.extend(range(self.slot_count, wanted))  # each bigger than every slot there: still a heap
        self.slot_count = max(self.slot_count, wanted)
        return self.plan_now

    def stop(self, lent: set[int]) -> None:
        """The epoch ended or was abandoned: its slots the training loop does not hold are free, none is sent."""
        self.active = False
        for slot, (epoch, _) in list(self.slot_task.items()):
            if epoch == self.epoch and slot not in lent:
                self.release(slot)
        self._return_grants()
        self.pending.clear()
        self._queue.clear()

    def grants(self) -> list[int]:
        """Free slots the producer may fill now, within ``max_inflight_bytes``: each priced at
        the biggest of the latest tasks, and only one while no task told what a task costs."""
        if not self.active or self.total is not None:
            return []
        typical = max(self.recent_task_bytes, default=0)
        out: list[int] = []
        while self.free:
            if len(self.slot_task) > len(self.lent) or self.granted or out:
                committed = self.held_bytes + (len(self.granted) + len(out) + 1) * typical
                if not typical or committed > self.options.max_inflight_bytes:
                    break
            out.append(heapq.heappop(self.free))
        self.granted.update(out)
        return out

    def lend(self, slot: int) -> None:
        """The training loop got views of a slot's arrays: it holds them until :meth:`release`."""
        held = self.slot_task.get(slot)
        if held is not None and slot not in self.lent:
            self.lent.add(slot)
            self.held_bytes -= held[1]

    def release(self, slot: int) -> None:
        """The training loop let go of a slot's arrays (or never got them)."""
        held = self.slot_task.pop(slot, None)
        if held is not None:
            if slot in self.lent:
                self.lent.discard(slot)
            else:
                self.held_bytes -= held[1]
            heapq.heappush(self.free, slot)

    def _return_grants(self) -> None:
        self.free.extend(self.granted)
        heapq.heapify(self.free)
        self.granted.clear()

    def on_task(self, task: protocol.Task, frames: list[Any]) -> bool:
        """The producer built a task (False: not this epoch's); one the cache answered whole is done at once."""
        if not self.active or task.epoch != self.epoch or task.slot not in self.granted:
            return False
        self.granted.discard(task.slot)
        self.slot_task[task.slot] = (task.epoch, task.nbytes)
        self.held_bytes += task.nbytes
        self.produced += 1
        self.recent_task_bytes.append(task.nbytes)
        if task.rows:
            self.row_bytes = task.nbytes // task.rows
        if task.hits is not None:
            self.counters.cache_hits += task.hits
            self.counters.cache_misses += task.rows - task.hits
        if cached_whole(task):
            self.counters.tasks += 1
            self.counters.samples += task.rows
            self.highest_done = max(self.highest_done, task.task_id)
        else:
            self._hold(task, frames)
        return True

    def redo(self, task: protocol.Task) -> None:
        """A task answered, in part or whole, from a cache no longer trusted: pending again, for a
        teacher to answer every row (its slot is still held: the training loop never got it)."""
        if not self.active or task.epoch != self.epoch or task.task_id in self.pending:
            return
        self.counters.tasks -= 1  # counted again when a teacher answers it
        self.counters.samples -= task.rows
        self.counters.cache_hits -= task.hits or 0
        self._hold(*uncached(task))

    def _hold(self, task: protocol.Task, frames: list[Any]) -> None:
        self.pending[task.task_id] = HeldTask(task, frames)
        self._queue.add(task.task_id)

    def on_end(self, end: protocol.End) -> None:
        """The producer made its last task: the slots it was granted and did not use are free."""
        if self.active and end.epoch == self.epoch and end.error is None:
            self.total = end.tasks
            self._return_grants()

    @property
    def finished(self) -> bool:
        """Every task of the epoch was made and answered."""
        return self.total is not None and self.produced == self.total and not self.pending

    def assignments(self, now: float) -> list[tuple[bytes, HeldTask]]:
        """Queued tasks to workers with room (lowest task first, to the one holding least), each a try sent ``now``."""
        out: list[tuple[bytes, HeldTask]] = []
        if not self.active or not self._queue:
            return out
        cap = self.plan_now.in_flight
        ready = [i for i, s in self.workers.items() if s.up and not s.retiring and len(s.holds) < cap]
        for task_id in sorted(self._queue) if ready else ():
            held = self.pending.get(task_id)
            if held is None:
                self._queue.discard(task_id)  # answered while it waited
                continue
            takers = [i for i in ready if i not in held.holders]
            if not takers:
                continue  # every worker with room holds it already (a straggler's copy): it waits
            best = min(takers, key=lambda i: len(self.workers[i].holds))
            self._queue.discard(task_id)
            held.holders[best] = Try(self.workers[best].teacher, now + self.options.request_timeout)
            held.first_sent = held.first_sent or now
            self._next_expiry = min(self._next_expiry, now + self.options.request_timeout)
            self.workers[best].holds.add((self.epoch, task_id))
            out.append((best, held))
            if len(self.workers[best].holds) >= cap:
                ready.remove(best)
                if not ready:
                    break  # no worker has room: the rest waits
        return out

    def unsent(self, identity: bytes, task_id: int) -> None:
        """A task could not be sent to the worker :meth:`assignments` chose: it waits again."""
        if identity in self.workers:
            self.workers[identity].holds.discard((self.epoch, task_id))
        if task_id in self.pending:
            self.pending[task_id].holders.pop(identity, None)
            self._requeue(task_id)

    def on_done(self, identity: bytes, done: protocol.Done, rows: int, now: float) -> HeldTask | None:
        """A task's answer: the held task if it is the first (to forward), else None.  ``rows`` is
        what every prediction holds (-1: they differ); an answer without one row per sample is a
        failed try, never forwarded (the training loop would get batches short of predictions)."""
        held = self.pending.get(done.task_id) if done.epoch == self.epoch else None
        if held is not None and rows != held.task.rows:
            self.on_undone(identity, protocol.Undone(
                epoch=done.epoch, task_id=done.task_id, code=ErrorCode.INTERNAL,
                message=f"a worker answered a task of {held.task.rows} rows with "
                        + (f"{rows} rows of predictions" if rows >= 0 else "predictions of different lengths")), now)
            return None
        state = self.workers.get(identity)
        if state is not None:
            state.holds.discard((done.epoch, done.task_id))
        if held is None:
            if done.epoch == self.epoch and self.active:
                self.counters.duplicates_dropped += 1
            return None
        del self.pending[done.task_id]
        self.counters.tasks += 1
        self.counters.samples += held.task.rows
        if state is not None:
            stats = self.teachers.setdefault(state.teacher, TeacherStats())
            stats.tasks += 1
            stats.samples += rows
            stats.first_task_at = stats.first_task_at or now
        self.task_sizes.append(rows)
        self.task_times.append(done.elapsed)
        self.row_service.append(done.service / max(1, rows))
        self.last_progress = now
        self.highest_done = max(self.highest_done, done.task_id)
        return held

    def on_undone(self, identity: bytes, undone: protocol.Undone, now: float) -> None:
        """A task handed back (sent elsewhere; a failed try too if its deadline passed and the
        clock did not count it yet) or refused (a failed try, retried up to ``max_retries``)."""
        if identity in self.workers:
            self.workers[identity].holds.discard((undone.epoch, undone.task_id))
        held = self.pending.get(undone.task_id) if undone.epoch == self.epoch else None
        attempt = held.holders.pop(identity, None) if held is not None else None
        if held is None or attempt is None:
            return  # another epoch's, or the word of a worker already forgotten
        stats = self.teachers.setdefault(attempt.teacher, TeacherStats())
        if undone.code == protocol.RETURNED:
            self.counters.returned += 1
            stats.returned += 1
            if now >= attempt.deadline:
                self._fail_try(held, attempt, now)
        else:
            self.counters.failed += 1
            stats.failed += 1
            if not attempt.failed or undone.code in FATAL_CODES:
                self._fail_try(held, attempt, now, undone.code, f"{undone.code}: {undone.message}")
            log.warning("task %d failed (%s), sending it again: %s", undone.task_id, undone.code, undone.message)
            self.counters.resent += 1
        if not held.holders:
            self._requeue(undone.task_id)

    def _fail_try(self, held: HeldTask, attempt: Try, now: float, code: str | None = None, why: str = "") -> None:
        """Count a failed try: refused (``code``, ``why``), or unanswered past its deadline (whose clock starts
        again).  Past ``max_retries`` (or refused as hopeless) the epoch fails with a :class:`TeacherError`
        or :class:`TeacherTimeout` naming each teacher tried, why each try failed and how long it took."""
        if code is None:
            attempt.failed, attempt.deadline = True, now + self.options.request_timeout
            self.counters.timed_out += 1
            self.teachers.setdefault(attempt.teacher, TeacherStats()).timed_out += 1
            why = f"no answer within request_timeout ({self.options.request_timeout:g} s)"
            log.warning("task %d: %s from teacher %s", held.task.task_id, why, attempt.teacher)
        held.failures.append((attempt.teacher, why))
        tries = len(held.failures)
        if code not in FATAL_CODES and tries <= self.options.max_retries:
            return
        each = Counter(held.failures)  # in the order they came, alike ones once
        message = (f"task {held.task.task_id} failed {tries} time(s) over {now - held.first_sent:.1f} s (max_retries "
                   f"{self.options.max_retries}): "
                   + "; ".join(f"teacher {t}: {w}" + (f" ({n} times)" if n > 1 else "") for (t, w), n in each.items()))
        raise TeacherTimeout(message) if code is None else TeacherError(message, code)

    def _requeue(self, task_id: int) -> int:
        """Queue a pending task (once); 1 if it was queued, else 0."""
        if task_id not in self.pending or task_id in self._queue:
            return 0
        self._queue.add(task_id)
        return 1

    def check(self, now: float) -> None:
        """Tries past their deadline, the straggler, a stall, the teachers: resend, or raise if waiting cannot help."""
        if not self.active:
            return
        o = self.options
        if now >= self._next_expiry:
            self._next_expiry = math.inf
            for held in self.pending.values():
                for attempt in held.holders.values():
                    if now >= attempt.deadline:
                        self._fail_try(held, attempt, now)
                        self.counters.resent += self._requeue(held.task.task_id)
                    self._next_expiry = min(self._next_expiry, attempt.deadline)
        # The straggler: the lowest pending task, while a later one is answered, is sent again
        # once it stayed lowest that long.
        lowest = min(self.pending, default=None)
        if lowest is None or self.highest_done < lowest:
            self._blocked = None
        elif self._blocked is None or self._blocked[0] != lowest:
            self._blocked = (lowest, now)
        elif now - self._blocked[1] > max(o.straggler_min, o.straggler_factor * median(self.task_times or [0])):
            self.counters.straggler_resends += self._requeue(lowest)
            self._blocked = (lowest, now)
        if self.pending and now - self.last_progress > o.stall_timeout:
            log.warning("no task finished for %.0f s; sending the missing ones again", now - self.last_progress)
            self.last_progress = now
            for task_id in self.pending:
                self.counters.resent += self._requeue(task_id)
        # The teachers: fail at once when every one takes other inputs than this reader's (another
        # model at the address: waiting cannot help), or when none was up for teacher_wait.
        states = [s for s in self.workers.values() if not s.retiring]
        if any(s.up for s in states):
            self._down_since = None
        elif states and all(s.unusable for s in states):
            reasons = "; ".join(f"{s.teacher}: {s.unusable}" for s in states)
            raise ConfigError(f"no teacher can take this reader's inputs ({reasons})")
        else:
            self._down_since = self._down_since or now
            if now - self._down_since > o.teacher_wait:
                why = {s.teacher: s.reason for s in states}
                names = ", ".join(f"{t} ({r})" if r else t for t, r in why.items()) or "none"
                raise TeacherTimeout(f"no teacher answered for {o.teacher_wait:.0f} s (teachers: {names})")

    def plan(self, workers: int) -> tuple[int, int]:
        """Rows per task and tasks per worker for the next epoch, from the teacher time measured.

        A task is the unit of load balancing and an epoch ends with its slowest task: big tasks are
        cheapest with fast teachers (the pipeline's cost is per message), but leave slow teachers
        idle at an epoch's start and end.  So a task holds about ``task_seconds`` of teacher time
        (at least one request, at most ``task_rows``), and a worker holds about ``queue_seconds`` in
        flight, so its teacher never waits for the next task: up to 8 (or ``max_in_flight``) while
        all workers together hold no more than ``window`` full-size tasks' bytes, and at least
        ``(instances + 1) * max_batch_size`` rows (from the teacher's meta: a batch on each of its
        instances and one more) within ``max_inflight_bytes`` and ``max_in_flight``.
        """
        o = self.options
        if not self.row_service:
            return o.task_rows, o.in_flight
        per_row = median(self.row_service)
        floor = min(o.request_rows, o.task_rows)
        fit = int(o.task_seconds / per_row) if per_row > 0 else o.task_rows
        rows = max(floor, min(o.task_rows, fit // floor * floor))
        cap = o.max_in_flight or _DEEP_MAX
        deep = math.ceil(o.queue_seconds / (per_row * rows)) if per_row > 0 else cap
        task_bytes = min(o.task_bytes, rows * self.row_bytes)
        fits = o.window * o.task_bytes // (max(1, workers) * task_bytes) if task_bytes > 0 else cap
        wanted = max(((s.instances + 1) * s.max_batch_size for s in self.workers.values()), default=0)
        fill = 0
        if wanted and self.row_bytes:
            per_task = max(1, int(median(self.task_sizes or [rows])))
            fill = min(math.ceil(wanted / per_task), o.max_in_flight or wanted,
                       o.max_inflight_bytes // (max(1, workers) * per_task * self.row_bytes))
        return rows, max(o.in_flight, min(cap, deep, fits), fill)
