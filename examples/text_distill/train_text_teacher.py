"""Train the sequence teacher (a GRU) on its labeled reviews and export it for ``zdistill-teacher``.

    python examples/text_distill/train_text_teacher.py --out examples/text_distill/out/teacher/model
    zdistill-teacher --model examples/text_distill/out/teacher/model --lengths-input lengths --port 9292

The export is ``paddle.jit.save`` of :class:`text_models.ServedTeacher` with two inputs,
``ids`` ``[-1, -1]`` int64 (a batch of reviews padded with 0) and ``lengths`` ``[-1]`` int64
(each review's length), and one output, the probabilities ``[-1, 2]``, which Paddle 3's
predictor calls ``fetch_name_0``.  ``--lengths-input lengths`` tells the teacher server to
fill ``lengths`` itself: a student sends only each review's ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import paddle
from language import AUGMENT, Augment, Corpus, ReviewReader, make_corpus, pad
from mnist_parts import models
from text_models import TEACHER_OUTPUT, TeacherGRU, collate, export_teacher

TEACHER_EPOCHS = 4  # passes over the teacher's labeled reviews, each freshly augmented
TEACHER_LR = 3e-3
TEACHER_BATCH = 64


def train_teacher(corpus: Corpus, epochs: int = TEACHER_EPOCHS, seed: int = 0, augment: Augment | None = AUGMENT,
                  progress: bool = True) -> tuple[TeacherGRU, models.History]:
    """The GRU, trained on the teacher's own labeled reviews (``corpus.teacher_train``), tested on the test reviews."""
    paddle.seed(seed)
    net = TeacherGRU()
    reader = ReviewReader(corpus.teacher_train, TEACHER_BATCH, augment=augment, seed=seed)

    def batches(epoch: int):
        reader.epoch = epoch
        return reader()

    hist = models.train_epochs(net, batches, models.hard_label_step, pad(corpus.test.sentences)[0],
                               corpus.test.labels, epochs, TEACHER_LR, "teacher (GRU)", len(reader), progress,
                               collate=collate)
    return net, hist


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(here, "out", "teacher", "model"), help="export prefix")
    p.add_argument("--epochs", type=int, default=TEACHER_EPOCHS)
    p.add_argument("--seed", type=int, default=0, help="seeds the GRU's weights and the augmentation")
    p.add_argument("--data-seed", type=int, default=0, help="which generated reviews")
    args = p.parse_args(argv)
    corpus = make_corpus(seed=args.data_seed)
    print(corpus.describe())
    start = time.perf_counter()
    net, hist = train_teacher(corpus, args.epochs, seed=args.seed)
    prefix = export_teacher(net, args.out)
    print(f"teacher test accuracy {hist.final_acc:.4f}, trained in {time.perf_counter() - start:.1f} s")
    print(f"exported {prefix}.json + {prefix}.pdiparams (feeds 'ids' [-1, -1] and 'lengths' [-1], int64; "
          f"fetch '{TEACHER_OUTPUT}')")
    print(f"serve it with: zdistill-teacher --model {prefix} --lengths-input lengths --port 9292 --threads 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
