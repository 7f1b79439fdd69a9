"""Fair shares: of one teacher between its students, and of a service's teachers between trainers.

A real teacher process serving a 10 ms function (256 rows per call at most) and three
students, each a thread with its own :class:`~zdistill.client.TeacherClient` (its own
ROUTER identity), streaming requests of 32 rows with 12, 24 and 64 of them in flight.
A first-come-first-served teacher hands out shares in proportion to those windows
(Jain's index about 0.6); the teacher's fair queueing must give each the same rows,
counted by the students themselves over one common window.  No rate is asserted, only
the shares, and every answer is checked against the function computed here.

A student declaring weight 2 gets twice the share of the others; a weight out of bounds
is refused.  Then the balancer's part, as real processes: the trainers of one data-parallel job (one
student each) split a service's teachers evenly, without sharing any.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests import daemons, procs
from tests.teachers import softmax_np
from tests.test_balancer import _wait_teachers, add_teacher
from zdistill import wire
from zdistill.client import TeacherClient
from zdistill.discovery.client import DiscoveryClient
from zdistill.errors import ConfigError

ROWS = 32
WINDOWS = [12, 24, 64]
WARMUP_S, MEASURED_S = 1.0, 3.0
TIMEOUT = 30.0


def jain(shares: list[int]) -> float:
    return sum(shares) ** 2 / (len(shares) * sum(s * s for s in shares))


class Student(threading.Thread):
    """Keeps ``window`` requests in flight until ``end``; counts the rows answered in [start, end)."""

    def __init__(self, endpoint: str, window: int, seed: int, start: float, end: float, weight: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.window, self.start_at, self.end, self.weight = endpoint, window, start, end, weight
        self.feeds = {"img": np.random.default_rng(seed).random((ROWS, 784), dtype=np.float32)}
        self.counted = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        client = TeacherClient(self.endpoint, timeout=TIMEOUT, weight=self.weight)
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


def shares(endpoint: str, windows: list[int], weights: list[float]) -> list[int]:
    """Rows each student got over one common window, its students streaming at once."""
    start = time.monotonic() + WARMUP_S
    students = [Student(endpoint, window, seed, start, start + MEASURED_S, weight)
                for seed, (window, weight) in enumerate(zip(windows, weights, strict=True))]
    for s in students:
        s.start()
    for s in students:
        s.join(WARMUP_S + MEASURED_S + TIMEOUT)
    assert not any(s.is_alive() for s in students), "a student did not finish"
    for s in students:
        if s.failure is not None:
            raise s.failure
    return [s.counted for s in students]


def slow_teacher(start_teacher) -> procs.Proc:
    return start_teacher(f"{procs.TEACHERS}:slow_softmax", "--max-batch-size", "256",
                         env={"ZDISTILL_TEST_DELAY_MS": "10"})


def test_three_students_get_equal_shares_of_one_teacher_whatever_they_keep_queued(start_teacher) -> None:
    teacher = slow_teacher(start_teacher)
    got = shares(teacher.endpoint, WINDOWS, [1.0] * len(WINDOWS))
    stats = procs.teacher_stats(teacher.endpoint)
    assert min(got) > 0 and stats["merged_batches"] > 0, (got, stats)
    assert jain(got) >= 0.98, got
    assert min(got) >= 0.9 * sum(got) / len(got), got


def test_a_student_declaring_weight_2_gets_twice_the_share(start_teacher) -> None:
    teacher = slow_teacher(start_teacher)
    got = shares(teacher.endpoint, [32, 32, 32], [1.0, 1.0, 2.0])
    assert min(got) > 0, got
    assert 0.9 <= got[0] / got[1] <= 1.1, got
    assert 1.8 <= got[2] / ((got[0] + got[1]) / 2) <= 2.2, got


def test_a_weight_out_of_bounds_is_refused(start_teacher) -> None:
    teacher = slow_teacher(start_teacher)
    client = TeacherClient(teacher.endpoint, timeout=TIMEOUT)
    try:
        for weight in (0, -1, 1000, "2"):
            wire.send(client.socket, {"kind": "predict", "id": 1, "weight": weight},
                      {"img": np.zeros((1, 784), np.float32)})
            assert client.socket.poll(int(TIMEOUT * 1000))
            reply = wire.decode(client.socket.recv_multipart()).header
            assert (reply["kind"], reply["code"]) == ("error", "bad_request") and "weight" in reply["message"], reply
    finally:
        client.close()
    with pytest.raises(ConfigError, match="weight"):
        TeacherClient(teacher.endpoint, weight=0)


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


def test_a_reader_with_a_share_weight_gets_the_teachers_answers(start_teacher) -> None:
    """Its workers send the weight with every predict, and the teacher serves them: every answer is the model's."""
    from zdistill import DistillReader

    teacher = slow_teacher(start_teacher)
    x = np.random.default_rng(5).random((640, 784), dtype=np.float32)
    with DistillReader(ins=["img"], predicts=["prob"]) as dr:
        dr.options.share_weight = 2.5
        dr.set_fixed_teacher(teacher.endpoint.removeprefix("tcp://"))
        dr.set_batch_generator(lambda: ((x[i:i + 64],) for i in range(0, len(x), 64)))
        probs = np.concatenate([batch[1] for batch in dr()])
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)
