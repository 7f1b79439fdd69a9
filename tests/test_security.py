"""CURVE on the teacher socket: only clients with the right keys get anything through."""

from __future__ import annotations

import numpy as np
import pytest

from tests import procs
from tests.teachers import softmax_np
from zdistill import ConfigError, DistillReader, TeacherTimeout
from zdistill.client import TeacherClient
from zdistill.security import ClientKeys
from zdistill.security import main as security_main


@pytest.fixture
def keys(tmp_path):
    """A server pair, two client pairs, and an allow-list folder holding only ``alice``."""
    for name in ("server", "alice", "mallory"):
        assert security_main(["keygen", str(tmp_path / "keys"), name]) == 0
    allow = tmp_path / "allowed"
    allow.mkdir()
    (allow / "alice.key").write_bytes((tmp_path / "keys" / "alice.key").read_bytes())
    return tmp_path / "keys", allow


def ping(endpoint: str, curve: ClientKeys | None) -> bool:
    client = TeacherClient(endpoint, timeout=1.5, curve=curve)
    try:
        client.ping()
        return True
    except TeacherTimeout:
        return False
    finally:
        client.close()


def test_curve_teacher_refuses_clients_without_its_key(start_teacher, keys):
    folder, _ = keys
    teacher = start_teacher(f"{procs.TEACHERS}:softmax", "--curve-secret-key", str(folder / "server.key_secret"))
    assert not ping(teacher.endpoint, None)  # plain client: the handshake never completes
    assert not ping(teacher.endpoint, ClientKeys(str(folder / "mallory.key")))  # wrong server key
    assert ping(teacher.endpoint, ClientKeys(str(folder / "server.key")))


def test_curve_allow_list_lets_only_listed_clients_in(start_teacher, keys):
    folder, allow = keys
    teacher = start_teacher(f"{procs.TEACHERS}:softmax", "--curve-secret-key", str(folder / "server.key_secret"),
                            "--curve-allow", str(allow))
    server_public = str(folder / "server.key")
    assert not ping(teacher.endpoint, ClientKeys(server_public))  # an ephemeral key is not on the list
    assert not ping(teacher.endpoint, ClientKeys(server_public, str(folder / "mallory.key_secret")))
    assert ping(teacher.endpoint, ClientKeys(server_public, str(folder / "alice.key_secret")))


def test_distill_reader_uses_curve_keys_from_the_environment(start_teacher, keys, monkeypatch):
    folder, allow = keys
    teacher = start_teacher(f"{procs.TEACHERS}:softmax", "--curve-secret-key", str(folder / "server.key_secret"),
                            "--curve-allow", str(allow))
    monkeypatch.setenv("ZDISTILL_CURVE_SERVER_KEY", str(folder / "server.key"))
    monkeypatch.setenv("ZDISTILL_CURVE_CLIENT_KEY", str(folder / "alice.key_secret"))
    x = np.random.default_rng(1).random((100, 784), dtype=np.float32)
    with DistillReader(ins=["img", "label"], predicts=["prob"]) as dr:
        dr.set_fixed_teacher(teacher.endpoint)
        dr.set_batch_generator(lambda: iter([(x, np.arange(100))]))
        [(_, _, prob)] = list(dr())
    np.testing.assert_allclose(prob, softmax_np(x), rtol=1e-5, atol=1e-6)


def test_key_files_are_checked(tmp_path, start_teacher):
    with pytest.raises(ConfigError, match="does not exist"):
        ClientKeys(str(tmp_path / "nope.key")).apply(None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="holds no secret key"):
        assert security_main(["keygen", str(tmp_path), "s"]) == 0
        start_teacher(f"{procs.TEACHERS}:softmax", "--curve-secret-key", str(tmp_path / "s.key"), timeout=20)


def test_curve_balancer_refuses_students_without_its_key(redis_server, keys, tmp_path, monkeypatch):
    from tests import daemons
    from zdistill.discovery.client import DiscoveryClient

    folder, _ = keys
    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path, "--curve-secret-key",
                                      str(folder / "server.key_secret"))
    try:
        assert daemons.request(balancer.endpoint, {"kind": "status", "id": 1}, timeout=1.5) is None
        monkeypatch.setenv("ZDISTILL_CURVE_SERVER_KEY", str(folder / "server.key"))
        client = DiscoveryClient(balancer.endpoint, "svc", 1, "curvy")
        client.start()
        try:
            procs.wait_for(lambda: client.leader is not None, 10, "the keyed student to reach the balancer")
        finally:
            client.close()
    finally:
        balancer.stop()


def test_an_empty_curve_flag_is_refused_not_plaintext(start_teacher, redis_server, keys, tmp_path):
    """``--curve-secret-key "$KEY"`` with ``KEY`` unset must not start a teacher or a balancer that
    takes every client in plaintext: the daemon stops, naming the empty flag."""
    from tests import daemons

    folder, _ = keys
    with pytest.raises(RuntimeError, match="need a path, got an empty one"):
        start_teacher(f"{procs.TEACHERS}:softmax", "--curve-secret-key", "", timeout=20)
    with pytest.raises(RuntimeError, match="need a path, got an empty one"):
        daemons.start_balancer(redis_server.endpoint, tmp_path, "--curve-secret-key",
                               str(folder / "server.key_secret"), "--curve-allow", "", timeout=20)


def test_balancer_pub_drops_a_peer_sending_an_oversized_frame(redis_server, tmp_path):
    """The PUB socket reads its subscribers' frames too: one far past any subscription must cost
    the sender its connection, not the balancer a buffer of whatever size the peer declares."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    from tests import daemons

    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XSUB)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(balancer.extra["pub"])
        sock.send(b"\x02" + b"x" * (1 << 20))  # 1 MiB; not a (un)subscribe, which XSUB would keep
        events = []
        while zmq.EVENT_DISCONNECTED not in events and monitor.poll(10_000):
            events.append(recv_monitor_message(monitor)["event"])
        assert zmq.EVENT_DISCONNECTED in events, f"the balancer kept a peer that sent a 1 MiB frame: {events}"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()
        balancer.stop()


@pytest.mark.parametrize("empty", ["ZDISTILL_CURVE_SERVER_KEY", "ZDISTILL_CURVE_CLIENT_KEY"])
def test_an_empty_curve_variable_is_refused_not_plaintext(start_teacher, keys, monkeypatch, empty):
    """``ZDISTILL_CURVE_SERVER_KEY=$KEY`` with ``KEY`` unset meant keys: the client must not then
    take a plaintext teacher's answers (nor, for the client key, go in with a throwaway one)."""
    folder, _ = keys
    teacher = start_teacher(f"{procs.TEACHERS}:softmax")
    monkeypatch.delenv("ZDISTILL_CURVE_CLIENT_KEY", raising=False)
    monkeypatch.setenv("ZDISTILL_CURVE_SERVER_KEY", str(folder / "server.key"))
    monkeypatch.setenv(empty, "")
    with pytest.raises(ConfigError, match=f"{empty} is set but empty"):
        TeacherClient(teacher.endpoint, timeout=1.5).close()
