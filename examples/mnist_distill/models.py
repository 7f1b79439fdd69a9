"""The teacher CNN, the small student, their losses, and training loops with progress bars.

Paddle 3 dynamic graph (``paddle.nn``) throughout: EDL's ``fluid`` API is gone.
Both networks take images of shape ``(N, 1, H, W)`` for any ``H, W`` divisible by 4,
so the same code serves 8x8 scikit-learn digits and 28x28 MNIST.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from tqdm import tqdm

# Softened probabilities never reach exactly 0 in float32; the log below must not see 0 either.
_PROB_FLOOR = 1e-12


class TeacherCNN(nn.Layer):
    """Two conv blocks and a hidden layer: big enough to beat the student clearly on digits."""

    def __init__(self, image_hw: tuple[int, int] = (8, 8), channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        h, w = image_hw
        self.features = nn.Sequential(
            nn.Conv2D(1, channels, 3, padding=1), nn.BatchNorm2D(channels), nn.ReLU(), nn.MaxPool2D(2),
            nn.Conv2D(channels, 2 * channels, 3, padding=1), nn.BatchNorm2D(2 * channels), nn.ReLU(), nn.MaxPool2D(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * channels * (h // 4) * (w // 4), hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, img: paddle.Tensor) -> paddle.Tensor:
        """Logits (training uses them; the served model adds the softmax)."""
        return self.classifier(self.features(img))


class ServedTeacher(nn.Layer):
    """What ``zdistill-teacher`` serves: the mean of its CNNs' softmax outputs, as EDL students expect.

    CNNs trained from different seeds on a few labeled images disagree on the hard
    images; their average is a better and steadier teacher than any one of them (a
    bigger model, as served teachers usually are).  One CNN is the plain case.
    ``paddle.jit.save`` names the input after ``forward``'s argument, which must match
    the ``InputSpec`` name (``img``); Paddle 3 calls the single output ``fetch_name_0``.
    """

    def __init__(self, nets: Sequence[nn.Layer]) -> None:
        super().__init__()
        if not nets:
            raise ValueError("a teacher needs at least one network")
        self.nets = nn.LayerList(nets)

    def forward(self, img: paddle.Tensor) -> paddle.Tensor:
        return paddle.stack([F.softmax(net(img), axis=-1) for net in self.nets]).mean(axis=0)


class StudentMLP(nn.Layer):
    """A deliberately small student: one hidden layer (9.6k weights with 128 units on 8x8 digits).

    Per image it costs 1/37 of one teacher CNN's multiply-adds, and it has no convolution
    to learn shapes from a few examples: what it knows of them comes from the teacher.
    """

    def __init__(self, image_hw: tuple[int, int] = (8, 8), hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(image_hw[0] * image_hw[1], hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, img: paddle.Tensor) -> paddle.Tensor:
        return self.net(img)


def n_params(layer: nn.Layer) -> int:
    return int(sum(int(np.prod(p.shape)) for p in layer.parameters()))


# -- losses -------------------------------------------------------------------------


def soften(prob: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` recovered from ``softmax(logits)`` alone.

    The teacher serves probabilities, not logits; since ``log p = logits - const``,
    ``softmax(log p / T)`` equals ``softmax(logits / T)`` exactly (up to the floor
    that keeps ``log`` finite).  ``T = 1`` returns the teacher's output untouched.
    """
    if temperature == 1.0:
        return prob.astype(np.float32, copy=False)
    z = np.log(np.maximum(prob, _PROB_FLOOR)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def distill_loss(logits: paddle.Tensor, soft_label: paddle.Tensor, label: np.ndarray | None = None,
                 temperature: float = 1.0, hard_weight: float = 0.0) -> paddle.Tensor:
    """EDL's soft-label cross-entropy, optionally tempered and mixed with the hard loss.

    ``soft_label`` must already be softened to ``temperature`` (see :func:`soften`).  The
    soft term is scaled by ``T**2`` so its gradients keep their size as ``T`` grows
    (Hinton et al. 2015); with ``T = 1`` and ``hard_weight = 0`` this is exactly EDL's
    ``mean(cross_entropy(prediction, soft_label, soft_label=True))``.  The hard term
    covers only the rows whose ``label`` is known (``>= 0``): most of the student's
    images have no label, and those learn from the teacher alone.
    """
    soft = F.cross_entropy(logits / temperature, soft_label, soft_label=True).mean() * (temperature**2)
    if hard_weight <= 0.0 or label is None:
        return soft
    known = np.flatnonzero(label.reshape(-1) >= 0)
    if len(known) == 0:
        return (1.0 - hard_weight) * soft
    hard = F.cross_entropy(paddle.gather(logits, paddle.to_tensor(known)),
                           paddle.to_tensor(label.reshape(-1)[known])).mean()
    return (1.0 - hard_weight) * soft + hard_weight * hard


# -- training and evaluation --------------------------------------------------------


@dataclass
class History:
    """Per-epoch curves for the plot, plus how fast the training loop consumed samples."""

    name: str
    epoch_test_acc: list[float] = field(default_factory=list)
    epoch_train_loss: list[float] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_acc(self) -> float:
        return self.epoch_test_acc[-1] if self.epoch_test_acc else float("nan")


@paddle.no_grad()
def predict(layer: nn.Layer, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits for ``x`` in eval mode (dropout off, batch-norm running stats)."""
    was_training = layer.training
    layer.eval()
    out = [layer(paddle.to_tensor(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    if was_training:
        layer.train()
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


def accuracy(layer: nn.Layer, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(layer, x).argmax(axis=1) == y).mean()) if len(y) else float("nan")


def stack_batch(samples: Sequence[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """A list of per-sample tuples -> one array per slot (what the sample-list readers yield)."""
    return [np.stack(slot) for slot in zip(*samples, strict=True)]


StepFn = Callable[[nn.Layer, list[np.ndarray]], paddle.Tensor]
Collate = Callable[[Sequence[tuple[np.ndarray, ...]]], list[np.ndarray]]


def train_epochs(layer: nn.Layer, batches: Callable[[int], Iterable[Sequence[tuple[np.ndarray, ...]]]],
                 loss_fn: StepFn, x_test: np.ndarray, y_test: np.ndarray, epochs: int, lr: float,
                 name: str, batches_per_epoch: int | None = None, progress: bool = True,
                 after_step: Callable[[int], None] | None = None, collate: Collate = stack_batch) -> History:
    """Adam with cosine decay over ``epochs``; ``batches(epoch)`` yields lists of sample tuples (EDL's format).

    One loop for all three models so they differ only in where batches come from and
    the loss: the teacher and the lone student read the data directly, the distilled
    student reads DistillReader's ``(img, label, prob)`` batches.  Time spent waiting
    for batches counts in ``samples/s``, evaluation does not.  ``after_step(steps)`` runs
    after each optimizer step (a data-parallel trainer checks its parameters there).
    ``collate`` turns a list of samples into one array per slot (the text example pads
    its reviews there).
    """
    # Cosine decay to zero: the last epochs settle instead of bouncing, so final accuracies compare fairly.
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(lr, T_max=max(epochs, 1))
    opt = paddle.optimizer.Adam(learning_rate=schedule, parameters=layer.parameters())
    hist = History(name)
    steps = 0
    layer.train()
    total_batches = epochs * batches_per_epoch if batches_per_epoch else None
    bar = tqdm(total=total_batches, desc=name, unit="batch", disable=not progress, mininterval=0.25,
               dynamic_ncols=True)
    for epoch in range(epochs):
        total, count = 0.0, 0
        start = time.perf_counter()
        for samples in batches(epoch):
            loss = loss_fn(layer, collate(samples))
            loss.backward()
            opt.step()
            opt.clear_grad()
            steps += 1
            if after_step is not None:
                after_step(steps)
            total += float(loss) * len(samples)
            count += len(samples)
            bar.update(1)
        hist.seconds += time.perf_counter() - start
        hist.samples += count
        schedule.step()
        hist.epoch_train_loss.append(total / max(count, 1))
        hist.epoch_test_acc.append(accuracy(layer, x_test, y_test))
        bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} loss {hist.epoch_train_loss[-1]:.3f} "
                            f"test acc {hist.epoch_test_acc[-1]:.4f} {hist.samples_per_s:,.0f} samples/s")
    bar.close()
    layer.eval()
    return hist


def hard_label_step(layer: nn.Layer, batch: list[np.ndarray]) -> paddle.Tensor:
    """Plain cross-entropy on ``(img, label)`` batches: the teacher and the lone student."""
    img, label = batch[0], batch[1]
    return F.cross_entropy(layer(paddle.to_tensor(img)), paddle.to_tensor(label.reshape(-1))).mean()


class BatchSink(Protocol):
    """Anything with ``append``: a list, or a running statistic."""

    def append(self, batch: list[np.ndarray]) -> None: ...


def make_distill_step(temperature: float = 1.0, hard_weight: float = 0.0, record: BatchSink | None = None) -> StepFn:
    """A step on DistillReader's ``(img, label, prob)`` batches.

    ``record`` (when given) collects each batch exactly as the student consumed it,
    so a test can check the soft labels are the teacher's outputs for those images.
    """

    def step(layer: nn.Layer, batch: list[np.ndarray]) -> paddle.Tensor:
        img, label, prob = batch
        if record is not None:
            record.append([img.copy(), label.copy(), prob.copy()])
        soft = paddle.to_tensor(soften(prob, temperature))
        return distill_loss(layer(paddle.to_tensor(img)), soft, label, temperature, hard_weight)

    return step
