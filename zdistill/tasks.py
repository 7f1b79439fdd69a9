"""Tasks: the unit of work of a DistillReader pipeline, and the edge to the user's reader.

A task is a run of consecutive samples as *arrays*, one per slot (``ins``), with the
reader's own batch sizes alongside so the output can be cut back into the same
batches.  The reader's samples are stacked into arrays once, here, at the input
edge; from then on only arrays move (as raw frames), and per-sample tuples are made
again only at the output edge, as views (:func:`split_output`).

Predictions are named ``p:<name>`` on the wire; slots travel in shared memory
(:mod:`zdistill.shm`) under their own names.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zdistill.errors import ConfigError
from zdistill.model import TensorSpec


class ReaderType(enum.StrEnum):
    """How the user's reader yields data (EDL's three kinds)."""

    SAMPLE = "sample"
    SAMPLE_LIST = "sample_list"
    BATCH = "batch"


def predict_key(name: str) -> str:
    return "p:" + name


def cached_key(name: str) -> str:
    """A task slot array of the predictions the teacher-output cache had (rows not cached: zeros)."""
    return "c:" + name


KEYS_SLOT = "k:"  # a task slot array: each row's cache key (rows x 16 bytes)
HITS_SLOT = "h:"  # a task slot array: which rows the cache answered
ID_SLOT = "i:"  # a task slot array: (epoch, task), written before anything else of the task
AUDIT_SLOT = "a:"  # a task slot array: cached rows asked of the teacher anyway, to compare with the cache


Allocator = Callable[[int, dict[str, tuple[tuple[int, ...], np.dtype]]], tuple[dict[str, np.ndarray], Any]]


@dataclass
class Task:
    """Consecutive samples of one epoch: slot arrays plus the reader batch sizes."""

    task_id: int
    slots: dict[str, np.ndarray]
    sizes: list[int] | None  # None: a sample reader, every row is yielded on its own
    descriptor: Any = None  # where the slots live in shared memory (zdistill.shm), if they do

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


def to_feed(arr: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """A slot array as the teacher wants it: its per-row shape and dtype (no copy if already so)."""
    if not spec.matches(arr.shape[1:]):
        arr = arr.reshape(len(arr), *spec.shape)
    return arr.astype(spec.dtype, copy=False)


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

    def add(self, item: Any) -> Iterator[Task]:
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
        if n:
            self._sizes.append(n)
            self._rows += n
        if self._rows >= self.task_rows or self._rows * self._row_bytes >= self.task_bytes:
            yield self._cut()

    def flush(self) -> Iterator[Task]:
        """The last, partial task of an epoch."""
        if self._rows:
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
            self._row_bytes = sum(np.asarray(v).nbytes for v in sample)

    def _add_batch(self, batch: Any) -> int:
        arrays = [np.asarray(a) for a in self._arity(batch, "batch")]
        rows = {a.shape[0] if a.ndim else -1 for a in arrays}
        if len(rows) != 1 or min(rows) < 0:
            shapes = {name: list(a.shape) for name, a in zip(self.ins, arrays, strict=True)}
            raise ConfigError(f"every slot of a batch needs the same number of rows, got shapes {shapes}")
        for part, arr in zip(self._parts, arrays, strict=True):
            part.append(arr)
        n = rows.pop()
        if not self._row_bytes and n:
            self._row_bytes = sum(a.nbytes for a in arrays) // n
        return n

    def _plan(self, part: list[Any]) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of a slot's task array, read off its first element."""
        if self.reader_type is ReaderType.BATCH:
            return (sum(len(p) for p in part), *part[0].shape[1:]), np.result_type(*part)
        first = np.asarray(part[0])
        return (len(part), *first.shape), first.dtype

    def _fill(self, out: np.ndarray, part: list[Any]) -> None:
        if self.reader_type is ReaderType.BATCH:
            np.concatenate(part, out=out)
        else:
            np.stack(part, out=out)

    def _cut(self) -> Task:
        specs = {name: self._plan(part) for name, part in zip(self.ins, self._parts, strict=True)}
        for name, (shape, dtype) in specs.items():
            if dtype.kind not in "biufc":
                raise ConfigError(f"slot {name!r} holds {dtype} values; zdistill sends numbers and bools")
            if name in self.feeds:
                check_feed(name, shape[1:], self.feeds[name])
        slots, descriptor = self.allocate(self._next_id, specs)
        try:
            for name, part in zip(self.ins, self._parts, strict=True):
                self._fill(slots[name], part)
        except (ValueError, TypeError):  # a later sample differs from the first: find out how, then retry
            slots, descriptor = self._cut_slowly()
        sizes = None if self.reader_type is ReaderType.SAMPLE else self._sizes
        task = Task(self._next_id, slots, sizes, descriptor)
        self._next_id += 1
        self._parts = [[] for _ in self.ins]
        self._sizes, self._rows = [], 0
        return task

    def _cut_slowly(self) -> tuple[dict[str, np.ndarray], Any]:
        built = {}
        for name, part in zip(self.ins, self._parts, strict=True):
            try:
                built[name] = np.concatenate(part) if self.reader_type is ReaderType.BATCH else np.stack(part)
            except ValueError as exc:
                raise ConfigError(f"slot {name!r}: samples cannot be stacked into one array ({exc})") from None
            if built[name].dtype.kind not in "biufc":
                raise ConfigError(f"slot {name!r} holds {built[name].dtype} values; zdistill sends numbers and bools")
            if name in self.feeds:
                check_feed(name, built[name].shape[1:], self.feeds[name])
        slots, descriptor = self.allocate(self._next_id, {k: (v.shape, v.dtype) for k, v in built.items()})
        for name, arr in built.items():
            np.copyto(slots[name], arr)
        return slots, descriptor


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
