"""Every task has a bounded life: a teacher that never answers one batch, or answers ``busy``
for ever, fails the epoch with an error naming it and the time waited, instead of hanging it.

Real ``zdistill-teacher`` processes serve :func:`tests.teachers.hang_softmax`, whose model call
never returns for a batch holding a marked row (the teacher still answers pings and, on its
other instances, other batches).  Each test is bounded by its own timeout, so a hang fails it.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from tests import procs
from tests.teachers import HANG_MARK, softmax_np
from zdistill import DistillReader, TeacherError, TeacherTimeout
from zdistill.client import TeacherClient

N, B = 1000, 50
HUNG_ROW = 520  # in the 11th task: ten tasks are answered before it
HANG = f"{procs.TEACHERS}:hang_softmax"
ONE_TASK = ("--max-batch-size", str(B))  # a model call never merges the stuck task's rows with another's


def data(marked: bool) -> np.ndarray:
    x = np.random.default_rng(5).random((N, 784), dtype=np.float32)
    if marked:
        x[HUNG_ROW, 0] = HANG_MARK
    return x


def make_reader(x: np.ndarray, teachers: list[str], request_timeout: float, max_retries: int) -> DistillReader:
    dr = DistillReader(ins=["img", "label"], predicts=["prob"])
    dr.set_fixed_teacher(teachers)
    dr.set_batch_generator(lambda: ((x[i : i + B], np.arange(i, min(N, i + B))) for i in range(0, N, B)))
    dr.options.task_rows = B
    dr.options.request_timeout = request_timeout
    dr.options.max_retries = max_retries
    dr.options.teacher_wait = 20  # the teacher answers pings: it is never down that long
    return dr


def waited(message: str) -> float:
    """The seconds an error message says the task waited."""
    found = re.search(r"over (\d+\.\d) s", message)
    assert found, message
    return float(found.group(1))


@pytest.mark.timeout(60)
def test_a_batch_the_model_never_returns_fails_the_epoch_naming_the_teacher(start_teacher):
    teacher = start_teacher(HANG, "--instances", "2", *ONE_TASK)
    x = data(marked=True)
    out = []
    with make_reader(x, [teacher.endpoint], request_timeout=1.0, max_retries=1) as dr:
        start = time.monotonic()
        with pytest.raises(TeacherTimeout) as info:
            for batch in dr():
                out.append(batch)
        took = time.monotonic() - start
    teacher.kill()  # its stuck model calls would hold up a SIGTERM's graceful stop
    message = str(info.value)
    assert teacher.endpoint in message and "2 time(s)" in message and "1 s" in message, message
    assert 2.0 <= waited(message) <= took < 20, (message, took)
    assert len(out) == HUNG_ROW // B  # every batch before the stuck one, in order, with its predictions
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), np.arange(len(out) * B))
    np.testing.assert_allclose(np.concatenate([b[2] for b in out]), softmax_np(x[: len(out) * B]), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.timeout(60)
def test_a_teacher_busy_for_ever_fails_the_epoch_naming_it(start_teacher):
    # Another client's request stuck in the only model instance holds the teacher's whole
    # queue bound: every request of the student is refused busy, while pings are answered.
    teacher = start_teacher(HANG, "--instances", "1", "--max-queue-mb", "0.2", "--max-message-mb", "0.2")
    hog = TeacherClient(teacher.endpoint, timeout=3600)
    try:
        hog.submit("predict", {"img": np.full((B, 784), HANG_MARK, np.float32)})
        procs.wait_for(lambda: procs.teacher_stats(teacher.endpoint)["held_bytes"] > 0, 10, "the stuck request")
        with make_reader(data(marked=False), [teacher.endpoint], request_timeout=1.0, max_retries=2) as dr:
            start = time.monotonic()
            with pytest.raises(TeacherError) as info:
                list(dr())
            took = time.monotonic() - start
        assert procs.teacher_stats(teacher.endpoint)["errors"].get("busy", 0) >= 3
    finally:
        hog.close()
        teacher.kill()
    message = str(info.value)
    assert info.value.code == "busy", message
    assert teacher.endpoint in message and "3 time(s)" in message and "busy" in message, message
    assert 1.0 <= waited(message) <= took < 20, (message, took)


@pytest.mark.timeout(60)
def test_a_batch_one_teacher_never_returns_is_answered_by_another(start_teacher):
    """The stuck task is tried elsewhere: the epoch ends whole, every prediction right."""
    hung = start_teacher(HANG, "--instances", "2", *ONE_TASK)
    good = start_teacher()
    x = data(marked=True)
    try:
        with make_reader(x, [hung.endpoint, good.endpoint], request_timeout=1.0, max_retries=3) as dr:
            out = list(dr())
    finally:
        hung.kill()
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), np.arange(N))
    np.testing.assert_allclose(np.concatenate([b[2] for b in out]), softmax_np(x), rtol=1e-5, atol=1e-6)
