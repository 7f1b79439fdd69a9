"""The flags every daemon shares, on real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import procs


def run(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """A daemon or CLI that is expected to exit by itself (bad arguments)."""
    full_env = {**os.environ, "PYTHONPATH": str(procs.REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(procs.REPO), env=full_env)


DAEMONS = {
    "zdistill.balancer": ["--db_endpoints", "127.0.0.1:1", "--server", "127.0.0.1:0"],
    "zdistill.register": ["--db_endpoints", "127.0.0.1:1", "--service_name", "svc", "--server", "127.0.0.1:5"],
    "zdistill.teacher": ["--model", f"{procs.TEACHERS}:softmax", "--port", "0"],
    "zdistill.worker": ["--teacher", "tcp://127.0.0.1:1", "--tasks", "ipc:///nowhere", "--results", "ipc:///nowhere",
                        "--slots", "/nowhere", "--predicts", "prob", "--parent-pid", "1"],
}


@pytest.mark.parametrize("module", sorted(DAEMONS))
def test_log_level_is_explained_and_checked(module):
    helped = run(module, "--help")
    assert helped.returncode == 0 and "DEBUG, INFO, WARNING, ERROR, CRITICAL" in " ".join(helped.stdout.split())
    bad = run(module, *DAEMONS[module], "--log-level", "LOUD")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1 and "--log-level 'LOUD' is not one of DEBUG" in bad.stderr, bad.stderr
