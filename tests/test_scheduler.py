"""The dispatcher's bookkeeping (:class:`zdistill.student.scheduler.Scheduler`), driven by plain calls.

No processes, no sockets, no clock: each test feeds the scheduler the messages the
dispatcher thread would and checks what it decides, so a protocol bug fails here in
milliseconds instead of hanging an end-to-end test.
"""

from __future__ import annotations

import msgspec
import pytest

from zdistill.errors import ConfigError, TeacherError, TeacherTimeout
from zdistill.student import protocol
from zdistill.student.options import PipelineOptions
from zdistill.student.pipeline import ReorderBuffer
from zdistill.student.scheduler import Scheduler

T0 = 1000.0  # a monotonic clock's reading; never 0


def wid(i: int) -> bytes:
    return f"w{i}".encode()


def make(workers: int = 2, up: bool = True, epoch: int = 1, **options) -> Scheduler:
    """A scheduler with ``workers`` workers (up, unless told), in ``epoch``.

    ``max_in_flight=2`` keeps the plan at 2 tasks per worker whatever was measured; the
    tries' own clock (``request_timeout``) runs out only in the tests that set it.
    """
    s = Scheduler(PipelineOptions(**{"max_in_flight": 2, "request_timeout": 1e6, **options}))
    for i in range(workers):
        add(s, i, up=up)
    s.begin(epoch, T0)
    return s


def add(s: Scheduler, i: int, up: bool = True) -> bytes:
    s.add_worker(wid(i), f"teacher{i}")
    if up:
        s.on_status(wid(i), protocol.Status(up=True), T0)
    return wid(i)


def task(s: Scheduler, task_id: int, slot: int, nbytes: int = 100, rows: int = 8, epoch: int | None = None):
    return protocol.Task(epoch=s.epoch if epoch is None else epoch, task_id=task_id, slot=slot, rows=rows,
                         nbytes=nbytes, sizes=[rows], shm={})


def produce(s: Scheduler, n: int, nbytes: int = 100, rows: int = 8) -> list[int]:
    """The producer builds ``n`` more tasks (ids in order) in granted slots; their slots."""
    used = []
    for _ in range(n):  # as the producer does: grants come as earlier tasks tell what a task costs
        s.grants()
        assert s.granted, "not enough slots granted"
        slot = min(s.granted)
        assert s.on_task(task(s, s.produced, slot, nbytes, rows), [b"frames"])
        used.append(slot)
    return used


def sent(s: Scheduler, now: float = T0) -> list[tuple[bytes, int]]:
    return [(identity, held.task.task_id) for identity, held in s.assignments(now)]


def done(s: Scheduler, w: bytes, task_id: int, epoch: int | None = None, now: float = T0, elapsed: float = 0.01):
    msg = protocol.Done(epoch=s.epoch if epoch is None else epoch, task_id=task_id, elapsed=elapsed, service=0.01)
    held = s.pending.get(task_id)
    return s.on_done(w, msg, held.task.rows if held is not None else 8, now)


def undone(s: Scheduler, w: bytes, task_id: int, code: str, epoch: int | None = None, now: float = T0) -> None:
    s.on_undone(w, protocol.Undone(epoch=s.epoch if epoch is None else epoch, task_id=task_id, code=code,
                                   message="no"), now)


def holds(s: Scheduler, w: bytes) -> int:
    return len(s.workers[w].holds)


def no_double_free(s: Scheduler) -> None:
    assert len(s.free) == len(set(s.free)), f"a slot is free twice: {list(s.free)}"
    assert not set(s.free) & set(s.slot_task), "a slot is free and holds a task"
    assert not set(s.free) & s.granted, "a slot is free and granted"


# -- credit -----------------------------------------------------------------------


def test_credit_caps_each_worker_at_in_flight_lowest_task_first():
    s = make(workers=2)
    assert s.plan_now.in_flight == 2
    produce(s, 10)
    w0, w1 = wid(0), wid(1)
    assert sent(s) == [(w0, 0), (w1, 1), (w0, 2), (w1, 3)]  # least holding gets the next; ties: the first
    assert sent(s) == []  # both full
    assert holds(s, w0) == holds(s, w1) == 2
    assert done(s, w1, 1) is not None
    assert sent(s) == [(w1, 4)]  # one answer, one more task; still lowest first
    assert done(s, w0, 2) is not None and done(s, w0, 0) is not None
    assert sent(s) == [(w0, 5), (w0, 6)]
    assert holds(s, w0) == holds(s, w1) == 2


def test_the_worker_holding_least_gets_the_next_task():
    s = make(workers=1)
    produce(s, 1)
    assert sent(s) == [(wid(0), 0)]
    w1 = add(s, 1)
    produce(s, 3)
    # w1 holds nothing, w0 one: w1 first; then both hold one: the first of them (w0)
    assert sent(s) == [(w1, 1), (wid(0), 2), (w1, 3)]


def test_workers_not_up_retiring_or_unusable_get_nothing():
    s = make(workers=0)
    silent = add(s, 0, up=False)  # said hello, no status yet
    retiring = add(s, 1)
    s.retire_worker(retiring)
    unusable = add(s, 2, up=False)
    s.on_status(unusable, protocol.Status(up=False, reason="wrong model", unusable="no output 'prob'"), T0)
    went_down = add(s, 3)
    s.on_status(went_down, protocol.Status(up=False, reason="the connection dropped"), T0)
    good = add(s, 4)
    produce(s, 6)
    assert sent(s) == [(good, 0), (good, 1)]
    for w in (silent, retiring, unusable, went_down):
        assert holds(s, w) == 0
    s.on_status(silent, protocol.Status(up=True), T0)
    assert sent(s) == [(silent, 2), (silent, 3)]


def test_a_task_is_never_given_twice_to_the_same_worker():
    s = make(workers=1, stall_timeout=10.0)
    produce(s, 1)
    w0 = wid(0)
    assert sent(s) == [(w0, 0)]
    s.check(T0 + 11.0)  # a stall: task 0 is queued again...
    assert sent(s) == []  # ...but w0, which has room, holds it already
    assert holds(s, w0) == 1
    w1 = add(s, 1)
    assert sent(s) == [(w1, 0)]  # another worker may take a copy
    assert s.pending[0].holders.keys() == {w0, w1}


# -- answers ----------------------------------------------------------------------


def test_the_first_answer_wins_and_a_second_is_dropped():
    s = make(workers=2, stall_timeout=10.0)
    produce(s, 1)
    w0, w1 = wid(0), wid(1)
    assert sent(s) == [(w0, 0)]
    s.check(T0 + 11.0)
    assert sent(s) == [(w1, 0)]  # a copy
    held = done(s, w1, 0, now=T0 + 12.0)
    assert held is not None and held.task.task_id == 0
    assert s.counters.tasks == 1 and s.counters.samples == 8
    assert s.teachers["teacher1"].tasks == 1
    assert done(s, w0, 0) is None
    assert s.counters.duplicates_dropped == 1 and s.counters.tasks == 1
    assert holds(s, w0) == holds(s, w1) == 0


def test_answers_of_an_earlier_epoch_are_ignored_but_free_the_worker():
    s = make(workers=1)
    w0 = wid(0)
    produce(s, 2)
    assert sent(s) == [(w0, 0), (w0, 1)]
    s.stop(set())
    s.begin(2, T0)
    produce(s, 2)
    assert sent(s) == []  # it still holds two tasks of epoch 1: no more than in_flight
    assert done(s, w0, 0, epoch=1) is None  # epoch 1's task 0, not epoch 2's
    assert 0 in s.pending and s.counters.tasks == 0 and s.counters.duplicates_dropped == 0
    assert sent(s) == [(w0, 0)]  # its holding went down by one
    assert holds(s, w0) == 2
    assert done(s, w0, 1, epoch=1) is None
    assert sent(s) == [(w0, 1)]
    assert s.workers[w0].holds == {(2, 0), (2, 1)}


def test_answers_after_an_epoch_stopped_are_not_counted_as_duplicates():
    s = make(workers=1)
    produce(s, 2)
    assert sent(s) == [(wid(0), 0), (wid(0), 1)]
    s.stop(set())  # the training loop broke out of the epoch
    assert done(s, wid(0), 0) is None
    assert holds(s, wid(0)) == 1
    assert s.counters.duplicates_dropped == 0  # no task was sent twice


# -- refusals, hand-backs, workers gone ---------------------------------------------


def test_a_returned_task_goes_elsewhere_without_counting_a_failure():
    s = make(workers=2)
    produce(s, 1)
    w0, w1 = wid(0), wid(1)
    assert sent(s) == [(w0, 0)]
    s.on_status(w0, protocol.Status(up=False, reason="teacher down"), T0)
    undone(s, w0, 0, protocol.RETURNED)
    assert s.counters.returned == 1 and s.teachers["teacher0"].returned == 1
    assert s.counters.failed == 0 and s.counters.resent == 0 and not s.pending[0].failures
    assert holds(s, w0) == 0
    assert sent(s) == [(w1, 0)]
    for _ in range(10):  # hand-backs never fail the epoch
        undone(s, w1, 0, protocol.RETURNED)
        assert sent(s) == [(w1, 0)]


def test_a_refused_task_is_retried_up_to_max_retries_then_fails():
    s = make(workers=1, max_retries=2)
    produce(s, 1)
    w0 = wid(0)
    for attempt in (1, 2):
        assert sent(s) == [(w0, 0)]
        undone(s, w0, 0, "model_error")
        assert s.counters.failed == attempt and s.counters.resent == attempt
        assert s.teachers["teacher0"].failed == attempt
    assert sent(s) == [(w0, 0)]
    with pytest.raises(TeacherError) as info:
        undone(s, w0, 0, "model_error")
    assert info.value.code == "model_error" and "3 time(s)" in str(info.value)


def test_an_answer_short_of_rows_is_a_failed_try_never_forwarded():
    """A worker's answer must hold a prediction for every row of its task; one that does not
    (a worker's bug) would leave batches of the training loop short of predictions."""
    s = make(workers=1, max_retries=1)
    produce(s, 1)
    w0 = wid(0)
    assert sent(s) == [(w0, 0)]
    msg = protocol.Done(epoch=s.epoch, task_id=0, elapsed=0.01, service=0.01)
    assert s.on_done(w0, msg, 3, T0) is None  # 3 rows of 8
    assert s.counters.failed == 1 and s.counters.tasks == 0 and holds(s, w0) == 0
    assert sent(s) == [(w0, 0)]  # asked again
    with pytest.raises(TeacherError) as info:
        s.on_done(w0, msg, -1, T0)  # predictions of different lengths
    assert "a task of 8 rows with predictions of different lengths" in str(info.value)


@pytest.mark.parametrize("code", ["bad_request", "too_large", "bad_message"])
def test_a_fatal_refusal_fails_at_once(code):
    s = make(workers=1, max_retries=5)
    produce(s, 1)
    assert sent(s) == [(wid(0), 0)]
    with pytest.raises(TeacherError) as info:
        undone(s, wid(0), 0, code)
    assert info.value.code == code


def test_a_refusal_of_an_earlier_epoch_is_ignored():
    s = make(workers=1, max_retries=0)
    produce(s, 1)
    assert sent(s) == [(wid(0), 0)]
    s.stop(set())
    s.begin(2, T0)
    undone(s, wid(0), 0, "model_error", epoch=1)  # no raise: nobody waits for it
    assert holds(s, wid(0)) == 0 and s.counters.failed == 0


def test_a_dead_worker_s_tasks_of_this_epoch_are_sent_again():
    s = make(workers=1)
    w0 = wid(0)
    produce(s, 1)
    assert sent(s) == [(w0, 0)]  # epoch 1's task 0: still held at the epoch's end
    s.stop(set())
    s.begin(2, T0)
    w1 = add(s, 1)
    produce(s, 4)
    assert sent(s) == [(w1, 0), (w0, 1), (w1, 2)]  # w0 had room for one
    done(s, w1, 0)
    assert s.worker_gone(w0) == 1  # (2, 1) only: (1, 0) is of another epoch, and epoch 2's 0 is done
    assert s.counters.resent == 1
    assert w0 not in s.workers
    assert sent(s) == [(w1, 1)]  # lowest first: 1 before 3
    assert s.worker_gone(w0) == 0  # forgotten already


def test_a_dead_worker_s_task_held_by_another_too_is_not_queued_again():
    s = make(workers=2, stall_timeout=10.0)
    produce(s, 1)
    w0, w1 = wid(0), wid(1)
    assert sent(s) == [(w0, 0)]
    s.check(T0 + 11.0)
    assert sent(s) == [(w1, 0)]
    assert s.worker_gone(w0) == 0
    assert s.pending[0].holders.keys() == {w1}
    assert sent(s) == []


def test_an_unsent_task_waits_again():
    s = make(workers=1)
    produce(s, 2)
    w0 = wid(0)
    assert sent(s) == [(w0, 0), (w0, 1)]
    s.unsent(w0, 1)
    s.unsent(w0, 0)
    assert holds(s, w0) == 0 and not s.pending[0].holders
    assert sent(s) == [(w0, 0), (w0, 1)]  # in order again, and to w0 again: it never got them
    s.unsent(wid(7), 0)  # a worker unknown: nothing breaks
    assert holds(s, w0) == 2


# -- a task's life: every try has request_timeout -----------------------------------


def test_a_try_unanswered_for_request_timeout_fails_and_its_task_goes_elsewhere():
    s = make(workers=2, request_timeout=5.0, max_retries=1)
    w0, w1 = wid(0), wid(1)
    produce(s, 2)
    assert sent(s) == [(w0, 0)] + [(w1, 1)]
    done(s, w1, 1, now=T0 + 1.0)
    s.check(T0 + 4.9)
    assert s.counters.timed_out == 0 and sent(s, T0 + 4.9) == []
    s.check(T0 + 5.0)  # task 0 waited request_timeout on teacher0: one failed try
    assert s.counters.timed_out == 1 and s.teachers["teacher0"].timed_out == 1
    assert sent(s, T0 + 5.0) == [(w1, 0)]  # tried elsewhere; w0 still holds it (its credit)
    assert holds(s, w0) == 1
    assert done(s, w0, 0, now=T0 + 5.5) is not None  # a late answer still wins
    assert done(s, w1, 0, now=T0 + 6.0) is None
    s.check(T0 + 20.0)
    assert s.counters.timed_out == 1


def test_a_task_unanswered_on_every_try_fails_the_epoch_naming_the_teachers_and_the_time():
    s = make(workers=2, request_timeout=5.0, max_retries=1)
    w0, w1 = wid(0), wid(1)
    produce(s, 1)
    assert sent(s) == [(w0, 0)]
    s.check(T0 + 5.0)
    assert sent(s, T0 + 5.0) == [(w1, 0)]
    undone(s, w0, 0, protocol.RETURNED, now=T0 + 5.02)  # w0's own request timed out too
    s.check(T0 + 9.9)
    with pytest.raises(TeacherTimeout) as info:
        s.check(T0 + 10.0)
    message = str(info.value)
    assert "task 0 failed 2 time(s) over 10.0 s (max_retries 1)" in message, message
    assert "teacher teacher0: no answer within request_timeout (5 s)" in message, message
    assert "teacher teacher1: no answer within request_timeout (5 s)" in message, message


def test_a_hand_back_after_request_timeout_is_a_failed_try_counted_once():
    s = make(workers=1, request_timeout=5.0, max_retries=2)
    w0 = wid(0)
    produce(s, 1)
    assert sent(s) == [(w0, 0)]
    undone(s, w0, 0, protocol.RETURNED, now=T0 + 5.01)  # the worker's request timed out before check() ran
    assert s.counters.timed_out == 1 and s.counters.returned == 1
    s.check(T0 + 5.02)
    assert s.counters.timed_out == 1
    assert sent(s, T0 + 5.3) == [(w0, 0)]  # its teacher is up again
    s.check(T0 + 10.29)
    assert s.counters.timed_out == 1
    s.check(T0 + 10.3)  # ...and times out again: counted by the clock; the hand-back after it is not
    assert s.counters.timed_out == 2


def test_a_hand_back_after_the_clock_counted_the_try_is_not_counted_again():
    s = make(workers=1, request_timeout=5.0, max_retries=1)
    w0 = wid(0)
    produce(s, 1)
    assert sent(s) == [(w0, 0)]
    s.check(T0 + 5.0)
    undone(s, w0, 0, protocol.RETURNED, now=T0 + 5.02)
    assert s.counters.timed_out == 1
    assert s.pending[0].failures == [("teacher0", "no answer within request_timeout (5 s)")]
    assert sent(s, T0 + 5.3) == [(w0, 0)]


def test_hand_backs_within_request_timeout_unsent_tasks_and_dead_workers_are_no_failure():
    s = make(workers=2, request_timeout=5.0, max_retries=0)
    w0, w1 = wid(0), wid(1)
    produce(s, 1)
    for i in range(20):  # a teacher going down and up again many times: never the task's fault
        now = T0 + 4.0 * i
        assert sent(s, now) == [(w0, 0)]
        undone(s, w0, 0, protocol.RETURNED, now=now + 4.0)
        s.check(now + 4.0)
    assert sent(s, T0 + 100.0) == [(w0, 0)]
    s.unsent(w0, 0)  # the send failed: no try
    s.check(T0 + 200.0)
    assert sent(s, T0 + 200.0) == [(w0, 0)]
    assert s.worker_gone(w0) == 1  # its try ends with it
    s.check(T0 + 300.0)
    assert sent(s, T0 + 300.0) == [(w1, 0)]
    assert s.counters.timed_out == 0 and not s.pending[0].failures


def test_a_worker_keeping_a_task_counts_a_failed_try_each_request_timeout():
    """A worker that never answers nor hands back (frozen) cannot hold a task for ever."""
    s = make(workers=1, request_timeout=5.0, max_retries=2)
    produce(s, 1)
    assert sent(s) == [(wid(0), 0)]
    s.check(T0 + 5.0)
    s.check(T0 + 9.9)
    assert s.counters.timed_out == 1
    s.check(T0 + 10.0)
    assert s.counters.timed_out == 2
    with pytest.raises(TeacherTimeout, match=r"task 0 failed 3 time\(s\) over 15.0 s .*\(3 times\)"):
        s.check(T0 + 15.0)


def test_a_busy_refusal_is_a_failed_try_and_one_after_the_timeout_is_not_counted_twice():
    s = make(workers=1, request_timeout=5.0, max_retries=1)
    w0 = wid(0)
    produce(s, 1)
    assert sent(s) == [(w0, 0)]
    s.check(T0 + 5.0)
    undone(s, w0, 0, "busy", now=T0 + 5.1)  # the same try: no second count
    assert len(s.pending[0].failures) == 1 and s.counters.failed == 1
    assert sent(s, T0 + 5.2) == [(w0, 0)]
    with pytest.raises(TeacherError) as info:
        undone(s, w0, 0, "busy", now=T0 + 6.0)
    message = str(info.value)
    assert info.value.code == "busy" and "2 time(s) over 6.0 s" in message, message
    assert "teacher teacher0: no answer within request_timeout (5 s); teacher teacher0: busy: no" in message


# -- slots ----------------------------------------------------------------------


def test_begin_makes_window_plus_keep_limit_slots():
    s = make(workers=0)
    plan = s.plan_now
    assert (plan.window, plan.keep_limit) == (16, 4)  # options.window; a quarter of it
    assert s.slot_count == 20 and list(s.free) == list(range(20))
    s.stop(set())
    s.begin(2, T0)
    assert s.slot_count == 20 and sorted(s.free) == list(range(20))  # the same slots again
    for i in range(4):
        add(s, i)
    s.stop(set())
    plan = s.begin(3, T0)
    assert (plan.window, plan.keep_limit) == (3 * 2 * 4, 6)  # every worker busy and as much queued
    assert s.slot_count == 30 and sorted(s.free) == list(range(30))
    no_double_free(s)


def test_grants_stop_at_max_inflight_bytes():
    s = Scheduler(PipelineOptions(task_rows=1, max_inflight_bytes=350))
    s.recent_task_bytes.append(100)  # the latest task took 100 bytes: what a grant is priced at
    s.begin(1, T0)
    assert s.grants() == [0, 1, 2]  # a fourth would make 400 bytes
    assert s.grants() == []
    assert s.on_task(task(s, 0, 0, nbytes=100, rows=1), [])
    assert s.held_bytes == 100
    assert s.grants() == []  # 100 held + 2 granted
    s.release(0)
    assert s.held_bytes == 0
    assert s.grants() == [0]  # the lowest free slot: few slot files are ever made
    no_double_free(s)


def test_the_first_grant_is_one_slot_until_a_task_tells_what_a_task_costs():
    s = Scheduler(PipelineOptions(max_inflight_bytes=350))
    s.begin(1, T0)
    assert s.grants() == [0] and s.grants() == []
    assert s.on_task(task(s, 0, 0, nbytes=100), [])
    assert s.grants() == [1, 2]  # 100 held, and two more of 100 within 350


def test_a_big_task_still_gets_one_slot():
    s = Scheduler(PipelineOptions(task_rows=1, max_inflight_bytes=50))
    s.recent_task_bytes.append(100)  # bigger than the budget
    s.begin(1, T0)
    assert s.grants() == [0]  # never none at all
    assert s.grants() == []


def test_views_the_loop_holds_do_not_count_against_the_bound():
    """The loop may keep views worth more than ``max_inflight_bytes`` (``list(dr())``): the next
    task still gets a slot, or the loop would wait for it for ever."""
    s = Scheduler(PipelineOptions(task_rows=1, max_inflight_bytes=250))
    s.recent_task_bytes.append(100)
    s.begin(1, T0)
    assert s.grants() == [0, 1]
    for slot in (0, 1):
        assert s.on_task(task(s, slot, slot, nbytes=100, rows=1), [])
        s.lend(slot)  # answered, and the loop holds its views
    assert s.held_bytes == 0
    assert s.grants() == [2, 3]  # as if nothing were held: 200 within 250
    s.lend(0)  # told twice: counted once
    s.release(0)
    s.release(0)
    assert s.held_bytes == 0 and s.lent == {1}
    no_double_free(s)


def test_on_task_takes_only_a_task_in_a_granted_slot_of_this_epoch():
    s = Scheduler(PipelineOptions(task_rows=1, max_inflight_bytes=200))
    s.recent_task_bytes.append(100)
    s.begin(1, T0)
    assert s.grants() == [0, 1]
    assert not s.on_task(task(s, 0, 5), [])  # not granted
    assert not s.on_task(task(s, 0, 0, epoch=0), [])  # another epoch
    assert s.on_task(task(s, 0, 0), [])
    assert not s.on_task(task(s, 1, 0), [])  # granted once, used once
    assert s.produced == 1 and list(s.pending) == [0] and s.granted == {1}
    s.stop(set())
    s.begin(2, T0)
    assert not s.on_task(task(s, 0, 1, epoch=1), [])  # the old epoch's grant is gone
    assert not s.on_task(task(s, 0, 1), [])  # ...and not granted in this one yet
    no_double_free(s)


def test_a_task_is_refused_while_no_epoch_runs():
    s = make(workers=0)
    slots = s.grants()
    s.stop(set())
    assert not s.on_task(task(s, 0, slots[0]), [])
    assert s.grants() == []  # nothing is granted between epochs
    no_double_free(s)


def test_release_frees_a_slot_once():
    s = make(workers=1)
    (slot,) = produce(s, 1)
    free_before = len(s.free)
    s.release(slot)
    s.release(slot)
    assert len(s.free) == free_before + 1 and s.held_bytes == 0
    no_double_free(s)


def test_release_of_a_slot_granted_but_unused_does_nothing():
    s = make(workers=0)
    slots = s.grants()
    s.release(slots[0])
    assert slots[0] in s.granted and slots[0] not in s.free
    no_double_free(s)


def test_stop_frees_every_slot_but_the_lent_ones_and_a_lent_slot_is_freed_once():
    s = make(workers=1)
    slots = produce(s, 4)
    assert sent(s) == [(wid(0), 0), (wid(0), 1)]
    done(s, wid(0), 0)  # the training loop got task 0 and holds its arrays
    lent = {slots[0]}
    s.release(slots[1])  # a copy: the slot was let go of at once
    s.stop(lent)
    no_double_free(s)
    assert sorted(s.free) == sorted(set(range(s.slot_count)) - lent)
    assert not s.granted and not s.pending and s.held_bytes == 100
    assert sent(s) == []  # nothing more of the epoch goes out
    s.release(slots[0])  # the loop let go, after the epoch
    s.release(slots[0])
    no_double_free(s)
    assert sorted(s.free) == list(range(s.slot_count)) and s.held_bytes == 0


def test_a_slot_lent_in_an_earlier_epoch_stays_taken_until_released():
    s = make(workers=0)
    (kept,) = produce(s, 1)
    s.stop({kept})
    s.begin(2, T0)
    produce(s, 2)
    s.stop(set())  # epoch 2's stop does not free epoch 1's lent slot
    assert kept not in s.free and kept in s.slot_task
    no_double_free(s)
    s.release(kept)
    assert sorted(s.free) == list(range(s.slot_count))
    no_double_free(s)


def test_on_end_returns_unused_grants_and_stops_granting():
    s = make(workers=0)
    produce(s, 3)
    assert len(s.granted) == s.slot_count - 3
    s.on_end(protocol.End(epoch=s.epoch - 1, tasks=99))  # another epoch's: ignored
    assert s.total is None and s.granted
    s.on_end(protocol.End(epoch=s.epoch, tasks=3))
    assert s.total == 3 and not s.granted and len(s.free) == s.slot_count - 3
    assert s.grants() == []
    no_double_free(s)


def test_an_end_with_an_error_sets_no_total():
    s = make(workers=0)
    produce(s, 1)
    boom = protocol.RaisedError(type="ValueError", module="builtins", message="boom")
    s.on_end(protocol.End(epoch=s.epoch, tasks=1, error=boom))
    assert s.total is None and not s.finished


def test_finished_exactly_when_every_task_made_was_answered():
    s = make(workers=1)
    produce(s, 2)
    assert sent(s) == [(wid(0), 0), (wid(0), 1)]
    assert not s.finished
    done(s, wid(0), 1)
    done(s, wid(0), 0)
    assert not s.finished  # all answered, but the producer may make more
    produce(s, 1)
    s.on_end(protocol.End(epoch=s.epoch, tasks=3))
    assert not s.finished  # task 2 is not answered yet
    assert sent(s) == [(wid(0), 2)]
    done(s, wid(0), 2)
    assert s.finished


def test_an_empty_epoch_is_finished_at_its_end():
    s = make(workers=1)
    assert not s.finished
    s.on_end(protocol.End(epoch=1, tasks=0))
    assert s.finished


# -- supervision -------------------------------------------------------------------


def test_a_straggler_is_sent_again_after_straggler_min():
    s = make(workers=2, straggler_min=0.5, straggler_factor=4.0)
    produce(s, 4)
    w0, w1 = wid(0), wid(1)
    assert sent(s) == [(w0, 0), (w1, 1), (w0, 2), (w1, 3)]
    done(s, w1, 1, now=T0 + 0.1, elapsed=0.01)  # a typical task: 10 ms, so straggler_min rules
    done(s, w1, 3, now=T0 + 0.1, elapsed=0.01)
    s.check(T0 + 0.2)  # task 0 waits while later tasks are done: the clock starts
    s.check(T0 + 0.6)
    assert s.counters.straggler_resends == 0 and sent(s) == []
    s.check(T0 + 0.75)
    assert s.counters.straggler_resends == 1
    assert sent(s) == [(w1, 0)]  # to a worker other than its holder
    assert done(s, w1, 0, now=T0 + 0.8) is not None
    assert done(s, w0, 0, now=T0 + 0.9) is None  # the straggler's own answer
    assert s.counters.duplicates_dropped == 1


def test_a_typical_task_time_longer_than_straggler_min_sets_the_limit():
    s = make(workers=2, straggler_min=0.5, straggler_factor=4.0)
    produce(s, 2)
    w0, w1 = wid(0), wid(1)
    assert sent(s) == [(w0, 0), (w1, 1)]
    done(s, w1, 1, now=T0 + 1.0, elapsed=1.0)  # a typical task: 1 s, so a straggler is 4 s late
    s.check(T0 + 1.0)
    s.check(T0 + 4.5)
    assert s.counters.straggler_resends == 0
    s.check(T0 + 5.5)
    assert s.counters.straggler_resends == 1 and sent(s) == [(w1, 0)]


def test_no_straggler_while_the_lowest_pending_task_is_the_latest():
    s = make(workers=2, straggler_min=0.5)
    produce(s, 2)
    assert sent(s) == [(wid(0), 0), (wid(1), 1)]
    done(s, wid(0), 0, now=T0)
    s.check(T0 + 1.0)
    s.check(T0 + 30.0)  # task 1 is slow, but nothing after it was done
    assert s.counters.straggler_resends == 0 and sent(s) == []


def test_a_stall_sends_every_pending_task_again():
    s = make(workers=1, stall_timeout=60.0)
    w0 = wid(0)
    produce(s, 3)
    assert sent(s) == [(w0, 0), (w0, 1)]  # task 2 waits for room
    w1 = add(s, 1, up=False)
    s.check(T0 + 59.0)
    assert s.counters.resent == 0
    s.on_status(w1, protocol.Status(up=True), T0 + 59.0)
    assert sent(s) == [(w1, 2)]  # only what waited: no copies before the stall
    s.check(T0 + 61.0)  # nothing answered for 61 s
    assert s.counters.resent == 3  # 0, 1 (held by w0) and 2 (held by w1) queued again
    w2 = add(s, 2)
    # copies, each to a worker other than its holder, the least loaded first
    assert sent(s) == [(w2, 0), (w1, 1), (w2, 2)]
    s.check(T0 + 62.0)  # the stall clock started again
    assert s.counters.resent == 3


def test_no_stall_while_tasks_finish():
    s = make(workers=1, stall_timeout=60.0)
    produce(s, 3)
    sent(s)
    done(s, wid(0), 0, now=T0 + 50.0)
    s.check(T0 + 100.0)
    assert s.counters.resent == 0


def test_every_worker_unusable_fails_at_once():
    s = make(workers=2, up=False)
    for i in range(2):
        s.on_status(wid(i), protocol.Status(up=False, reason="wrong model", unusable=f"no output 'prob' ({i})"), T0)
    with pytest.raises(ConfigError, match=r"teacher0: no output 'prob' \(0\); teacher1"):
        s.check(T0)


def test_some_workers_unusable_and_others_down_waits_for_teacher_wait():
    s = make(workers=2, up=False, teacher_wait=300.0)
    s.on_status(wid(0), protocol.Status(up=False, reason="wrong model", unusable="no output 'prob'"), T0)
    s.on_status(wid(1), protocol.Status(up=False, reason="cannot be reached"), T0)
    s.check(T0)
    s.check(T0 + 299.0)
    with pytest.raises(TeacherTimeout, match="cannot be reached"):
        s.check(T0 + 301.0)


def test_no_worker_up_for_teacher_wait_times_out():
    s = make(workers=1, up=False, teacher_wait=300.0)
    s.check(T0 + 1.0)
    s.check(T0 + 300.0)
    with pytest.raises(TeacherTimeout, match="300 s"):
        s.check(T0 + 301.5)


def test_a_worker_up_again_restarts_the_teacher_wait():
    s = make(workers=1, teacher_wait=300.0)
    w0 = wid(0)
    s.check(T0)
    s.on_status(w0, protocol.Status(up=False, reason="restarting"), T0 + 10.0)
    s.check(T0 + 10.0)
    s.on_status(w0, protocol.Status(up=True), T0 + 200.0)
    s.check(T0 + 200.0)
    s.on_status(w0, protocol.Status(up=False, reason="restarting"), T0 + 250.0)
    s.check(T0 + 250.0)
    s.check(T0 + 500.0)  # down 250 s, not 490 s
    with pytest.raises(TeacherTimeout):
        s.check(T0 + 551.0)


def test_retiring_workers_do_not_count_as_up():
    s = make(workers=1, teacher_wait=10.0)
    s.retire_worker(wid(0))
    s.check(T0)
    with pytest.raises(TeacherTimeout):
        s.check(T0 + 11.0)


def test_check_does_nothing_between_epochs():
    s = make(workers=0, teacher_wait=1.0, stall_timeout=1.0)
    s.stop(set())
    s.check(T0 + 1000.0)


# -- the plan ----------------------------------------------------------------------


def test_plan_sizes_tasks_and_queues_by_teacher_time():
    """The rule behind the adaptive task size and depth, on measured teacher times per row."""
    s = Scheduler(PipelineOptions())
    assert s.plan(workers=1) == (1024, 2)  # nothing measured: the options as they are
    s.row_bytes = 784 * 4
    s.row_service.extend([10e-3 / 256] * 5)  # a GPU call of 10 ms per 256 rows
    assert s.plan(workers=4) == (256, 4)  # one request per task, 40 ms of them in flight
    assert s.plan(workers=8) == (256, 4)  # 32 tasks of 0.8 MB: within 16 tasks of 4 MiB
    s.row_service.extend([2e-6] * 10)  # a fast teacher: 1024 rows take 2 ms
    assert s.plan(workers=1) == (1024, 8)  # big tasks, a deep queue
    assert s.plan(workers=2) == (1024, 8)
    assert s.plan(workers=4) == (1024, 5)  # all workers together hold about 16 tasks of 4 MiB
    assert s.plan(workers=16) == (1024, 2)  # never fewer than options.in_flight
    s.row_service.extend([20e-3 / 256] * 30)  # 20 ms per request: two tasks are 40 ms already
    assert s.plan(workers=1) == (256, 2)


def test_plan_keeps_a_teachers_batches_full():
    """Small tasks: enough in flight for ``(instances + 1) * max_batch_size`` rows."""
    s = Scheduler(PipelineOptions(task_rows=8, request_rows=8))
    s.add_worker(wid(0), "t")
    s.on_status(wid(0), protocol.Status(up=True, max_batch_size=64, instances=2), T0)
    s.row_bytes = 4
    s.row_service.extend([1e-3] * 5)  # 8 ms per 8-row task: 5 tasks fill queue_seconds
    s.task_sizes.extend([8] * 5)
    assert s.plan(workers=1) == (8, 24)  # (2 + 1) * 64 rows / 8 rows per task
    s.options.max_in_flight = 10
    assert s.plan(workers=1) == (8, 10)


def test_begin_uses_the_plan():
    s = Scheduler(PipelineOptions())
    s.add_worker(wid(0), "t")
    s.row_bytes = 784 * 4
    s.row_service.extend([10e-3 / 256] * 5)
    plan = s.begin(1, T0)
    assert (plan.task_rows, plan.in_flight) == (256, 4)
    assert plan.window == 16 and plan.keep_limit == 4


# -- the reorder buffer ------------------------------------------------------------


def test_reorder_buffer_yields_in_order():
    buf: ReorderBuffer[str] = ReorderBuffer()
    buf.add(2, "c")
    buf.add(1, "b")
    assert buf.pop_next() is None and len(buf) == 2
    buf.add(0, "a")
    assert [buf.pop_next() for _ in range(4)] == ["a", "b", "c", None]
    assert buf.next_id == 3 and len(buf) == 0


def test_reorder_buffer_ignores_ids_already_yielded():
    buf: ReorderBuffer[str] = ReorderBuffer()
    buf.add(0, "a")
    assert buf.pop_next() == "a"
    buf.add(0, "a again")  # a straggler's second answer
    assert len(buf) == 0 and buf.pop_next() is None
    buf.add(1, "b")
    assert buf.pop_next() == "b" and buf.next_id == 2


def test_a_queued_copy_no_worker_can_take_does_not_block_the_tasks_behind_it():
    """A straggler's copy that only its own worker could take waits; later tasks still go."""
    s = make(workers=1)
    w = wid(0)
    produce(s, 2)
    assert sent(s) == [(w, 0), (w, 1)]
    done(s, w, 1)  # task 1 answered, task 0 late
    s.check(T0 + 1)  # task 0 blocks the order from now...
    s.check(T0 + 10)  # ...past straggler_min: it is queued again, but w already holds it
    assert s.counters.straggler_resends == 1
    produce(s, 1)
    assert sent(s) == [(w, 2)]
    s.check(T0 + 20)
    assert s.counters.straggler_resends == 1  # still queued: not counted again


# -- the teacher-output cache ------------------------------------------------------


def test_a_task_answered_from_a_cache_no_longer_trusted_is_asked_again_whole():
    """Scheduler.redo: a task answered whole from the cache, or in part, is pending again with
    its cached rows ignored (in the frames sent to a worker too), and counted once when a
    teacher answers it."""
    s = make(workers=1)
    tasks = []
    for task_id, hits in ((0, 8), (1, 3)):
        s.grants()
        tasks.append(protocol.Task(epoch=1, task_id=task_id, slot=min(s.granted), rows=8, nbytes=100, sizes=[8],
                                   shm={}, hits=hits))
        assert s.on_task(tasks[-1], [b"frames"])
    assert 0 not in s.pending and sent(s) == [(wid(0), 1)]  # task 0 was answered whole: done at once
    assert done(s, wid(0), 1) is not None
    s.on_end(protocol.End(epoch=1, tasks=2))
    assert s.finished
    assert (s.counters.tasks, s.counters.samples, s.counters.cache_hits) == (2, 16, 11)
    for t in tasks:
        s.redo(t)
    assert (s.counters.tasks, s.counters.samples, s.counters.cache_hits) == (0, 0, 0)
    assigned = s.assignments(0.0)
    assert [held.task.task_id for _, held in assigned] == [0, 1]
    for _, held in assigned:
        assert held.task.hits is None and protocol.decode(held.wire)[0] == held.task
    assert not s.finished
    assert done(s, wid(0), 0) is not None and done(s, wid(0), 1) is not None
    assert s.finished and (s.counters.tasks, s.counters.samples) == (2, 16)
    s.redo(msgspec.structs.replace(tasks[0], epoch=2))  # not this epoch's: nothing to do
    assert not s.pending
