"""A data-parallel student (2 trainers under Paddle's launcher) sharing two registered teachers.

    python examples/mnist_distill/demo_fleet.py          # 1.5 to 4 minutes on 2 cores; needs redis-server
    python examples/mnist_distill/demo_fleet.py --tiny   # a smoke run

What it starts (all on 127.0.0.1, free ports; every process stopped by PID on exit,
Ctrl-C and failure; the launcher stops its trainers):

    redis-server --port RP --bind 127.0.0.1 --save '' --appendonly no
    zdistill-balancer --db_endpoints 127.0.0.1:RP --server 127.0.0.1:BP
    zdistill-teacher --model out/teacher/model --port TP1     + zdistill-register ... --server 127.0.0.1:TP1
    zdistill-teacher --model out/teacher/model --port TP2     + zdistill-register ... --server 127.0.0.1:TP2
    PADDLE_DISTILL_BALANCE_SERVER=127.0.0.1:BP PADDLE_DISTILL_SERVICE_NAME=mnist_teacher PADDLE_DISTILL_MAX_TEACHER=2 \\
        python -m paddle.distributed.launch --devices "" --nproc_per_node 2 \\
        train_with_fleet.py --use_distill_service True

Each trainer is one student to the balancer, which gives each its own teacher (2
teachers, 2 students: one each, see ``deploy/README.md``).  Then the same student is
trained in one process (``train_with_fleet.py`` without the launcher, the same
teachers), on the same global batches.  It prints per trainer its samples, the
teachers that answered them and its throughput, then the data-parallel accuracy beside
the one-process one, and writes ``out/fleet_results.json``.  It fails (exit 1) unless
the trainers' samples add up to the data set once per epoch, each trainer had a
teacher, and the two accuracies are within 2 points.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from demo import HERE, Children, DaemonError, run_with_children, show
from demo_dynamic import SERVICE, ensure_teacher, find_redis, start_discovery, start_registered_teachers

TRAINERS = 2
MAX_GAP_POINTS = 2.0  # the data-parallel student's accuracy is within this of the one-process student's


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with MNIST idx files (default: scikit-learn digits)")
    p.add_argument("--out", default=os.path.join(HERE, "out"),
                   help="where demo.py left the teacher; fleet_results.json and the logs go here")
    p.add_argument("--epochs", type=int, default=None, help="default: distill_student.STUDENT_EPOCHS")
    p.add_argument("--retrain", action="store_true", help="train a new teacher even if out/teacher/model exists")
    p.add_argument("--tiny", action="store_true", help="256 training images, 1 epoch: a smoke run")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each training run may take")
    args = p.parse_args(argv)
    redis = find_redis("demo_fleet")
    if redis is None:
        return 2
    return run_with_children(os.path.join(args.out, "logs-fleet"), lambda children: run(args, children, redis))


def train(children: Children, name: str, command: list[str], env: dict[str, str], timeout: float) -> None:
    """Run one training command as a child (stopped by PID if this demo stops) and wait for it."""
    child = children.start(name, command, env=env)
    try:
        code = child.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise DaemonError(f"{name} did not finish in {timeout:.0f} s; its log ({child.log_path}):\n"
                          f"{child.log_tail()}") from None
    children.stop(child)
    if code != 0:
        raise DaemonError(f"{name} exited with {code}; its log ({show(child.log_path)}):\n{child.log_tail()}")


def load_records(folder: str, count: int) -> list[dict[str, Any]]:
    """The records the trainers wrote (``trainer_RANK.json``), by rank."""
    records = []
    for rank in range(count):
        with open(os.path.join(folder, f"trainer_{rank}.json")) as f:
            records.append(json.load(f))
    return records


def run(args: argparse.Namespace, children: Children, redis: str) -> int:
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print("loading Paddle ...", flush=True)
    import distill_student as ds
    from data import load_data
    from report import write_json

    children.catch_signals()  # after `import paddle`, which replaced the SIGTERM handler
    data = load_data(args.data_dir)
    if args.tiny:
        data = data.subset(256, 64)
    epochs = 1 if args.tiny else args.epochs or ds.STUDENT_EPOCHS
    prefix = ensure_teacher(data, args.out, args.tiny, args.retrain)

    print("\n[1/5] redis-server and zdistill-balancer")
    db, discovery = start_discovery(children, redis)
    print(f"\n[2/5] two teachers, each registered as {SERVICE!r}")
    teachers = start_registered_teachers(children, prefix, db, ("teacher-1", "teacher-2"))
    names = {address: name for address, (name, _, _) in teachers.items()}

    env = {"PADDLE_DISTILL_BALANCE_SERVER": discovery, "PADDLE_DISTILL_SERVICE_NAME": SERVICE,
           "PADDLE_DISTILL_MAX_TEACHER": "2", "PYTHONPATH": os.pathsep.join(
               p for p in (os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")) if p)}
    script = os.path.join(HERE, "train_with_fleet.py")
    flags = ["--use_distill_service", "True", "--epochs", str(epochs)] + (["--tiny"] if args.tiny else [])
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    fleet_dir, single_dir = os.path.join(args.out, "fleet"), os.path.join(args.out, "fleet-single")
    launch = [sys.executable, "-m", "paddle.distributed.launch", "--devices", "", "--nproc_per_node", str(TRAINERS),
              "--log_dir", os.path.join(children.log_dir, "launcher"), script, *flags, "--out", fleet_dir]
    print(f"\n[3/5] {TRAINERS} data-parallel trainers: PADDLE_DISTILL_BALANCE_SERVER={discovery} "
          f"PADDLE_DISTILL_SERVICE_NAME={SERVICE} PADDLE_DISTILL_MAX_TEACHER=2 python -m paddle.distributed.launch "
          f"--devices \"\" --nproc_per_node {TRAINERS} {show(script)} {' '.join(flags)}")
    t = time.perf_counter()
    train(children, "launcher", launch, env, args.timeout)
    fleet_seconds = time.perf_counter() - t
    records = load_records(fleet_dir, TRAINERS)

    print(f"\n[4/5] the same student in one process: python {show(script)} {' '.join(flags)}")
    t = time.perf_counter()
    train(children, "single", [sys.executable, script, *flags, "--out", single_dir], env, args.timeout)
    single_seconds = time.perf_counter() - t
    single = load_records(single_dir, 1)[0]

    print("\n[5/5] results")
    print(f"  {'trainer':<9}{'samples':>9}{'samples/s':>11}  teachers that answered (samples)")
    for r in records:
        used = ", ".join(f"{names.get(a, a)} {a} ({n:,})" for a, n in sorted(r["teachers"].items()) if n)
        print(f"  {r['rank']:<9}{r['samples']:>9,}{r['samples_per_s']:>11,.0f}  {used or 'none'}")
    dataset_size = records[0]["dataset_size"]
    total = sum(r["samples"] for r in records)
    seen = sorted(i for r in records for epoch in r["ids"] for i in epoch)
    once = seen == sorted(list(range(dataset_size)) * epochs)
    accuracy, single_accuracy = records[0]["accuracy"], single["accuracy"]
    gap = 100 * (accuracy - single_accuracy)
    equal_params = len({r["params_after_first_step"] for r in records}) == 1 and \
        len({r["params_final"] for r in records}) == 1
    checks = {
        "samples_add_up": total == dataset_size * epochs and once,
        "each_trainer_got_a_teacher": all(any(n > 0 for n in r["teachers"].values()) for r in records),
        "accuracy_within_2_points": abs(gap) <= MAX_GAP_POINTS,
        "parameters_equal_on_every_trainer": equal_params,
    }
    rate = total / max(max(r["seconds"] for r in records), 1e-9)
    coverage = "each sample exactly once per epoch" if once else "NOT each sample once per epoch"
    print(f"  together: {total:,} samples = {epochs} epoch(s) x {dataset_size:,} ({coverage}), {rate:,.0f} samples/s; "
          f"launcher run {fleet_seconds:.1f} s")
    print(f"  test accuracy: data-parallel ({TRAINERS} trainers) {accuracy:.4f}, one process {single_accuracy:.4f} "
          f"({gap:+.2f} points; one process {single['samples_per_s']:,.0f} samples/s, run {single_seconds:.1f} s)")
    print(f"  parameters equal on every trainer after the first step and at the end: {equal_params}")
    results = {
        "trainers": [{"rank": r["rank"], "samples": r["samples"],
                      "teachers": sorted(a for a, n in r["teachers"].items() if n),
                      "teacher_samples": r["teachers"], "samples_per_s": r["samples_per_s"]} for r in records],
        "dataset_size": dataset_size,
        "epochs": epochs,
        "accuracy": accuracy,
        "single_process_accuracy": single_accuracy,
        "single_process_samples_per_s": single["samples_per_s"],
        "checks": checks,
        "tiny": args.tiny,
        "wall_seconds": time.perf_counter() - started,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fleet_results.json")
    write_json(path, results)
    failed = [name for name, ok in checks.items() if not ok]
    print(f"  checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}; results: {show(path)}; "
          f"logs: {show(children.log_dir)}; total wall time {results['wall_seconds']:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
