"""A student never hangs and never restarts without limit: it fails fast, saying why.

Kill the epoch's reader process, point workers at a teacher that takes other inputs,
break the workers' start, give a wrong address or service name: each must end in an
error naming the cause within seconds (or, where other teachers can do the work, in
a finished epoch), not in a hang or a restart loop.  Hangs are bounded by the tests'
own timeouts: the students that could hang run as separate processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import procs
from tests.teachers import softmax_np
from zdistill import ConfigError, DistillReader, TeacherTimeout

N, B = 2000, 50


@pytest.fixture
def students(programs):
    """``students(*args, **kw)``: a student program of :mod:`tests.students`, run as a process."""
    return lambda *args, **kw: programs(["-m", "tests.students", *args], **kw)


def batches(x: np.ndarray):
    return lambda: ((x[i : i + B], np.arange(i, min(len(x), i + B))) for i in range(0, len(x), B))


def check(out: list, x: np.ndarray) -> None:
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), np.arange(len(x)))
    np.testing.assert_allclose(np.concatenate([b[2] for b in out]), softmax_np(x), rtol=1e-5, atol=1e-6)


# -- the epoch's reader process dies -----------------------------------------------------


def test_reader_process_killed_mid_epoch_raises_within_seconds(start_teacher, students):
    teacher = start_teacher()
    student = students("kill_reader", "--teacher", teacher.endpoint)
    killed = student.event(timeout=60)
    assert killed["event"] == "killed", killed
    outcome = student.event(timeout=15)  # must not block for ever in a send to the dead process
    assert outcome["event"] == "raised", outcome
    assert outcome["type"] == "ReaderError"
    assert "killed by signal 9 (SIGKILL)" in outcome["message"], outcome
    assert outcome["after"] < 10, outcome


@pytest.mark.timeout(120)
@pytest.mark.parametrize("at", [[], ["--at-fork"]], ids=["waiting-for-the-plan", "after-the-fork"])
def test_ctrl_c_while_the_first_epoch_starts_leaves_the_reader_usable(start_teacher, students, at):
    """A KeyboardInterrupt between the epoch's start and its first batch ends that epoch like any
    other way out: the epoch run next gets slots (its first grant is not held by the interrupted
    one) and ends, and the interrupted epoch's reader process is stopped."""
    teacher = start_teacher()
    student = students("interrupted_start", "--teacher", teacher.endpoint, *at)
    assert student.event(timeout=60)["event"] == "interrupted"
    outcome = student.event(timeout=60)  # not a wait for ever for a slot
    assert outcome == {"event": "finished", "samples": 20000, "reader_pids_alive": []}, outcome


# -- teachers that take other inputs ------------------------------------------------------


@pytest.mark.parametrize(("model", "said"), [
    ("softmax_100", ["'img'", "[100]", "[784]"]),  # takes 100 values a row, not 784
    ("softmax_fp16", ["'prob' is float16 [10]", "float32 [10]"]),  # the loop would get batches of both
    ("softmax_12", ["'prob' is float32 [12]", "float32 [10]"]),
])
def test_a_teacher_of_other_feeds_or_predictions_is_set_aside_and_the_epoch_goes_on(start_teacher, model, said):
    """The first teacher asked sets the feeds and the predictions' dtype and shape (float32, 10 a
    row); another that takes other rows, or whose ``prob`` is float16 or 12 a row, gets no task."""
    good = start_teacher()
    other = start_teacher(f"{procs.TEACHERS}:{model}")
    x = np.random.default_rng(2).random((N, 784), dtype=np.float32)
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([good.endpoint, other.endpoint])
        dr.set_batch_generator(batches(x))
        dr.options.task_rows = B
        deadline = time.monotonic() + 30
        while not dr.stats()["teachers"].get(other.endpoint, {}).get("reason") and time.monotonic() < deadline:
            out = list(dr())  # the sink hears the worker's verdict during an epoch
            check(out, x)
            assert {(b[2].dtype, b[2].shape[1:]) for b in out} == {(np.dtype(np.float32), (10,))}
        stats = dr.stats()
    assert stats["workers_restarted"] == 0, "the worker of the teacher set aside crashed"
    other_stats = stats["teachers"][other.endpoint]
    assert not other_stats["up"] and other_stats["tasks"] == 0, other_stats
    assert all(part in other_stats["reason"] for part in said), other_stats


def test_the_only_teacher_redeployed_with_another_model_fails_the_epoch_fast(start_teacher, tmp_path):
    teacher = start_teacher()
    port = int(teacher.endpoint.rsplit(":", 1)[1])
    x = np.random.default_rng(2).random((N * 4, 784), dtype=np.float32)
    redeployed = []
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([teacher.endpoint])
        dr.set_batch_generator(batches(x))
        dr.options.task_rows = B
        try:
            it = dr()
            next(it)
            teacher.kill()
            redeployed.append(procs.start_teacher(f"{procs.TEACHERS}:renamed_softmax", tmp_path, port=port))
            started = time.monotonic()
            with pytest.raises(ConfigError, match="pixels") as err:
                list(it)
            assert time.monotonic() - started < 15
            assert teacher.endpoint in str(err.value)
            assert dr.stats().get("workers_restarted", 0) == 0
        finally:
            for p in redeployed:
                p.stop()


# -- workers that cannot start ---------------------------------------------------------


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python without zdistill or its dependencies installed (a fresh venv)."""
    folder = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=60)
    return str(folder / "bin" / "python")


def vendored_student(tmp_path: Path, teacher: str, break_worker: bool) -> Path:
    """A training script beside a vendored copy of zdistill, importable only through ``sys.path``."""
    vendor = tmp_path / "vendor"
    shutil.copytree(procs.REPO / "zdistill", vendor / "zdistill", ignore=shutil.ignore_patterns("__pycache__"))
    if break_worker:
        broken = "raise ImportError('this vendored worker is broken')\n"
        (vendor / "zdistill" / "student" / "worker.py").write_text(broken)
    site = next(p for p in sys.path if p.endswith("site-packages"))  # numpy, pyzmq, msgpack
    script = tmp_path / "train.py"
    script.write_text(f"""
import json, sys, time
sys.path[:0] = [{str(vendor)!r}]
sys.path.append({site!r})
import numpy as np
from zdistill import DistillReader, ZDistillError
x = np.ones((400, 784), np.float32)
dr = DistillReader(ins=['img'], predicts=['prob'])
dr.set_fixed_teacher({teacher!r})
dr.set_batch_generator(lambda: ((x[i:i + 50],) for i in range(0, 400, 50)))
started = time.monotonic()
try:
    rows = sum(len(b[0]) for b in dr())
    print(json.dumps({{'rows': rows}}))
except ZDistillError as exc:
    print(json.dumps({{'error': type(exc).__name__, 'message': str(exc), 'after': time.monotonic() - started,
                      'spawned': dr.stats().get('workers_spawned')}}))
finally:
    dr.close()
""")
    return script


def run_script(python: str, script: Path, timeout: float) -> dict:
    proc = subprocess.Popen([python, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=str(script.parent), env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"the student did not finish in {timeout} s:\n{err.decode()[-3000:]}") from None
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert lines, err.decode()[-3000:]
    return json.loads(lines[-1])


def test_workers_see_the_students_import_path(start_teacher, bare_python, tmp_path):
    teacher = start_teacher()
    result = run_script(bare_python, vendored_student(tmp_path, teacher.endpoint, break_worker=False), timeout=60)
    assert result == {"rows": 400}


def test_workers_that_cannot_start_end_the_epoch_quoting_their_stderr(start_teacher, bare_python, tmp_path):
    teacher = start_teacher()
    result = run_script(bare_python, vendored_student(tmp_path, teacher.endpoint, break_worker=True), timeout=60)
    assert result.get("error") == "WorkerError", result
    assert "this vendored worker is broken" in result["message"], result
    assert result["after"] < 20 and result["spawned"] <= 5, result


# -- wrong addresses and names: say what is wrong at once ---------------------------------


def test_a_wrong_teacher_address_is_named_at_once_with_the_cause(caplog):
    port = procs.free_port()  # nothing listens there
    with DistillReader(ins=["img"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(f"127.0.0.1:{port}")
        dr.set_batch_generator(lambda: iter(()))
        dr.options.teacher_wait = 3
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="zdistill"), pytest.raises(TeacherTimeout) as err:
            dr()
    waited = time.monotonic() - started
    first = caplog.records[0]
    assert f"127.0.0.1:{port}" in first.getMessage() and "refused" in first.getMessage(), first.getMessage()
    assert "3 s" in first.getMessage()
    assert first.created - (time.time() - waited) < 1.0, "the first message must come at once"
    assert "refused" in str(err.value)
    assert waited < 8


def test_a_teacher_behind_curve_without_the_key_is_named_as_such(start_teacher, tmp_path, caplog):
    from zdistill.security import main as security_main

    keys = tmp_path / "keys"
    security_main(["keygen", str(keys), "server"])
    teacher = start_teacher(f"{procs.TEACHERS}:softmax", "--curve-secret-key", str(keys / "server.key_secret"))
    with DistillReader(ins=["img"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teacher.endpoint)
        dr.set_batch_generator(lambda: iter(()))
        dr.options.teacher_wait = 3
        with caplog.at_level(logging.WARNING, logger="zdistill"), pytest.raises(TeacherTimeout) as err:
            dr()
    assert "CURVE" in caplog.records[0].getMessage(), caplog.records[0].getMessage()
    assert "ZDISTILL_CURVE_SERVER_KEY" in str(err.value)


def test_a_misspelled_service_names_the_services_the_balancer_knows(redis_server, tmp_path, caplog):
    from tests import daemons

    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    teacher = procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp_path)
    register = daemons.start_register(redis_server.endpoint, "mnist_teacher", teacher.endpoint.replace("tcp://", ""),
                                      tmp_path)
    try:
        with DistillReader(ins=["img"], predicts=["prob"]) as dr:
            dr.set_dynamic_teacher(balancer.endpoint, "mnist_teahcer")
            dr.set_batch_generator(lambda: iter(()))
            dr.options.teacher_wait = 4
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="zdistill"), pytest.raises(TeacherTimeout) as err:
                dr()
        first = caplog.records[0]
        assert "mnist_teahcer" in first.getMessage() and "mnist_teacher" in first.getMessage(), first.getMessage()
        assert first.created - (time.time() - (time.monotonic() - started)) < 3.0
        assert "mnist_teacher" in str(err.value)
    finally:
        for proc in (register, teacher, balancer):
            proc.stop()


@pytest.mark.timeout(60)
def test_a_balancer_without_redis_is_named_as_up_with_no_leader(redis_server, tmp_path, caplog):
    """A balancer that lost Redis stands by and names no leader: the student says so, not "no balancer answers"."""
    from tests import daemons

    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)  # a leader lease of 1 s
    try:
        procs.wait_for(lambda: (daemons.status(balancer.endpoint) or {}).get("leading") is True, 15, "it to lead")
        redis_server.stop()
        procs.wait_for(lambda: (daemons.status(balancer.endpoint) or {}).get("leading") is False, 15,
                       "it to stand by, Redis gone")
        with DistillReader(ins=["img"], predicts=["prob"]) as dr:
            dr.set_dynamic_teacher(balancer.endpoint, "mnist_teacher")
            dr.set_batch_generator(lambda: iter(()))
            dr.options.teacher_wait = 3
            with caplog.at_level(logging.WARNING, logger="zdistill"), pytest.raises(TeacherTimeout) as err:
                dr()
    finally:
        balancer.stop()
    message = str(err.value)
    assert f"{balancer.endpoint}: up, but has no leader (this balancer cannot reach Redis" in message, message
    assert "no balancer answers" not in message, message
    assert any("up, but has no leader" in r.getMessage() for r in caplog.records), "said at once, not only at the end"


# -- SIGTERM of a student ---------------------------------------------------------------


@pytest.mark.parametrize("own_handler", [False, True], ids=["default", "own-handler"])
def test_sigterm_removes_the_students_folders(start_teacher, students, own_handler):
    teacher = start_teacher()
    args = ["wait_for_sigterm", "--teacher", teacher.endpoint] + (["--own-handler"] if own_handler else [])
    student = students(*args)
    running = student.event(timeout=60)
    folders = running["folders"]
    assert all(os.path.isdir(f) for f in folders)
    student.popen.send_signal(signal.SIGTERM)
    if own_handler:
        assert student.event(timeout=10) == {"event": "own_handler", "signum": signal.SIGTERM}
    code = student.popen.wait(15)
    assert code == (3 if own_handler else -signal.SIGTERM)
    assert not any(os.path.exists(f) for f in folders), folders


# -- a teacher too busy for more -------------------------------------------------------


def test_busy_answers_are_retried_not_counted_as_failures(start_teacher):
    """A teacher whose queue bound is smaller than what the student keeps in flight answers
    ``busy``: the worker sends those requests again a little later, and the epoch is exact."""
    teacher = start_teacher(f"{procs.TEACHERS}:slow_softmax", "--max-queue-mb", "1",
                            env={"ZDISTILL_TEST_DELAY_MS": "20"})
    x = np.random.default_rng(4).random((N, 784), dtype=np.float32)
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher([teacher.endpoint])
        dr.set_batch_generator(batches(x))
        dr.options.task_rows = dr.options.request_rows = B
        dr.options.in_flight = 16  # 16 x 50 rows x 3 KiB: more than the teacher's 1 MiB
        check(list(dr()), x)
        stats = dr.stats()
    assert procs.teacher_stats(teacher.endpoint)["errors"].get("busy", 0) > 0, "the teacher never said busy"
    assert stats["failed"] == 0 and stats["returned"] == 0, stats
