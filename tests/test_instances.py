"""``zdistill-teacher --instances N``: several model instances in one process, against real processes.

What is checked is what a student sees: the same answers whatever N, calls that really
overlap (or, for a function declared not thread-safe, never do), the instances reported
in ``meta`` and ``stats``, and merged batches whose reused input memory never leaks into
a reply.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import procs
from tests.teachers import softmax_np
from zdistill.client import Completion, TeacherClient

TIMEOUT = 10.0
SOFTMAX = f"{procs.TEACHERS}:softmax"


def rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 784)).astype(np.float32)


def pipelined(client: TeacherClient, requests: list[dict[str, np.ndarray]]) -> list[Completion]:
    """Send every request at once; their completions, in the order sent."""
    done = procs.pipelined(client, requests, TIMEOUT)
    assert all(d.error is None for d in done), [d.error for d in done]
    return done


def test_answers_are_bit_for_bit_the_same_whatever_the_instances(start_teacher) -> None:
    """N = 1, 2, 4 serve the same bytes for the same requests (each request its own batch,
    as --max-batch-size equals its rows), and equal the function run here."""
    requests = [{"img": rows(seed, 16)} for seed in range(24)]
    answers = {}
    for n in (1, 2, 4):
        proc = start_teacher(SOFTMAX, "--instances", str(n), "--max-batch-size", "16")
        client = TeacherClient(proc.endpoint, timeout=TIMEOUT)
        try:
            assert client.meta()["instances"] == n
            answers[n] = [d.result["prob"] for d in pipelined(client, requests)]
            stats = client.stats()
            assert len(stats["instance_seconds"]) == n
            assert stats["model_seconds"] == pytest.approx(sum(stats["instance_seconds"]))
        finally:
            client.close()
        proc.stop()
    for n in (2, 4):
        for got, want in zip(answers[n], answers[1], strict=True):
            assert np.array_equal(got, want)
    for feeds, got in zip(requests, answers[1], strict=True):
        np.testing.assert_allclose(got, softmax_np(feeds["img"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, instances, overlap", [
    ("overlap_softmax", 1, 1),
    ("overlap_softmax", 3, 3),
    ("serial_softmax", 3, 1),
])
def test_instances_run_at_once_unless_the_function_is_not_thread_safe(start_teacher, model: str, instances: int,
                                                                      overlap: int) -> None:
    """Each call reports how many calls were running when it began: with N instances and
    work for all, N run at once, and every instance did some; a function declared
    thread_safe=False is never entered twice at once, and says so in meta and the log."""
    proc = start_teacher(f"{procs.TEACHERS}:{model}", "--instances", str(instances), "--max-batch-size", "1",
                         env={"ZDISTILL_TEST_DELAY_MS": "100"})
    client = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        meta = client.meta()
        assert meta["instances"] == instances and meta["thread_safe"] == (model == "overlap_softmax")
        done = pipelined(client, [{"img": rows(seed, 1)} for seed in range(4 * instances)])
        assert max(int(d.result["calls"][0]) for d in done) == overlap
        assert all(seconds > 0 for seconds in client.stats()["instance_seconds"])
    finally:
        client.close()
    if model == "serial_softmax":
        assert "not thread-safe: calls serialised" in proc.log()


def test_a_reply_never_shows_the_next_batch_merged_into_reused_memory(start_teacher) -> None:
    """``echo`` returns its input array itself.  Merged batches are copied into a buffer each
    instance reuses, so a reply must not be a view of that buffer: every request's reply is
    its own input, however many merged batches follow it on the same instance."""
    proc = start_teacher(f"{procs.TEACHERS}:echo", "--instances", "2", "--max-batch-size", "4096")
    client = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        for wave in range(5):
            requests = [{"x": np.full((1024, 4), 100 * wave + i, np.float32)} for i in range(40)]
            for feeds, done in zip(requests, pipelined(client, requests), strict=True):
                assert np.array_equal(done.result["y"], feeds["x"])
        assert client.stats()["merged_batches"] > 0
    finally:
        client.close()


def test_auto_is_one_instance_on_a_cpu_and_two_on_a_gpu(start_teacher) -> None:
    """A Python function served with --gpu-ids reports that GPU, and auto gives it two instances."""
    cpu = start_teacher(SOFTMAX)
    gpu = start_teacher(SOFTMAX, "--gpu-ids", "0")
    for proc, device, instances in ((cpu, "cpu", 1), (gpu, "gpu:0", 2)):
        client = TeacherClient(proc.endpoint, timeout=TIMEOUT)
        try:
            meta = client.meta()
        finally:
            client.close()
        assert (meta["device"], meta["instances"]) == (device, instances)
