"""A model on Triton Inference Server: ``DistillReader`` against tritonclient's own loop, and a zdistill-teacher.

One function, softmax(img @ W) over 784-float rows (``tests/teachers.py``'s), served
three ways on this machine:

- **triton, raw**: tritonclient's own asynchronous loop (``async_infer`` with a callback),
  ``--inflight`` requests of ``--rows`` rows kept in flight, each built as a user would
  (``InferInput.set_data_from_numpy``), against a PyTriton ``tritonserver``
  (``tests/triton_teacher.py``: Triton's dynamic batcher, ``max_batch_size`` = ``--rows``);
- **triton, reader**: a ``DistillReader`` whose only teacher is that model
  (``triton://127.0.0.1:PORT/softmax``), reader batches of ``--rows`` rows;
- **zdistill-teacher, reader**: the same reader against a ``zdistill-teacher`` serving
  the same function (``tests/teachers.py:softmax``).

Each repeat runs the three epochs one after the other (the order rotating), every one
over the same rows, timed whole; the figure is the median of the repeats, and the
ratio reader/raw is the median of the per-repeat ratios (the goal: at least 0.9).  The
student's CPU (the reader's process and its workers) is measured with psutil per
100k rows.  A warm-up epoch of each checks its first batch against numpy.  The server
side needs PyTriton's interpreter (``.triton-venv``, as ``.ci/run`` makes it, or
``ZDISTILL_TRITON_PYTHON``).  With ``--delay-ms``, both servers' model calls also wait that
long (a model on a GPU: the server waits rather than computes, as when it runs on another
machine than the student), so the student's own CPU, which shares this machine's cores
with the servers, weighs less.  Writes ``bench/results/triton[-delay].json``.

    python bench/bench_triton.py          # 5 repeats of 200,000 rows: about 1-2 minutes on 2 cores
    python bench/bench_triton.py --quick  # 1 repeat of 40,000 rows
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: one math thread
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from tests import procs, tritons  # noqa: E402
from tests.teachers import softmax_np  # noqa: E402
from zdistill import DistillReader  # noqa: E402


def student_cpu() -> float:
    """CPU seconds of the student so far: this process, its reaped children (each epoch's producer) and
    the readers' live worker processes; not the servers, which are this process's children too."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:4])
    for child in me.children():
        try:
            if "zdistill.student.worker" in " ".join(child.cmdline()):
                total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def batches(x: np.ndarray, rows: int, samples: int) -> list[np.ndarray]:
    """``samples`` rows in batches of ``rows``, going round ``x`` (views: no copy)."""
    per_lap = len(x) // rows
    return [x[(i % per_lap) * rows:(i % per_lap + 1) * rows] for i in range(samples // rows)]


def raw_epoch(address: str, chunks: list[np.ndarray], inflight: int) -> float:
    """Seconds for tritonclient's own async loop to get every one of ``chunks`` answered."""
    import tritonclient.grpc as grpcclient

    target = address.removeprefix("triton://")
    url, model = target.split("/", 1)
    client = grpcclient.InferenceServerClient(url)
    room = threading.Semaphore(inflight)
    errors: list[Exception] = []
    outputs = [grpcclient.InferRequestedOutput("prob")]

    def answered(result: Any, error: Exception | None) -> None:
        if error is not None:
            errors.append(error)
        room.release()

    try:
        started = time.perf_counter()
        for chunk in chunks:
            room.acquire()
            tensor = grpcclient.InferInput("img", list(chunk.shape), "FP32")
            tensor.set_data_from_numpy(chunk)
            client.async_infer(model, [tensor], answered, outputs=outputs)
        for _ in range(inflight):
            room.acquire()
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    if errors:
        raise RuntimeError(f"raw loop: {errors[0]}")
    return elapsed


def reader_for(address: str, chunks: list[np.ndarray], rows: int) -> DistillReader:
    dr = DistillReader(ins=["img"], predicts=["prob"])
    dr.set_batch_generator(lambda: ((chunk,) for chunk in chunks))
    dr.set_fixed_teacher(address)
    dr.options.request_rows = rows
    return dr


def reader_epoch(dr: DistillReader) -> float:
    started = time.perf_counter()
    for _ in dr():
        pass
    return time.perf_counter() - started


def check(dr: DistillReader, x: np.ndarray) -> None:
    """A warm-up epoch (workers started), its first batch checked against numpy."""
    first = None
    for batch in dr():
        first = batch if first is None else first
    np.testing.assert_allclose(first[1], softmax_np(x[:len(first[1])]), rtol=1e-5, atol=1e-6)


def pin(server_pids: list[int]) -> None:
    """The servers' processes (and their children: tritonserver, its Python backend) on the last CPU,
    this process (and the workers it starts later) on the others: the student's CPU then
    never comes out of a server's, as when they run on machines of their own."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    for pid in server_pids:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            proc.cpu_affinity(cpus[-1:])
    os.sched_setaffinity(0, cpus[:-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=256, help="rows per request and per reader batch")
    p.add_argument("--inflight", type=int, default=4, help="requests the raw loop keeps in flight")
    p.add_argument("--samples", type=int, default=200_000, help="rows per epoch (going round 20,000 distinct ones)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="a fixed service time per model call, in both servers (a model that waits on a GPU)")
    p.add_argument("--pin", action="store_true",
                   help="both servers on the last CPU, the student on the others (as on machines of their own)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.samples, args.repeats = 40_000, 1
    x = np.random.default_rng(7).random((20_000, 784), dtype=np.float32)
    chunks = batches(x, args.rows, args.samples)
    results: dict[str, list[float]] = {"raw": [], "triton": [], "zteacher": [], "ratio": []}
    cpu: dict[str, list[float]] = {"raw": [], "triton": [], "zteacher": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = tritons.start_triton(Path(tmp), max_batch_size=args.rows, delay_ms=args.delay_ms)
        model = "slow_softmax" if args.delay_ms else "softmax"
        teacher = procs.start_teacher(f"{procs.TEACHERS}:{model}", Path(tmp), "--max-batch-size", str(args.rows),
                                      env={"ZDISTILL_TEST_DELAY_MS": str(args.delay_ms)})
        try:
            if args.pin:  # before the readers start their workers, which inherit the student's CPUs
                pin([server.popen.pid, teacher.popen.pid])
            with reader_for(server.address, chunks, args.rows) as on_triton, \
                    reader_for(teacher.endpoint, chunks, args.rows) as on_teacher:
                check(on_triton, x)
                check(on_teacher, x)
                raw_epoch(server.address, chunks[:16], args.inflight)
                runs: dict[str, Callable[[], float]] = {
                    "raw": lambda: raw_epoch(server.address, chunks, args.inflight),
                    "triton": lambda: reader_epoch(on_triton),
                    "zteacher": lambda: reader_epoch(on_teacher),
                }
                order = list(runs)
                for repeat in range(args.repeats):
                    got = {}
                    for name in order[repeat % 3:] + order[:repeat % 3]:
                        before = student_cpu()
                        got[name] = args.samples / runs[name]()
                        if name in cpu:
                            cpu[name].append((student_cpu() - before) * 100_000 / args.samples)
                        results[name].append(got[name])
                    results["ratio"].append(got["triton"] / got["raw"])
                    print(f"repeat {repeat}: raw {got['raw']:,.0f} rows/s, reader on triton {got['triton']:,.0f} "
                          f"({got['triton'] / got['raw']:.3f}), reader on zdistill-teacher {got['zteacher']:,.0f}",
                          flush=True)
        finally:
            teacher.stop()
            server.stop()
    summary = {name: statistics.median(values) for name, values in results.items()}
    summary.update({f"cpu_s_per_100k_{name}": statistics.median(v) for name, v in cpu.items()})
    print(json.dumps(summary, indent=2))
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    (out / f"triton{'-delay' if args.delay_ms else ''}{'-pinned' if args.pin else ''}.json").write_text(json.dumps({
        "args": vars(args), "machine": platform.node(), "cpus": os.cpu_count(), "runs": results, "cpu": cpu,
        "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
