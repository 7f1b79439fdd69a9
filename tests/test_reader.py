"""DistillReader against real teacher processes: output, order, lifecycle, errors."""

from __future__ import annotations

import collections
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests import procs
from tests.teachers import softmax_np
from zdistill import ConfigError, DistillReader, ReaderError, TeacherError
from zdistill.client import TeacherClient

N = 1000  # samples per epoch: not a multiple of any batch size used below


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Three softmax teachers, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("teachers")
    started = [procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp) for _ in range(3)]
    yield [p.endpoint.replace("tcp://", "") for p in started]
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    return rng.random((N, 784), dtype=np.float32), np.arange(N, dtype=np.int64)


def sample_reader(x, y):
    return lambda: ((x[i], int(y[i])) for i in range(len(x)))


def sample_list_reader(x, y, batch=32):
    return lambda: ([(x[j], int(y[j])) for j in range(i, min(len(x), i + batch))] for i in range(0, len(x), batch))


def batch_reader(x, y, batch=32):
    return lambda: ((x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch))


def reader_pids(dr: DistillReader) -> list[int]:
    stats = dr.stats()
    return [*stats["workers"].values()] + ([stats["reader_pid"]] if stats["reader_pid"] else [])


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        if psutil.pid_exists(pid):
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"process {pid} is still running"


def collect(dr: DistillReader, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Run one epoch; return images, labels, predictions in output order, and the batch sizes seen."""
    imgs, labels, probs, sizes = [], [], [], []
    for item in dr():
        if kind == "sample":
            img, label, prob = item
            imgs.append(img[None]), labels.append(label), probs.append(prob[None])
            sizes.append(1)
        elif kind == "sample_list":
            sizes.append(len(item))
            for img, label, prob in item:
                imgs.append(img[None]), labels.append(label), probs.append(prob[None])
        else:
            img, label, prob = item
            sizes.append(len(img))
            imgs.append(img), labels.append(label), probs.append(prob)
    return np.concatenate(imgs), np.array(np.hstack(labels)), np.concatenate(probs), sizes


@pytest.mark.parametrize("kind", ["sample", "sample_list", "batch"])
@pytest.mark.parametrize("teacher_batch", [1, 7, 32, None])
@pytest.mark.parametrize("n_teachers", [1, 3])
def test_predictions_equal_numpy_in_reader_order(teachers, data, kind, teacher_batch, n_teachers):
    if teacher_batch == 1 and kind != "batch":
        pytest.skip("batch size 1 is covered once, with the batch reader, to keep the suite short")
    x, y = data
    make = {"sample": sample_reader, "sample_list": sample_list_reader, "batch": batch_reader}[kind]
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teachers[:n_teachers])
        if teacher_batch:
            dr.set_teacher_batch_size(teacher_batch)
        getattr(dr, f"set_{kind}_generator")(make(x, y))
        imgs, labels, probs, sizes = collect(dr, kind)
    np.testing.assert_array_equal(labels, y)  # every sample once, in order
    np.testing.assert_array_equal(imgs, x)
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)
    assert probs.dtype == np.float32 and probs.shape == (N, 10)
    if kind != "sample":
        assert sizes == [32] * (N // 32) + [N % 32]  # the reader's own batches, uneven last one


def test_many_epochs_reuse_workers_and_early_break_restarts(teachers, data):
    x, y = data
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(",".join(teachers[:2]))
        dr.set_sample_list_generator(sample_list_reader(x, y))
        first = [b[0][1] for b, _ in zip(dr(), range(3), strict=False)]  # leave the epoch after 3 batches
        assert first == [0, 32, 64]
        workers = sorted(reader_pids(dr)[:2])
        for _ in range(2):
            _, labels, _, _ = collect(dr, "sample_list")
            np.testing.assert_array_equal(labels, y)  # each new epoch starts from the beginning
        assert sorted(reader_pids(dr)[:2]) == workers  # the same worker processes across epochs
        procs.wait_for(lambda: not [c for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE],
                       5, "ended epochs' reader processes to be reaped")


def test_training_loop_may_keep_and_write_its_arrays(teachers, data):
    """Output arrays are zero-copy views of shared memory: the slot they live in must not
    be reused while the loop holds them, across epochs too, and writing into them is allowed."""
    x, y = data
    epoch = [1]  # set here before each epoch: the reader process is forked with it

    def shifted():  # every epoch's data differ, so a slot reused under a kept array would show
        return ((x[i : i + 32] + epoch[0], y[i : i + 32]) for i in range(0, len(x), 32))

    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teachers[:2])
        dr.options.task_rows = 32  # a task (and a slot) per batch: slots are reused many times per epoch
        dr.set_batch_generator(shifted)
        kept = []
        for i, (img, label, prob) in enumerate(dr()):
            if i < 3:
                kept.append((img, label, prob))
            else:
                img[:] = -1.0  # the loop owns what it was given
        for _ in range(2):
            epoch[0] += 1
            imgs, labels, probs, _ = collect(dr, "batch")
            np.testing.assert_array_equal(labels, y)
            np.testing.assert_array_equal(imgs, x + epoch[0])
            np.testing.assert_allclose(probs, softmax_np(x + epoch[0]), rtol=1e-5, atol=1e-6)
    for i, (img, label, prob) in enumerate(kept):  # still the first epoch's data, after the reader closed
        rows = slice(32 * i, 32 * i + 32)
        np.testing.assert_array_equal(img, x[rows] + 1)
        np.testing.assert_array_equal(label, y[rows])
        np.testing.assert_allclose(prob, softmax_np(x[rows] + 1), rtol=1e-5, atol=1e-6)


def test_a_loop_keeping_every_batch_is_not_starved_by_the_memory_bound(teachers, data):
    """The arrays the loop holds are the loop's memory (README: the slots hold up to
    ``max_inflight_bytes`` plus what the loop holds): views it keeps of earlier tasks, worth
    more than the bound, must not keep the reader from the slot of the next task, or
    ``list(dr())`` with big batches would wait for it for ever."""
    x, y = data
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teachers[:1])
        dr.set_batch_generator(batch_reader(x, y))
        dr.options.task_rows = 32  # a task per batch, of about 100 kB: the loop keeps views of 4 (keep_limit)
        dr.options.max_inflight_bytes = 300_000
        kept: list = []
        errors: list[BaseException] = []

        def keep_all() -> None:
            try:
                kept.extend(dr())
            except BaseException as exc:  # noqa: BLE001 - the test reports what the loop saw
                errors.append(exc)

        loop = threading.Thread(target=keep_all, daemon=True)
        loop.start()
        loop.join(60)
        assert not loop.is_alive(), f"the loop waits for ever after {len(kept)} of 32 batches"
    assert not errors, errors
    np.testing.assert_array_equal(np.concatenate([label for _, label, _ in kept]), y)
    np.testing.assert_allclose(np.concatenate([prob for _, _, prob in kept]), softmax_np(x), rtol=1e-5, atol=1e-6)


def test_slow_teachers_get_smaller_tasks(start_teacher, data):
    """A task holds about ``task_seconds`` of its teacher's time (a slow teacher's epoch
    does not end on a few long tasks), never fewer rows than one request; same output."""
    x, y = data
    slow = start_teacher(f"{procs.TEACHERS}:slow_softmax", env={"ZDISTILL_TEST_DELAY_MS": "20"})
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([slow.endpoint])
        dr.set_batch_generator(batch_reader(x, y))
        assert dr.stats()["task_rows"] == dr.options.task_rows == 1024  # nothing measured yet
        collect(dr, "batch")
        assert dr.stats()["tasks"] == 1  # 1000 rows: one task, four 20 ms teacher calls
        assert dr.stats()["task_rows"] == dr.options.request_rows == 256
        assert dr.stats()["in_flight"] == dr.options.in_flight == 2  # two 20 ms tasks queue 40 ms already
        imgs, labels, probs, sizes = collect(dr, "batch")
        assert dr.stats()["tasks"] == 1 + 4  # 256 + 256 + 256 + 232 rows (whole 32-row batches)
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(imgs, x)
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)
    assert sizes == [32] * (N // 32) + [N % 32]


def test_parts_of_a_task_refused_busy_are_asked_again_and_every_row_answered(start_teacher, data):
    """A task goes to its teacher as several requests; a teacher whose queue is full refuses
    some of them with ``busy``.  Those parts are asked again, and the task is answered only
    once every part is: no row goes without its prediction, whichever part answers last."""
    x, y = data
    full = start_teacher(f"{procs.TEACHERS}:slow_softmax", "--max-queue-mb", "0.4", "--max-message-mb", "0.3",
                         env={"ZDISTILL_TEST_DELAY_MS": "20"})
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([full.endpoint])
        dr.options.request_rows = 64  # 200 KB a request: the teacher's queue holds two
        dr.set_batch_generator(batch_reader(x, y))
        imgs, labels, probs, sizes = collect(dr, "batch")
    assert procs.teacher_stats(full.endpoint)["errors"].get("busy", 0) > 0  # parts were refused
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(imgs, x)
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)
    assert sizes == [32] * (N // 32) + [N % 32]


def test_a_worker_never_holds_more_tasks_than_it_may(start_teacher, data):
    """An epoch's first tasks go to idle workers before they answer the reader's hello; the
    answer must count them, and a worker still busy with the epoch before gets none, or it
    would hold more than ``in_flight`` tasks.  The teacher waits 150 ms to fill a 16-row
    batch, so two 8-row tasks held at once would merge."""
    x, y = data
    teacher = start_teacher(f"{procs.TEACHERS}:slow_softmax", "--max-batch-size", "16", "--max-delay-ms", "150",
                            env={"ZDISTILL_TEST_DELAY_MS": "1"})
    client = TeacherClient(teacher.endpoint, timeout=10.0)
    try:
        with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
            dr.set_fixed_teacher([teacher.endpoint])
            dr.options.task_rows = dr.options.request_rows = 8
            dr.options.in_flight = dr.options.max_in_flight = 1
            dr.set_batch_generator(batch_reader(x[:48], y[:48], batch=8))  # six tasks of one 8-row request
            for epoch in range(4):
                if epoch == 2:  # leave while the teacher holds the next task: the worker is still busy
                    outputs = dr()
                    assert len(next(outputs)[0]) == 8
                    procs.wait_for(lambda: client.stats()["queued"] == 1, 10.0, "the next task at the teacher")
                    outputs.close()
                    continue
                _, labels, probs, _ = collect(dr, "batch")
                np.testing.assert_array_equal(labels, y[:48])
                np.testing.assert_allclose(probs, softmax_np(x[:48]), rtol=1e-5, atol=1e-6)
        stats = client.stats()
    finally:
        client.close()
    assert stats["requests"] >= 3 * 6 + 1
    assert stats["merged_batches"] == 0 and stats["max_batch_rows"] == 8


def test_small_tasks_are_kept_in_flight_until_they_fill_the_teachers_batches(start_teacher, data):
    """Tasks of few rows (big samples end a task at ``task_bytes``): the student keeps
    ``(instances + 1) * max_batch_size`` rows at the teacher, from its meta, so the teacher
    runs full batches instead of one task at a time.

    The teacher waits up to 200 ms for a batch to fill (``--max-delay-ms``), so its batches
    measure what the student keeps in flight, not how fast a loaded machine turns answers
    into new requests (with a 5 ms call and no wait, a student slowed by other processes
    left half-empty batches).  With 2 tasks of 8 rows in flight no batch can pass 16 rows,
    however long the teacher waits."""
    x, y = data
    teacher = start_teacher(f"{procs.TEACHERS}:slow_softmax", "--max-batch-size", "64", "--max-delay-ms", "200",
                            env={"ZDISTILL_TEST_DELAY_MS": "5"})
    rows = [64]  # the first epoch's (read in the producer, forked at each epoch): 8 tasks, each batch waits
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([teacher.endpoint])
        dr.options.task_rows = dr.options.request_rows = 8
        dr.set_batch_generator(lambda: batch_reader(x[:rows[0]], y[:rows[0]], batch=8)())
        collect(dr, "batch")  # the first epoch learns the teacher's meta and the task size
        assert dr.stats()["in_flight"] == 2 * 64 // 8
        rows[0] = len(x)
        before = procs.teacher_stats(teacher.endpoint)
        _, labels, probs, _ = collect(dr, "batch")
        after = procs.teacher_stats(teacher.endpoint)
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)
    rows_per_call = (after["rows"] - before["rows"]) / (after["batches"] - before["batches"])
    assert rows_per_call > 32, rows_per_call  # with 2 tasks per worker it would be 16 at most


def test_reader_exception_reaches_training_loop(teachers, data):
    x, y = data

    def broken():
        yield [(x[0], 0)]
        raise KeyError("missing shard 17")

    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teachers[:1])
        dr.set_sample_list_generator(broken)
        with pytest.raises(KeyError, match="missing shard 17"):
            collect(dr, "sample_list")


def test_unknown_exception_type_becomes_reader_error(teachers, data):
    class Private(Exception):
        pass

    def broken():
        raise Private("no way")
        yield

    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teachers[:1])
        dr.set_sample_generator(broken)
        with pytest.raises((ReaderError, Private), match="no way"):
            list(dr())


@pytest.mark.parametrize(
    "reader, message",
    [
        (lambda: iter([[(np.zeros(783, np.float32), 0)]]), r"slot 'img' has samples of shape \[783\]"),
        (lambda: iter([[(np.zeros(784, np.float32),)]]), r"2 slots \['img', 'label'\], got 1"),
        (lambda: iter([[(np.zeros(784, np.float32), 0), (np.zeros(784, np.float32),)]]),
         r"2 slots \['img', 'label'\], got 1"),  # a later sample of the list
        (lambda: iter([[(np.zeros(784, np.float32), 0), np.zeros(2)]]), r"2 slots \['img', 'label'\], got ndarray"),
        (lambda: iter([[(np.zeros(784, np.float32), "cat")]]), r"slot 'label' holds <U3"),
    ],
)
def test_bad_samples_give_clear_errors_without_hanging(teachers, reader, message):
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teachers[:1])
        dr.set_sample_list_generator(reader)
        with pytest.raises(ConfigError, match=message):
            list(dr())


def test_samples_may_be_any_lists_or_tuples(teachers):
    """Named tuples, lists and tuples mixed in one sample list: each value comes back, in order."""
    sample = collections.namedtuple("sample", "img label")
    x = np.random.default_rng(5).random((6, 784), dtype=np.float32)
    samples = [sample(x[0], 0), [x[1], 1], (x[2], 2), sample(x[3], 3), [x[4], 4], (x[5], 5)]
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teachers[:1])
        dr.set_sample_list_generator(lambda: iter([samples[:4], samples[4:]]))
        out = [s for batch in dr() for s in batch]
    assert [int(s[1]) for s in out] == list(range(6))
    np.testing.assert_array_equal(np.stack([s[0] for s in out]), x)


def test_flat_slot_is_reshaped_to_the_teachers_feed(start_teacher):
    """A 28x28 image slot fed to a teacher that takes 784 values: reshaped, as in EDL."""
    teacher = start_teacher()
    x = np.random.default_rng(3).random((64, 28, 28), dtype=np.float32)
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teacher.endpoint)
        dr.set_batch_generator(lambda: iter([(x, np.arange(64))]))
        [(img, _, prob)] = list(dr())
    assert img.shape == (64, 28, 28)  # the output keeps the reader's own shape
    np.testing.assert_allclose(prob, softmax_np(x.reshape(64, 784)), rtol=1e-5, atol=1e-6)


def test_wrong_predict_name_is_a_clear_error(teachers):
    with DistillReader(ins=["img", "label"], predicts=["fc_0.tmp_2"]) as dr:
        dr.set_fixed_teacher(teachers[:1])
        dr.set_sample_list_generator(lambda: iter([]))
        with pytest.raises(ConfigError, match=r"predicts \['fc_0.tmp_2'\] are not outputs .* \['prob'\]"):
            dr()


def test_teacher_refusal_reaches_training_loop(start_teacher):
    """A model that fails on NaN input: after retries, a TeacherError names the problem."""
    teacher = start_teacher(f"{procs.TEACHERS}:fragile_softmax")
    x = np.full((8, 784), np.nan, np.float32)
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teacher.endpoint)
        dr.set_batch_generator(lambda: iter([(x, np.arange(8))]))
        with pytest.raises(TeacherError, match="NaN in the input"):
            list(dr())


def test_teachers_set_again_after_an_epoch_are_refused_until_close(start_teacher, tmp_path):
    """A student that switches to another teacher between epochs (a bigger model, say) got the
    first teacher's predictions for every later epoch without a word: the running workers kept
    it.  The call is refused while the reader runs; after close() the next epoch asks the new one.
    """
    echo = start_teacher(f"{procs.TEACHERS}:echo")  # y = x
    affine = start_teacher(f"{Path(procs.TEACHERS).parent / 'output_teachers.py'}:reused_buffer")  # y = 2x + 1
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with DistillReader(ins=["x"], predicts=["y"]) as dr:
        dr.set_fixed_teacher(echo.endpoint)
        dr.set_batch_generator(lambda: iter([(x,)]))
        [(_, y)] = list(dr())
        np.testing.assert_array_equal(y, x)
        with pytest.raises(ConfigError, match="set_fixed_teacher .* before the first epoch or after close"):
            dr.set_fixed_teacher(affine.endpoint)
        with pytest.raises(ConfigError, match="set_dynamic_teacher .* before the first epoch or after close"):
            dr.set_dynamic_teacher("127.0.0.1:7001", "svc")
        with pytest.raises(ConfigError, match="set_teacher_cache .* before the first epoch or after close"):
            dr.set_teacher_cache(str(tmp_path))
        dr.close()
        dr.set_fixed_teacher(affine.endpoint)
        [(_, y)] = list(dr())
        np.testing.assert_array_equal(y, 2 * x + 1)


def reader_mid_epoch(teachers, x, y):
    """A reader on three teachers that has yielded its first batch: (reader, epoch, its PIDs)."""
    dr = DistillReader(ins=["img", "label"], predicts=["prob"])
    dr.set_fixed_teacher(teachers)
    dr.set_sample_list_generator(sample_list_reader(x, y))
    it = dr()
    next(it)
    return dr, it, reader_pids(dr)


def test_close_and_garbage_collection_stop_every_process(teachers, data):
    dr, it, pids = reader_mid_epoch(teachers, *data)
    assert len(pids) == 4  # three workers and the reader process
    dr.close()
    assert_gone(pids)

    dr, it, pids = reader_mid_epoch(teachers, *data)
    del dr, it
    gc.collect()
    procs.wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                   for p in pids), 10, "processes to stop after garbage collection")


def run_script(code: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(procs.REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(procs.REPO))


def test_interpreter_exit_mid_epoch_stops_workers_quietly(teachers):
    """A script that leaves the loop and exits without close(): no process left, no traceback."""
    result = run_script(f"""
        import numpy as np
        from zdistill import DistillReader
        x = np.zeros((4096, 784), np.float32)
        dr = DistillReader(ins=['img', 'label'], predicts=['prob'])
        dr.set_fixed_teacher({teachers!r})
        dr.set_batch_generator(lambda: ((x[i:i+32], np.arange(32)) for i in range(0, 4096, 32)))
        for i, batch in enumerate(dr()):
            if i == 5:
                break
        print(*dr.stats()['workers'].values(), flush=True)
    """)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 3
    procs.wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 10, "workers to exit with the student")


def test_seed_guide_snippet_runs_with_the_import_swapped(teachers):
    """The student code of the EDL guide, as written there, with zdistill's import and a paddle-free reader."""
    result = run_script(f"""
        import numpy as np
        from zdistill import DistillReader

        class args:
            distill_teachers = {",".join(teachers[:2])!r}

        def train_reader():
            rng = np.random.default_rng(0)
            for _ in range(10):
                yield [(rng.random(784, dtype=np.float32), np.array([3])) for _ in range(32)]

        reader_ins, teacher_predicts = ['img', 'label'], ['prob']
        dr = DistillReader(ins=reader_ins, predicts=teacher_predicts)
        dr.set_fixed_teacher(args.distill_teachers)
        train_reader = dr.set_sample_list_generator(train_reader)
        n = 0
        for data in train_reader():
            assert len(data) == 32 and len(data[0]) == 3
            img, label, soft_label = data[0]
            assert soft_label.shape == (10,) and abs(float(soft_label.sum()) - 1) < 1e-5
            n += len(data)
        print(n)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["320"]


def readme_example(heading: str) -> str:
    """The first Python block under ``heading`` in README.md, as a user copies it."""
    readme = (procs.REPO / "README.md").read_text()
    section = readme[readme.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return textwrap.dedent(section[start : section.index("```", start)])


def test_the_readme_teacher_and_reader_examples_run_together_as_pasted(start_teacher, tmp_path):
    """The README's teacher function, saved as ``teacher.py`` and served, and its DistillReader
    example, pasted into a script with only the port changed: the student gets the teacher's
    ``prob`` of each sample, and ``zdistill.TeacherClient`` lists that output as the README says."""
    (tmp_path / "teacher.py").write_text(readme_example("### `zdistill-teacher`"))
    address = start_teacher(f"{tmp_path / 'teacher.py'}:predict").endpoint.removeprefix("tcp://")
    student = readme_example("## Drop-in table")
    assert "'127.0.0.1:9292'" in student
    check = textwrap.dedent("""
        import json
        import teacher
        from zdistill import TeacherClient
        client = TeacherClient('127.0.0.1:9292', timeout=10)
        fetches = [f['name'] for f in client.meta()['fetches']]
        client.close()
        expected = teacher.predict({'img': img[None]})['prob'][0]
        print(json.dumps({'fetches': fetches, 'label': int(label),
                          'error': float(np.abs(soft_label - expected).max())}))
    """)
    (tmp_path / "student.py").write_text((student + check).replace("127.0.0.1:9292", address))
    env = {**os.environ, "PYTHONPATH": str(procs.REPO)}
    result = subprocess.run([sys.executable, str(tmp_path / "student.py")], capture_output=True, text=True,
                            timeout=120, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["fetches"] == ["prob"]
    assert report["label"] == 0  # the first sample of the last batch
    assert report["error"] < 1e-6


def test_safe_with_paddle_imported_in_the_parent(teachers):
    pytest.importorskip("paddle")
    result = run_script(f"""
        import paddle  # noqa: F401 -- the parent has Paddle's threads and signal handlers
        import numpy as np
        from zdistill import DistillReader
        x = np.ones((300, 784), np.float32)
        with DistillReader(ins=['img', 'label'], predicts=['prob']) as dr:
            dr.set_fixed_teacher({teachers[:1]!r})
            dr.set_batch_generator(lambda: ((x[i:i+50], np.arange(50)) for i in range(0, 300, 50)))
            for _ in range(2):
                print(sum(len(img) for img, _, _ in dr()))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["300", "300"]


def test_stats_count_samples_per_teacher_and_waits(teachers, data):
    x, y = data
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        assert dr.stats()["samples"] == 0
        dr.set_fixed_teacher(teachers[:2])
        dr.set_batch_generator(batch_reader(x, y))
        dr.options.task_rows = 32
        epochs = 0
        while epochs < 10 and (epochs == 0 or len(dr.stats()["teachers"]) < 2):  # both workers up and used
            collect(dr, "batch")
            epochs += 1
        stats = dr.stats()
    assert stats["samples"] == epochs * N and stats["tasks"] == epochs * 32
    assert stats["samples_per_s"] > 0 and stats["wait_s"] >= 0
    assert stats["tasks_in_flight"] >= 0 and stats["tasks_buffered"] >= 0
    per_teacher = stats["teachers"]
    assert set(per_teacher) == set(teachers[:2])
    assert sum(t["samples"] for t in per_teacher.values()) >= epochs * N  # a duplicate counts where it ran
    assert all(t["up"] for t in per_teacher.values())


def test_shared_memory_of_a_killed_student_is_removed_by_its_workers(teachers, tmp_path):
    """A student killed with -9 cleans nothing up; its workers, which outlive it by moments,
    remove its folders once their locks are free.  The ipc folder goes to a TMPDIR of this
    test's own, where no other student on the machine reclaims it first."""
    script = f"""
        import os, signal, numpy as np
        from zdistill import DistillReader
        x = np.zeros((64, 784), np.float32)
        dr = DistillReader(ins=['img', 'label'], predicts=['prob'])
        dr.set_fixed_teacher({teachers[:1]!r})
        dr.set_batch_generator(lambda: iter([(x, np.arange(64))] * 4))
        next(dr())
        print(*dr.stats()['folders'], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    result = run_script(script, env={"TMPDIR": str(tmp_path)})
    folders = result.stdout.split()
    assert result.returncode == -9 and len(folders) == 2 and folders[0].startswith(str(tmp_path)), result
    procs.wait_for(lambda: not any(os.path.exists(f) for f in folders), 20, "the killed student's folders to go")
