"""What a teacher sends back: its own copy of every output, and only outputs that match the declaration.

Real ``zdistill-teacher`` processes serve the functions of :mod:`tests.output_teachers`;
the tests talk to them through :class:`~zdistill.client.TeacherClient` and through a
:class:`~zdistill.DistillReader`, and check every row that comes back against numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests import procs
from tests.output_teachers import MODES, double
from zdistill import DistillReader, TeacherError
from zdistill.client import Completion, TeacherClient

TIMEOUT = 10.0  # seconds; every blocking call in this file is bounded by it
OUTPUTS = str(Path(__file__).resolve().parent / "output_teachers.py")
MISBEHAVING = f"{OUTPUTS}:misbehaving"
KEY = {mode: key for key, mode in MODES.items()}


def inputs(seed: int, n: int) -> np.ndarray:
    """Distinct non-negative rows per seed (no key of MODES), so a row answered for another is visibly wrong."""
    return np.random.default_rng(seed).random((n, 4), dtype=np.float32) + seed


def pipelined(client: TeacherClient, requests: list[np.ndarray]) -> list[Completion]:
    """Send every request (the input ``x``) at once; their completions, in the order sent."""
    return procs.pipelined(client, [{"x": x} for x in requests], TIMEOUT)


# -- the teacher owns what it sends --------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model, instances", [
    ("reused_buffer", 1),
    ("reused_buffer", 3),
    ("same_array", 1),
    ("thread_buffer", 3),
])
def test_every_row_is_its_own_answer_when_the_function_reuses_its_output_buffer(start_teacher, model: str,
                                                                                instances: int) -> None:
    """A function returning (a view of) a buffer it overwrites on its next call: the teacher
    encodes a reply while the instance already runs the next batch, so it must send a copy
    taken before the function could run again, on this instance or another."""
    proc = start_teacher(f"{OUTPUTS}:{model}", "--instances", str(instances), "--max-batch-size", "64")
    client = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        requests = [inputs(seed, 8) for seed in range(300)]
        wrong = 0
        for x, done in zip(requests, pipelined(client, requests), strict=True):
            assert done.error is None, done.error
            wrong += int((~(done.result["y"] == double(x)).all(axis=1)).sum())
        stats = client.stats()
    finally:
        client.close()
    assert wrong == 0, f"{wrong} of {8 * len(requests)} rows are another row's answer"
    assert stats["batches"] < stats["requests"], "no batch was merged: the buffer was never reused under a reply"


@pytest.mark.timeout(120)
def test_distill_reader_gets_every_row_of_a_function_that_reuses_its_output_buffer(start_teacher) -> None:
    """The same through a student: every prediction of the epoch is the numpy answer for its own row."""
    teacher = start_teacher(f"{OUTPUTS}:reused_buffer")
    x = np.random.default_rng(5).random((4000, 4), dtype=np.float32)
    with DistillReader(ins=["x"], predicts=["y"]) as dr:
        dr.set_fixed_teacher(teacher.endpoint)
        dr.set_batch_generator(lambda: ((x[i : i + 16],) for i in range(0, len(x), 16)))
        got = np.concatenate([y for _, y in dr()])
    assert got.shape == x.shape
    wrong = int((~(got == double(x)).all(axis=1)).sum())
    assert wrong == 0, f"{wrong} of {len(x)} predictions are another row's answer"


# -- outputs are checked against the declaration -------------------------------------------------


@pytest.fixture(scope="module")
def misbehaving(tmp_path_factory) -> Iterator[procs.Proc]:
    proc = procs.start_teacher(MISBEHAVING, tmp_path_factory.mktemp("misbehaving"))
    yield proc
    proc.stop()


@pytest.fixture
def client(misbehaving) -> Iterator[TeacherClient]:
    c = TeacherClient(misbehaving.endpoint, timeout=TIMEOUT)
    yield c
    c.close()


BAD_OUTPUTS = {  # mode -> what the error names beside the function, the output and the declared shape
    "one column": "has shape [8, 1]",
    "five columns": "has shape [8, 5]",
    "2x2 rows": "has shape [8, 2, 2]",
    "a row too many": "has shape [9, 4]",
    "complex": "dtype complex64",
    "strings": "dtype <U",
    "missing": "no output 'y' (only ['prob'])",
    "ragged": "is not an array",
    "not a dict": "returned list, not a dict of arrays",
    "float64 beyond float32": "output 'y' holds 1e+39, beyond the range of its declared dtype float32",
}


@pytest.mark.parametrize("mode", list(BAD_OUTPUTS))
def test_an_output_that_breaks_its_declaration_gets_bad_output(client, mode: str) -> None:
    """Rows, row shape, dtype, a missing output: each is answered ``bad_output`` naming the
    function, the output and both shapes, and the teacher goes on serving."""
    x = inputs(1, 8)
    x[3, 0] = KEY[mode]
    with pytest.raises(TeacherError) as info:
        client.predict({"x": x})
    message = str(info.value)
    assert info.value.code == "bad_output", message
    assert f"teacher function {MISBEHAVING}" in message
    assert BAD_OUTPUTS[mode] in message
    if mode != "not a dict":
        assert "declared float32 [8, 4]" in message
    good = inputs(2, 5)
    assert np.array_equal(client.predict({"x": good})["y"], double(good))


@pytest.mark.parametrize("mode", ["float64", "int64", "float64 inf and nan"])
def test_an_output_whose_dtype_casts_within_its_kind_is_served_as_declared(client, mode: str) -> None:
    """numpy's ``same_kind``: float64 or int64 for a declared float32 keeps what the values mean;
    an infinity or a NaN the model computed is its answer, served as it is."""
    x = inputs(3, 6)
    x[0, 0] = KEY[mode]
    y = client.predict({"x": x})["y"]
    want = np.rint(double(x)) if mode == "int64" else double(x)
    if mode == "float64 inf and nan":
        want[0, 1:3] = np.inf, np.nan
    assert y.dtype == np.float32 and np.array_equal(y, want.astype(np.float32), equal_nan=True)


def test_an_output_value_its_declared_dtype_cannot_hold_gets_bad_output_never_wrapped(start_teacher) -> None:
    """int64 answers declared int32: served while they fit; 2**31 + 1 would wrap to -2**31 + 1 in
    the cast, a wrong answer, so that request gets ``bad_output`` naming the value; the others,
    sent with it (and merged with it where they queued together), get their own rows."""
    proc = start_teacher(f"{OUTPUTS}:int64_answer")
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        requests = [np.arange(4 * i, 4 * i + 4, dtype=np.int64).reshape(1, 4) - 8 for i in range(12)]
        requests[3][0, 1] = 2**30 - 1  # 2**31 - 1: int32's largest
        requests[4][0, 2] = -(2**30)  # -2**31 + 1
        requests[5][0, 3] = 2**30  # 2**31 + 1
        requests[9][0, 0] = -(2**30) - 1  # -2**31 - 1
        done = procs.pipelined(c, [{"x": x} for x in requests], TIMEOUT)
    finally:
        c.close()
    for i, (x, d) in enumerate(zip(requests, done, strict=True)):
        if i in (5, 9):
            assert isinstance(d.error, TeacherError) and d.error.code == "bad_output", (i, d.error, d.result)
            value = 2**31 + 1 if i == 5 else -(2**31) - 1
            assert (f"teacher function {OUTPUTS}:int64_answer: output 'y' holds {value}, beyond the range of its "
                    "declared dtype int32 [-2147483648, 2147483647] (returned as int64)") in str(d.error)
        else:
            assert d.error is None, d.error
            assert d.result["y"].dtype == np.int32 and np.array_equal(d.result["y"], double(x)), i


def test_a_declared_any_size_matches_every_size_but_not_another_rank(start_teacher) -> None:
    """A fetch declared [-1] takes rows of any width; rows of another number of axes are bad_output."""
    proc = start_teacher(f"{OUTPUTS}:any_width")
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        for width in (1, 2, 3, 4):
            x = inputs(1, 6)
            x[0, 0] = width - 1
            assert np.array_equal(c.predict({"x": x})["y"], double(x)[:, :width])
        x = inputs(2, 8)
        x[5, 0] = -1
        with pytest.raises(TeacherError) as info:
            c.predict({"x": x})
        assert info.value.code == "bad_output"
        assert "output 'y' has shape [8, 4, 1] for a batch of 8 rows, declared float32 [8, -1] (-1: any size)" \
            in str(info.value)
    finally:
        c.close()


def test_a_bad_output_in_a_merged_batch_spares_the_other_requests(client) -> None:
    """The batch fails as a whole; the teacher runs each request alone, so only the one whose
    row misbehaves gets ``bad_output`` and the others their own rows."""
    before = client.stats()
    requests = [inputs(10 + i, 4) for i in range(12)]
    requests[5][2, 0] = KEY["five columns"]
    done = pipelined(client, requests)
    after = client.stats()
    for i, (x, d) in enumerate(zip(requests, done, strict=True)):
        if i == 5:
            assert isinstance(d.error, TeacherError) and d.error.code == "bad_output"
        else:
            assert d.error is None, d.error
            assert np.array_equal(d.result["y"], double(x))
    assert after["errors"].get("bad_output", 0) - before["errors"].get("bad_output", 0) == 1


def test_a_function_whose_first_run_breaks_its_declaration_does_not_start(tmp_path) -> None:
    """The teacher runs every instance once before it listens: an output wrong already then
    stops the start with exit 2 and a log line naming the function, the output and both shapes."""
    ready = tmp_path / "ready"
    model = f"{OUTPUTS}:one_column"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(procs.REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "zdistill.teacher.server", "--model", model, "--host", "127.0.0.1",
                             "--port", "0", "--ready-file", str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=procs.REPO)
    try:
        procs.wait_for(lambda: proc.poll() is not None or ready.exists(), 60, "teacher")
        assert not ready.exists(), "the teacher started serving a function whose outputs break its declaration"
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert proc.returncode == 2, out
    assert f"teacher function {model}: output 'y' has shape [1, 1] for a batch of 1 rows, declared float32 [1, 4]" \
        in out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, cache", [("one column", False), ("five columns", True)])
def test_distill_reader_raises_bad_output_once_without_retrying(misbehaving, tmp_path, mode: str,
                                                                cache: bool) -> None:
    """A task the teacher answers ``bad_output`` is not sent again (no retry, no worker crash
    loop): the training loop gets one TeacherError carrying the teacher's message, and the
    teacher answered that task's request once.  Without the check, one column passed through
    to the loop, and five columns made every worker die on the cache write."""
    x = np.random.default_rng(6).random((256, 4), dtype=np.float32)
    x[100, 0] = KEY[mode]
    stats = TeacherClient(misbehaving.endpoint, timeout=TIMEOUT)
    try:
        before = stats.stats()["errors"].get("bad_output", 0)
        raised: list[TeacherError] = []
        with DistillReader(ins=["x"], predicts=["y"]) as dr:
            dr.set_fixed_teacher(misbehaving.endpoint)
            if cache:
                dr.set_teacher_cache(tmp_path / "cache")
            dr.set_batch_generator(lambda: ((x[i : i + 16],) for i in range(0, len(x), 16)))
            dr.options.task_rows = 16
            started = time.monotonic()
            try:
                for _ in dr():
                    pass
            except TeacherError as exc:
                raised.append(exc)
            took = time.monotonic() - started
            restarted = dr.stats()["workers_restarted"]
        after = stats.stats()["errors"].get("bad_output", 0)
    finally:
        stats.close()
    assert len(raised) == 1
    assert raised[0].code == "bad_output"
    assert f"teacher function {MISBEHAVING}: output 'y' has shape [16, " in str(raised[0])
    assert after - before == 1, "the task was sent to the teacher again"
    assert restarted == 0
    assert took < 30
