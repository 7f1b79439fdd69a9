"""The student's worker processes: one per teacher, started, watched, restarted with back-off.

A :class:`WorkerPool` owns every worker process of a DistillReader.  Workers are
started as ``python -m zdistill.student.worker`` (never forked: they carry none of the
student's state) with the student's own import path, so a training script that finds
zdistill (or numpy, pyzmq) only through ``sys.path`` gets workers that find them too.

A worker that exits is replaced at once, but not for ever: while a teacher's workers
keep dying young, restarts back off (0.25 s doubling to 5 s), and a worker that
dies before it could even say it started (an import error, a broken environment) ends
the epoch after a few tries with a :class:`~zdistill.errors.WorkerError` that quotes
what it printed.  Without that limit a broken environment would restart workers
thousands of times a minute, until the student runs out of file descriptors.

Each worker's stderr goes through a pipe that a thread of its own (:func:`_relay`) copies
to the student's stderr, keeping its last lines for such error messages.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from zdistill.errors import WorkerError
from zdistill.student.children import describe_exit

log = logging.getLogger(__name__)

MAX_START_FAILURES = 3  # workers of one teacher dying before they started, in a row: the epoch fails
_BACKOFF_FIRST = 0.25  # seconds before the second restart in a row of young deaths; doubles with each...
_BACKOFF_MAX = 5.0  # ...up to this
_YOUNG = 30.0  # a worker that dies younger than this counts towards the back-off
_TAIL_LINES = 20
_STOP_WAIT = 3.0  # how long close() waits for workers to finish before SIGKILL
_RELAY_WAIT = 1.0  # how long an exited worker's relay may take to copy what is left in its pipe


@dataclass
class WorkerProc:
    """One worker process and what the student knows of its teacher."""

    teacher: str
    popen: subprocess.Popen
    identity: bytes  # its name on the dispatcher's socket (one per process, never reused)
    relay: threading.Thread  # copies its stderr, filling tail
    tail: deque[bytes]  # the last lines it wrote to stderr
    started_at: float = field(default_factory=time.monotonic)
    started: bool = False  # it said hello: a later exit is a crash, not a failed start

    def printed(self) -> str:
        """What it wrote last, once it exited (the relay reads to the end of the pipe first)."""
        self.relay.join(_RELAY_WAIT)
        return b"".join(self.tail).decode(errors="replace").strip()


def import_path_env() -> dict[str, str]:
    """The environment for a worker: the student's, with the student's ``sys.path`` as
    ``PYTHONPATH`` (entries made absolute, ``''`` meaning the current folder)."""
    env = dict(os.environ)
    paths = [os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if os.path.exists(p)))
    return env


def _relay(pipe: BinaryIO, tail: deque[bytes]) -> None:
    """Copy a worker's stderr to the student's, line by line, until the worker exits.

    A thread, so that a worker never blocks on a full pipe, between epochs too, and
    :func:`os.write` to file descriptor 2, so that it never holds a lock (``sys.stderr``'s)
    that the producer, forked from the student, could inherit held.
    """
    with pipe:
        for line in pipe:
            tail.append(line)
            try:
                os.write(2, line)
            except OSError:
                pass  # no stderr to copy to: the tail is still kept


class WorkerPool:
    """Owns the worker processes of one DistillReader (see the module docstring).

    ``command(teacher, identity)`` is the worker's command line.  Used by the dispatcher
    thread only; it tells the scheduler which workers started, retired and died.
    """

    def __init__(self, command: Callable[[str, bytes], list[str]]) -> None:
        self.command = command
        self.workers: dict[str, WorkerProc] = {}  # the current teachers' workers
        self.retiring: list[WorkerProc] = []  # workers of teachers gone, finishing their requests
        self.spawned = 0  # workers started so far: each gets an identity of its own
        self.restarted = 0
        self._deaths: dict[str, int] = {}  # per teacher: workers that died young in a row
        self._failed_starts: dict[str, int] = {}  # per teacher: workers that died before starting, in a row
        self._restart_at: dict[str, float] = {}  # per teacher whose worker died: when to start the next

    def set_teachers(self, teachers: Iterable[str]) -> tuple[list[WorkerProc], list[WorkerProc]]:
        """Start a worker for each new teacher; retire the workers of teachers gone.

        Returns the workers started and those retired.
        """
        wanted = list(dict.fromkeys(teachers))
        started = []
        for teacher in wanted:
            if teacher not in self.workers:
                self.workers[teacher] = self._spawn(teacher)
                started.append(self.workers[teacher])
        retired = []
        for teacher in [t for t in self.workers if t not in wanted]:
            proc = self.workers.pop(teacher)
            self._restart_at.pop(teacher, None)
            retired.append(proc)
            if proc.popen.poll() is None:
                proc.popen.terminate()  # it finishes its requests in flight, then exits
            self.retiring.append(proc)
        return started, retired

    def mark_started(self, identity: bytes) -> None:
        """The worker said hello: it runs."""
        for proc in self.workers.values():
            if proc.identity == identity:
                proc.started = True

    def _spawn(self, teacher: str) -> WorkerProc:
        """Start a worker; it connects to the dispatcher under an identity of its own."""
        self.spawned += 1
        identity = b"w%d" % self.spawned
        popen = subprocess.Popen(self.command(teacher, identity), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 close_fds=True, env=import_path_env())
        tail: deque[bytes] = deque(maxlen=_TAIL_LINES)
        relay = threading.Thread(target=_relay, args=(popen.stderr, tail), name=f"zdistill-stderr-{popen.pid}",
                                 daemon=True)
        relay.start()
        return WorkerProc(teacher, popen, identity, relay, tail)

    def reap(self, now: float) -> tuple[list[WorkerProc], list[WorkerProc]]:
        """Forget exited workers and replace the current teachers' (after their back-off).

        Returns the workers that exited and those started in their place.  Raises
        :class:`WorkerError` once a teacher's workers failed to start
        :data:`MAX_START_FAILURES` times in a row.
        """
        died = [p for p in self.retiring if p.popen.poll() is not None]
        for proc in died:
            self.retiring.remove(proc)
        started = []
        for teacher, proc in list(self.workers.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            if teacher not in self._restart_at:
                died.append(proc)
                self._restart_at[teacher] = now + self._died(proc, code, now)
            if now >= self._restart_at[teacher]:
                del self._restart_at[teacher]
                self.restarted += 1
                self.workers[teacher] = self._spawn(teacher)
                started.append(self.workers[teacher])
        return died, started

    def _died(self, proc: WorkerProc, code: int, now: float) -> float:
        """Count a worker's death; the back-off before its replacement (or WorkerError)."""
        teacher, tail = proc.teacher, proc.printed()
        how = describe_exit(code)
        if not proc.started:
            failed = self._failed_starts[teacher] = self._failed_starts.get(teacher, 0) + 1
            if failed >= MAX_START_FAILURES:
                self._restart_at[teacher] = now + _BACKOFF_MAX  # said once; the next try comes later
                raise WorkerError(
                    f"the worker process for teacher {teacher} could not start ({failed} tries, the last {how}); "
                    f"it printed:\n{tail or '(nothing)'}"
                )
        else:
            self._failed_starts[teacher] = 0
        young = now - proc.started_at < _YOUNG
        deaths = self._deaths[teacher] = self._deaths.get(teacher, 0) + 1 if young else 1
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
