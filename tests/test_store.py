"""The Redis key schema and its operations, against a real private redis-server."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import redis

from tests import procs
from zdistill.discovery.store import (
    MAX_RECORD_BYTES,
    LeaderRecord,
    Store,
    StudentRecord,
    TeacherRecord,
    check_address,
    connect,
    describe,
    is_address,
)
from zdistill.errors import ConfigError, WrongTypeError


def _teacher(address: str = "127.0.0.1:7001", service: str = "svc") -> TeacherRecord:
    return TeacherRecord(address, service, feeds=[{"name": "img", "dtype": "float32", "shape": [784]}],
                         fetches=[{"name": "prob", "dtype": "float32", "shape": [10]}], max_batch_size=256,
                         device="cpu")


def test_teacher_record_is_one_set_with_its_ttl(store):
    """The key is created by a single SET ... PX: it never exists without its TTL."""
    seen: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        with store.r.monitor() as m:
            ready.set()
            for cmd in m.listen():
                seen.append(cmd["command"])
                if cmd["command"].upper().startswith("SET "):
                    return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    ready.wait(5)
    rec = _teacher()
    store.r.ping()  # MONITOR is attached once a command from another client shows up
    procs.wait_for(lambda: any("PING" in c.upper() for c in seen), 5, "monitor")
    assert store.register_teacher(rec, ttl=5.0) is False  # False: the key did not exist before
    t.join(5)
    set_cmds = [c for c in seen if c.upper().startswith("SET ")]
    assert len(set_cmds) == 1 and " PX " in set_cmds[0].upper() + " "
    key = store.teacher_key("svc", "127.0.0.1:7001")
    assert 0 < store.r.pttl(key) <= 5000
    back = store.get_teacher("svc", "127.0.0.1:7001")
    assert back is not None and back.feeds == rec.feeds and back.ttl_ms == 5000 and back.device == "cpu"
    assert store.register_teacher(rec, ttl=5.0) is True  # a refresh finds its key
    assert sorted(store.all_teachers().get("svc", {})) == ["127.0.0.1:7001"]
    assert sorted(store.all_teachers().get("other", {})) == []


def test_teacher_record_expires(store):
    store.register_teacher(_teacher(), ttl=0.3)
    key = store.teacher_key("svc", "127.0.0.1:7001")
    assert store.r.exists(key)
    procs.wait_for(lambda: not store.r.exists(key), 2.0, "record expiry")


def test_unregister_removes_only_its_own_record(store):
    mine, newer = _teacher(), _teacher()
    store.register_teacher(mine, ttl=10)
    store.register_teacher(newer, ttl=10)  # a second register for the same address took over
    assert store.unregister_teacher(mine) is False
    assert sorted(store.all_teachers().get("svc", {})) == ["127.0.0.1:7001"]
    assert store.unregister_teacher(newer) is True
    assert sorted(store.all_teachers().get("svc", {})) == []


def test_all_teachers_groups_services_and_skips_bad_records(store):
    store.register_teacher(_teacher("10.0.0.1:1", "a"), ttl=10)
    store.register_teacher(_teacher("10.0.0.2:2", "a"), ttl=10)
    store.register_teacher(_teacher("10.0.0.3:3", "b"), ttl=10)
    store.r.set(store.teacher_key("a", "10.0.0.9:9"), "not json", px=10_000)
    store.r.set(store.teacher_key("b", "10.0.0.8:8"), _teacher("10.0.0.7:7", "b").to_json(), px=10_000)
    found = store.all_teachers()
    assert sorted(found) == ["a", "b"]
    assert sorted(found["a"]) == ["10.0.0.1:1", "10.0.0.2:2"]
    assert sorted(found["b"]) == ["10.0.0.3:3"]
    assert store.parse_teacher_key("zdistill:teacher:a:10.0.0.1:1") == ("a", "10.0.0.1:1")
    assert store.parse_teacher_key("zdistill:leader") is None
    with pytest.raises(ConfigError):
        store.register_teacher(_teacher("10.0.0.1:1", "bad*name"), ttl=1)
    with pytest.raises(ConfigError):
        store.register_teacher(_teacher("no-port", "a"), ttl=1)


def test_leader_lease_is_exclusive_and_fences_writes(store):
    a = LeaderRecord("a", "127.0.0.1:1", "tcp://127.0.0.1:2", 0.0)
    b = LeaderRecord("b", "127.0.0.1:3", "tcp://127.0.0.1:4", 0.0)
    assert store.acquire_leader(a, 5.0)
    assert not store.acquire_leader(b, 5.0)
    assert not store.refresh_leader(b, 5.0)
    assert store.refresh_leader(a, 5.0)
    assert 0 < store.r.pttl(store.leader_key) <= 5000
    assert store.get_leader() == a

    s1 = StudentRecord("s1", "svc", 2, version=3, teachers=["10.0.0.1:1"])
    assert store.replace_students(a, [s1], epoch="e1")
    assert not store.write_students(b, [StudentRecord("s2", "svc", 1)], ["s1"])  # not the leader
    assert not store.replace_students(b, [], epoch="e2")
    assert store.get_epoch() == "e1"
    loaded = store.load_students()
    assert list(loaded) == ["s1"] and loaded["s1"] == s1

    assert not store.release_leader(b)
    assert store.release_leader(a)
    assert store.acquire_leader(b, 5.0)
    assert store.write_students(b, [], ["s1"])
    assert store.load_students() == {}


def test_password_forms_and_masking(tmp_path):
    secret = "s3cret-pw"
    proc = procs.start_redis(password=secret)
    try:
        port = proc.extra["port"]
        assert Store.open(f"127.0.0.1:{port}", secret).ping()
        assert Store.open(f"redis://:{secret}@127.0.0.1:{port}/0").ping()
        assert Store.open(f"redis://127.0.0.1:{port}/0", secret).ping()
        with pytest.raises(redis.AuthenticationError):
            Store.open(f"127.0.0.1:{port}", "wrong").ping()
        with pytest.raises(redis.RedisError):
            Store.open(f"127.0.0.1:{port}").r.set("x", "1")
    finally:
        proc.stop()
    assert secret not in describe(f"redis://user:{secret}@10.0.0.1:6379/0")
    assert describe(f"redis://user:{secret}@10.0.0.1:6379/0") == "redis://user:***@10.0.0.1:6379/0"
    assert describe("10.0.0.1:6379") == "10.0.0.1:6379"
    with pytest.raises(ConfigError):
        connect("10.0.0.1:6379,10.0.0.2:6379")
    with pytest.raises(ConfigError):
        connect("no-port")


def test_keyspace_events_are_enabled_and_keep_existing_flags(store):
    store.r.config_set("notify-keyspace-events", "El")
    assert store.enable_keyspace_events()
    flags = store.r.config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert set("Kg$xEl") <= set(flags) or ("A" in flags and "K" in flags and "E" in flags)
    assert store.keyspace_channel_pattern() == "__keyspace@0__:zdistill:teacher:*"
    assert json.loads(_teacher().to_json())["address"] == "127.0.0.1:7001"


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError, not ValueError


def test_bad_records_are_skipped_and_logged_once(store, caplog):
    """Every record read from Redis is checked; a bad one is skipped, logged once a minute, reported."""
    good = _teacher("10.0.0.1:1", "a")
    store.register_teacher(good, ttl=60)
    fields = json.loads(good.to_json())
    bad_teachers = {
        "10.0.0.2:2": {**fields, "address": "10.0.0.2:2", "ttl_ms": "6000"},
        "10.0.0.3:3": {**fields, "address": "10.0.0.3:3", "ttl_ms": None},
        "10.0.0.4:4": {**fields, "address": "10.0.0.4:4", "device": {"gpu": 0}},
        "10.0.0.5:5": {**fields, "address": "10.0.0.5:5", "max_batch_size": [256]},
        "10.0.0.6:6": {**fields, "address": "10.0.0.6:6", "feeds": 5},
        "10.0.0.7:7": {**fields, "address": "10.0.0.7:7", "registered_at": "now"},
        "10.0.0.8:8": {**fields, "address": "10.0.0.8:8", "description": "x" * (2 * MAX_RECORD_BYTES)},
    }
    for address, data in bad_teachers.items():
        store.r.set(store.teacher_key("a", address), json.dumps(data), px=60_000)
    store.r.set(store.teacher_key("a", "10.0.0.9:9"), DEEP, px=60_000)
    store.r.set(store.teacher_key("a", "10.0.0.10:70000"), json.dumps({**fields, "address": "10.0.0.10:70000"}))

    leader = LeaderRecord("a", "127.0.0.1:1", "tcp://127.0.0.1:2", 0.0)
    assert store.acquire_leader(leader, 60)
    ok = StudentRecord("s-ok", "a", 2, version=1, teachers=["10.0.0.1:1"])
    assert store.replace_students(leader, [ok], epoch="e1")
    bad_students = {"s-zero": {"service": "a", "max_teachers": 0}, "s-deep": DEEP,
                    "s-list": {"service": "a", "max_teachers": 1, "teachers": "10.0.0.1:1"},
                    "s-port": {"service": "a", "max_teachers": 1, "teachers": ["10.0.0.1:99999"]},
                    "s-twice": {"service": "a", "max_teachers": 2, "teachers": ["10.0.0.1:1", "10.0.0.1:1"]},
                    "s-version": {"service": "a", "max_teachers": 1, "version": -1}, "bad id!": {"service": "a"}}
    for sid, data in bad_students.items():
        store.r.hset(store.students_key, sid, data if isinstance(data, str) else json.dumps(data))

    problems: dict[str, str] = {}
    with caplog.at_level(logging.WARNING, logger="zdistill.discovery.store"):
        for _ in range(3):  # as a balancer's resync does, every second
            assert {s: sorted(t) for s, t in store.all_teachers(problems).items()} == {"a": ["10.0.0.1:1"]}
            assert store.load_students(problems) == {"s-ok": ok}
    assert sorted(problems) == sorted([store.teacher_key("a", a) for a in [*bad_teachers, "10.0.0.9:9"]]
                                      + [f"{store.students_key}[{sid}]" for sid in bad_students])
    assert "nests too deep" in problems[store.teacher_key("a", "10.0.0.9:9")]
    assert "ttl_ms must be an integer" in problems[store.teacher_key("a", "10.0.0.2:2")]
    assert "max_teachers must be an integer 1..100000, got int '0'" in problems[f"{store.students_key}[s-zero]"]
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(problems)  # one line per bad key, not one per read
    assert all("ignoring the record at" in line for line in logged)


def test_keys_of_the_wrong_type(store):
    """A key holding the wrong kind of value is named as such, and the leader replaces its own keys."""
    leader = LeaderRecord("a", "127.0.0.1:1", "tcp://127.0.0.1:2", 0.0)
    store.r.set(store.students_key, "not a hash")
    with pytest.raises(WrongTypeError, match="zdistill:students holds a string, not a hash"):
        store.load_students()
    store.r.hset(store.leader_key, "x", "1")  # no balancer can have written this: it blocks nobody
    store.r.hset(store.epoch_key, "x", "1")
    assert store.get_leader() is None and store.get_epoch() is None
    assert store.acquire_leader(leader, 60)
    assert store.get_leader() == leader
    with pytest.raises(WrongTypeError):
        store.write_students(leader, [StudentRecord("s1", "svc", 1)])
    assert store.replace_students(leader, [StudentRecord("s1", "svc", 1)], epoch="e2")
    assert list(store.load_students()) == ["s1"] and store.get_epoch() == "e2"

    store.r.delete(store.leader_key)
    store.r.set(store.leader_key, "stale, without a TTL")  # never expires: not a lease either
    assert store.acquire_leader(leader, 60)
    other = LeaderRecord("b", "127.0.0.1:3", "tcp://127.0.0.1:4", 0.0)
    assert not store.acquire_leader(other, 60)  # a real lease is respected

    key = store.teacher_key("svc", "10.0.0.1:1")
    store.r.hset(key, "x", "1")
    rec = _teacher("10.0.0.1:1")
    assert store.unregister_teacher(rec) is False
    assert store.get_teacher("svc", "10.0.0.1:1") is None
    assert store.register_teacher(rec, ttl=5) is False  # replaced by the record
    assert store.get_teacher("svc", "10.0.0.1:1") is not None


def test_addresses_need_a_real_port(store):
    assert is_address("10.0.0.1:65535") and is_address("[::1]:1") and is_address("host-a:9292")
    for bad in ("10.0.0.1:65536", "10.0.0.1:99999", "10.0.0.1:0", "10.0.0.1", ":1", 5, None):
        assert not is_address(bad), bad
    with pytest.raises(ConfigError, match="1..65535"):
        check_address("10.0.0.1:70000")
    assert store.parse_teacher_key("zdistill:teacher:a:10.0.0.1:70000") is None


def test_endpoints_never_show_a_password():
    assert describe(":s3cret@10.0.0.1:6379") == ":***@10.0.0.1:6379"  # no scheme: still a password
    assert describe("s3cret@10.0.0.1:6379") == ":***@10.0.0.1:6379"
    assert describe("rediss://:p@ss@10.0.0.1:6379") == "rediss://:***@10.0.0.1:6379"
    for endpoint in (":s3cret@10.0.0.1:6379", "redis://:s3cret@10.0.0.1:99999", "redis://:s3cret@10.0.0.1:x",
                     "http://:s3cret@10.0.0.1:1", "10.0.0.1:0", "10.0.0.1:", "10.0.0.1"):
        with pytest.raises(ConfigError) as err:
            connect(endpoint)
        assert "s3cret" not in str(err.value), endpoint
    with pytest.raises(ConfigError, match="given twice"):
        connect("redis://:s3cret@10.0.0.1:6379", "other")
