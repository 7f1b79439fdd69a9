"""Train the teacher (a few CNNs, averaged) on CPU and export it for ``zdistill-teacher``.

    python examples/mnist_distill/train_teacher.py --out examples/mnist_distill/out/teacher/model
    zdistill-teacher --model examples/mnist_distill/out/teacher/model --port 9292 --threads 1

The export is ``paddle.jit.save`` of :class:`models.ServedTeacher` (the mean of the
CNNs' softmax outputs) with one ``InputSpec`` named ``img``; Paddle 3 writes ``PREFIX.json`` +
``PREFIX.pdiparams`` and the predictor calls the output ``fetch_name_0``, which is the
name a student passes as ``predicts=[...]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import paddle
from data import AUGMENT, LABELED_FRACTION, Augment, Digits, SampleListReader, load_data
from models import History, ServedTeacher, TeacherCNN, accuracy, hard_label_step, n_params, train_epochs

TEACHER_OUTPUT = "fetch_name_0"  # what Paddle 3's predictor reports for a jit.save'd layer
TEACHER_EPOCHS = 30
TEACHER_MEMBERS = 3  # CNNs averaged into the served teacher


def train_teacher(data: Digits, epochs: int = TEACHER_EPOCHS, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                  augment: Augment | None = AUGMENT, progress: bool = True,
                  name: str = "teacher") -> tuple[TeacherCNN, History]:
    """One CNN, trained on the labeled images only (the labels that exist), augmented afresh every time.

    An epoch is as many samples as there are training images, in passes over the labeled
    ones, so the budget does not shrink with the labeled fraction.  A CNN learns from few
    augmented images what an MLP cannot: that is the knowledge the student gets from it.
    """
    paddle.seed(seed)
    model = TeacherCNN(data.image_shape[1:])
    reader = SampleListReader(data.x_labeled, data.y_labeled, batch_size, augment=augment, seed=seed,
                              samples_per_epoch=len(data.y_train))

    def batches(epoch: int):
        reader.epoch = epoch
        return reader()

    hist = train_epochs(model, batches, hard_label_step, data.x_test, data.y_test, epochs, lr, name, len(reader),
                        progress)
    return model, hist


def train_teachers(data: Digits, epochs: int = TEACHER_EPOCHS, members: int = TEACHER_MEMBERS, seed: int = 0,
                   augment: Augment | None = AUGMENT, progress: bool = True) -> tuple[ServedTeacher, list[History]]:
    """``members`` CNNs from seeds ``seed``, ``seed + 1``, ...; returns their average and each one's history."""
    if progress:
        print(f"teacher: {members} CNN{'s' if members > 1 else ''} of "
              f"{n_params(TeacherCNN(data.image_shape[1:])):,} parameters, "
              f"{epochs} epoch(s) of {len(data.y_train)} samples from the {len(data.y_labeled)} labeled images")
    trained = [train_teacher(data, epochs, seed=seed + k, augment=augment, progress=progress,
                             name=f"teacher {k + 1}/{members}") for k in range(members)]
    teacher = ServedTeacher([net for net, _ in trained])
    teacher.eval()
    return teacher, [hist for _, hist in trained]


def export_teacher(served: ServedTeacher, prefix: str, image_shape: tuple[int, ...]) -> str:
    """``paddle.jit.save`` the served model; returns the prefix (``prefix.json`` + ``prefix.pdiparams``)."""
    served.eval()
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    spec = paddle.static.InputSpec([None, *image_shape], "float32", "img")
    paddle.jit.save(served, prefix, input_spec=[spec])
    return prefix


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with MNIST idx files (default: scikit-learn digits)")
    p.add_argument("--out", default=os.path.join(here, "out", "teacher", "model"), help="export prefix")
    p.add_argument("--labeled-fraction", type=float, default=LABELED_FRACTION,
                   help="part of the training images whose labels exist (the demo's students get the same ones)")
    p.add_argument("--epochs", type=int, default=TEACHER_EPOCHS)
    p.add_argument("--members", type=int, default=TEACHER_MEMBERS, help="CNNs averaged into the teacher")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's weights and the augmentation")
    p.add_argument("--tiny", action="store_true", help="a few samples, 1 epoch: a smoke run")
    args = p.parse_args(argv)
    if args.members < 1:
        p.error(f"--members must be at least 1, not {args.members}")

    data = load_data(args.data_dir, labeled_fraction=args.labeled_fraction)
    epochs = args.epochs
    if args.tiny:
        data, epochs = data.subset(256, 64), 1
    print(f"data: {data.source}")
    start = time.perf_counter()
    teacher, _ = train_teachers(data, epochs, args.members, seed=args.seed)
    prefix = export_teacher(teacher, args.out, data.image_shape)
    print(f"teacher test accuracy {accuracy(teacher, data.x_test, data.y_test):.4f}, "
          f"trained in {time.perf_counter() - start:.1f} s")
    print(f"exported {prefix}.json + {prefix}.pdiparams (feed 'img' {list(data.image_shape)}, "
          f"fetch '{TEACHER_OUTPUT}')")
    print(f"serve it with: zdistill-teacher --model {prefix} --port 9292 --threads 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
