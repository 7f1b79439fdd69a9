"""Fair shares: of one teacher between its students, and of a service's teachers between trainers.

A real teacher process serving a 10 ms function (256 rows per call at most) and three
students, each a thread with its own :class:`~zdistill.client.TeacherClient` (its own
ROUTER identity), streaming requests of 32 rows with 12, 24 and 64 of them in flight.
A first-come-first-served teacher hands out shares in proportion to those windows
(Jain's index about 0.6); the teacher's fair queueing must give each the same rows,
counted by the students themselves over one common window.  No rate is asserted, only
the shares, and every answer is checked against the function computed here.

Then the balancer's part, as real processes: the trainers of one data-parallel job (one
student each) split a service's teachers evenly, without sharing any.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from tests import daemons, procs
from tests.teachers import softmax_np
from tests.test_balancer import _wait_teachers, add_teacher
from zdistill.client import TeacherClient
from zdistill.discovery.client import DiscoveryClient

ROWS = 32
WINDOWS = [12, 24, 64]
WARMUP_S, MEASURED_S = 1.0, 3.0
TIMEOUT = 30.0


def jain(shares: list[int]) -> float:
    return sum(shares) ** 2 / (len(shares) * sum(s * s for s in shares))


class Student(threading.Thread):
    """Keeps ``window`` requests in flight until ``end``; counts the rows answered in [start, end)."""

    def __init__(self, endpoint: str, window: int, seed: int, start: float, end: float) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.window, self.start_at, self.end = endpoint, window, start, end
        self.feeds = {"img": np.random.default_rng(seed).random((ROWS, 784), dtype=np.float32)}
        self.counted = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        client = TeacherClient(self.endpoint, timeout=TIMEOUT)
        try:
            expected = softmax_np(self.feeds["img"])
            in_flight = 0
            while time.monotonic() < self.end or in_flight:
                while time.monotonic() < self.end and in_flight < self.window:
                    client.submit("predict", self.feeds)
                    in_flight += 1
                for completion in client.collect(wait=TIMEOUT):
                    in_flight -= 1
                    if completion.error is not None:
                        raise completion.error
                    assert completion.result is not None
                    np.testing.assert_allclose(completion.result["prob"], expected, rtol=1e-5, atol=1e-7)
                    if self.start_at <= time.monotonic() < self.end:
                        self.counted += ROWS
        except BaseException as exc:  # reported by the test, which joins every thread
            self.failure = exc
        finally:
            client.close()


def test_three_students_get_equal_shares_of_one_teacher_whatever_they_keep_queued(start_teacher) -> None:
    teacher = start_teacher(f"{procs.TEACHERS}:slow_softmax", "--max-batch-size", "256",
                            env={"ZDISTILL_TEST_DELAY_MS": "10"})
    start = time.monotonic() + WARMUP_S
    students = [Student(teacher.endpoint, window, seed, start, start + MEASURED_S)
                for seed, window in enumerate(WINDOWS)]
    for s in students:
        s.start()
    for s in students:
        s.join(WARMUP_S + MEASURED_S + TIMEOUT)
    assert not any(s.is_alive() for s in students), "a student did not finish"
    for s in students:
        if s.failure is not None:
            raise s.failure
    shares = [s.counted for s in students]
    stats = procs.teacher_stats(teacher.endpoint)
    assert min(shares) > 0 and stats["merged_batches"] > 0, (shares, stats)
    assert jain(shares) >= 0.98, shares
    assert min(shares) >= 0.9 * sum(shares) / len(shares), shares


def test_two_trainers_of_one_job_get_two_of_four_teachers_each(redis_server, store, tmp_path, stopper, clients):
    teachers = [f"10.0.0.{i}:7000" for i in range(1, 5)]
    for address in teachers:
        add_teacher(store, address)
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(bal)
    trainers = [DiscoveryClient(bal.endpoint, "svc", 4, f"job-rank{rank}") for rank in range(2)]
    clients.extend(trainers)
    for trainer in trainers:
        trainer.start()
    got = [_wait_teachers(trainer, lambda ts: len(ts) == 2)[1] for trainer in trainers]
    assert sorted(got[0] + got[1]) == teachers  # disjoint, and every teacher in use
