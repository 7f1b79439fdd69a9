"""A student rides through dying teachers and workers, stragglers and stalls (kill tests).

Each test runs a real epoch against real teacher processes and kills or slows some
of them at a chosen point of the epoch (an event: the n-th batch the training loop
receives), then checks every sample arrived exactly once, in order, with the right
prediction.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest

from tests import procs
from tests.procs import run_epoch
from tests.teachers import softmax_np
from zdistill import DistillReader, TeacherTimeout

N, B = 4000, 50


@pytest.fixture
def data():
    rng = np.random.default_rng(11)
    return rng.random((N, 784), dtype=np.float32)


def make_reader(x: np.ndarray, ins=("img", "label")) -> DistillReader:
    dr = DistillReader(ins=list(ins), predicts=["prob"])
    dr.set_batch_generator(lambda: ((x[i : i + B], np.arange(i, min(N, i + B))) for i in range(0, N, B)))
    dr.options.task_rows = B  # many small tasks: more of them are in flight when something dies
    return dr


def check_epoch(batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]], x: np.ndarray) -> None:
    labels = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(N))  # nothing lost, nothing twice, in order
    probs = np.concatenate([b[2] for b in batches])
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)



def test_teacher_killed_mid_epoch_then_back_at_same_address(start_teacher, data, tmp_path):
    keep = start_teacher()
    # A slow victim always holds tasks, so its death really costs the epoch some work.
    slow = {"ZDISTILL_TEST_DELAY_MS": "30"}
    victim = start_teacher(f"{procs.TEACHERS}:slow_softmax", env=slow)
    port = int(victim.endpoint.rsplit(":", 1)[1])
    revived = []

    def kill_and_restart():
        victim.kill()
        revived.append(procs.start_teacher(f"{procs.TEACHERS}:slow_softmax", tmp_path, port=port, env=slow))

    with make_reader(data) as dr:
        dr.set_fixed_teacher([keep.endpoint, victim.endpoint])
        try:
            deadline = time.monotonic() + 20
            while procs.requests_served(victim) == 0 and time.monotonic() < deadline:  # both workers up and busy
                check_epoch(run_epoch(dr), data)
            out = run_epoch(dr, at=10, action=kill_and_restart)
            check_epoch(out, data)
            stats = dr.stats()
            # The worker reconnects to the revived teacher by itself: later epochs use it again.
            while procs.requests_served(revived[0]) == 0 and time.monotonic() < deadline + 20:
                check_epoch(run_epoch(dr), data)
            assert procs.requests_served(revived[0]) > 0, "the revived teacher never got work"
        finally:
            for p in revived:
                p.stop()
    assert stats.get("returned", 0) + stats.get("resent", 0) + stats.get("resend_all", 0) > 0, stats


def test_worker_killed_is_replaced_and_its_tasks_sent_again(start_teacher, data):
    teachers = [start_teacher(), start_teacher()]
    with make_reader(data) as dr:
        dr.set_fixed_teacher([t.endpoint for t in teachers])
        victims = []

        def kill_worker():
            pid = next(iter(dr.stats()["workers"].values()))
            victims.append(pid)
            os.kill(pid, signal.SIGKILL)

        out = run_epoch(dr, at=5, action=kill_worker)
        check_epoch(out, data)
        stats = dr.stats()
        pids = list(stats["workers"].values())
        assert stats["workers_restarted"] == 1
        assert victims[0] not in pids
        assert all(psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_straggler_does_not_hold_the_epoch_hostage(start_teacher, data):
    """One teacher 10x slower than the other: it gets fewer tasks, and a task of it that the
    epoch waits for is sent again to the other; the first answer wins, the late one is dropped."""
    fast = start_teacher(f"{procs.TEACHERS}:slow_softmax", env={"ZDISTILL_TEST_DELAY_MS": "40"})
    slow = start_teacher(f"{procs.TEACHERS}:slow_softmax", env={"ZDISTILL_TEST_DELAY_MS": "400"})
    with make_reader(data) as dr:
        dr.set_fixed_teacher([fast.endpoint, slow.endpoint])
        dr.options.in_flight = 1
        dr.options.straggler_min = 0.1
        out = run_epoch(dr)
        check_epoch(out, data)
        stats = dr.stats()
        per_teacher = dr.stats()["teachers"]
    assert stats["straggler_resends"] > 0, stats
    # The dispatcher forwards only a task's first answer and drops the late one (counted in
    # duplicates_dropped, or dropped with the epoch if it comes after it): check_epoch above
    # saw every sample exactly once.
    assert stats["tasks"] == N // B
    slow_tasks = per_teacher.get(slow.endpoint, {}).get("tasks", 0)
    assert slow_tasks < 0.3 * (N // B), per_teacher  # round-robin would have given it half


def test_every_teacher_gone_waits_then_resumes(start_teacher, data, tmp_path):
    victim = start_teacher()
    port = int(victim.endpoint.rsplit(":", 1)[1])
    revived = []
    with make_reader(data) as dr:
        dr.set_fixed_teacher([victim.endpoint])
        dr.options.teacher_wait = 60
        it = dr()
        out = [next(it) for _ in range(5)]
        victim.kill()
        # The student now waits; bring the teacher back while the loop blocks in next().
        revived.append(procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp_path, port=port))
        try:
            out += list(it)
        finally:
            revived[0].stop()
    check_epoch(out, data)


def test_every_teacher_gone_past_the_bound_raises(start_teacher, data):
    victim = start_teacher()
    with make_reader(data) as dr:
        dr.set_fixed_teacher([victim.endpoint])
        dr.options.teacher_wait = 2
        it = dr()
        next(it)
        victim.kill()
        with pytest.raises(TeacherTimeout, match="no teacher answered for 2 s"):
            list(it)


def test_training_loop_stall_causes_no_spurious_timeouts(start_teacher, data):
    """A loop that stalls for longer than every timeout: no resend, no error, bounded memory."""
    teacher = start_teacher()
    with make_reader(data) as dr:
        dr.set_fixed_teacher([teacher.endpoint])
        dr.options.request_timeout = 2.0  # every timeout shorter than the stall below
        dr.options.stall_timeout = 3.0
        dr.options.straggler_min = 0.5
        rss = []

        def stall():
            me = psutil.Process()
            rss.append(me.memory_info().rss)
            end = time.monotonic() + 4.0
            while time.monotonic() < end:  # a long training step: busy, not waiting on anything
                pass
            rss.append(me.memory_info().rss)

        out = run_epoch(dr, at=3, action=stall)
        check_epoch(out, data)
        stats = dr.stats()
    for what in ("resend_all", "straggler_resends", "failed", "returned"):
        assert stats.get(what, 0) == 0, stats
    assert rss[1] - rss[0] < 50 * 2**20  # the window bounds what piles up while the loop stalls
