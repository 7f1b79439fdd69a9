"""Train the bag-of-words student from the sequence teacher's soft labels, and the same student alone.

The setting: the student has labels for 200 of its 5,000 training reviews; every epoch
rewrites each review afresh (``language.AUGMENT``).  The student alone trains on its 200
labeled reviews; the distilled student trains on all of them, each rewritten view labeled
by the teacher as it is made.  Both get the same model, rewrites, schedule and number of
training samples.

    # a teacher must be serving (see train_text_teacher.py / demo.py):
    python examples/text_distill/distill_text_student.py --teacher 127.0.0.1:9292 --baseline

The distilled loop is EDL's, with a slot whose samples differ in length:

    dr = DistillReader(ins=['ids', 'label'], predicts=['fetch_name_0'])
    dr.set_fixed_teacher(address)
    dr.set_sample_list_generator(reader)   # lists of (ids int64 [its length], label int64 [1])
    for samples in dr():                   # lists of (ids, label, prob float32 [2])
        ...

:class:`InProcessTeacher` offers the same two calls and labels each batch with the saved
model run in this process (``paddle.inference``, padded and given lengths as the server
does): ``demo.py --in-process`` uses it where the reader cannot yet carry such slots.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import paddle
from language import AUGMENT, Augment, Corpus, ReviewReader, make_corpus, pad
from mnist_parts import models
from text_models import TEACHER_OUTPUT, SavedTeacher, StudentBOW, collate

# Defaults shared by the demo and the CLI; the lone and the distilled student differ only in their targets.
STUDENT_EMBEDDING = 32
STUDENT_EPOCHS = 6  # the test accuracy of both students levels off after 2 or 3
STUDENT_LR = 1e-2
STUDENT_BATCH = 32
TEMPERATURE = 1.0
HARD_WEIGHT = 0.0

Sample = tuple[np.ndarray, ...]  # (ids, label) from the reader; (ids, label, prob) once labeled
SampleLists = Callable[[], Iterator[list[Sample]]]


class Labeler(Protocol):
    """What the distilled loop needs of a teacher: DistillReader's sample-list calls."""

    def set_sample_list_generator(self, reader: SampleLists) -> object: ...

    def __call__(self) -> Iterator[list[Sample]]: ...


class InProcessTeacher:
    """DistillReader's sample-list interface over the saved teacher run in this process.

    ``set_sample_list_generator(reader)`` then ``self()`` yields the reader's lists of
    ``(ids, label)`` with the teacher's probabilities appended, ``(ids, label, prob)``:
    the samples themselves pass through untouched, as DistillReader returns them.
    """

    def __init__(self, prefix: str, threads: int = 1) -> None:
        self.teacher = SavedTeacher(prefix, threads)
        self._reader: SampleLists | None = None

    def set_sample_list_generator(self, reader: SampleLists) -> None:
        self._reader = reader

    def __call__(self) -> Iterator[list[Sample]]:
        if self._reader is None:
            raise RuntimeError("set_sample_list_generator(reader) first")
        for samples in self._reader():
            prob = self.teacher([s[0] for s in samples])
            yield [(*s, p) for s, p in zip(samples, prob, strict=True)]


def student_reader(corpus: Corpus, batch_size: int = STUDENT_BATCH, seed: int = 1, augment: Augment | None = AUGMENT,
                   labeled_only: bool = False) -> ReviewReader:
    """The student's training data as an EDL sample-list reader: lists of ``(ids, label)``.

    ``labeled_only``: the reviews the student has labels for, in as many passes as one pass
    over all reviews takes (the same budget); else every review, ``UNLABELED`` where the
    student has no label.
    """
    if labeled_only:
        return ReviewReader(corpus.labeled_train, batch_size, augment, seed, samples_per_epoch=len(corpus.train))
    return ReviewReader(corpus.student_train, batch_size, augment, seed)


def _epochs_of(reader: ReviewReader, source: Callable[[], Iterator]) -> Callable[[int], Iterator]:
    def batches(epoch: int) -> Iterator:
        reader.epoch = epoch  # read by the reader when it starts (here or in the process that runs it)
        return source()

    return batches


def train_student_alone(corpus: Corpus, epochs: int = STUDENT_EPOCHS, lr: float = STUDENT_LR,
                        batch_size: int = STUDENT_BATCH, seed: int = 1, augment: Augment | None = AUGMENT,
                        progress: bool = True) -> tuple[StudentBOW, models.History]:
    """The baseline: the same student, rewrites, schedule and budget, on the labels it has."""
    paddle.seed(seed)
    student = StudentBOW(STUDENT_EMBEDDING)
    reader = student_reader(corpus, batch_size, seed, augment, labeled_only=True)
    hist = models.train_epochs(student, _epochs_of(reader, reader), models.hard_label_step,
                               pad(corpus.test.sentences)[0], corpus.test.labels, epochs, lr, "student alone",
                               len(reader), progress, collate=collate)
    return student, hist


def train_student_distilled(corpus: Corpus, dr: Labeler, epochs: int = STUDENT_EPOCHS, lr: float = STUDENT_LR,
                            batch_size: int = STUDENT_BATCH, temperature: float = TEMPERATURE,
                            hard_weight: float = HARD_WEIGHT, seed: int = 1, augment: Augment | None = AUGMENT,
                            record: models.BatchSink | None = None,
                            progress: bool = True) -> tuple[StudentBOW, models.History]:
    """Train from ``dr``'s ``(ids, label, prob)`` samples: a DistillReader that knows its teacher, or InProcessTeacher.

    Every training review goes to the teacher, rewritten afresh each epoch; the labels the
    student has stay local (``hard_weight`` uses them).  ``record`` receives every
    ``[ids padded, label, prob]`` batch the student trained on.
    """
    paddle.seed(seed)
    student = StudentBOW(STUDENT_EMBEDDING)
    reader = student_reader(corpus, batch_size, seed, augment)
    dr.set_sample_list_generator(reader)
    step = models.make_distill_step(temperature, hard_weight, record)
    hist = models.train_epochs(student, _epochs_of(reader, dr), step, pad(corpus.test.sentences)[0],
                               corpus.test.labels, epochs, lr, "student distilled", len(reader), progress,
                               collate=collate)
    return student, hist


def main(argv: list[str] | None = None) -> int:
    from zdistill import DistillReader

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--teacher", help="fixed teacher(s) serving the saved GRU: IP:PORT[,IP:PORT...]")
    where.add_argument("--in-process", metavar="PREFIX", help="run the saved teacher PREFIX in this process instead")
    p.add_argument("--epochs", type=int, default=STUDENT_EPOCHS)
    p.add_argument("--data-seed", type=int, default=0, help="which generated reviews (the teacher's own)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--baseline", action="store_true", help="also train the student alone, for comparison")
    args = p.parse_args(argv)

    corpus = make_corpus(seed=args.data_seed)
    print(corpus.describe())
    if args.baseline:
        _, alone = train_student_alone(corpus, args.epochs, seed=args.seed)
        print(f"student alone: test accuracy {alone.final_acc:.4f}")
    if args.in_process:
        _, hist = train_student_distilled(corpus, InProcessTeacher(args.in_process), args.epochs, seed=args.seed)
    else:
        with DistillReader(ins=["ids", "label"], predicts=[TEACHER_OUTPUT]) as dr:
            dr.set_fixed_teacher(args.teacher)
            _, hist = train_student_distilled(corpus, dr, args.epochs, seed=args.seed)
    print(f"student distilled: test accuracy {hist.final_acc:.4f}, {hist.samples_per_s:,.0f} samples/s "
          f"({hist.samples} samples in {hist.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
