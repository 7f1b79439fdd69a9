"""``examples/mnist_distill/train_with_fleet.py`` under Paddle's launcher: 2 data-parallel trainers, real teachers.

Each trainer is a process the launcher starts, with its own ``DistillReader`` over its
shard; the teachers are real ``zdistill-teacher`` processes serving a numpy function
(fixed addresses, or found through a real balancer and Redis).  The trainers write
what they did to ``trainer_RANK.json``; the checks: every sample of the epoch seen
exactly once across the trainers, each trainer answered by teachers for every sample it
trained on, and the parameters equal on both trainers after the first step (and
different from where they started).  The launcher is stopped by PID (it stops its
trainers), and the trainers' PIDs are checked gone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import daemons, procs

EXAMPLE = procs.REPO / "examples" / "mnist_distill"
TEACHER = f"{procs.TEACHERS}:digits_softmax"
SERVICE = "digits"
TINY = 256  # train_with_fleet.py --tiny: the first 256 training images, 1 epoch
needs_paddle = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("paddle", "sklearn", "tqdm")),
    reason="the example needs paddlepaddle, scikit-learn and tqdm")


def example(name: str):
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    return __import__(name)


# -- the sharding, no Paddle needed ------------------------------------------------------


def test_shards_cover_each_epoch_once_in_the_same_number_of_batches():
    data = example("data")
    x = np.arange(67 * 4, dtype=np.float32).reshape(67, 1, 2, 2)
    y = np.arange(67) % 10
    single = data.ShardReader(x, y, batch_size=8, seed=5)
    single.epoch = 3
    whole = [np.concatenate([s[2] for s in batch]) for batch in single()]
    for world in (2, 3):
        shards = [data.ShardReader(x, y, batch_size=8, rank=r, world=world, seed=5) for r in range(world)]
        for reader in shards:
            reader.epoch = 3
        batches = [list(reader()) for reader in shards]
        assert {len(b) for b in batches} == {len(single)} == {len(shards[0])}  # the same steps on every trainer
        for step, together in enumerate(whole):
            parts = [np.concatenate([s[2] for s in b[step]]) for b in batches]
            assert all(len(p) for p in parts) and max(map(len, parts)) - min(map(len, parts)) <= 1
            np.testing.assert_array_equal(np.concatenate(parts), together)  # the one-process batch, split
        for b in batches:
            for batch in b:
                for img, label, index in batch:
                    np.testing.assert_array_equal(img, x[index[0]])
                    assert label[0] == y[index[0]]
    assert sorted(np.concatenate(whole)) == list(range(67))
    other = data.ShardReader(x, y, batch_size=8, seed=5)
    other.epoch = 4
    assert not np.array_equal(np.concatenate([s[2] for s in next(iter(other()))]), whole[0])


def test_a_last_batch_too_short_for_every_trainer_joins_the_one_before():
    data = example("data")
    assert data.global_batches(10, 4, 3) == [slice(0, 4), slice(4, 10)]  # 2 left over: not one each for 3
    assert data.global_batches(11, 4, 3) == [slice(0, 4), slice(4, 8), slice(8, 11)]
    assert data.global_batches(3, 4, 3) == [slice(0, 3)]
    with pytest.raises(ValueError, match="cannot feed"):
        data.ShardReader(np.zeros((2, 1, 2, 2), np.float32), np.zeros(2), batch_size=4, rank=0, world=3)


# -- two trainers under the launcher ------------------------------------------------------


def launch(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 120.0) -> list[dict]:
    """``paddle.distributed.launch`` 2 CPU trainers of train_with_fleet.py --tiny; their records by rank."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--devices", "", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "logs"), str(EXAMPLE / "train_with_fleet.py"), "--use_distill_service",
           "True", "--predict", "prob", "--tiny", "--out", str(out), *args]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(procs.REPO), full_env.get("PYTHONPATH", "")])
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                cwd=str(procs.REPO))
    try:
        output, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.send_signal(signal.SIGTERM)  # the launcher stops its trainers
        output, _ = launcher.communicate(timeout=30)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((tmp_path / "logs").glob("workerlog.*")))
    assert launcher.returncode == 0, f"{output[-3000:]}\n{logs}"
    records = [json.loads((out / f"trainer_{rank}.json").read_text()) for rank in range(2)]
    for pid in (r["pid"] for r in records):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    return records


def check_data_parallel(records: list[dict], batch_size: int = 32) -> None:
    assert [r["rank"] for r in records] == [0, 1] and {r["world"] for r in records} == {2}
    ids = [r["ids"] for r in records]
    assert [len(i) for i in ids] == [1, 1]  # one epoch each
    seen = ids[0][0] + ids[1][0]
    assert sorted(seen) == list(range(TINY)), "every sample exactly once across the trainers"
    shares = [[len(np.array_split(np.arange(n), 2)[rank]) for n in example("data").ShardReader(
        np.zeros((TINY, 1, 8, 8), np.float32), np.zeros(TINY), batch_size, rank, 2).global_sizes()]
        for rank in range(2)]
    for r, share in zip(records, shares, strict=True):  # the half of every global batch, as many steps each
        assert r["dataset_size"] == TINY and r["samples"] == len(r["ids"][0]) == sum(share)
    for r in records:  # both had teachers, and every sample a trainer trained on came from one
        assert r["teachers"] and sum(r["teachers"].values()) == r["samples"], r["teachers"]
    initial = {r["params_initial"] for r in records}
    after_step = {r["params_after_first_step"] for r in records}
    assert len(initial) == 1 and len(after_step) == 1, "the trainers' parameters differ"
    assert after_step != initial, "the first step did not change the parameters"
    assert len({r["params_final"] for r in records}) == 1
    assert len({r["accuracy"] for r in records}) == 1


def run_single(tmp_path: Path, *args: str, timeout: float = 120.0) -> Path:
    """train_with_fleet.py --tiny in one process, without the launcher; returns its output folder."""
    out = tmp_path / "single"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(procs.REPO), os.environ.get("PYTHONPATH", "")])}
    single = subprocess.Popen([sys.executable, str(EXAMPLE / "train_with_fleet.py"), "--use_distill_service", "True",
                               "--predict", "prob", "--tiny", "--out", str(out), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=str(procs.REPO))
    try:
        output, _ = single.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        single.kill()
        output, _ = single.communicate(timeout=30)
    assert single.returncode == 0, output[-3000:]
    return out


@needs_paddle
def test_two_trainers_split_the_data_and_share_fixed_teachers(tmp_path, start_teacher):
    import paddle

    teachers = [start_teacher(TEACHER, "--threads", "1") for _ in range(2)]
    addresses = ",".join(t.endpoint.split("://")[-1] for t in teachers)
    # 31 rows a step: slices of 16 and 15, so the trainers' losses must be weighted to add up to one process's
    flags = ("--distill_teachers", addresses, "--batch_size", "31")
    records = launch(tmp_path, *flags)
    check_data_parallel(records, batch_size=31)
    served = sum(procs.teacher_stats(t.endpoint)["rows"] for t in teachers)
    assert served >= TINY  # the soft labels came over the wire

    # the 2 trainers took the steps one process takes on the same batches, up to rounding
    fleet = paddle.load(str(tmp_path / "out" / "student.pdparams"))
    single = paddle.load(str(run_single(tmp_path, *flags) / "student.pdparams"))
    paddle.seed(1)  # train_with_fleet.py's --seed: the weights both started from
    initial = example("models").StudentMLP((8, 8), example("distill_student").STUDENT_HIDDEN).state_dict()
    assert sorted(fleet) == sorted(single) == sorted(initial)
    for name in fleet:
        np.testing.assert_allclose(fleet[name].numpy(), single[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
        assert not np.allclose(fleet[name].numpy(), initial[name].numpy(), rtol=1e-4, atol=1e-6), name


@needs_paddle
@pytest.mark.skipif(procs.redis_server_path() is None, reason="redis-server is not installed")
def test_two_trainers_find_teachers_through_the_balancer(tmp_path, start_teacher, redis_server, stopper):
    balancer = daemons.start_balancer(redis_server.endpoint, tmp_path)
    stopper.append(balancer)
    for _ in range(2):
        teacher = start_teacher(TEACHER, "--threads", "1")
        stopper.append(daemons.start_register(redis_server.endpoint, SERVICE, teacher.endpoint.split("://")[-1],
                                              tmp_path))
    env = {"PADDLE_DISTILL_BALANCE_SERVER": balancer.endpoint, "PADDLE_DISTILL_SERVICE_NAME": SERVICE,
           "PADDLE_DISTILL_MAX_TEACHER": "2"}
    check_data_parallel(launch(tmp_path, env=env))


@needs_paddle
@pytest.mark.skipif(procs.redis_server_path() is None, reason="redis-server is not installed")
def test_demo_fleet_tiny_runs_end_to_end_and_stops_what_it_started(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(procs.REPO), os.environ.get("PYTHONPATH", "")])}
    demo = subprocess.Popen([sys.executable, str(EXAMPLE / "demo_fleet.py"), "--tiny", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(procs.REPO))
    try:
        output, _ = demo.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGTERM)  # the demo stops its children by PID
        output, _ = demo.communicate(timeout=30)
        pytest.fail(f"demo_fleet.py --tiny did not finish in 180 s:\n{output[-3000:]}")
    assert demo.returncode == 0, output[-3000:]
    results = json.loads((out / "fleet_results.json").read_text())
    assert results["dataset_size"] == TINY and results["epochs"] == 1
    assert [t["rank"] for t in results["trainers"]] == [0, 1]
    assert sum(t["samples"] for t in results["trainers"]) == TINY
    assert all(t["teachers"] for t in results["trainers"])
    assert all(results["checks"].values()), results["checks"]
    assert abs(results["accuracy"] - results["single_process_accuracy"]) <= 0.02
    # what the demo printed is what it wrote
    assert f"data-parallel (2 trainers) {results['accuracy']:.4f}, one process " \
           f"{results['single_process_accuracy']:.4f}" in output
    trainers = load_trainer_pids(out / "fleet") + load_trainer_pids(out / "fleet-single")
    daemons_started = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", output)]
    assert len(daemons_started) == 6 and len(trainers) == 3  # redis, balancer, 2 teachers, 2 registers
    for pid in daemons_started + trainers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def load_trainer_pids(folder: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in sorted(folder.glob("trainer_*.json"))]


@needs_paddle
def test_without_the_distill_service_the_trainers_split_the_labeled_images(tmp_path):
    records = launch(tmp_path, "--use_distill_service", "False")
    labeled = len(example("data").load_data().subset(TINY, 64).y_labeled)
    seen = records[0]["ids"][0] + records[1]["ids"][0]
    assert len(seen) == TINY and set(seen) == set(range(labeled))  # passes over the labeled images only
    assert max(seen.count(i) for i in range(labeled)) - min(seen.count(i) for i in range(labeled)) <= 1
    assert all(r["teachers"] == {} and not r["use_distill_service"] for r in records)
    assert len({r["params_after_first_step"] for r in records}) == 1 != len(
        {records[0]["params_initial"], records[0]["params_after_first_step"]})
