"""Real handwritten digits, offline: local MNIST idx files, else scikit-learn's digits.

The demo must run on a laptop with no network, so nothing here ever downloads:

* ``--data-dir DIR`` holding the four MNIST idx files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  each optionally ``.gz``) gives 28x28 images and MNIST's own train/test split.
* Otherwise scikit-learn's ``load_digits`` (1797 scanned 8x8 digits, 17 grey levels,
  shipped inside the scikit-learn package) with a fixed-seed, stratified 80/20 split.
  The images are kept at 8x8: upsampling would add no information, only compute
  (a 28x28 CNN is ~12x slower on 2 cores), and the models adapt to the image size.

Images come out as ``float32`` arrays of shape ``(N, 1, H, W)`` scaled to [0, 1]
(the teacher's feed shape), labels as ``int64`` arrays of shape ``(N,)``.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# idx type codes -> numpy dtypes (big-endian on disk, as the format says)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


UNLABELED = -1  # the label of a training image whose label the student does not have
LABELED_FRACTION = 0.03  # the part of the training images whose labels the student has, by default


def labeled_subset(y: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of the training images whose labels the student keeps: ``fraction`` of each class.

    Stratified, so every digit has labels (at least one each); the same ``seed`` always picks the
    same images, so the teacher and every student seed see the same labeled set.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the labeled fraction must be in (0, 1], not {fraction}")
    rng = np.random.default_rng(seed)
    picked = []
    for digit in np.unique(y):
        members = np.flatnonzero(y == digit)
        picked.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(picked))


@dataclass
class Digits:
    """A train/test split of digit images; ``source`` says where they came from.

    ``labeled`` holds the indices of the training images whose labels the student has
    (all of them unless :meth:`with_labels_for` picked a part): the rest are images
    only, for a teacher to label.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    labeled: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Per-sample shape ``(1, H, W)``: what the teacher's ``img`` feed expects."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def labeled_index(self) -> np.ndarray:
        return np.arange(len(self.y_train)) if self.labeled is None else self.labeled

    @property
    def x_labeled(self) -> np.ndarray:
        return self.x_train[self.labeled_index]

    @property
    def y_labeled(self) -> np.ndarray:
        return self.y_train[self.labeled_index]

    @property
    def student_labels(self) -> np.ndarray:
        """``y_train`` as the student knows it: ``UNLABELED`` wherever it has no label."""
        known = np.full_like(self.y_train, UNLABELED)
        known[self.labeled_index] = self.y_train[self.labeled_index]
        return known

    def with_labels_for(self, fraction: float, seed: int = 0) -> Digits:
        """The same images, with labels kept for ``fraction`` of the training images (stratified)."""
        return replace(self, labeled=labeled_subset(self.y_train, fraction, seed))

    def subset(self, n_train: int, n_test: int) -> Digits:
        """The first rows only, labeled in the same proportion: the ``--tiny`` smoke run needs seconds, not accuracy."""
        fraction = len(self.labeled_index) / len(self.y_train)
        return Digits(self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test], self.y_test[:n_test],
                      f"{self.source} (tiny slice: {n_train} train / {n_test} test)").with_labels_for(fraction)


def read_idx(path: str) -> np.ndarray:
    """Read one idx file (optionally gzipped) into a numpy array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: {len(body)} bytes of data, the header {list(dims)} says {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find(data_dir: str, name: str) -> str:
    for candidate in (name, name + ".gz", name.replace("-idx", ".idx"), name.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{data_dir!r} has no {name} (or {name}.gz); it needs the four MNIST idx files")


def load_mnist(data_dir: str) -> Digits:
    """MNIST from local idx files: 60k train / 10k test, 28x28."""
    arrays = {key: read_idx(_find(data_dir, name)) for key, name in MNIST_FILES.items()}

    def images(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32) / 255.0)[:, None, :, :]

    return Digits(images(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
                  images(arrays["test_images"]), arrays["test_labels"].astype(np.int64),
                  f"MNIST idx files in {data_dir}")


def load_sklearn_digits(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """scikit-learn's bundled 8x8 digits with a fixed-seed stratified split (no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Digits(x_train, y_train, x_test, y_test,
                  f"scikit-learn load_digits, 8x8 (seed {seed}: {len(y_train)} train / {len(y_test)} test)")


def load_data(data_dir: str | None = None, seed: int = 0, labeled_fraction: float = LABELED_FRACTION) -> Digits:
    """MNIST when ``data_dir`` is given (fail loudly if its files are missing), else sklearn digits.

    The student keeps the labels of ``labeled_fraction`` of the training images, picked
    with ``seed`` (1: all of them).
    """
    digits = load_mnist(data_dir) if data_dir else load_sklearn_digits(seed)
    return digits.with_labels_for(labeled_fraction, seed)


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` weights that linearly interpolate ``n_in`` evenly spaced values to ``n_out``."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _sample_bilinear(img: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """``img[n, sy, sx]`` at fractional coordinates ``(n, h, w)``, bilinear, zero outside the image."""
    n, h, w = img.shape
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)))  # a ring of zeros: coordinates outside land on it
    y0, x0 = np.floor(sy), np.floor(sx)
    fy, fx = sy - y0, sx - x0
    rows = np.arange(n)[:, None, None]

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return padded[rows, np.clip(y + 1, 0, h + 1).astype(np.intp), np.clip(x + 1, 0, w + 1).astype(np.intp)]

    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
            + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))


@dataclass(frozen=True)
class Augment:
    """Random, label-preserving distortions, drawn afresh for every view of every image.

    Fresh views every epoch are where a *served* teacher earns its keep: their soft labels
    cannot be computed once in advance, so the student asks the teacher for each batch.
    A ``share`` of the views (the rest are the plain images, which is what the test set
    holds) are rotated, scaled and shifted (one random affine map), bent by a smooth random
    displacement field (elastic: a 3x3 grid of random offsets, interpolated), resampled
    bilinearly (zero outside), and given Gaussian pixel noise; values stay in [0, 1].
    Distances are fractions of the image's side, so 8x8 digits and 28x28 MNIST get the
    same distortions (1/8 is one pixel of an 8x8 digit).
    """

    rotation: float = 12.0  # degrees, either way
    scale: float = 0.1  # relative, either way
    shift: float = 0.125  # of the side, either way, in each direction
    elastic: float = 0.05  # of the side: standard deviation of the coarse displacement field
    noise: float = 0.05  # standard deviation of the pixel noise (images are in [0, 1])
    share: float = 0.5  # of the views that are distorted

    def describe(self) -> str:
        return (f"{100 * self.share:g}% of the views distorted: rotation +-{self.rotation:g} deg, "
                f"scale +-{100 * self.scale:g}%, shift +-{100 * self.shift:g}% of the side, "
                f"elastic {100 * self.elastic:g}% of the side, noise {self.noise:g}")

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``x`` is ``(N, 1, H, W)`` float32 in [0, 1]; returns new views of the same shape."""
        n, _, h, w = x.shape
        theta = np.deg2rad(rng.uniform(-self.rotation, self.rotation, n))[:, None, None]
        zoom = 1.0 + rng.uniform(-self.scale, self.scale, n)[:, None, None]
        side = np.array([h, w], dtype=np.float64)[None, :, None, None]
        shift = rng.uniform(-self.shift, self.shift, (n, 2, 1, 1)) * side
        cy, cx = (h - 1) / 2, (w - 1) / 2
        yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
        oy, ox = yy[None] - shift[:, 0], xx[None] - shift[:, 1]
        # where each output pixel comes from: the inverse of rotate-then-zoom-then-shift
        sy = (np.cos(theta) * oy - np.sin(theta) * ox) / zoom + cy
        sx = (np.sin(theta) * oy + np.cos(theta) * ox) / zoom + cx
        if self.elastic > 0:
            coarse = rng.normal(0.0, self.elastic, (n, 2, 3, 3)) * side
            field = np.einsum("hi,nkij,wj->nkhw", _interpolation_matrix(h, 3), coarse, _interpolation_matrix(w, 3))
            sy, sx = sy + field[:, 0], sx + field[:, 1]
        out = _sample_bilinear(x[:, 0].astype(np.float64), sy, sx)
        if self.noise > 0:
            out += rng.normal(0.0, self.noise, out.shape)
        distorted = (rng.random(n) < self.share)[:, None, None, None]
        return np.where(distorted, np.clip(out, 0.0, 1.0)[:, None], x).astype(np.float32)


AUGMENT = Augment()  # what both students and the teacher train with


class EpochReader:
    """What the examples' EDL-style sample-list readers share: ``reader()`` yields lists of samples.

    A class rather than a closure so it pickles: zdistill may run the reader in its own
    process.  Each call shuffles and augments afresh; the epoch seed mixes ``seed``,
    ``epoch`` (set by the training loop) and a per-object call count, so epochs differ
    whether the reader runs in this process, a fresh child per epoch, or one long-lived child.

    ``samples_per_epoch`` (default: one pass over the ``n`` samples) makes an epoch that
    many samples, in fresh shuffled passes: a student with few labeled samples then takes as
    many steps per epoch as one that reads them all, so both get the same budget.
    Subclasses make a batch's samples in :meth:`batch`.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, augment: Callable[..., Any] | None = None,
                 seed: int = 0, samples_per_epoch: int | None = None) -> None:
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch or n
        self.epoch = 0
        self._calls = 0

    def __len__(self) -> int:
        """Batches per epoch (for progress bars)."""
        return -(-self.samples_per_epoch // self.batch_size)

    def __call__(self) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        self._calls += 1
        rng = np.random.default_rng([self.seed, self.epoch, self._calls])
        passes = -(-self.samples_per_epoch // self.n)
        order = np.concatenate([rng.permutation(self.n) if self.shuffle else np.arange(self.n)
                                for _ in range(passes)])[: self.samples_per_epoch]
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start : start + self.batch_size], rng)

    def batch(self, idx: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """The samples at ``idx``, augmented with ``rng``."""
        raise NotImplementedError


class SampleListReader(EpochReader):
    """An :class:`EpochReader` of ``(img, label)`` samples.

    ``img`` is ``float32 (1, H, W)``, ``label`` is ``int64 (1,)`` as in Paddle's MNIST
    examples (``UNLABELED`` where the student has no label).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = True,
                 augment: Augment | None = None, seed: int = 0, samples_per_epoch: int | None = None) -> None:
        if len(y) == 0:
            raise ValueError("a reader needs at least one image")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        super().__init__(len(self.y), batch_size, shuffle, augment, seed, samples_per_epoch)

    def batch(self, idx: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        imgs = self.augment(self.x[idx], rng) if self.augment else self.x[idx]
        labels = self.y[idx]
        return [(imgs[i], labels[i : i + 1]) for i in range(len(idx))]


def global_batches(n: int, batch_size: int, world: int) -> list[slice]:
    """An epoch of ``n`` samples cut into global batches of ``batch_size`` (the last one shorter).

    A last batch too short to give every trainer a sample joins the one before it: a
    trainer with an empty batch would skip the step its peers' all-reduce waits for.
    """
    cuts = list(range(0, n, batch_size)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] < world:
        del cuts[-2]
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class ShardReader:
    """One data-parallel trainer's share of every epoch: an EDL sample-list reader of ``(img, label, index)``.

    Every trainer draws the same epoch (the order and the augmented views depend on
    ``seed`` and ``epoch`` only, never on ``rank`` or the process that runs the reader),
    cuts it into global batches of ``batch_size`` and takes its slice of each (the
    slices' sizes differ by one at most, never zero).  So each sample is seen once per
    epoch across the trainers, every trainer takes the same number of steps (which the
    gradients' all-reduce needs), and ``world`` trainers together see exactly the
    batches one process sees.  ``index`` (``int64 (1,)``)
    is the sample's row in ``x``: it stays with the student and tells which samples a
    trainer got.  ``samples_per_epoch`` goes through the images in fresh shuffled passes,
    as :class:`SampleListReader` does.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, rank: int = 0, world: int = 1,
                 augment: Augment | None = None, seed: int = 0, samples_per_epoch: int | None = None) -> None:
        if len(y) == 0:
            raise ValueError("a reader needs at least one image")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} trainers")
        if batch_size < world:
            raise ValueError(f"a global batch of {batch_size} cannot feed {world} trainers")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.augment = augment
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch or len(self.y)
        if self.samples_per_epoch < world:
            raise ValueError(f"{self.samples_per_epoch} samples per epoch cannot feed {world} trainers")
        self.epoch = 0  # set by the training loop before each epoch

    def __len__(self) -> int:
        """Batches per epoch, the same on every trainer."""
        return len(self.global_sizes())

    def global_sizes(self) -> list[int]:
        """The size of each global batch of an epoch (all trainers' slices together), in order."""
        return [cut.stop - cut.start for cut in global_batches(self.samples_per_epoch, self.batch_size, self.world)]

    def __call__(self) -> Iterator[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        passes = -(-self.samples_per_epoch // len(self.y))
        order = np.concatenate([rng.permutation(len(self.y)) for _ in range(passes)])[: self.samples_per_epoch]
        for cut in global_batches(len(order), self.batch_size, self.world):
            idx = order[cut]
            imgs = self.augment(self.x[idx], rng) if self.augment else self.x[idx]  # all trainers draw alike
            mine = np.array_split(np.arange(len(idx)), self.world)[self.rank]
            yield [(imgs[i], self.y[idx[i] : idx[i] + 1], idx[i : i + 1]) for i in mine]
