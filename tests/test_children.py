"""The student's child processes: how their exit is told, and a send that gives up once the student is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import zmq

from zdistill.student import protocol
from zdistill.student.protocol import ParentGone, describe_exit, send_while_parent_lives


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
