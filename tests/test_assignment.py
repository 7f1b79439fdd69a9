"""Property tests for ``zdistill.discovery.assignment.assign``: balance, fairness, determinism, stability.

The stability tests state the exact bound the module docstring promises for one join or
leave applied to a result of ``assign``; ``moves`` counts pairs, a pair being
``(student, teacher)``.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zdistill.discovery.assignment import assign

SETTINGS = settings(max_examples=150, deadline=None)

ADDRESSES = [f"10.0.{i // 50}.{i % 50}:{7000 + i % 3}" for i in range(80)]
teacher_sets = st.lists(st.sampled_from(ADDRESSES), max_size=30, unique=True)
student_ids = st.integers(0, 99).map(lambda i: f"student-{i}")
student_maps = st.dictionaries(student_ids, st.integers(1, 6), max_size=30)
# Anything a stale Redis record could hold: unknown students and teachers, repeats.
previous_maps = st.dictionaries(student_ids, st.lists(st.sampled_from(ADDRESSES), max_size=8), max_size=30)


def pairs(result: dict[str, list[str]]) -> set[tuple[str, str]]:
    return {(sid, teacher) for sid, got in result.items() for teacher in got}


def loads(teachers: list[str], result: dict[str, list[str]]) -> Counter[str]:
    counts = Counter(dict.fromkeys(teachers, 0))
    counts.update(teacher for got in result.values() for teacher in got)
    return counts


def check_valid(teachers: list[str], students: dict[str, int], result: dict[str, list[str]]) -> None:
    """Everything a result must satisfy, whatever ``previous`` was."""
    assert list(result) == sorted(students)
    live = set(teachers)
    for sid, got in result.items():
        assert got == sorted(set(got)), "sorted, no teacher twice"
        assert set(got) <= live
        assert len(got) <= students[sid]
        if live:
            assert got, "every student gets a teacher while any exists"
    if not live:
        return
    load = loads(teachers, result)
    assert max(load.values()) - min(load.values()) <= 1, "balanced"
    capped = {sid: min(most, len(live)) for sid, most in students.items()}
    if sum(capped.values()) >= len(live):
        assert min(load.values()) >= 1, "every teacher used when the maxima allow"
    # Fairness: shared regime -> one teacher each; split regime -> exclusive teachers,
    # as many pairs as fit, and no student with room more than one behind another.
    if len(live) <= len(students):
        assert all(len(got) == 1 for got in result.values())
    else:
        assert max(load.values()) <= 1
        assert sum(load.values()) == min(len(live), sum(capped.values()))
        most = max((len(got) for got in result.values()), default=0)
        for sid, got in result.items():
            if len(got) < capped[sid]:
                assert len(got) >= most - 1


@SETTINGS
@given(teacher_sets, student_maps, previous_maps)
def test_valid_and_balanced_for_any_previous(teachers, students, previous):
    check_valid(teachers, students, assign(teachers, students, previous))
    check_valid(teachers, students, assign(teachers, students))


@SETTINGS
@given(teacher_sets, student_maps, previous_maps, st.randoms(use_true_random=False))
def test_deterministic_whatever_the_input_order(teachers, students, previous, rng):
    first = assign(teachers, students, previous)
    assert assign(list(teachers), dict(students), dict(previous)) == first
    shuffled_teachers = rng.sample(teachers, len(teachers)) + teachers[:2]  # repeats are ignored too
    keys = rng.sample(sorted(students), len(students))
    shuffled_students = {sid: students[sid] for sid in keys}
    shuffled_previous = {sid: rng.sample(old, len(old)) for sid, old in reversed(previous.items())}
    again = assign(shuffled_teachers, shuffled_students, shuffled_previous)
    assert again == first
    assert list(again) == list(first)


@SETTINGS
@given(teacher_sets, student_maps, previous_maps)
def test_idempotent(teachers, students, previous):
    current = assign(teachers, students, previous)
    assert assign(teachers, students, current) == current


# ---- stability: one join or leave applied to a result of assign ----------------------------


@st.composite
def histories(draw, min_teachers=0, min_students=0):
    """A current result (reached from an arbitrary stale record) and the data behind it."""
    teachers = draw(st.lists(st.sampled_from(ADDRESSES), min_size=min_teachers, max_size=30, unique=True))
    students = draw(st.dictionaries(student_ids, st.integers(1, 6), min_size=min_students, max_size=30))
    current = assign(teachers, students, draw(previous_maps))
    return teachers, students, current


@SETTINGS
@given(histories(), st.data())
def test_teacher_joins(history, data):
    teachers, students, before = history
    newcomer = data.draw(st.sampled_from([a for a in ADDRESSES if a not in teachers]))
    after = assign([*teachers, newcomer], students, before)
    check_valid([*teachers, newcomer], students, after)
    added, removed = pairs(after) - pairs(before), pairs(before) - pairs(after)
    assert all(teacher == newcomer for _, teacher in added), "only pairs to the newcomer appear"
    if len(teachers) + 1 <= len(students):
        # Shared: the newcomer needs at least S // (T + 1) students; exactly that many move
        # (from no teacher at all, every student simply gains the newcomer).
        assert len(added) == len(students) // (len(teachers) + 1)
        assert len(removed) == (len(added) if teachers else 0)
    else:
        assert not removed and len(added) <= 1


@SETTINGS
@given(histories(min_teachers=1), st.data())
def test_teacher_leaves(history, data):
    teachers, students, before = history
    gone = data.draw(st.sampled_from(teachers))
    rest = [t for t in teachers if t != gone]
    after = assign(rest, students, before)
    check_valid(rest, students, after)
    orphaned = {pair for pair in pairs(before) if pair[1] == gone}
    added, removed = pairs(after) - pairs(before), pairs(before) - pairs(after)
    assert orphaned <= removed
    assert len(removed - orphaned) <= 1, "beyond the lost pairs, at most one rebalancing move"
    assert len(added) <= len(orphaned)
    if len(teachers) <= len(students):  # shared before and after: pure re-homing of the orphans
        assert removed == orphaned
        assert len(added) == (len(orphaned) if rest else 0)


@SETTINGS
@given(histories(), st.data())
def test_student_joins(history, data):
    teachers, students, before = history
    newcomer = data.draw(student_ids.filter(lambda sid: sid not in students))
    grown = {**students, newcomer: data.draw(st.integers(1, 6))}
    after = assign(teachers, grown, before)
    check_valid(teachers, grown, after)
    added, removed = pairs(after) - pairs(before), pairs(before) - pairs(after)
    assert all(sid == newcomer for sid, _ in added), "only the newcomer gains"
    assert len(removed) <= len(after[newcomer]), "the others lose no more than it gets"
    if len(teachers) <= len(students):
        assert not removed, "shared regime: the newcomer takes a free slot"


@SETTINGS
@given(histories(min_students=1), st.data())
def test_student_leaves(history, data):
    teachers, students, before = history
    gone = data.draw(st.sampled_from(sorted(students)))
    rest = {sid: most for sid, most in students.items() if sid != gone}
    after = assign(teachers, rest, before)
    check_valid(teachers, rest, after)
    mine = {pair for pair in pairs(before) if pair[0] == gone}
    added, removed = pairs(after) - pairs(before), pairs(before) - pairs(after)
    assert len(removed - mine) <= 1, "at most one other pair moves"
    assert len(added) <= len(mine)
    if len(teachers) >= len(students):
        assert removed == mine, "split regime: the others only gain"


# ---- examples ---------------------------------------------------------------------------


def test_no_teachers():
    assert assign([], {"a": 2, "b": 1}) == {"a": [], "b": []}
    assert assign([], {"a": 2}, {"a": ["10.0.0.1:7000"]}) == {"a": []}


def test_no_students():
    assert assign(["10.0.0.1:7000"], {}) == {}
    assert assign([], {}, {"gone": ["10.0.0.1:7000"]}) == {}


def test_max_larger_than_teacher_count():
    assert assign(["t1:1", "t2:1"], {"a": 10}) == {"a": ["t1:1", "t2:1"]}


def test_fewer_teachers_than_students_each_gets_one():
    result = assign(["t1:1", "t2:1"], {"a": 4, "b": 4, "c": 4})
    assert [len(got) for got in result.values()] == [1, 1, 1]
    assert sorted(loads(["t1:1", "t2:1"], result).values()) == [1, 2]


def test_more_teachers_than_students_water_fills():
    teachers = [f"t{i}:1" for i in range(10)]
    result = assign(teachers, {"a": 4, "b": 4, "c": 4})
    assert sorted(len(got) for got in result.values()) == [3, 3, 4]
    result = assign(teachers, {"a": 1, "b": 8, "c": 8})
    assert [len(got) for got in result.values()] == [1, 5, 4]  # the extra goes to the smaller id
    result = assign(teachers, {"a": 1, "b": 2})
    assert [len(got) for got in result.values()] == [1, 2]  # demand below supply: 7 idle


def test_extra_follows_the_student_that_had_it():
    teachers = [f"t{i}:1" for i in range(7)]
    previous = {"a": ["t0:1", "t1:1"], "b": ["t2:1", "t3:1"], "c": ["t4:1", "t5:1", "t6:1"]}
    assert assign(teachers, {"a": 4, "b": 4, "c": 4}, previous) == previous  # not to "a", the smaller id
    # "c" loses t6: the +1 now costs a move either way; it stays with a student, no one else is touched.
    after = assign(teachers[:6], {"a": 4, "b": 4, "c": 4}, previous)
    assert after == {"a": ["t0:1", "t1:1"], "b": ["t2:1", "t3:1"], "c": ["t4:1", "t5:1"]}


def test_stale_previous_is_ignored():
    previous = {"a": ["gone:1", "t1:1", "t1:1"], "ghost": ["t1:1"]}
    assert assign(["t1:1", "t2:1"], {"a": 1, "b": 1}, previous) == {"a": ["t1:1"], "b": ["t2:1"]}


def test_rejects_a_maximum_below_one():
    with pytest.raises(ValueError, match="at least 1"):
        assign(["t1:1"], {"a": 0})


def test_large_input_is_fast_and_balanced():
    import time

    rng = random.Random(7)
    teachers = [f"10.{i // 250}.{i % 250}.1:7000" for i in range(1000)]
    students = {f"s{i:05d}": rng.randint(1, 4) for i in range(10_000)}
    start = time.perf_counter()
    result = assign(teachers, students)
    again = assign(teachers, students, result)
    elapsed = time.perf_counter() - start
    check_valid(teachers, students, result)
    assert again == result
    assert elapsed < 2.0, f"two calls took {elapsed:.2f}s"


def test_one_jobs_trainers_split_its_teachers_evenly_and_disjointly():
    """Each trainer of a data-parallel job is one student: 4 teachers, 2 trainers -> 2 each, none shared."""
    teachers = [f"t{i}:1" for i in range(4)]
    result = assign(teachers, {"job-rank0": 4, "job-rank1": 4})
    assert [len(got) for got in result.values()] == [2, 2]
    assert sorted(result["job-rank0"] + result["job-rank1"]) == teachers
    result = assign([*teachers, "t4:1"], {"job-rank0": 4, "job-rank1": 4}, result)
    assert sorted(len(got) for got in result.values()) == [2, 3]  # the odd teacher goes to one, not idle


def test_shares_are_per_trainer_not_per_job():
    """Two jobs of 2 and 1 trainers: every trainer gets the same teachers, so the first job gets twice the second."""
    teachers = [f"t{i}:1" for i in range(6)]
    result = assign(teachers, {"a-rank0": 4, "a-rank1": 4, "b-rank0": 4})
    assert {sid: len(got) for sid, got in result.items()} == {"a-rank0": 2, "a-rank1": 2, "b-rank0": 2}
    # fewer teachers than trainers: every trainer shares one, loads differ by at most one
    result = assign(teachers[:1], {"a-rank0": 4, "a-rank1": 4, "b-rank0": 4})
    assert all(got == ["t0:1"] for got in result.values())  # one teacher; its fair queueing splits it in three
