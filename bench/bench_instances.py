"""``zdistill-teacher --instances``: a CPU stand-in for a GPU teacher, served by 1 and 2 instances.

Run ``python bench/bench_instances.py`` (about 1 minute; ``--quick`` for about 20 s).  It
prints a table and writes ``bench/results/instances.json``.

The model is :func:`bench.teachers_bench.gpu_standin`: 64 uint8 3x224x224 images (9.2 MiB)
per call, every byte copied into a buffer of the calling thread (a host-to-device copy;
numpy releases the GIL), then 30 ms of waiting (a kernel).  On a GPU one instance runs
copy-in, compute and copy-out back to back, so the device idles during the copies and
the Python between calls; a second instance fills those gaps.  This stand-in shows the
same on a 2-core machine.

Cases, each repeat measuring all three in turn (the order alternates between repeats,
and every ratio is taken within a repeat, as the machine's speed drifts):

- in-process: the function called back to back in this process, one call at a time;
- served by ``zdistill-teacher --instances 1`` and ``--instances 2`` (``--max-batch-size
  64``: one request per call), driven by the raw :class:`~zdistill.client.TeacherClient`
  with ``--in-flight`` requests of 64 images in flight (default 4: two running, two
  queued behind them).

Reported: rows/s of each, served(2)/served(1) and served(2)/in-process (medians of the
per-repeat ratios), and the teachers' own busy time per instance.  A last case measures
what merging costs: four 64-row requests into one 256-row batch, copied into a reused
buffer (:class:`zdistill.teacher.instances.MergeBuffers`) or into fresh memory (``np.concatenate``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
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
sys.path.insert(0, str(BENCH.parent))

from bench.bench_teacher import pipelined_rows_per_s, write_results  # noqa: E402
from bench.teachers_bench import gpu_standin  # noqa: E402
from tests import procs  # noqa: E402
from zdistill.client import TeacherClient  # noqa: E402
from zdistill.teacher.batcher import Request  # noqa: E402
from zdistill.teacher.instances import MergeBuffers  # noqa: E402

RESULTS = BENCH / "results"
MODEL = f"{BENCH / 'teachers_bench.py'}:gpu_standin"
ROWS = 64
TIMEOUT = 30.0


@dataclass
class Plan:
    repeats: int
    seconds: float


FULL = Plan(repeats=7, seconds=2.5)
QUICK = Plan(repeats=3, seconds=1.5)


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, 3, 224, 224), dtype=np.uint8)


def in_process_rows_per_s(seconds: float) -> float:
    """The function's own rate: one call at a time, back to back."""
    feeds = {"img": images(ROWS)}
    gpu_standin(feeds)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        gpu_standin(feeds)
        done += ROWS
    return done / elapsed


def merge_ms(fresh: bool, repeats: int = 20) -> float:
    """Median ms to merge four 64-image requests into one batch."""
    batch = [Request([b"p"], i, {"img": images(ROWS, i)}, ROWS, 0.0) for i in range(4)]
    buffers = MergeBuffers()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if fresh:
            np.concatenate([r.feeds["img"] for r in batch])
        else:
            buffers.merge(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run(plan: Plan, in_flight: int, tmp: Path) -> dict[str, Any]:
    teachers = {n: procs.start_teacher(MODEL, tmp, "--instances", str(n), "--max-batch-size", str(ROWS),
                                       "--log-level", "WARNING") for n in (1, 2)}
    clients = {n: TeacherClient(t.endpoint, timeout=TIMEOUT) for n, t in teachers.items()}
    runs: dict[str, list[float]] = {"in_process": [], "served_1": [], "served_2": []}
    try:
        before = {n: c.stats() for n, c in clients.items()}
        for r in range(plan.repeats):
            order = ["in_process", "served_1", "served_2"]
            if r % 2:
                order.reverse()
            for case in order:
                if case == "in_process":
                    rate = in_process_rows_per_s(plan.seconds)
                else:
                    n = int(case[-1])
                    rate = pipelined_rows_per_s(clients[n], {"img": images(ROWS)}, plan.seconds, in_flight)
                runs[case].append(rate)
            print(f"  repeat {r + 1}/{plan.repeats}: in-process {runs['in_process'][-1]:6.0f} rows/s, "
                  f"served --instances 1 {runs['served_1'][-1]:6.0f}, --instances 2 {runs['served_2'][-1]:6.0f}",
                  flush=True)
        after = {n: c.stats() for n, c in clients.items()}
    finally:
        for c in clients.values():
            c.close()
        for t in teachers.values():
            t.stop()
    ratio_2_1 = [b / a for a, b in zip(runs["served_1"], runs["served_2"], strict=True)]
    ratio_2_local = [b / a for a, b in zip(runs["in_process"], runs["served_2"], strict=True)]
    ratio_1_local = [b / a for a, b in zip(runs["in_process"], runs["served_1"], strict=True)]
    busy = {n: [round(a - b, 2) for a, b in zip(after[n]["instance_seconds"], before[n]["instance_seconds"],
                                               strict=True)] for n in (1, 2)}
    return {
        "rows_per_s": {k: statistics.median(v) for k, v in runs.items()},
        "runs": runs,
        "served_2_over_served_1": statistics.median(ratio_2_1),
        "served_2_over_in_process": statistics.median(ratio_2_local),
        "served_1_over_in_process": statistics.median(ratio_1_local),
        "ratio_runs": {"2/1": ratio_2_1, "2/in-process": ratio_2_local, "1/in-process": ratio_1_local},
        "instance_busy_seconds": busy,
        "merge_4x64_images_ms": {"reused_buffer": merge_ms(fresh=False), "fresh_concatenate": merge_ms(fresh=True)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a smoke run)")
    parser.add_argument("--in-flight", type=int, default=4, help="requests the client keeps in flight (default 4)")
    parser.add_argument("--out", default=str(RESULTS / "instances.json"), help="where to write the JSON results")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="zd-bench-instances-") as folder:
        result = run(plan, args.in_flight, Path(folder))
    result.update(plan=plan.__dict__, in_flight=args.in_flight, seconds=round(time.time() - started),
                  machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_average": os.getloadavg()})
    r = result["rows_per_s"]
    print(f"\nCPU stand-in (64 uint8 3x224x224 per call: copy every byte, then 30 ms), {args.in_flight} in flight")
    print(f"    in-process, one call at a time: {r['in_process']:7.0f} rows/s")
    print(f"    served, --instances 1:          {r['served_1']:7.0f} rows/s "
          f"({result['served_1_over_in_process']:.2f}x in-process)")
    print(f"    served, --instances 2:          {r['served_2']:7.0f} rows/s "
          f"({result['served_2_over_served_1']:.2f}x --instances 1, "
          f"{result['served_2_over_in_process']:.2f}x in-process)")
    print(f"    busy seconds per instance: {result['instance_busy_seconds']}")
    m = result["merge_4x64_images_ms"]
    print(f"    merging 4 x 64 images: {m['reused_buffer']:.1f} ms into a reused buffer, "
          f"{m['fresh_concatenate']:.1f} ms into fresh memory")
    write_results(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
