"""Case (f) of the reader benchmark: does the pipeline keep the teachers fed while the
training step holds the GIL?

A training step written in Python (or a framework call that does not release the GIL)
holds the interpreter for milliseconds at a time, and everything the student process
does in Python (the dispatcher thread, the sink) waits for it.  Here two
``fixed_time_softmax`` teachers (every call lasts 10 ms for up to 256 rows) serve a
``DistillReader`` of 256-row batches, and the training loop spins in pure Python for
``step`` ms per batch.  The ideal is the slower of the two sides, fully overlapped:
``min(teachers' capacity, 256 rows / step)``.  The figure is the share of that ideal
reached, the median of alternating epochs, per step length.

    python bench/bench_gil.py           # steps of 2, 5 and 10 ms, 5 epochs each: about a minute
    python bench/bench_gil.py --quick   # 1 epoch each
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: one math thread per process

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_reader import MAX_BATCH, SERVICE_MS, Fleet  # noqa: E402

from zdistill import DistillReader  # noqa: E402

TEACHERS = 2
STEPS_MS = (2.0, 5.0, 10.0)


def spin(ms: float) -> None:
    """A training step that holds the GIL (pure Python), as a Python-heavy step does."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def epoch_rate(dr: DistillReader, step_ms: float) -> float:
    rows = 0
    start = time.perf_counter()
    for batch in dr():
        rows += len(batch[0])
        spin(step_ms)
    return rows / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one epoch per step length")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="folder for gil.json")
    args = p.parse_args(argv)
    repeats = 1 if args.quick else 5
    batches = 100 if args.quick else 200
    x = np.random.default_rng(0).random((batches * MAX_BATCH, 784), dtype=np.float32)

    def reader() -> Iterator[tuple[np.ndarray]]:
        for i in range(0, len(x), MAX_BATCH):
            yield (x[i : i + MAX_BATCH],)

    capacity = TEACHERS * MAX_BATCH / (SERVICE_MS / 1000)
    results: dict[str, dict[str, float | list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, Fleet("fixed_time_softmax", TEACHERS, Path(tmp)) as fleet:
        with DistillReader(ins=["img"], predicts=["prob"]) as dr:
            dr.set_fixed_teacher(fleet.addresses())
            dr.set_batch_generator(reader)
            epoch_rate(dr, 0.0)  # warm-up: workers up, the plan measured
            rates: dict[float, list[float]] = {s: [] for s in STEPS_MS}
            for _ in range(repeats):
                for step in STEPS_MS:  # alternating, so a noisy moment spreads over every step length
                    rates[step].append(epoch_rate(dr, step))
        for step, values in rates.items():
            ideal = min(capacity, MAX_BATCH / (step / 1000))
            rate = statistics.median(values)
            results[f"step_{step:g}ms"] = {"samples_per_s": values, "median": rate, "ideal": ideal,
                                           "of_ideal": rate / ideal}
            print(f"(f) step {step:g} ms holding the GIL: {rate:,.0f} samples/s = {rate / ideal:.1%} of ideal "
                  f"{ideal:,.0f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gil.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
