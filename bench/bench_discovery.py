"""How fast a newly registered teacher reaches a student's ``DiscoveryClient.current()``.

Run: ``python bench/bench_discovery.py [--trials 20]`` (about 1.5 minutes on 2 cores).
It prints a table and writes ``bench/results/discovery.json``.

Setup: a private ``redis-server``, one ``zdistill-balancer`` and one ``DiscoveryClient``
in this process, all on loopback.  Cases, ``--trials`` each:

- ``store, notifications``: the record is written here with the exact call
  ``zdistill-register`` makes (:meth:`Store.register_teacher`); the clock runs from
  just before that ``SET`` to the moment ``current()`` lists the teacher.  The
  balancer learns it from a keyspace notification.
- ``store, resync only``: the same against a balancer started with
  ``--no-notifications`` (Redis that refuses ``CONFIG SET``): the periodic 1 s
  resync finds it.
- ``zdistill-register process``: a real register beside a real ``zdistill-teacher``;
  the clock runs from the register's own registration time (``registered_at`` in its
  record, same host clock) to ``current()``.  Between trials the register is stopped
  with SIGTERM and the removal awaited, so every trial is a fresh join.

The target is p95 <= 2 s, under EDL's own polling period of 2-3 s.  Every process is stopped
by PID in a ``finally`` block.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import daemons, procs  # noqa: E402
from zdistill.discovery.client import DiscoveryClient  # noqa: E402
from zdistill.discovery.store import Store, TeacherRecord  # noqa: E402


def wait_until(client: DiscoveryClient, check, timeout: float = 10.0) -> float:
    """Block until ``check(teachers)``; return the wall time it became true."""
    end = time.monotonic() + timeout
    version, teachers = client.current()
    while not check(teachers):
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"client still has {teachers}")
        version, teachers = client.wait_for_change(version, left)
    return time.time()


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"p50": statistics.median(ordered), "p95": p95, "max": ordered[-1], "min": ordered[0],
            "n": len(ordered)}


def store_trials(redis_endpoint: str, tmp: Path, trials: int, *flags: str) -> list[float]:
    bal = daemons.start_balancer(redis_endpoint, tmp, *flags, student_lease=10, leader_lease=3)
    store = Store.open(redis_endpoint)
    client = DiscoveryClient(bal.endpoint, "bench", 4)
    try:
        client.start()
        wait_until(client, lambda ts: client.leader is not None)
        out = []
        for i in range(trials):
            rec = TeacherRecord(f"10.1.{i // 250}.{i % 250}:7000", "bench")
            start = time.time()
            store.register_teacher(rec, ttl=30)
            out.append(wait_until(client, lambda ts, a=rec.address: a in ts) - start)
            store.unregister_teacher(rec)
            wait_until(client, lambda ts, a=rec.address: a not in ts)
            time.sleep(0.05 * (i % 7))  # spread the joins over the balancer's poll and resync phases
        return out
    finally:
        client.close()
        store.close()
        bal.stop()


def register_trials(redis_endpoint: str, tmp: Path, trials: int) -> list[float]:
    bal = daemons.start_balancer(redis_endpoint, tmp, student_lease=10, leader_lease=3)
    teacher = procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp)
    address = teacher.endpoint.replace("tcp://", "")
    client = DiscoveryClient(bal.endpoint, "bench-reg", 4)
    reg = None
    try:
        client.start()
        wait_until(client, lambda ts: client.leader is not None)
        out = []
        for _ in range(trials):
            reg = daemons.start_register(redis_endpoint, "bench-reg", address, tmp, ttl=6, wait=False)
            seen = wait_until(client, lambda ts: address in ts)
            procs.wait_for(lambda r=reg: Path(r.extra["ready_file"]).exists(), 10, "ready file")
            registered_at = json.loads(Path(reg.extra["ready_file"]).read_text())["registered_at"]
            out.append(seen - registered_at)
            assert reg.stop(signal.SIGTERM) == 0
            reg = None
            wait_until(client, lambda ts: address not in ts)
        return out
    finally:
        client.close()
        if reg is not None:
            reg.stop()
        teacher.stop()
        bal.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "discovery.json"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zd-bench-discovery-"))
    redis_proc = procs.start_redis()
    results: dict[str, dict[str, float]] = {}
    try:
        cases = {
            "store, notifications": lambda: store_trials(redis_proc.endpoint, tmp, args.trials),
            "store, resync only": lambda: store_trials(redis_proc.endpoint, tmp, args.trials, "--no-notifications"),
            "zdistill-register process": lambda: register_trials(redis_proc.endpoint, tmp, args.trials),
        }
        print(f"registration -> teacher in DiscoveryClient.current(), {args.trials} trials each (target p95 <= 2 s)")
        print(f"{'case':28s} {'p50 ms':>9s} {'p95 ms':>9s} {'max ms':>9s}")
        for name, run in cases.items():
            q = quantiles(run())
            results[name] = q
            print(f"{name:28s} {q['p50'] * 1e3:9.1f} {q['p95'] * 1e3:9.1f} {q['max'] * 1e3:9.1f}")
    finally:
        redis_proc.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"trials": args.trials, "seconds": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
