"""Prometheus metrics of the teacher, scraped over HTTP from a real process."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest

from tests import procs
from zdistill import TeacherError
from zdistill.client import TeacherClient


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in the scrape"
    return float(match.group(1))


def test_teacher_metrics_count_requests_rows_batches_and_errors(start_teacher):
    port = procs.free_port()
    teacher = start_teacher(f"{procs.TEACHERS}:softmax", "--metrics-port", str(port), "--instances", "2")
    client = TeacherClient(teacher.endpoint, timeout=10)
    x = np.ones((8, 784), np.float32)
    ids = [client.submit("predict", {"img": x}) for _ in range(20)]
    done = []
    while len(done) < len(ids):
        done += client.collect(5)
    with pytest.raises(TeacherError, match="dtype float64"):
        client.predict({"img": x.astype(np.float64)})
    client.close()
    text = scrape(port)
    assert value(text, 'zdistill_teacher_requests_total{kind="predict"}') == 21
    assert value(text, "zdistill_teacher_rows_total") == 160
    assert value(text, "zdistill_teacher_batch_rows_count") <= 20  # merged batches: fewer calls than requests
    assert value(text, "zdistill_teacher_batch_rows_sum") == 160
    assert value(text, "zdistill_teacher_model_seconds_count") == value(text, "zdistill_teacher_batch_rows_count")
    assert value(text, 'zdistill_teacher_errors_total{code="bad_request"}') == 1
    assert value(text, "zdistill_teacher_in_flight_requests") == 0
    assert value(text, "zdistill_teacher_held_bytes") == 0  # every request answered
    assert value(text, "zdistill_teacher_instances") == 2
    busy = [value(text, f'zdistill_teacher_instance_busy_seconds_total{{instance="{i}"}}') for i in "01"
            if f'instance="{i}"' in text]
    assert busy and sum(busy) == pytest.approx(value(text, "zdistill_teacher_model_seconds_sum"))


def test_balancer_and_register_metrics(redis_server, start_teacher, tmp_path):
    from tests import daemons

    teacher = start_teacher()
    address = teacher.endpoint.replace("tcp://", "")
    reg_port, bal_port = procs.free_port(), procs.free_port()
    register = daemons.start_register(redis_server.endpoint, "svc", address, tmp_path, "--metrics-port", str(reg_port))
    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path, "--metrics-port", str(bal_port))
    try:
        reply = daemons.request(balancer.endpoint, {"kind": "register", "id": 1, "student": "s1", "service": "svc",
                                                    "max_teachers": 1})
        assert reply is not None and reply["kind"] == "assignment"
        assert daemons.request(balancer.endpoint, {"kind": "nonsense", "id": 2})["kind"] == "error"
        procs.wait_for(lambda: value(scrape(bal_port), 'zdistill_balancer_teachers{service="svc"}') == 1, 10,
                       "the balancer to count the teacher")
        text = scrape(bal_port)
        assert value(text, 'zdistill_balancer_requests_total{kind="register"}') == 1
        assert value(text, 'zdistill_balancer_requests_total{kind="other"}') == 1
        assert value(text, 'zdistill_balancer_students{service="svc"}') == 1
        assert value(text, 'zdistill_balancer_assignment_version{service="svc"}') == 1
        assert value(text, "zdistill_balancer_leader") == 1
        text = scrape(reg_port)
        assert value(text, "zdistill_register_registered") == 1
        assert value(text, "zdistill_register_registrations_total") == 1
        assert value(text, 'zdistill_register_health_checks_total{result="ok"}') >= 1
    finally:
        balancer.stop()
        register.stop()


def test_daemons_work_without_prometheus_client():
    """prometheus-client is optional: without it every metric call is a no-op, and asking for
    --metrics-port is a clear error."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from zdistill.metrics import TeacherMetrics, BalancerMetrics, RegisterMetrics\n"
        "from zdistill.errors import ConfigError\n"
        "m = TeacherMetrics(); m.requests.labels('predict').inc(); m.batch_rows.observe(3); m.in_flight.set(1)\n"
        "b = BalancerMetrics(); b.set_counts({'s': 1}, {'s': 2}); RegisterMetrics().checks.labels('ok').inc()\n"
        "assert m.serve(None) is None\n"
        "try:\n    m.serve(0)\nexcept ConfigError as e:\n    print('refused:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=str(procs.REPO))
    assert result.returncode == 0, result.stderr
    assert "refused: --metrics-port needs the prometheus-client package" in result.stdout


def test_teacher_metrics_count_tokens_and_padding_of_variable_length_rows(start_teacher):
    """One request at a time, each of one length bucket: each is one model call, padded to its longest row."""
    from zdistill.spec import Ragged

    port = procs.free_port()
    teacher = start_teacher(f"{procs.TEACHERS}:per_token", "--metrics-port", str(port))
    client = TeacherClient(teacher.endpoint, timeout=10)
    requests = [[6, 7, 8], [1], [40, 33, 45]]  # padding 3, 0, 12 + 5 = 17
    for lengths in requests:
        ids = Ragged.checked(np.arange(sum(lengths), dtype=np.int64), np.array(lengths))
        weight = Ragged.checked(np.ones(sum(lengths), np.float32), np.array(lengths))
        client.predict({"ids": ids, "weight": weight})
    stats = client.stats()
    client.close()
    tokens = sum(sum(lengths) for lengths in requests)
    padding = sum(len(lengths) * max(lengths) - sum(lengths) for lengths in requests)
    assert (stats["tokens"], stats["padding_tokens"]) == (tokens, padding)
    text = scrape(port)
    assert value(text, "zdistill_teacher_tokens_total") == tokens
    assert value(text, "zdistill_teacher_padding_tokens_total") == padding
    assert value(text, "zdistill_teacher_rows_total") == 7
