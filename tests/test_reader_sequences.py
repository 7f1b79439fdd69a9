"""Variable-length sequences through a DistillReader, against real teacher processes.

A slot whose samples differ in length along their first axis travels as values plus
lengths (``zdistill.spec.Ragged``) in all three reader modes; the training loop gets
every sample's arrays back unchanged (values, dtype, length) in the form the reader
gave them, with predictions appended, a per-token prediction cut to its sample's
length.  Each check compares against numpy computed on the row alone, so padding
leaking into a value or a prediction fails it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests import procs
from zdistill import ConfigError, DistillReader

MODES = ["sample", "sample_list", "batch"]
BATCH = 7  # samples per reader batch (sample lists and batches)


@pytest.fixture(scope="module")
def negate(tmp_path_factory):
    """A teacher of fixed feeds only (``a`` float32, ``b`` int32): ragged slots beside them are not fed."""
    proc = procs.start_teacher(f"{procs.TEACHERS}:negate_increment", tmp_path_factory.mktemp("negate"))
    yield proc.endpoint
    proc.stop()


def sample_rows(n: int, seed: int = 0) -> list[tuple[Any, ...]]:
    """(a, b, tag): two scalars the teacher takes, and a [len, 2] float64 sequence it does not (len 0..9)."""
    rng = np.random.default_rng(seed)
    return [(np.float32(i / 4), np.int32(i), rng.standard_normal((int(rng.integers(0, 10)), 2)))
            for i in range(n)]


def as_items(mode: str, samples: list[tuple[Any, ...]], lists: bool = True) -> list[Any]:
    """What a reader of ``mode`` yields for ``samples``; a batch reader gives each ragged slot as a
    list of per-sample arrays (EDL's ERNIE example), or, with ``lists=False``, an array of
    its rows wherever a batch's rows are of one length."""
    if mode == "sample":
        return list(samples)
    chunks = [samples[i : i + BATCH] for i in range(0, len(samples), BATCH)]
    if mode == "sample_list":
        return chunks
    items = []
    for chunk in chunks:
        columns = []
        for col in zip(*chunk, strict=True):
            arrays = [np.asarray(v) for v in col]
            even = len({a.shape for a in arrays}) == 1
            columns.append(np.stack(arrays) if arrays[0].ndim == 0 or (even and not lists) else arrays)
        items.append(tuple(columns))
    return items


def reader(mode: str, ins: list[str], predicts: list[str], teacher: str, items: list[Any],
           task_rows: int = 16) -> DistillReader:
    dr = DistillReader(ins=ins, predicts=predicts)
    dr.set_fixed_teacher(teacher)
    dr.options.task_rows = task_rows
    getattr(dr, f"set_{mode}_generator")(lambda: iter(items))
    return dr


def out_rows(mode: str, out: list[Any], items: list[Any]) -> list[tuple[Any, ...]]:
    """Every output row, after checking that a batch reader's batches kept the form the reader gave."""
    if mode == "sample":
        return [tuple(row) for row in out]
    if mode == "sample_list":
        return [tuple(row) for batch in out for row in batch]
    assert len(out) == len(items)
    rows = []
    for got, given in zip(out, items, strict=True):
        for got_col, given_col in zip(got[: len(given)], given, strict=True):  # the slots; predictions follow
            assert isinstance(got_col, list) == isinstance(given_col, list), (type(got_col), type(given_col))
            if not isinstance(given_col, list):
                assert got_col.shape == given_col.shape and got_col.dtype == given_col.dtype
        n = len(got[0])
        rows += [tuple(col[i] for col in got) for i in range(n)]
    return rows


def check(mode: str, out: list[Any], items: list[Any], samples: list[tuple[Any, ...]],
          expect: Callable[[tuple[Any, ...]], tuple[np.ndarray, ...]]) -> None:
    """Every sample back in order, each array unchanged, and each prediction what ``expect`` says of its row."""
    rows = out_rows(mode, out, items)
    assert len(rows) == len(samples)
    width = len(samples[0])
    for i, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        for got, want in zip(row[:width], sample, strict=True):
            got, want = np.asarray(got), np.asarray(want)
            assert got.dtype == want.dtype and got.shape == want.shape, (i, got.dtype, got.shape, want.shape)
            np.testing.assert_array_equal(got, want)
        for got, want in zip(row[width:], expect(sample), strict=True):
            got = np.asarray(got)
            assert got.dtype == want.dtype and got.shape == want.shape, (i, got.dtype, got.shape, want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-6)


def negated(sample: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    return np.float32(-sample[0]), np.int64(sample[1] + 1)


# -- a ragged slot no teacher takes --------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode, lists", [*((m, True) for m in MODES), ("batch", False)])
@pytest.mark.parametrize("cache", [False, True])
def test_a_ragged_slot_beside_fixed_feeds_comes_back_unchanged(negate, tmp_path, mode, lists, cache):
    samples = sample_rows(60)
    items = as_items(mode, samples, lists)
    with reader(mode, ["a", "b", "tag"], ["na", "b1"], negate, items) as dr:
        if cache:
            dr.set_teacher_cache(tmp_path / "cache")
        for _ in range(2):  # the second epoch reuses the slots of the first (and, with the cache, its answers)
            check(mode, list(dr()), items, samples, negated)
        assert (dr.stats()["cache"]["hits"] > 0) == cache


@pytest.mark.timeout(180)
def test_batches_of_one_length_each_come_back_as_arrays(negate):
    """A batch reader's arrays of another length in each batch: one ragged slot, each batch its own array."""
    rng = np.random.default_rng(3)
    items = [(np.full(BATCH, i, np.float32), np.arange(BATCH, dtype=np.int32), rng.standard_normal((BATCH, i, 3)))
             for i in range(6)]
    samples = [(a[j], b[j], tag[j]) for a, b, tag in items for j in range(BATCH)]
    with reader("batch", ["a", "b", "tag"], ["na", "b1"], negate, items, task_rows=30) as dr:
        check("batch", list(dr()), items, samples, negated)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("second, message", [
    (np.zeros((3, 4)), r"slot 'tag' holds samples of different lengths.*one is float64 \[n, 4\], another "
                       r"float64 \[n, 2\]"),
    (np.zeros((3, 2), np.float32), r"slot 'tag' holds samples of different lengths.*one is float32 \[n, 2\], "
                                   r"another float64 \[n, 2\]"),
])
def test_a_ragged_slot_whose_rows_differ_otherwise_raises_naming_it(negate, mode, second, message):
    samples = [(np.float32(0), np.int32(0), np.zeros((2, 2))), (np.float32(1), np.int32(1), second)]
    with reader(mode, ["a", "b", "tag"], ["na", "b1"], negate, as_items(mode, samples)) as dr:
        with pytest.raises(ConfigError, match=message):
            list(dr())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_samples_of_different_lengths_for_a_fixed_feed_raise_naming_it(negate, mode):
    samples = [(np.zeros(2, np.float32), np.int32(0), np.zeros(1)), (np.zeros(3, np.float32), np.int32(1), np.zeros(1))]
    with reader(mode, ["a", "b", "tag"], ["na", "b1"], negate, as_items(mode, samples)) as dr:
        with pytest.raises(ConfigError, match=r"slot 'a' has samples of"):
            list(dr())
