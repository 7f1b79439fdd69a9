"""``examples/torch_teacher``: PyTorch teacher functions served by real ``zdistill-teacher`` processes.

Skipped where PyTorch is not installed (CI has none).  The models run in their tiny
sizes on the CPU; the checks are what a GPU run needs too: the served answers are the
model's (compared with the same seeded model run in this process), the top-k are the
full distribution's top k, concurrent calls from several threads do not mix their
buffers, and a student trains on the served top-k.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading
from types import ModuleType

import numpy as np
import pytest

from tests import procs
from zdistill.client import TeacherClient
from zdistill.errors import TeacherError
from zdistill.spec import Ragged
from zdistill.topk import topk_to_dense

torch = pytest.importorskip("torch")

EXAMPLE = procs.REPO / "examples" / "torch_teacher"
TINY = {"ZDISTILL_TORCH_TEACHER_SIZE": "tiny"}


def load(name: str) -> ModuleType:
    """Import an example module in its tiny size (its sizes are read from the environment at import)."""
    key = f"torch_teacher_{name}_tiny"
    if key not in sys.modules:
        saved = os.environ.get("ZDISTILL_TORCH_TEACHER_SIZE")
        os.environ.update(TINY)
        try:
            spec = importlib.util.spec_from_file_location(key, EXAMPLE / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            if saved is None:
                del os.environ["ZDISTILL_TORCH_TEACHER_SIZE"]
            else:
                os.environ["ZDISTILL_TORCH_TEACHER_SIZE"] = saved
        sys.modules[key] = module
    return sys.modules[key]


def full_log_probs(lm: ModuleType, tokens: np.ndarray) -> np.ndarray:
    """The LM's whole next-token distribution, computed here in float64 from the same seeded weights."""
    module = lm.TEACHER.module()
    with torch.inference_mode():
        logits = module.logits(module.hidden(torch.from_numpy(tokens).long()))
        return torch.log_softmax(logits.double(), dim=-1).numpy()


def supports_instances() -> bool:
    from zdistill.teacher.server import build_parser

    return "--instances" in build_parser()._option_string_actions


@pytest.mark.parametrize("instances", [1, 2])
def test_served_lm_teacher_answers_the_top_k_of_its_full_distribution(start_teacher, instances):
    if instances > 1 and not supports_instances():
        pytest.skip("this zdistill-teacher has no --instances")
    lm = load("lm_teacher")
    flags = ["--instances", str(instances)] if instances > 1 else []
    teacher = start_teacher(f"{EXAMPLE}/lm_teacher.py:topk", *flags, env=TINY)
    client = TeacherClient(teacher.endpoint, timeout=30)
    try:
        meta = client.meta()
        assert {f["name"]: (f["dtype"], f["shape"]) for f in meta["feeds"]} == {"tokens": ("int32", [-1])}
        assert {f["name"]: (f["dtype"], f["shape"]) for f in meta["fetches"]} == {
            "topk_logprobs": ("float16", [-1, lm.TOPK]), "topk_indices": ("int32", [-1, lm.TOPK])}
        rng = np.random.default_rng(5)
        rows = [rng.integers(0, lm.VOCAB, n, dtype=np.int32) for n in (lm.SEQ, 1, 7, lm.SEQ - 1, 3, 11)]
        out = client.predict({"tokens": Ragged.from_rows(rows)})
        with pytest.raises(TeacherError, match=f"longer than this model's {lm.SEQ}"):
            client.predict({"tokens": Ragged.from_rows([rows[0], np.zeros(lm.SEQ + 1, np.int32)])})
    finally:
        client.close()
    values, ids = out["topk_logprobs"], out["topk_indices"]
    assert isinstance(values, Ragged) and isinstance(ids, Ragged)
    assert values.dtype == np.float16 and ids.dtype == np.int32
    assert values.lengths.tolist() == ids.lengths.tolist() == [len(r) for r in rows]
    for row, v, i in zip(rows, values.rows(), ids.rows(), strict=True):
        full = full_log_probs(lm, row[None])[0]  # the row alone: no padding can have leaked into its answer
        assert v.shape == i.shape == (len(row), lm.TOPK)
        np.testing.assert_allclose(v, np.take_along_axis(full, i.astype(np.intp), axis=-1), atol=3e-3, rtol=2e-3)
        kth_best = -np.sort(-full, axis=-1)[..., lm.TOPK - 1]
        assert (v.astype(np.float64) >= kth_best[..., None] - 3e-3).all()  # they are the top k (ties aside)
        dense = topk_to_dense(v, i, lm.VOCAB)  # what the student rebuilds: a whole distribution
        np.testing.assert_allclose(np.exp(dense.astype(np.float64)).sum(axis=-1), 1.0, atol=1e-3)


def test_concurrent_calls_from_several_threads_get_their_own_answers():
    """What ``--instances N`` does: the same function from N threads; per-thread buffers must not mix."""
    text = load("text_teacher")
    rng = np.random.default_rng(6)
    batches = [rng.integers(0, text.VOCAB, (rows, text.SEQ), dtype=np.int64) for rows in (3, 17, 64, 33)]
    # copies: an answer is a view of the calling thread's staging buffer, which its next call reuses
    expected = [text.classify({"ids": ids})["logits"].copy() for ids in batches]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(batches))}
    start = threading.Barrier(len(batches), timeout=30)

    def call(i: int) -> None:
        start.wait()
        for _ in range(30):
            results[i].append(text.classify({"ids": batches[i]})["logits"].copy())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for i, got in results.items():
        assert len(got) == 30
        for logits in got:
            np.testing.assert_allclose(logits, expected[i], rtol=1e-4, atol=1e-5)


def test_served_image_teacher_takes_uint8_images(start_teacher):
    image = load("image_teacher")
    teacher = start_teacher(f"{EXAMPLE}/image_teacher.py:classify", env=TINY)
    imgs = np.random.default_rng(7).integers(0, 256, (5, 3, image.IMAGE, image.IMAGE), dtype=np.uint8)
    client = TeacherClient(teacher.endpoint, timeout=30)
    try:
        logits = client.predict({"img": imgs})["logits"]
        with pytest.raises(TeacherError, match="dtype float32, the model wants uint8"):
            client.predict({"img": imgs.astype(np.float32)})
    finally:
        client.close()
    assert logits.shape == (5, image.CLASSES) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, image.classify({"img": imgs})["logits"], rtol=1e-3, atol=1e-4)


def test_student_trains_on_the_served_top_k(start_teacher):
    """A tiny teacher; the student, without ZDISTILL_TORCH_TEACHER_SIZE, takes its size from the teacher's meta."""
    teacher = start_teacher(f"{EXAMPLE}/lm_teacher.py:topk", env=TINY)
    env = {k: v for k, v in os.environ.items() if k != "ZDISTILL_TORCH_TEACHER_SIZE"}
    env["PYTHONPATH"] = os.pathsep.join([str(procs.REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "student_lm.py"), "--teacher", teacher.endpoint.removeprefix("tcp://"),
         "--steps", "40", "--batch", "8"],
        env=env, cwd=str(procs.REPO), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = re.search(r"first 10 steps ([\d.]+), last 10 steps ([\d.]+)", done.stdout)
    assert summary, done.stdout
    first_kl, last_kl = float(summary[1]), float(summary[2])
    assert last_kl < 0.95 * first_kl, summary[0]  # it learns from the teacher's top-k
    assert procs.requests_served(teacher) >= 1
