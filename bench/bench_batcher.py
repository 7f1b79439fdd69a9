"""How long the teacher's batcher takes to cut a deep queue of mixed shapes into batches.

Run ``python bench/bench_batcher.py`` (seconds).  For each case, N one-row requests of a
variable-size feed (per-row shape ``[-1]``) in K distinct widths, interleaved (request i
has width ``i % K + 1``), are queued in a :class:`zdistill.teacher.batcher.Batcher` and then taken
as batches (``max_rows`` 256) until none is left.  It prints one JSON line per case: the
seconds spent adding and taking, and the batches formed.  A batcher whose cost grows with
the queue shows it as a time that grows with N x K instead of N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zdistill.teacher.batcher import Batcher, Request  # noqa: E402

CASES = [(20_000, 500), (40_000, 1000), (80_000, 2000)]


def run_case(n: int, k: int, max_rows: int = 256) -> dict[str, float]:
    rows = [np.zeros((1, width), np.float32) for width in range(1, k + 1)]
    batcher = Batcher(max_rows, 0.0)
    start = time.perf_counter()
    for i in range(n):
        batcher.add(Request([b"peer"], i, {"x": rows[i % k]}, 1, float(i)))
    added = time.perf_counter()
    batches = taken = 0
    while (batch := batcher.take(float(n), force=True)) is not None:
        batches += 1
        taken += len(batch)
    done = time.perf_counter()
    assert taken == n, f"{taken} of {n} requests taken"
    return {"requests": n, "widths": k, "add_s": round(added - start, 3), "take_s": round(done - added, 3),
            "total_s": round(done - start, 3), "batches": batches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(f"{n}/{k}" for n, k in CASES),
                        help="comma list of N/K (default %(default)s)")
    args = parser.parse_args()
    for case in args.cases.split(","):
        n, k = (int(v) for v in case.split("/"))
        print(json.dumps(run_case(n, k)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
