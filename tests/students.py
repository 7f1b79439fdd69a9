"""Student programs that tests run as real processes, for what must be seen from outside.

A hang, a death by signal, what a process leaves behind when it is killed: those can
only be judged from another process.  Each scenario is a small training loop against
the teacher at ``--teacher``; it reports what happened as one JSON line on stdout
(``{"event": ...}``), and the test waits for those lines with a timeout.

    python -m tests.students SCENARIO --teacher HOST:PORT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

N, B = 20000, 50


def say(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def make_reader(teacher: str):
    from zdistill import DistillReader

    x = np.random.default_rng(3).random((N, 784), dtype=np.float32)
    dr = DistillReader(ins=["img", "label"], predicts=["prob"])
    dr.set_fixed_teacher(teacher)
    dr.set_batch_generator(lambda: ((x[i : i + B], np.arange(i, min(N, i + B))) for i in range(0, N, B)))
    dr.options.task_rows = B
    return dr


def kill_reader(teacher: str) -> None:
    """SIGKILL the epoch's reader process from the training loop (as the OOM killer would)."""
    from zdistill import ReaderError

    dr = make_reader(teacher)
    killed_at = None
    try:
        for i, _ in enumerate(dr()):
            if i == 5:
                pid = dr.stats()["reader_pid"]
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                say("killed", pid=pid)
        say("finished")
    except ReaderError as exc:
        say("raised", type=type(exc).__name__, message=str(exc), after=time.monotonic() - (killed_at or 0))
    finally:
        dr.close()


def wait_for_sigterm(teacher: str) -> None:
    """Run part of an epoch, report the pipeline's folders, then idle until a signal comes.

    With ``--own-handler`` the program installs a SIGTERM handler of its own first, which
    must still be called (and decides how the program ends).
    """
    if "--own-handler" in sys.argv:
        def own(signum: int, frame: object) -> None:
            say("own_handler", signum=signum)
            sys.exit(3)

        signal.signal(signal.SIGTERM, own)
    dr = make_reader(teacher)
    it = dr()
    for _ in range(3):
        next(it)
    say("running", folders=dr.stats()["folders"])
    while True:
        time.sleep(1)


def interrupted_start(teacher: str) -> None:
    """Ctrl-C (a real SIGINT) reaches the training loop while its first epoch starts, then the loop
    runs the epoch again, as one does in a notebook.

    It lands while the loop waits for the dispatcher's plan, or with ``--at-fork`` just after the
    loop forked the epoch's reader process.  The signal is sent from inside that step, so that it lands
    there every time.
    """
    import psutil

    from zdistill.student import dispatcher, pipeline

    dr = make_reader(teacher)
    interrupted: list[int] = []  # the reader process of the interrupted epoch, once forked
    if "--at-fork" not in sys.argv:
        planned = pipeline.EpochSink.planned

        def ctrl_c_then_plan(self: pipeline.EpochSink) -> object:
            pipeline.EpochSink.planned = planned  # once
            os.kill(os.getpid(), signal.SIGINT)
            return planned(self)

        pipeline.EpochSink.planned = ctrl_c_then_plan
    else:
        started = dispatcher.Dispatcher.started

        def started_then_ctrl_c(self: dispatcher.Dispatcher, pid: int) -> None:
            dispatcher.Dispatcher.started = started  # once
            started(self, pid)
            interrupted.append(pid)
            os.kill(os.getpid(), signal.SIGINT)

        dispatcher.Dispatcher.started = started_then_ctrl_c
    try:
        try:
            for _ in dr():
                pass
            say("not_interrupted")
            return
        except KeyboardInterrupt:
            say("interrupted", reader_pids=interrupted)
        samples = sum(len(batch[0]) for batch in dr())
        alive = [pid for pid in interrupted if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        say("finished", samples=samples, reader_pids_alive=alive)
    finally:
        dr.close()


SCENARIOS = {"kill_reader": kill_reader, "wait_for_sigterm": wait_for_sigterm, "interrupted_start": interrupted_start}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--teacher", required=True)
    p.add_argument("--own-handler", action="store_true")
    p.add_argument("--at-fork", action="store_true")
    args = p.parse_args()
    SCENARIOS[args.scenario](args.teacher)


if __name__ == "__main__":
    main()
