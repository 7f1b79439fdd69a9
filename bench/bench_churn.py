"""Student churn at the balancer: a real student's answer times while thousands of students come and go.

    python bench/bench_churn.py [--students 3000,10000] [--teachers 10] [--lease 5] [--window 256] [--code PATH]

For each number of students, on a fresh private ``redis-server`` and a fresh
``zdistill-balancer`` process (``--student-lease`` = ``--lease``, log level INFO, as
an operator runs it) with ``--teachers`` teacher records in one service:

1. A *probe* process (a real student's requests, over its own DEALER) sends a
   ``heartbeat`` every 100 ms and, once a second, ``register`` of a fresh student id
   followed by its ``bye`` (a short job coming and going).  Each request waits up to
   60 s for its answer; every answer time is recorded.
2. This process registers N fake students of the same service from one DEALER,
   ``--window`` requests in flight (many students starting at once; ``--window 1``
   is one client registering them one after the other), each once: *registration
   time* is the first send to the last answer (a registration refused with a
   ``redirect``, while no balancer leads, is sent again 100 ms later; the table
   counts them).  The fake students never heartbeat, so each expires one lease
   after its registration.
3. It then asks the balancer for ``status`` every 250 ms until only the probe's
   student is left: *expiry time* runs from the last registration answer to that
   moment, and counts the lease itself.

The assignment is checked at the end of step 2, from Redis: every student has one
teacher (teachers < students: shared regime) and teacher loads differ by at most one.

``--code PATH`` runs the balancer of another checkout (e.g. main, from
``git worktree add --detach /tmp/churn-main main``) under the same script, for a before/after
comparison; the probe and the fake students speak the same wire protocol either way.
Prints a table and writes ``bench/results/churn.json``.  Every process it starts is
stopped by PID in a ``finally`` block.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import procs  # noqa: E402
from zdistill import wire  # noqa: E402
from zdistill.discovery.store import Store, TeacherRecord  # noqa: E402

SERVICE = "churn"
PROBE_EVERY = 0.1
PROBE_TIMEOUT = 60.0


def start_balancer(code: Path, redis_endpoint: str, tmp: Path, lease: float) -> tuple[subprocess.Popen, str]:
    """A ``zdistill-balancer`` of the checkout at ``code``; returns the process and its ROUTER address."""
    ready = tmp / f"balancer-{time.monotonic_ns()}.ready"
    log = open(tmp / "balancer.log", "ab")  # noqa: SIM115 - closed with the process below
    args = [sys.executable, "-m", "zdistill.discovery.balancer", "--db_endpoints", redis_endpoint,
            "--server", f"127.0.0.1:{procs.free_port()}", "--pub-port", "0", "--student-lease", str(lease),
            "--leader-lease", "3", "--ready-file", str(ready), "--log-level", "INFO"]
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=str(code), env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        procs.wait_for(lambda: ready.exists(), 30, "balancer", proc)
    except Exception:
        stop(proc)
        raise
    return proc, json.loads(ready.read_text())["server"]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    return sock


def ask(sock: zmq.Socket, header: dict, timeout: float) -> dict | None:
    """One request on ``sock`` (nothing else in flight there); its reply header, or None on timeout."""
    wire.send(sock, header)
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            break
        reply = wire.decode(sock.recv_multipart()).header
        if reply.get("id") == header["id"]:
            return reply
    return None


# -- the probe: a real student's requests, in its own process ------------------


def probe_main(address: str, out: str) -> int:
    """Heartbeats every 100 ms, a register + bye each second; one JSON line per answer, until SIGTERM."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    sock = dealer(zmq.Context.instance(), address)
    ids = iter(range(1, 1 << 30))
    me = {"student": "probe-0", "service": SERVICE, "max_teachers": 2}
    with open(out, "w") as f:
        ask(sock, {"kind": "register", "id": next(ids), **me}, PROBE_TIMEOUT)
        last_job = time.monotonic()
        while not stopping:
            started = time.monotonic()
            if started - last_job >= 1.0:
                last_job = started
                job = {**me, "student": f"probe-job-{next(ids)}"}
                requests = [{"kind": "register", **job}, {"kind": "bye", "student": job["student"]}]
            else:
                requests = [{"kind": "heartbeat", **me}]
            for req in requests:
                sent = time.monotonic()
                reply = ask(sock, {**req, "id": next(ids)}, PROBE_TIMEOUT)
                answered = None if reply is None else time.monotonic() - sent
                f.write(json.dumps({"at": time.time() - (time.monotonic() - sent), "kind": req["kind"],
                                    "seconds": answered}) + "\n")
                f.flush()
            time.sleep(max(0.0, started + PROBE_EVERY - time.monotonic()))
    sock.close()
    return 0


# -- one scenario ----------------------------------------------------------------


def register_fakes(sock: zmq.Socket, n: int, window: int) -> tuple[float, int]:
    """Register ``n`` fake students, ``window`` in flight; the time from the first send to the last answer.

    A registration answered with anything but an assignment (a ``redirect`` while no
    balancer leads) is sent again 100 ms later, as a real student would; how many were
    is returned too.
    """
    todo = list(range(n - 1, -1, -1))
    in_flight = answered = refused = 0
    start = time.monotonic()
    while answered < n:
        while todo and in_flight < window:
            i = todo.pop()
            wire.send(sock, {"kind": "register", "id": i, "student": f"fake-{i:06d}", "service": SERVICE,
                             "max_teachers": 2})
            in_flight += 1
        if not sock.poll(int(PROBE_TIMEOUT * 1000)):
            raise TimeoutError(f"no answer to a registration for {PROBE_TIMEOUT} s ({answered} of {n} answered)")
        reply = wire.decode(sock.recv_multipart()).header
        in_flight -= 1
        if reply.get("kind") == "assignment":
            answered += 1
        else:
            refused += 1
            todo.append(reply["id"])
            time.sleep(0.1)
    return time.monotonic() - start, refused


def balanced(store: Store) -> bool:
    students = store.load_students()
    loads: dict[str, int] = {}
    for rec in students.values():
        if len(rec.teachers) != 1:
            return False
        loads[rec.teachers[0]] = loads.get(rec.teachers[0], 0) + 1
    return max(loads.values()) - min(loads.values()) <= 1


def quantiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {"n": len(ordered), "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], "max": ordered[-1],
            "over_1s": sum(s > 1.0 for s in ordered)}


def scenario(code: Path, n: int, teachers: int, lease: float, window: int, tmp: Path) -> dict:
    redis_proc = procs.start_redis()
    store = Store.open(redis_proc.endpoint)
    balancer = probe = None
    ctx = zmq.Context.instance()
    try:
        for i in range(teachers):
            store.register_teacher(TeacherRecord(f"10.9.0.{i + 1}:7000", SERVICE), ttl=3600)
        balancer, address = start_balancer(code, redis_proc.endpoint, tmp, lease)
        probe_out = tmp / f"probe-{n}.jsonl"
        probe = subprocess.Popen([sys.executable, __file__, "--probe", address, str(probe_out)], cwd=str(ROOT))
        procs.wait_for(lambda: probe_out.exists() and probe_out.stat().st_size > 0, 30, "probe", probe)

        fakes = dealer(ctx, address)
        t0 = time.time()
        registration, refused = register_fakes(fakes, n, window)
        t1 = time.time()
        fakes.close()
        ok = balanced(store)

        status_sock = dealer(ctx, address)
        status_seconds = []
        ids = iter(range(1 << 30))
        while True:
            asked = time.monotonic()
            reply = ask(status_sock, {"kind": "status", "id": next(ids)}, PROBE_TIMEOUT)
            if reply is None:
                raise TimeoutError(f"no answer to status in {PROBE_TIMEOUT} s")
            status_seconds.append(time.monotonic() - asked)
            if reply["students"] <= 1:
                break
            if time.time() - t1 > lease + 600:
                raise TimeoutError(f"{reply['students']} students still registered")
            time.sleep(0.25)
        t2 = time.time()
        status_sock.close()
    finally:
        if probe is not None:
            stop(probe)
        if balancer is not None:
            stop(balancer)
        store.close()
        redis_proc.stop()
    samples = [json.loads(line) for line in probe_out.read_text().splitlines() if line.strip()]

    def during(lo: float, hi: float) -> dict[str, float]:
        window = [s for s in samples if lo <= s["at"] < hi]
        out = quantiles([s["seconds"] for s in window if s["seconds"] is not None])
        out["unanswered"] = sum(s["seconds"] is None for s in window)
        return out

    return {"students": n, "teachers": teachers, "lease_s": lease, "window": window, "registration_s": registration,
            "registrations_per_s": n / registration,
            "registrations_refused": refused, "expiry_s": t2 - t1, "balanced": ok,
            "probe_registering": during(t0, t1), "probe_expiring": during(t1, t2),
            "status_expiring": quantiles(status_seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="3000,10000", help="comma list of fake student counts, one run each")
    parser.add_argument("--teachers", type=int, default=10)
    parser.add_argument("--lease", type=float, default=5.0, help="the balancer's --student-lease (seconds)")
    parser.add_argument("--window", type=int, default=256, help="registrations in flight at once (default 256)")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose balancer is measured (default: this one)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "churn.json"))
    parser.add_argument("--probe", nargs=2, metavar=("ADDRESS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe_main(*args.probe)
    code = Path(args.code).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="zd-bench-churn-"))
    results = []
    print(f"balancer of {code}; {args.teachers} teachers, student lease {args.lease:g} s, "
          f"{args.window} registrations in flight")
    print(f"{'students':>8} {'register s':>10} {'/s':>7} {'expiry s':>8} {'balanced':>8} | probe answer s "
          f"while registering: p50 p95 max >1s | while expiring: p50 p95 max >1s | status max s | refused")
    for n in (int(x) for x in args.students.split(",")):
        r = scenario(code, n, args.teachers, args.lease, args.window, tmp)
        results.append(r)
        a, b, refused = r["probe_registering"], r["probe_expiring"], r["registrations_refused"]

        def fmt(q: dict) -> str:
            if not q["n"]:
                return "(none)" + (f" {q['unanswered']} unanswered" if q["unanswered"] else "")
            return f"{q['p50']:.3f} {q['p95']:.3f} {q['max']:.3f} {q['over_1s']}/{q['n']}" + (
                f" +{q['unanswered']} unanswered" if q["unanswered"] else "")

        print(f"{n:8d} {r['registration_s']:10.2f} {r['registrations_per_s']:7.0f} {r['expiry_s']:8.2f} "
              f"{'yes' if r['balanced'] else 'NO':>8} | {fmt(a)} | {fmt(b)} | "
              f"{r['status_expiring']['max']:.3f} | {refused}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"code": str(code), "load": os.getloadavg(), "runs": results}, indent=2)
                              + "\n")
    print(f"wrote {args.out}; balancer logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
