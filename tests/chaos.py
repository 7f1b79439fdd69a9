"""The chaos run: one long dynamic-teacher epoch while teachers, workers, the balancer and
Redis are killed (``kill -9``) and restarted at random moments from a fixed seed.

    python -m tests.chaos --samples 200000 --seed 7          # the long run, by hand
    python -m tests.chaos --samples 20000 --events 4 --quick # about what the test suite runs

Events fire when the training loop reaches sample positions drawn from the seed, so a
run is repeatable whatever the machine's speed.  Each kill is followed, after a
random pause, by a restart at the same address.  At the end it prints the counts
that must all be zero (samples lost, duplicated, out of order, wrong predictions),
the throughput over time, and per event the time until throughput was back to half
its median ("recovery") and the lowest throughput in between ("dip").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests import daemons, procs
from tests.teachers import softmax_np
from zdistill import DistillReader

SERVICE = "chaos_teacher"
KINDS = ("teacher", "worker", "balancer", "redis")


@dataclass
class Event:
    at_sample: int
    kind: str
    pause: float
    fired_at: float = 0.0
    target: str = ""


@dataclass
class Cluster:
    """Every process of the run, restartable at the same address; stopped by PID at the end."""

    tmp: Path
    teacher_delay_ms: int
    redis: procs.Proc | None = None
    redis_port: int = 0
    balancer: procs.Proc | None = None
    balancer_port: int = 0
    teachers: dict[int, procs.Proc] = field(default_factory=dict)
    registers: dict[int, procs.Proc] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    restarts: list[threading.Thread] = field(default_factory=list)
    stopped: bool = False  # set under the lock: a restart still pending then does nothing

    @property
    def redis_endpoint(self) -> str:
        return f"127.0.0.1:{self.redis_port}"

    def start(self, n_teachers: int) -> None:
        self.redis_port, self.balancer_port = procs.free_port(), procs.free_port()
        self.redis = procs.start_redis(self.redis_port)
        self.balancer = daemons.start_balancer(self.redis_endpoint, self.tmp, port=self.balancer_port,
                                               student_lease=5.0)
        for _ in range(n_teachers):
            port = procs.free_port()
            self.teachers[port] = self._teacher(port)
            self.registers[port] = daemons.start_register(self.redis_endpoint, SERVICE, f"127.0.0.1:{port}",
                                                          self.tmp, ttl=2.0)

    def _teacher(self, port: int) -> procs.Proc:
        return procs.start_teacher(f"{procs.TEACHERS}:slow_softmax", self.tmp, port=port,
                                   env={"ZDISTILL_TEST_DELAY_MS": str(self.teacher_delay_ms)})

    def kill_and_restart(self, kind: str, rng: random.Random, pause: float, dr: DistillReader) -> str:
        """Kill one process of ``kind`` now; restart it after ``pause`` s in a background thread."""
        if kind == "worker":
            workers = list(dr.stats().get("workers", {}).values())
            if not workers:
                return "no worker"
            victim = rng.choice(sorted(workers))
            os.kill(victim, signal.SIGKILL)  # the student replaces it by itself
            return f"worker pid {victim}"
        with self.lock:
            # Only a live process is killed: two restarts of one address would leave one behind.
            if kind == "teacher":
                live = sorted(p for p, proc in self.teachers.items() if proc.popen.poll() is None)
                if not live:
                    return "every teacher already down"
                port = rng.choice(live)
                self.teachers[port].kill()
                restart = lambda: self.teachers.__setitem__(port, self._teacher(port))  # noqa: E731
                target = f"teacher :{port}"
            elif kind == "balancer":
                if self.balancer.popen.poll() is not None:
                    return "balancer already down"
                self.balancer.kill()
                restart = lambda: setattr(self, "balancer", daemons.start_balancer(  # noqa: E731
                    self.redis_endpoint, self.tmp, port=self.balancer_port, student_lease=5.0))
                target = f"balancer :{self.balancer_port}"
            else:
                if self.redis.popen.poll() is not None:
                    return "redis already down"
                self.redis.kill()
                restart = lambda: setattr(self, "redis", procs.start_redis(self.redis_port))  # noqa: E731
                target = f"redis :{self.redis_port}"

        def later() -> None:
            time.sleep(pause)  # the outage itself: how long the process stays dead
            with self.lock:
                if not self.stopped:
                    restart()

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        self.restarts.append(thread)
        return target

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
        for thread in self.restarts:  # one may be starting a process right now: let it finish
            thread.join(60)
        with self.lock:
            for proc in [*self.registers.values(), *self.teachers.values(), self.balancer, self.redis]:
                if proc is not None:
                    proc.stop()


def plan(seed: int, samples: int, events: int) -> list[Event]:
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(events)]
    rng.shuffle(kinds)
    spots = sorted(rng.sample(range(int(samples * 0.05), int(samples * 0.85)), events))
    return [Event(at, kind, round(rng.uniform(0.3, 1.5), 2)) for at, kind in zip(spots, kinds, strict=True)]


def run(samples: int, seed: int, events: int, n_teachers: int, batch: int, teacher_delay_ms: int) -> dict:
    rng = np.random.default_rng(seed)
    pool = rng.random((1000, 784), dtype=np.float32)
    expected = softmax_np(pool)
    schedule = plan(seed, samples, events)
    chaos_rng = random.Random(seed + 1)
    tmp = Path(tempfile.mkdtemp(prefix="zdistill-chaos-"))
    cluster = Cluster(tmp, teacher_delay_ms)

    def reader():
        for start in range(0, samples, batch):
            ids = np.arange(start, min(samples, start + batch))
            yield pool[ids % len(pool)], ids

    seen = np.zeros(samples, dtype=np.int64)
    out_of_order = wrong = 0
    last = -1
    stamps: list[tuple[float, int]] = []
    try:
        cluster.start(n_teachers)
        with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
            dr.set_dynamic_teacher(f"127.0.0.1:{cluster.balancer_port}", SERVICE, require_max_teacher=n_teachers)
            dr.set_batch_generator(reader)
            dr.options.task_rows = batch
            dr.options.teacher_wait = 120
            pending = list(schedule)
            t0 = time.monotonic()
            done = 0
            for _, ids, prob in dr():
                seen[ids] += 1
                out_of_order += int(ids[0] != last + 1) + int(np.any(np.diff(ids) != 1))
                last = int(ids[-1])
                wrong += int(np.sum(~np.isclose(prob, expected[ids % len(pool)], rtol=1e-4, atol=1e-5).all(axis=1)))
                done += len(ids)
                stamps.append((time.monotonic() - t0, done))
                while pending and done >= pending[0].at_sample:
                    event = pending.pop(0)
                    event.fired_at = time.monotonic() - t0
                    event.target = cluster.kill_and_restart(event.kind, chaos_rng, event.pause, dr)
            elapsed = time.monotonic() - t0
            stats = dr.stats()
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return summarise(samples, seen, out_of_order, wrong, stamps, schedule, elapsed, stats)


def summarise(samples, seen, out_of_order, wrong, stamps, schedule, elapsed, stats) -> dict:
    times = np.array([t for t, _ in stamps])
    counts = np.array([c for _, c in stamps])
    bucket = 0.5
    edges = np.arange(times[0] if len(times) else 0.0, elapsed + bucket, bucket)  # from the first sample on
    per_bucket = np.diff(np.interp(edges, times, counts, left=0)) / bucket
    median = float(np.median(per_bucket)) if len(per_bucket) else 0.0
    recoveries = []
    for ev in schedule:
        if not ev.fired_at:
            continue
        after = [(edges[i + 1], rate) for i, rate in enumerate(per_bucket) if edges[i] >= ev.fired_at]
        back = next((t for t, rate in after if rate >= 0.5 * median), None)
        dip = min((rate for t, rate in after if back is None or t <= back), default=0.0)
        recoveries.append({"kind": ev.kind, "target": ev.target, "at_s": round(ev.fired_at, 2), "outage_s": ev.pause,
                           "recovery_s": None if back is None else round(back - ev.fired_at, 2),
                           "dip_samples_per_s": round(dip), "dip_ratio": round(dip / median, 2) if median else None})
    return {
        "samples": samples,
        "lost": int(np.sum(seen == 0)),
        "duplicated": int(np.sum(np.maximum(seen - 1, 0))),
        "out_of_order": int(out_of_order),
        "wrong_predictions": int(wrong),
        "elapsed_s": round(elapsed, 2),
        "samples_per_s": round(samples / elapsed) if elapsed else None,
        "median_samples_per_s": round(median),
        "throughput_per_0.5s": [round(r) for r in per_bucket],
        "events": recoveries,
        "reader_stats": stats,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--events", type=int, default=12)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-ms", type=int, default=20, help="service time of each teacher call")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("--quick", action="store_true", help="print only the summary line")
    args = p.parse_args(argv)
    result = run(args.samples, args.seed, args.events, args.teachers, args.batch, args.teacher_ms)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    zeros = {k: result[k] for k in ("lost", "duplicated", "out_of_order", "wrong_predictions")}
    print(f"chaos: {result['samples']} samples in {result['elapsed_s']} s "  # noqa: T201
          f"({result['samples_per_s']}/s, median {result['median_samples_per_s']}/s): {zeros}")
    if not args.quick:
        for ev in result["events"]:
            print(f"  {ev['at_s']:>7.2f} s  {ev['kind']:<8} {ev['target']:<22} down {ev['outage_s']:.2f} s  "  # noqa: T201
                  f"recovered in {ev['recovery_s']} s, dip to {ev['dip_samples_per_s']}/s ({ev['dip_ratio']})")
        print("  throughput per 0.5 s:", result["throughput_per_0.5s"])  # noqa: T201
        print("  reader stats:", result["reader_stats"])  # noqa: T201
    return 0 if not any(zeros.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
