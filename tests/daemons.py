"""Starting the discovery daemons as real processes: ``zdistill-register`` and ``zdistill-balancer``.

Built on :func:`tests.procs.start`: each helper waits for the daemon's ready file
(written once it is registered / serving), never for a fixed time, and returns a
:class:`~tests.procs.Proc` the caller stops by PID.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import zmq

from tests import procs
from zdistill import wire


def _ready(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}-{time.monotonic_ns()}.ready"


def start_register(redis_endpoint: str, service: str, server: str, tmp_path: Path, *extra: str,
                   ttl: float = 2.0, wait: bool = True, timeout: float = 30.0) -> procs.Proc:
    """``zdistill-register`` for the teacher at ``server``; waits until it registered unless ``wait=False``."""
    ready = _ready(tmp_path, "register")
    args = [sys.executable, "-m", "zdistill.discovery.register", "--db_endpoints", redis_endpoint,
            "--service_name", service, "--server", server, "--ttl", str(ttl), "--ready-file", str(ready),
            "--log-level", "DEBUG", *extra]
    if wait:
        proc = procs.start(args, "register", ready_file=str(ready), timeout=timeout)
    else:
        proc = procs.start(args, "register")
    proc.extra["ready_file"] = str(ready)
    return proc


def start_balancer(redis_endpoint: str, tmp_path: Path, *extra: str, port: int | None = None,
                   student_lease: float = 2.0, leader_lease: float = 1.0, timeout: float = 30.0) -> procs.Proc:
    """``zdistill-balancer`` on loopback (a free port unless ``port``), PUB on a free port.

    ``endpoint`` is its ``IP:PORT``; ``extra['pub']`` its PUB endpoint.
    """
    ready = _ready(tmp_path, "balancer")
    port = port or procs.free_port()
    args = [sys.executable, "-m", "zdistill.discovery.balancer", "--db_endpoints", redis_endpoint,
            "--server", f"127.0.0.1:{port}", "--pub-port", "0", "--student-lease", str(student_lease),
            "--leader-lease", str(leader_lease), "--ready-file", str(ready), "--log-level", "DEBUG", *extra]
    proc = procs.start(args, "balancer", ready_file=str(ready), timeout=timeout)
    info = json.loads(proc.endpoint)
    proc.endpoint = info["server"]
    proc.extra.update(info, port=port)
    return proc


def request(address: str, header: dict, timeout: float = 2.0, ctx: zmq.Context | None = None) -> dict | None:
    """One request to a balancer over a fresh DEALER; its reply header, or None on timeout."""
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{address}")
        wire.send(sock, header)
        if not sock.poll(int(timeout * 1000)):
            return None
        return wire.decode(sock.recv_multipart()).header
    finally:
        sock.close(linger=0)


def status(address: str, timeout: float = 2.0) -> dict | None:
    return request(address, {"kind": "status", "id": 1}, timeout)


def start_student(servers: str, service: str, max_teachers: int, student_id: str, tmp_path: Path,
                  timeout: float = 30.0) -> procs.Proc:
    """A student process holding a DiscoveryClient; ready once it has at least one teacher."""
    ready = _ready(tmp_path, "student")
    args = [sys.executable, "-m", "tests.daemons", servers, service, str(max_teachers), student_id, str(ready)]
    proc = procs.start(args, "student", ready_file=str(ready), timeout=timeout)
    proc.extra["teachers"] = json.loads(proc.endpoint)
    return proc


def _student_main(servers: str, service: str, max_teachers: str, student_id: str, ready: str) -> int:
    """Body of :func:`start_student`: register, wait for teachers, then hold on until SIGTERM."""
    import logging
    import os
    import signal
    import threading

    from zdistill.discovery.client import DiscoveryClient

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = DiscoveryClient(servers, service, int(max_teachers), student_id)
    client.start()
    version, teachers = client.current()
    while not teachers and not stop.is_set():
        version, teachers = client.wait_for_change(version, 0.5)
    with open(ready + ".tmp", "w") as f:
        json.dump(teachers, f)
    os.replace(ready + ".tmp", ready)
    stop.wait()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(_student_main(*sys.argv[1:]))
