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
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# idx type codes -> numpy dtypes (big-endian on disk, as the format says)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Digits:
    """A train/test split of digit images; ``source`` says where they came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Per-sample shape ``(1, H, W)``: what the teacher's ``img`` feed expects."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def subset(self, n_train: int, n_test: int) -> Digits:
        """The first rows only: the ``--tiny`` smoke run needs seconds, not accuracy."""
        return Digits(self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test], self.y_test[:n_test],
                      f"{self.source} (tiny slice: {n_train} train / {n_test} test)")


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


def load_data(data_dir: str | None = None, seed: int = 0) -> Digits:
    """MNIST when ``data_dir`` is given (fail loudly if its files are missing), else sklearn digits."""
    return load_mnist(data_dir) if data_dir else load_sklearn_digits(seed)


def shift_images(x: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
    """Move each image by up to ``max_shift`` pixels (zero fill): cheap, label-preserving augmentation.

    Fresh variations every epoch are where a *served* teacher earns its keep: their
    soft labels cannot be computed once in advance, so the student asks the teacher.
    """
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy = rng.integers(0, 2 * max_shift + 1, size=n)
    dx = rng.integers(0, 2 * max_shift + 1, size=n)
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    return padded[np.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


class SampleListReader:
    """An EDL-style sample-list reader: ``reader()`` yields lists of ``(img, label)`` samples.

    A class rather than a closure so it pickles: zdistill may run the reader in its own
    process.  ``img`` is ``float32 (1, H, W)``, ``label`` is ``int64 (1,)`` as in Paddle's
    MNIST examples.  Each call shuffles (and optionally shifts) afresh; the epoch seed mixes
    ``epoch`` (set by the training loop) with a per-object call count, so epochs differ
    whether the reader runs in this process, a fresh child per epoch, or one long-lived child.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = True,
                 augment: bool = False, seed: int = 0) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._calls = 0

    def __len__(self) -> int:
        """Batches per epoch (for progress bars)."""
        return -(-len(self.y) // self.batch_size)

    def __call__(self) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        self._calls += 1
        rng = np.random.default_rng([self.seed, self.epoch, self._calls])
        order = rng.permutation(len(self.y)) if self.shuffle else np.arange(len(self.y))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            imgs = shift_images(self.x[idx], rng) if self.augment else self.x[idx]
            labels = self.y[idx]
            yield [(imgs[i], labels[i : i + 1]) for i in range(len(idx))]
