"""Throughput of ``zdistill-teacher`` serving a tiny Paddle MLP, against the same model in-process.

Run ``python bench/bench_teacher.py`` (about 2-3 minutes; ``--quick`` for well under one).
It prints a table and writes ``bench/results/teacher.json``.

Cases (every ratio is computed from figures measured in the same run, repeat by repeat,
because the machines are shared and their absolute speed drifts by +-30%):

- (i) rows/s of the MLP (784 -> 16 -> 10, softmax, Paddle Inference, 1 math thread) served
  by a real ``zdistill-teacher`` and driven through :class:`~zdistill.client.TeacherClient`
  with several requests in flight (and, for reference, with one), at batch 1, 32 and 256
  rows per request, as a ratio to the same saved model run by a ``paddle.inference``
  predictor inside this process.  With several in flight the teacher's batcher may merge
  small requests (a Paddle call costs ~140 us however small the batch), so the teacher's
  rows per model call are reported beside the ratio;
- (ii) four client *processes* sending batch-1 requests at once to teachers with the
  dynamic batcher on (default flags, and ``--max-delay-ms 1``) and off
  (``--max-batch-size 1``): total rows/s, and the ratio on/off.  The teachers' own
  counters give the mean rows per model call, which says why.

Each figure is the median of several repeats; the per-repeat ratios' median is the
headline ratio (a paired figure, so drift between repeats cancels).  Teachers are real
``zdistill-teacher`` processes started with :mod:`tests.procs` and stopped by PID in
``finally`` blocks; so are the client processes.
"""

from __future__ import annotations

import os

# Before numpy is imported anywhere: one math thread per process (the teachers get --threads 1).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from tests import procs  # noqa: E402
from zdistill.client import TeacherClient  # noqa: E402

RESULTS = BENCH / "results"
FEED = "img"
BATCHES = [1, 32, 256]
N_CLIENTS = 4
TIMEOUT = 30.0  # every blocking wait below is bounded by this (seconds)


@dataclass
class Plan:
    """How long and how often to measure; ``--quick`` shrinks it, the cases stay the same."""

    repeats: int
    seconds: float  # one measured run
    in_flight: int  # case (i): requests a client keeps in flight
    client_windows: list[int]  # case (ii): requests each of the four clients keeps in flight


FULL = Plan(repeats=5, seconds=1.5, in_flight=4, client_windows=[1, 4])
QUICK = Plan(repeats=2, seconds=0.6, in_flight=4, client_windows=[1])


# -- the model ---------------------------------------------------------------------------------


def export_mlp(folder: Path) -> Path:
    """Build the tests' tiny MLP (same source, fixed seed) and save it as Paddle 3 json; return the prefix."""
    import paddle

    from tests.test_paddle_teacher import MLP_SOURCE, load_module

    (folder / "tiny_mlp.py").write_text(MLP_SOURCE)
    module = load_module(folder / "tiny_mlp.py")
    paddle.seed(2024)
    prefix = folder / "mlp"
    module.export(module.TinyMLP(), str(prefix))
    return prefix


def inputs(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 784)).astype(np.float32)


# -- case (i): served vs in-process -----------------------------------------------------------------


def in_process_rows_per_s(model: Any, rows: int, seconds: float) -> float:
    """The ceiling: the same predictor called back to back in this process."""
    feeds = {FEED: inputs(rows)}
    model.run(feeds)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        model.run(feeds)
        done += rows
    return done / elapsed


def pipelined_rows_per_s(client: TeacherClient, feeds: dict[str, np.ndarray], seconds: float, window: int) -> float:
    """Keep ``window`` requests of ``feeds`` in flight for ``seconds``; count answered rows."""
    rows = len(next(iter(feeds.values())))
    client.predict(feeds)  # warm the connection and the teacher's buffers
    done = in_flight = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        now = time.perf_counter()
        while now < end and in_flight < window:
            client.submit("predict", feeds)
            in_flight += 1
        if in_flight == 0:
            return done / (now - start)
        for completion in client.collect(wait=TIMEOUT):
            in_flight -= 1
            if completion.error is not None:
                raise completion.error
            done += rows


def case_served_vs_in_process(prefix: Path, tmp: Path, plan: Plan) -> dict[str, Any]:
    from zdistill.teacher.paddle_model import PaddleModel

    model = PaddleModel(str(prefix), threads=1)
    teacher = procs.start_teacher(str(prefix), tmp, "--threads", "1", "--log-level", "WARNING")
    client = TeacherClient(teacher.endpoint, timeout=TIMEOUT)
    keys = ["in_process", "served", "ratio", "rows_per_model_call", "served_1_in_flight", "ratio_1_in_flight"]
    runs: dict[int, dict[str, list[float]]] = {b: {k: [] for k in keys} for b in BATCHES}
    try:
        for r in range(plan.repeats):
            for rows in BATCHES:
                local = in_process_rows_per_s(model, rows, plan.seconds)
                before = client.stats()
                served = pipelined_rows_per_s(client, {FEED: inputs(rows)}, plan.seconds, plan.in_flight)
                after = client.stats()
                single = pipelined_rows_per_s(client, {FEED: inputs(rows)}, plan.seconds, 1)
                per_call = (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"])
                for key, value in zip(keys, [local, served, served / local, per_call, single, single / local],
                                      strict=True):
                    runs[rows][key].append(value)
                print(f"  (i) repeat {r + 1}/{plan.repeats} batch {rows:3d}: in-process {local:9.0f} rows/s, "
                      f"served {served:9.0f} ({per_call:5.1f} rows/call), ratio {served / local:.2f}; "
                      f"1 in flight {single:9.0f}, ratio {single / local:.2f}", flush=True)
    finally:
        client.close()
        teacher.stop()
    return {
        str(rows): {**{k: statistics.median(v) for k, v in runs[rows].items()}, "runs": runs[rows]}
        for rows in BATCHES
    }


# -- case (ii): four client processes, batcher on / off --------------------------------------------


def client_main(endpoint_arg: str) -> int:
    """A benchmark client process: ping, say ``ready``, then run each ``run ENDPOINT SECONDS WINDOW`` line.

    Each command waits for the parent's ``go`` line so that all four clients start together;
    the answer is one JSON line: answered rows and the seconds they took.
    """
    clients: dict[str, TeacherClient] = {}
    for endpoint in endpoint_arg.split(","):
        clients[endpoint] = TeacherClient(endpoint, timeout=TIMEOUT)
        clients[endpoint].ping(timeout=TIMEOUT)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] != ["run"]:
            break
        endpoint, seconds, window = cmd[1], float(cmd[2]), int(cmd[3])
        go = sys.stdin.readline()
        if go.strip() != "go":
            break
        rate = pipelined_rows_per_s(clients[endpoint], {FEED: inputs(1)}, seconds, window)
        print(json.dumps({"rows_per_s": rate}), flush=True)
    for c in clients.values():
        c.close()
    return 0


class ClientProcs(procs.Workers):
    """The four client processes, driven by lines on their stdin; stopped by PID on close."""

    def __init__(self, endpoints: list[str], n: int) -> None:
        super().__init__([[__file__, "--client", ",".join(endpoints)]] * n, "benchmark client", TIMEOUT)

    def run(self, endpoint: str, seconds: float, window: int) -> float:
        """All clients hammer ``endpoint`` together; return their total rows/s."""
        self.tell(f"run {endpoint} {seconds} {window}")
        self.tell("go")  # everyone has its command: now start together
        return sum(json.loads(line)["rows_per_s"] for line in self.read_lines())


CONFIGS = {
    "batcher on (default)": [],
    "batcher on, --max-delay-ms 1": ["--max-delay-ms", "1"],
    "batcher off (--max-batch-size 1)": ["--max-batch-size", "1"],
}
OFF = "batcher off (--max-batch-size 1)"


def case_four_clients(prefix: Path, tmp: Path, plan: Plan) -> dict[str, Any]:
    teachers: dict[str, procs.Proc] = {}
    clients: ClientProcs | None = None
    out: dict[str, Any] = {}
    try:
        for name, flags in CONFIGS.items():
            teachers[name] = procs.start_teacher(str(prefix), tmp, "--threads", "1", "--log-level", "WARNING", *flags)
        clients = ClientProcs([t.endpoint for t in teachers.values()], N_CLIENTS)
        for window in plan.client_windows:
            runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
            stats_before = {name: procs.teacher_stats(t.endpoint, TIMEOUT) for name, t in teachers.items()}
            for r in range(plan.repeats):
                for name, teacher in teachers.items():
                    runs[name].append(clients.run(teacher.endpoint, plan.seconds, window))
                line = ", ".join(f"{name} {runs[name][-1]:7.0f}" for name in CONFIGS)
                print(f"  (ii) {window} in flight per client, repeat {r + 1}/{plan.repeats}: rows/s {line}", flush=True)
            result: dict[str, Any] = {}
            for name, teacher in teachers.items():
                after, before = procs.teacher_stats(teacher.endpoint, TIMEOUT), stats_before[name]
                batches = after["batches"] - before["batches"]
                result[name] = {
                    "rows_per_s": statistics.median(runs[name]),
                    "runs": runs[name],
                    "rows_per_model_call": (after["rows"] - before["rows"]) / max(1, batches),
                }
                if name != OFF:
                    ratios = [on / off for on, off in zip(runs[name], runs[OFF], strict=True)]
                    result[name]["ratio_to_off"] = statistics.median(ratios)
                    result[name]["ratio_runs"] = ratios
            out[f"{window}_in_flight_per_client"] = result
    finally:
        if clients is not None:
            clients.close()
        for t in teachers.values():
            t.stop()
    return out


# -- report ----------------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    window = results["plan"]["in_flight"]
    print("\n(i) tiny Paddle MLP (784-16-10): served through TeacherClient vs the same predictor in-process")
    print("    (medians of the repeats; ratios are the median of per-repeat ratios)")
    print(f"    {'batch':>5} {'in-process':>11} {f'served, {window} in flight':>20} {'rows/call':>9} {'ratio':>6}"
          f" {'served, 1 in flight':>20} {'ratio':>6}")
    for rows, r in results["served_vs_in_process"].items():
        print(f"    {rows:>5} {r['in_process']:>11,.0f} {r['served']:>20,.0f} {r['rows_per_model_call']:>9.1f}"
              f" {r['ratio']:>6.2f} {r['served_1_in_flight']:>20,.0f} {r['ratio_1_in_flight']:>6.2f}")
    print(f"\n(ii) {N_CLIENTS} client processes, batch-1 requests: dynamic batcher on vs --max-batch-size 1")
    for window, res in results["four_clients"].items():
        print(f"    {window.replace('_', ' ')}:")
        print(f"    {'teacher':<36} {'rows/s':>9} {'rows per model call':>20} {'ratio to off':>13}")
        for name, r in res.items():
            ratio = f"{r['ratio_to_off']:.2f}" if "ratio_to_off" in r else "1 (base)"
            print(f"    {name:<36} {r['rows_per_s']:>9,.0f} {r['rows_per_model_call']:>20.1f} {ratio:>13}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a smoke run)")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as a benchmark client process
    parser.add_argument("--out", default=str(RESULTS / "teacher.json"), help="where to write the JSON results")
    args = parser.parse_args()
    if args.client:
        return client_main(args.client)
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="zd-bench-teacher-") as folder:
        tmp = Path(folder)
        prefix = export_mlp(tmp)
        started = time.time()
        print(f"(i) served vs in-process, {plan.repeats} repeats of {plan.seconds} s, "
              f"{plan.in_flight} requests in flight", flush=True)
        first = case_served_vs_in_process(prefix, tmp, plan)
        print(f"(ii) {N_CLIENTS} client processes, {plan.repeats} repeats of {plan.seconds} s", flush=True)
        second = case_four_clients(prefix, tmp, plan)
    import paddle

    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "paddle": paddle.__version__},
        "plan": plan.__dict__,
        "model": "MLP 784-16-10 softmax, paddle.jit.save (Paddle 3 json), Paddle Inference CPU, 1 math thread",
        "served_vs_in_process": first,
        "four_clients": second,
        "seconds": time.time() - started,
    }
    print_table(results)
    write_results(Path(args.out), results)
    return 0


def write_results(out: Path, results: dict[str, Any]) -> None:
    """Write a benchmark's results as JSON (every repeat, the medians, the plan) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
