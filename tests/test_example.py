"""Smoke tests of ``examples/mnist_distill``: the demo's pipeline on a tiny slice, in seconds.

The key check: the soft labels the distilled student trained on are the served
teacher's outputs for exactly those images (compared with the exported model run
here, in the test process), joined to the right labels, every image once per epoch.
Every process started here is stopped by PID (fixtures, or the demo's own cleanup,
which the last test verifies).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
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


def test_labeled_subset_is_stratified_fixed_and_checked():
    data = example("data")
    y = np.repeat(np.arange(10), [40, 41, 39, 40, 40, 38, 42, 40, 40, 20])
    picked = data.labeled_subset(y, 0.05, seed=0)
    assert np.array_equal(picked, data.labeled_subset(y, 0.05, seed=0)), "the same seed must pick the same images"
    assert not np.array_equal(picked, data.labeled_subset(y, 0.05, seed=1))
    counts = np.bincount(y[picked], minlength=10)
    assert counts.min() >= 1 and counts.max() <= 2  # 5% of each class, at least one each
    assert len(np.unique(picked)) == len(picked)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="labeled fraction"):
            data.labeled_subset(y, bad)


def test_digits_know_which_labels_the_student_has():
    data = example("data")
    digits = data.load_data(labeled_fraction=0.1)
    n = len(digits.y_train)
    known = digits.student_labels
    assert len(digits.y_labeled) == np.count_nonzero(known != data.UNLABELED)
    assert 0.09 * n < len(digits.y_labeled) < 0.11 * n
    np.testing.assert_array_equal(known[digits.labeled_index], digits.y_train[digits.labeled_index])
    assert set(np.unique(known)) == set(range(10)) | {data.UNLABELED}
    tiny = digits.subset(200, 50)
    assert 10 <= len(tiny.y_labeled) <= 30 and len(tiny.student_labels) == 200
    assert len(data.load_data(labeled_fraction=1.0).y_labeled) == n


def test_augment_makes_fresh_label_preserving_views():
    data = example("data")
    x = data.load_data().x_train[:200]
    rng = np.random.default_rng(0)
    plain = data.Augment(rotation=0, scale=0, shift=0, elastic=0, noise=0, share=1)
    np.testing.assert_array_equal(plain(x, rng), x)  # no distortion: the image itself
    a, b = data.AUGMENT(x, rng), data.AUGMENT(x, rng)
    assert a.shape == x.shape and a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
    assert not np.allclose(a, b), "each call must draw new views"
    # the views still show their digit: the nearest class mean (of the plain images) mostly names it
    digits = data.load_data()
    means = np.stack([digits.x_train[digits.y_train == k].reshape(-1, 64).mean(axis=0) for k in range(10)])

    def nearest_mean(v: np.ndarray) -> np.ndarray:
        return ((v.reshape(len(v), 1, 64) - means[None]) ** 2).sum(axis=2).argmin(axis=1)

    y = digits.y_train[:200]
    assert (nearest_mean(x) == y).mean() > 0.85
    every_view = dataclasses.replace(data.AUGMENT, share=1.0)
    assert (nearest_mean(every_view(x, rng)) == y).mean() > 0.42  # (random images: ~0.1, turned up to 90 deg: ~0.3)
    assert 0.3 < np.mean([np.array_equal(u, v) for u, v in zip(a, x, strict=True)]) < 0.7  # half are plain


def epoch_of_seven(reader) -> list[tuple[np.ndarray, np.ndarray]]:
    """The samples of one epoch of ``reader``: 7 samples, each labeled with its row, 5 a batch, 30 an epoch.

    Checks the epoch is made of fresh passes, so every sample comes as often as it can be.
    """
    batches = list(reader())
    assert len(reader) == 6 and [len(b) for b in batches] == [5] * 6
    labels = np.array([label[0] for batch in batches for _, label in batch])
    assert sorted(np.bincount(labels)) == [4, 4, 4, 4, 4, 5, 5]
    return [sample for batch in batches for sample in batch]


def test_a_few_labeled_images_fill_an_epoch_of_all_images():
    data = example("data")
    x = np.arange(7 * 4, dtype=np.float32).reshape(7, 1, 2, 2)
    reader = data.SampleListReader(x, np.arange(7), batch_size=5, samples_per_epoch=30, seed=3)
    for img, label in epoch_of_seven(reader):
        np.testing.assert_array_equal(img, x[label[0]])  # images stay with their labels
    with pytest.raises(ValueError, match="at least one image"):
        data.SampleListReader(x[:0], np.arange(0), batch_size=5)


# -- losses and the verdict ---------------------------------------------------------------


@needs_paddle
def test_hard_loss_covers_only_the_labeled_rows():
    import paddle

    models, data = example("models"), example("data")
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (6, 10)).astype(np.float32)
    soft = rng.dirichlet(np.ones(10), 6).astype(np.float32)
    label = np.array([3, data.UNLABELED, 7, data.UNLABELED, data.UNLABELED, 0], dtype=np.int64)[:, None]

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    soft_part = -(soft * log_softmax(logits)).sum(axis=1).mean()
    hard_part = -log_softmax(logits)[[0, 2, 5], [3, 7, 0]].mean()
    loss = models.distill_loss(paddle.to_tensor(logits), paddle.to_tensor(soft), label, 1.0, 0.25)
    np.testing.assert_allclose(float(loss), 0.75 * soft_part + 0.25 * hard_part, rtol=1e-5)
    none_known = np.full_like(label, data.UNLABELED)
    loss = models.distill_loss(paddle.to_tensor(logits), paddle.to_tensor(soft), none_known, 1.0, 0.25)
    np.testing.assert_allclose(float(loss), 0.75 * soft_part, rtol=1e-5)


def test_verdict_reports_the_gain_and_the_seeds_honestly():
    report = example("report")
    helped = report.verdict([0.90, 0.91, 0.905], [0.95, 0.96, 0.955], 360)
    assert helped.startswith("Distillation helped the student: +5.00 points (+18.0 of 360 test images)")
    assert "every distilled seed beat every seed alone (0.9500 > 0.9100)" in helped
    overlap = report.verdict([0.90, 0.905, 0.93], [0.925, 0.96, 0.965], 360)
    assert overlap.startswith("Distillation helped") and "the seeds overlap" in overlap
    tie = report.verdict([0.9667, 0.9667, 0.9694], [0.9639, 0.9750, 0.9639], 360)
    assert tie.startswith("No measurable gain from distillation: +0.00 points")
    hurt = report.verdict([0.95, 0.95, 0.96], [0.90, 0.91, 0.90], 360)
    assert hurt.startswith("Distillation hurt the student") and "every seed alone beat every distilled seed" in hurt


# -- the distillation pipeline against a real teacher process ------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A teacher (two CNNs averaged) trained for one epoch on a tiny slice and exported like the demo does."""
    if not (HAVE_PADDLE and HAVE_DEMO_DEPS):
        pytest.skip("the example needs paddlepaddle, scikit-learn, tqdm and matplotlib")
    data, train_teacher = example("data"), example("train_teacher")
    digits = data.load_data().subset(N_TRAIN, N_TEST)
    model, _ = train_teacher.train_teachers(digits, epochs=1, members=2, progress=False)
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


def distill_tiny(digits, teacher_endpoint: str, augment) -> tuple[list[list[np.ndarray]], object]:
    """Train the demo's distilled student on ``digits`` for ``EPOCHS`` epochs; returns every batch it trained on."""
    from zdistill import DistillReader

    ds = example("distill_student")
    batches: list[list[np.ndarray]] = []
    with DistillReader(ins=["img", "label"], predicts=[ds.TEACHER_OUTPUT]) as dr:
        dr.set_fixed_teacher(teacher_endpoint.split("://")[-1])
        _, hist = ds.train_student_distilled(digits, dr, epochs=EPOCHS, batch_size=16, record=batches,
                                             augment=augment, progress=False)
    assert hist.samples == EPOCHS * N_TRAIN and len(hist.epoch_test_acc) == EPOCHS
    assert [len(b[0]) for b in batches] == [16] * (EPOCHS * N_TRAIN // 16)  # the reader's own batch sizes
    return batches, hist


@needs_paddle
def test_distilled_student_trains_on_the_teachers_outputs(tiny_teacher, start_teacher):
    from zdistill.client import TeacherClient

    digits, model, prefix = tiny_teacher
    models, data = example("models"), example("data")
    teacher = start_teacher(prefix, "--threads", "1")
    batches, _ = distill_tiny(digits, teacher.endpoint, augment=None)
    img = np.concatenate([b[0] for b in batches])
    label = np.concatenate([b[1] for b in batches]).reshape(-1)
    prob = np.concatenate([b[2] for b in batches])
    assert img.shape == (EPOCHS * N_TRAIN, 1, 8, 8) and prob.shape == (EPOCHS * N_TRAIN, 10)
    assert prob.dtype == np.float32

    # every training image once per epoch, with the label the student has for it (labels never left the student)
    flat_train = digits.x_train.reshape(N_TRAIN, -1)
    index = {row.tobytes(): i for i, row in enumerate(flat_train)}
    assert len(index) == N_TRAIN, "the tiny slice has duplicate images; pick another slice"
    which = np.array([index[row.tobytes()] for row in img.reshape(len(img), -1)])
    for epoch in range(EPOCHS):
        assert sorted(which[epoch * N_TRAIN : (epoch + 1) * N_TRAIN]) == list(range(N_TRAIN))
    np.testing.assert_array_equal(label, digits.student_labels[which])
    assert 0 < np.count_nonzero(label != data.UNLABELED) < len(label) / 4  # a few labeled images, most not

    # the soft labels are the teacher's outputs for those very images
    np.testing.assert_allclose(prob, reference_predictor(prefix)(img), rtol=1e-4, atol=1e-6)
    dygraph = models.predict(model, img)
    np.testing.assert_allclose(prob, dygraph, rtol=1e-4, atol=1e-5)
    each = [models.predict(models.ServedTeacher([net]), img) for net in model.nets]
    assert len(each) == 2 and not np.allclose(each[0], each[1], atol=1e-3)
    np.testing.assert_allclose(prob, np.mean(each, axis=0), rtol=1e-4, atol=1e-5)  # the served mean of the CNNs
    known = label != data.UNLABELED
    assert not np.allclose(prob[known], np.eye(10, dtype=np.float32)[label[known]]), "soft labels must not be hard"

    # ... and they came over the wire from the teacher process, not from a local model
    client = TeacherClient(teacher.endpoint, timeout=10)
    try:
        assert client.stats()["rows"] >= EPOCHS * N_TRAIN
    finally:
        client.close()


@needs_paddle
def test_the_teacher_labels_each_fresh_augmented_view(tiny_teacher, start_teacher):
    digits, _, prefix = tiny_teacher
    data = example("data")
    teacher = start_teacher(prefix, "--threads", "1")
    batches, _ = distill_tiny(digits, teacher.endpoint, augment=data.AUGMENT)
    img = np.concatenate([b[0] for b in batches])
    label = np.concatenate([b[1] for b in batches]).reshape(-1)
    prob = np.concatenate([b[2] for b in batches])
    train = {row.tobytes() for row in digits.x_train.reshape(N_TRAIN, -1)}
    plain = np.array([row.tobytes() in train for row in img.reshape(len(img), -1)])
    assert 0.25 < plain.mean() < 0.75, "about half the views are distorted (data.AUGMENT.share)"
    views = [{row.tobytes() for row in epoch[~flags]}
             for epoch, flags in zip(img.reshape(EPOCHS, N_TRAIN, -1), plain.reshape(EPOCHS, N_TRAIN), strict=True)]
    assert not views[0] & views[1], "each epoch must bring new views"
    for epoch in range(EPOCHS):  # every image's label once per epoch, unlabeled ones included
        assert sorted(label[epoch * N_TRAIN : (epoch + 1) * N_TRAIN]) == sorted(digits.student_labels)
    np.testing.assert_allclose(prob, reference_predictor(prefix)(img), rtol=1e-4, atol=1e-6)


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


def run_demo(script: str, *args: str, timeout: float = 120.0, folder: Path = EXAMPLE) -> str:
    """Run one of the example's scripts (``folder``: another example's) to completion; on a timeout SIGTERM it.

    The demos stop their children on SIGTERM.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(procs.REPO), os.environ.get("PYTHONPATH", "")])}
    demo = subprocess.Popen([sys.executable, str(folder / script), *args], stdout=subprocess.PIPE,
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


def final_bar_accuracies(output: str, name: str) -> list[float]:
    """The test accuracy each ``name`` progress bar showed last, one per training run, in order."""
    starts = list(re.finditer(r"(teacher \d+/\d+|student alone|student distilled):   0%", output))
    ends = [m.start() for m in starts[1:]] + [len(output)]
    return [float(re.findall(r"test acc (\d\.\d{4})", output[m.start() : end])[-1])
            for m, end in zip(starts, ends, strict=True) if m.group(1) == name]


def assert_gone(pids: list[int]) -> None:
    """Each PID is gone, and reaped (``kill(pid, 0)`` still succeeds on a zombie)."""
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@needs_paddle
def test_demo_tiny_runs_end_to_end_and_stops_its_teacher(tmp_path):
    out = tmp_path / "out"
    output = run_demo("demo.py", "--tiny", "--seeds", "2", "--out", str(out))
    for row in ("teacher (3 CNNs)", "student alone (MLP)", "student distilled (MLP)", "samples/s"):
        assert row in output
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "teacher" / "model.json").exists()
    assert_gone([int(pid) for pid in re.findall(r"\(pid (\d+)", output)])

    results = json.loads((out / "results.json").read_text())
    assert isinstance(results["scenario"], str) and "labels for" in results["scenario"]
    assert 0.0 <= results["teacher"]["accuracy"] <= 1.0
    for arm in ("student_alone", "student_distilled"):
        accs = results[arm]["accuracies"]
        assert len(accs) == 2 and all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs)
    alone, distilled = results["student_alone"]["accuracies"], results["student_distilled"]["accuracies"]
    assert results["gain_points"] == pytest.approx(100 * (np.mean(distilled) - np.mean(alone)))
    assert results["every_distilled_seed_above_every_alone_seed"] == (min(distilled) > max(alone))
    assert results["data"]["labeled_images"] < results["data"]["train_images"] == 256
    assert results["student_alone"]["samples_per_seed"] == results["student_distilled"]["samples_per_seed"]
    # ... and are those each training run ended with (its progress bar's last test accuracy)
    for arm, bar in (("student_alone", "student alone"), ("student_distilled", "student distilled")):
        assert [round(a, 4) for a in results[arm]["accuracies"]] == final_bar_accuracies(output, bar)
    # the verdict line is printed as written, and its numbers are the run's
    assert f"  {results['verdict']}\n" in output
    assert re.search(r"Distillation (helped|hurt) the student|No measurable gain from distillation",
                     results["verdict"])
    assert f"{results['gain_points']:+.2f} points" in results["verdict"]


@needs_paddle
@pytest.mark.skipif(procs.redis_server_path() is None, reason="redis-server is not installed")
def test_dynamic_demo_carries_on_after_losing_a_teacher(tmp_path):
    output = run_demo("demo_dynamic.py", "--tiny", "--out", str(tmp_path / "out"), timeout=180)
    assert "removed teacher-2" in output
    assert re.search(r"trained on ([\d,]+) samples \(expected \1:", output), output[-2000:]
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", output)]
    assert len(pids) == 6  # redis, balancer, 2 teachers, 2 registers
    assert_gone(pids)
