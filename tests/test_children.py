"""The student's child processes: how their exit is told, and a send that gives up once the student is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import zmq

from zdistill.errors import WorkerError
from zdistill.student import protocol
from zdistill.student.protocol import ParentGone, describe_exit, send_while_parent_lives
from zdistill.student.worker_pool import MAX_START_FAILURES, WorkerPool


def test_a_worker_and_a_forked_reader_killed_alike_are_told_alike() -> None:
    spawned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    spawned.kill()
    assert describe_exit(spawned.wait()) == "killed by signal 9 (SIGKILL)"
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    assert describe_exit(os.waitstatus_to_exitcode(status)) == "killed by signal 9 (SIGKILL)"


@pytest.mark.parametrize(("code", "words"), [
    (0, "exited with code 0"),
    (3, "exited with code 3"),
    (-signal.SIGTERM, "killed by signal 15 (SIGTERM)"),
    (-40, "killed by signal 40 (unknown)"),  # a real-time signal has no name: said, not a ValueError
])
def test_an_exit_code_in_words(code: int, words: str) -> None:
    assert describe_exit(code) == words


def test_a_send_with_a_full_queue_gives_up_once_the_parent_is_gone() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)  # never connected: every send finds no room
    sock.setsockopt(zmq.LINGER, 0)
    try:
        with pytest.raises(ParentGone):
            send_while_parent_lives(sock, protocol.Hello(pid=os.getpid()), parent_pid=os.getppid() + 1)
    finally:
        sock.close()
        ctx.term()


def test_a_worker_that_never_starts_is_forgotten_before_its_error_ends_the_epoch() -> None:
    """Workers that exit before they say hello: every one is reported exited (the scheduler then
    forgets it), the last one too, beside the WorkerError that quotes what it printed."""
    broken = [sys.executable, "-c", "import sys; sys.stderr.write('broken on purpose\\n'); sys.exit(3)"]
    pool = WorkerPool(lambda teacher, identity: broken)
    try:
        pool.set_teachers(["127.0.0.1:1"])
        spawned, exited, failed, now = [pool.workers["127.0.0.1:1"]], [], None, 0.0
        while failed is None and len(spawned) <= MAX_START_FAILURES:
            spawned[-1].popen.wait(timeout=30)
            now += 60.0  # past any back-off: the pool takes the clock from its caller
            died, started, failed = pool.reap(now)
            exited += died
            spawned += started
    finally:
        pool.close()
    assert isinstance(failed, WorkerError) and "broken on purpose" in str(failed), failed
    assert [p.identity for p in exited] == [p.identity for p in spawned] and len(exited) == MAX_START_FAILURES
