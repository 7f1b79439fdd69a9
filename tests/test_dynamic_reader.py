"""DistillReader with dynamic teachers: real Redis, balancer, registers and teachers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests import daemons, procs
from tests.teachers import softmax_np
from zdistill import DistillReader

N, B = 6000, 50
SERVICE = "mnist_teacher"


@pytest.fixture
def cluster(redis_server, tmp_path):
    """Redis + one balancer; ``add_teacher()`` starts a teacher with its register."""
    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    started: list[procs.Proc] = [balancer]

    def add_teacher(port: int = 0) -> tuple[procs.Proc, procs.Proc]:
        teacher = procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp_path, port=port)
        address = teacher.endpoint.replace("tcp://", "")
        register = daemons.start_register(redis_server.endpoint, SERVICE, address, tmp_path)
        started.extend([teacher, register])
        return teacher, register

    yield balancer, add_teacher
    for proc in reversed(started):
        proc.stop()


def epoch(dr: DistillReader, x: np.ndarray, at: int | None = None, action=None) -> None:
    """One epoch, checked: every sample once, in order, with the right prediction."""
    labels, probs = [], []
    for i, (_, label, prob) in enumerate(dr()):
        labels.append(label)
        probs.append(prob)
        if i == at and action is not None:
            action()
    np.testing.assert_array_equal(np.concatenate(labels), np.arange(N))
    np.testing.assert_allclose(np.concatenate(probs), softmax_np(x), rtol=1e-5, atol=1e-6)


def test_teachers_join_and_leave_mid_epoch(cluster):
    balancer, add_teacher = cluster
    x = np.random.default_rng(5).random((N, 784), dtype=np.float32)
    first, first_register = add_teacher()
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_dynamic_teacher(balancer.endpoint, SERVICE, require_max_teacher=3)
        dr.set_batch_generator(lambda: ((x[i : i + B], np.arange(i, min(N, i + B))) for i in range(0, N, B)))
        dr.options.task_rows = B
        joined: list[procs.Proc] = []
        epoch(dr, x, at=5, action=lambda: joined.append(add_teacher()[0]))
        # The newcomer gets work once the balancer has told the student; epochs go on meanwhile.
        deadline = time.monotonic() + 30
        while procs.requests_served(joined[0]) == 0 and time.monotonic() < deadline:
            epoch(dr, x)
        assert procs.requests_served(joined[0]) > 0, "the teacher that joined never got work"

        def leave():
            first_register.stop()  # SIGTERM: the record goes at once
            first.stop()

        epoch(dr, x, at=5, action=leave)
        epoch(dr, x)
        in_use = [name for name, t in dr.stats()["teachers"].items() if t["in_use"]]
        assert in_use == [joined[0].endpoint.replace("tcp://", "")]
