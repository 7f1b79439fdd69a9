"""A data-parallel student under Paddle's launcher, each trainer with its own DistillReader.

EDL's ``train_with_fleet.py``, same file name and flags, in Paddle 3 dynamic graph:

    # fixed teachers: every trainer uses all of them
    python -m paddle.distributed.launch --devices "" --nproc_per_node 2 \\
        examples/mnist_distill/train_with_fleet.py --use_distill_service True \\
        --distill_teachers 127.0.0.1:9292,127.0.0.1:9293

    # dynamic teachers, through EDL's environment variables (they win over the flags)
    PADDLE_DISTILL_BALANCE_SERVER=127.0.0.1:7001 PADDLE_DISTILL_SERVICE_NAME=mnist_teacher \\
    PADDLE_DISTILL_MAX_TEACHER=2 python -m paddle.distributed.launch --devices "" --nproc_per_node 2 \\
        examples/mnist_distill/train_with_fleet.py --use_distill_service True

    # the same student in one process: the same command without the launcher
    python examples/mnist_distill/train_with_fleet.py --use_distill_service True --distill_teachers ...

``--devices ""`` keeps the trainers on CPUs, where the launcher's collectives use gloo;
on GPUs drop it and the launcher picks NCCL.  What each trainer does:

- **data**: a :class:`data.ShardReader` over its own share of every epoch: all trainers
  draw the same shuffled, augmented epoch and each takes its slice of every global batch
  of ``--batch_size``, so every sample is seen once per epoch across the trainers and
  they all take the same number of steps;
- **teachers**: its own ``DistillReader`` over that shard (one student to the balancer per
  trainer, see ``deploy/README.md`` for how the balancer splits a service's teachers
  between them); only ``img`` goes to the teacher, the label and the sample's index
  stay in the trainer;
- **gradients**: ``paddle.DataParallel`` all-reduces them (the mean over the trainers),
  each trainer's loss weighted by its share of the global batch, so ``N`` trainers take
  the steps one process takes on the same global batches (up to rounding);
- **record**: ``OUT/trainer_RANK.json`` with its rank, the indices of the samples it
  trained on per epoch, the samples each teacher answered, its throughput, the test
  accuracy, and checksums of the parameters before training, after the first step and
  at the end (equal on every trainer when the all-reduce works); rank 0 saves the
  trained student as ``OUT/student.pdparams``.

``--use_distill_service False`` trains the same student on its labeled images alone
(hard labels, the same sharding and budget), as EDL's script trained without a teacher;
its record's indices are then rows of the labeled images.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import logging
import os
import sys
import time
from contextlib import nullcontext
from typing import Any

import distill_student as ds
import numpy as np
import paddle
import paddle.distributed as dist
from data import AUGMENT, ShardReader, load_data
from models import StudentMLP, hard_label_step, make_distill_step, train_epochs
from report import write_json

from zdistill import DistillReader

HERE = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("train_with_fleet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--use_distill_service", type=ast.literal_eval, default=True,
                   help="train on the teachers' soft labels (True) or on the labeled images alone (False)")
    p.add_argument("--distill_teachers", default=None,
                   help="fixed teachers IP:PORT[,IP:PORT]; without it, PADDLE_DISTILL_BALANCE_SERVER and "
                        "PADDLE_DISTILL_SERVICE_NAME name a balancer and a service")
    p.add_argument("--predict", default=ds.TEACHER_OUTPUT, help="the teacher output to distill from")
    p.add_argument("--epochs", type=int, default=ds.STUDENT_EPOCHS)
    p.add_argument("--batch_size", type=int, default=ds.STUDENT_BATCH,
                   help="the global batch, split between the trainers")
    p.add_argument("--lr", type=float, default=ds.STUDENT_LR)
    p.add_argument("--hidden", type=int, default=ds.STUDENT_HIDDEN)
    p.add_argument("--seed", type=int, default=1, help="the student's initial weights and the data order")
    p.add_argument("--data-dir", default=None, help="folder with MNIST idx files (default: scikit-learn digits)")
    p.add_argument("--no-augment", action="store_true", help="train on the plain images")
    p.add_argument("--tiny", action="store_true", help="256 training images, 1 epoch: a smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "out", "fleet"), help="trainer_RANK.json goes here")
    p.add_argument("--progress", action="store_true", help="a progress bar (rank 0 only)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch_size must be at least 1")
    return args


def checksum(layer: paddle.nn.Layer) -> str:
    """A digest of every parameter's exact bytes: two trainers agree on it only if their weights are equal."""
    digest = hashlib.sha256()
    for name, value in sorted(layer.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value.numpy()).tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("zdistill").setLevel(logging.WARNING)
    world = dist.get_world_size()
    if world > 1:
        dist.init_parallel_env()
    rank = dist.get_rank()

    data = load_data(args.data_dir)
    epochs = args.epochs
    if args.tiny:
        data, epochs = data.subset(256, 64), 1
    distill = bool(args.use_distill_service)
    if distill:
        reader = ShardReader(data.x_train, data.student_labels, args.batch_size, rank, world,
                             None if args.no_augment else AUGMENT, args.seed)
    else:  # the labeled images only, in as many passes as one pass over all images takes
        reader = ShardReader(data.x_labeled, data.y_labeled, args.batch_size, rank, world,
                             None if args.no_augment else AUGMENT, args.seed, samples_per_epoch=len(data.y_train))

    paddle.seed(args.seed)
    student = StudentMLP(data.image_shape[1:], args.hidden)
    model = paddle.DataParallel(student) if world > 1 else student
    record: dict[str, Any] = {"rank": rank, "world": world, "pid": os.getpid(), "use_distill_service": distill,
                              "dataset_size": reader.samples_per_epoch, "epochs": epochs, "ids": [],
                              "params_initial": checksum(student)}
    distill_step = make_distill_step(ds.TEMPERATURE, ds.HARD_WEIGHT)
    global_sizes = reader.global_sizes()
    steps_this_epoch = [0]

    def step(layer: paddle.nn.Layer, batch: list[np.ndarray]) -> paddle.Tensor:
        """Note which samples this trainer got, then the ordinary step on ``(img, label[, prob])``.

        The loss, a mean over this trainer's rows, is weighted by its share of the global
        batch (``world * rows / global rows``): the all-reduce's mean of the trainers'
        gradients is then the gradient of the mean over the global batch, as in one
        process, also where the slices differ by a row.
        """
        if len(record["ids"]) <= reader.epoch:
            record["ids"].append([])
            steps_this_epoch[:] = [0]
        whole = global_sizes[steps_this_epoch[0]]
        steps_this_epoch[0] += 1
        record["ids"][reader.epoch].extend(int(i) for i in batch[2].reshape(-1))
        loss = distill_step(layer, [batch[0], batch[1], batch[3]]) if distill else hard_label_step(layer, batch)
        return loss * (world * len(batch[0]) / whole)

    def after_step(steps: int) -> None:
        if steps == 1:
            record["params_after_first_step"] = checksum(student)

    log.info("trainer %d of %d: its share of %d samples per epoch, %d epochs, %s", rank, world,
             reader.samples_per_epoch, epochs, "distilled" if distill else "labeled images alone")
    started = time.perf_counter()
    with DistillReader(ins=["img", "label", "index"], predicts=[args.predict]) if distill else nullcontext() as dr:
        if dr is not None:
            if args.distill_teachers:
                dr.set_fixed_teacher(args.distill_teachers)  # else PADDLE_DISTILL_* name the balancer
            dr.set_sample_list_generator(reader)
        hist = train_epochs(model, ds.epochs_of(reader, reader if dr is None else dr), step, data.x_test,
                            data.y_test, epochs, args.lr, f"trainer {rank}", len(reader),
                            args.progress and rank == 0, after_step)
        stats = {"teachers": {}} if dr is None else dr.stats()
    teachers = {address: int(t.get("samples", 0)) for address, t in stats["teachers"].items()}
    record["reader_samples_per_s"] = float(stats.get("samples_per_s", 0.0))
    record.update(samples=hist.samples, teachers=teachers, samples_per_s=hist.samples_per_s,
                  seconds=time.perf_counter() - started, accuracy=hist.final_acc,
                  epoch_test_acc=hist.epoch_test_acc, params_final=checksum(student))
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:  # every trainer holds the same weights
        paddle.save(student.state_dict(), os.path.join(args.out, "student.pdparams"))
    path = os.path.join(args.out, f"trainer_{rank}.json")
    write_json(path, record)
    used = ", ".join(f"{a} ({n:,} samples)" for a, n in sorted(teachers.items()) if n) or "none"
    log.info("trainer %d: %d samples, teachers %s, %.0f samples/s, test accuracy %.4f; wrote %s", rank,
             hist.samples, used, hist.samples_per_s, hist.final_acc, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
