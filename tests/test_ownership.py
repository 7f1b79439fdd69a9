"""Who may stop a reader and remove its folders: another thread, a forked child, a second student, SIGTERM.

A DistillReader owns processes and two private folders (shared-memory slots, ipc
endpoints).  ``close()`` from another thread must stop them at once and tell the
waiting loop so; a child the student forked must never remove its parent's folders;
a second student must reclaim a folder only when its owner is provably gone (the
owner holds a lock on it for its life), whatever PIDs it can or cannot see; and a
student killed by SIGTERM leaves no folder behind, whichever thread made its reader.
The students that fork, get signals or could hang run as separate processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

from tests import procs
from zdistill import ClosedError, DistillReader
from zdistill.student.shm import make_private_folder

N, B = 200, 50


def batches(x: np.ndarray):
    return lambda: ((x[i : i + B], np.arange(i, min(len(x), i + B))) for i in range(0, len(x), B))


def running(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def loop_in_thread(body) -> tuple[threading.Thread, dict]:
    """A training loop (``body``) started in a thread; its outcome (``result`` or ``error``, and
    ``at``, when it ended) fills the dict it returns beside the thread."""
    outcome: dict = {}

    def loop() -> None:
        try:
            outcome["result"] = body()
        except BaseException as exc:  # noqa: BLE001 - the test inspects what the loop saw
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=loop)
    thread.start()
    return thread, outcome


@pytest.fixture
def scripts(programs):
    """``scripts(code, *prefix, env=...)``: a student program's source run as a process (lines in, JSON out)."""
    return lambda code, *prefix, env=None: programs(["-c", textwrap.dedent(code)], *prefix, env=env, stdin=True)


# The head of the student programs below: a reader on one teacher and a check of an epoch.
STUDENT = """
    import json, os, sys, time
    import numpy as np
    from tests.teachers import softmax_np
    from zdistill import DistillReader

    def say(event, **fields):
        print(json.dumps({{"event": event, **fields}}), flush=True)

    x = np.random.default_rng(5).random((400, 784), dtype=np.float32)
    dr = DistillReader(ins=['img', 'label'], predicts=['prob'])
    dr.set_fixed_teacher({teacher!r})
    dr.set_batch_generator(lambda: ((x[i:i+50], np.arange(i, i + 50)) for i in range(0, 400, 50)))

    def epoch():
        try:
            out = list(dr())
        except Exception as exc:
            return f"{{type(exc).__name__}}: {{exc}}"
        labels = np.concatenate([b[1] for b in out])
        probs = np.concatenate([b[2] for b in out])
        exact = np.array_equal(labels, np.arange(400)) and np.allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)
        return "exact" if exact else "wrong"
"""


def program(teacher: str, *parts: str) -> str:
    """A student program: :data:`STUDENT` on ``teacher``, then ``parts``."""
    return "".join(textwrap.dedent(part) for part in (STUDENT.format(teacher=teacher), *parts))


# -- close() from another thread ------------------------------------------------------------


def slow_reader(start_teacher) -> DistillReader:
    """A reader of a teacher that takes 2 s a request: its loop waits for the first answer a while."""
    teacher = start_teacher(f"{procs.TEACHERS}:slow_softmax", env={"ZDISTILL_TEST_DELAY_MS": "2000"})
    dr = DistillReader(ins=["img", "label"], predicts=["prob"])
    dr.set_fixed_teacher(teacher.endpoint)
    dr.set_batch_generator(batches(np.random.default_rng(2).random((N, 784), dtype=np.float32)))
    dr.options.task_rows = B
    return dr


@pytest.mark.timeout(60)
def test_close_from_another_thread_stops_everything_and_the_waiting_loop_raises_at_once(start_teacher):
    dr = slow_reader(start_teacher)
    thread, outcome = loop_in_thread(lambda: sum(1 for _ in dr()))
    try:
        # The loop waits for the first answer: tasks were sent, the teacher takes 2 s for each.
        procs.wait_for(lambda: dr.stats().get("tasks_in_flight", 0) > 0 and dr.stats()["tasks"] == 0, 30,
                       "the first tasks to reach the slow teacher")
        stats = dr.stats()
        pids = [*stats["workers"].values(), stats["reader_pid"]]
        folders = stats["folders"]
        started = time.monotonic()
        dr.close()
        took = time.monotonic() - started
        thread.join(10)
        assert not thread.is_alive(), "the training loop still waits on a closed reader"
    finally:
        thread.join(30)
        dr.close()
    assert took < 6, f"close() took {took:.1f} s"
    assert isinstance(outcome.get("error"), ClosedError), outcome
    assert "closed" in str(outcome["error"])
    assert outcome["at"] - started < 1.0, "the loop heard of close() only after it returned"
    assert not any(running(pid) for pid in pids), [p for p in pids if running(p)]
    assert not any(os.path.exists(f) for f in folders), folders


@pytest.mark.timeout(60)
def test_close_from_another_thread_while_the_first_epoch_waits_for_teachers(caplog):
    """Nothing listens at the teacher's address: the first epoch waits up to ``teacher_wait``
    for one; close() ends that wait too."""
    dr = DistillReader(ins=["img", "label"], predicts=["prob"])
    dr.set_fixed_teacher(f"127.0.0.1:{procs.free_port()}")
    dr.set_batch_generator(batches(np.zeros((N, 784), np.float32)))
    dr.options.teacher_wait = 20
    thread, outcome = loop_in_thread(lambda: next(dr()))
    try:
        procs.wait_for(lambda: "trying again" in caplog.text, 10, "the first epoch to wait for the teacher")
        started = time.monotonic()
        dr.close()
        thread.join(10)
        assert not thread.is_alive(), "the first epoch still waits for teachers on a closed reader"
    finally:
        dr.close()
        thread.join(30)
    assert isinstance(outcome.get("error"), ClosedError), outcome
    assert outcome["at"] - started < 3.0, outcome["at"] - started


@pytest.mark.timeout(90)
def test_an_epoch_asked_for_from_another_thread_while_one_runs_is_refused_every_time(start_teacher):
    """``dr()`` from a second thread while the loop waits in its epoch cannot close that epoch
    (the generator is running): it raises, and so does a second try, which must not start an
    epoch beside the running one (that would forget the running epoch's tasks, and its loop
    would wait for ever)."""
    dr = slow_reader(start_teacher)
    thread, outcome = loop_in_thread(lambda: [label for _, label, _ in dr()])
    refused = []
    try:
        procs.wait_for(lambda: dr.stats().get("tasks_in_flight", 0) > 0 and dr.stats()["tasks"] == 0, 30,
                       "the first tasks to reach the slow teacher")
        for _ in range(2):
            try:
                next(dr())
            except ValueError as exc:
                refused.append(str(exc))
        thread.join(60)
        assert not thread.is_alive(), "the running epoch waits for ever: another began beside it"
    finally:
        dr.close()
        thread.join(30)
    assert len(refused) == 2 and all("already executing" in r for r in refused), refused
    np.testing.assert_array_equal(np.concatenate(outcome["result"]), np.arange(N))


# -- a child the student forked ends ------------------------------------------------------------

FORK_EXIT = """
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # the normal way out: atexit and every finalizer run in the child
    os.waitpid(pid, 0)
"""

MP_SIGTERM = """
    import multiprocessing
    def helper(started):
        started.set()
        time.sleep(60)
    mp = multiprocessing.get_context("fork")
    started = mp.Event()
    child = mp.Process(target=helper, args=(started,))
    child.start()
    assert started.wait(30)  # CPython drops a signal that reaches a child before it runs Python (after fork)
    child.terminate()  # SIGTERM: the handler the child inherited from the student runs in it
    child.join(10)
    assert child.exitcode == -15, child.exitcode
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("child", [FORK_EXIT, MP_SIGTERM], ids=["os.fork-exits", "multiprocessing-sigterm"])
def test_a_child_the_student_forked_leaves_its_folders_alone(start_teacher, scripts, child):
    teacher = start_teacher()
    student = scripts(program(teacher.endpoint, """
        first = epoch()
        folders = dr.stats()['folders']
    """, child, """
        say("epochs", first=first, second=epoch(), folders=[os.path.isdir(f) for f in folders])
        dr.close()
        say("closed", folders=[os.path.isdir(f) for f in folders])
    """))
    outcome = student.event(timeout=90)
    assert outcome == {"event": "epochs", "first": "exact", "second": "exact", "folders": [True, True]}, outcome
    assert student.event(timeout=30) == {"event": "closed", "folders": [False, False]}
    assert student.popen.wait(30) == 0


# -- a second student reclaims "stale" folders ------------------------------------------------------------

OWNER = """
    first = epoch()
    say("running", folders=dr.stats()['folders'], first=first)
    sys.stdin.readline()
    say("second", outcome=epoch())
    dr.close()
"""

RECLAIMER = """
    import json
    from zdistill.student.shm import make_private_folder, make_slot_folder
    made = [make_slot_folder(1 << 20), make_private_folder("ipc")]
    print(json.dumps({"pid": os.getpid()}), flush=True)
    for folder in made:
        folder.remove()
"""


def can_unshare() -> str:
    """Why a PID namespace of its own cannot be made here, or ''."""
    if os.geteuid() != 0:
        return "making a PID namespace needs root"
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10)
    except FileNotFoundError:
        return "unshare(1) is not installed"
    return "" if done.returncode == 0 else f"unshare --pid fails: {done.stderr.decode(errors='replace')}"


@pytest.mark.timeout(120)
def test_a_student_in_another_pid_namespace_does_not_reclaim_a_live_students_folders(start_teacher, scripts):
    """The second student sees no process of the first (its own PID namespace, as in a sibling
    container sharing /tmp and /dev/shm): it must judge the folders by their lock, not by PID."""
    why = can_unshare()
    if why:
        pytest.skip(why)
    teacher = start_teacher()
    owner = scripts(program(teacher.endpoint, OWNER))
    running_ = owner.event(timeout=60)
    assert running_["first"] == "exact", running_
    reclaimer = scripts("import os\n" + textwrap.dedent(RECLAIMER), "unshare", "--pid", "--fork")
    assert reclaimer.event(timeout=60)["pid"] == 1  # the first process of a PID namespace of its own
    assert reclaimer.popen.wait(30) == 0
    assert all(os.path.isdir(f) for f in running_["folders"]), running_["folders"]
    owner.tell("go")
    assert owner.event(timeout=60) == {"event": "second", "outcome": "exact"}
    assert owner.popen.wait(30) == 0
    assert not any(os.path.exists(f) for f in running_["folders"])


@pytest.mark.timeout(60)
def test_a_folder_named_by_a_dead_pid_is_kept_while_its_lock_is_held(scripts, tmp_path):
    """Its maker died without cleaning up, but a process it forked still holds the folder's lock.

    The folders go to a root of this test's own: students elsewhere on the machine reclaim
    what they find in the shared ones.
    """
    holder = scripts(f"""
        import json, os, sys
        from zdistill.student.shm import make_private_folder
        folder = make_private_folder("ipc", {str(tmp_path)!r})
        if os.fork() == 0:  # the child inherits the lock and outlives its parent
            print(json.dumps({{"folder": folder.path, "pid": os.getpid()}}), flush=True)
            sys.stdin.readline()
            os._exit(0)
        os._exit(0)  # the maker dies at once, cleaning nothing up
    """)
    held = holder.event(timeout=30)
    try:
        assert holder.popen.wait(10) == 0  # the folder's maker is gone
        mine = make_private_folder("ipc", str(tmp_path))
        mine.remove()
        assert os.path.isdir(held["folder"])  # its maker's PID is gone, its lock is not
        holder.tell("exit")
        procs.wait_for(lambda: not psutil.pid_exists(held["pid"]), 10, "the lock's holder to exit")
        again = make_private_folder("ipc", str(tmp_path))
        again.remove()
        assert not os.path.exists(held["folder"])  # now provably unowned: reclaimed
    finally:
        if psutil.pid_exists(held["pid"]):  # the fixture stops the maker; its child is stopped here
            os.kill(held["pid"], signal.SIGKILL)


# -- SIGTERM, the reader made in a thread ----------------------------------------------------------------

THREADED = """
    import threading
    def train():
        global dr
        dr = DistillReader(ins=['img', 'label'], predicts=['prob'])  # made, and started, in this thread
        dr.set_fixed_teacher({teacher!r})
        dr.set_batch_generator(lambda: ((x[i:i+50], np.arange(i, i + 50)) for i in range(0, 400, 50)))
        it = dr()
        for _ in range(2):
            next(it)
        say("running", folders=dr.stats()['folders'], workers=list(dr.stats()['workers'].values()))
        threading.Event().wait()
    threading.Thread(target=train, daemon=True).start()
    while True:
        time.sleep(1)
"""


@pytest.mark.timeout(60)
def test_sigterm_removes_the_folders_of_a_reader_made_in_another_thread(start_teacher, scripts, tmp_path):
    """The student's ipc folder goes to a TMPDIR of this test's own, so that only the student's
    own clean-up can remove it (students elsewhere on the machine reclaim what they find in /tmp)."""
    teacher = start_teacher()
    code = program(teacher.endpoint, THREADED.format(teacher=teacher.endpoint))
    student = scripts(code, env={"TMPDIR": str(tmp_path)})
    running_ = student.event(timeout=60)
    assert running_["folders"][0].startswith(str(tmp_path))
    assert all(os.path.isdir(f) for f in running_["folders"])
    student.popen.send_signal(signal.SIGTERM)
    assert student.popen.wait(15) == -signal.SIGTERM
    procs.wait_for(lambda: not any(os.path.exists(f) for f in running_["folders"]), 10,
                   "the folders of the student killed by SIGTERM to be removed")
    procs.wait_for(lambda: not any(running(p) for p in running_["workers"]), 10, "the workers to exit")
