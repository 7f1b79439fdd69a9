"""Train the small student from a served teacher's soft labels, and the same student alone.

The setting: the student has labels for only a small part of its training images
(``data.LABELED_FRACTION``); every image is augmented afresh each epoch (``data.AUGMENT``).  The
student alone trains on its labeled images; the distilled student trains on all of
them, each augmented view labeled by the teacher when it is made.  Both get the same
architecture, augmentation, schedule and number of training samples.

    # a teacher must be serving (see train_teacher.py / demo.py):
    python examples/mnist_distill/distill_student.py --teacher 127.0.0.1:9292 --baseline
    # or teachers found through zdistill-balancer:
    python examples/mnist_distill/distill_student.py --discovery 127.0.0.1:7001 --service-name mnist_teacher

The distilled loop is the one of EDL's distillation guide, in Paddle 3 dynamic graph:

    dr = DistillReader(ins=['img', 'label'], predicts=['fetch_name_0'])
    dr.set_fixed_teacher(address)
    train_reader = dr.set_sample_list_generator(reader)
    for data in train_reader():          # lists of (img, label, soft_label)
        loss = cross_entropy(student(img), soft_label, soft_label=True).mean()

``--temperature T`` softens both sides (the teacher's probabilities are re-tempered
locally, see :func:`models.soften`) and ``--hard-weight w`` mixes in the ordinary
label loss; ``T=1, w=0`` is exactly EDL's example.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator

import paddle
from data import AUGMENT, LABELED_FRACTION, Augment, Digits, SampleListReader, ShardReader, load_data
from models import BatchSink, History, StudentMLP, hard_label_step, make_distill_step, n_params, train_epochs

from zdistill import DistillReader

TEACHER_OUTPUT = "fetch_name_0"

# Defaults shared by the demo and the CLI; the lone and the distilled student differ only in their targets.
STUDENT_HIDDEN = 128
STUDENT_EPOCHS = 60
STUDENT_LR = 1e-2
STUDENT_BATCH = 32
TEMPERATURE = 1.0
HARD_WEIGHT = 0.0


def student_reader(data: Digits, batch_size: int = STUDENT_BATCH, seed: int = 1, augment: Augment | None = AUGMENT,
                   labeled_only: bool = False) -> SampleListReader:
    """The student's training data as an EDL sample-list reader: lists of ``(img, label)``.

    ``labeled_only``: the images the student has labels for, in as many passes as one
    pass over all images takes (the same budget); else every image, ``UNLABELED`` where
    the student has no label.
    """
    if labeled_only:
        return SampleListReader(data.x_labeled, data.y_labeled, batch_size, augment=augment, seed=seed,
                                samples_per_epoch=len(data.y_train))
    return SampleListReader(data.x_train, data.student_labels, batch_size, augment=augment, seed=seed)


def epochs_of(reader: SampleListReader | ShardReader, source: Callable[[], Iterator]) -> Callable[[int], Iterator]:
    """``batches(epoch)`` for :func:`models.train_epochs`: tells ``reader`` its epoch, then reads ``source``."""

    def batches(epoch: int) -> Iterator:
        reader.epoch = epoch  # read by the reader when it starts (here or in the process that runs it)
        return source()

    return batches


def train_student_alone(data: Digits, epochs: int = STUDENT_EPOCHS, hidden: int = STUDENT_HIDDEN,
                        lr: float = STUDENT_LR, batch_size: int = STUDENT_BATCH, seed: int = 1,
                        augment: Augment | None = AUGMENT, progress: bool = True) -> tuple[StudentMLP, History]:
    """The baseline: the same student, augmentation, schedule and budget, on the labels it has."""
    paddle.seed(seed)
    student = StudentMLP(data.image_shape[1:], hidden)
    reader = student_reader(data, batch_size, seed, augment, labeled_only=True)
    hist = train_epochs(student, epochs_of(reader, reader), hard_label_step, data.x_test, data.y_test, epochs,
                        lr, "student alone", len(reader), progress)
    return student, hist


def train_student_distilled(data: Digits, dr: DistillReader, epochs: int = STUDENT_EPOCHS,
                            hidden: int = STUDENT_HIDDEN, lr: float = STUDENT_LR, batch_size: int = STUDENT_BATCH,
                            temperature: float = TEMPERATURE, hard_weight: float = HARD_WEIGHT, seed: int = 1,
                            augment: Augment | None = AUGMENT, record: BatchSink | None = None,
                            on_batch: Callable[[int, int], None] | None = None, progress: bool = True,
                            name: str = "student distilled") -> tuple[StudentMLP, History]:
    """Train from ``dr``'s ``(img, label, prob)`` batches; ``dr`` already knows its teacher(s).

    The loop only consumes ``dr()``: the same code runs against fixed and dynamic
    teachers.  Every training image goes to the teacher, freshly augmented each epoch;
    labels the student has stay local (``hard_weight`` uses them).  ``record`` receives
    every ``[img, label, prob]`` batch the student trained on (the smoke test compares
    them with the teacher's own outputs); ``on_batch(epoch, i)`` runs after each step
    (the dynamic demo stops a teacher from there).
    """
    paddle.seed(seed)
    student = StudentMLP(data.image_shape[1:], hidden)
    reader = student_reader(data, batch_size, seed, augment)
    dr.set_sample_list_generator(reader)

    def distilled() -> Iterator:
        for i, batch in enumerate(dr()):
            yield batch
            if on_batch is not None:
                on_batch(reader.epoch, i)

    hist = train_epochs(student, epochs_of(reader, distilled), make_distill_step(temperature, hard_weight, record),
                        data.x_test, data.y_test, epochs, lr, name, len(reader), progress)
    return student, hist


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--teacher", help="fixed teacher(s): IP:PORT[,IP:PORT...]")
    where.add_argument("--discovery", help="zdistill-balancer IP:PORT (dynamic teachers)")
    p.add_argument("--service-name", default="mnist_teacher", help="teacher service to ask the balancer for")
    p.add_argument("--max-teachers", type=int, default=2, help="require_max_teacher for dynamic teachers")
    p.add_argument("--data-dir", default=None, help="folder with MNIST idx files (default: scikit-learn digits)")
    p.add_argument("--labeled-fraction", type=float, default=LABELED_FRACTION,
                   help="part of the training images the student has labels for (1: all)")
    p.add_argument("--no-augment", action="store_true", help="train on the plain images")
    p.add_argument("--epochs", type=int, default=STUDENT_EPOCHS)
    p.add_argument("--hidden", type=int, default=STUDENT_HIDDEN)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--hard-weight", type=float, default=HARD_WEIGHT, help="weight of the hard-label loss (0..1)")
    p.add_argument("--baseline", action="store_true", help="also train the student alone, for comparison")
    p.add_argument("--tiny", action="store_true", help="a few samples, 1 epoch: a smoke run")
    args = p.parse_args(argv)

    data = load_data(args.data_dir, labeled_fraction=args.labeled_fraction)
    augment = None if args.no_augment else AUGMENT
    epochs = args.epochs
    if args.tiny:
        data, epochs = data.subset(256, 64), 1
    print(f"data: {data.source}; labels for {len(data.y_labeled)} of {len(data.y_train)} training images")
    print(f"student: MLP with {n_params(StudentMLP(data.image_shape[1:], args.hidden)):,} parameters")
    if args.baseline:
        _, alone = train_student_alone(data, epochs, args.hidden, augment=augment)
        print(f"student alone: test accuracy {alone.final_acc:.4f}")
    with DistillReader(ins=["img", "label"], predicts=[TEACHER_OUTPUT]) as dr:
        if args.teacher:
            dr.set_fixed_teacher(args.teacher)
        else:
            dr.set_dynamic_teacher(args.discovery, args.service_name, require_max_teacher=args.max_teachers)
        _, hist = train_student_distilled(data, dr, epochs, args.hidden, temperature=args.temperature,
                                          hard_weight=args.hard_weight, augment=augment)
    print(f"student distilled: test accuracy {hist.final_acc:.4f}, {hist.samples_per_s:,.0f} samples/s "
          f"({hist.samples} samples in {hist.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
