"""The teacher's memory bound, against a real process flooded by a client that never reads.

A client sends valid 784 KiB requests to a 100 ms model as fast as the socket takes them
and never reads a reply.  The teacher must hold at most ``--max-queue-mb`` of requests
(refusing the rest with ``busy``), keep answering ``ping`` / ``meta`` / ``stats`` and a
well-behaved client beside it, and, on SIGTERM with its backlog, exit within seconds.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from tests import procs
from tests.teachers import softmax_np
from zdistill.client import TeacherClient
from zdistill.errors import TeacherError

TIMEOUT = 10.0
QUEUE_MB = 16
MARGIN_MB = 40  # libzmq's buffers (RCVHWM 8 messages), the model's batch, allocator slack
FLOOD_ROWS = 256  # 256 x 784 float32: 784 KiB per request
FLOOD_BYTES = FLOOD_ROWS * 784 * 4


class Flood:
    """A DEALER in its own thread sending valid requests back to back, never reading a reply."""

    def __init__(self, endpoint: str) -> None:
        self.sent = 0
        self._stop = threading.Event()
        x = np.random.default_rng(0).standard_normal((FLOOD_ROWS, 784)).astype(np.float32)
        self._header = msgpack.packb({"kind": "predict", "id": 0, "arrays": [["img", "<f4", [FLOOD_ROWS, 784]]]})
        self._body = x.tobytes()
        self._thread = threading.Thread(target=self._run, args=(endpoint,), name="flood", daemon=True)
        self._thread.start()

    def _run(self, endpoint: str) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            while not self._stop.is_set():
                if sock.poll(50, zmq.POLLOUT):
                    sock.send_multipart([self._header, self._body], copy=False)
                    self.sent += 1
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the flood thread did not stop"


@pytest.fixture
def flooded(start_teacher) -> Iterator[tuple[procs.Proc, Flood]]:
    """A 100 ms teacher with a 16 MiB queue bound, and a flood running against it."""
    teacher = start_teacher(f"{procs.TEACHERS}:slow_softmax", "--max-queue-mb", str(QUEUE_MB), "--instances", "1",
                            env={"ZDISTILL_TEST_DELAY_MS": "100"})
    flood = Flood(teacher.endpoint)
    try:
        yield teacher, flood
    finally:
        flood.stop()


def test_a_flood_stays_within_the_bound_and_others_are_still_served(flooded) -> None:
    teacher, _ = flooded
    proc = psutil.Process(teacher.pid)
    good = TeacherClient(teacher.endpoint, timeout=TIMEOUT)
    try:
        good.ping()
        before = proc.memory_info().rss
        peak = [before]

        def refused_four_bounds() -> bool:
            """Sample the RSS; true once the teacher has refused four times the bound with busy."""
            peak.append(proc.memory_info().rss)
            stats = good.stats(timeout=2.0)  # answered at once, with the queue full
            return stats["errors"].get("busy", 0) * FLOOD_BYTES >= 4 * QUEUE_MB * 2**20

        procs.wait_for(refused_four_bounds, 30, "the teacher to refuse the flood with busy")
        assert QUEUE_MB * 2**20 // 2 < good.stats(timeout=2.0)["held_bytes"] <= QUEUE_MB * 2**20
        good.ping(timeout=2.0)
        assert good.meta(timeout=2.0)["max_queue_bytes"] == QUEUE_MB * 2**20
        # a client holding nothing is let in, by refusing the flooder's newest requests: not busy
        x = np.random.default_rng(1).standard_normal((4, 784)).astype(np.float32)
        np.testing.assert_allclose(good.predict({"img": x})["prob"], softmax_np(x), rtol=1e-5, atol=1e-6)
        peak.append(proc.memory_info().rss)
    finally:
        good.close()
    growth_mb = (max(peak) - before) / 2**20
    assert growth_mb < QUEUE_MB + MARGIN_MB, f"teacher RSS grew by {growth_mb:.0f} MiB under the flood"


def test_sigterm_with_a_backlog_exits_within_seconds(flooded) -> None:
    """With the queue full (~2 s of work) and the flood still sending, SIGTERM: the running
    batch is answered, the queued ones refused, and the process exits 0 within 5 s."""
    teacher, _ = flooded
    good = TeacherClient(teacher.endpoint, timeout=TIMEOUT)
    try:
        procs.wait_for(lambda: good.stats(timeout=2.0)["held_bytes"] > QUEUE_MB * 2**20 // 2, TIMEOUT,
                       "the flood to fill the queue")
        queued = good.submit("predict", {"img": np.zeros((2, 784), np.float32)})
        signalled = time.monotonic()
        teacher.popen.send_signal(signal.SIGTERM)
        assert teacher.popen.wait(TIMEOUT) == 0
        exit_s = time.monotonic() - signalled
        done = {d.req_id: d for d in good.collect(wait=TIMEOUT)}
    finally:
        good.close()
    assert exit_s < 5, f"the teacher took {exit_s:.1f} s to exit"
    assert queued in done, "a queued request got no answer"
    error = done[queued].error
    assert error is None or (isinstance(error, TeacherError) and error.code == "shutting_down"), error
