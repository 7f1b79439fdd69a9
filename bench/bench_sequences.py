"""Token sequences: ``DistillReader`` tokens/s against a raw client, the batcher's padding, ragged vs fixed slots.

Real ``zdistill-teacher`` processes serve the token-sequence teachers of
``teachers_bench.py`` (int64 ids in, an embedding lookup, then a pooled or a per-token
fetch); the reader's batches are lists of per-sample int64 arrays, as EDL's ERNIE reader
yields them.

- **(s1) tokens/s, reader against raw.**  Lengths uniform over 1..256.  The raw client is
  one ``TeacherClient`` keeping 4 requests of 256 rows in flight (the reader's own
  request size), sending the same sequences as ready-made ``Ragged`` arrays; it runs
  just before each reader epoch, against the same teacher, and the ratio is the median
  of the per-repeat ratios.  Once with a pooled fetch (8 floats per row) and once with a
  per-token one (4 floats per token).
- **(s2) padding.**  The batcher's padding share (the teacher's ``stats``:
  ``padding_tokens / (tokens + padding_tokens)``) under the raw client, for a few length
  distributions and request sizes.
- **(s3) ragged against fixed slots.**  Reader batches of the same tokens (64 rows,
  8,192 tokens each): fixed rows of 128 to a teacher whose feed is fixed at 128; the same
  arrays to the variable-length teacher (they travel as sequences of one length, no
  padding); sequences of lengths ``l, 256 - l`` (``l`` uniform over 1..255) to it.
  tokens/s of each against the first, epochs alternating.

Every epoch is timed whole (``dr()`` to the end of its loop), after a warm-up epoch
that starts the workers and checks its first batch against numpy, and an unmeasured one
that sizes the measured epochs to ``--seconds``.  Every teacher is stopped by PID in a
``finally``.  Writes ``bench/results/sequences.json``.

    python bench/bench_sequences.py          # 5 repeats of 2-s epochs: about 80 s on 2 cores
    python bench/bench_sequences.py --quick  # 1 repeat of 0.5-s epochs: about 15 s
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
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_reader import CpuSnap, Fleet  # noqa: E402
from teachers_bench import EMB_TOKENS, FIXED_TOKENS, VOCAB, pooled  # noqa: E402

from tests.procs import teacher_stats  # noqa: E402
from zdistill import DistillReader  # noqa: E402
from zdistill.client import TeacherClient  # noqa: E402
from zdistill.spec import Ragged  # noqa: E402
from zdistill.student.options import PipelineOptions  # noqa: E402

MAX_LEN = 256  # (s1): lengths uniform over 1..MAX_LEN
BATCH = 64  # sequences per reader batch
REQUEST_ROWS = PipelineOptions().request_rows  # the raw client's request: what the reader's workers send
IN_FLIGHT = 4  # the raw client's requests outstanding
POOL = 16_384  # distinct sequences the reader cycles through
TIMEOUT_S = 60.0  # any one reply; a teacher that stalls fails the run instead of hanging it


@dataclass
class Plan:
    repeats: int
    seconds: float  # one measured epoch, or one raw run


FULL = Plan(repeats=5, seconds=2.0)  # an epoch's start and drain (tens of ms on a loaded machine) weigh little
QUICK = Plan(repeats=1, seconds=0.5)


# -- data ------------------------------------------------------------------------------


def draw_lengths(dist: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` row lengths of a named distribution (int64)."""
    if dist == "uniform 1..256":
        return rng.integers(1, 257, n)
    if dist == "uniform 1..32":
        return rng.integers(1, 33, n)
    if dist == "lognormal, median 64":  # a long tail, as real sentences have; capped at 1024
        return np.clip(np.rint(rng.lognormal(np.log(64), 0.8, n)), 1, 1024).astype(np.int64)
    if dist == "all 128":
        return np.full(n, 128, np.int64)
    if dist == "pairs l, 256 - l":  # every two consecutive rows hold 256 tokens: batches of an even size hold 128 a row
        first = rng.integers(1, 256, (n + 1) // 2)
        return np.stack([first, 256 - first], axis=1).reshape(-1)[:n]
    raise ValueError(dist)


DISTRIBUTIONS = ("uniform 1..256", "uniform 1..32", "lognormal, median 64", "all 128")


def draw_sequences(lengths: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """One int64 array of token ids per length (views of one buffer, as a tokenizer's output might be)."""
    ids = rng.integers(0, VOCAB, int(lengths.sum()), dtype=np.int64)
    return np.split(ids, np.cumsum(lengths)[:-1])


def ragged_requests(seqs: list[np.ndarray], rows: int) -> list[tuple[Ragged, int]]:
    """The sequences as requests of ``rows`` rows, ready to send, and each request's tokens."""
    out = []
    for i in range(0, len(seqs) - rows + 1, rows):
        ragged = Ragged.from_rows(seqs[i : i + rows])
        out.append((ragged, len(ragged.values)))
    return out


# -- the raw client --------------------------------------------------------------------


def raw_rate(address: str, requests: list[tuple[Ragged, int]], seconds: float) -> float:
    """Tokens/s of one ``TeacherClient`` keeping :data:`IN_FLIGHT` of ``requests`` (cycled) outstanding."""
    client = TeacherClient(address, timeout=TIMEOUT_S)
    try:
        client.ping()  # connected before the clock starts
        tokens_of: dict[int, int] = {}
        sent = done = 0

        def send() -> None:
            nonlocal sent
            ragged, tokens = requests[sent % len(requests)]
            tokens_of[client.submit("predict", {"ids": ragged})] = tokens
            sent += 1

        start = time.perf_counter()
        end = start + seconds
        for _ in range(IN_FLIGHT):
            send()
        while tokens_of:
            for completion in client.collect(TIMEOUT_S):
                if completion.error is not None:
                    raise completion.error
                done += tokens_of.pop(completion.req_id)
                if time.perf_counter() < end:
                    send()
        return done / (time.perf_counter() - start)
    finally:
        client.close()


def padding_of(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The batcher's work between two ``stats`` replies: padding share, rows and tokens per model call."""
    tokens = after["tokens"] - before["tokens"]
    padding = after["padding_tokens"] - before["padding_tokens"]
    batches = max(1, after["batches"] - before["batches"])
    return {"padding_share": padding / max(1, tokens + padding), "tokens": tokens, "padding_tokens": padding,
            "rows_per_call": (after["rows"] - before["rows"]) / batches,
            "computed_tokens_per_call": (tokens + padding) / batches}


# -- the reader ------------------------------------------------------------------------


Check = Callable[[Any, Any], None]


class SeqReader:
    """A ``DistillReader`` over a pool of prepared batches, kept alive across epochs.

    ``batches``: reader batches (one slot each: a list of per-sample arrays, or an
    array of rows of one length) and each batch's tokens.  The epoch's length in
    batches is set by an unmeasured sizing epoch after the warm-up.
    """

    def __init__(self, address: str, predict: str, batches: list[tuple[Any, int]], seconds: float,
                 check: Check) -> None:
        self.batches, self.seconds, self.check = batches, seconds, check
        self.count = min(64, len(batches))
        self.dr = DistillReader(ins=["ids"], predicts=[predict])
        self.dr.set_fixed_teacher([address])
        self.dr.set_batch_generator(self._generate)

    def _generate(self) -> Iterator[tuple[Any]]:
        for i in range(self.count):
            yield (self.batches[i % len(self.batches)][0],)

    def __enter__(self) -> SeqReader:
        try:
            for n, (ids, out) in enumerate(self.dr()):  # warm-up: workers up, the first batch checked
                if n == 0:
                    self.check(ids, out)
            rate = self.epoch()  # sizing: tokens/s at the pool's mean tokens per batch
            mean_tokens = statistics.fmean(tokens for _, tokens in self.batches)
            self.count = max(16, int(rate * self.seconds / mean_tokens))
        except BaseException:
            self.dr.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.dr.close()

    @property
    def tokens(self) -> int:
        """The tokens of one epoch."""
        return sum(self.batches[i % len(self.batches)][1] for i in range(self.count))

    def epoch(self) -> float:
        """Tokens/s of one whole epoch, fork to end."""
        tokens = self.tokens
        n = 0
        start = time.perf_counter()
        for _ in self.dr():
            n += 1
        elapsed = time.perf_counter() - start
        if n != self.count:
            raise RuntimeError(f"the reader yielded {n} batches of {self.count}")
        return tokens / elapsed


def check_pooled(ids: Any, out: np.ndarray) -> None:
    rows = list(ids)
    want = np.stack([pooled(row[None], np.array([len(row)]))["pooled"][0] for row in rows])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def check_tokens(ids: list[np.ndarray], out: list[np.ndarray]) -> None:
    assert len(ids) == len(out)
    for row, logits in zip(ids, out, strict=True):
        np.testing.assert_array_equal(logits, EMB_TOKENS[row])


def reader_batches(seqs: list[np.ndarray]) -> list[tuple[Any, int]]:
    """The sequences as reader batches of :data:`BATCH` per-sample arrays (EDL's form), and their tokens."""
    return [(seqs[i : i + BATCH], sum(len(s) for s in seqs[i : i + BATCH]))
            for i in range(0, len(seqs) - BATCH + 1, BATCH)]


# -- the cases -------------------------------------------------------------------------


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def cpu_per_million(cpu: dict[str, float], tokens: float) -> dict[str, float]:
    """CPU seconds per role (:class:`bench_reader.CpuSnap`) per million tokens."""
    return {role: seconds / tokens * 1e6 for role, seconds in cpu.items()}


def median_roles(runs: list[dict[str, float]]) -> dict[str, float]:
    return {role: statistics.median(run[role] for run in runs) for role in runs[0]}


def fmt_roles(cpu: dict[str, float]) -> str:
    """Only the roles that spent something: the raw client has no reader process or workers."""
    return " ".join(f"{role} {seconds:.3f}" for role, seconds in cpu.items() if seconds > 0) + \
        f" (total {sum(cpu.values()):.3f})"


def case_reader_vs_raw(plan: Plan, fleets: dict[str, Fleet], results: dict[str, Any]) -> None:
    """(s1): the reader's tokens/s over the raw client's, measured just before each epoch."""
    rng = np.random.default_rng(1)
    seqs = draw_sequences(draw_lengths("uniform 1..256", POOL, rng), rng)
    requests, batches = ragged_requests(seqs, REQUEST_ROWS), reader_batches(seqs)
    out: dict[str, Any] = {"lengths": "uniform 1..256", "batch": BATCH, "request_rows": REQUEST_ROWS,
                           "in_flight": IN_FLIGHT}
    for teacher, predict, check in (("seq_pooled", "pooled", check_pooled), ("seq_tokens", "logits", check_tokens)):
        address = fleets[teacher].addresses()[0]
        raw_rate(address, requests, plan.seconds / 2)  # the teacher's first calls, unmeasured
        pids = fleets[teacher].pids()
        raw, reader, padding = [], [], []
        raw_cpu: list[dict[str, float]] = []
        reader_cpu: list[dict[str, float]] = []
        with SeqReader(address, predict, batches, plan.seconds, check) as sr:
            for _ in range(plan.repeats):
                cpu = CpuSnap.take(pids)
                raw.append(raw_rate(address, requests, plan.seconds))
                raw_cpu.append(cpu_per_million(CpuSnap.take(pids).minus(cpu), raw[-1] * plan.seconds))
                before, cpu = teacher_stats(address), CpuSnap.take(pids)
                reader.append(sr.epoch())
                reader_cpu.append(cpu_per_million(CpuSnap.take(pids).minus(cpu), sr.tokens))
                padding.append(padding_of(before, teacher_stats(address))["padding_share"])
        ratio = median_ratio(reader, raw)
        out[teacher] = {"fetch": predict, "raw_tokens_per_s": raw, "reader_tokens_per_s": reader,
                        "reader_over_raw": ratio, "reader_padding_share": statistics.median(padding),
                        "epoch_batches": sr.count, "raw_cpu_s_per_million_tokens": median_roles(raw_cpu),
                        "reader_cpu_s_per_million_tokens": median_roles(reader_cpu)}
        print(f"  (s1) {teacher}: reader {statistics.median(reader):,.0f} tokens/s, raw "
              f"{statistics.median(raw):,.0f} tokens/s: {ratio:.2f}x (goal >= 0.8); padding during the "
              f"reader's epochs {statistics.median(padding):.1%}; CPU-s per million tokens: reader "
              f"{fmt_roles(median_roles(reader_cpu))}, raw {fmt_roles(median_roles(raw_cpu))}", flush=True)
    results["s1_reader_vs_raw"] = out


def case_padding(plan: Plan, fleets: dict[str, Fleet], results: dict[str, Any]) -> None:
    """(s2): the batcher's padding share under the raw client, per length distribution and request size."""
    address = fleets["seq_pooled"].addresses()[0]
    rng = np.random.default_rng(2)
    out: dict[str, Any] = {}
    for dist in DISTRIBUTIONS:
        seqs = draw_sequences(draw_lengths(dist, 8192, rng), rng)
        for rows in (REQUEST_ROWS, 16):
            before = teacher_stats(address)
            rate = raw_rate(address, ragged_requests(seqs, rows), plan.seconds)
            figures = {**padding_of(before, teacher_stats(address)), "raw_tokens_per_s": rate}
            out[f"{dist}, {rows}-row requests"] = figures
            print(f"  (s2) {dist}, {rows}-row requests: padding {figures['padding_share']:.1%} of the tokens "
                  f"computed; {figures['rows_per_call']:.0f} rows, {figures['computed_tokens_per_call']:,.0f} "
                  f"tokens per model call; {rate:,.0f} tokens/s", flush=True)
    results["s2_padding"] = out


def case_ragged_vs_fixed(plan: Plan, fleets: dict[str, Fleet], results: dict[str, Any]) -> None:
    """(s3): the same tokens per batch as fixed rows, as dense rows to a ragged feed, and as sequences."""
    rng = np.random.default_rng(3)
    n = POOL // 2
    fixed = [(rng.integers(0, VOCAB, (BATCH, FIXED_TOKENS)), BATCH * FIXED_TOKENS) for _ in range(n // BATCH)]
    seqs = reader_batches(draw_sequences(draw_lengths("pairs l, 256 - l", n, rng), rng))
    assert all(tokens == BATCH * FIXED_TOKENS for _, tokens in seqs)
    variants = {
        "fixed rows to a fixed feed": (fleets["seq_pooled_fixed"], fixed),
        "fixed rows to a variable feed": (fleets["seq_pooled"], fixed),
        "sequences l, 256 - l": (fleets["seq_pooled"], seqs),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with ExitStack() as stack:
        readers = {name: stack.enter_context(SeqReader(fleet.addresses()[0], "pooled", batches, plan.seconds,
                                                       check_pooled))
                   for name, (fleet, batches) in variants.items()}
        for _ in range(plan.repeats):
            for name, sr in readers.items():
                pids = variants[name][0].pids()
                before = CpuSnap.take(pids)
                rates[name].append(sr.epoch())
                cpu[name].append(cpu_per_million(CpuSnap.take(pids).minus(before), sr.tokens))
    base = "fixed rows to a fixed feed"
    out: dict[str, Any] = {"batch": BATCH, "tokens_per_batch": BATCH * FIXED_TOKENS}
    for name, values in rates.items():
        out[name] = {"tokens_per_s": values, "over_fixed": median_ratio(values, rates[base]),
                     "cpu_s_per_million_tokens": median_roles(cpu[name])}
        print(f"  (s3) {name}: {statistics.median(values):,.0f} tokens/s = {out[name]['over_fixed']:.2f}x "
              f"the fixed rows; CPU-s per million tokens {fmt_roles(median_roles(cpu[name]))}", flush=True)
    results["s3_ragged_vs_fixed"] = out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short repeat of every case")
    p.add_argument("--seconds", type=float, help="length of one measured epoch or raw run (default 2; 0.5 quick)")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="folder for sequences.json")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        plan = Plan(plan.repeats, args.seconds)
    results: dict[str, Any] = {
        "plan": asdict(plan),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "load_before": os.getloadavg()},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zd-bench-seq-") as tmp, ExitStack() as stack:
        fleets = {name: stack.enter_context(Fleet(name, 1, Path(tmp)))
                  for name in ("seq_pooled", "seq_tokens", "seq_pooled_fixed")}
        print("(s1) tokens/s: DistillReader against a raw TeacherClient", flush=True)
        case_reader_vs_raw(plan, fleets, results)
        print("(s2) the batcher's padding", flush=True)
        case_padding(plan, fleets, results)
        print("(s3) ragged slots against fixed ones, the same tokens per batch", flush=True)
        case_ragged_vs_fixed(plan, fleets, results)
    results["machine"]["load_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sequences.json").write_text(json.dumps(results, indent=2))
    before, after = results["machine"]["load_before"], results["machine"]["load_after"]
    print(f"{results['wall_s']:.0f} s on {os.cpu_count()} CPUs, load average {before[0]:.1f} before, "
          f"{after[0]:.1f} after; wrote {args.out / 'sequences.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
