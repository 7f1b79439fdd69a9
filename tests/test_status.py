"""``zdistill status`` and ``zdistill ping`` against a running system (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import daemons, procs
from zdistill.discovery.store import TeacherRecord

SERVICE = "status_svc"


def zdistill(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zdistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(procs.REPO))


def test_status_shows_teachers_students_and_leader(redis_server, start_teacher, tmp_path):
    teacher = start_teacher()
    address = teacher.endpoint.replace("tcp://", "")
    register = daemons.start_register(redis_server.endpoint, SERVICE, address, tmp_path)
    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    student = daemons.start_student(balancer.endpoint, SERVICE, 1, "student-a", tmp_path)
    try:
        result = zdistill("status", "--db_endpoints", redis_server.endpoint, "--balancer", balancer.endpoint, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        svc = report["services"][SERVICE]
        assert [t["address"] for t in svc["teachers"]] == [address]
        assert svc["teachers"][0]["device"] == "cpu" and svc["teachers"][0]["students"] == 1
        assert 0 <= svc["teachers"][0]["heartbeat_age_s"] <= 2.0
        assert svc["students"] == [{"student": "student-a", "max_teachers": 1, "version": 1, "teachers": [address]}]
        assert report["leader"]["server"] == balancer.endpoint
        assert report["balancer"]["leading"] is True

        text = zdistill("status", "--db_endpoints", redis_server.endpoint).stdout
        assert f"service {SERVICE}: 1 teachers, 1 students" in text
        assert f"teacher {address}" in text and "student student-a" in text

        assert zdistill("ping", "teacher", address).returncode == 0
        assert zdistill("ping", "balancer", balancer.endpoint).returncode == 0
    finally:
        for proc in (student, balancer, register):
            proc.stop()


def test_status_explains_unreachable_redis_and_wrong_password(tmp_path):
    result = zdistill("status", "--db_endpoints", f"127.0.0.1:{procs.free_port()}", "--timeout", "0.5")
    assert result.returncode == 1 and "Redis unreachable" in result.stdout
    redis = procs.start_redis(password="s3cret")
    try:
        result = zdistill("status", "--db_endpoints", redis.endpoint, "--db_passwd", "wrong", "--json")
        assert result.returncode == 1
        assert "refused the password" in json.loads(result.stdout)["redis"]["error"]
        assert "wrong" not in result.stdout + result.stderr  # the password is never printed
        ok = zdistill("status", "--db_endpoints", f"redis://:s3cret@{redis.endpoint}")
        assert ok.returncode == 0 and "s3cret" not in ok.stdout
    finally:
        redis.stop()


def test_ping_fails_for_nobody_listening():
    assert zdistill("ping", "teacher", f"127.0.0.1:{procs.free_port()}", "--timeout", "0.5").returncode == 1
    assert zdistill("ping", "balancer", f"127.0.0.1:{procs.free_port()}", "--timeout", "0.5").returncode == 1


def test_status_skips_bad_records_and_names_wrong_types(redis_server, store):
    store.register_teacher(TeacherRecord("10.0.0.1:1", SERVICE, device="cpu", max_batch_size=8), ttl=60)
    good = json.loads(TeacherRecord("10.0.0.2:2", SERVICE).to_json())
    store.r.set(store.teacher_key(SERVICE, "10.0.0.2:2"), json.dumps({**good, "device": {"gpu": 0}}), px=60_000)
    store.r.set(store.teacher_key(SERVICE, "10.0.0.3:3"),
                json.dumps({**good, "address": "10.0.0.3:3", "max_batch_size": [256]}), px=60_000)
    result = zdistill("status", "--db_endpoints", redis_server.endpoint)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"service {SERVICE}: 1 teachers, 0 students" in result.stdout
    assert "skipped 2 malformed records" in result.stdout
    assert "device must be a string" in result.stdout and "max_batch_size must be an integer" in result.stdout

    store.r.set(store.students_key, "a string")
    result = zdistill("status", "--db_endpoints", redis_server.endpoint, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["redis"]["ok"] is True
    assert "zdistill:students holds a string, not a hash" in report["problems"]["zdistill:students"]
    assert [t["address"] for t in report["services"][SERVICE]["teachers"]] == ["10.0.0.1:1"]


def test_status_exit_codes(redis_server, tmp_path):
    """0: all answered; 1: Redis down; 2: bad arguments (one line, no password); 3: the balancer down."""
    nobody = f"127.0.0.1:{procs.free_port()}"
    down = zdistill("status", "--db_endpoints", redis_server.endpoint, "--balancer", nobody, "--timeout", "0.5")
    assert down.returncode == 3 and f"balancer {nobody}: no answer in 0.5 s" in down.stdout
    assert zdistill("status", "--db_endpoints", nobody, "--timeout", "0.5").returncode == 1
    for endpoint in (":s3cret@127.0.0.1:6379", "127.0.0.1:99999", "redis://:s3cret@127.0.0.1:x", "http://h:1"):
        bad = zdistill("status", "--db_endpoints", endpoint)
        assert bad.returncode == 2, (endpoint, bad.stdout, bad.stderr)
        assert bad.stderr.startswith("zdistill: --db_endpoints") and bad.stderr.count("\n") == 1, bad.stderr
        assert "s3cret" not in bad.stdout + bad.stderr
    assert zdistill("status", "--db_endpoints", redis_server.endpoint, "--balancer", "nowhere").returncode == 2

    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    try:
        up = zdistill("status", "--db_endpoints", redis_server.endpoint, "--balancer", balancer.endpoint)
        assert up.returncode == 0 and f"balancer {balancer.endpoint}: leading" in up.stdout
    finally:
        balancer.stop()


def test_ping_says_what_answered(redis_server, start_teacher, tmp_path):
    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    teacher = start_teacher()
    address = teacher.endpoint.replace("tcp://", "")
    try:
        wrong = zdistill("ping", "teacher", balancer.endpoint)
        assert wrong.returncode == 1
        assert wrong.stderr == f"{balancer.endpoint}: a zdistill balancer answered, not a teacher\n"
        wrong = zdistill("ping", "balancer", address)
        assert wrong.returncode == 1 and "answered, but not as a zdistill balancer" in wrong.stderr
    finally:
        balancer.stop()
    nobody = f"127.0.0.1:{procs.free_port()}"
    silent = zdistill("ping", "teacher", nobody, "--timeout", "0.5")
    assert silent.returncode == 1 and silent.stderr.count(nobody) == 1, silent.stderr
    assert zdistill("ping", "teacher", "127.0.0.1:70000").returncode == 2
