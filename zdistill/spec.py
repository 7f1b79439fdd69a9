"""The types both sides of a teacher connection speak: named tensors, arrays, model ids, meta.

The teacher declares its feeds and fetches as :class:`TensorSpec` and reports them in
its ``meta`` reply (:class:`TeacherMeta`); the student checks its slots against them.
Neither side owns these types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np

from zdistill.errors import ConfigError, WireError

Arrays = dict[str, np.ndarray]

MAX_MODEL_ID = 256  # characters; a model id travels in every meta reply and keys a student's cache
MAX_SPECS = 1024  # feeds or fetches of one teacher
MAX_TEXT = 4096  # a teacher's description or device


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor's dtype and *per-row* shape (the batch axis left out; -1 = any size)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    dtype: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    shape: Annotated[tuple[Annotated[int, msgspec.Meta(ge=-1)], ...], msgspec.Meta(max_length=32)]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))

    @property
    def variable(self) -> bool:
        """Whether rows may differ in length: the first per-row dim is -1 (such rows travel as :class:`Ragged`)."""
        return self.shape[:1] == (-1,)

    def matches(self, row_shape: Sequence[int]) -> bool:
        """True when a row of ``row_shape`` fits this spec (-1 matches any size)."""
        return len(row_shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, row_shape, strict=True)
        )

    def example(self, rows: int) -> np.ndarray:
        """A zero batch of ``rows`` rows, variable sizes set to 1: for warm-up runs."""
        return np.zeros((rows, *(1 if d < 0 else d for d in self.shape)), dtype=self.dtype)


@dataclass(frozen=True, eq=False)
class Ragged:
    """Rows of different lengths along their first axis: one ``values`` array and each row's length.

    The layout of Paddle's LoD tensors and Arrow's list arrays: row ``i`` is
    ``values[offsets[i]:offsets[i + 1]]``, so a batch of token sequences is two
    contiguous arrays whatever its row count, and a row is a view, never a copy.
    ``lengths`` is int64 and sums to ``len(values)``; :meth:`checked` is the one place
    that holds a peer's or a user's pair to that.
    """

    values: np.ndarray  # [sum(lengths), *inner]
    lengths: np.ndarray  # int64 [rows]

    @classmethod
    def checked(cls, values: np.ndarray, lengths: np.ndarray, what: str = "ragged array") -> Ragged:
        """``Ragged(values, lengths)`` once the lengths are non-negative and add up; ConfigError naming ``what``."""
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
            raise ConfigError(f"{what}: lengths must be a 1-D integer array, got {lengths.dtype} {lengths.shape}")
        if values.ndim < 1:
            raise ConfigError(f"{what}: values must have a length axis, got a 0-d array")
        if lengths.size and int(lengths.min()) < 0:
            raise ConfigError(f"{what}: a row has negative length {int(lengths.min())}")
        total = int(lengths.sum(dtype=np.int64)) if lengths.size else 0
        if total != values.shape[0]:
            raise ConfigError(f"{what}: lengths add up to {total} but values hold {values.shape[0]}")
        return cls(values, lengths.astype(np.int64, copy=False))

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray], what: str = "ragged array") -> Ragged:
        """One :class:`Ragged` of ``rows`` (same dtype and inner shape; any length): one copy, into ``values``."""
        arrays = [np.asarray(row) for row in rows]
        if not arrays:
            raise ConfigError(f"{what}: no rows")
        inner, dtype = arrays[0].shape[1:], arrays[0].dtype
        for i, arr in enumerate(arrays):
            if arr.ndim < 1 or arr.shape[1:] != inner or arr.dtype != dtype:
                raise ConfigError(f"{what}: row {i} is {arr.dtype} {arr.shape}, row 0 is {dtype} "
                                  f"(n, {', '.join(map(str, inner))}): rows may differ in length only")
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        return cls(np.concatenate(arrays), lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """The bytes it takes (values and lengths), as ``ndarray.nbytes`` counts an array's."""
        return self.values.nbytes + self.lengths.nbytes

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """The shape of one token: what follows the length axis."""
        return tuple(self.values.shape[1:])

    @property
    def offsets(self) -> np.ndarray:
        """Where each row starts in ``values``, and where the last one ends: ``len(self) + 1`` int64."""
        out = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def rows(self) -> list[np.ndarray]:
        """Each row as a view of ``values``.

        Plain slices: ``np.split`` takes about 1.4 us a row against 0.3 us, and was the
        largest cost of a batch of sequences in the training loop's thread in a profile of
        ``bench/bench_sequences.py``.
        """
        bounds = self.offsets.tolist()
        values = self.values
        return [values[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]

    def padded(self, length: int | None = None, pad: int | float = 0) -> np.ndarray:
        """``[rows, length, *inner]``, each row followed by ``pad``; ``length`` defaults to the longest row."""
        longest = int(self.lengths.max()) if len(self) else 0
        length = longest if length is None else length
        if length < longest:
            raise ConfigError(f"cannot pad rows of up to {longest} to length {length}")
        out = np.full((len(self), length, *self.inner_shape), pad, dtype=self.dtype)
        mask = np.arange(length) < self.lengths[:, None]
        out[mask] = self.values
        return out

    @classmethod
    def unpad(cls, padded: np.ndarray, lengths: np.ndarray) -> Ragged:
        """The first ``lengths[i]`` entries of each row of ``padded`` (``[rows, >= max(lengths), ...]``)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        mask = np.arange(padded.shape[1]) < lengths[:, None]
        inner = padded.shape[2:]
        if not inner or 0 in inner:  # a token of one value, or of none: nothing to gain from token_items
            return cls(padded[mask], lengths)
        flat = np.ascontiguousarray(padded).reshape(padded.shape[0] * padded.shape[1], *inner)
        kept = token_items(flat).reshape(mask.shape)[mask]
        return cls(kept.view(padded.dtype).reshape(-1, *inner), lengths)


def token_items(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous ``[n, *inner]`` array as ``[n]`` opaque items of one token's bytes (a view).

    numpy's boolean and fancy indexing copy ``[n, k]`` value by value along ``k``; items of
    ``k`` values' bytes move a token at once, 2.5-8x faster for per-token outputs, which
    a teacher's socket thread cuts by row and gathers back into request order (the largest
    costs of that thread in a profile of ``bench/bench_sequences.py``).  A 1-D array, or
    tokens of no values, come back as they are: there is nothing to gain.
    """
    items = int(np.prod(arr.shape[1:]))
    if arr.ndim < 2 or items == 0:
        return arr
    if not arr.flags.c_contiguous:  # a reshape would copy, and writes through the view would be lost
        raise ValueError(f"token_items needs a C-contiguous array, got strides {arr.strides}")
    return arr.reshape(len(arr), items).view(np.dtype((np.void, arr.itemsize * items)))[:, 0]


Tensor = np.ndarray | Ragged  # a named input or output: dense rows, or rows of different lengths
Tensors = dict[str, Tensor]


class TeacherMeta(msgspec.Struct, frozen=True, kw_only=True):
    """A teacher's ``meta`` reply, checked once where it is received (:meth:`parse`).

    A student's reader and workers, and the discovery register, all decide from it
    whether a teacher can serve; parsing it in one place means they agree on what a
    malformed one is.  Fields a newer teacher adds are ignored.
    """

    feeds: Annotated[list[TensorSpec], msgspec.Meta(max_length=MAX_SPECS)] = []
    fetches: Annotated[list[TensorSpec], msgspec.Meta(max_length=MAX_SPECS)] = []
    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] = 1
    instances: Annotated[int, msgspec.Meta(ge=1)] = 1
    model_id: str | None = None  # None: a teacher older than the cache (check_model_id bounds a real one)
    fingerprint: dict[str, Any] | None = None  # its answers to the probe batch (zdistill.fingerprint.usable)
    device: Annotated[str, msgspec.Meta(max_length=256)] = ""
    description: str = ""  # free text: long ones are cut where they are kept, not refused

    @classmethod
    def parse(cls, reply: Mapping[str, Any]) -> TeacherMeta:
        """The typed meta of a teacher's reply header; WireError naming the bad field."""
        try:
            return msgspec.convert(reply, cls)
        except msgspec.ValidationError as exc:
            raise WireError(f"malformed meta: {exc}") from None

    def fetches_named(self, names: Sequence[str]) -> list[TensorSpec]:
        """The fetches (outputs) called ``names``, in that order; KeyError for one the teacher has not."""
        specs = {f.name: f for f in self.fetches}
        return [specs[name] for name in names]


def check_model_id(model_id: object, what: str = "--model-id", limit: int = MAX_MODEL_ID) -> str:
    """``model_id`` if it is 1 to ``limit`` printable characters, else a :class:`ConfigError` naming ``what``."""
    if not isinstance(model_id, str) or not 1 <= len(model_id) <= limit or not model_id.isprintable():
        raise ConfigError(f"{what} must be 1 to {limit} printable characters (no tabs or newlines), "
                          f"got {model_id!r:.80}")
    return model_id
