"""How long the teacher's batcher takes to cut a deep queue of mixed shapes into batches.

Run ``python bench/bench_batcher.py`` (seconds).  For each case, N one-row requests of a
variable-size feed (per-row shape ``[-1]``) in K distinct widths, interleaved (request i
has width ``i % K + 1``), are queued in a :class:`zdistill.teacher.batcher.Batcher` and then taken
as batches (``max_rows`` 256) until none is left.  It prints one JSON line per case: the
seconds spent adding and taking, and the batches formed.  A batcher whose cost grows with
the queue shows it as a time that grows with N x K instead of N.

``--ragged``: rows of token ids with lengths spread evenly over 1..256, in requests of
16 rows, cut into parts by length (:func:`~zdistill.teacher.batcher.split_by_length`,
``--max-batch-tokens`` 32768), queued and taken; it prints the seconds and the padding
the batches would compute, as a share of all tokens computed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zdistill.spec import Ragged  # noqa: E402
from zdistill.teacher.batcher import DEFAULT_MAX_TOKENS, Batcher, Request, split_by_length  # noqa: E402

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


def run_ragged(n: int, rows_per_request: int = 16, max_rows: int = 256) -> dict[str, float]:
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(n // rows_per_request):
        lengths = rng.integers(1, 257, rows_per_request)
        requests.append(Ragged(np.zeros(int(lengths.sum()), np.int64), lengths))
    batcher = Batcher(max_rows, 0.0, DEFAULT_MAX_TOKENS)
    start = time.perf_counter()
    for i, ids in enumerate(requests):
        for part in split_by_length([b"peer"], i, {"ids": ids}, ids.lengths, float(i), max_rows, DEFAULT_MAX_TOKENS):
            batcher.add(part)
    added = time.perf_counter()
    while batcher.take(float(n), force=True) is not None:
        pass
    done = time.perf_counter()
    s = batcher.stats
    assert s.rows == len(requests) * rows_per_request
    return {"rows": s.rows, "rows_per_request": rows_per_request, "split_add_s": round(added - start, 3),
            "take_s": round(done - added, 3), "batches": s.batches,
            "padding": round(s.padding_tokens / (s.tokens + s.padding_tokens), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(f"{n}/{k}" for n, k in CASES),
                        help="comma list of N/K (default %(default)s)")
    parser.add_argument("--ragged", type=int, default=0, metavar="ROWS",
                        help="instead: ROWS token rows of lengths 1..256 in requests of 16 rows")
    args = parser.parse_args()
    if args.ragged:
        print(json.dumps(run_ragged(args.ragged)), flush=True)
        return 0
    for case in args.cases.split(","):
        n, k = (int(v) for v in case.split("/"))
        print(json.dumps(run_case(n, k)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
