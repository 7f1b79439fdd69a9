"""The student's DiscoveryClient against real daemons, teachers and redis-server."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgspec
import numpy as np
import pytest
import zmq

from tests import daemons, procs
from tests.test_balancer import _wait_teachers, add_teacher
from zdistill import wire
from zdistill.discovery import messages
from zdistill.discovery.client import DiscoveryClient, ask_balancer
from zdistill.discovery.store import Store
from zdistill.errors import ConfigError

TTL = 2.0


def _address(teacher: procs.Proc) -> str:
    return teacher.endpoint.replace("tcp://", "")


def test_teachers_joining_and_leaving_reach_current(redis_server, tmp_path, start_teacher, stopper, clients):
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(bal)
    client = DiscoveryClient(bal.endpoint, "svc", 4)
    clients.append(client)
    client.start()
    procs.wait_for(lambda: client.leader == bal.endpoint, 5, "registration")
    assert client.current() == (0, [])

    t1, t2 = start_teacher(), start_teacher()
    a1, a2 = _address(t1), _address(t2)
    started = time.monotonic()
    r1 = daemons.start_register(redis_server.endpoint, "svc", a1, tmp_path, ttl=TTL)
    stopper.append(r1)
    assert _wait_teachers(client, [a1], timeout=3)[0] == 1
    assert time.monotonic() - started < 3  # includes starting the register process

    r2 = daemons.start_register(redis_server.endpoint, "svc", a2, tmp_path, ttl=TTL)
    stopper.append(r2)
    assert _wait_teachers(client, [a1, a2], timeout=3)[0] == 2

    assert r1.stop(signal.SIGTERM) == 0  # a register stopping removes its teacher at once
    stopped = time.monotonic()
    assert _wait_teachers(client, [a2], timeout=2)[0] == 3
    assert time.monotonic() - stopped < 2

    t2.kill()  # a dead teacher: its register stops refreshing, the record expires
    assert _wait_teachers(client, [], timeout=TTL + 2)[0] == 4


def update(epoch: str, version: int, teachers: list[str]) -> messages.Update:
    return messages.Update(student="me", service="svc", epoch=epoch, version=version, teachers=teachers)


@pytest.mark.timeout(30)
def test_a_balancer_reply_beyond_the_balancers_limits_is_no_reply():
    """What answers at a balancer's address may send anything: a reply carrying 8 MiB of arrays
    (a balancer sends none) is dropped by libzmq, never decoded under the 1 GiB array limit."""
    ctx = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    status = messages.StatusReply(id=1, leading=True, leader=None, server="", pub="", epoch=None, redis=True,
                                  notifications=True, students=0, teachers={})

    def answer() -> None:
        if server.poll(10_000):
            envelope = server.recv_multipart()[:1]
            wire.send(server, msgspec.to_builtins(status), {"x": np.zeros(2 << 20, np.float32)}, envelope)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        assert ask_balancer(f"127.0.0.1:{port}", messages.StatusRequest(id=1), timeout=2.0) is None
    finally:
        thread.join(15)
        server.close()
    assert not thread.is_alive()


def test_stale_updates_are_ignored():
    client = DiscoveryClient("127.0.0.1:1", "svc", 2, "me")  # never started: feed it messages by hand
    client._apply(update("e1", 3, ["a:1"]))
    assert client.current() == (1, ["a:1"])
    client._apply(update("e1", 2, ["b:1"]))  # older: ignored
    client._apply(update("e1", 3, ["b:1"]))  # same version: ignored
    assert client.current() == (1, ["a:1"])
    client._apply(update("e1", 4, ["a:1"]))  # newer, same list: no new version
    assert client.current() == (1, ["a:1"])
    client._apply(update("e2", 1, ["c:1"]))  # a new history starts over
    assert client.current() == (2, ["c:1"])
    client.close()


def test_arguments_are_checked():
    with pytest.raises(ConfigError):
        DiscoveryClient("", "svc", 1)
    with pytest.raises(ConfigError):
        DiscoveryClient("127.0.0.1:1", "bad name", 1)
    with pytest.raises(ConfigError):
        DiscoveryClient("127.0.0.1:1", "svc", 0)
    with pytest.raises(ConfigError):
        DiscoveryClient("127.0.0.1:1", "svc", 1, student_id="no spaces")


def test_close_never_hangs_without_a_balancer():
    client = DiscoveryClient(f"127.0.0.1:{procs.free_port()},127.0.0.1:{procs.free_port()}", "svc", 2)
    client.start()
    start = time.monotonic()
    assert client.wait_for_change(0, 0.3) == (0, [])
    assert 0.25 <= time.monotonic() - start < 1.0
    start = time.monotonic()
    client.close()
    client.close()  # twice is fine
    assert time.monotonic() - start < 2.5


def test_exit_without_close_is_quiet_and_says_goodbye(redis_server, tmp_path, stopper):
    store = Store.open(redis_server.endpoint)
    add_teacher(store, "10.0.0.1:1")
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path, student_lease=30)
    stopper.append(bal)
    script = textwrap.dedent(f"""
        from zdistill.discovery.client import DiscoveryClient
        c = DiscoveryClient({bal.endpoint!r}, "svc", 2, "leaver")
        c.start()
        v, t = c.wait_for_change(0, 10)
        assert t == ["10.0.0.1:1"], t
        # exit without close(): the daemon thread must not print anything
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                         cwd=str(procs.REPO))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Exception" not in out.stderr, out.stderr
    # The atexit goodbye removed the student now, not after its 30 s lease.
    procs.wait_for(lambda: "leaver" not in store.load_students(), 2, "goodbye at exit")
    store.close()


def test_redis_restart_under_running_daemons(tmp_path, start_teacher, stopper, clients):
    redis_proc = procs.start_redis()
    stopper.append(redis_proc)
    port = redis_proc.extra["port"]
    teacher = start_teacher()
    address = _address(teacher)
    reg = daemons.start_register(redis_proc.endpoint, "svc", address, tmp_path, ttl=TTL)
    stopper.append(reg)
    bal = daemons.start_balancer(redis_proc.endpoint, tmp_path, student_lease=5)
    stopper.append(bal)
    procs.wait_for(lambda: (daemons.status(bal.endpoint) or {}).get("leading"), 3, "leader")
    standby = daemons.start_balancer(redis_proc.endpoint, tmp_path, student_lease=5)
    stopper.append(standby)
    procs.wait_for(lambda: daemons.status(standby.endpoint)["leader"] == bal.endpoint, 3, "standby sees leader")
    client = DiscoveryClient(f"{bal.endpoint},{standby.endpoint}", "svc", 2, "steady")
    clients.append(client)
    client.start()
    version, _ = _wait_teachers(client, [address])
    store = Store.open(redis_proc.endpoint)
    before = store.load_students()["steady"]
    epoch = store.get_epoch()

    redis_proc.kill()  # every record lost: no persistence
    stopper.append(procs.start_redis(port=port))

    def recovered() -> bool:
        try:
            students = store.load_students()
            return store.r.exists(store.teacher_key("svc", address)) and "steady" in students
        except Exception:  # the old connection died with the old server
            return False

    procs.wait_for(recovered, TTL + 3, "register and balancer restore their records", bal.popen)
    assert store.load_students()["steady"] == before  # same teachers, same version
    assert store.get_epoch() == epoch
    procs.wait_for(lambda: (daemons.status(bal.endpoint) or {}).get("leading"), 3, "leading again")
    assert not daemons.status(standby.endpoint)["leading"]  # the leader with the state won the race
    assert client.current() == (version, [address])  # the student saw no churn

    add_teacher(store, "10.0.0.9:9")  # the balancer watches the new server: a join still gets through
    _wait_teachers(client, [address, "10.0.0.9:9"], timeout=3)
    assert bal.popen.poll() is None and reg.popen.poll() is None
    store.close()
