"""Smoke tests of ``examples/mnist_distill``: the demo's pipeline on a tiny slice, in seconds.

The key check: the soft labels the distilled student trained on are the served
teacher's outputs for exactly those images (compared with the exported model run
here, in the test process), joined to the right labels, every image once per epoch.
Every process started here is stopped by PID (fixtures, or the demo's own cleanup,
which the last test verifies).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import signal
import subprocess
import sys
from types import ModuleType

import numpy as np
import pytest

from tests import procs

EXAMPLE = procs.REPO / "examples" / "mnist_distill"
HAVE_PADDLE = importlib.util.find_spec("paddle") is not None
HAVE_DEMO_DEPS = all(importlib.util.find_spec(m) is not None for m in ("sklearn", "tqdm", "matplotlib"))
needs_paddle = pytest.mark.skipif(not (HAVE_PADDLE and HAVE_DEMO_DEPS),
                                  reason="the example needs paddlepaddle, scikit-learn, tqdm and matplotlib")
N_TRAIN, N_TEST, EPOCHS = 96, 32, 2


def example(name: str) -> ModuleType:
    """Import one of the example's modules (they import each other by plain name)."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    return __import__(name)


# -- data, no Paddle needed ------------------------------------------------------------


def write_idx(path: str, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files_are_read_plain_or_gzipped(tmp_path):
    data = example("data")
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (5, 28, 28)), "train_labels": rng.integers(0, 10, 5),
              "test_images": rng.integers(0, 256, (3, 28, 28)), "test_labels": rng.integers(0, 10, 3)}
    for i, (key, name) in enumerate(data.MNIST_FILES.items()):
        write_idx(str(tmp_path / (name + (".gz" if i % 2 else ""))), arrays[key])
    digits = data.load_data(str(tmp_path))
    assert digits.x_train.shape == (5, 1, 28, 28) and digits.x_train.dtype == np.float32
    np.testing.assert_allclose(digits.x_train[:, 0], arrays["train_images"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(digits.y_test, arrays["test_labels"])
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        os.remove(tmp_path / (data.MNIST_FILES["test_labels"] + ".gz"))
        data.load_data(str(tmp_path))


# -- the distillation pipeline against a real teacher process ------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A teacher CNN trained for one epoch on a tiny slice and exported like the demo does."""
    if not (HAVE_PADDLE and HAVE_DEMO_DEPS):
        pytest.skip("the example needs paddlepaddle, scikit-learn, tqdm and matplotlib")
    data, train_teacher = example("data"), example("train_teacher")
    digits = data.load_data().subset(N_TRAIN, N_TEST)
    model, _ = train_teacher.train_teacher(digits, epochs=1, progress=False)
    prefix = train_teacher.export_teacher(model, str(tmp_path_factory.mktemp("teacher") / "model"), digits.image_shape)
    return digits, model, prefix


def reference_predictor(prefix: str):
    """The exported model run in this process with plain ``paddle.inference`` (not zdistill's code)."""
    from paddle import inference

    config = inference.Config(prefix + ".json", prefix + ".pdiparams")
    config.disable_gpu()
    config.disable_glog_info()
    predictor = inference.create_predictor(config)

    def run(img: np.ndarray) -> np.ndarray:
        handle = predictor.get_input_handle(predictor.get_input_names()[0])
        handle.reshape(list(img.shape))
        handle.copy_from_cpu(np.ascontiguousarray(img))
        predictor.run()
        return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()

    return run


@needs_paddle
def test_distilled_student_trains_on_the_teachers_outputs(tiny_teacher, start_teacher):
    from zdistill import DistillReader
    from zdistill.client import TeacherClient

    digits, model, prefix = tiny_teacher
    ds, models = example("distill_student"), example("models")
    teacher = start_teacher(prefix, "--threads", "1")
    batches: list[list[np.ndarray]] = []
    with DistillReader(ins=["img", "label"], predicts=[ds.TEACHER_OUTPUT]) as dr:
        dr.set_fixed_teacher(teacher.endpoint.split("://")[-1])
        _, hist = ds.train_student_distilled(digits, dr, epochs=EPOCHS, batch_size=16, record=batches,
                                             progress=False)

    assert hist.samples == EPOCHS * N_TRAIN and len(hist.epoch_test_acc) == EPOCHS
    assert [len(b[0]) for b in batches] == [16] * (EPOCHS * N_TRAIN // 16)  # the reader's own batch sizes
    img = np.concatenate([b[0] for b in batches])
    label = np.concatenate([b[1] for b in batches]).reshape(-1)
    prob = np.concatenate([b[2] for b in batches])
    assert img.shape == (EPOCHS * N_TRAIN, 1, 8, 8) and prob.shape == (EPOCHS * N_TRAIN, 10)
    assert prob.dtype == np.float32

    # every training image once per epoch, with its own label (labels never left the student)
    flat_train = digits.x_train.reshape(N_TRAIN, -1)
    index = {row.tobytes(): i for i, row in enumerate(flat_train)}
    assert len(index) == N_TRAIN, "the tiny slice has duplicate images; pick another slice"
    which = np.array([index[row.tobytes()] for row in img.reshape(len(img), -1)])
    for epoch in range(EPOCHS):
        assert sorted(which[epoch * N_TRAIN : (epoch + 1) * N_TRAIN]) == list(range(N_TRAIN))
    np.testing.assert_array_equal(label, digits.y_train[which])

    # the soft labels are the teacher's outputs for those very images
    np.testing.assert_allclose(prob, reference_predictor(prefix)(img), rtol=1e-4, atol=1e-6)
    dygraph = models.predict(models.ServedTeacher(model), img)
    np.testing.assert_allclose(prob, dygraph, rtol=1e-4, atol=1e-5)
    assert not np.allclose(prob, np.eye(10, dtype=np.float32)[label]), "soft labels must not be the hard labels"

    # ... and they came over the wire from the teacher process, not from a local model
    client = TeacherClient(teacher.endpoint, timeout=10)
    try:
        assert client.stats()["rows"] >= EPOCHS * N_TRAIN
    finally:
        client.close()


@needs_paddle
def test_soften_equals_tempered_softmax_of_the_logits():
    models = example("models")
    logits = np.random.default_rng(3).normal(0, 4, (50, 10)).astype(np.float64)

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    for temperature in (1.0, 2.0, 4.0):
        np.testing.assert_allclose(models.soften(softmax(logits).astype(np.float32), temperature),
                                   softmax(logits / temperature), rtol=1e-4, atol=1e-6)


def run_demo(script: str, *args: str, timeout: float = 120.0) -> str:
    """Run one of the example's scripts to completion; on a timeout SIGTERM it (it stops its children)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(procs.REPO), os.environ.get("PYTHONPATH", "")])}
    demo = subprocess.Popen([sys.executable, str(EXAMPLE / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=str(procs.REPO))
    try:
        output, _ = demo.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGTERM)
        try:
            output, _ = demo.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            demo.kill()
            output, _ = demo.communicate()
        pytest.fail(f"{script} {' '.join(args)} did not finish in {timeout:.0f} s:\n{output[-3000:]}")
    assert demo.returncode == 0, output[-3000:]
    return output


def assert_gone(pids: list[int]) -> None:
    """Each PID is gone, and reaped (``kill(pid, 0)`` still succeeds on a zombie)."""
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@needs_paddle
def test_demo_tiny_runs_end_to_end_and_stops_its_teacher(tmp_path):
    out = tmp_path / "out"
    output = run_demo("demo.py", "--tiny", "--out", str(out))
    for row in ("teacher (CNN)", "student alone (MLP)", "student distilled (MLP)", "samples/s"):
        assert row in output
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "teacher" / "model.json").exists()
    assert_gone([int(pid) for pid in re.findall(r"\(pid (\d+)", output)])


@needs_paddle
@pytest.mark.skipif(procs.redis_server_path() is None, reason="redis-server is not installed")
def test_dynamic_demo_carries_on_after_losing_a_teacher(tmp_path):
    output = run_demo("demo_dynamic.py", "--tiny", "--out", str(tmp_path / "out"), timeout=180)
    assert "removed teacher-2" in output
    assert re.search(r"trained on ([\d,]+) samples \(expected \1:", output), output[-2000:]
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", output)]
    assert len(pids) == 6  # redis, balancer, 2 teachers, 2 registers
    assert_gone(pids)
