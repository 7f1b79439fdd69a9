"""``zdistill-teacher`` against real processes: answers, batching, errors, shutdown, CLI.

Every test talks to a real ``zdistill-teacher`` process over TCP, serving the numpy teachers
of :mod:`tests.teachers`, so what is checked is what a student would see: the wire, the
ROUTER loop, the dynamic batcher and the signal handling together.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from tests import procs
from tests.teachers import softmax_np
from zdistill import wire
from zdistill.client import TeacherClient
from zdistill.errors import TeacherError
from zdistill.spec import TensorSpec
from zdistill.teacher.model import Model
from zdistill.teacher.server import TeacherServer

TIMEOUT = 10.0  # seconds; every blocking call in this file is bounded by it
SOFTMAX = f"{procs.TEACHERS}:softmax"
SLOW = f"{procs.TEACHERS}:slow_softmax"
FRAGILE = f"{procs.TEACHERS}:fragile_softmax"
RTOL, ATOL = 1e-5, 1e-6  # float32 matmul differs slightly between batch sizes (BLAS blocking)

# A teacher with two feeds, written to a file at test time: it is the only way to test
# rows that disagree across feeds, and it exercises the ``file.py:function`` model form.
TWO_FEED_SOURCE = '''
import numpy as np
import zdistill

@zdistill.teacher_function(
    feeds={"a": ("float32", [3]), "b": ("int64", [-1])},
    fetches={"s": ("float32", [])},
)
def add(batch):
    """a.sum + b.sum per row."""
    return {"s": batch["a"].sum(axis=1) + batch["b"].sum(axis=1)}
'''


def rows(seed: int, n: int) -> np.ndarray:
    """Distinct inputs per seed, so a reply sent to the wrong request is visibly wrong."""
    return np.random.default_rng(seed).standard_normal((n, 784)).astype(np.float32)


def collect_all(clients: dict[int, TeacherClient], expected: dict[int, set[int]], timeout: float = TIMEOUT) -> dict:
    """Collect completions from several clients until each has answered every id it submitted."""
    got: dict[tuple[int, int], object] = {}
    end = time.monotonic() + timeout
    while any(ids - {i for (c, i) in got if c == k} for k, ids in expected.items()):
        assert time.monotonic() < end, "teacher did not answer every request in time"
        for k, client in clients.items():
            for done in client.collect(wait=0.01):
                got[(k, done.req_id)] = done
    return got


@pytest.fixture(scope="module")
def softmax_teacher(tmp_path_factory) -> Iterator[procs.Proc]:
    """One plain softmax teacher shared by the tests that only send it requests."""
    proc = procs.start_teacher(SOFTMAX, tmp_path_factory.mktemp("softmax"), "--max-batch-size", "64")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def fragile_teacher(tmp_path_factory) -> Iterator[procs.Proc]:
    proc = procs.start_teacher(FRAGILE, tmp_path_factory.mktemp("fragile"), "--max-delay-ms", "500")
    yield proc
    proc.stop()


@pytest.fixture
def client(softmax_teacher) -> Iterator[TeacherClient]:
    c = TeacherClient(softmax_teacher.endpoint, timeout=TIMEOUT)
    yield c
    c.close()


@pytest.fixture
def raw(softmax_teacher) -> Iterator[zmq.Socket]:
    """A bare DEALER to send bytes no TeacherClient would ever produce."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
    sock.connect(softmax_teacher.endpoint)
    yield sock
    sock.close()


def assert_still_serving(client: TeacherClient) -> None:
    x = rows(99, 3)
    np.testing.assert_allclose(client.predict({"img": x})["prob"], softmax_np(x), rtol=RTOL, atol=ATOL)


# -- the good path ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 64])
def test_predict_equals_the_numpy_function(client, n: int) -> None:
    x = rows(n, n)
    out = client.predict({"img": x})
    assert set(out) == {"prob"}
    assert out["prob"].shape == (n, 10) and out["prob"].dtype == np.float32
    np.testing.assert_allclose(out["prob"], softmax_np(x), rtol=RTOL, atol=ATOL)


def test_meta_describes_the_model(client) -> None:
    meta = client.meta()
    assert meta["kind"] == "meta"
    assert meta["feeds"] == [{"name": "img", "dtype": "float32", "shape": [784]}]
    assert meta["fetches"] == [{"name": "prob", "dtype": "float32", "shape": [10]}]
    assert meta["max_batch_size"] == 64
    assert meta["max_delay_ms"] == 0
    assert meta["device"] == "cpu"
    assert meta["instances"] == 1 and meta["thread_safe"] is True  # auto: one instance on a CPU
    assert meta["max_message_bytes"] == 128 * 2**20 and meta["max_queue_bytes"] == 512 * 2**20
    assert "teachers.py:softmax" in meta["description"] and "softmax(img @ W)" in meta["description"]
    counters = {"requests", "rows", "batches", "merged_batches", "max_batch_rows", "model_seconds", "queued", "errors",
                "instance_seconds", "held_bytes", "dropped_replies"}
    assert counters <= set(meta["stats"])
    assert len(meta["stats"]["instance_seconds"]) == 1


def test_ping(client) -> None:
    """ping answers (and a teacher's socket is bound only once its model has run)."""
    client.ping(timeout=TIMEOUT)
    header = client.call("ping", timeout=TIMEOUT).header
    assert header is not None and header["kind"] == "pong" and isinstance(header["id"], int)


def test_file_model_with_two_feeds(start_teacher, tmp_path) -> None:
    """``path/file.py:function`` loads; variable-size feeds; rows must agree across feeds.

    Pipelined requests with different widths of ``b`` and feeds in either order are merged
    only with requests whose rows really have the same shapes, feed by feed."""
    model = tmp_path / "two_feed.py"
    model.write_text(TWO_FEED_SOURCE)
    proc = start_teacher(f"{model}:add", "--max-delay-ms", "100")
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        a = np.arange(6, dtype=np.float32).reshape(2, 3)
        expected: dict[int, np.ndarray] = {}
        for i, width in enumerate((1, 1, 4, 4, 2)):
            b = np.full((2, width), width, dtype=np.int64)
            feeds = {"a": a, "b": b} if i % 2 else {"b": b, "a": a}  # the order must not matter
            expected[c.submit("predict", feeds)] = a.sum(1) + width * width
        got = collect_all({0: c}, {0: set(expected)})
        for req_id, want in expected.items():
            assert got[(0, req_id)].error is None, got[(0, req_id)].error
            np.testing.assert_allclose(got[(0, req_id)].result["s"], want)
        stats = c.stats()
        assert stats["batches"] == 3 and stats["merged_batches"] == 2  # widths 1+1, 4+4, and 2 alone
        assert "errors" in stats and not stats["errors"]
        with pytest.raises(TeacherError, match="same number") as info:
            c.predict({"a": a, "b": np.ones((3, 2), dtype=np.int64)})
        assert info.value.code == "bad_request"
        np.testing.assert_allclose(c.predict({"a": a, "b": np.ones((2, 2), np.int64)})["s"], a.sum(1) + 2)
    finally:
        c.close()


def test_a_request_over_max_message_mb_in_all_its_arrays_is_too_large(start_teacher, tmp_path) -> None:
    """--max-message-mb bounds all arrays of a request together, not each one: two arrays
    each under the bound but over it together get too_large; a smaller request is served."""
    model = tmp_path / "two_feed.py"
    model.write_text(TWO_FEED_SOURCE)
    proc = start_teacher(f"{model}:add", "--max-message-mb", str(2000 / 2**20))  # 2000 bytes
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        a = np.ones((20, 3), np.float32)  # 240 bytes
        with pytest.raises(TeacherError, match="more than the teacher's --max-message-mb") as info:
            c.predict({"a": a, "b": np.ones((20, 12), np.int64)})  # + 1920 bytes
        assert info.value.code == "too_large"
        np.testing.assert_allclose(c.predict({"a": a, "b": np.ones((20, 2), np.int64)})["s"], 5.0)
    finally:
        c.close()


def test_the_readme_teacher_function_runs_as_pasted(start_teacher, tmp_path) -> None:
    """The README's ``teacher_function`` example, copied into a file as it stands, is served."""
    readme = (procs.REPO / "README.md").read_text()
    section = readme[readme.index("### `zdistill-teacher`"):]
    start = section.index("```python\n") + len("```python\n")
    snippet = textwrap.dedent(section[start : section.index("```", start)])
    (tmp_path / "readme_teacher.py").write_text(snippet)
    proc = start_teacher(f"{tmp_path / 'readme_teacher.py'}:predict")
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        prob = c.predict({"img": rows(5, 3)})["prob"]
    finally:
        c.close()
    assert prob.shape == (3, 10)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)


# -- the dynamic batcher --------------------------------------------------------------------------


def run_concurrent(endpoint: str, n_clients: int, per_client: int, n_rows: int) -> dict:
    """Several clients, each with all its requests in flight at once; checks every row it gets back."""
    clients = {k: TeacherClient(endpoint, timeout=TIMEOUT) for k in range(n_clients)}
    try:
        sent: dict[tuple[int, int], np.ndarray] = {}
        for j in range(per_client):
            for k, c in clients.items():
                x = rows(1000 * k + j, n_rows)
                sent[(k, c.submit("predict", {"img": x}))] = x
        expected = {k: {i for (c, i) in sent if c == k} for k in clients}
        got = collect_all(clients, expected)
        for key, x in sent.items():
            done = got[key]
            assert done.error is None, done.error
            np.testing.assert_allclose(done.result["prob"], softmax_np(x), rtol=RTOL, atol=ATOL)
        return clients[0].stats(timeout=TIMEOUT)
    finally:
        for c in clients.values():
            c.close()


def test_batcher_merges_concurrent_requests_and_splits_them_back(start_teacher) -> None:
    """While the (slow) model runs, the others' requests queue up and go together in the next call."""
    proc = start_teacher(SLOW, env={"ZDISTILL_TEST_DELAY_MS": "20"})
    stats = run_concurrent(proc.endpoint, n_clients=4, per_client=6, n_rows=2)
    assert stats["requests"] == 24 and stats["rows"] == 48
    assert stats["merged_batches"] > 0
    assert stats["batches"] < stats["requests"]
    assert stats["max_batch_rows"] > 2
    assert stats["model_seconds"] >= stats["batches"] * 0.020  # every call sleeps 20 ms: the teacher's busy time


def test_max_delay_waits_to_fill_a_batch(start_teacher) -> None:
    """With --max-delay-ms the first request waits for the others: one batch for all of them."""
    proc = start_teacher(SOFTMAX, "--max-delay-ms", "500")
    stats = run_concurrent(proc.endpoint, n_clients=3, per_client=2, n_rows=3)
    assert stats["batches"] == 1 and stats["merged_batches"] == 1 and stats["max_batch_rows"] == 18


def test_max_batch_size_caps_the_merge(start_teacher) -> None:
    proc = start_teacher(SLOW, "--max-batch-size", "4", env={"ZDISTILL_TEST_DELAY_MS": "20"})
    stats = run_concurrent(proc.endpoint, n_clients=3, per_client=4, n_rows=2)
    assert stats["merged_batches"] > 0 and stats["max_batch_rows"] == 4


def test_max_batch_size_1_merges_nothing(start_teacher) -> None:
    proc = start_teacher(SLOW, "--max-batch-size", "1", env={"ZDISTILL_TEST_DELAY_MS": "5"})
    stats = run_concurrent(proc.endpoint, n_clients=3, per_client=5, n_rows=1)
    assert stats["requests"] == stats["batches"] == 15
    assert stats["merged_batches"] == 0 and stats["max_batch_rows"] == 1


# -- bad requests: an error reply with the right code, then business as usual ---------------------

X3 = np.zeros((3, 784), np.float32)
BAD_REQUESTS = {
    "unknown kind": ("bogus", {"img": X3}, "bad_request", "unknown request kind"),
    "unknown feed": ("predict", {"img": X3, "extra": X3}, "bad_request", "unknown ['extra']"),
    "missing feed": ("predict", {}, "bad_request", "missing ['img']"),
    "wrong feed name": ("predict", {"image": X3}, "bad_request", "missing ['img']"),
    "wrong dtype": ("predict", {"img": X3.astype(np.float64)}, "bad_request", "dtype float64"),
    "byte-swapped dtype": ("predict", {"img": X3.astype(">f4")}, "bad_request", "dtype"),
    "wrong row shape": ("predict", {"img": np.zeros((3, 783), np.float32)}, "bad_request", "shape [783]"),
    "extra row axis": ("predict", {"img": np.zeros((3, 784, 1), np.float32)}, "bad_request", "shape [784, 1]"),
    "0-d feed": ("predict", {"img": np.float32(1.0)}, "bad_request", "rows"),
    "zero rows": ("predict", {"img": np.zeros((0, 784), np.float32)}, "bad_request", "rows"),
    "rows over max batch": ("predict", {"img": np.zeros((65, 784), np.float32)}, "too_large", "65 rows"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_request_gets_an_error_reply(client, case) -> None:
    kind, arrays, code, text = case
    with pytest.raises(TeacherError) as info:
        client.call(kind, arrays)
    assert info.value.code == code
    assert text in str(info.value)
    assert_still_serving(client)


GARBAGE = {
    "random bytes": [b"\x00\xffnot msgpack at all"],
    "header not a map": [msgpack.packb([1, 2, 3])],
    "no arrays table": [msgpack.packb({"kind": "predict", "id": 1})],
    "truncated array frame": [
        msgpack.packb({"kind": "predict", "id": 1, "arrays": [["img", "<f4", [1, 784]]]}),
        b"\x00" * 100,
    ],
    "object dtype": [
        msgpack.packb({"kind": "predict", "id": 1, "arrays": [["img", "|O", [1]]]}),
        b"\x00" * 8,
    ],
    "huge declared shape": [
        msgpack.packb({"kind": "predict", "id": 1, "arrays": [["img", "<f4", [2**40, 784]]]}),
        b"",
    ],
    "too many frames": [msgpack.packb({"kind": "predict", "arrays": []}), *([b"x"] * 80)],
}


@pytest.mark.parametrize("frames", list(GARBAGE.values()), ids=list(GARBAGE))
def test_malformed_message_gets_bad_message(raw, client, frames: list[bytes]) -> None:
    raw.send_multipart(frames)
    reply = wire.decode(raw.recv_multipart(copy=False))  # RCVTIMEO bounds the wait
    assert reply.kind == "error" and reply.header["code"] == "bad_message"
    assert reply.header["message"]
    assert_still_serving(client)


@pytest.mark.parametrize("kind", ["predict", "meta", "stats", "ping"])
def test_wrongly_typed_field_gets_bad_request(raw, client, kind: str) -> None:
    """A request whose ``id`` is no int, string or nil is refused by its type, and the teacher serves on."""
    arrays = {"img": rows(1, 2)} if kind == "predict" else None
    raw.send_multipart(wire.encode({"kind": kind, "id": [1.5]}, arrays))
    reply = wire.decode(raw.recv_multipart(copy=False))  # RCVTIMEO bounds the wait
    assert reply.kind == "error" and reply.header["code"] == "bad_request"
    assert reply.header["id"] is None and "$.id" in reply.header["message"]
    assert_still_serving(client)


def test_model_exception_becomes_model_error(fragile_teacher) -> None:
    c = TeacherClient(fragile_teacher.endpoint, timeout=TIMEOUT)
    try:
        x = rows(1, 4)
        x[2, 7] = np.nan
        with pytest.raises(TeacherError, match="FloatingPointError: NaN in the input") as info:
            c.predict({"img": x})
        assert info.value.code == "model_error"
        assert_still_serving(c)
    finally:
        c.close()


def test_one_bad_request_in_a_merged_batch_spares_the_others(fragile_teacher) -> None:
    """The model fails on the merged batch; the teacher reruns each request alone, so only the
    request holding the NaN gets model_error and its batch-mates get their own correct rows."""
    clients = {k: TeacherClient(fragile_teacher.endpoint, timeout=TIMEOUT) for k in range(3)}
    try:
        before = clients[0].stats(timeout=TIMEOUT)
        sent: dict[tuple[int, int], np.ndarray] = {}
        for k, c in clients.items():
            for j in range(2):
                x = rows(10 * k + j, 3)
                if (k, j) == (1, 0):
                    x[1, 0] = np.nan
                sent[(k, c.submit("predict", {"img": x}))] = x
        got = collect_all(clients, {k: {i for (c, i) in sent if c == k} for k in clients})
        after = clients[0].stats(timeout=TIMEOUT)
        assert after["batches"] - before["batches"] == 1, "the requests were not merged into one batch"
        assert after["merged_batches"] - before["merged_batches"] == 1
        for key, x in sent.items():
            done = got[key]
            if np.isnan(x).any():
                assert isinstance(done.error, TeacherError) and done.error.code == "model_error"
            else:
                assert done.error is None, done.error
                np.testing.assert_allclose(done.result["prob"], softmax_np(x), rtol=RTOL, atol=ATOL)
        assert after["errors"].get("model_error", 0) - before["errors"].get("model_error", 0) == 1
    finally:
        for c in clients.values():
            c.close()


# -- shutdown -----------------------------------------------------------------------------------


def test_sigterm_answers_what_runs_refuses_what_waits_and_exits_0(start_teacher) -> None:
    """On SIGTERM the batch running is answered; the requests queued behind it, and one sent
    after the teacher has started refusing, get ``shutting_down`` (a client resends them
    elsewhere at once); none is lost; then the process exits with status 0.

    Order of events, each awaited, none slept for: eight 1-row requests reach a teacher that
    runs one per 100 ms; the first answer shows the model busy with the next one and the
    rest queued; SIGTERM follows at once; the first refusal proves the teacher refuses, so a
    request sent then must be refused too.
    """
    proc = start_teacher(SLOW, "--max-batch-size", "1", "--instances", "1", env={"ZDISTILL_TEST_DELAY_MS": "100"})
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        sent = {c.submit("predict", {"img": rows(j, 1)}): rows(j, 1) for j in range(8)}
        done = {d.req_id: d for d in c.collect(wait=TIMEOUT)}
        assert done, "no answer to the first request"
        proc.popen.send_signal(signal.SIGTERM)
        late: int | None = None
        end = time.monotonic() + TIMEOUT
        while len(done) < len(sent) + (late is not None) and time.monotonic() < end:
            done.update({d.req_id: d for d in c.collect(wait=0.1)})
            refused = any(d.error is not None for d in done.values())
            if late is None and refused:
                late = c.submit("predict", {"img": rows(0, 1)})
        codes = []
        for req_id, x in sent.items():
            assert req_id in done, "a request was never answered"
            if done[req_id].error is None:
                np.testing.assert_allclose(done[req_id].result["prob"], softmax_np(x), rtol=RTOL, atol=ATOL)
            else:
                assert isinstance(done[req_id].error, TeacherError), done[req_id].error
                codes.append(done[req_id].error.code)
        assert codes and set(codes) == {"shutting_down"}, codes
        assert len(codes) >= 4, "the queued requests were run, not refused"
        assert late in done, "the late request got no reply"
        assert isinstance(done[late].error, TeacherError) and done[late].error.code == "shutting_down"
        assert proc.popen.wait(TIMEOUT) == 0
        assert "FatalError" not in proc.log()
    finally:
        c.close()


def test_sigterm_when_idle_exits_0(start_teacher) -> None:
    proc = start_teacher(SOFTMAX)
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(TIMEOUT) == 0


# -- the model id -------------------------------------------------------------------------------

# A teacher declaring a version, written to files at test time with one comment line changed.
VERSIONED_SOURCE = '''
import zdistill

# {comment}
@zdistill.teacher_function(feeds={{"x": ("float32", [2])}}, fetches={{"y": ("float32", [2])}},
                           version="doubler 2024-06")
def double(batch):
    return {{"y": batch["x"] * 2}}
'''


def served_model_id(proc: procs.Proc) -> str:
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        return c.meta()["model_id"]
    finally:
        c.close()


def test_model_id_is_a_hash_of_the_teacher_file(softmax_teacher, start_teacher, tmp_path) -> None:
    """The same file served again gives the same model_id; a copy with one line changed gives
    another; the startup log names it."""
    first = served_model_id(softmax_teacher)
    assert re.fullmatch(r"py:[0-9a-f]{32}", first), first
    assert f"(model_id {first}, device cpu" in softmax_teacher.log()
    assert served_model_id(start_teacher(SOFTMAX)) == first
    source = procs.TEACHERS.read_text()
    assert source.count("* 0.05") == 1
    edited = tmp_path / "teachers_edited.py"
    edited.write_text(source.replace("* 0.05", "* 0.06"))
    other = served_model_id(start_teacher(f"{edited}:softmax"))
    assert re.fullmatch(r"py:[0-9a-f]{32}", other) and other != first


def test_version_keeps_the_model_id_across_edits_and_model_id_flag_overrides(start_teacher, tmp_path) -> None:
    """version= gives "version:" + the version, whatever else the file holds; --model-id (up to
    256 printable characters, spaces and non-ASCII letters included) overrides it."""
    ids = []
    for comment in ("first", "second"):
        model = tmp_path / f"doubler_{comment}.py"
        model.write_text(VERSIONED_SOURCE.format(comment=comment))
        ids.append(served_model_id(start_teacher(f"{model}:double")))
    assert ids == ["version:doubler 2024-06"] * 2
    chosen = "doubler für Schüler " + "x" * 236
    assert len(chosen) == 256
    proc = start_teacher(f"{tmp_path / 'doubler_first.py'}:double", "--model-id", chosen)
    assert served_model_id(proc) == chosen
    assert f"(model_id {chosen}, device cpu" in proc.log()


EXEC_SOURCE = """
import zdistill
@zdistill.teacher_function(feeds={"x": ("float32", [1])}, fetches={"y": ("float32", [1])})
def f(batch):
    return {"y": batch["x"] * 2 if "a" in {"a", "b", "c"} else batch["x"]}
"""

EXEC_MODEL_ID = (
    "import sys\nfrom zdistill.teacher.model import CallableModel\nns = {}\nexec(sys.argv[1], ns)\n"
    "print(CallableModel(ns['f'], 'f').model_id)"
)


def test_model_id_without_a_source_file_and_of_two_functions_in_one_file() -> None:
    """A function with no source file (made by exec) is hashed by its code: the same code gives
    the same id in every process, whatever the string hash seed; another constant gives
    another.  Two functions of one file get two ids."""
    from zdistill.teacher.loading import load_model

    def exec_ids(source: str, seeds: tuple[str, ...]) -> set[str]:
        got = set()
        for seed in seeds:
            env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(procs.REPO)}
            result = subprocess.run([sys.executable, "-c", EXEC_MODEL_ID, source], capture_output=True, text=True,
                                    timeout=60, cwd=str(procs.REPO), env=env)
            assert result.returncode == 0, result.stderr
            got.add(result.stdout.strip())
        return got

    same = exec_ids(EXEC_SOURCE, ("1", "2"))
    assert len(same) == 1 and re.fullmatch(r"py:[0-9a-f]{32}", next(iter(same))), same
    assert exec_ids(EXEC_SOURCE.replace("* 2", "* 3"), ("1",)).isdisjoint(same)
    assert load_model("tests.teachers:softmax").model_id != load_model("tests.teachers:slow_softmax").model_id


# -- the command line -----------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zdistill.teacher.server", "--port", "0", "--host", "127.0.0.1", *args],
        capture_output=True, text=True, timeout=timeout, cwd=str(procs.REPO),
    )


@pytest.mark.parametrize(
    "model, says",
    [
        (f"{procs.TEACHERS}:no_such_function", "no callable named 'no_such_function'"),
        (f"{procs.TEACHERS}:softmax_np", "does not declare its feeds and fetches"),
        ("zdistill_no_such_module_xyz:fn", "cannot import module 'zdistill_no_such_module_xyz'"),
        ("/nonexistent/dir/file.py:fn", "does not exist"),
        ("/nonexistent/model/prefix", "no saved Paddle model"),
        (str(procs.TEACHERS), f"is a Python file: name the teacher function too, as {procs.TEACHERS}:function"),
        (f"{procs.TEACHERS}:", f"names no function: give it after the colon, as {procs.TEACHERS}:function"),
    ],
    ids=["no function", "undeclared function", "no module", "no file", "no paddle model", "file without function",
         "file and colon without function"],
)
def test_cli_rejects_a_bad_model_with_exit_2(model: str, says: str) -> None:
    result = run_cli("--model", model)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


BROKEN_MODELS = {
    "raises at import": ("import numpy\nraise RuntimeError('boom at import')\n", "boom at import"),
    "declares an object feed": (
        "import zdistill\n"
        "@zdistill.teacher_function(feeds={'x': ('object', [1])}, fetches={'y': ('float32', [1])})\n"
        "def fn(batch):\n    return {'y': batch['x']}\n",
        "dtype object is not allowed on the wire",
    ),
    "fails its first run": (
        "import zdistill\n"
        "@zdistill.teacher_function(feeds={'x': ('float32', [1])}, fetches={'y': ('float32', [1])})\n"
        "def fn(batch):\n    return {}\n",
        "returned no output 'y' (only [])",
    ),
    "declares an empty version": (
        "import zdistill\n"
        "@zdistill.teacher_function(feeds={'x': ('float32', [1])}, fetches={'y': ('float32', [1])}, version='')\n"
        "def fn(batch):\n    return {'y': batch['x']}\n",
        "teacher_function's version must be 1 to 248 printable characters",
    ),
}


@pytest.mark.parametrize("source, says", list(BROKEN_MODELS.values()), ids=list(BROKEN_MODELS))
def test_cli_rejects_a_model_file_that_cannot_serve(tmp_path: Path, source: str, says: str) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text(source)
    result = run_cli("--model", f"{broken}:fn")
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr


BAD_FLAGS = {
    "max batch 0": (["--max-batch-size", "0"], "max batch size must be at least 1"),
    "gpu ids not numbers": (["--gpu-ids", "zero"], "--gpu-ids must be a comma list"),
    "0 instances": (["--instances", "0"], "--instances must be auto or a count from 1 to 64"),
    "instances not a number": (["--instances", "many"], "--instances must be auto or a count"),
    "message over the queue": (["--max-message-mb", "64", "--max-queue-mb", "32"], "raise --max-queue-mb"),
    "queue of 0": (["--max-queue-mb", "0"], "must be positive"),
    "empty model id": (["--model-id", ""], "--model-id must be 1 to 256 printable characters"),
    "model id too long": (["--model-id", "x" * 257], "--model-id must be 1 to 256 printable characters"),
    "model id with a newline": (["--model-id", "v1\nv2"], "--model-id must be 1 to 256 printable characters"),
}


@pytest.mark.parametrize("flags, says", list(BAD_FLAGS.values()), ids=list(BAD_FLAGS))
def test_cli_rejects_bad_flags_with_exit_2(flags: list[str], says: str) -> None:
    result = run_cli("--model", SOFTMAX, *flags)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_port_in_use_is_a_clear_error(softmax_teacher) -> None:
    """A second teacher on a taken port says so and exits 2, instead of a ZMQError traceback."""
    port = softmax_teacher.endpoint.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "zdistill.teacher.server", "--model", SOFTMAX, "--host", "127.0.0.1", "--port", port],
        capture_output=True, text=True, timeout=60, cwd=str(procs.REPO),
    )
    assert result.returncode == 2, result.stderr
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


class BrokenDescriptionModel:
    """A model whose ``description`` raises: a bug met while answering ``meta``, not while running."""

    feeds = [TensorSpec("x", "float32", (2,))]
    fetches = [TensorSpec("y", "float32", (2,))]
    device = "cpu"
    thread_safe = True
    model_id = "broken-description"

    @property
    def description(self) -> str:
        raise RuntimeError("this model cannot describe itself")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": feeds["x"] * 2}

    def clone(self) -> BrokenDescriptionModel:
        return self


@contextmanager
def served_here(model: Model, timeout: float = TIMEOUT) -> Iterator[tuple[TeacherServer, TeacherClient]]:
    """``model`` served by a TeacherServer in a thread of this process, and a client to it; on exit both
    are closed and the serving thread must have ended within ``timeout``."""
    ctx = zmq.Context()
    server = TeacherServer([model], "tcp://127.0.0.1:0", context=ctx)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    client = TeacherClient(server.endpoint, context=ctx, timeout=timeout, curve=None)
    try:
        yield server, client
    finally:
        client.close()
        server.stop()
        thread.join(timeout)
        ctx.destroy(linger=0)
    assert not thread.is_alive()


def test_a_bug_while_handling_a_request_costs_that_request_only() -> None:
    """The crash policy: an unforeseen exception becomes ``internal`` for its request; the teacher serves on."""
    with served_here(BrokenDescriptionModel()) as (server, client):
        with pytest.raises(TeacherError) as info:
            client.meta()
        assert info.value.code == "internal" and "RuntimeError" in str(info.value)
        out = client.predict({"x": np.ones((3, 2), np.float32)})
        np.testing.assert_array_equal(out["y"], np.full((3, 2), 2, np.float32))
        assert server.stats()["errors"] == {"internal": 1}
