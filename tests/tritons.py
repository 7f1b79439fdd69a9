"""Real Triton Inference Servers for the tests: ``tests/triton_teacher.py`` run by PyTriton's interpreter.

PyTriton's Python backend loads the system's ``libpython3.11``, so the server runs
under a venv made from Debian's own ``python3.11`` (``.ci/run`` makes it at
``.triton-venv/``); ``ZDISTILL_TRITON_PYTHON`` names another interpreter.  Without one,
the tests that need a server are skipped, saying so.

A server is started in a session of its own (PyTriton starts ``tritonserver``, which
starts a backend stub per model instance), readiness is the model's ready endpoint
answering 200, and :meth:`TritonTeacher.stop` kills the whole process group by its id.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests import procs

SCRIPT = Path(__file__).resolve().parent / "triton_teacher.py"
PYTHON = os.environ.get("ZDISTILL_TRITON_PYTHON", str(procs.REPO / ".triton-venv" / "bin" / "python"))
START_TIMEOUT = 180.0  # a cold tritonserver on two busy cores


def require_triton() -> None:
    """Skip, saying why, where no interpreter can run PyTriton or tritonclient is not installed."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed: pip install '.[triton]'")
    if not os.access(PYTHON, os.X_OK):
        pytest.skip(f"no PyTriton interpreter at {PYTHON} (make it as .ci/run does, or set ZDISTILL_TRITON_PYTHON)")


@dataclass
class TritonTeacher:
    """One PyTriton process and its tritonserver; ``address`` is the ``triton://`` teacher address."""

    popen: subprocess.Popen
    grpc_port: int
    http_port: int
    model: str
    version: int
    log_path: str
    folder: str  # PyTriton's workspace is in it

    @property
    def address(self) -> str:
        return f"triton://127.0.0.1:{self.grpc_port}/{self.model}"

    def http(self, path: str, data: bytes | None = None) -> int:
        """The status of one request to the server's HTTP endpoint (0: no connection)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data)
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def ready(self) -> bool:
        return self.http(f"/v2/models/{self.model}/ready") == 200

    def server_pid(self) -> int:
        """The tritonserver process PyTriton started."""
        for child in psutil.Process(self.popen.pid).children(recursive=True):
            if child.name() == "tritonserver":
                return child.pid
        raise RuntimeError(f"no tritonserver under {self.popen.pid}\n{self.log()}")

    def kill_server(self) -> None:
        """SIGKILL the tritonserver alone (PyTriton's process stays, as after a crash of the server)."""
        os.kill(self.server_pid(), signal.SIGKILL)

    def unload(self) -> None:
        """Unload the model through Triton's model-repository API."""
        status = self.http(f"/v2/repository/models/{self.model}/unload", data=b"{}")
        assert status == 200, f"unload answered {status}\n{self.log()}"

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to PyTriton, which stops its tritonserver and frees its shared memory; after ``timeout``,
        SIGKILL to the whole process group (tritonserver, backend stubs).  PyTriton reaped, its files gone."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        self.popen.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)
        for path in glob.glob(f"/dev/shm/pytrtion{self.popen.pid}-*"):  # its backend's regions, after a SIGKILL
            with contextlib.suppress(OSError):
                os.unlink(path)


def start_triton(tmp_path: Path, *, grpc_port: int | None = None, http_port: int | None = None,
                 model: str = "softmax", version: int = 1, max_batch_size: int = 16, delay_ms: float = 0.0,
                 hold_file: Path | None = None, next_version_file: Path | None = None, dtypes: bool = False,
                 timeout: float = START_TIMEOUT) -> TritonTeacher:
    """A PyTriton server serving ``model`` on free loopback ports, once the model is ready; while
    ``hold_file`` exists it holds the batches it gets unanswered, and once ``next_version_file``
    exists it serves the next version instead; with ``dtypes`` it serves model ``dtypes`` too
    (``tests/triton_teacher.py``)."""
    require_triton()
    grpc_port, http_port = grpc_port or procs.free_port(), http_port or procs.free_port()
    # PyTriton makes the workspace itself, and binds ipc:// sockets in it: a short path, as a socket's is at
    # most 107 bytes (a test's tmp_path is longer)
    folder = tempfile.mkdtemp(prefix="zpt-")
    with tempfile.NamedTemporaryFile(prefix="triton-", suffix=".log", dir=tmp_path, delete=False) as log:
        popen = subprocess.Popen(
            [PYTHON, str(SCRIPT), "--grpc-port", str(grpc_port), "--http-port", str(http_port),
             "--metrics-port", str(procs.free_port()), "--model", model, "--version", str(version),
             "--max-batch-size", str(max_batch_size), "--delay-ms", str(delay_ms),
             "--workspace", os.path.join(folder, "w"), *(["--hold-file", str(hold_file)] if hold_file else []),
             *(["--next-version-file", str(next_version_file)] if next_version_file else []),
             *(["--dtypes"] if dtypes else [])],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(procs.REPO),
        )
    teacher = TritonTeacher(popen, grpc_port, http_port, model, version, log.name, folder)
    try:
        procs.wait_for(teacher.ready, timeout, "Triton model", popen)
    except BaseException as exc:
        teacher.stop()
        raise RuntimeError(f"{exc}\n--- triton log ---\n{teacher.log()}") from None
    return teacher
