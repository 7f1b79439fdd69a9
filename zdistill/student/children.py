"""What the student's child processes share: the producer (forked) and the workers (spawned).

Both talk to the dispatcher over a socket whose queue may be full, and both must
leave at once when the student dies (nobody waits for them, and the producer holds
the user's dataset); the student tells how either one ended in the same words.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

import zmq

from zdistill.spec import Tensor
from zdistill.student import protocol

POLL_MS = 100  # how often a blocked child looks whether the student still lives


class ParentGone(Exception):
    """The student process died: the child leaves at once."""


def send_while_parent_lives(sock: zmq.Socket, msg: protocol.Msg, parent_pid: int,
                            arrays: Mapping[str, Tensor] | None = None) -> None:
    """Send ``msg`` to the dispatcher, waiting for room in its queue only while the student
    (``parent_pid``) lives; :class:`ParentGone` once it is gone (its queue never drains)."""
    while True:
        try:
            protocol.send(sock, msg, arrays, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            if os.getppid() != parent_pid:
                raise ParentGone from None
            sock.poll(POLL_MS, zmq.POLLOUT)


def describe_exit(code: int) -> str:
    """An exit code in words (negative: the signal that killed it, as ``Popen.returncode`` and
    ``os.waitstatus_to_exitcode`` say): ``killed by signal 9 (SIGKILL)``, ``exited with code 1``."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal, or one this Python does not name
        name = "unknown"
    return f"killed by signal {-code} ({name})"
