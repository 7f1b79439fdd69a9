"""Tasks: the unit of work of a DistillReader pipeline, and the edge to the user's reader.

A task is a run of consecutive samples as *arrays*, one per slot (``ins``), with the
reader's own batch sizes alongside so the output can be cut back into the same
batches.  The reader's samples are stacked into arrays once, here, at the input
edge; from then on only arrays move (as raw frames), and per-sample tuples are made
again only at the output edge, as views (:func:`split_output`).

A slot's array in a task has one dtype that holds every value of the task exactly
(:meth:`TaskBuilder._cut`): the values come back to the training loop unchanged,
and a value the teacher's feed dtype cannot hold is an error (:func:`check_values`),
never a wrapped or overflowed number.

Predictions are named ``p:<name>`` on the wire; slots travel in shared memory
(:mod:`zdistill.student.shm`) under their own names.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zdistill.errors import ConfigError
from zdistill.spec import TensorSpec


class ReaderType(enum.StrEnum):
    """How the user's reader yields data (EDL's three kinds)."""

    SAMPLE = "sample"
    SAMPLE_LIST = "sample_list"
    BATCH = "batch"


def predict_key(name: str) -> str:
    return "p:" + name


@dataclass(frozen=True)
class CacheSlots:
    """The teacher-output cache's arrays in a task's slot, beside the reader's feeds.

    The producer lays them out (:meth:`layout`) and fills them; the worker and the sink
    read them (:meth:`of`).  In shared memory they are named arrays like the feeds, under
    names with a ``:``, which this class alone knows.
    """

    stamp: np.ndarray  # (epoch, task id), written before anything else of the task
    keys: np.ndarray  # each row's cache key (rows x 16 bytes)
    hits: np.ndarray  # per row: the cache answered it
    audit: np.ndarray  # per row: cached, but asked of the teacher anyway, to compare with the cache
    answers: dict[str, np.ndarray]  # per output: the cache's answers (rows it had none for: zeros)

    @staticmethod
    def layout(rows: int, fetches: Sequence[TensorSpec]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shapes and dtypes of the cache's arrays for a task of ``rows`` rows."""
        return {
            _STAMP: ((2,), np.dtype(np.int64)), _KEYS: ((rows, 16), np.dtype(np.uint8)),
            _HITS: ((rows,), np.dtype(bool)), _AUDIT: ((rows,), np.dtype(bool)),
            **{_ANSWER + f.name: ((rows, *f.shape), np.dtype(f.dtype)) for f in fetches},
        }

    @classmethod
    def of(cls, slots: Mapping[str, np.ndarray]) -> CacheSlots:
        """The cache's arrays among a slot's (laid out by :meth:`layout`)."""
        answers = {name[len(_ANSWER):]: arr for name, arr in slots.items() if name.startswith(_ANSWER)}
        return cls(slots[_STAMP], slots[_KEYS], slots[_HITS], slots[_AUDIT], answers)


_STAMP, _KEYS, _HITS, _AUDIT, _ANSWER = "i:", "k:", "h:", "a:", "c:"  # CacheSlots' names in a slot


Allocator = Callable[[int, dict[str, tuple[tuple[int, ...], np.dtype]]], tuple[dict[str, np.ndarray], Any]]


@dataclass
class BuiltTask:
    """A task as the producer builds it: consecutive samples of one epoch in slot arrays, plus
    the reader batch sizes.  What the producer tells the dispatcher of it is a
    :class:`zdistill.student.protocol.Task`."""

    task_id: int
    slots: dict[str, np.ndarray]
    sizes: list[int] | None  # None: a sample reader, every row is yielded on its own
    descriptor: Any = None  # where the slots live in shared memory (zdistill.student.shm), if they do

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.slots.values())

    @property
    def rows(self) -> int:
        return len(next(iter(self.slots.values())))


def check_feed(slot: str, row_shape: tuple[int, ...], spec: TensorSpec) -> None:
    """Raise a clear error unless rows of ``row_shape`` can be fed to ``spec``.

    A row whose number of values equals the feed's is accepted and reshaped on the
    way to the teacher, as EDL did (a flat 784-vector for a 1x28x28 feed).
    """
    if spec.matches(row_shape):
        return
    want = int(np.prod(spec.shape)) if all(d >= 0 for d in spec.shape) else None
    if want is not None and int(np.prod(row_shape)) == want:
        return
    raise ConfigError(
        f"slot {slot!r} has samples of shape {list(row_shape)}, but the teacher's feed {spec.name!r} "
        f"expects {list(spec.shape)}" + (f" ({want} values)" if want is not None else "")
    )


def _holds(dtype: np.dtype, source: np.dtype) -> bool:
    """True when every value of ``source`` is exactly a value of ``dtype``.

    numpy calls int64 -> float64 a safe cast, but float64 holds integers exactly only
    up to 2**53, so an integer source is held by a float dtype only when the float's
    mantissa has as many bits as the integer.
    """
    if not np.can_cast(source, dtype, "safe"):
        return False
    if source.kind in "iu" and dtype.kind in "fc":
        return source.itemsize * 8 - (source.kind == "i") <= np.finfo(dtype).nmant + 1
    return True


def _cast_quietly(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` in ``dtype`` without numpy's warnings: whoever calls it checks what changed."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        return arr.astype(dtype)


def _changed(cast: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Where ``cast`` (``original`` in another dtype) is not exactly the original value (NaN stays NaN)."""
    back = _cast_quietly(cast, original.dtype)
    same = back == original
    if original.dtype.kind in "fc":
        same |= np.isnan(original) & np.isnan(back)
    return ~same


def check_values(arr: np.ndarray, spec: TensorSpec) -> None:
    """Raise :class:`ConfigError`, naming the slot and the values, unless the feed's dtype can take ``arr``.

    The cast to the feed's dtype must never change a value silently: an integer or bool
    feed must hold every value exactly (no wrapping, no dropped fraction, no NaN), a
    float feed takes the nearest value of its dtype (as a model's input is rounded
    anyway) but no finite value may overflow to infinity, and no imaginary part may be
    dropped.  Values within the float feed's range (the common case: float64 samples for
    a float32 model) are known to fit from their minimum and maximum, without a cast.
    """
    dtype = np.dtype(spec.dtype)
    if arr.dtype == dtype or _holds(dtype, arr.dtype):
        return
    if dtype.kind in "fc" and arr.dtype.kind in "biuf":
        most = np.finfo(dtype).max
        if not arr.size or (-most <= arr.min() and arr.max() <= most):  # False with a NaN: looked at below
            return
    cast = _cast_quietly(arr, dtype)
    if dtype.kind in "fc":
        lost = np.isinf(cast) & ~np.isinf(arr)
        if arr.dtype.kind == "c" and dtype.kind == "f":
            lost |= arr.imag != 0
    else:
        lost = _changed(cast, arr)
    if lost.any():
        raise ConfigError(f"slot {spec.name!r} holds values the teacher's feed ({dtype}) cannot take: "
                          f"{arr[lost][:3].tolist()} would become {cast[lost][:3].tolist()}")


def to_feed(arr: np.ndarray, spec: TensorSpec, check: bool = True) -> np.ndarray:
    """A slot array as the teacher wants it: its per-row shape and dtype (no copy if already so).

    ``check`` raises where the cast would change a value (:func:`check_values`);
    ``check=False`` is for values already checked against this spec.
    """
    if not spec.matches(arr.shape[1:]):
        arr = arr.reshape(len(arr), *spec.shape)
    if check:
        check_values(arr, spec)
    return _cast_quietly(arr, np.dtype(spec.dtype)) if arr.dtype != np.dtype(spec.dtype) else arr


def feeds_mismatch(slots: Sequence[TensorSpec], feeds: Sequence[TensorSpec]) -> str | None:
    """Why a teacher taking ``feeds`` cannot be sent tasks built for ``slots``, or None if it can.

    ``slots`` are the feeds of the teacher the tasks were built for; another teacher
    must take the same names, rows of as many values (a reshape is free), and a dtype
    the values cast to within their kind (float32 to float16, not float to int).
    """
    mine = {s.name: s for s in slots}
    absent = [f.name for f in feeds if f.name not in mine]
    if absent:
        return f"it takes feeds {absent}, but this reader's tasks hold {sorted(mine)}"
    for feed in feeds:
        slot = mine[feed.name]
        try:
            check_feed(feed.name, slot.shape, feed)
        except ConfigError:
            if all(d >= 0 for d in slot.shape):
                return (f"its feed {feed.name!r} takes rows of shape {list(feed.shape)}, "
                        f"this reader's are {list(slot.shape)}")
        if not np.can_cast(np.dtype(slot.dtype), np.dtype(feed.dtype), "same_kind"):
            return f"its feed {feed.name!r} takes {feed.dtype}, this reader's rows are {slot.dtype}"
    return None


class TaskBuilder:
    """Turns what the user's reader yields into tasks of about ``task_rows`` rows.

    Whole reader batches are packed into one task until it holds ``task_rows`` rows or
    ``task_bytes`` bytes, because the cost of the pipeline is per message, not per
    byte, while memory is per byte.  The arrays are built in place where ``allocate``
    says (shared memory, in the pipeline), so stacking the samples is the only copy.

    An empty reader batch (or sample list) rides in the task beside its neighbours as a
    size of 0, so the output has as many batches as the reader yielded; empty batches
    after the epoch's last row make a task of no rows, which needs no teacher.
    """

    def __init__(
        self,
        reader_type: ReaderType,
        ins: Sequence[str],
        feeds: Sequence[TensorSpec],
        task_rows: int,
        task_bytes: int,
        allocate: Allocator,
    ):
        self.reader_type = reader_type
        self.ins = list(ins)
        self.feeds = {spec.name: spec for spec in feeds}
        self.task_rows = max(1, task_rows)
        self.task_bytes = task_bytes
        self.allocate = allocate
        self._row_bytes = 0  # bytes of one row of all slots, learnt from the first task
        self._next_id = 0
        self._parts: list[list[Any]] = [[] for _ in self.ins]  # per slot: samples or batch arrays
        self._sizes: list[int] = []
        self._rows = 0

    @property
    def tasks_made(self) -> int:
        return self._next_id

    def add(self, item: Any) -> Iterator[BuiltTask]:
        """Take one item from the user's reader; yield a task whenever one is full."""
        if self.reader_type is ReaderType.SAMPLE:
            self._add_sample(item)
            n = 1
        elif self.reader_type is ReaderType.SAMPLE_LIST:
            if not isinstance(item, (list, tuple)):
                raise ConfigError(f"a sample list generator must yield lists of samples, got {type(item).__name__}")
            for sample in item:
                self._add_sample(sample)
            n = len(item)
        else:
            n = self._add_batch(item)
        self._sizes.append(n)
        self._rows += n
        if self._rows and (self._rows >= self.task_rows or self._rows * self._row_bytes >= self.task_bytes):
            yield self._cut()

    def flush(self) -> Iterator[BuiltTask]:
        """The last, partial task of an epoch (of no rows when only empty batches are left)."""
        if self._sizes:
            yield self._cut()

    def _arity(self, item: Any, what: str) -> Sequence[Any]:
        if not isinstance(item, (list, tuple)) or len(item) != len(self.ins):
            got = len(item) if isinstance(item, (list, tuple)) else type(item).__name__
            raise ConfigError(f"each {what} must have {len(self.ins)} slots {self.ins}, got {got}")
        return item

    def _add_sample(self, sample: Any) -> None:
        for part, value in zip(self._parts, self._arity(sample, "sample"), strict=True):
            part.append(value)
        if not self._row_bytes:
            self._row_bytes = sum(_as_array(name, v).nbytes for name, v in zip(self.ins, sample, strict=True))

    def _add_batch(self, batch: Any) -> int:
        arrays = [_as_array(name, a) for name, a in zip(self.ins, self._arity(batch, "batch"), strict=True)]
        rows = {a.shape[0] if a.ndim else -1 for a in arrays}
        if len(rows) != 1 or min(rows) < 0:
            shapes = {name: list(a.shape) for name, a in zip(self.ins, arrays, strict=True)}
            raise ConfigError(f"every slot of a batch needs the same number of rows, got shapes {shapes}")
        n = rows.pop()
        if n or not self._rows:  # an empty batch holds no value: it decides nothing once a row is there
            for part, arr in zip(self._parts, arrays, strict=True):
                part.append(arr)
        if not self._row_bytes and n:
            self._row_bytes = sum(a.nbytes for a in arrays) // n
        return n

    def _plan(self, name: str, part: list[Any]) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of a slot's task array.

        A batch reader's: every batch's dtype promoted (empty batches count only in a
        task of no rows).  A sample reader's: read off the first sample, which
        :meth:`_stacked` checks every other sample has too.
        """
        if self.reader_type is ReaderType.BATCH:
            full = [p for p in part if len(p)] or part
            return (sum(len(p) for p in full), *full[0].shape[1:]), np.result_type(*{p.dtype for p in full})
        if not part:  # a task of empty sample lists only: its arrays are never read
            return (0,), np.dtype(np.float64)
        first = _as_array(name, part[0])
        return (len(part), *first.shape), first.dtype

    def _stacked(self, slots: dict[str, np.ndarray]) -> bool:
        """Stack a sample reader's values into ``slots``; False when a sample's dtype or shape is not the first's."""
        try:
            for name, part in zip(self.ins, self._parts, strict=True):
                if part:
                    np.stack(part, out=slots[name], casting="no")
        except (ValueError, TypeError):
            return False
        return True

    def _concatenate(self, name: str, out: np.ndarray, part: list[np.ndarray]) -> None:
        """A batch reader's batches into ``out`` (their promoted dtype), checking that it holds every value."""
        full = [p for p in part if len(p)]
        if not full:
            return
        try:
            np.concatenate(full, out=out)
        except ValueError as exc:
            raise ConfigError(f"slot {name!r}: batches cannot be joined into one array ({exc})") from None
        start = 0
        for p in full:
            if p.dtype != out.dtype and not _holds(out.dtype, p.dtype):
                _check_held(name, out[start : start + len(p)], p)
            start += len(p)

    def _check(self, specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        for name, (shape, dtype) in specs.items():
            if dtype.kind not in "biufc":
                raise ConfigError(f"slot {name!r} holds {dtype} values; zdistill sends numbers and bools")
            if name in self.feeds and shape[0]:
                check_feed(name, shape[1:], self.feeds[name])

    def _cut(self) -> BuiltTask:
        specs = {name: self._plan(name, part) for name, part in zip(self.ins, self._parts, strict=True)}
        self._check(specs)
        slots, descriptor = self.allocate(self._next_id, specs)
        if self.reader_type is ReaderType.BATCH:
            for name, part in zip(self.ins, self._parts, strict=True):
                self._concatenate(name, slots[name], part)
        elif not self._stacked(slots):  # a sample differs from the first: stack them all in a dtype that holds each
            built = {name: self._stack(name, part) for name, part in zip(self.ins, self._parts, strict=True)}
            specs = {name: (arr.shape, arr.dtype) for name, arr in built.items()}
            self._check(specs)
            slots, descriptor = self.allocate(self._next_id, specs)  # the same slot, laid out anew
            for name, arr in built.items():
                np.copyto(slots[name], arr)
        rows = len(next(iter(slots.values())))
        for name, arr in slots.items():
            if name in self.feeds and rows:
                check_values(arr, self.feeds[name])  # before a teacher gets a value its dtype cannot hold
        sizes = None if self.reader_type is ReaderType.SAMPLE else self._sizes
        task = BuiltTask(self._next_id, slots, sizes, descriptor)
        self._next_id += 1
        self._parts = [[] for _ in self.ins]
        self._sizes, self._rows = [], 0
        return task

    def _stack(self, name: str, part: list[Any]) -> np.ndarray:
        """A sample slot's values in one array of the dtype numpy promotes them all to, if it holds each exactly.

        Each value counts as the array ``np.asarray`` makes of it (a Python int as int64,
        or uint64 above int64's range; a float as float64).  A value that no number dtype
        holds (an int beyond uint64), or a mix whose promoted dtype would change a value
        (int64 and uint64 make float64, exact for integers only up to 2**53), is an error.
        """
        arrays = [_as_array(name, v) for v in part]
        for value, arr in zip(part, arrays, strict=True):
            if arr.dtype.kind not in "biufc":
                raise ConfigError(f"slot {name!r} holds {value!r:.80}, which no number dtype holds "
                                  f"({arr.dtype}); zdistill sends numbers and bools")
        dtypes = {a.dtype for a in arrays}
        try:
            built = np.stack(arrays, dtype=np.result_type(*dtypes))
        except ValueError as exc:
            raise ConfigError(f"slot {name!r}: samples cannot be stacked into one array ({exc})") from None
        for dtype in dtypes:
            if dtype != built.dtype and not _holds(built.dtype, dtype):
                rows = [i for i, a in enumerate(arrays) if a.dtype == dtype]
                _check_held(name, built[rows], np.stack([arrays[i] for i in rows]))
        return built


def _as_array(slot: str, value: Any) -> np.ndarray:
    """``np.asarray(value)``, or a ConfigError naming the slot when numpy cannot make one array of it."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # a ragged list, or an object numpy refuses
        raise ConfigError(f"slot {slot!r} holds {value!r:.80}, which is not one array ({exc})") from None


def _check_held(name: str, stacked: np.ndarray, original: np.ndarray) -> None:
    """Raise unless ``stacked`` (values of one task, in the task's dtype) holds ``original`` exactly."""
    lost = _changed(stacked, original)
    if lost.any():
        raise ConfigError(
            f"slot {name!r} mixes values that no one dtype holds exactly: in a task of {stacked.dtype}, "
            f"{original.dtype} values {original[lost][:3].tolist()} would become {stacked[lost][:3].tolist()}; "
            "give the slot one dtype that holds them all (e.g. np.float64 or np.int64 for every sample)"
        )


def split_output(
    reader_type: ReaderType, slots: Sequence[np.ndarray], predicts: Sequence[np.ndarray], sizes: Iterable[int] | None
) -> Iterator[Any]:
    """Cut a finished task back into what EDL's reader yields, as views of its arrays."""
    columns = [*slots, *predicts]
    if reader_type is ReaderType.SAMPLE:
        yield from zip(*columns, strict=True)
        return
    start = 0
    for n in sizes or ():
        part = [c[start : start + n] for c in columns]
        yield tuple(part) if reader_type is ReaderType.BATCH else list(zip(*part, strict=True))
        start += n
