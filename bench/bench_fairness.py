"""How fairly students sharing teachers divide them: N student processes x K teachers, fixed or dynamic.

Run ``python bench/bench_fairness.py`` (about a minute; ``--quick`` for a few seconds);
``--teachers K`` for K teachers, ``--dynamic`` to have a balancer assign them,
``--weights 1,1,2`` for students declaring share weights.

Each teacher serves :func:`bench.teachers_bench.fixed_time_softmax`: every call lasts
10 ms whatever its size up to ``--max-batch-size`` 256, so a teacher's capacity is exactly
25,600 rows/s and the pool's is K times that.  Each student is a separate process with
one :class:`~zdistill.client.TeacherClient` per teacher it uses, keeping ``window`` requests of 32
rows in flight on each (a DistillReader's workers keep several requests in flight the
same way).  Students are client loops, not DistillReaders: on 2 shared cores a reader's
own pipeline (workers, shared memory) would be the bottleneck, and the bench is about how
the teachers divide their capacity, which only the requests in flight decide.

Fixed teachers: every student uses all K.  Dynamic (``--dynamic``): a private
redis-server, a ``zdistill-balancer`` and one ``zdistill-register`` per teacher; each
student is a :class:`~zdistill.discovery.client.DiscoveryClient` asking for up to K
teachers and uses those the balancer assigns it, so the figures show the balancer's
split and the teachers' fair queueing together.

Two cases: ``equal`` (every student the same window) and
``unequal`` (windows 8, 16, 64: students that keep different amounts queued, where a
first-come-first-served teacher hands out shares in proportion to what each keeps
queued).  All students start on one ``go`` line and count the rows answered within the
same measured window (after a warm-up).  Per run it reports each student's rows/s,
Jain's fairness index ``(sum x)^2 / (n sum x^2)``, the slowest over the mean, and the
total over the pool's capacity (and the teachers' mean call from their own stats, which
should read 10 ms); then the medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from tests import daemons, procs  # noqa: E402
from zdistill.client import TeacherClient  # noqa: E402
from zdistill.discovery.assignment import assign  # noqa: E402
from zdistill.discovery.client import DiscoveryClient  # noqa: E402

ROWS = 32
MAX_BATCH = 256
SERVICE_S = 0.010
TIMEOUT = 30.0  # every blocking wait below is bounded by this (seconds)
SERVICE = "fairness"
CASES = {"equal": [8, 8, 8], "unequal": [8, 16, 64]}


def jain(rates: list[float]) -> float:
    """Jain's fairness index: 1 when every share is equal, 1/n when one student gets everything."""
    return sum(rates) ** 2 / (len(rates) * sum(r * r for r in rates)) if any(rates) else 0.0


def student_rows(clients: list[TeacherClient], warmup: float, seconds: float, window: int) -> int:
    """Keep ``window`` requests in flight on each client; count the rows answered within the measured window.

    The window starts ``warmup`` seconds from now and lasts ``seconds``; requests go on
    being sent until it ends, so the teachers stay as loaded at its end as at its start;
    then the answers still due are awaited (not counted).
    """
    feeds = {"img": np.random.default_rng(os.getpid()).random((ROWS, 784), dtype=np.float32)}
    start = time.perf_counter() + warmup
    end = start + seconds
    counted = 0
    in_flight = [0] * len(clients)
    poller = zmq.Poller()
    for client in clients:
        poller.register(client.socket, zmq.POLLIN)
    while True:
        now = time.perf_counter()
        if now >= end and not any(in_flight):  # drained: the next run starts from an idle teacher
            return counted
        for i, client in enumerate(clients):
            while now < end and in_flight[i] < window:
                client.submit("predict", feeds)
                in_flight[i] += 1
        poller.poll(int(TIMEOUT * 1000))
        for i, client in enumerate(clients):
            for completion in client.collect():
                in_flight[i] -= 1
                if completion.error is not None:
                    raise completion.error
                if start <= time.perf_counter() < end:
                    counted += ROWS


def student_main(endpoints: str, balancer: str | None, student_id: str, max_teachers: int, weight: float) -> int:
    """A student process: say ``ready``, then answer each ``run WARMUP SECONDS WINDOW`` + ``go``.

    Fixed teachers (``endpoints``), or the teachers the ``balancer`` assigns it: then it
    also answers ``teachers`` with its assignment, which the parent reads until it has
    settled, so no run starts while the balancer is still moving teachers.
    """
    discovery: DiscoveryClient | None = None
    if balancer:
        discovery = DiscoveryClient(balancer, SERVICE, max_teachers, student_id)
        discovery.start()
    clients: dict[str, TeacherClient] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["teachers"] and discovery is not None:  # after a change, or 0.2 s without one
            version, _ = discovery.current()
            print(json.dumps({"teachers": discovery.wait_for_change(version, 0.2)[1]}), flush=True)
            continue
        if cmd[:1] != ["run"] or sys.stdin.readline().strip() != "go":
            break
        addresses = discovery.current()[1] if discovery is not None else endpoints.split(",")
        for address in addresses:
            if address not in clients:
                clients[address] = TeacherClient(address, timeout=TIMEOUT, weight=weight)
                clients[address].ping(timeout=TIMEOUT)
        warmup, seconds, window = float(cmd[1]), float(cmd[2]), int(cmd[3])
        rows = student_rows([clients[a] for a in addresses], warmup, seconds, window)
        print(json.dumps({"rows_per_s": rows / seconds, "teachers": addresses}), flush=True)
    for c in clients.values():
        c.close()
    if discovery is not None:
        discovery.close()
    return 0


class Students(procs.Workers):
    """The student processes, driven by lines on their stdin; stopped by PID on close."""

    def __init__(self, endpoints: list[str], weights: list[float], balancer: str | None = None) -> None:
        self.ids = [f"student-{i}" for i in range(len(weights))]
        dynamic = ["--balancer", balancer] if balancer else []
        super().__init__([[__file__, "--student", ",".join(endpoints), "--student-id", sid, "--weight", repr(weight),
                           "--teachers", str(len(endpoints)), *dynamic]
                          for sid, weight in zip(self.ids, weights, strict=True)], "student", TIMEOUT)

    def settled(self, addresses: list[str], max_teachers: int) -> dict[str, list[str]]:
        """Wait until the students' teachers are balanced and stay so (dynamic teachers only); return them.

        Balanced: :func:`~zdistill.discovery.assignment.assign` keeps it as it is (a
        balanced assignment is its fixed point), and two looks in a row agree.
        """
        maxima = dict.fromkeys(self.ids, max_teachers)
        last: dict[str, list[str]] | None = None
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end:
            self.tell("teachers")
            got = dict(zip(self.ids, (json.loads(line)["teachers"] for line in self.read_lines()), strict=True))
            if got == last and assign(addresses, maxima, got) == got:
                return got
            last = got
        raise TimeoutError(f"the balancer's assignment did not settle: {last}")

    def run(self, warmup: float, seconds: float, windows: list[int]) -> list[float]:
        """Every student streams at once, each with its window; their rows/s over the same measured window."""
        self.tell([f"run {warmup} {seconds} {window}" for window in windows])
        self.tell("go")  # everyone has its command: now start together
        return [json.loads(line)["rows_per_s"] for line in self.read_lines()]


def summary(rates: list[float], weights: list[float], capacity: float) -> dict[str, Any]:
    """One run's figures; the index and the slowest over the mean compare rows/s per unit of weight."""
    shares = [r / w for r, w in zip(rates, weights, strict=True)]
    mean = statistics.mean(shares)
    return {"rows_per_s": [round(r) for r in rates], "jain": round(jain(shares), 4),
            "slowest_over_mean": round(min(shares) / mean, 3) if mean else 0.0,
            "total_over_capacity": round(sum(rates) / capacity, 3)}


def mean_call_ms(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    """The teachers' mean model call over a run, from their own stats: the 10 ms the capacity assumes."""
    seconds = sum(a["model_seconds"] - b["model_seconds"] for a, b in zip(after, before, strict=True))
    calls = sum(a["batches"] - b["batches"] for a, b in zip(after, before, strict=True))
    return round(1000 * seconds / max(1, calls), 2)


def run_case(students: Students, windows: list[int], weights: list[float], teachers: list[procs.Proc], runs: int,
             warmup: float, seconds: float) -> dict[str, Any]:
    capacity = len(teachers) * MAX_BATCH / SERVICE_S
    per_run = []
    for r in range(runs):
        before = [procs.teacher_stats(t.endpoint, TIMEOUT) for t in teachers]
        rates = students.run(warmup, seconds, windows)
        after = [procs.teacher_stats(t.endpoint, TIMEOUT) for t in teachers]
        per_run.append({**summary(rates, weights, capacity), "call_ms": mean_call_ms(before, after)})
        print(f"  windows {windows}, run {r + 1}/{runs}: {json.dumps(per_run[-1])}", flush=True)
    return {"windows": windows, "capacity_rows_per_s": capacity, "runs": per_run,
            **{f"median_{k}": round(statistics.median(run[k] for run in per_run), 4)
               for k in ("jain", "slowest_over_mean", "total_over_capacity")},
            "worst_jain": min(run["jain"] for run in per_run),
            "worst_slowest_over_mean": min(run["slowest_over_mean"] for run in per_run)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default=None, help=argparse.SUPPRESS)  # runs as one student process
    parser.add_argument("--student-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--balancer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--teachers", type=int, default=1, help="K teachers (default 1)")
    parser.add_argument("--dynamic", action="store_true",
                        help="teachers registered with a balancer (redis-server, zdistill-balancer, one "
                             "zdistill-register each), every student asking for up to K; default: each student "
                             "uses all K teachers")
    parser.add_argument("--cases", default=",".join(CASES), help="which of %(default)s")
    parser.add_argument("--windows", default=None,
                        help="one case of your own: requests in flight per student per teacher, e.g. 4,4,4,4")
    parser.add_argument("--weights", default=None,
                        help="each student's declared share weight (TeacherClient weight=), e.g. 1,1,2 "
                             "(default 1 each); the index and the slowest then compare rows/s per unit of weight")
    parser.add_argument("--weight", type=float, default=1.0, help=argparse.SUPPRESS)  # one student's
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="2 runs of 1 s")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.student is not None:
        return student_main(args.student, args.balancer, args.student_id, args.teachers, args.weight)
    if args.quick:
        args.runs, args.seconds, args.warmup = 2, 1.0, 0.3
    cases = {"custom": [int(w) for w in args.windows.split(",")]} if args.windows else \
        {name: CASES[name] for name in args.cases.split(",")}
    n = max(len(w) for w in cases.values())
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * n
    if any(len(w) != n for w in [*cases.values(), weights]):
        raise SystemExit("every case, and --weights, needs as many students")
    model = f"{BENCH / 'teachers_bench.py'}:fixed_time_softmax"
    results: dict[str, Any] = {"teachers": args.teachers, "dynamic": args.dynamic, "weights": weights,
                               "rows_per_request": ROWS,
                               "max_batch": MAX_BATCH, "service_ms": SERVICE_S * 1000, "seconds": args.seconds,
                               "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        teachers: list[procs.Proc] = []
        started: list[procs.Proc] = []  # redis-server, the balancer, zdistill-register: stopped in reverse
        students: Students | None = None
        try:
            for _ in range(args.teachers):
                teachers.append(procs.start_teacher(model, Path(tmp), "--max-batch-size", str(MAX_BATCH),
                                                    "--log-level", "WARNING"))
            addresses = [t.endpoint.removeprefix("tcp://") for t in teachers]
            balancer = None
            if args.dynamic:
                started.append(procs.start_redis())
                started.append(daemons.start_balancer(started[0].endpoint, Path(tmp)))
                balancer = started[1].endpoint
                started += [daemons.start_register(started[0].endpoint, SERVICE, a, Path(tmp)) for a in addresses]
            students = Students(addresses, weights, balancer)
            if args.dynamic:
                results["assignment"] = students.settled(addresses, args.teachers)
                print(f"assignment: {json.dumps(results['assignment'])}", flush=True)
            for name, windows in cases.items():
                print(f"{name}: {n} students x {args.teachers} teachers", flush=True)
                results["cases"][name] = run_case(students, windows, weights, teachers, args.runs, args.warmup,
                                                  args.seconds)
        finally:
            if students is not None:
                students.close()
            for proc in reversed(started):
                proc.stop()
            for t in teachers:
                t.stop()
    for name, case in results["cases"].items():
        print(f"{name} {case['windows']}: Jain median {case['median_jain']} (worst {case['worst_jain']}), "
              f"slowest/mean median {case['median_slowest_over_mean']} (worst {case['worst_slowest_over_mean']}), "
              f"total/capacity median {case['median_total_over_capacity']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
