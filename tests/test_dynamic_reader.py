"""DistillReader with dynamic teachers: real Redis, balancer, registers and teachers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests import cache_teachers, daemons, procs
from tests.teachers import HANG_MARK, softmax_np
from zdistill import DistillReader

N, B = 6000, 50
SERVICE = "mnist_teacher"
CACHE_TEACHERS = Path(cache_teachers.__file__)  # teachers of one model_id and other weights


@pytest.fixture
def cluster(redis_server, tmp_path):
    """Redis + one balancer; ``add_teacher()`` starts a teacher with its register."""
    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    started: list[procs.Proc] = [balancer]

    def add_teacher(port: int = 0, model: str = f"{procs.TEACHERS}:softmax",
                    *extra: str) -> tuple[procs.Proc, procs.Proc]:
        teacher = procs.start_teacher(model, tmp_path, *extra, port=port)
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


@pytest.mark.timeout(180)
def test_each_reader_batch_is_one_models_when_a_services_teachers_differ(cluster, stopper, tmp_path):
    """Two teachers of one service serve other models (one model_id, other weights), and one is
    killed mid-epoch and replaced, at its address, by the other model.  Without the teacher-output
    cache zdistill does not compare teachers' models (README): an epoch may hold both.  What it
    promises is that each reader batch is answered whole by one teacher, so its predictions are one
    model's answers to its rows, never some of each, though each task here is five requests
    (the first answered by the killed teacher, the rest by its successor, would mix them)."""
    balancer, add_teacher = cluster
    rows = 3000
    x = np.random.default_rng(5).random((rows, 784), dtype=np.float32)
    models = {"a": cache_teachers.expected(x, cache_teachers.weights(1)),
              "b": cache_teachers.expected(x, cache_teachers.weights(2))}
    first, _ = add_teacher(model=f"{CACHE_TEACHERS}:model_a")
    add_teacher(model=f"{CACHE_TEACHERS}:model_b")
    port = int(first.endpoint.rsplit(":", 1)[1])

    def replace_first() -> None:
        first.kill()  # mid-task: the requests it did not answer are lost with the connection
        stopper.append(procs.start_teacher(f"{CACHE_TEACHERS}:model_b", tmp_path, port=port))

    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_dynamic_teacher(balancer.endpoint, SERVICE, require_max_teacher=2)
        dr.set_batch_generator(lambda: ((x[i : i + B], np.arange(i, i + B)) for i in range(0, rows, B)))
        dr.options.task_rows, dr.options.request_rows = B, B // 5
        dr.options.max_in_flight = 2  # at most 16 tasks built ahead of the loop: the last ones come after the swap
        seen: list[str] = []
        for epoch_no in range(2):
            labels = []
            for i, (_, label, prob) in enumerate(dr()):
                labels.append(label)
                whose = [name for name, want in models.items()
                         if np.allclose(prob, want[label], rtol=1e-5, atol=1e-6)]
                assert len(whose) == 1, f"epoch {epoch_no}, batch {i}: its rows are not all one model's"
                seen += whose
                if epoch_no == 1 and i == 5:
                    replace_first()
            np.testing.assert_array_equal(np.concatenate(labels), np.arange(rows))
    assert set(seen) == {"a", "b"}
    assert seen[-10:] == ["b"] * 10, "the batches asked after the first teacher was replaced are model b's"


@pytest.mark.timeout(120)
def test_a_task_half_answered_by_a_teacher_replaced_by_another_model_is_asked_again_whole(cluster, stopper,
                                                                                          tmp_path):
    """The service's teacher answers four of the five requests of the epoch's first task and is
    stuck on the fifth (its model call never returns), then is killed and replaced, at its
    address, by another model.  The first four answers are the old model's: the task must be
    asked again whole, so every row of the epoch is the new model's, never a reader batch of
    some rows of each."""
    balancer, add_teacher = cluster
    rows = 1000
    x = np.random.default_rng(5).random((rows, 784), dtype=np.float32)
    x[B - 5, 0] = HANG_MARK  # in the first task's last request
    old, _ = add_teacher(0, f"{procs.TEACHERS}:hang_softmax", "--max-batch-size", str(B // 5))
    port = int(old.endpoint.rsplit(":", 1)[1])
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_dynamic_teacher(balancer.endpoint, SERVICE)
        dr.set_batch_generator(lambda: ((x[i : i + B], np.arange(i, i + B)) for i in range(0, rows, B)))
        dr.options.task_rows, dr.options.request_rows = B, B // 5
        with ThreadPoolExecutor(1) as loop:  # the training loop waits on the first batch meanwhile
            epoch_out = loop.submit(list, dr())
            # One model call at a time, of one request: the first four are answered once the fifth is taken.
            procs.wait_for(lambda: procs.teacher_stats(old.endpoint)["rows"] >= B, 30.0, "the stuck model call")
            old.kill()
            stopper.append(procs.start_teacher(f"{CACHE_TEACHERS}:model_b", tmp_path, port=port))
            out = epoch_out.result(timeout=60)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), np.arange(rows))
    probs = np.concatenate([b[2] for b in out])
    old_rows = np.isclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6).all(axis=1)
    assert not old_rows.any(), f"rows {np.flatnonzero(old_rows)} are the replaced model's"
    np.testing.assert_allclose(probs, cache_teachers.expected(x, cache_teachers.weights(2)), rtol=1e-5, atol=1e-6)
