"""Teachers served by a real Triton Inference Server (PyTriton's tritonserver, on CPU).

Every test runs a real server process (``tests/triton_teacher.py``: a numpy softmax
behind Triton's dynamic batcher, ``max_batch_size`` 16 so that zdistill's requests must
be split), real workers, and, where the balancer is in play, a real redis-server,
balancer and register.  The tritonserver is SIGKILLed mid-epoch where the test says
so; each epoch is checked whole: every sample once, in the reader's order, with the
model's prediction.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests import daemons, procs
from tests.procs import run_epoch
from tests.teachers import W, softmax_np
from tests.tritons import start_triton
from zdistill import ConfigError, DistillReader, TeacherError
from zdistill.client import teacher_endpoint
from zdistill.errors import ErrorCode, TeacherTimeout

N, B = 2000, 50

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(23).random((N, 784), dtype=np.float32)


@pytest.fixture
def tritons(tmp_path):
    """Factory of Triton servers (the test is skipped, saying why, where none can run), every one
    stopped (its whole process group) at the end."""
    started = []

    def _start(**kw):
        teacher = start_triton(tmp_path, **kw)
        started.append(teacher)
        return teacher

    yield _start
    for teacher in started:
        teacher.stop()


def make_reader(x: np.ndarray, ins=("img", "label")) -> DistillReader:
    dr = DistillReader(ins=list(ins), predicts=["prob"])
    dr.set_batch_generator(lambda: ((x[i:i + B], np.arange(i, min(N, i + B))) for i in range(0, N, B)))
    dr.options.task_rows = 2 * B  # more tasks than the one Triton model holds at once: some are in flight at a kill
    return dr



def check_epoch(batches: list, x: np.ndarray) -> None:
    labels = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(N))  # nothing lost, nothing twice, in order
    probs = np.concatenate([b[2] for b in batches])
    np.testing.assert_allclose(probs, softmax_np(x), rtol=1e-5, atol=1e-6)


def test_addresses():
    assert teacher_endpoint(" TRITON://127.0.0.1:8001/softmax/2/ ") == "triton://127.0.0.1:8001/softmax/2"
    assert teacher_endpoint("triton://[::1]:8001/my-model.v2") == "triton://[::1]:8001/my-model.v2"
    for bad, says in [("triton://127.0.0.1:8001", "is not triton://HOST:PORT/MODEL"),
                      ("triton://127.0.0.1:8001/a/b", "is not triton://"),
                      ("triton://127.0.0.1:0/m", "is not triton://"),
                      ("triton://127.0.0.1:8001/m/0", "version is 1 or more")]:
        with pytest.raises(ConfigError, match=says):
            DistillReader(ins=["img"], predicts=["prob"]).set_fixed_teacher(["127.0.0.1:9292", bad])
    with pytest.raises(ConfigError, match="is a teacher"):
        DistillReader(ins=["img"], predicts=["prob"]).set_dynamic_teacher("triton://127.0.0.1:8001/m", "svc")


def test_a_triton_teacher_alone_killed_mid_epoch_and_restarted(tritons, data):
    """The only teacher's tritonserver dies mid-epoch: its tasks wait, and the epoch ends whole once a
    server is back on the same ports (the worker reconnects by itself)."""
    victim = tritons(delay_ms=2)
    revived = []

    def kill_and_restart():
        victim.kill_server()
        victim.stop()  # the rest of its process group, so that its ports are free
        revived.append(tritons(grpc_port=victim.grpc_port, http_port=victim.http_port, delay_ms=2))

    with make_reader(data) as dr:
        dr.set_fixed_teacher(victim.address)
        dr.options.teacher_wait = 120
        check_epoch(run_epoch(dr), data)
        check_epoch(run_epoch(dr, at=5, action=kill_and_restart), data)
        stats = dr.stats()
    assert revived[0].ready()
    assert stats.get("returned", 0) + stats.get("resent", 0) + stats.get("resend_all", 0) > 0, stats


def test_a_triton_teacher_beside_a_zdistill_teacher_killed_mid_epoch(tritons, start_teacher, data, tmp_path):
    """Mixed teachers share the epoch; the tritonserver's SIGKILL sends its tasks to the zdistill-teacher.

    The kill comes while the victim provably holds work: its worker is up before the second epoch, in
    which the victim holds the batches it gets unanswered (its hold file); the kill waits for its word
    that it holds one, and no straggler resend may take its tasks away first, so only the kill can
    complete the epoch."""
    hold = tmp_path / "hold"
    victim = tritons(delay_ms=5, hold_file=hold)
    keep = start_teacher(f"{procs.TEACHERS}:slow_softmax", env={"ZDISTILL_TEST_DELAY_MS": "5"})
    killed: list[BaseException | None] = []

    def kill_once_it_holds_a_request():
        try:
            procs.wait_for(lambda: Path(f"{hold}.held").exists(), 60, "the victim holding a request", victim.popen)
            victim.kill_server()
            killed.append(None)
        except BaseException as exc:  # re-raised by the test, once the epoch is over
            killed.append(exc)
        finally:
            hold.unlink(missing_ok=True)  # PyTriton's process answers what it held, to no server

    with make_reader(data) as dr:
        dr.set_fixed_teacher([victim.address, keep.endpoint])
        check_epoch(run_epoch(dr), data)
        assert procs.requests_served(keep) > 0
        # Its worker may still be connecting (the first epoch can end without it): up, it gets tasks at once.
        procs.wait_for(lambda: dr.stats()["teachers"].get(victim.address, {}).get("up"), 60, "the victim up")
        before = dr.stats()
        dr.options.straggler_min = 240.0  # the victim's tasks go elsewhere only once it is killed
        hold.touch()
        killer = threading.Thread(target=kill_once_it_holds_a_request, daemon=True)
        killer.start()
        try:
            batches = run_epoch(dr)
        finally:
            hold.unlink(missing_ok=True)
            killer.join(90)
        assert killed and killed[0] is None, killed
        check_epoch(batches, data)
        stats = dr.stats()
    returned = stats["teachers"][victim.address]["returned"] - before["teachers"][victim.address]["returned"]
    assert returned > 0, stats  # what it held when killed went to the other teacher
    assert stats["straggler_resends"] == before["straggler_resends"], stats


def test_a_triton_teacher_through_register_and_balancer(tritons, redis_server, store, tmp_path, stopper, data):
    """``zdistill-register --server triton://...`` puts it in Redis, the balancer hands it to a student
    (``set_dynamic_teacher``), and an unloaded model is deregistered at once."""
    teacher = tritons()
    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(balancer)
    reg = daemons.start_register(redis_server.endpoint, "svc", teacher.address, tmp_path, ttl=30)
    stopper.append(reg)
    rec = store.get_teacher("svc", teacher.address)
    assert rec is not None and rec.max_batch_size == 16 and [f["name"] for f in rec.feeds] == ["img"]
    with make_reader(data) as dr:
        dr.set_dynamic_teacher(balancer.endpoint, "svc")
        check_epoch(run_epoch(dr), data)
    teacher.unload()
    # The TTL is 30 s: only the register's removal can take the record away this soon.
    procs.wait_for(lambda: store.get_teacher("svc", teacher.address) is None, 10, "deregistration", reg.popen)
    assert "says it does not serve" in reg.log()


def test_slots_that_do_not_fit_the_model_get_the_zdistill_teachers_messages(tritons, start_teacher):
    """The student is checked against Triton's inputs by the same code as against a zdistill-teacher."""
    triton = tritons()
    zteacher = start_teacher()
    said = {}
    for address in (triton.address, zteacher.endpoint):
        with DistillReader(ins=["image", "label"], predicts=["prob"]) as dr:  # the model's input is "img"
            dr.set_sample_list_generator(lambda: iter([[(np.zeros(784, np.float32), 0)]]))
            dr.set_fixed_teacher(address)
            with pytest.raises(ConfigError) as info:
                list(dr())
            said[address] = str(info.value).replace(address, "ADDRESS")
        with DistillReader(ins=["img"], predicts=["prob"]) as dr:  # rows of 783 values, not 784
            dr.set_sample_list_generator(lambda: iter([[(np.zeros(783, np.float32),)] * 4]))
            dr.set_fixed_teacher(address)
            with pytest.raises(ConfigError) as info:
                list(dr())
            said[address, "shape"] = str(info.value).replace(address, "ADDRESS")
    assert "needs feeds ['img'], which are not among ins" in said[triton.address]
    assert said[triton.address] == said[zteacher.endpoint]
    assert "783" in said[triton.address, "shape"] and "784" in said[triton.address, "shape"]
    assert said[triton.address, "shape"] == said[zteacher.endpoint, "shape"]


def test_invalid_argument_is_a_clear_error_naming_model_and_input(tritons):
    """Triton's INVALID_ARGUMENT is a fatal ``bad_request`` naming the model and the inputs sent;
    an unloaded model is a refused ping and an unavailable teacher."""
    from zdistill.triton_client import TritonClient

    teacher = tritons()
    client = TritonClient(teacher.address, timeout=20)
    try:
        with pytest.raises(TeacherError) as info:
            client.predict({"img": np.zeros((3, 783), np.float32)})
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert "model 'softmax'" in str(info.value) and "img float32 [3, 783]" in str(info.value)
        with pytest.raises(TeacherError, match="batch-size must be <= 16"):
            client.predict({"img": np.zeros((17, 784), np.float32)})
        x = np.random.default_rng(1).random((16, 784), dtype=np.float32)
        np.testing.assert_allclose(client.predict({"img": x})["prob"], softmax_np(x), rtol=1e-5, atol=1e-6)
        client.ping()
        teacher.unload()
        with pytest.raises(TeacherError, match="not ready"):
            client.ping()
        with pytest.raises(TeacherTimeout, match="unavailable"):
            client.predict({"img": x})
    finally:
        client.close()


def test_zdistill_ping(tritons):
    teacher = tritons()

    def ping() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zdistill.cli", "ping", "teacher", teacher.address],
                              capture_output=True, text=True, timeout=60, cwd=str(procs.REPO),
                              env={"PYTHONPATH": str(procs.REPO), "PATH": "/usr/bin:/bin"})

    assert ping().returncode == 0
    teacher.unload()
    result = ping()
    assert result.returncode == 1 and "not ready" in result.stderr, result.stderr


def test_the_cache_keys_a_triton_model_by_name_version_and_fingerprint(tritons, tmp_path, data):
    """A second epoch is answered from the cache; another version of the model under the same name
    (another model_id, other answers) is never served the first one's."""
    cache = tmp_path / "cache"
    first = tritons(version=1)
    with make_reader(data) as dr:
        dr.set_fixed_teacher(first.address + "/1")
        dr.set_teacher_cache(cache)
        check_epoch(run_epoch(dr), data)
        check_epoch(run_epoch(dr), data)
        assert dr.stats()["cache"]["hits"] >= N - 10  # the second epoch, but for the rows audited
    first.stop()
    second = tritons(version=2, grpc_port=first.grpc_port, http_port=first.http_port)  # scales its logits by 2
    with make_reader(data) as dr:
        dr.set_fixed_teacher(second.address)
        dr.set_teacher_cache(cache)
        probs = np.concatenate([b[2] for b in run_epoch(dr)])
        assert dr.stats()["cache"]["hits"] == 0
    z = data @ W * 2
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_a_version_loaded_on_the_running_server_is_never_cached_as_the_one_before(tritons, tmp_path, data):
    """Without a version in the address a Triton teacher is the latest one ready: a new version
    loaded while the server runs (no connection drops, no request fails) is another model.  Its
    answers must never be filed in the cache under the first version's model_id, or a reader pinned
    to that version later gets them from the cache as its own (the audit samples too few rows to
    tell)."""
    cache, swap = tmp_path / "cache", tmp_path / "swap"
    teacher = tritons(next_version_file=swap)
    fresh = np.random.default_rng(29).random((N, 784), dtype=np.float32)
    rows = data.copy()  # the reader's rows: this epoch's, then fresh ones
    with make_reader(rows) as dr:
        dr.set_fixed_teacher(teacher.address)
        dr.set_teacher_cache(cache)
        check_epoch(run_epoch(dr), data)  # version 1's answers, cached under triton:softmax:1
        swap.touch()
        procs.wait_for(lambda: Path(f"{swap}.loaded").exists(), 120, "version 2 loaded", teacher.popen)
        rows[:] = fresh
        probs = np.concatenate([b[2] for b in run_epoch(dr)])
    z = fresh @ W * 2
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)  # the latest's
    teacher.stop()
    # Rows the cache has from version 1 first: the epoch's audit (its first task with cached rows, then
    # one in AUDIT_EVERY) finds them right, and any row filed wrongly after them would be served.
    mixed = np.concatenate([data[:N // 2], fresh[:N // 2]])
    first = tritons(version=1)
    with make_reader(mixed) as dr:
        dr.set_fixed_teacher(first.address + "/1")
        dr.set_teacher_cache(cache)
        check_epoch(run_epoch(dr), mixed)  # version 1's answers to the fresh rows, never version 2's
        assert dr.stats()["cache"]["hits"] >= N // 2 - 10  # version 1's own rows still come from the cache


def test_every_numeric_dtype_comes_back_as_the_model_computed_it_row_by_row(tritons):
    """Model ``dtypes`` (``tests/triton_teacher.py``) takes FP16, INT8, UINT8, BOOL and INT32 rows and
    answers in those types and INT64, its outputs declared in another order than the student asks
    them: each sample gets its own row back, of the model's dtype, bit for bit (bytes read as
    another type, a row of another sample, a wrap-around lost all show).  Tasks of 100 rows go in
    requests of the model's max_batch_size 8, and the reader's int64 slot is the model's INT32."""
    teacher = tritons(dtypes=True, max_batch_size=8)
    procs.wait_for(lambda: teacher.http("/v2/models/dtypes/ready") == 200, 60, "model 'dtypes'", teacher.popen)
    rng, rows = np.random.default_rng(5), 600
    x = {"h": (rng.standard_normal((rows, 4)) * 100).astype(np.float16),
         "i8": rng.integers(-128, 128, (rows, 3), dtype=np.int8),
         "u8": rng.integers(0, 256, (rows, 3), dtype=np.uint8),
         "b": rng.random((rows, 2)) < 0.5,
         "n": rng.integers(-2**31, 2**31, (rows, 2), dtype=np.int64)}
    want = {"h2": x["h"] * np.float16(2), "i8_neg": -x["i8"], "u8_inc": x["u8"] + np.uint8(1), "b_not": ~x["b"],
            "n64": x["n"] * 3 + 2**33}
    predicts = ["h2", "i8_neg", "u8_inc", "b_not", "n64"]
    with DistillReader(ins=list(x), predicts=predicts) as dr:
        dr.set_batch_generator(lambda: (tuple(v[i:i + B] for v in x.values()) for i in range(0, rows, B)))
        dr.options.task_rows = 2 * B
        dr.set_fixed_teacher(f"triton://127.0.0.1:{teacher.grpc_port}/dtypes")
        batches = run_epoch(dr)
    for k, name in enumerate([*x, *predicts]):
        got, expected = np.concatenate([b[k] for b in batches]), {**x, **want}[name]
        assert got.dtype == expected.dtype, (name, got.dtype)
        np.testing.assert_array_equal(got, expected, err_msg=name)


ADDRESS = "triton://127.0.0.1:8001/m"


def _described(inputs: list, outputs: list | None = None, max_batch_size: int = 8, **config):
    from zdistill.triton_client import TritonModel

    outputs = outputs if outputs is not None else [{"name": "y", "datatype": "FP32", "shape": ["-1", "3"]}]
    metadata = {"name": "m", "versions": ["1", "3"], "platform": "onnxruntime_onnx", "inputs": inputs,
                "outputs": outputs}
    return TritonModel.describe(ADDRESS, metadata, {"max_batch_size": max_batch_size, **config})


@pytest.mark.parametrize(("inputs", "max_batch_size", "says"), [
    ([{"name": "ids", "datatype": "INT64", "shape": ["-1", "-1"]}], 8, "input 'ids' has a variable first dimension"),
    ([{"name": "text", "datatype": "BYTES", "shape": ["-1", "1"]}], 8, "input 'text' is BYTES"),
    ([{"name": "x", "datatype": "FP32", "shape": ["4", "3"]}], 0, "does not batch"),
], ids=["ragged", "bytes", "no-batch"])
def test_a_model_zdistill_cannot_feed_is_a_config_error_naming_the_tensor(inputs, max_batch_size, says):
    with pytest.raises(ConfigError, match=says) as info:
        _described(inputs, max_batch_size=max_batch_size)
    assert "model 'm' of teacher triton://127.0.0.1:8001/m" in str(info.value)


def test_a_model_described_as_a_teacher_meta():
    from zdistill.spec import TeacherMeta, TensorSpec

    model = _described([{"name": "x", "datatype": "FP16", "shape": ["-1", "4", "-1"]}],
                       instance_group=[{"kind": "KIND_GPU", "count": 2}, {"kind": "KIND_GPU", "count": 1}])
    meta = TeacherMeta.parse(model.meta())
    assert meta.feeds == [TensorSpec("x", "float16", (4, -1))] and meta.fetches == [TensorSpec("y", "float32", (3,))]
    assert (meta.max_batch_size, meta.instances, meta.device, meta.model_id) == (8, 3, "gpu", "triton:m:3")
    unbatched = _described([{"name": "x", "datatype": "INT32", "shape": ["-1", "2"]}], max_batch_size=0)
    assert unbatched.max_batch_size == 2**31 - 1 and unbatched.feeds == [TensorSpec("x", "int32", (2,))]


def test_the_store_takes_triton_addresses_in_their_normal_form():
    from zdistill.discovery.store import is_address

    assert is_address("triton://127.0.0.1:8001/m") and is_address("triton://10.0.0.7:8001/resnet50/3")
    assert not is_address("TRITON://127.0.0.1:8001/m") and not is_address("triton://127.0.0.1:8001")
