"""The values and types of the reader's samples, through a real teacher and back.

Whatever the reader yields, an epoch either gives back every value unchanged, with
the predictions of exactly what the teacher was fed, or raises a zdistill error
naming the cause, within a bound: never a wrapped or overflowed number, never a
hang, never a slot kept.  The teacher (``negate_increment``) takes a float32 ``a``
and an int32 ``b`` and answers ``-a`` and ``b + 1``, so a test can tell from its
answer which value it was fed; ``tag`` is a slot no teacher takes.
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests import procs
from zdistill import ConfigError, DistillReader, TeacherError
from zdistill.errors import ZDistillError
from zdistill.student.batches import PROBE_EVERY

INS, PREDICTS = ["a", "b", "tag"], ["na", "b1"]
MODES = ["sample", "sample_list", "batch"]
EPOCH_LIMIT = 20.0  # seconds an epoch of a few samples may take, at most, on a busy 2-core machine


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    proc = procs.start_teacher(f"{procs.TEACHERS}:negate_increment", tmp_path_factory.mktemp("teacher"))
    yield proc.endpoint.replace("tcp://", "")
    proc.stop()


class EpochTimeout(Exception):
    """An epoch ran past its bound: the pipeline hangs."""


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Interrupt the training loop's thread after ``seconds`` (SIGUSR1 from a timer thread)."""

    def expire(signum: int, frame: Any) -> None:
        raise EpochTimeout(f"the epoch took more than {seconds} s")

    before = signal.signal(signal.SIGUSR1, expire)
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, before)


def run_epoch(dr: DistillReader) -> list[Any]:
    with within(EPOCH_LIMIT):
        return list(dr())


def slots_back(dr: DistillReader) -> None:
    """Wait until every task slot is free: none granted, none holding a task."""
    dispatcher = dr._pipeline.dispatcher

    def free() -> bool:
        with dispatcher.lock:
            return not dispatcher.sched.slot_task and not dispatcher.sched.granted

    gc.collect()
    procs.wait_for(free, 5, "every task slot to come back")


def reader_of(items: list[Any]) -> Callable[[], Iterator[Any]]:
    return lambda: iter(items)


def make_reader(teacher: str, mode: str, items: list[Any] | None = None, task_rows: int = 3) -> DistillReader:
    dr = DistillReader(ins=INS, predicts=PREDICTS)
    dr.set_fixed_teacher(teacher)
    dr.options.task_rows = task_rows
    if items is not None:
        getattr(dr, f"set_{mode}_generator")(reader_of(items))
    return dr


def same(got: Any, want: Any) -> bool:
    """Equal as numbers (Python's exact int/float comparison), NaN equal to NaN."""
    got, want = np.asarray(got).item(), np.asarray(want).item()
    if isinstance(got, float) and isinstance(want, float) and math.isnan(got) and math.isnan(want):
        return True
    return bool(got == want)


def rows_out(mode: str, out: list[Any]) -> list[tuple[Any, ...]]:
    """Every output row as (a, b, tag, na, b1)."""
    if mode == "sample":
        return [tuple(row) for row in out]
    if mode == "sample_list":
        return [tuple(row) for batch in out for row in batch]
    return [tuple(col[i] for col in batch) for batch in out for i in range(len(batch[0]))]


def check_rows(mode: str, out: list[Any], samples: list[tuple[Any, Any, Any]]) -> None:
    """Every value back unchanged, and the teacher's answers for exactly those values."""
    rows = rows_out(mode, out)
    assert len(rows) == len(samples)
    for (a, b, tag, na, b1), (a0, b0, tag0) in zip(rows, samples, strict=True):
        for got, want in ((a, a0), (b, b0), (tag, tag0)):
            assert same(got, want), f"{want!r} came back as {got!r}"
        fed_a = np.asarray(a).astype(np.float32)  # what a float32 feed makes of the value
        assert same(na, -fed_a) and np.asarray(na).dtype == np.float32
        assert int(b1) == int(np.asarray(b).astype(np.int32)) + 1


# -- a later, wider value -------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sample", "sample_list"])
@pytest.mark.parametrize("first, later", [
    (np.int32(1), 2**33 + 1),  # an int32 slot would wrap it to 1
    (np.float32(1.5), 1e39),  # a float32 slot would make it inf
    (np.float32(1.5), 0.1),  # a float32 slot would round it
    (np.uint8(7), -1),  # a uint8 slot would wrap it to 255
    (np.int64(3), 2**63),  # uint64: int64 and uint64 make float64, which holds both exactly
])
def test_a_later_wider_value_comes_back_unchanged(teacher, mode, first, later):
    samples = [(1.0, 1, first), (2.0, 2, later), (3.0, 3, first)]
    items = samples if mode == "sample" else [samples[:2], samples[2:]]
    with make_reader(teacher, mode, items) as dr:
        out = run_epoch(dr)
        check_rows(mode, out, samples)
        del out
        slots_back(dr)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, items, message", [
    ("sample", [(1.0, 1, -1), (2.0, 2, 2**64 - 1)], r"slot 'tag' mixes .* \[18446744073709551615\] would become"),
    ("sample", [(1.0, 1, 0.5), (2.0, 2, 2**53 + 1)], r"slot 'tag' mixes .* \[9007199254740993\] would become"),
    ("sample", [(1.0, 1, 0), (2.0, 2, 2**64)], r"slot 'tag' holds 18446744073709551616, which no number dtype"),
    ("batch", [(np.ones(1), np.ones(1, np.int32), np.array([2**53 + 1])), (np.ones(1), np.ones(1, np.int32),
                                                                            np.array([0.5]))],
     r"slot 'tag' mixes .* \[9007199254740993\] would become \[9007199254740992.0\]"),
])
def test_values_no_one_dtype_holds_raise_naming_the_slot(teacher, mode, items, message):
    """A task whose values have no common dtype that holds each of them exactly fails the epoch."""
    with make_reader(teacher, mode, items) as dr:
        with pytest.raises(ConfigError, match=message):
            run_epoch(dr)
        slots_back(dr)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sample, message", [
    ((1e39, 1, 0), r"slot 'a' .* feed \(float32\) cannot take: \[1e\+39\] would become \[inf\]"),
    ((1.0, 2**31, 0), r"slot 'b' .* feed \(int32\) cannot take: \[2147483648\] would become \[-2147483648\]"),
    ((1.0, 1.5, 0), r"slot 'b' .* feed \(int32\) cannot take: \[1.5\] would become \[1\]"),
    ((1.0, float("nan"), 0), r"slot 'b' .* feed \(int32\) cannot take: \[nan\]"),
])
def test_a_value_the_teachers_feed_cannot_hold_raises(teacher, sample, message):
    with make_reader(teacher, "sample", [(2.0, 2, 0), sample]) as dr:
        with pytest.raises(ConfigError, match=message):
            run_epoch(dr)
        slots_back(dr)


@pytest.mark.timeout(120)
def test_a_float_feed_takes_the_nearest_value(teacher):
    """A float64 value for a float32 feed is rounded, as a model's inputs are; it comes back unrounded."""
    samples = [(0.1, 1, 0), (1e-50, 2, 0), (3.4e38, 3, 0)]
    with make_reader(teacher, "sample", samples) as dr:
        out = run_epoch(dr)
    check_rows("sample", out, samples)
    assert [row[0] for row in out] == [0.1, 1e-50, 3.4e38]
    assert [row[3] for row in out] == [-np.float32(0.1), -np.float32(0.0), -np.float32(3.4e38)]


@pytest.mark.timeout(120)
def test_a_teacher_with_a_narrower_feed_refuses_values_it_cannot_hold(teacher, start_teacher):
    """The reader's feeds are its first teacher's (int32 ``b``); a teacher of int16 ``b`` replaces it.

    The second teacher's worker casts the feed for it and must not wrap 40000 to -25536.
    """
    narrow = start_teacher(f"{procs.TEACHERS}:negate_increment_int16").endpoint.replace("tcp://", "")
    with make_reader(teacher, "sample", [(1.0, 40000, 0)] * 4) as dr:
        out = run_epoch(dr)  # the int32 teacher can take it
        check_rows("sample", out, [(1.0, 40000, 0)] * 4)
        del out
        dr._pipeline.set_teachers([narrow])  # as a balancer would move the reader to another teacher
        with pytest.raises(TeacherError, match=r"slot 'b' .* feed \(int16\) cannot take: \[40000"):
            run_epoch(dr)
        slots_back(dr)


# -- a reader that fills the same arrays for every item --------------------------------


def reusing_reader(mode: str, items: int, per: int, fresh: int = 0) -> Callable[[], Iterator[Any]]:
    """A reader that writes each item into the arrays it yielded the last time (as a loader with
    buffers made once does), after ``fresh`` items of new arrays; item ``i``'s samples are
    ``(i * per + j + 0.5, i * per + j, 3 * (i * per + j))``."""

    def read() -> Iterator[Any]:
        new = lambda: [np.zeros(per, np.float32), np.zeros(per, np.int64), np.zeros(per, np.int64)]  # noqa: E731
        a, b, tag = new()
        for i in range(items):
            if i < fresh:
                a, b, tag = new()
            k = np.arange(i * per, (i + 1) * per)
            a[:], b[:], tag[:] = k + 0.5, k, 3 * k
            if mode == "batch":
                yield a, b, tag
            elif mode == "sample_list":
                yield [(a[j : j + 1].reshape(()), b[j : j + 1].reshape(()), tag[j : j + 1].reshape(()))
                       for j in range(per)]
            else:
                yield a.reshape(()), b.reshape(()), tag.reshape(())

    return read


def reused_samples(rows: int) -> list[tuple[Any, Any, Any]]:
    return [(k + 0.5, k, 3 * k) for k in range(rows)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sample", "sample_list", "batch"])
def test_a_reader_that_fills_the_same_arrays_for_every_item_gets_each_items_values(teacher, mode):
    """EDL's queue pickled each item as it came, so a reader may write the next item into the
    arrays it has just yielded.  A task holds several items while the reader makes the next:
    without copies every row of it would be the last item's (values and predictions)."""
    per = 1 if mode == "sample" else 4
    with make_reader(teacher, mode, task_rows=4 * per) as dr:
        getattr(dr, f"set_{mode}_generator")(reusing_reader(mode, 40, per))
        for _ in range(2):  # the second epoch finds the reader out again
            check_rows(mode, run_epoch(dr), reused_samples(40 * per))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sample_list", "batch"])
def test_a_reader_that_starts_filling_the_same_arrays_late_is_named_not_trusted(teacher, mode):
    """Past the epoch's first task the items are not copied (a copy costs a sample list 1 to
    2 us a sample); one task in PROBE_EVERY still is, and compared.  A reader that starts to
    write into what it yielded only later is named there, in the training loop."""
    per, tasks = 4, PROBE_EVERY + 2
    with make_reader(teacher, mode, task_rows=4 * per) as dr:
        getattr(dr, f"set_{mode}_generator")(reusing_reader(mode, 4 * tasks, per, fresh=8))
        with pytest.raises(ConfigError, match=f"wrote into an array it had already yielded .* of task {PROBE_EVERY} "):
            run_epoch(dr)


# -- a sample type change inside a task --------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, first, later", [
    ("sample_list", 0, 1.5),
    ("sample", True, 2),
    ("sample", np.uint8(1), 300),
    ("batch", np.array([1], np.uint8), np.array([300])),
])
def test_a_type_change_inside_tasks_neither_hangs_nor_keeps_slots(teacher, mode, first, later):
    """Every task flips its ``tag`` type: the epoch ends, each value is back, every slot is free."""
    samples = [(float(i), i, first if i % 2 == 0 else later) for i in range(60)]
    if mode == "sample":
        items: list[Any] = samples
    elif mode == "sample_list":
        items = [samples[i : i + 2] for i in range(0, 60, 2)]
    else:
        items = [(np.array([float(i)]), np.array([i]), first if i % 2 == 0 else later) for i in range(60)]
        samples = [(float(i), i, (first if i % 2 == 0 else later)[0]) for i in range(60)]
    with make_reader(teacher, mode, items, task_rows=4) as dr:
        for _ in range(2):  # the first epoch's producer starts with one slot, the second with several
            out = run_epoch(dr)
            check_rows(mode, out, samples)
            del out
            slots_back(dr)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, later, message", [
    ("sample", "cat", r"slot 'tag' holds 'cat', which no number dtype holds"),
    ("sample", [[1, 2], [3]], r"slot 'tag' holds \[\[1, 2\], \[3\]\], which is not one array"),
    ("batch", ["cat", "dog"], r"slot 'tag' holds <U\d+ values; zdistill sends numbers"),
    ("batch", [[1, 2], [3]], r"slot 'tag' holds samples of different lengths, and a scalar 0 among them"),
])
def test_a_change_to_what_is_no_number_raises_and_frees_the_slots(teacher, mode, later, message):
    """A ConfigError naming the slot and the value, never numpy's own error (or a hang)."""
    if mode == "batch":
        items = [(np.ones(1), np.ones(1, np.int32), np.array([0])), (np.ones(2), np.ones(2, np.int32), later)]
    else:
        items = [(1.0, 1, 0), (2.0, 2, 1), (3.0, 3, later)]
    with make_reader(teacher, mode, items, task_rows=8) as dr:
        with pytest.raises(ConfigError, match=message):
            run_epoch(dr)
        slots_back(dr)


# -- empty reader batches --------------------------------------------------------------


def empty_batch(dtype: Any = np.float64) -> tuple[np.ndarray, ...]:
    return np.zeros(0, dtype), np.zeros(0, dtype), np.zeros(0, dtype)


def one_batch(i: int) -> tuple[np.ndarray, ...]:
    return np.array([float(i)], np.float32), np.array([i], np.int32), np.array([i])


def check_batch_dtypes(out: list[Any], layout: str) -> None:
    """Five 1-D arrays per batch; an empty batch's in the dtypes of its task, its own after the last row."""
    last_row = max((i for i, c in enumerate(layout) if c != "E"), default=-1)
    for i, batch in enumerate(out):
        assert len(batch) == 5 and all(arr.ndim == 1 for arr in batch)
        slots = [np.float32, np.int32, np.int64] if i <= last_row else [np.float64] * 3
        assert [arr.dtype for arr in batch] == [*slots, np.float32, np.int64]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sample_list", "batch"])
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("layout", [
    "E1EE2E",  # empty batches before, between and after: 6 in, 6 out
    "EE",  # nothing but empty batches
    "1E2EE3EEE",  # with task_rows=1, the trailing empties make a task of no rows
])
def test_empty_batches_come_out_as_empty_batches(teacher, tmp_path, mode, cache, layout):
    """As many batches out as in, each of its own size: an empty one is an empty batch.

    Batch reader: an empty batch is the slots' and predictions' arrays with no rows, in
    the dtypes of the batches of its task (its own only after the epoch's last row);
    sample-list reader: ``[]``.
    """
    if mode == "batch":
        items = [empty_batch(np.float64) if c == "E" else one_batch(int(c)) for c in layout]
    else:
        items = [[] if c == "E" else [(float(c), int(c), int(c))] for c in layout]
    samples = [(float(c), int(c), int(c)) for c in layout if c != "E"]
    with make_reader(teacher, mode, items, task_rows=1) as dr:
        if cache:
            dr.set_teacher_cache(tmp_path / "cache")
        for _ in range(2):  # with the cache, the second epoch is answered from it
            out = run_epoch(dr)
            assert [len(b) if mode == "sample_list" else len(b[0]) for b in out] == [
                0 if c == "E" else 1 for c in layout]
            check_rows(mode, out, samples)
            if mode == "batch":
                check_batch_dtypes(out, layout)
            del out
            slots_back(dr)


# -- the property: any values, three reader modes -------------------------------------

EDGES = [2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**53, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
         2**64 - 1, 2**64, 0.1, -0.0, 1e39, 3.4028235e38, 3.5e38, 1e-320, float("inf"), float("-inf"), float("nan")]
DTYPES = [np.dtype(t) for t in ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                                "float16", "float32", "float64")]


def numpy_scalars(dtype: np.dtype) -> st.SearchStrategy[Any]:
    return hnp.from_dtype(dtype).map(dtype.type)


ANY_VALUE = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from(EDGES), st.booleans(), st.floats(),
    st.sampled_from(DTYPES).flatmap(numpy_scalars),
)
SLOT_VALUES = st.one_of(  # a slot's values in one example: one kind for all, or anything mixed
    st.just(ANY_VALUE),
    st.sampled_from(DTYPES).map(numpy_scalars),
    st.just(st.integers(-100, 100)), st.just(st.floats(-1e6, 1e6)), st.just(st.booleans()),
)


def holds_exactly(values: list[np.ndarray]) -> bool:
    """Whether one dtype holds every value exactly (numpy's promotion of them all)."""
    values = [v for v in values if v.size]
    if not values:
        return True
    if any(v.dtype.kind not in "biuf" for v in values):
        return False
    common = np.result_type(*{v.dtype for v in values})
    with np.errstate(all="ignore"):
        return all(same_array(v.astype(common), v) for v in values)


def same_array(got: np.ndarray, want: np.ndarray) -> bool:
    return all(same(g, w) for g, w in zip(got.ravel().tolist(), want.ravel().tolist(), strict=True))


def feedable(values: list[np.ndarray]) -> tuple[bool, bool]:
    """Whether the float32 feed ``a`` and the int32 feed ``b`` can take these values unchanged (but rounded)."""
    with np.errstate(all="ignore"):
        a = all(not (np.isinf(v.astype(np.float32)) & ~np.isinf(v)).any() for v in values[0])
        b = all(same_array(v.astype(np.int32), v) for v in values[1] if v.size)
    return a, b


@st.composite
def epochs(draw: st.DrawFn, mode: str) -> tuple[list[Any], list[tuple[Any, Any, Any]], list[list[np.ndarray]]]:
    """Reader items, the samples in order, and each slot's values as arrays (what np.asarray makes of them)."""
    if mode == "batch":
        items, columns = [], [[], [], []]
        for _ in range(draw(st.integers(0, 6))):
            n = draw(st.integers(0, 3))
            batch = tuple(draw(hnp.arrays(draw(st.sampled_from(DTYPES)), n)) for _ in INS)
            items.append(batch)
            for column, arr in zip(columns, batch, strict=True):
                column.append(arr)
        samples = [tuple(b[k][i] for k in range(3)) for b in items for i in range(len(b[0]))]
        return items, samples, columns
    value_sets = [draw(SLOT_VALUES) for _ in INS]
    sizes = [draw(st.integers(0, 4)) for _ in range(draw(st.integers(0, 5)))] if mode == "sample_list" else [
        1] * draw(st.integers(0, 10))
    samples = [tuple(draw(v) for v in value_sets) for _ in range(sum(sizes))]
    columns = [[np.asarray(s[k]) for s in samples] for k in range(3)]
    if mode == "sample":
        return samples, samples, columns
    items, start = [], 0
    for n in sizes:
        items.append(samples[start : start + n])
        start += n
    return items, samples, columns


@pytest.fixture(scope="module")
def readers(teacher):
    """One DistillReader per mode for the whole module, each reading whatever ``CURRENT`` holds at its fork."""
    made = {}
    for mode in MODES:
        dr = make_reader(teacher, mode)
        getattr(dr, f"set_{mode}_generator")(lambda: iter(CURRENT["items"]))
        made[mode] = dr
    yield made
    for dr in made.values():
        dr.close()


CURRENT: dict[str, list[Any]] = {"items": []}


@pytest.mark.timeout(600)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_epoch_gives_back_its_values_or_raises(readers, data):
    """Any values, in each reader mode: every value back unchanged, with the teacher's answers
    for exactly what it was fed, or a zdistill error; an error only when no one dtype holds
    a slot's values exactly or a feed cannot take one (the task's values are a subset of the
    epoch's, so an epoch whose values all fit must succeed)."""
    drawn = {mode: data.draw(epochs(mode), label=mode) for mode in MODES}  # all first: a replay draws the same
    for mode, (items, samples, columns) in drawn.items():
        CURRENT["items"] = items
        dr = readers[mode]
        must_work = all(holds_exactly(c) for c in columns) and all(feedable(columns))
        try:
            out = run_epoch(dr)
        except ZDistillError as exc:
            assert not must_work, f"{mode}: {exc!r} for values that fit"
            event(f"{mode}: {type(exc).__name__}")
        else:
            event(f"{mode}: values back")
            if mode != "sample":
                assert len(out) == len(items)  # empty batches too
            check_rows(mode, out, samples)
            del out
        slots_back(dr)


@pytest.mark.parametrize("row_shape", [(784,), (3, 4, 5), (), (1,)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_stacking_a_slot_writes_every_sample_into_its_row(row_shape, contiguous):
    """A slot's samples land in their rows as np.stack would put them, on the one-concatenate path
    (arrays of the slot's row shape and dtype) and off it (a slot's array that is not contiguous)."""
    from zdistill.student.batches import _stack_into

    rng = np.random.default_rng(3)
    samples = [rng.standard_normal(row_shape).astype(np.float32) for _ in range(7)]
    room = np.zeros((7, 1 if contiguous else 2, *row_shape), np.float32)
    out = room[:, -1]  # of 2, a strided view
    assert out.flags.c_contiguous == contiguous
    _stack_into(out, samples)
    np.testing.assert_array_equal(out, np.stack(samples))
    assert contiguous or not room[:, 0].any()  # nothing written beside the slot's rows


def _f32(*shape: int) -> np.ndarray:
    return np.ones(shape, np.float32)


@pytest.mark.parametrize("first, others", [
    (1, [2, 3]),  # EDL's labels: Python ints, in one np.array
    (1.5, [2.5, -0.0]),
    (True, [False, True]),
    (np.int64(5), [np.int64(-1)]),
    (1, [2**63, 3]),  # no int64: refused, so the caller stacks the slot in a wider dtype
    (1, [2.0, 3]),
    (np.int64(1), [np.int32(2)]),
    (_f32(4), [_f32(4), _f32(4)]),
    (_f32(4), [_f32(2), _f32(6)]),  # as many values in all, but not one row each
    (_f32(4), [_f32(4, 1), _f32(4)]),
    (_f32(4), [np.ones(4), _f32(4)]),  # float64 into a float32 slot
    (_f32(4), [np.ones(4, ">f4")]),
    (_f32(4), [np.float32(1)]),
    (_f32(2, 3), [_f32(3, 2)]),
])
def test_stacking_a_slot_gives_what_np_stack_gives_or_refuses_it_alike(first, others):
    """The one-call paths (concatenate, np.array of scalars) fill the slot exactly as
    ``np.stack(casting="no")`` does, and refuse (ValueError or TypeError, which send the task to
    the wider-dtype path) every sample list it refuses: none may pass where the stack would not."""
    from zdistill.student.batches import _stack_into

    part = [first, *others]
    first_arr = np.asarray(first)
    want = np.zeros((len(part), *first_arr.shape), first_arr.dtype)
    got = np.zeros_like(want)
    try:
        np.stack(part, out=want, casting="no")
    except (ValueError, TypeError):
        with pytest.raises((ValueError, TypeError)):
            _stack_into(got, part)
        return
    _stack_into(got, part)
    np.testing.assert_array_equal(got, want)
