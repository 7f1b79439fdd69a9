"""How fast a training student follows teachers that come and go.

    python bench/bench_dynamic.py [--trials 20]

A student trains on an endless reader with one steady teacher, through a real
Redis + balancer.  Each trial starts one more teacher with its ``zdistill-register``
and measures:

- registration -> first task: from the moment the register wrote the record to the
  moment the student's sink received the first finished task from that teacher;
- kill -9 -> no new tasks: from ``kill -9`` of that teacher to the moment the
  student's worker for it stopped taking tasks (detected in-band, from the dropped
  connection, not from the record's TTL).

Prints p50/p95 of each and writes bench/results/dynamic.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import daemons, procs  # noqa: E402
from zdistill import DistillReader  # noqa: E402

SERVICE = "bench_teacher"
RESULTS = Path(__file__).resolve().parent / "results"


def wall_of(mono: float) -> float:
    """A time.monotonic() instant of this process as time.time()."""
    return time.time() - (time.monotonic() - mono)


def run_trials(dr: DistillReader, redis: procs.Proc, tmp: Path, trials: int, out: dict) -> None:
    for _ in range(trials):
        teacher = procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp)
        address = teacher.endpoint.replace("tcp://", "")
        register = daemons.start_register(redis.endpoint, SERVICE, address, tmp, ttl=3.0)
        try:
            registered_at = json.loads(Path(register.extra["ready_file"]).read_text())["registered_at"]
            procs.wait_for(lambda a=address: dr.stats()["teachers"].get(a, {}).get("tasks", 0) > 0, 20,
                           "the new teacher's first task")
            first = dr.stats()["teachers"][address]["first_task_at"]
            out["register_to_first_task_s"].append(wall_of(first) - registered_at)
            killed_at = time.monotonic()
            teacher.popen.send_signal(signal.SIGKILL)
            teacher.popen.wait(10)
            procs.wait_for(lambda a=address, k=killed_at: (s := dr.stats()["teachers"][a])["changed_at"] > k
                           and not s["up"], 20, "the worker to notice the dead teacher")
            out["kill_to_no_new_tasks_s"].append(dr.stats()["teachers"][address]["changed_at"] - killed_at)
        finally:
            register.stop()
            teacher.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="zdistill-bench-dynamic-"))
    redis = procs.start_redis()
    balancer = daemons.start_balancer(redis.endpoint, tmp, student_lease=5.0)
    steady = procs.start_teacher(f"{procs.TEACHERS}:slow_softmax", tmp, env={"ZDISTILL_TEST_DELAY_MS": "2"})
    steady_register = daemons.start_register(redis.endpoint, SERVICE, steady.endpoint.replace("tcp://", ""), tmp)
    out: dict[str, list[float]] = {"register_to_first_task_s": [], "kill_to_no_new_tasks_s": []}
    x = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    labels = np.arange(64)
    stop = threading.Event()
    errors: list[BaseException] = []

    def orchestrate(dr: DistillReader) -> None:
        try:
            run_trials(dr, redis, tmp, args.trials, out)
        except BaseException as exc:  # report it from the main thread
            errors.append(exc)
        finally:
            stop.set()

    try:
        with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
            dr.set_dynamic_teacher(balancer.endpoint, SERVICE, require_max_teacher=4)
            dr.set_batch_generator(lambda: iter(lambda: (x, labels), None))
            dr.options.task_rows = 64
            it = dr()
            next(it)  # the pipeline runs: trials may start
            worker = threading.Thread(target=orchestrate, args=(dr,), daemon=True)
            worker.start()
            for _ in it:  # the training loop; the membership changes are handled in here
                if stop.is_set():
                    break
            worker.join(30)
    finally:
        for proc in (steady_register, steady, balancer, redis):
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise errors[0]
    summary = {}
    for name, values in out.items():
        ms = np.array(values) * 1000
        summary[name] = {"trials": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                         "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)}
        print(f"{name:<28} trials {len(ms):>3}  p50 {summary[name]['p50_ms']:>7.1f} ms  "
              f"p95 {summary[name]['p95_ms']:>7.1f} ms  max {summary[name]['max_ms']:>7.1f} ms")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dynamic.json").write_text(json.dumps({"summary": summary, "raw_s": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
