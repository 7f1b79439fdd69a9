"""Hostile input: 10,000 random and mutated messages, and crafted ones, against real teacher processes."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import psutil
import zmq

from tests import fuzzing, procs
from tests.teachers import softmax_np
from zdistill import wire
from zdistill.client import TeacherClient
from zdistill.spec import Ragged

FUZZ_MESSAGES = 10_000


def test_teacher_survives_10000_hostile_messages(start_teacher):
    teacher = start_teacher()
    valid = [
        fuzzing.frames_of({"kind": "predict", "id": 1}, {"img": np.ones((4, 784), np.float32)}),
        fuzzing.frames_of({"kind": "predict", "id": 4},
                          {"img": Ragged(np.ones((6, 784), np.float32), np.array([2, 4]))}),
        fuzzing.frames_of({"kind": "meta", "id": 2}),
        fuzzing.frames_of({"kind": "ping", "id": 3}),
    ]
    proc = psutil.Process(teacher.pid)
    good = TeacherClient(teacher.endpoint, timeout=10)
    x = np.random.default_rng(0).random((8, 784), dtype=np.float32)
    good.predict({"img": x})
    rss_before = proc.memory_info().rss

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(teacher.endpoint)
    replies = {"error": 0, "other": 0}
    sent = 0

    def drain(wait_ms: int) -> None:
        while sock.poll(wait_ms):
            msg = wire.decode(sock.recv_multipart())
            replies["error" if msg.kind == "error" else "other"] += 1
            wait_ms = 0

    try:
        for frames in fuzzing.hostile_messages(seed=2026, count=FUZZ_MESSAGES, valid_examples=valid):
            sock.send_multipart(frames)
            sent += 1
            if sent % 200 == 0:
                drain(0)
        deadline = time.monotonic() + 30
        while sum(replies.values()) < sent and time.monotonic() < deadline:
            drain(100)
    finally:
        sock.close()

    assert teacher.popen.poll() is None, teacher.log()  # no crash
    assert sum(replies.values()) == sent  # every message, however broken, got an answer
    assert replies["error"] > FUZZ_MESSAGES // 2
    np.testing.assert_allclose(good.predict({"img": x})["prob"], softmax_np(x), rtol=1e-5)  # still serving
    growth = proc.memory_info().rss - rss_before
    assert growth < 64 * 2**20, f"teacher RSS grew by {growth / 2**20:.1f} MiB"
    good.close()
    print(f"fuzz: {sent} messages, {replies['error']} error replies, teacher RSS "  # noqa: T201
          f"{rss_before / 2**20:.1f} -> {proc.memory_info().rss / 2**20:.1f} MiB")



def test_teacher_refuses_feeds_that_leave_the_byte_order_to_it(start_teacher):
    """A big-endian client's float32 sent as ``f4`` or ``=f4`` (numpy reads both in the reader's order)
    is ``bad_message`` naming the byte order, never a prediction of byte-swapped numbers; ``>f4`` is
    read right and refused for its dtype, and the teacher serves on."""
    teacher = start_teacher()
    x = np.random.default_rng(1).random((2, 784), dtype=np.float32)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(teacher.endpoint)
    good = TeacherClient(teacher.endpoint, timeout=10)
    try:
        for req_id, dtype in enumerate(["f4", "=f4", "|f4", ">f4"], 1):
            head = {"kind": "predict", "id": req_id, wire.ARRAYS_KEY: [["img", dtype, [2, 784]]]}
            sock.send_multipart([msgpack.packb(head), x.astype(">f4").tobytes()])
            reply = wire.decode(sock.recv_multipart())
            assert reply.kind == "error" and reply.header["id"] == req_id, (dtype, reply.header, reply.arrays)
            want = ("bad_request", "dtype >f4") if dtype == ">f4" else ("bad_message", "byte order")
            assert (reply.header["code"], want[1] in reply.header["message"]) == (want[0], True), reply.header
        np.testing.assert_allclose(good.predict({"img": x})["prob"], softmax_np(x), rtol=1e-5)  # still serving
    finally:
        sock.close()
        good.close()


def test_a_bool_feed_reaches_the_model_as_0_and_1(start_teacher):
    """A reader's mask made by ``.view(bool)`` of uint8 0/255 is True to numpy; a model that reads
    its bytes (Paddle casting it to float) got 255.0 for it.  The client sends True as 1, and a
    crafted frame holding another byte is ``bad_message`` naming it, answered by its id."""
    teacher = start_teacher(f"{procs.TEACHERS}:mask_bytes")
    held = np.array([[0, 255, 2, 1], [1, 0, 128, 0]], np.uint8)
    client = TeacherClient(teacher.endpoint, timeout=10)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(teacher.endpoint)
    try:
        assert client.predict({"mask": held.view(bool)})["m"].tolist() == (held != 0).astype(np.float32).tolist()
        head = {"kind": "predict", "id": 5, wire.ARRAYS_KEY: [["mask", "|b1", [2, 4]]]}
        sock.send_multipart([msgpack.packb(head), held.tobytes()])
        reply = wire.decode(sock.recv_multipart())
        assert (reply.kind, reply.header["id"], reply.header["code"]) == ("error", 5, "bad_message"), reply.header
        assert "byte 255" in reply.header["message"]
        assert client.predict({"mask": held != 0})["m"].tolist() == (held != 0).astype(np.float32).tolist()
    finally:
        sock.close()
        client.close()


def test_balancer_survives_10000_hostile_messages(redis_server, tmp_path):
    from tests import daemons

    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    try:
        register = {"kind": "register", "id": 1, "student": "fuzzy", "service": "svc", "max_teachers": 2}
        valid = [
            fuzzing.frames_of(register),
            fuzzing.frames_of({"kind": "heartbeat", "id": 2, "student": "fuzzy", "service": "svc", "max_teachers": 1}),
            fuzzing.frames_of({"kind": "snapshot", "id": 3, "student": "fuzzy"}),
            fuzzing.frames_of({"kind": "status", "id": 4}),
        ]
        proc = psutil.Process(balancer.pid)
        assert daemons.request(balancer.endpoint, register)["kind"] == "assignment"
        rss_before = proc.memory_info().rss
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{balancer.endpoint}")
        replies, sent = 0, 0
        try:
            for frames in fuzzing.hostile_messages(seed=7, count=FUZZ_MESSAGES, valid_examples=valid):
                sock.send_multipart(frames)
                sent += 1
                while sock.poll(0):
                    sock.recv_multipart()
                    replies += 1
            deadline = time.monotonic() + 30
            while replies < sent and time.monotonic() < deadline:
                if sock.poll(100):
                    sock.recv_multipart()
                    replies += 1
        finally:
            sock.close()
        assert balancer.popen.poll() is None, balancer.log()
        # Every message is answered, except those libzmq refuses before the balancer sees them
        # (a frame above its size limit drops the connection): then the count stops short.
        assert replies >= sent * 0.9
        assert daemons.request(balancer.endpoint, {"kind": "status", "id": 9})["kind"] == "status"
        assert daemons.request(balancer.endpoint, register)["kind"] == "assignment"  # still serving
        growth = proc.memory_info().rss - rss_before
        assert growth < 64 * 2**20, f"balancer RSS grew by {growth / 2**20:.1f} MiB"
        print(f"balancer fuzz: {sent} messages, {replies} replies, RSS "  # noqa: T201
              f"{rss_before / 2**20:.1f} -> {proc.memory_info().rss / 2**20:.1f} MiB")
    finally:
        balancer.stop()
