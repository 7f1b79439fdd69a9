"""Variable-length sequences through a DistillReader, against real teacher processes.

A slot whose samples differ in length along their first axis travels as values plus
lengths (``zdistill.spec.Ragged``) in all three reader modes; the training loop gets
every sample's arrays back unchanged (values, dtype, length) in the form the reader
gave them, with predictions appended, a per-token prediction cut to its sample's
length.  Each check compares against numpy computed on the row alone, so padding
leaking into a value or a prediction fails it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests import procs
from tests.teachers import per_token_np
from zdistill import ConfigError, DistillReader
from zdistill.client import TeacherClient
from zdistill.errors import TeacherError
from zdistill.spec import Ragged, TensorSpec
from zdistill.student.batches import answer_problem
from zdistill.student.cache import key_seed, row_keys

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
          expect: Callable[[tuple[Any, ...]], tuple[np.ndarray, ...]], rtol: float = 1e-6, atol: float = 0) -> None:
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
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def negated(sample: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    return np.float32(-sample[0]), np.int64(sample[1] + 1)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A teacher of two variable-length feeds (``ids``, ``weight``): ``h`` per token ([len, 4]), ``mean`` per row."""
    proc = procs.start_teacher(f"{procs.TEACHERS}:per_token", tmp_path_factory.mktemp("tokens"))
    yield proc.endpoint
    proc.stop()


TOKEN_INS = ["ids", "weight", "label"]


def token_rows(n: int, seed: int = 0, shortest: int = 1) -> list[tuple[Any, ...]]:
    """(ids, weight, label): ``shortest``..12 token ids, a weight per token, and the row's number."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(shortest, 13))
        rows.append((rng.integers(0, 1000, length), rng.random(length, dtype=np.float32), np.int64(i)))
    return rows


def per_token(sample: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    return per_token_np(sample[0], sample[1])


def per_row(sample: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    return per_token_np(sample[0], sample[1])[1:]


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


# -- a variable-length feed -------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode, lists", [*((m, True) for m in MODES), ("batch", False)])
def test_sequences_are_fed_and_per_token_predictions_cut_to_each_sample(tokens, mode, lists):
    samples = token_rows(80)
    items = as_items(mode, samples, lists)
    with reader(mode, TOKEN_INS, ["h", "mean"], tokens, items) as dr:
        dr.set_teacher_batch_size(5)  # requests cut across tasks' rows of many lengths
        for _ in range(2):
            out = list(dr())
            check(mode, out, items, samples, per_token)
            if mode == "batch":  # a per-token prediction of a batch: one array per sample
                assert all(isinstance(batch[3], list) for batch in out)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_sequences_with_the_cache_are_answered_from_it(tokens, tmp_path, mode):
    """Rows are keyed by their tokens and length: the second epoch comes from the cache, each row its own."""
    samples = token_rows(60, shortest=0)
    samples += [(np.zeros(0, np.int64), np.zeros(0, np.float32), np.int64(60)),
                (np.zeros(1, np.int64), np.ones(1, np.float32), np.int64(61))]
    items = as_items(mode, samples)
    with reader(mode, TOKEN_INS, ["mean"], tokens, items) as dr:
        dr.set_teacher_cache(tmp_path / "cache")
        for _ in range(2):
            check(mode, list(dr()), items, samples, per_row)
        cache = dr.stats()["cache"]
        assert cache["enabled"] and cache["hits"] >= len(samples) - 2, cache


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_per_token_predictions_with_the_cache_are_answered_from_it(tokens, tmp_path, mode):
    """A per-token prediction is cached with its row's length: the second epoch comes from the
    cache, every sample's tokens its own (rows of no tokens too)."""
    samples = token_rows(60, shortest=0)
    samples += [(np.zeros(0, np.int64), np.zeros(0, np.float32), np.int64(60)),
                (np.zeros(1, np.int64), np.ones(1, np.float32), np.int64(61))]
    items = as_items(mode, samples)
    with reader(mode, TOKEN_INS, ["h", "mean"], tokens, items) as dr:
        dr.set_teacher_cache(tmp_path / "cache")
        check(mode, list(dr()), items, samples, per_token)
        assert dr.stats()["cache"]["hits"] == 0
        asked = procs.teacher_stats(tokens)["rows"]
        check(mode, list(dr()), items, samples, per_token)
        cache = dr.stats()["cache"]
        asked = procs.teacher_stats(tokens)["rows"] - asked
    assert cache["enabled"] and cache["hits"] >= len(samples) - 2 and asked <= 2, (cache, asked)


def segments(root) -> list:
    return sorted(root.rglob("*.zdc"))


@pytest.mark.timeout(180)
def test_a_damaged_per_token_record_is_a_miss_never_a_wrong_row(tokens, tmp_path, caplog):
    """A byte of a per-token record changed on disk: its row is asked again, and its answer is the teacher's."""
    samples = token_rows(60, shortest=1)
    items = as_items("sample", samples)
    with reader("sample", TOKEN_INS, ["h", "mean"], tokens, items) as dr:
        dr.set_teacher_cache(tmp_path / "cache")
        check("sample", list(dr()), items, samples, per_token)
        [segment] = segments(tmp_path / "cache")
        with open(segment, "r+b") as f:  # a token of the last record's h, past its key and length
            f.seek(-12, 2)
            byte = f.read(1)
            f.seek(-12, 2)
            f.write(bytes([byte[0] ^ 0x40]))
        check("sample", list(dr()), items, samples, per_token)
        cache = dr.stats()["cache"]
    assert cache["enabled"] and cache["hits"] == len(samples) - 2, cache  # the damaged row, and one audited
    assert "a damaged record" in caplog.text


@pytest.mark.timeout(240)
def test_another_per_token_model_under_one_model_id_never_gets_its_answers(start_teacher, tmp_path):
    """Two models of per-token outputs only, one model_id: the fingerprint (their per-token answers
    to the probe) keeps each one's cached answers its own."""
    from tests import cache_teachers

    rng = np.random.default_rng(4)
    samples = [(rng.integers(0, 1000, int(rng.integers(1, 13))),) for _ in range(50)]
    items = as_items("sample_list", samples)
    cache, first, ids = tmp_path / "cache", None, []
    for name in ["a", "b", "a"]:
        teacher = start_teacher(f"{cache_teachers.__file__}:tokens_{name}")
        client = TeacherClient(teacher.endpoint, timeout=10.0)
        ids.append(client.meta()["model_id"])
        client.close()
        embed = cache_teachers.token_embedding(1 if name == "a" else 2)
        with reader("sample_list", ["ids"], ["h"], teacher.endpoint, items) as dr:
            dr.set_teacher_cache(cache)
            out = list(dr())
            stats = dr.stats()["cache"]
        asked = procs.teacher_stats(teacher.endpoint)["rows"]
        teacher.stop()
        check("sample_list", out, items, samples, lambda s, e=embed: (cache_teachers.expected_tokens(s[0], e),))
        assert stats["enabled"], stats
        if name == "b" or first is None:
            assert stats["hits"] == 0 and asked == len(samples), (name, stats, asked)
        else:  # model A's answers are still cached, bit for bit (one row asked: the audit)
            assert stats["hits"] == len(samples) - 1 and asked == 1, (stats, asked)
            assert all(np.asarray(g[1]).tobytes() == np.asarray(w[1]).tobytes()
                       for g, w in zip(out_rows("sample_list", out, items), first, strict=True))
        if first is None:
            first = out_rows("sample_list", out, items)
    assert len(set(ids)) == 1  # one model_id for both models: only their answers tell them apart


@pytest.mark.timeout(240)
def test_a_teacher_killed_mid_epoch_loses_no_sequence(start_teacher):
    """Every sample once, in order, with its own predictions, though a teacher holding tasks died."""
    keep = start_teacher(f"{procs.TEACHERS}:per_token")
    # A victim slow enough (300 ms a call) always to hold a task when it dies: its death costs the epoch work.
    victim = start_teacher(f"{procs.TEACHERS}:per_token", env={"ZDISTILL_TEST_DELAY_MS": "300"})
    samples = token_rows(1500, seed=5)
    items = as_items("batch", samples)
    with reader("batch", TOKEN_INS, ["h", "mean"], keep.endpoint, items, task_rows=BATCH * 3) as dr:
        dr.set_fixed_teacher([keep.endpoint, victim.endpoint])
        deadline = time.monotonic() + 60
        while procs.requests_served(victim) == 0 and time.monotonic() < deadline:  # both workers up and busy
            check("batch", list(dr()), items, samples, per_token)
        out = []
        for i, batch in enumerate(dr()):
            out.append(batch)
            if i == 20:
                victim.kill()
        check("batch", out, items, samples, per_token)
        stats = dr.stats()
    assert stats.get("returned", 0) + stats.get("resent", 0) + stats.get("resend_all", 0) > 0, stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ins, message", [
    (["l:ids", "ids", "weight"], r"slot name 'l:ids' starts with 'l:'"),
    (["c:mean", "ids", "weight"], r"slot name 'c:mean' starts with 'c:'"),
    (["ids", "ids", "weight"], r"slot name 'ids' is given twice"),
])
def test_a_slot_named_as_a_tasks_own_arrays_or_twice_is_refused(tokens, tmp_path, ins, message):
    """A task's slot holds each slot's array under its name, beside its own arrays (a sequence's
    ``l:<name>``, a form's ``f:<name>``, the cache's ``c:<prediction>``...).  A slot ``l:ids`` beside
    the sequence ``ids`` came back as ``ids``' lengths, and ``ids`` given twice came back as its
    second column, the teacher fed that one: values the reader never gave in that slot."""
    first = {"l:ids": lambda i, ids: np.int64(100 + i), "c:mean": lambda i, ids: np.full(4, i, np.float32),
             "ids": lambda i, ids: ids[::-1].copy()}[ins[0]]  # of the array's shape it meets: no error to hide it
    samples = [(first(i, ids), ids, weight) for i, (ids, weight, _) in enumerate(token_rows(12))]
    with pytest.raises(ConfigError, match=message):
        with reader("sample_list", ins, ["h", "mean"], tokens, as_items("sample_list", samples)) as dr:
            dr.set_teacher_cache(tmp_path / "cache")  # the cache's arrays share the task's slot too
            list(dr())


@pytest.mark.timeout(60)
def test_requests_of_a_task_answered_in_rows_of_other_shapes_fail_the_epoch_naming_why(start_teacher):
    """A task sent as several requests (request_rows 2) to a teacher whose per-token output is as
    wide as the model call's longest row (batch_wide: [-1, -1]): the requests' answers cannot be one
    prediction.  The epoch fails with bad_output naming it, not a worker that dies on every try."""
    proc = start_teacher(f"{procs.TEACHERS}:batch_wide")
    samples = [(np.arange(n, dtype=np.int64) + 1,) for n in [2, 2, 16, 16, 3]]
    with reader("sample", ["ids"], ["seen"], proc.endpoint, samples, task_rows=5) as dr:
        dr.options.request_rows = 2
        with pytest.raises(TeacherError, match=r"bad_output: .* answers to the 3 requests of a task have rows of "
                                               r"different shapes") as info:
            list(dr())
    assert info.value.code == "bad_output"


@pytest.mark.timeout(60)
def test_a_per_token_answer_left_padded_is_bad_output_never_padding_in_a_prediction(tmp_path):
    """A teacher (not a zdistill-teacher: tests/odd_teacher.py) that answers a per-token output as one
    array padded to the request's longest row: the sample of 1 token would get 5 entries, 4 of them
    padding.  The worker knows the output is per-token from the teacher's meta, and refuses it."""
    port, meta, ready = procs.free_port(), tmp_path / "meta.json", tmp_path / "odd.ready"
    meta.write_text(json.dumps({"feeds": [{"name": "ids", "dtype": "int64", "shape": [-1]}],
                                "fetches": [{"name": "seen", "dtype": "int64", "shape": [-1]}],
                                "max_batch_size": 64}))
    teacher = procs.start([sys.executable, "-m", "tests.odd_teacher", str(port), str(meta), str(ready)],
                          "odd-teacher", ready_file=str(ready))
    try:
        samples = [(np.arange(n, dtype=np.int64) + 1,) for n in [3, 1, 5]]
        with reader("sample", ["ids"], ["seen"], f"127.0.0.1:{port}", samples) as dr:
            with pytest.raises(TeacherError, match=r"per-token output 'seen' has 5 entries for row 0 of the "
                                                   r"request, whose sequence has 3") as info:
                list(dr())
        assert info.value.code == "bad_output"
    finally:
        teacher.stop()


def test_an_answer_of_other_rows_or_lengths_is_named_not_used():
    """What a worker checks of each teacher answer before it is a task's predictions (a teacher
    that is not a zdistill-teacher may cut per-token outputs otherwise, or answer otherwise than
    its meta declares, which the cache would store and give back by the declaration)."""
    ids = Ragged.from_rows([np.arange(3), np.arange(1)])
    feeds = {"ids": ids, "w": np.ones(2, np.float32)}
    tok, mean = TensorSpec("tok", "float32", (-1,)), TensorSpec("mean", "float64", ())
    right = {"tok": Ragged.from_rows([np.zeros(3, np.float32), np.zeros(1, np.float32)]), "mean": np.zeros(2)}
    assert answer_problem(feeds, right, [tok, mean]) == ""
    cut = {**right, "tok": Ragged.from_rows([np.zeros(2, np.float32), np.zeros(2, np.float32)])}
    assert answer_problem(feeds, cut, [tok]) == ("per-token output 'tok' has 2 entries for row 0 of the request, "
                                                 "whose sequence has 3")
    assert answer_problem(feeds, {**right, "mean": np.zeros(3)}, [mean]) == \
        "output 'mean' has 3 rows for a request of 2"
    assert answer_problem(feeds, right, [TensorSpec("other", "float32", ())]) == "its answer has no output 'other'"
    padded = {**right, "tok": np.zeros((2, 3), np.float32)}  # one array: its rows are 3 long, row 1's sequence 1
    assert answer_problem(feeds, padded, [TensorSpec("tok", "float32", (3,))]) == ""  # declared: rows of 3 values
    assert answer_problem(feeds, padded, [tok]) == (
        "per-token output 'tok' has 3 entries for row 1 of the request, whose sequence has 1")
    wide = {**right, "tok": Ragged.from_rows([np.zeros((3, 2), np.float32), np.zeros((1, 2), np.float32)])}
    assert answer_problem(feeds, wide, [TensorSpec("tok", "float32", (-1, 4))]) == (
        "output 'tok' has rows of float32 [-1, 2]; its meta declares float32 [-1, 4]")
    assert answer_problem(feeds, right, [tok, TensorSpec("mean", "float32", ())]) == (
        "output 'mean' has rows of float64 []; its meta declares float32 []")


def test_cache_keys_tell_rows_apart_by_length_and_shape():
    """Rows whose bytes are the same but whose lengths or shapes are not are other questions."""
    seed = key_seed({"ids": ("<i8", (-1,)), "mask": ("<i8", (-1,))})
    ids = Ragged.from_rows([np.array([1, 2]), np.array([1])])
    mask = Ragged.from_rows([np.array([3]), np.array([2, 3])])
    keys = row_keys([ids, mask], seed)  # row 0: [1, 2] + [3]; row 1: [1] + [2, 3]: the same bytes joined
    assert len({k.tobytes() for k in keys}) == 2
    empty = Ragged(np.zeros((5, 0)), np.array([2, 3]))  # tokens of no bytes: only the length differs
    assert len({k.tobytes() for k in row_keys([empty], seed)}) == 2
    assert key_seed({"ids": ("<i8", (-1,))}) != key_seed({"ids": ("<i8", (2,))})
    one = Ragged.from_rows([np.array([1, 2])])
    assert row_keys([one], seed).tobytes() == row_keys([Ragged.from_rows([np.array([1, 2])])], seed).tobytes()
