"""``zdistill-balancer`` as a real process: hostile input, restarts, failover, student leases."""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter

import msgpack
import zmq

from tests import daemons, procs
from zdistill import wire
from zdistill.discovery.client import DiscoveryClient
from zdistill.discovery.store import Store, TeacherRecord


def add_teacher(store: Store, address: str, service: str = "svc", ttl: float = 60.0) -> None:
    """What zdistill-register writes, without a teacher process: the balancer only reads Redis."""
    store.register_teacher(TeacherRecord(address, service), ttl)


def _leading(address: str) -> bool:
    st = daemons.status(address, timeout=0.5)
    return bool(st and st["leading"])


def _wait_teachers(client: DiscoveryClient, want, timeout: float = 5.0) -> tuple[int, list[str]]:
    """Wait until the client's teachers satisfy ``want`` (a predicate or an exact list)."""
    check = want if callable(want) else (lambda ts: ts == sorted(want))
    end = time.monotonic() + timeout
    version, teachers = client.current()
    while not check(teachers):
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"client has {teachers}, not what was wanted")
        version, teachers = client.wait_for_change(version, left)
    return version, teachers


def _send_raw(sock: zmq.Socket, frames: list[bytes]) -> dict | None:
    sock.send_multipart(frames)
    if not sock.poll(2000):
        return None
    reply = sock.recv_multipart()
    if len(reply) > 1 and reply[0] == b"":  # our first frame was empty: taken as a REQ delimiter, echoed
        reply = reply[1:]
    return wire.decode(reply).header


def test_bad_messages_are_answered_and_the_balancer_keeps_serving(redis_server, store, tmp_path, stopper):
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(bal)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{bal.endpoint}")

    def packed(header: dict) -> bytes:
        return msgpack.packb({"arrays": [], **header})

    reg = {"kind": "register", "id": 7, "student": "s1", "service": "svc", "max_teachers": 2}
    cases = [
        ([b"garbage"], "bad_message"),
        ([b""], "bad_message"),
        ([b"\x81\xa4kin"], "bad_message"),  # truncated msgpack
        ([msgpack.packb([1, 2, 3])], "bad_message"),  # not a map
        ([msgpack.packb({"kind": "status"})], "bad_message"),  # no array table
        ([packed({"kind": "status", "arrays": [["x", "<f4", [2]]]}), b"\0" * 8], "bad_message"),  # arrays refused
        ([packed({"kind": "nope", "id": 1})], "bad_request"),
        ([packed({"id": 1})], "bad_request"),
        ([packed({**reg, "student": 5})], "bad_request"),
        ([packed({**reg, "student": "bad id!"})], "bad_request"),
        ([packed({**reg, "service": "a b"})], "bad_request"),
        ([packed({**reg, "service": None})], "bad_request"),
        ([packed({**reg, "max_teachers": "3"})], "bad_request"),
        ([packed({**reg, "max_teachers": True})], "bad_request"),
        ([packed({**reg, "max_teachers": 0})], "bad_request"),
        ([packed({**reg, "max_teachers": 10**9})], "bad_request"),
        ([packed({**reg, "max_teachers": 2.5})], "bad_request"),
        ([packed({"kind": "snapshot", "id": 3, "student": "never-registered"})], "unknown_student"),
        # a field of the wrong type, one per request kind
        ([packed({**reg, "kind": "heartbeat", "max_teachers": "2"})], "bad_request"),
        ([packed({"kind": "snapshot", "id": 3, "student": 5})], "bad_request"),
        ([packed({"kind": "bye", "id": 4, "student": ["s1"]})], "bad_request"),
        ([packed({"kind": "status", "id": {"a": [1]}})], "bad_request"),
    ]
    for frames, code in cases:
        reply = _send_raw(sock, frames)
        assert reply is not None and reply["kind"] == "error" and reply["code"] == code, (frames, reply)

    odd_id = _send_raw(sock, [packed({"kind": "status", "id": "x" * 200})])  # an id too long to echo
    assert odd_id is not None and odd_id["kind"] == "status" and odd_id["id"] is None

    rng = random.Random(5)
    for _ in range(300):  # random bytes and random frame counts: every one answered
        frames = [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))]
        reply = _send_raw(sock, frames)
        assert reply is not None and reply["kind"] == "error"

    # A frame over the size limit: libzmq drops that peer, with no reply; others are unaffected.
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(f"tcp://{bal.endpoint}")
    assert _send_raw(big, [b"\x80" + b"x" * 100_000]) is None
    big.close()

    # A REQ peer (with its empty delimiter frame) is served too.
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(f"tcp://{bal.endpoint}")
    assert _send_raw(req, [packed({"kind": "status", "id": 1})])["kind"] == "status"
    req.close()

    add_teacher(store, "10.0.0.1:1")
    good = _send_raw(sock, [packed(reg)])
    assert good["kind"] == "assignment" and good["id"] == 7 and good["student"] == "s1"
    procs.wait_for(lambda: daemons.request(bal.endpoint, {**reg, "kind": "heartbeat"})["teachers"] == ["10.0.0.1:1"],
                   5, "assignment after the fuzz")
    assert bal.popen.poll() is None
    sock.close()


def test_restarted_balancer_resumes_the_same_assignment(redis_server, store, tmp_path, stopper):
    for i in range(5):
        add_teacher(store, f"10.0.0.{i}:7000")
    port = procs.free_port()
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path, port=port, student_lease=30)
    stopper.append(bal)
    students = [f"s{i}" for i in range(3)]
    for sid in students:
        reply = daemons.request(bal.endpoint, {"kind": "register", "id": 1, "student": sid, "service": "svc",
                                               "max_teachers": 2})
        assert reply["kind"] == "assignment"
    procs.wait_for(lambda: len(saved := store.load_students()) == 3 and all(r.teachers for r in saved.values()), 5,
                   "assignments saved")
    before = store.load_students()
    epoch = store.get_epoch()
    assert sum(len(r.teachers) for r in before.values()) == 5  # every teacher used, none twice

    bal.kill()
    bal2 = daemons.start_balancer(redis_server.endpoint, tmp_path, port=port, student_lease=30)
    stopper.append(bal2)
    procs.wait_for(lambda: _leading(bal2.endpoint), 5, "new leader", bal2.popen)
    procs.wait_for(lambda: daemons.status(bal2.endpoint)["teachers"].get("svc") == 5, 5, "teacher resync")
    for sid in students:
        reply = daemons.request(bal2.endpoint, {"kind": "heartbeat", "id": 2, "student": sid, "service": "svc",
                                                "max_teachers": 2})
        assert (reply["epoch"], reply["version"], reply["teachers"]) == (epoch, before[sid].version,
                                                                         before[sid].teachers)
    assert store.load_students() == before
    assert store.get_epoch() == epoch
    assert "get new teachers" not in bal2.log()


def test_standby_takes_over_and_students_follow(redis_server, store, tmp_path, stopper, clients):
    add_teacher(store, "10.0.0.1:1")
    b1 = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(b1)
    procs.wait_for(lambda: _leading(b1.endpoint), 5, "first leader")
    b2 = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(b2)
    procs.wait_for(lambda: daemons.status(b2.endpoint)["leader"] == b1.endpoint, 5, "standby sees the leader")
    assert not _leading(b2.endpoint)
    redirect = daemons.request(b2.endpoint, {"kind": "register", "id": 1, "student": "x", "service": "svc",
                                             "max_teachers": 1})
    assert redirect == {"kind": "redirect", "leader": b1.endpoint, "id": 1}

    client = DiscoveryClient(f"{b2.endpoint},{b1.endpoint}", "svc", 2)  # the standby first: must follow
    clients.append(client)
    client.start()
    _wait_teachers(client, ["10.0.0.1:1"])
    assert client.leader == b1.endpoint
    version = client.current()[0]

    killed = time.monotonic()
    b1.kill()
    procs.wait_for(lambda: _leading(b2.endpoint), 5, "standby takes over", b2.popen)
    takeover = time.monotonic() - killed
    add_teacher(store, "10.0.0.2:2")
    _wait_teachers(client, ["10.0.0.1:1", "10.0.0.2:2"])
    assert client.leader == b2.endpoint
    assert client.current()[0] == version + 1  # the failover itself changed nothing for the student
    assert takeover < 3.0


def test_student_lease_and_goodbye_rebalance(redis_server, store, tmp_path, stopper, clients):
    lease = 3.0
    add_teacher(store, "10.0.0.1:1")
    add_teacher(store, "10.0.0.2:2")
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path, student_lease=lease)
    stopper.append(bal)
    a = daemons.start_student(bal.endpoint, "svc", 2, "student-a", tmp_path)
    stopper.append(a)
    b = DiscoveryClient(bal.endpoint, "svc", 2, "student-b")
    clients.append(b)
    b.start()
    _, (mine,) = _wait_teachers(b, lambda ts: len(ts) == 1)  # two students share two teachers: one each

    killed = time.monotonic()
    a.kill()  # no goodbye: the balancer must notice the silence
    _wait_teachers(b, ["10.0.0.1:1", "10.0.0.2:2"], timeout=lease + 3)
    freed_after = time.monotonic() - killed
    assert lease * 0.5 < freed_after < lease + 2
    assert "student-a" not in store.load_students()

    c = DiscoveryClient(bal.endpoint, "svc", 2, "student-c")
    clients.append(c)
    c.start()
    _wait_teachers(c, lambda ts: len(ts) == 1)
    _wait_teachers(b, lambda ts: len(ts) == 1)
    closed = time.monotonic()
    c.close()  # a goodbye: its teacher goes back at once, not after the lease
    _wait_teachers(b, ["10.0.0.1:1", "10.0.0.2:2"], timeout=lease)
    assert time.monotonic() - closed < lease / 2
    assert mine in b.current()[1]


def test_without_keyspace_notifications_the_resync_finds_teachers(redis_server, store, tmp_path, stopper, clients):
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path, "--no-notifications")
    stopper.append(bal)
    client = DiscoveryClient(bal.endpoint, "svc", 4)
    clients.append(client)
    client.start()
    procs.wait_for(lambda: client.leader is not None, 5, "registration")
    add_teacher(store, "10.0.0.1:1")
    _wait_teachers(client, ["10.0.0.1:1"], timeout=3)
    store.r.delete(store.teacher_key("svc", "10.0.0.1:1"))
    _wait_teachers(client, [], timeout=3)
    assert daemons.status(bal.endpoint)["notifications"] is False


def test_balancer_refuses_bad_arguments(redis_server):
    proc = procs.start([sys.executable, "-m", "zdistill.discovery.balancer", "--db_endpoints", redis_server.endpoint,
                        "--server", "not-an-address"], "balancer")
    assert proc.popen.wait(20) == 2


DEEP = "[" * 100_000 + "]" * 100_000


def _scans(store: Store) -> int:
    """How many SCANs Redis has served: a leader's resync is one (a few teachers)."""
    return int(store.r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_bad_records_end_no_balancer(redis_server, store, tmp_path, stopper, clients):
    """Malformed teacher and student records are skipped; the leader and the standby that takes over serve on."""
    add_teacher(store, "10.0.0.1:1")
    good = json.loads(TeacherRecord("10.0.0.2:2", "svc").to_json())
    bad_teachers = {"10.0.0.2:2": {"ttl_ms": "6000"}, "10.0.0.3:3": {"ttl_ms": None},
                    "10.0.0.4:4": {"device": {"gpu": 0}}, "10.0.0.5:5": {"max_batch_size": [1]}}
    for address, odd in bad_teachers.items():
        store.r.set(store.teacher_key("svc", address), json.dumps({**good, "address": address, **odd}), px=60_000)
    store.r.set(store.teacher_key("svc", "10.0.0.6:6"), DEEP, px=60_000)
    store.r.hset(store.students_key, mapping={"zero": json.dumps({"service": "svc", "max_teachers": 0}),
                                              "deep": DEEP})
    store.r.set(store.epoch_key, "e1")  # a history to resume: the student records are read

    b1 = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(b1)
    procs.wait_for(lambda: _leading(b1.endpoint), 10, "first leader", b1.popen)
    b2 = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(b2)
    client = DiscoveryClient(f"{b1.endpoint},{b2.endpoint}", "svc", 4)
    clients.append(client)
    client.start()
    _wait_teachers(client, ["10.0.0.1:1"])
    assert set(store.r.hkeys(store.students_key)) == {client.student_id}  # the unreadable ones removed

    # A teacher record that arrives bad by keyspace notification, and a good one.
    store.r.set(store.teacher_key("svc", "10.0.0.7:7"), json.dumps({**good, "address": "10.0.0.7:7", "ttl_ms": "x"}),
                px=60_000)
    add_teacher(store, "10.0.0.8:8")
    _wait_teachers(client, ["10.0.0.1:1", "10.0.0.8:8"])
    b1.kill()
    procs.wait_for(lambda: _leading(b2.endpoint), 10, "the standby takes over", b2.popen)
    add_teacher(store, "10.0.0.9:9")
    # the client first gives the dead leader a second (or more, on a loaded machine) per request
    _wait_teachers(client, ["10.0.0.1:1", "10.0.0.8:8", "10.0.0.9:9"], timeout=15.0)

    # Each resync reads every bad record again; each is logged once all the same.
    bad_keys = [store.teacher_key("svc", a) for a in [*bad_teachers, "10.0.0.6:6", "10.0.0.7:7"]]
    procs.wait_for(lambda: all(k in b2.log() for k in bad_keys), 10, "the bad records logged", b2.popen)
    scans = _scans(store)
    procs.wait_for(lambda: _scans(store) >= scans + 3, 10, "three more resyncs", b2.popen)
    assert b2.log().count("ignoring the record at") == len(bad_keys)
    assert "nests too deep" in b2.log() and "ttl_ms must be an integer" in b2.log()
    assert "zero" in b1.log() and "deep" in b1.log()
    assert b2.popen.poll() is None and _leading(b2.endpoint)


def _writes(store: Store) -> int:
    """Fenced writes of students so far: scripts run, less the lease refreshes (the only other script here)."""
    stats = store.r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) - int(stats.get("cmdstat_pexpire", {}).get("calls", 0))


def _burst(address: str, requests: list[dict], timeout: float = 30.0) -> list[dict]:
    """Send every request at once from one DEALER, then collect every answer."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    try:
        for i, req in enumerate(requests):
            wire.send(sock, {**req, "id": i})
        replies = []
        end = time.monotonic() + timeout
        while len(replies) < len(requests) and sock.poll(max(0, int((end - time.monotonic()) * 1000))):
            replies.append(wire.decode(sock.recv_multipart()).header)
        return replies
    finally:
        sock.close(linger=0)


def _balanced(store: Store, teachers: int) -> bool:
    loads = Counter(t for rec in store.load_students().values() for t in rec.teachers)
    return len(loads) == teachers and max(loads.values()) - min(loads.values()) <= 1


def _balancer_of_four(redis_server, store: Store, tmp_path, stopper, student_lease: float) -> procs.Proc:
    """A balancer that knows four teachers of ``svc``."""
    for i in range(4):
        add_teacher(store, f"10.0.0.{i + 1}:1")
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path, student_lease=student_lease)
    stopper.append(bal)
    procs.wait_for(lambda: daemons.status(bal.endpoint)["teachers"].get("svc") == 4, 10, "teachers", bal.popen)
    return bal


def test_student_churn_is_coalesced(redis_server, store, tmp_path, stopper):
    """A burst of registrations, byes or expiries costs a few rebalances and writes, not one per student."""
    # A lease long enough that no student expires before the heartbeats, even on a loaded machine.
    bal = _balancer_of_four(redis_server, store, tmp_path, stopper, student_lease=10.0)
    n = 2000
    ids = [f"burst-{i}" for i in range(n)]
    register = [{"kind": "register", "student": sid, "service": "svc", "max_teachers": 2} for sid in ids]

    before = _writes(store)
    replies = _burst(bal.endpoint, register)
    kinds = Counter(r["kind"] for r in replies)
    assert kinds == {"assignment": n}, kinds  # with teachers, or (under churn) before them: they follow on PUB
    assert sorted(r["id"] for r in replies) == list(range(n))
    procs.wait_for(lambda: len(store.load_students()) == n and _balanced(store, 4), 10, "the last commit")
    registered = _writes(store) - before
    assert registered < n / 10, f"{registered} writes for {n} registrations"

    before = _writes(store)
    beats = _burst(bal.endpoint, [{**req, "kind": "heartbeat"} for req in register])
    answers = Counter((r["kind"], len(r.get("teachers", ()))) for r in beats)
    assert answers == {("assignment", 1): n}, answers
    beaten = _writes(store) - before  # none
    assert beaten < n / 20, f"{beaten} writes for {n} heartbeats"

    before = _writes(store)
    byes = _burst(bal.endpoint, [{"kind": "bye", "student": sid} for sid in ids[: n // 2]])
    kinds = Counter(r["kind"] for r in byes)
    assert kinds == {"ok": n // 2}, kinds
    procs.wait_for(lambda: daemons.status(bal.endpoint)["students"] == n - n // 2, 10, "byes", bal.popen)
    left = _writes(store) - before
    assert left < n / 20, f"{left} writes for {n // 2} byes"
    procs.wait_for(lambda: _balanced(store, 4) and len(store.load_students()) == n // 2, 10, "rebalanced")

    before = _writes(store)  # the rest never beat again: all expire within a few ticks of each other
    procs.wait_for(lambda: daemons.status(bal.endpoint)["students"] == 0, 30, "expiry", bal.popen)
    expired = _writes(store) - before
    assert expired < n / 20, f"{expired} writes for {n // 2} expiries"
    assert store.load_students() == {}
    assert "more; their teachers go to others" in bal.log()  # one line per tick, not one per student


def test_keys_of_the_wrong_type_are_named_and_replaced(redis_server, store, tmp_path, stopper, clients):
    """``zdistill:students`` as a string, a leader key no balancer wrote: the leader says so and repairs them."""
    add_teacher(store, "10.0.0.1:1")
    store.r.set(store.students_key, "oops")
    store.r.set(store.epoch_key, "e1")
    store.r.hset(store.leader_key, "x", "1")  # without a TTL, and of the wrong type: it would block every balancer
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(bal)
    procs.wait_for(lambda: _leading(bal.endpoint), 10, "a leader", bal.popen)
    first = DiscoveryClient(bal.endpoint, "svc", 1)
    clients.append(first)
    first.start()
    _wait_teachers(first, ["10.0.0.1:1"])
    procs.wait_for(lambda: first.student_id in store.load_students(), 5, "the students hash rewritten")

    store.r.set(store.students_key, "oops again")  # while serving
    second = DiscoveryClient(bal.endpoint, "svc", 1)
    clients.append(second)
    second.start()
    _wait_teachers(second, ["10.0.0.1:1"])
    procs.wait_for(lambda: store.r.type(store.students_key) == "hash"
                   and {first.student_id, second.student_id} <= set(store.load_students()), 5, "rewritten again")
    log = bal.log()
    assert log.count("zdistill:students holds a string, not a hash") == 2
    assert "zdistill:leader: it held no balancer's lease" in log
    assert "lost Redis" not in log and bal.popen.poll() is None


def test_a_teacher_ping_at_a_balancer_says_so(redis_server, tmp_path, stopper):
    bal = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(bal)
    reply = daemons.request(bal.endpoint, {"kind": "ping", "id": 4})
    assert reply == {"kind": "error", "code": "wrong_server", "message": "this is a zdistill balancer, not a teacher",
                     "id": 4}


def test_one_client_registering_students_one_by_one_is_coalesced(redis_server, store, tmp_path, stopper):
    """Registrations that arrive one at a time are not one rebalance and one write each either."""
    bal = _balancer_of_four(redis_server, store, tmp_path, stopper, student_lease=30.0)
    n = 600
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{bal.endpoint}")
    before = _writes(store)
    try:
        for i in range(n):
            wire.send(sock, {"kind": "register", "id": i, "student": f"one-{i}", "service": "svc", "max_teachers": 1})
            assert sock.poll(10_000), f"no answer to registration {i}"
            assert wire.decode(sock.recv_multipart()).header["kind"] == "assignment"
    finally:
        sock.close(linger=0)
    procs.wait_for(lambda: len(store.load_students()) == n and _balanced(store, 4), 10, "the last commit")
    writes = _writes(store) - before
    assert writes < n / 2, f"{writes} writes for {n} registrations one after the other"
