"""``zdistill-register`` as a real process beside a real teacher, against a real redis-server."""

from __future__ import annotations

import json
import signal
import sys
import time

from tests import daemons, procs
from zdistill.discovery.store import Store

TTL = 2.0
SLACK = 0.5  # Redis expires keys actively ten times a second; process exit and polling add a little


def _address(teacher: procs.Proc) -> str:
    return teacher.endpoint.replace("tcp://", "")


def test_registers_only_after_the_teacher_answers(redis_server, store, tmp_path, stopper):
    port = procs.free_port()
    address = f"127.0.0.1:{port}"
    reg = daemons.start_register(redis_server.endpoint, "svc", address, tmp_path, "--ping-timeout", "0.2",
                                 ttl=TTL, wait=False)
    stopper.append(reg)
    # Nothing listens yet: the register pings, gets no answer, and writes nothing.
    procs.wait_for(lambda: reg.log().count("did not answer a ping") >= 2, 10, "failed pings", reg.popen)
    assert sorted(store.all_teachers().get("svc", {})) == []

    teacher = procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp_path, port=port)
    stopper.append(teacher)
    procs.wait_for(lambda: sorted(store.all_teachers().get("svc", {})) == [address], 5, "registration", reg.popen)
    key = store.teacher_key("svc", address)
    assert 0 < store.r.pttl(key) <= TTL * 1000
    rec = store.get_teacher("svc", address)
    assert rec is not None
    assert [f["name"] for f in rec.feeds] == ["img"] and [f["name"] for f in rec.fetches] == ["prob"]
    assert rec.max_batch_size == 256 and rec.device == "cpu" and rec.ttl_ms == TTL * 1000

    # The record is refreshed: it outlives its first TTL while the teacher serves.
    first = rec.registered_at
    procs.wait_for(lambda: (r := store.get_teacher("svc", address)) is not None and r.registered_at > first,
                   TTL, "refresh")

    assert reg.stop(signal.SIGTERM) == 0
    assert not store.r.exists(key), "SIGTERM must remove the record at once"
    assert "removed" in reg.log()


def test_dead_teacher_drops_out_within_one_ttl_and_comes_back(redis_server, store, tmp_path, stopper):
    port = procs.free_port()
    address = f"127.0.0.1:{port}"
    teacher = procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp_path, port=port)
    stopper.append(teacher)
    reg = daemons.start_register(redis_server.endpoint, "svc", address, tmp_path, ttl=TTL)
    stopper.append(reg)
    key = store.teacher_key("svc", address)
    assert store.r.exists(key)

    killed = time.monotonic()
    teacher.kill()
    procs.wait_for(lambda: not store.r.exists(key), TTL + SLACK, "expiry of a dead teacher's record", reg.popen)
    gone_after = time.monotonic() - killed
    assert gone_after <= TTL + SLACK

    teacher = procs.start_teacher(f"{procs.TEACHERS}:softmax", tmp_path, port=port)  # back at the same address
    stopper.append(teacher)
    procs.wait_for(lambda: store.r.exists(key), 5, "re-registration", reg.popen)
    assert reg.stop(signal.SIGINT) == 0
    assert not store.r.exists(key)


def test_killed_register_lets_the_record_expire(redis_server, store, tmp_path, start_teacher, stopper):
    teacher = start_teacher()
    reg = daemons.start_register(redis_server.endpoint, "svc", _address(teacher), tmp_path, ttl=TTL)
    stopper.append(reg)
    key = store.teacher_key("svc", _address(teacher))
    assert store.r.exists(key)
    killed = time.monotonic()
    reg.kill()
    procs.wait_for(lambda: not store.r.exists(key), TTL + SLACK, "expiry after kill -9 of the register")
    assert time.monotonic() - killed <= TTL + SLACK


def test_reregisters_after_redis_restart(tmp_path, start_teacher, stopper):
    redis_proc = procs.start_redis()
    stopper.append(redis_proc)
    port = redis_proc.extra["port"]
    teacher = start_teacher()
    reg = daemons.start_register(redis_proc.endpoint, "svc", _address(teacher), tmp_path, ttl=TTL)
    stopper.append(reg)
    store = Store.open(redis_proc.endpoint)
    key = store.teacher_key("svc", _address(teacher))
    assert store.r.exists(key)

    redis_proc.kill()  # all data gone: no persistence
    stopper.append(procs.start_redis(port=port))
    procs.wait_for(lambda: _exists(store, key), TTL + 2, "re-registration after Redis restart", reg.popen)
    assert 0 < store.r.pttl(key) <= TTL * 1000
    procs.wait_for(lambda: "registered again" in reg.log(), 2, "log line")
    assert reg.stop() == 0
    store.close()


def test_bad_arguments_exit_2(tmp_path):
    proc = procs.start([sys.executable, "-m", "zdistill.discovery.register", "--db_endpoints", "127.0.0.1:1",
                        "--service_name", "bad name!", "--server", "127.0.0.1:5"], "register")
    assert proc.popen.wait(20) == 2
    assert "service name" in proc.log()


def _exists(store: Store, key: str) -> bool:
    try:
        return bool(store.r.exists(key))
    except Exception:  # Redis still starting, or the client's connection died with the old server
        return False


SANE_META = {"feeds": [{"name": "img", "dtype": "float32", "shape": [784]}],
             "fetches": [{"name": "prob", "dtype": "float32", "shape": [10]}], "max_batch_size": 64, "device": "cpu",
             "description": "odd"}


def test_odd_meta_keeps_the_teacher_unregistered_until_it_is_sane(redis_server, store, tmp_path, stopper):
    """A teacher whose meta has odd fields is logged and left out of Redis; the register keeps running."""
    port = procs.free_port()
    address = f"127.0.0.1:{port}"
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({**SANE_META, "max_batch_size": "lots", "feeds": 5}))
    ready = tmp_path / "odd.ready"
    teacher = procs.start([sys.executable, "-m", "tests.odd_teacher", str(port), str(meta), str(ready)],
                          "odd-teacher", ready_file=str(ready))
    stopper.append(teacher)
    reg = daemons.start_register(redis_server.endpoint, "svc", address, tmp_path, ttl=TTL, wait=False)
    stopper.append(reg)
    odd = [{"device": {"gpu": 0}}, {"max_batch_size": [1]}, {"fetches": [{"name": 1}]}, {"max_batch_size": 0}]
    for n, fields in enumerate([None, *odd], start=1):
        if fields is not None:
            meta.write_text(json.dumps({**SANE_META, **fields}))
        procs.wait_for(lambda n=n: reg.log().count("meta is not sane") == n, 10, f"refusal {n}", reg.popen)
    asked = teacher.log().count("meta asked")
    procs.wait_for(lambda: teacher.log().count("meta asked") >= asked + 3, 10, "three more checks", reg.popen)
    assert reg.log().count("meta is not sane") == len(odd) + 1  # once per different problem, not per check
    assert sorted(store.all_teachers().get("svc", {})) == []

    meta.write_text(json.dumps(SANE_META))
    procs.wait_for(lambda: sorted(store.all_teachers().get("svc", {})) == [address], 10, "registration once sane",
                   reg.popen)
    rec = store.get_teacher("svc", address)
    assert rec is not None and rec.max_batch_size == 64 and rec.device == "cpu"
    assert reg.stop() == 0
