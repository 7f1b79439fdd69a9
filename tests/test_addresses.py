"""Teacher and balancer addresses are checked where they are given, with one rule for all.

An address is ``HOST:PORT``, ``tcp://HOST:PORT`` or ``ipc://PATH`` (a teacher's may also be
``triton://HOST:PORT/MODEL[/VERSION]``, see ``tests/test_triton.py``).  Anything else (a
URL of another server, a typo) is a :class:`ConfigError` at the call or flag that took
it, naming the address and what is accepted: never a ``ZMQError`` from inside a worker
or a thread, never a connection retried until ``teacher_wait`` runs out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests import procs
from zdistill import ConfigError, DistillReader, TeacherClient
from zdistill.discovery.client import DiscoveryClient

# (address, what the error says about it)
BAD = [
    ("triton://127.0.0.1:8001", "triton://HOST:PORT/MODEL"),  # no model: as a balancer, no Triton at all
    ("http://127.0.0.1:8000", "not HTTP"),
    ("https://teacher.example:443", "not HTTPS"),
    ("foo://127.0.0.1:1", "unknown scheme foo://"),
    ("127.0.0.1", "is not HOST:PORT"),
    ("127.0.0.1:99999", "is not HOST:PORT"),
    ("tcp://127.0.0.1", "is not HOST:PORT"),
    ("ipc://", "ipc:// names no path"),
]
ACCEPTED = "HOST:PORT, tcp://HOST:PORT or ipc://PATH"


def fixed(address: str) -> None:
    DistillReader(ins=["img"], predicts=["prob"]).set_fixed_teacher(["127.0.0.1:9292", address])


def dynamic(address: str) -> None:
    DistillReader(ins=["img"], predicts=["prob"]).set_dynamic_teacher(address, "svc")


def client(address: str) -> None:
    TeacherClient(address).close()


def discovery(address: str) -> None:
    DiscoveryClient(address, "svc", 1).close()


@pytest.mark.parametrize("entry", [fixed, dynamic, client, discovery], ids=lambda f: f.__name__)
@pytest.mark.parametrize(("address", "why"), BAD, ids=[a for a, _ in BAD])
@pytest.mark.timeout(10)
def test_a_bad_address_is_a_config_error_at_the_call(entry, address, why):
    with pytest.raises(ConfigError) as info:
        entry(address)
    message = str(info.value)
    assert repr(address) in message and why in message and ACCEPTED in message, message


def test_a_bad_balancer_in_the_environment_is_a_config_error_when_the_epoch_starts():
    """``PADDLE_DISTILL_BALANCE_SERVER`` is read when the first epoch starts: the error comes there.

    In a process of its own, under the subprocess timeout: a student that hangs on the
    address fails the test instead of hanging it.
    """
    code = textwrap.dedent("""
        import numpy as np
        from zdistill import ConfigError, DistillReader
        with DistillReader(ins=['img'], predicts=['prob']) as dr:
            dr.set_batch_generator(lambda: iter([(np.zeros((1, 784), np.float32),)]))
            try:
                dr()
            except ConfigError as exc:
                print(exc)
    """)
    env = {**os.environ, "PYTHONPATH": str(procs.REPO), "PADDLE_DISTILL_BALANCE_SERVER": "http://127.0.0.1:8000",
           "PADDLE_DISTILL_SERVICE_NAME": "svc"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=str(procs.REPO), env=env)
    assert result.returncode == 0, result.stderr
    assert "balancer address 'http://127.0.0.1:8000': zdistill speaks ZeroMQ" in result.stdout, result.stdout


@pytest.mark.timeout(30)
def test_every_accepted_form_reaches_a_real_teacher(start_teacher):
    """``HOST:PORT``, ``tcp://HOST:PORT`` (the scheme in any case), with spaces around (a comma list's items)."""
    port = start_teacher().endpoint.rsplit(":", 1)[1]
    for address in (f"127.0.0.1:{port}", f"tcp://127.0.0.1:{port}", f"TCP://127.0.0.1:{port}", f" localhost:{port} "):
        c = TeacherClient(address, timeout=10)
        try:
            c.ping()
        finally:
            c.close()


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(procs.REPO)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60,
                          cwd=str(procs.REPO), env=env)


@pytest.mark.parametrize(("args", "says"), [
    (["zdistill.cli", "ping", "teacher", "triton://127.0.0.1:8001"], "is not triton://HOST:PORT/MODEL"),
    (["zdistill.cli", "ping", "balancer", "http://127.0.0.1:8000"], "balancer address 'http://127.0.0.1:8000'"),
    (["zdistill.cli", "status", "--db_endpoints", "127.0.0.1:1", "--balancer", "http://127.0.0.1:8000"], "not HTTP"),
    (["zdistill.discovery.register", "--db_endpoints", "127.0.0.1:1", "--service_name", "svc",
      "--server", "triton://127.0.0.1:8001"], "is not triton://HOST:PORT/MODEL"),
    (["zdistill.discovery.balancer", "--db_endpoints", "127.0.0.1:1", "--server", "tcp://127.0.0.1:0"],
     "expected IP:PORT to listen on, without a scheme"),
], ids=["ping-teacher", "ping-balancer", "status-balancer", "register-server", "balancer-server"])
@pytest.mark.timeout(90)
def test_a_bad_address_on_a_command_line_is_one_line_and_exit_2(args, says):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
