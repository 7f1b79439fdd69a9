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

Each worker's stderr goes through a pipe that :class:`StderrRelay` copies to the
student's stderr, keeping the last lines of each for such error messages.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from zdistill.errors import WorkerError
from zdistill.student.children import describe_exit

log = logging.getLogger(__name__)

MAX_START_FAILURES = 3  # workers of one teacher dying before they started, in a row: the epoch fails
_BACKOFF_FIRST = 0.25  # seconds before the second restart in a row of young deaths; doubles with each...
_BACKOFF_MAX = 5.0  # ...up to this
_YOUNG = 30.0  # a worker that dies younger than this counts towards the back-off
_TAIL_LINES = 20
_STOP_WAIT = 3.0  # how long close() waits for workers to finish before SIGKILL


@dataclass
class WorkerProc:
    """One worker process and what the student knows of its teacher."""

    teacher: str
    popen: subprocess.Popen
    identity: bytes  # its name on the dispatcher's socket (one per process, never reused)
    started_at: float = field(default_factory=time.monotonic)
    started: bool = False  # it said hello: a later exit is a crash, not a failed start


def import_path_env() -> dict[str, str]:
    """The environment for a worker: the student's, with the student's ``sys.path`` as
    ``PYTHONPATH`` (entries made absolute, ``''`` meaning the current folder)."""
    env = dict(os.environ)
    paths = [os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if os.path.exists(p)))
    return env


class StderrRelay:
    """Copies the workers' stderr to the student's, and keeps each one's last lines.

    A thread, because workers also log between epochs, when nothing else in the student
    runs: a pipe nobody drains would block a worker at its next log line.  It writes
    with :func:`os.write` to file descriptor 2, so it never holds a lock (``sys.stderr``'s)
    that the producer, forked from the student, could inherit held.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._new: deque[tuple[int, int]] = deque()  # (pid, fd) to watch, handed to the thread
        self._tails: dict[int, deque[bytes]] = {}
        self._partial: dict[int, bytes] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="zdistill-worker-stderr", daemon=True)
        self._thread.start()

    def watch(self, pid: int, fd: int) -> None:
        self._tails[pid] = deque(maxlen=_TAIL_LINES)
        self._new.append((pid, fd))
        os.write(self._wake_w, b"w")

    def tail(self, pid: int) -> str:
        """The last lines a worker wrote (including an unfinished one)."""
        lines = [*self._tails.get(pid, ()), self._partial.get(pid, b"")]
        return b"".join(lines).decode(errors="replace").strip()

    def forget(self, pid: int) -> None:
        self._tails.pop(pid, None)
        self._partial.pop(pid, None)

    def close(self) -> None:
        self._closing = True
        os.write(self._wake_w, b"x")
        self._thread.join(2.0)

    def _run(self) -> None:
        while not self._closing:
            for key, _ in self._selector.select():
                if key.data is None:
                    os.read(self._wake_r, 512)
                    while self._new:
                        pid, fd = self._new.popleft()
                        os.set_blocking(fd, False)
                        self._selector.register(fd, selectors.EVENT_READ, pid)
                else:
                    self._read(key.fd, key.data)
        for key in list(self._selector.get_map().values()):
            os.close(key.fd)
        os.close(self._wake_w)
        self._selector.close()

    def _read(self, fd: int, pid: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:  # the worker exited
            self._selector.unregister(fd)
            os.close(fd)
            chunk = b"\n" if self._partial.get(pid) else b""
        data = self._partial.pop(pid, b"") + chunk
        done, _, rest = data.rpartition(b"\n")
        if rest:
            self._partial[pid] = rest
        if done:
            lines = (done + b"\n").splitlines(keepends=True)
            self._tails.setdefault(pid, deque(maxlen=_TAIL_LINES)).extend(lines)
            try:
                os.write(2, b"".join(lines))
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
        self.relay = StderrRelay()

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
        assert popen.stderr is not None
        self.relay.watch(popen.pid, os.dup(popen.stderr.fileno()))
        popen.stderr.close()
        return WorkerProc(teacher, popen, identity)

    def reap(self, now: float) -> tuple[list[WorkerProc], list[WorkerProc]]:
        """Forget exited workers and replace the current teachers' (after their back-off).

        Returns the workers that exited and those started in their place.  Raises
        :class:`WorkerError` once a teacher's workers failed to start
        :data:`MAX_START_FAILURES` times in a row.
        """
        died = [p for p in self.retiring if p.popen.poll() is not None]
        for proc in died:
            self.retiring.remove(proc)
            self.relay.forget(proc.popen.pid)
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
                self.relay.forget(proc.popen.pid)
                self.restarted += 1
                self.workers[teacher] = self._spawn(teacher)
                started.append(self.workers[teacher])
        return died, started

    def _died(self, proc: WorkerProc, code: int, now: float) -> float:
        """Count a worker's death; the back-off before its replacement (or WorkerError)."""
        teacher, tail = proc.teacher, self.relay.tail(proc.popen.pid)
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
        self.workers.clear()
        self.retiring.clear()
        self.relay.close()
