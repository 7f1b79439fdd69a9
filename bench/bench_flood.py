"""A teacher's memory under a flood of valid requests from a client that never reads its replies.

Run ``python bench/bench_flood.py`` (about 15 s).  It starts a real ``zdistill-teacher``
serving ``tests/teachers.py:slow_softmax`` (100 ms per call), then, from a thread, sends
it 256-row requests of 784 float32 (784 KiB each) as fast as the socket takes them for
``--seconds``, never reading a reply.  Meanwhile it samples the teacher's RSS (psutil,
every 20 ms) and, from the main thread, asks a well-behaved :class:`TeacherClient` for a
``ping`` and a small ``predict`` every 200 ms.  It then sends SIGTERM with the flood still
running and times the exit.  It prints one JSON line: RSS before / peak / at the end (MiB),
the well-behaved client's answers and their latencies, and the exit time.

A safety cap (``--rss-cap-mb``, default 3072) ends the flood early if the teacher grows
past it, so an unbounded teacher cannot exhaust a shared machine.  Extra teacher flags
go after ``--``; the same script measures any revision of the teacher.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import procs  # noqa: E402
from zdistill.client import TeacherClient  # noqa: E402
from zdistill.errors import TeacherError, TeacherTimeout  # noqa: E402

ROWS = 256
TIMEOUT = 5.0


class Flood:
    """A DEALER in its own thread sending one valid 784 KiB request after another, never reading."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sent = 0
        self.stop = threading.Event()
        x = np.random.default_rng(0).standard_normal((ROWS, 784)).astype(np.float32)
        self.body = x.tobytes()
        self.thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            while not self.stop.is_set():
                header = msgpack.packb({"kind": "predict", "id": self.sent,
                                        "arrays": [["img", "<f4", [ROWS, 784]]]})
                if not sock.poll(50, zmq.POLLOUT):
                    continue
                sock.send_multipart([header, self.body], copy=False)
                self.sent += 1
        finally:
            sock.close(linger=0)


def good_client_round(client: TeacherClient, x: np.ndarray, latencies: dict[str, list[float]],
                      codes: dict[str, int]) -> None:
    """One ping and one small predict; their latencies, or the error code they got."""
    for kind in ("ping", "predict"):
        start = time.monotonic()
        try:
            if kind == "ping":
                client.ping(timeout=TIMEOUT)
            else:
                client.predict({"img": x}, timeout=TIMEOUT)
            latencies[kind].append(time.monotonic() - start)
        except TeacherError as exc:
            codes[f"{kind}:{exc.code}"] = codes.get(f"{kind}:{exc.code}", 0) + 1
        except TeacherTimeout:
            codes[f"{kind}:timeout"] = codes.get(f"{kind}:timeout", 0) + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="how long to flood before SIGTERM")
    parser.add_argument("--rss-cap-mb", type=float, default=3072, help="end the flood early past this RSS")
    parser.add_argument("teacher_flags", nargs="*", help="extra zdistill-teacher flags (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zd-bench-flood-") as folder:
        teacher = procs.start_teacher(f"{procs.TEACHERS}:slow_softmax", Path(folder), "--log-level", "WARNING",
                                      *args.teacher_flags, env={"ZDISTILL_TEST_DELAY_MS": "100"})
        proc = psutil.Process(teacher.pid)
        client = TeacherClient(teacher.endpoint, timeout=TIMEOUT)
        flood = Flood(teacher.endpoint)
        x = np.ones((4, 784), np.float32)
        latencies: dict[str, list[float]] = {"ping": [], "predict": []}
        codes: dict[str, int] = {}
        try:
            client.predict({"img": x})
            before = proc.memory_info().rss
            peak = before
            flood.thread.start()
            start = time.monotonic()
            next_probe = start
            capped = False
            while (now := time.monotonic()) < start + args.seconds:
                peak = max(peak, proc.memory_info().rss)
                if peak > args.rss_cap_mb * 2**20:
                    capped = True
                    break
                if now >= next_probe:
                    good_client_round(client, x, latencies, codes)
                    next_probe = time.monotonic() + 0.2
                time.sleep(0.02)  # the RSS sampling period
            stop_sent = time.monotonic()
            teacher.popen.send_signal(signal.SIGTERM)
            while teacher.popen.poll() is None and time.monotonic() < stop_sent + 30:
                try:
                    peak = max(peak, proc.memory_info().rss)
                except psutil.NoSuchProcess:
                    break
                time.sleep(0.02)
            exit_s = time.monotonic() - stop_sent if teacher.popen.poll() is not None else None
        finally:
            flood.stop.set()
            flood.thread.join(TIMEOUT)
            client.close()
            teacher.stop()
        result = {
            "flood_seconds": round(stop_sent - start, 2),
            "capped": capped,
            "requests_sent": flood.sent,
            "rss_before_mb": round(before / 2**20, 1),
            "rss_peak_mb": round(peak / 2**20, 1),
            "good_client": {k: {"answered": len(v), "median_ms": round(statistics.median(v) * 1000, 1) if v else None,
                                "max_ms": round(max(v) * 1000, 1) if v else None} for k, v in latencies.items()},
            "good_client_errors": codes,
            "exit_after_sigterm_s": None if exit_s is None else round(exit_s, 2),
            "exit_code": teacher.popen.returncode,
            "teacher_flags": args.teacher_flags,
        }
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
