"""The student's worker processes: one per teacher, started, watched, restarted with back-off.

Workers run ``python -m zdistill.student.worker`` (never forked: they carry none of the student's
state) with the student's ``sys.path`` as ``PYTHONPATH``, so they find what the training script
found.  One that exits is replaced at once, but while a teacher's workers keep dying young,
restarts back off (0.25 s doubling to 5 s), and a few in a row that die before saying they
started (a broken environment) end the epoch with a :class:`~zdistill.errors.WorkerError`
quoting their stderr's last lines, rather than restart thousands of times a minute until the
student runs out of file descriptors.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from zdistill.errors import WorkerError
from zdistill.student.protocol import describe_exit

log = logging.getLogger(__name__)

MAX_START_FAILURES = 3  # workers of one teacher dying before they started, in a row: the epoch fails
_BACKOFF_FIRST = 0.25  # seconds before the second restart in a row of young deaths; doubles with each...
_BACKOFF_MAX = 5.0  # ...up to this
_YOUNG = 30.0  # a worker that dies younger than this counts towards the back-off
_STOP_WAIT = 3.0  # how long close() waits for workers to finish before SIGKILL
_RELAY_WAIT = 1.0  # how long an exited worker's relay may take to copy what is left in its pipe


@dataclass
class WorkerProc:
    """One worker process and what the student knows of it."""

    teacher: str
    popen: subprocess.Popen
    identity: bytes  # its name on the dispatcher's socket (one per process, never reused)
    relay: threading.Thread  # copies its stderr, filling tail
    tail: deque[bytes]  # the last lines it wrote to stderr
    started_at: float = field(default_factory=time.monotonic)
    started: bool = False  # it said hello: a later exit is a crash, not a failed start


def _relay(pipe: BinaryIO, tail: deque[bytes]) -> None:
    """Copy a worker's stderr to the student's, line by line, until the worker exits: in a thread,
    so that a worker never blocks on a full pipe, and with :func:`os.write`, so that it holds no
    lock (``sys.stderr``'s) that the producer, forked from the student, could inherit held."""
    with pipe:
        for line in pipe:
            tail.append(line)
            try:
                os.write(2, line)
            except OSError:
                pass  # no stderr to copy to: the tail is still kept


class WorkerPool:
    """Owns the worker processes of one DistillReader, for the dispatcher thread (which tells the
    scheduler which started, retired and died).  ``command(teacher, identity)``: a command line."""

    def __init__(self, command: Callable[[str, bytes], list[str]]) -> None:
        self.command = command
        self.workers: dict[str, WorkerProc] = {}  # the current teachers' workers
        self.retiring: list[WorkerProc] = []  # workers of teachers gone, finishing their requests
        self.spawned = 0  # workers started so far: each gets an identity of its own
        self.restarted = 0
        self._deaths: Counter[str] = Counter()  # per teacher: workers that died young in a row
        self._failed_starts: Counter[str] = Counter()  # per teacher: workers that died before starting, in a row
        self._restart_at: dict[str, float] = {}  # per teacher whose worker died: when to start the next

    def set_teachers(self, teachers: Iterable[str]) -> tuple[list[WorkerProc], list[WorkerProc]]:
        """Start a worker for each new teacher, retire those of teachers gone: (started, retired)."""
        wanted = dict.fromkeys(teachers)
        started = [self._spawn(teacher) for teacher in wanted if teacher not in self.workers]
        retired = [self.workers.pop(teacher) for teacher in list(self.workers) if teacher not in wanted]
        for proc in retired:
            self._restart_at.pop(proc.teacher, None)
            if proc.popen.poll() is None:
                proc.popen.terminate()  # it finishes its requests in flight, then exits
        self.retiring += retired
        return started, retired

    def mark_started(self, identity: bytes) -> None:
        """The worker said hello: it runs."""
        for proc in self.workers.values():
            if proc.identity == identity:
                proc.started = True

    def _spawn(self, teacher: str) -> WorkerProc:
        """Start the teacher's worker (its entry in ``workers``) under an identity of its own."""
        self.spawned += 1
        identity = b"w%d" % self.spawned
        paths = [os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if os.path.exists(p)))}
        popen = subprocess.Popen(self.command(teacher, identity), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 close_fds=True, env=env)
        tail: deque[bytes] = deque(maxlen=20)
        relay = threading.Thread(target=_relay, args=(popen.stderr, tail), name=f"zdistill-stderr-{popen.pid}",
                                 daemon=True)
        relay.start()
        proc = self.workers[teacher] = WorkerProc(teacher, popen, identity, relay, tail)
        return proc

    def reap(self, now: float) -> tuple[list[WorkerProc], list[WorkerProc], WorkerError | None]:
        """Forget exited workers, replace the current teachers' after their back-off: (exited, started,
        failed).  ``failed`` is a :class:`WorkerError` once a teacher's failed to start
        :data:`MAX_START_FAILURES` times in a row; the caller raises it after forgetting the exited
        (so the scheduler keeps no state of a worker that is gone)."""
        died = [p for p in self.retiring if p.popen.poll() is not None]
        self.retiring = [p for p in self.retiring if p.popen.returncode is None]
        started: list[WorkerProc] = []
        failed = None
        for teacher, proc in list(self.workers.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            if teacher not in self._restart_at:
                died.append(proc)
                try:
                    delay = self._died(proc, code, now)
                except WorkerError as exc:  # said once; the next try comes later
                    failed, delay = exc, _BACKOFF_MAX
                self._restart_at[teacher] = now + delay
            if now >= self._restart_at[teacher]:
                del self._restart_at[teacher]
                self.restarted += 1
                started.append(self._spawn(teacher))
        return died, started, failed

    def _died(self, proc: WorkerProc, code: int, now: float) -> float:
        """Count a worker's death; the back-off before its replacement (or WorkerError)."""
        teacher, how = proc.teacher, describe_exit(code)
        proc.relay.join(_RELAY_WAIT)  # it reads to the end of the pipe first
        tail = b"".join(proc.tail).decode(errors="replace").strip()
        self._failed_starts[teacher] = 0 if proc.started else self._failed_starts[teacher] + 1
        if self._failed_starts[teacher] >= MAX_START_FAILURES:
            raise WorkerError(f"the worker process for teacher {teacher} could not start "
                              f"({self._failed_starts[teacher]} tries, the last {how}); "
                              f"it printed:\n{tail or '(nothing)'}")
        deaths = self._deaths[teacher] = self._deaths[teacher] + 1 if now - proc.started_at < _YOUNG else 1
        delay = 0.0 if deaths == 1 else min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (deaths - 2))
        log.warning("worker for teacher %s %s; starting another in %.2f s%s", teacher, how, delay,
                    f"; it printed:\n{tail}" if tail else "")
        return delay

    def close(self) -> None:
        """Stop every worker by PID (SIGTERM, then SIGKILL after a few seconds)."""
        everyone = [*self.workers.values(), *self.retiring]
        for proc in everyone:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        deadline = time.monotonic() + _STOP_WAIT
        for proc in everyone:
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for proc in everyone:
            proc.relay.join(_RELAY_WAIT)
        self.workers.clear()
        self.retiring.clear()
