"""The teacher-output cache: a teacher is never asked twice about the same sample.

End to end with real teacher processes (their ``stats`` count the rows they were
asked), and the on-disk format on its own: torn writes, concurrent writers, eviction.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests import cache_teachers, procs
from tests.teachers import softmax_np
from zdistill import DistillReader
from zdistill.client import TeacherClient
from zdistill.errors import ConfigError
from zdistill.fingerprint import TOLERANCE, distance, fingerprint, probe_batch, usable
from zdistill.spec import Ragged, Tensor, TensorSpec
from zdistill.student.batches import CacheSlots, select
from zdistill.student.cache import (
    CHECK_SEED,
    CacheGate,
    CacheIndex,
    CacheWriter,
    cacheable,
    evict,
    folder_for,
    key_seed,
    namespace_for,
    read_fingerprint,
    record_checks,
    record_dtype,
    row_keys,
    stored_bytes,
)
from zdistill.student.producer import Producer, ProducerConfig
from zdistill.student.shm import SlotReader
from zdistill.teacher.loading import load_model
from zdistill.teacher.model import CallableModel

N, B = 1000, 50
FETCHES = [TensorSpec("prob", "float32", (10,))]


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    return rng.random((N, 784), dtype=np.float32), np.arange(N, dtype=np.int64)


def batches(x, y):
    return lambda: ((x[i : i + B], y[i : i + B]) for i in range(0, len(x), B))


def epoch(dr: DistillReader) -> tuple[np.ndarray, np.ndarray]:
    out = list(dr())
    return np.concatenate([b[1] for b in out]), np.concatenate([b[2] for b in out])


def rows_asked(teacher: procs.Proc) -> int:
    return int(procs.teacher_stats(teacher.endpoint)["rows"])


def reader(teacher: procs.Proc, cache, x, y) -> DistillReader:
    dr = DistillReader(ins=["img", "label"], predicts=["prob"])
    dr.set_fixed_teacher([teacher.endpoint])
    dr.set_batch_generator(batches(x, y))
    dr.set_teacher_cache(cache)
    return dr


def test_second_epoch_new_student_and_other_model(start_teacher, tmp_path, data):
    """Epoch 2 is answered from the cache, bit for bit, but for one row audited (asked anyway, and
    compared); a new student process with the same cache asks only its audit's row; a teacher
    with another model_id is asked everything."""
    x, y = data
    cache = tmp_path / "cache"
    teacher = start_teacher()
    with reader(teacher, cache, x, y) as dr:
        labels1, probs1 = epoch(dr)
        asked = rows_asked(teacher)
        assert asked == N
        labels2, probs2 = epoch(dr)
        assert rows_asked(teacher) == asked + 1, "epoch 2 went to the teacher beyond its audit"
        asked += 1
        stats = dr.stats()["cache"]
        (cache / "another-readers-segment.zdc").write_bytes(bytes(4096))
        # stats() is cheap enough to call every step: it walks the cache folder only every few seconds
        assert dr.stats()["cache"]["bytes_stored"] == stats["bytes_stored"]
    np.testing.assert_array_equal(labels2, y)
    assert probs2.tobytes() == probs1.tobytes()  # bit for bit (an audited row agreeing keeps its cached answer)
    np.testing.assert_allclose(probs1, softmax_np(x), rtol=1e-5, atol=1e-6)
    assert (stats["hits"], stats["misses"]) == (N - 1, N + 1) and stats["bytes_stored"] > N * 40 and stats["enabled"]

    script = textwrap.dedent(f"""
        import json, numpy as np
        from zdistill import DistillReader
        x = np.random.default_rng(5).random(({N}, 784), dtype=np.float32)
        dr = DistillReader(ins=['img'], predicts=['prob'])
        dr.set_fixed_teacher([{teacher.endpoint!r}])
        dr.set_batch_generator(lambda: ((x[i:i + 100],) for i in range(0, {N}, 100)))
        dr.set_teacher_cache({str(cache)!r})
        probs = np.concatenate([b[1] for b in dr()])
        print(json.dumps({{'cache': dr.stats()['cache'], 'sum': float(probs.astype(np.float64).sum())}}))
        dr.close()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    other = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows_asked(teacher) == asked + 1, "a new student with the same cache asked the teacher beyond its audit"
    assert other["cache"]["hits"] == N - 1 and other["cache"]["misses"] == 1
    assert other["sum"] == pytest.approx(float(probs1.astype(np.float64).sum()), rel=1e-12)

    renamed = start_teacher(f"{procs.TEACHERS}:softmax", "--model-id", "softmax-v2")
    with reader(renamed, cache, x, y) as dr:
        _, probs3 = epoch(dr)
        assert rows_asked(renamed) == N  # answers cached for another model are never served
        assert dr.stats()["cache"]["hits"] == 0
    np.testing.assert_allclose(probs3, softmax_np(x), rtol=1e-5, atol=1e-6)


def test_rows_seen_before_are_answered_from_the_cache_and_the_rest_asked(start_teacher, tmp_path, data):
    """A dataset that grows: the rows of the first epoch come from the cache, only new rows
    go to the teacher, and every prediction is still the teacher's for its own row."""
    x, y = data
    teacher = start_teacher()
    half = N // 2
    seen = {"n": half}
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([teacher.endpoint])
        dr.set_batch_generator(lambda: ((x[i : i + 25], y[i : i + 25]) for i in range(0, seen["n"], 25)))
        dr.set_teacher_cache(tmp_path / "cache")
        epoch(dr)
        seen["n"] = N
        labels, probs = epoch(dr)
        stats = dr.stats()["cache"]
    assert rows_asked(teacher) == N + 1  # half, then the other half, and one row of the first half audited
    assert stats["hits"] == half - 1 and stats["misses"] == N + 1
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)


def test_set_teacher_cache_checks_its_arguments(tmp_path):
    dr = DistillReader(ins=["img"], predicts=["prob"])
    with pytest.raises(ConfigError, match="max_bytes"):
        dr.set_teacher_cache(tmp_path, max_bytes=0)
    for tolerance in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="tolerance"):
            dr.set_teacher_cache(tmp_path, tolerance=tolerance)


# -- the on-disk format ------------------------------------------------------------------


def answers(rows: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).random((rows, 784), dtype=np.float32)
    return row_keys([x], key_seed({"img": ("<f4", (784,))})), {"prob": softmax_np(x)}


def look_up(index: CacheIndex, keys: np.ndarray) -> dict[str, np.ndarray] | None:
    found = index.lookup(keys)
    if (found < 0).any():
        return None
    out = {"prob": np.empty((len(keys), 10), np.float32)}
    index.gather(found, out)
    return out


def test_concurrent_writers_are_all_read_and_rows_come_back_bit_for_bit(tmp_path):
    folder = folder_for(str(tmp_path), "m1", FETCHES)
    writers = [CacheWriter(folder, FETCHES, 1 << 30, str(tmp_path)) for _ in range(2)]
    batches = [answers(100, seed) for seed in range(4)]
    for i, (keys, out) in enumerate(batches):
        writers[i % 2].append(keys, out)  # interleaved, each to its own segment
    index = CacheIndex(folder, FETCHES)
    assert index.refresh() == 400
    for keys, out in batches:
        got = look_up(index, keys)
        assert got is not None and got["prob"].tobytes() == out["prob"].tobytes()
    keys, out = answers(50, 9)
    writers[0].append(keys, out)
    assert index.refresh() == 50  # only what was added since
    assert look_up(index, keys) is not None
    assert look_up(index, answers(5, 99)[0]) is None
    assert len(os.listdir(folder)) == 2
    for w in writers:
        w.close()


def one_segment(tmp_path, rows: int, seed: int) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
    """A cache folder holding one segment of ``rows`` answers: the folder, their keys and rows."""
    folder = folder_for(str(tmp_path), "m1", FETCHES)
    writer = CacheWriter(folder, FETCHES, 1 << 30, str(tmp_path))
    keys, out = answers(rows, seed)
    writer.append(keys, out)
    writer.close()
    return folder, keys, out


def test_a_torn_or_damaged_record_is_never_served(tmp_path):
    folder, keys, out = one_segment(tmp_path, 10, 1)
    (segment,) = [os.path.join(folder, n) for n in os.listdir(folder)]
    size = os.path.getsize(segment)
    record = (size - 4096) // 10
    with open(segment, "r+b") as f:
        f.seek(4096 + 3 * record + 20)  # damage record 3's prediction
        f.write(b"\xff\x00\x13\x37")
        f.truncate(size - record // 2)  # and tear the last one, as kill -9 mid-write would
    index = CacheIndex(folder, FETCHES)
    assert index.refresh() == 8
    found = index.lookup(keys)
    assert list(np.flatnonzero(found < 0)) == [3, 9]
    good = np.flatnonzero(found >= 0)
    got = {"prob": np.empty((len(good), 10), np.float32)}
    index.gather(found[good], got)
    assert got["prob"].tobytes() == out["prob"][good].tobytes()


TOKEN_FETCHES = [TensorSpec("h", "float32", (-1, 3)), TensorSpec("mean", "float64", (3,)),
                 TensorSpec("top", "int32", (-1,))]


def token_answers(rows: int, seed: int) -> tuple[np.ndarray, Ragged, dict[str, Tensor]]:
    """Keys of ``rows`` token sequences (0..9 tokens), the sequences, and per-token and per-row answers."""
    rng = np.random.default_rng(seed)
    ids = Ragged.from_rows([rng.integers(0, 100, int(rng.integers(0, 10))) for _ in range(rows)])
    h = Ragged(rng.standard_normal((len(ids.values), 3)).astype(np.float32), ids.lengths)
    top = Ragged(rng.integers(-5, 5, len(ids.values)).astype(np.int32), ids.lengths)
    keys = row_keys([ids], key_seed({"ids": ("<i8", (-1,))}))
    return keys, ids, {"h": h, "mean": rng.standard_normal((rows, 3)), "top": top}


def gather_tokens(index: CacheIndex, keys: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, dict[str, Tensor]]:
    """Which rows of ``keys`` (their sequences of ``lengths``) the cache serves, and their answers."""
    found = index.lookup(keys)
    rows = np.flatnonzero(found >= 0)
    out: dict[str, Tensor] = {
        "h": Ragged(np.zeros((int(lengths[rows].sum()), 3), np.float32), lengths[rows]),
        "mean": np.zeros((len(rows), 3)),
        "top": Ragged(np.zeros(int(lengths[rows].sum()), np.int32), lengths[rows]),
    }
    served = index.gather(found[rows], out)
    return rows[served], {name: select(arr, np.flatnonzero(served)) for name, arr in out.items()}


def same_rows(got: dict[str, Tensor], want: dict[str, Tensor], rows: np.ndarray) -> bool:
    """Whether ``got`` are ``want``'s ``rows``, bit for bit (a per-token one's lengths too)."""
    for name, arr in want.items():
        mine, theirs = got[name], select(arr, rows)
        if isinstance(arr, Ragged):
            if mine.lengths.tobytes() != theirs.lengths.tobytes() or mine.values.tobytes() != theirs.values.tobytes():
                return False
        elif mine.tobytes() != theirs.tobytes():
            return False
    return True


def test_per_token_records_come_back_bit_for_bit_and_damage_is_a_miss(tmp_path):
    """Records of their own size: each row's tokens as written; a torn tail waits, a damaged
    record ends its segment's reading (its rows and those after it are misses), a row of
    another length is a miss."""
    folder = folder_for(str(tmp_path), "m1", TOKEN_FETCHES)
    writer = CacheWriter(folder, TOKEN_FETCHES, 1 << 30, str(tmp_path))
    keys, ids, out = token_answers(40, 1)
    writer.append(keys[:30], {n: select(a, slice(0, 30)) for n, a in out.items()})
    index = CacheIndex(folder, TOKEN_FETCHES)
    assert index.refresh() == 30
    rows, got = gather_tokens(index, keys, ids.lengths)
    assert rows.tolist() == list(range(30)) and same_rows(got, out, rows)
    (segment,) = [os.path.join(folder, n) for n in os.listdir(folder)]
    size = os.path.getsize(segment)
    writer.append(keys[30:], {n: select(a, slice(30, 40)) for n, a in out.items()})
    writer.close()
    with open(segment, "r+b") as f:  # the last record torn, as kill -9 mid-write would
        f.truncate(os.path.getsize(segment) - 5)
    assert index.refresh() == 9  # the torn one waits for its bytes
    rows, got = gather_tokens(index, keys, ids.lengths)
    assert rows.tolist() == list(range(39)) and same_rows(got, out, rows)
    longer = ids.lengths.copy()
    longer[5] += 1  # a key's row asked with another length: not this record's row
    rows, _ = gather_tokens(index, keys, longer)
    assert 5 not in rows.tolist() and len(rows) == 38

    with open(segment, "r+b") as f:  # a byte of record 30 changed: a fresh index stops there
        f.seek(size + 30)
        byte = f.read(1)
        f.seek(size + 30)
        f.write(bytes([byte[0] ^ 1]))
    fresh = CacheIndex(folder, TOKEN_FETCHES)
    assert fresh.refresh() == 30
    rows, got = gather_tokens(fresh, keys, ids.lengths)
    assert rows.tolist() == list(range(30)) and same_rows(got, out, rows)
    index._segments[os.path.basename(segment)].settled = False  # as a scan within a second of a change is
    rows, got = gather_tokens(index, keys, ids.lengths)  # the index scanned before: the check read again
    assert 30 not in rows.tolist() and same_rows(got, out, rows)


def test_per_token_outputs_need_a_variable_length_feed_to_be_cached():
    ids, img = TensorSpec("ids", "int64", (-1,)), TensorSpec("img", "float32", (4,))
    assert cacheable(TOKEN_FETCHES, [ids, img]) is None
    assert "no variable-length feed" in cacheable(TOKEN_FETCHES, [img])
    assert "other than per token" in cacheable([TensorSpec("x", "float32", (3, -1))], [ids])
    assert cacheable(FETCHES, [img]) is None


def test_the_fingerprint_tells_per_token_models_apart():
    """Models of per-token outputs only, under one model_id: their answers to the probe, each
    row's tokens, tell them apart; each reproduces its own."""
    a, a_again, b = (load_model(f"{CACHE_TEACHERS}:{name}") for name in ("tokens_a", "tokens_a", "tokens_b"))
    assert a.model_id == b.model_id
    fa, fa2, fb = (usable(fingerprint(m), ["h"], "t") for m in (a, a_again, b))
    assert fa[0] is not None and fb[0] is not None, (fa, fb)
    assert distance(fa[0], fa2[0], ["h"]) == 0.0 and distance(fa[0], fb[0], ["h"]) > 100 * TOLERANCE


def test_another_model_or_other_outputs_live_apart(tmp_path):
    a = folder_for(str(tmp_path), "m1", FETCHES)
    assert folder_for(str(tmp_path), "m2", FETCHES) != a
    assert folder_for(str(tmp_path), "m1", [TensorSpec("prob", "float16", (10,))]) != a
    assert folder_for(str(tmp_path), "m1", FETCHES) == a


def test_a_segment_evicted_while_the_cache_is_measured_counts_as_nothing(tmp_path, monkeypatch):
    """``stored_bytes`` lists the segments, then reads each one's size: one that another reader of
    the same cache evicts in between is gone by then, and must not fail the student's ``stats()``."""
    root = str(tmp_path)
    folder = folder_for(root, "m1", FETCHES)
    for seed in range(2):
        w = CacheWriter(folder, FETCHES, 1 << 30, root)
        w.append(*answers(200, seed))
        w.close()
    listing = list(os.walk(root))  # what the walk saw, before the eviction
    gone, kept = sorted(n for n in os.listdir(folder) if n.endswith(".zdc"))
    size = os.path.getsize(os.path.join(folder, kept))
    os.remove(os.path.join(folder, gone))
    monkeypatch.setattr(os, "walk", lambda top: iter(listing))
    monkeypatch.setattr(os.path, "exists", lambda path: True)  # and still there if asked before its size
    assert stored_bytes(root) == size


def test_eviction_removes_the_oldest_segments_first(tmp_path):
    root = str(tmp_path)
    folder = folder_for(root, "m1", FETCHES)
    made = []
    for seed in range(3):
        w = CacheWriter(folder, FETCHES, 1 << 30, root)
        w.append(*answers(200, seed))
        w.close()
        made.append(sorted(set(os.listdir(folder)) - {os.path.basename(p) for p in made})[0])
        os.utime(os.path.join(folder, made[-1]), (1000 + seed, 1000 + seed))
    one = os.path.getsize(os.path.join(folder, made[0]))
    assert stored_bytes(root) == 3 * one
    assert evict(root, 2 * one) == one
    assert sorted(os.listdir(folder)) == sorted(made[1:])  # the oldest went
    index = CacheIndex(folder, FETCHES)
    index.refresh()
    assert look_up(index, answers(200, 0)[0]) is None and look_up(index, answers(200, 2)[0]) is not None


def test_teachers_that_disagree_on_the_model_turn_the_cache_off(start_teacher, tmp_path, data, caplog):
    x, y = data
    teachers = [start_teacher(), start_teacher(f"{procs.TEACHERS}:softmax", "--model-id", "another")]
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([t.endpoint for t in teachers])
        dr.set_batch_generator(batches(x, y))
        dr.set_teacher_cache(tmp_path / "cache")
        with caplog.at_level("WARNING", logger="zdistill"):
            epoch(dr)  # starts both workers; the epoch may be over before the second one is up
            procs.wait_for(lambda: not dr.stats()["cache"]["enabled"], 30.0, "the other model's worker reporting it")
        asked = sum(rows_asked(t) for t in teachers)
        labels, probs = epoch(dr)
        assert sum(rows_asked(t) for t in teachers) == asked + N  # every row asked again: no cache
    assert sum("cache is off" in r.getMessage() for r in caplog.records) == 1
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)


def test_a_segment_of_another_schema_in_the_folder_is_ignored(tmp_path):
    folder, keys, out = one_segment(tmp_path, 20, 1)
    stranger = CacheWriter(folder, [TensorSpec("prob", "float64", (10,))], 1 << 30, str(tmp_path))
    stranger.append(answers(20, 2)[0], {"prob": out["prob"].astype(np.float64)})
    stranger.close()
    index = CacheIndex(folder, FETCHES)
    assert index.refresh() == 20
    assert index.refresh() == 0  # and stays ignored
    assert look_up(index, keys) is not None and look_up(index, answers(20, 2)[0]) is None


# -- damaged, truncated and foreign segments ----------------------------------------------


def segments_under(root) -> list[str]:
    """Every cache segment under ``root``, whatever folder the model's answers live in."""
    return sorted(os.path.join(f, n) for f, _, files in os.walk(root) for n in files if n.endswith(".zdc"))


def test_a_record_with_two_words_swapped_is_never_served(tmp_path):
    """A check that does not see where each word is would pass every one of these records."""
    folder, keys, out = one_segment(tmp_path, 100, 1)
    (segment,) = segments_under(tmp_path)
    record = (os.path.getsize(segment) - 4096) // 100
    with open(segment, "r+b") as f:
        for i in range(100):  # swap the prediction's first two floats (they differ: a softmax of random rows)
            at = 4096 + i * record + 16
            f.seek(at)
            words = f.read(8)
            f.seek(at)
            f.write(words[4:] + words[:4])
    index = CacheIndex(folder, FETCHES)
    added = index.refresh()
    served = look_up_rows(index, keys)
    wrong = sum(served[i] is not None and served[i].tobytes() != out["prob"][i].tobytes() for i in range(100))
    assert (added, wrong) == (0, 0), f"{wrong} of 100 records served wrong"


def look_up_rows(index: CacheIndex, keys: np.ndarray) -> list[np.ndarray | None]:
    """Each key's cached row as the producer would serve it, or None where it is not served."""
    found = index.lookup(keys)
    rows = np.flatnonzero(found >= 0)
    got = {"prob": np.empty((len(rows), 10), np.float32)}
    served = index.gather(found[rows], got)
    result: list[np.ndarray | None] = [None] * len(keys)
    for j, i in enumerate(rows):
        if served[j]:
            result[i] = got["prob"][j]
    return result


def test_the_record_check_is_xxh32_of_the_record_bytes():
    """Each record's check is the xxh32 of its bytes before the check, padding included."""
    import xxhash

    for fetches in (FETCHES, [TensorSpec("a", "float16", (3,)), TensorSpec("b", "int64", (5, 2))]):
        dtype = record_dtype(fetches)
        records = np.zeros(7, dtype)
        raw = records.view(np.uint8).reshape(7, -1)
        raw[:] = np.random.default_rng(3).integers(0, 256, raw.shape, dtype=np.uint8)
        want = [xxhash.xxh32_intdigest(row[:-4].tobytes(), CHECK_SEED) for row in raw]
        assert record_checks(records).tolist() == want


def test_a_record_changed_after_the_scan_is_never_served(tmp_path, caplog):
    """A segment settled long before the scan is not checked again while unchanged; a write
    into it after the scan changes its modification time, and its records are checked again."""
    folder, keys, out = one_segment(tmp_path, 10, 1)
    (segment,) = segments_under(tmp_path)
    os.utime(segment, (time.time() - 10, time.time() - 10))
    index = CacheIndex(folder, FETCHES)
    assert index.refresh() == 10
    record = (os.path.getsize(segment) - 4096) // 10
    with open(segment, "r+b") as f:
        f.seek(4096 + 3 * record + 20)
        f.write(b"\xff\x00\x13\x37")
    with caplog.at_level("WARNING", logger="zdistill"):
        served = look_up_rows(index, keys)
    assert served[3] is None
    assert all(served[i].tobytes() == out["prob"][i].tobytes() for i in range(10) if i != 3)
    assert any(segment in r.getMessage() for r in caplog.records)


def old_format_segment(folder: str, keys: np.ndarray, out: dict[str, np.ndarray]) -> str:
    """A segment as the cache's first format wrote it: magic ZDC1, a plain sum as its check."""
    dtype = np.dtype([("key", "u1", (16,)), ("p:prob", "<f4", (10,)), ("check", "<u4")])
    records = np.zeros(len(keys), dtype)
    records["key"], records["p:prob"] = keys, out["prob"]
    words = records.view(np.uint8).reshape(len(keys), -1)[:, :-4].view("<u4")
    records["check"] = words.sum(axis=1, dtype=np.uint32) + np.uint32(0x9E3779B9)
    path = os.path.join(folder, "00000000000000000001-1-00000000.zdc")
    head = b"ZDC1" + json.dumps([f.to_wire() for f in FETCHES]).encode()
    with open(path, "wb") as f:
        f.write(head.ljust(4096, b"\0") + records.tobytes())
    return path


def test_a_segment_of_the_old_format_is_skipped_not_misread(tmp_path, caplog):
    folder = folder_for(str(tmp_path), "m1", FETCHES)
    os.makedirs(folder)
    keys, out = answers(30, 4)
    path = old_format_segment(folder, keys, out)
    index = CacheIndex(folder, FETCHES)
    with caplog.at_level("WARNING", logger="zdistill"):
        assert index.refresh() == 0
    assert look_up(index, keys) is None
    assert any(path in r.getMessage() for r in caplog.records)


def test_a_segment_with_a_damaged_header_is_skipped_and_named(tmp_path, caplog):
    """Bytes that are not UTF-8 (or not JSON) in a header: that segment is skipped, the rest read."""
    folder, keys, out = one_segment(tmp_path, 20, 1)
    (good,) = segments_under(tmp_path)
    damaged = []
    for seed, junk in ((2, b"\xff\xfe\x80"), (3, b"{]")):
        writer = CacheWriter(folder, FETCHES, 1 << 30, str(tmp_path))
        writer.append(*answers(20, seed))
        writer.close()
        (path,) = set(segments_under(tmp_path)) - {good, *damaged}
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(junk)
        damaged.append(path)
    index = CacheIndex(folder, FETCHES)
    with caplog.at_level("WARNING", logger="zdistill"):
        assert index.refresh() == 20
        assert index.refresh() == 0
    served = look_up_rows(index, keys)
    assert all(row is not None and row.tobytes() == out["prob"][i].tobytes() for i, row in enumerate(served))
    assert look_up(index, answers(20, 2)[0]) is None
    for path in damaged:
        assert sum(path in r.getMessage() for r in caplog.records) == 1, f"{path} not named once"


def test_a_segment_that_cannot_be_read_is_skipped_and_named(tmp_path, caplog):
    folder, keys, out = one_segment(tmp_path, 20, 1)
    odd = os.path.join(folder, "00000000000000000002-1-00000000.zdc")
    os.mkdir(odd)  # a name like a segment's that cannot be read
    index = CacheIndex(folder, FETCHES)
    with caplog.at_level("WARNING", logger="zdistill"):
        assert index.refresh() == 20
        assert index.refresh() == 0
    assert look_up(index, keys) is not None
    assert sum(odd in r.getMessage() for r in caplog.records) == 1


_TRUNCATED = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from tests.test_cache import FETCHES, answers, look_up_rows, segments_under
    from zdistill.student.cache import CacheIndex, CacheWriter, folder_for
    root = sys.argv[1]
    folder = folder_for(root, "m1", FETCHES)
    writer = CacheWriter(folder, FETCHES, 1 << 30, root)
    keys, out = answers(1000, 1)
    writer.append(keys, out)
    writer.close()
    index = CacheIndex(folder, FETCHES)
    index.refresh()
    (segment,) = segments_under(root)
    record = (os.path.getsize(segment) - 4096) // 1000
    os.truncate(segment, 4096 + 10 * record + record // 2)  # 10 records and half of one are left
    served = look_up_rows(index, keys)
    right = [i for i, row in enumerate(served) if row is not None and row.tobytes() == out["prob"][i].tobytes()]
    print(json.dumps({"served": sum(row is not None for row in served), "right": right}))
""")


def test_a_segment_truncated_after_the_scan_is_read_as_far_as_it_goes(tmp_path):
    """The rows past the file's new end are misses (no SIGBUS); the rows before it are served."""
    result = subprocess.run([sys.executable, "-c", _TRUNCATED, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=procs.REPO)
    assert result.returncode == 0, f"the reader died ({result.returncode}): {result.stderr[-2000:]}"
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got == {"served": 10, "right": list(range(10))}


def test_segments_truncated_under_a_running_student(start_teacher, tmp_path, data, caplog):
    """The segments shrink between the student's scan and the producer's copy of the hits:
    the epoch ends with the teacher's answers (no SIGBUS), the workers store them in new
    segments, and the next refresh names the shrunk ones and answers from the new."""
    x, y = data
    cache = tmp_path / "cache"
    teacher = start_teacher()
    truncate = {"on": False}

    def shrinking():  # runs in the producer, after the scan: the segments shrink under it
        if truncate["on"]:
            for path in segments_under(cache):
                os.truncate(path, 4096)
        return batches(x, y)()

    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([teacher.endpoint])
        dr.set_batch_generator(shrinking)
        dr.set_teacher_cache(cache)
        epoch(dr)
        truncate["on"] = True
        shrunk = segments_under(cache)
        with caplog.at_level("WARNING", logger="zdistill"):
            labels, probs = epoch(dr)
            assert rows_asked(teacher) == 2 * N  # every row asked again: none could be read
            truncate["on"] = False
            labels3, probs3 = epoch(dr)
            assert rows_asked(teacher) == 2 * N + 1  # from the segments written in epoch 2, but the audited row
    for got_labels, got in ((labels, probs), (labels3, probs3)):
        np.testing.assert_array_equal(got_labels, y)
        np.testing.assert_allclose(got, softmax_np(x), rtol=1e-5, atol=1e-6)
    for path in shrunk:
        assert any(path in r.getMessage() for r in caplog.records), f"{path} not named"


def test_a_new_student_with_a_damaged_segment_in_its_cache(start_teacher, tmp_path, data, caplog):
    x, y = data
    cache = tmp_path / "cache"
    teacher = start_teacher()
    with reader(teacher, cache, x, y) as dr:
        epoch(dr)
    (segment,) = segments_under(cache)
    with open(segment, "r+b") as f:
        f.seek(4)
        f.write(b"\xff\xfe")
    with reader(teacher, cache, x, y) as dr, caplog.at_level("WARNING", logger="zdistill"):
        labels, probs = epoch(dr)
    assert rows_asked(teacher) == 2 * N
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)
    assert any(segment in r.getMessage() for r in caplog.records)


# -- a cache that cannot be written -------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a real file system of ``size`` (tmpfs, mounted here: needs root), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(size: str):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)
        if made.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=True)


def test_a_write_cut_short_by_a_full_file_system_raises_naming_the_segment(tmpfs):
    """A full file system cuts a write short: the writer raises ENOSPC naming the file, and
    what it did write reads back as whole records; a new segment's header that cannot be
    written leaves no file behind."""
    root = str(tmpfs("8k"))  # a segment's header and 68 records of 60 bytes
    folder = folder_for(root, "m1", FETCHES)
    keys, out = answers(100, 1)
    writer = CacheWriter(folder, FETCHES, 1 << 30, root)
    with pytest.raises(OSError, match="No space left on device") as raised:
        writer.append(keys, out)
    (segment,) = segments_under(root)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == segment
    whole = (8192 - 4096) // record_dtype(FETCHES).itemsize  # what fits; the next one is cut short
    assert os.path.getsize(segment) == 8192
    index = CacheIndex(folder, FETCHES)
    assert index.refresh() == whole
    served = look_up_rows(index, keys)
    assert [i for i, row in enumerate(served) if row is not None and row.tobytes() == out["prob"][i].tobytes()] == list(
        range(whole))
    with pytest.raises(OSError, match="No space left on device"):
        CacheWriter(folder, FETCHES, 1 << 30, root).append(keys, out)
    assert segments_under(root) == [segment]


def remount_read_only(mount) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, timeout=30, check=True)


def only_warning_naming(caplog, path) -> str:
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(path) in r.getMessage()]
    assert len(warned) == 1, warned
    return warned[0]


def assert_teachers_answers(outputs, x, y) -> None:
    for labels, probs in outputs:
        np.testing.assert_array_equal(labels, y)
        np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
def test_a_cache_on_a_full_file_system_turns_itself_off(start_teacher, tmpfs, data, caplog):
    """The file system is full after a segment's header (ENOSPC): the epochs end with the
    teacher's answers, and one warning names the cache."""
    x, y = data
    small_fs = tmpfs("4k")
    teacher = start_teacher()
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([teacher.endpoint])
        dr.set_batch_generator(batches(x, y))
        dr.set_teacher_cache(small_fs, max_bytes=1 << 30)
        with caplog.at_level("WARNING", logger="zdistill"):
            outputs = [epoch(dr)]
            assert not dr.stats()["cache"]["enabled"]
            outputs.append(epoch(dr))
    assert_teachers_answers(outputs, x, y)
    assert "No space left on device" in only_warning_naming(caplog, small_fs)


@pytest.mark.timeout(120)
def test_a_cache_on_a_read_only_file_system_turns_itself_off(start_teacher, tmpfs, data, caplog):
    """A cache a first student filled is read-only for the next (EROFS): the rows it lacks
    cannot be stored, one warning names the cache, the cache is off, and every row the loop
    gets is the teacher's answer."""
    x, y = data
    small_fs = tmpfs("1m")
    teacher = start_teacher()
    with reader(teacher, small_fs, x[: N // 2], y[: N // 2]) as dr:
        epoch(dr)
    remount_read_only(small_fs)
    with reader(teacher, small_fs, x, y) as dr, caplog.at_level("WARNING", logger="zdistill"):
        outputs = [epoch(dr)]
        assert not dr.stats()["cache"]["enabled"]
        outputs.append(epoch(dr))
    assert_teachers_answers(outputs, x, y)
    assert "Read-only file system" in only_warning_naming(caplog, small_fs)


def test_a_read_only_cache_without_this_model_is_not_used(start_teacher, tmpfs, data, caplog):
    x, y = data
    small_fs = tmpfs("1m")
    teacher = start_teacher()
    remount_read_only(small_fs)
    with reader(teacher, small_fs, x, y) as dr, caplog.at_level("WARNING", logger="zdistill"):
        outputs = [epoch(dr)]
        assert not dr.stats()["cache"]["enabled"]
    assert_teachers_answers(outputs, x, y)
    assert "Read-only file system" in only_warning_naming(caplog, small_fs)


# -- the cache's identity: model_id and how the model behaves ------------------------------

CACHE_TEACHERS = Path(cache_teachers.__file__)


def meta_of(teacher: procs.Proc) -> dict:
    client = TeacherClient(teacher.endpoint, timeout=10.0)
    try:
        return client.meta()
    finally:
        client.close()


def wrong_rows(probs: np.ndarray, want: np.ndarray) -> int:
    """Rows of ``probs`` that are not ``want``'s, to float tolerance."""
    return int((~np.isclose(probs, want, rtol=1e-5, atol=1e-6).all(axis=1)).sum())


def weights_file(tmp_path: Path, seed: int) -> dict[str, str]:
    """The environment of a ``from_file`` teacher loading the weights of ``seed`` from an .npy file."""
    path = tmp_path / f"weights-{seed}.npy"
    np.save(path, cache_teachers.weights(seed))
    return {cache_teachers.WEIGHTS_ENV: str(path)}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["factory", "npy"])
def test_two_models_under_one_model_id_never_get_each_others_answers(start_teacher, tmp_path, data, how):
    """Two teachers built by one factory, or loading their weights from .npy files, share a
    model_id; a student with a cache must still get each one's own answers, every row."""
    x, y = data
    cache = tmp_path / "cache"
    if how == "factory":
        models = {"a": (f"{CACHE_TEACHERS}:model_a", None), "b": (f"{CACHE_TEACHERS}:model_b", None)}
    else:
        models = {k: (f"{CACHE_TEACHERS}:from_file", weights_file(tmp_path, seed)) for k, seed in (("a", 1), ("b", 2))}
    want = {"a": cache_teachers.expected(x, cache_teachers.weights(1)),
            "b": cache_teachers.expected(x, cache_teachers.weights(2))}
    ids, first = [], None
    for name in ["a", "b", "a"]:  # A fills the cache, B must not get A's answers, A again gets its own
        model, env = models[name]
        teacher = start_teacher(model, env=env)
        ids.append(meta_of(teacher)["model_id"])
        with reader(teacher, cache, x, y) as dr:
            labels, probs = epoch(dr)
            stats = dr.stats()["cache"]
        asked = rows_asked(teacher)
        teacher.stop()
        np.testing.assert_array_equal(labels, y)
        assert wrong_rows(probs, want[name]) == 0, f"{wrong_rows(probs, want[name])} of {N} rows not model {name}'s"
        if first is None:
            first = probs
        elif name == "b":
            assert asked == N and stats["hits"] == 0
        else:  # model A's answers are still cached, bit for bit (one row asked: the audit)
            assert asked == 1 and stats["hits"] == N - 1 and probs.tobytes() == first.tobytes()
    assert len(set(ids)) == 1  # one model_id for both models: only their answers tell them apart


@pytest.mark.timeout(180)
def test_a_model_its_fingerprint_cannot_tell_apart_is_caught_by_the_epochs_audit(start_teacher, tmp_path, data,
                                                                                  caplog):
    """Two models under one model_id that agree on the probe's inputs (within [0, 1)) and not
    on the student's (within [0, 2)): the fingerprints match, so the cache's audit (a cached
    row asked anyway in the epoch's first task with cached rows) must catch it before any
    cached row reaches the training loop."""
    x, y = data
    x = x * 2
    cache = tmp_path / "cache"
    a = start_teacher(f"{CACHE_TEACHERS}:model_a")
    with reader(a, cache, x, y) as dr:
        epoch(dr)
    within = start_teacher(f"{CACHE_TEACHERS}:model_a_within")
    meta_a, meta_within = meta_of(a), meta_of(within)
    assert meta_a["model_id"] == meta_within["model_id"]
    assert distance(meta_a["fingerprint"]["outputs"], meta_within["fingerprint"]["outputs"], ["prob"]) == 0.0
    want = cache_teachers.expected_outside(x, cache_teachers.weights(1), cache_teachers.weights(2))
    with caplog.at_level("WARNING", logger="zdistill"), reader(within, cache, x, y) as dr:
        labels, probs = epoch(dr)
        stats = dr.stats()["cache"]
    np.testing.assert_array_equal(labels, y)
    assert wrong_rows(probs, want) == 0, f"{wrong_rows(probs, want)} of {N} rows were the other model's"
    said = [r.getMessage() for r in caplog.records if "cache is off" in r.getMessage()]
    assert len(said) == 1 and "answers a cached row otherwise than the cache" in said[0], said
    assert not stats["enabled"]


@pytest.mark.timeout(180)
def test_a_student_of_a_looser_tolerance_never_files_its_answers_where_a_stricter_one_reads(start_teacher, tmp_path,
                                                                                          data):
    """Students sharing one cache folder, one of them with a tolerance loose enough to take model B
    (0.41 apart in fingerprint) for model A: its answers must never reach a student of the default
    tolerance, whose teacher is model A.  Its audit alone cannot catch them: it samples a task in 64,
    and the first, answered by model A itself, agrees."""
    x, y = data
    cache = tmp_path / "cache"
    a, b = start_teacher(f"{CACHE_TEACHERS}:model_a"), start_teacher(f"{CACHE_TEACHERS}:model_b")
    assert distance(meta_of(a)["fingerprint"]["outputs"], meta_of(b)["fingerprint"]["outputs"], ["prob"]) < 0.5
    with reader(a, cache, x[: N // 2], y[: N // 2]) as dr:  # model A answers the first half
        epoch(dr)
    script = textwrap.dedent(f"""
        import numpy as np
        from zdistill import DistillReader
        x = np.random.default_rng(5).random(({N}, 784), dtype=np.float32)[{N // 2}:]
        dr = DistillReader(ins=['img'], predicts=['prob'])
        dr.set_fixed_teacher([{b.endpoint!r}])
        dr.set_batch_generator(lambda: ((x[i:i + {B}],) for i in range(0, len(x), {B})))
        dr.set_teacher_cache({str(cache)!r}, tolerance=0.5)
        assert sum(len(batch[1]) for batch in dr()) == len(x)
        dr.close()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert rows_asked(b) == N // 2  # model B answered the second half, with a cache of its own tolerance
    with reader(a, cache, x, y) as dr:
        dr.options.task_rows = B  # the audited first task: rows model A answered itself, whatever the plan
        labels, probs = epoch(dr)
    np.testing.assert_array_equal(labels, y)
    want = cache_teachers.expected(x, cache_teachers.weights(1))
    assert wrong_rows(probs, want) == 0, f"{wrong_rows(probs, want)} of {N} rows were model B's"


@pytest.mark.timeout(180)
def test_the_same_bytes_in_feeds_declared_in_another_order_are_another_question(start_teacher, tmp_path):
    """One model, under one model_id, its two feeds declared in the order (a, b), then (b, a),
    answering 0 to the probe's inputs (0 or 1) either way, so both orders share the cache's
    folder.  A row's key covers its feeds' bytes in the teacher's order: the row (a=p, b=q) asked
    of the first must not be the row (a=q, b=p) asked of the second, whose bytes in its order
    are the same.  The second epoch's first task holds rows of a == b only, whose answers agree
    either way (it is the one audited): every row after it must still be the teacher's."""
    rows, batch = 400, 20
    rng = np.random.default_rng(11)
    p, q = rng.integers(2, 50, rows), rng.integers(50, 100, rows)
    q[:batch] = p[:batch]  # the first reader batch: a == b
    cache = tmp_path / "cache"
    ids = []
    for model, (a, b) in (("pair_ab", (p, q)), ("pair_ba", (q, p))):
        teacher = start_teacher(f"{CACHE_TEACHERS}:{model}")
        ids.append(meta_of(teacher)["model_id"])
        dr = DistillReader(ins=["a", "b"], predicts=["d"])
        dr.set_fixed_teacher([teacher.endpoint])
        dr.set_batch_generator(lambda a=a, b=b: ((a[i : i + batch, None], b[i : i + batch, None])
                                                 for i in range(0, rows, batch)))
        dr.set_teacher_cache(cache)
        dr.options.task_rows = batch
        with dr:
            got = np.concatenate([out[2] for out in dr()])
        teacher.stop()
        want = cache_teachers.expected_pair(a, b)[:, None]
        wrong = int((got != want).any(axis=1).sum())
        assert wrong == 0, f"{model}: {wrong} of {rows} rows answered for their feeds swapped"
    assert ids[0] == ids[1]


@pytest.mark.timeout(120)
def test_a_teacher_that_does_not_reproduce_its_answers_turns_the_cache_off(start_teacher, tmp_path, data, caplog):
    """Dropout left on: the cache is not used, with one warning, and every row is the teacher's."""
    x, y = data
    teacher = start_teacher(f"{CACHE_TEACHERS}:noisy")
    want = cache_teachers.expected(x, cache_teachers.weights(1))
    with caplog.at_level("WARNING", logger="zdistill"), reader(teacher, tmp_path / "cache", x, y) as dr:
        for _ in range(2):
            labels, probs = epoch(dr)
            np.testing.assert_array_equal(labels, y)
            np.testing.assert_allclose(probs, want, rtol=cache_teachers.NOISE * 1.01, atol=1e-7)
        stats = dr.stats()["cache"]
    assert rows_asked(teacher) == 2 * N, "epoch 2 was answered from a cache of a teacher that cannot reproduce it"
    assert stats["hits"] == 0 and stats["bytes_stored"] == 0 and not stats["enabled"]
    said = [r.getMessage() for r in caplog.records if "cache" in r.getMessage()]
    assert len(said) == 1 and "does not reproduce its own answers" in said[0], said


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("model_id", "rows", "task_rows"),
                         [("same", N, 1024), ("other", N, 1024), ("same", 4000, 100)])
def test_a_teacher_replaced_by_another_model_mid_epoch_gets_no_cached_row_served(start_teacher, tmp_path, caplog,
                                                                                  model_id, rows, task_rows):
    """Epoch 2 is being answered from the cache of model A when A's teacher is replaced, at
    the same address, by model B (under A's model_id, or another): from the moment the
    student knows (B's meta came), every row it yields is B's, whether it comes from the
    task being yielded, from tasks answered from the cache and waiting, or from tasks the
    reader has not made yet."""
    x = np.random.default_rng(5).random((rows, 784), dtype=np.float32)
    y = np.arange(rows, dtype=np.int64)
    port = procs.free_port()
    teacher = start_teacher(f"{CACHE_TEACHERS}:model_a", port=port)
    want_a = cache_teachers.expected(x, cache_teachers.weights(1))
    want_b = cache_teachers.expected(x, cache_teachers.weights(2))
    with caplog.at_level("WARNING", logger="zdistill"), reader(teacher, tmp_path / "cache", x, y) as dr:
        dr.options.task_rows = dr.options.request_rows = task_rows
        _, probs = epoch(dr)
        assert wrong_rows(probs, want_a) == 0
        batches_seen = iter(dr())
        before = [next(batches_seen) for _ in range(4)]  # from the cache, all of model A
        swapped = time.monotonic()
        teacher.stop()
        extra = ("--model-id", "another") if model_id == "other" else ()
        start_teacher(f"{CACHE_TEACHERS}:model_b", *extra, port=port)

        def b_is_known() -> bool:  # the worker said the teacher is up again: it has B's meta
            t = dr.stats()["teachers"][teacher.endpoint]
            return bool(t["up"] and t["changed_at"] and t["changed_at"] > swapped)

        procs.wait_for(b_is_known, 30.0, "the student hearing of the new teacher")
        after = list(batches_seen)
    seen = len(before) * B
    assert wrong_rows(np.concatenate([b[2] for b in before]), want_a[:seen]) == 0
    labels = np.concatenate([b[1] for b in after])
    np.testing.assert_array_equal(labels, y[seen:])
    wrong = wrong_rows(np.concatenate([b[2] for b in after]), want_b[seen:])
    assert wrong == 0, f"{wrong} of {rows - seen} rows yielded after the student knew of model B were not B's"
    assert sum("cache is off" in r.getMessage() for r in caplog.records) == 1


def _epoch_producer(tmp_path: Path, index: CacheIndex | None, epoch: int) -> Producer:
    """What an epoch's fork runs, without the fork: one slot, in ``tmp_path/slots``; the cache
    ``index``, or None for an epoch with the cache's gate closed."""
    slots = tmp_path / "slots"
    slots.mkdir(exist_ok=True)
    return Producer(ProducerConfig(
        reader=list, reader_type="batch", ins=["img"], feeds=[TensorSpec("img", "float32", (4,))], epoch=epoch,
        task_rows=32, task_bytes=1 << 20, endpoint=f"ipc://{tmp_path}/dispatcher", slots_folder=str(slots),
        slot_count=1, grants=[0], parent_pid=os.getppid(), cache=index, cache_feeds=["img"],
        cache_gate=CacheGate()))


@pytest.mark.parametrize("rows", [1, 8])
def test_a_slot_reused_by_a_smaller_task_no_longer_names_the_task_it_held(tmp_path, rows):
    """A worker may still hold a task whose slot the next epoch (an epoch abandoned) or a later
    task refilled: it reads the slot through the old task's layout, and stores the teacher's
    answers under the old keys only while the stamp it finds there names the old task.  After a
    smaller task of another epoch fills the slot, that stamp must not name the old task any more:
    the old task's first rows now hold the new task's bytes, whose answers would be stored (and
    served in every later epoch) under the old rows' keys."""
    index = CacheIndex(str(tmp_path / "cache"), FETCHES)
    made = [_epoch_producer(tmp_path, index, 1)]
    try:
        old, descriptor = made[0]._allocate(5, 32, {"img": ((32, 4), np.dtype(np.float32))})
        old["img"][:] = 1.0
        held = SlotReader(str(tmp_path / "slots")).read(descriptor)  # the late worker's view of task 5 of epoch 1
        made.append(_epoch_producer(tmp_path, index, 2))  # finds the slot file epoch 1 left, as the next fork does
        new, _ = made[1]._allocate(0, rows, {"img": ((rows, 4), np.dtype(np.float32))})
        new["img"][:] = 2.0
        assert (held["img"] == 2.0).any()  # the slot changed under the old task's layout...
        assert tuple(CacheSlots.of(held).stamp) != (1, 5)  # ...and says so
    finally:
        for p in made:
            p.ctx.destroy(linger=0)
        index.close()


def test_a_slot_reused_with_the_cache_off_no_longer_names_the_task_it_held(tmp_path):
    """The same when the next epoch runs with the cache's gate closed, so its tasks hold no cache
    arrays: they still begin with their stamp, so the late worker never reads its old task's stamp
    from the new task's feeds, which may hold just its numbers (token ids 1 and 5, here)."""
    index = CacheIndex(str(tmp_path / "cache"), FETCHES)
    made = [_epoch_producer(tmp_path, index, 1)]
    try:
        _, descriptor = made[0]._allocate(5, 32, {"img": ((32, 4), np.dtype(np.float32))})
        held = SlotReader(str(tmp_path / "slots")).read(descriptor)
        made.append(_epoch_producer(tmp_path, None, 2))
        new, _ = made[1]._allocate(0, 8, {"ids": ((8, 2), np.dtype(np.int64))})
        new["ids"][:] = (1, 5)
        assert tuple(CacheSlots.of(held).stamp) == (2, 0)
    finally:
        for p in made:
            p.ctx.destroy(linger=0)
        index.close()


def test_the_probe_batch_is_fixed_by_the_feeds_and_tells_models_apart():
    """The same probe for every teacher of the same feeds; another model, or one that does not
    reproduce its answers (random noise, batch statistics), is told by its fingerprint."""
    feeds = [TensorSpec("img", "float32", (784,)), TensorSpec("ids", "int64", (-1,)), TensorSpec("m", "bool", (3,))]
    one, two = probe_batch(feeds), probe_batch(list(feeds))
    assert all(one[k].tobytes() == two[k].tobytes() for k in one)
    assert one["ids"].shape[1] > 0 and set(np.unique(one["ids"])) <= {0, 1}
    assert probe_batch(feeds[:1])["img"].tobytes() != probe_batch([TensorSpec("img", "float32", (783,))])[
        "img"][:, :783].tobytes()
    a, a_again, b = (load_model(f"{CACHE_TEACHERS}:{name}") for name in ("model_a", "model_a", "model_b"))
    assert a.model_id == b.model_id
    fa, fa2, fb = (usable(fingerprint(m), ["prob"], "t")[0] for m in (a, a_again, b))
    assert fa is not None and fb is not None and distance(fa, fa2, ["prob"]) == 0.0
    assert distance(fa, fb, ["prob"]) > 100 * TOLERANCE  # 0.41: other weights move every answer
    noisy = fingerprint(load_model(f"{CACHE_TEACHERS}:noisy"))
    assert usable(noisy, ["prob"], "t")[0] is None and noisy["jitter"] > TOLERANCE

    def batch_norm(batch):  # batch statistics left on: a row's answer depends on the rows beside it
        img = batch["img"]
        return {"prob": cache_teachers.expected(img - img.mean(axis=0), cache_teachers.weights(1))}

    batch_norm.zdistill_spec = (feeds[:1], [TensorSpec("prob", "float32", (10,))], "", True, "bn")
    fp = fingerprint(CallableModel(batch_norm, "batch_norm"))
    assert fp["jitter"] > TOLERANCE and "does not reproduce" in usable(fp, ["prob"], "t")[1]

    def broken(batch):
        raise RuntimeError("no such layer")

    broken.zdistill_spec = batch_norm.zdistill_spec
    assert "no such layer" in usable(fingerprint(CallableModel(broken, "broken")), ["prob"], "t")[1]


def test_each_behaviour_of_a_model_id_gets_a_namespace_of_its_own(tmp_path):
    root = str(tmp_path)
    a, b = (usable(fingerprint(load_model(f"{CACHE_TEACHERS}:{m}")), ["prob"], "t")[0] for m in ("model_a", "model_b"))
    folder_a = namespace_for(root, "m1", FETCHES, a)
    folder_b = namespace_for(root, "m1", FETCHES, b)
    assert folder_a != folder_b and os.path.dirname(folder_a) == os.path.dirname(folder_b) == folder_for(
        root, "m1", FETCHES)
    assert namespace_for(root, "m1", FETCHES, a) == folder_a and namespace_for(root, "m1", FETCHES, b) == folder_b
    assert read_fingerprint(folder_a) == a
    nearly = {"prob": {**a["prob"], "sum": [v * (1 + TOLERANCE / 10) for v in a["prob"]["sum"]]}}
    assert namespace_for(root, "m1", FETCHES, nearly) == folder_a  # within the tolerance: the same model
    assert not any(n.startswith(".new-") for n in os.listdir(os.path.dirname(folder_a)))
