"""The flags every daemon shares, on real processes: log levels, Redis endpoints and passwords."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import daemons, procs

SECRET = "s3cret-Pw"


def run(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """A daemon or CLI that is expected to exit by itself (bad arguments)."""
    full_env = {**os.environ, "PYTHONPATH": str(procs.REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(procs.REPO), env=full_env)


DAEMONS = {
    "zdistill.discovery.balancer": ["--db_endpoints", "127.0.0.1:1", "--server", "127.0.0.1:0"],
    "zdistill.discovery.register": ["--db_endpoints", "127.0.0.1:1", "--service_name", "svc",
                                    "--server", "127.0.0.1:5"],
    "zdistill.teacher.server": ["--model", f"{procs.TEACHERS}:softmax", "--port", "0"],
    "zdistill.student.worker": ["--teacher", "tcp://127.0.0.1:1", "--dispatcher", "ipc:///nowhere", "--identity", "w1",
                        "--slots", "/nowhere", "--predicts", "prob", "--parent-pid", "1"],
}


@pytest.mark.parametrize("module", sorted(DAEMONS))
def test_log_level_is_explained_and_checked(module):
    helped = run(module, "--help")
    assert helped.returncode == 0 and "DEBUG, INFO, WARNING, ERROR, CRITICAL" in " ".join(helped.stdout.split())
    bad = run(module, *DAEMONS[module], "--log-level", "LOUD")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1 and "--log-level 'LOUD' is not one of DEBUG" in bad.stderr, bad.stderr


BAD_ENDPOINTS = [":s3cret-Pw@127.0.0.1:6379", "127.0.0.1:99999", "redis://:s3cret-Pw@127.0.0.1:port", "http://h:1"]


@pytest.mark.parametrize("module", ["zdistill.discovery.balancer", "zdistill.discovery.register"])
def test_a_bad_db_endpoint_is_one_line_and_exit_2(module):
    for endpoint in BAD_ENDPOINTS:
        args = [a if a != "127.0.0.1:1" else endpoint for a in DAEMONS[module]]
        bad = run(module, *args)
        assert bad.returncode == 2, (endpoint, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and "--db_endpoints" in lines[0], bad.stderr
        assert SECRET not in bad.stderr + bad.stdout


@pytest.fixture
def locked_redis():
    proc = procs.start_redis(password=SECRET)
    yield proc
    proc.stop()


def test_password_from_a_file_or_the_environment_everywhere(locked_redis, start_teacher, tmp_path, stopper):
    """--db_passwd_file and $ZDISTILL_DB_PASSWD reach Redis for every daemon; no command line or log shows it."""
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(SECRET + "\n")  # as `echo` writes it
    teacher = start_teacher()
    address = teacher.endpoint.replace("tcp://", "")
    balancer = daemons.start_balancer(locked_redis.endpoint, tmp_path, "--db_passwd_file", str(secret_file))
    stopper.append(balancer)
    register = _register_with_env(locked_redis.endpoint, address, tmp_path, {"ZDISTILL_DB_PASSWD": SECRET})
    stopper.append(register)
    student = daemons.start_student(balancer.endpoint, "svc", 1, "student-a", tmp_path)
    stopper.append(student)
    assert student.extra["teachers"] == [address]  # the balancer read the register's record

    by_file = run("zdistill.cli", "status", "--db_endpoints", locked_redis.endpoint, "--db_passwd_file",
                  str(secret_file))
    by_env = run("zdistill.cli", "status", "--db_endpoints", locked_redis.endpoint, env={"ZDISTILL_DB_PASSWD": SECRET})
    for result in (by_file, by_env):
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"teacher {address}" in result.stdout and "student student-a" in result.stdout
        assert SECRET not in result.stdout + result.stderr
    for proc in (balancer, register, student):
        assert SECRET not in Path(f"/proc/{proc.pid}/cmdline").read_text() + proc.log()

    flagged = run("zdistill.cli", "status", "--db_endpoints", locked_redis.endpoint, "--db_passwd", SECRET)
    assert flagged.returncode == 0 and "--db_passwd shows the Redis password" in flagged.stderr
    assert SECRET not in flagged.stdout + flagged.stderr
    missing = run("zdistill.cli", "status", "--db_endpoints", locked_redis.endpoint, "--db_passwd_file",
                  str(tmp_path / "missing"))
    assert missing.returncode == 2 and "No such file" in missing.stderr
    twice = run("zdistill.cli", "status", "--db_endpoints", f"redis://:{SECRET}@{locked_redis.endpoint}",
                "--db_passwd_file", str(secret_file))
    assert twice.returncode == 2 and "given twice" in twice.stderr and SECRET not in twice.stderr
    refused = run("zdistill.discovery.balancer", "--db_endpoints", locked_redis.endpoint, "--server", "127.0.0.1:0",
                  "--db_passwd", SECRET, "--db_passwd_file", str(secret_file))
    assert refused.returncode == 2 and "not both" in refused.stderr


def _register_with_env(endpoint: str, address: str, tmp_path: Path, env: dict) -> procs.Proc:
    ready = tmp_path / "register.ready"
    args = [sys.executable, "-m", "zdistill.discovery.register", "--db_endpoints", endpoint, "--service_name", "svc",
            "--server", address, "--ttl", "2", "--ready-file", str(ready), "--log-level", "DEBUG"]
    return procs.start(args, "register", ready_file=str(ready), env=env)
