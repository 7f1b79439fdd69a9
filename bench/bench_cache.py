"""What the teacher-output cache gains where samples repeat, and costs where they never do.

For a cheap teacher (``softmax``, CPU-bound) and a 10 ms one (``fixed_time_softmax``:
every call lasts 10 ms for up to 256 rows, a GPU stand-in), one teacher process each,
``DistillReader`` batches of 256 rows of 784 float32, and for a teacher of per-token
outputs (``per_token``: token sequences of 1..64 ids and a weight per token in, ``h``
per token and ``mean`` per row out), batches of 256 such sequences given as lists of
per-sample arrays, as it is (cheap) and sleeping 10 ms per call:

- **epoch 1 vs epoch 2** with the cache: the first epoch asks the teacher and fills the
  cache, the second is answered from it (samples/s of each, and epoch 2 / epoch 1);
- **the cost on data that never repeats** (augmented inputs: fresh noise every epoch,
  every row misses): samples/s with the cache / without it, the cost of hashing and
  storing every row.

Each repeat runs every variant once (alternating, so noise spreads over all); the
figures are medians of the per-repeat ratios.

    python bench/bench_cache.py          # 5 repeats: about 2 minutes on 2 cores
    python bench/bench_cache.py --quick  # 1 repeat
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: one math thread per process

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_gil import epoch_rate  # noqa: E402
from bench_reader import MAX_BATCH, Fleet  # noqa: E402

from zdistill import DistillReader  # noqa: E402

# teacher, rows per epoch, its ZDISTILL_TEST_DELAY_MS (per_token sleeps that long per call)
CASES = {"cheap": ("softmax", 100_000, ""), "10ms": ("fixed_time_softmax", 25_600, ""),
         "per-token": ("per_token", 25_600, ""), "per-token 10ms": ("per_token", 25_600, "10")}
LONGEST = 64  # tokens of the per-token case's longest sequence


class Data:
    """The rows an epoch reads: ``rows`` fixed ones, or fresh noise every epoch (augmented)."""

    ins, predicts = ["img"], ["prob"]

    def __init__(self, rows: int) -> None:
        self.base = np.random.default_rng(0).random((rows, 784), dtype=np.float32)
        self.current = self.base
        self.rng = np.random.default_rng(1)

    def fixed(self, seed: int | None = None) -> None:
        self.current = self.base if seed is None else np.random.default_rng(seed).random(self.base.shape,
                                                                                       dtype=np.float32)

    def augmented(self) -> None:
        noise = self.rng.standard_normal(self.base.shape, dtype=np.float32) * np.float32(0.01)
        self.current = self.base + noise

    def __call__(self) -> Iterator[tuple[np.ndarray]]:
        x = self.current
        for i in range(0, len(x), MAX_BATCH):
            yield (x[i : i + MAX_BATCH],)


class TokenData(Data):
    """:class:`Data` for the per-token case: sequences of 1..:data:`LONGEST` token ids and weights."""

    ins, predicts = ["ids", "weight"], ["h", "mean"]

    def __init__(self, rows: int) -> None:
        rng = np.random.default_rng(0)
        lengths = rng.integers(1, LONGEST + 1, rows)
        self.ids = [rng.integers(0, 1000, n) for n in lengths]
        self.base = [rng.random(n, dtype=np.float32) for n in lengths]
        self.current, self.rng = self.base, np.random.default_rng(1)

    def fixed(self, seed: int | None = None) -> None:
        rng = None if seed is None else np.random.default_rng(seed)
        self.current = self.base if rng is None else [rng.random(len(w), dtype=np.float32) for w in self.base]

    def augmented(self) -> None:
        self.current = [w + self.rng.standard_normal(len(w), dtype=np.float32) * np.float32(0.01) for w in self.base]

    def __call__(self) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
        for i in range(0, len(self.ids), MAX_BATCH):
            yield self.ids[i : i + MAX_BATCH], self.current[i : i + MAX_BATCH]


def reader(address: str, data: Data, cache: str | None) -> DistillReader:
    dr = DistillReader(ins=data.ins, predicts=data.predicts)
    dr.set_fixed_teacher([address])
    dr.set_batch_generator(data)
    if cache is not None:
        dr.set_teacher_cache(cache)
    return dr


def one_repeat(address: str, data: Data, tmp: str, r: int) -> dict[str, float]:
    out = {}
    with reader(address, data, None) as plain:
        data.fixed(seed=1000 + r)
        epoch_rate(plain, 0.0)  # workers up, the plan measured
        data.fixed()
        out["no_cache"] = epoch_rate(plain, 0.0)
        data.augmented()
        out["augmented_no_cache"] = epoch_rate(plain, 0.0)
    with reader(address, data, os.path.join(tmp, f"cache{r}")) as cached:
        data.fixed(seed=2000 + r)
        epoch_rate(cached, 0.0)  # the same warm-up, on rows the measured epochs never see
        data.fixed()
        out["epoch1"] = epoch_rate(cached, 0.0)
        out["epoch2"] = epoch_rate(cached, 0.0)
        data.augmented()
        out["augmented_cache"] = epoch_rate(cached, 0.0)
        out["hits"] = cached.stats()["cache"]["hits"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one repeat")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="folder for cache.json")
    args = p.parse_args(argv)
    repeats = 1 if args.quick else 5
    results: dict[str, dict] = {}
    for name, (function, rows, delay_ms) in CASES.items():
        os.environ["ZDISTILL_TEST_DELAY_MS"] = delay_ms or "0"  # the teachers started next inherit it
        data = TokenData(rows) if function == "per_token" else Data(rows)
        runs = []
        with tempfile.TemporaryDirectory() as tmp, Fleet(function, 1, Path(tmp)) as fleet:
            for r in range(repeats):
                runs.append(one_repeat(fleet.addresses()[0], data, tmp, r))
                print(f"  {name} repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v:,.0f}" for k, v in runs[-1].items()),
                      flush=True)

        def median(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(run[key] for run in runs)

        def ratio(a: str, b: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(run[a] / run[b] for run in runs)

        results[name] = {
            "teacher": function, "rows_per_epoch": rows, "runs": runs,
            "samples_per_s": {k: median(k) for k in runs[0] if k != "hits"},
            "epoch2_over_epoch1": ratio("epoch2", "epoch1"),
            "epoch1_over_no_cache": ratio("epoch1", "no_cache"),
            "augmented_cache_over_no_cache": ratio("augmented_cache", "augmented_no_cache"),
        }
        res = results[name]
        print(f"{name} teacher: epoch 1 {median('epoch1'):,.0f}/s, epoch 2 {median('epoch2'):,.0f}/s "
              f"(x{res['epoch2_over_epoch1']:.1f}); epoch 1 / no cache {res['epoch1_over_no_cache']:.2f}; "
              f"augmented (every row misses): with cache / without {res['augmented_cache_over_no_cache']:.2f}",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
