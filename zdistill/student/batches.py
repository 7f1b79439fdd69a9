"""Tasks: the unit of work of a DistillReader pipeline, and the edge to the user's reader.

A task is a run of consecutive samples as arrays, one per slot (``ins``), with the reader's
batch sizes alongside so the output can be cut back into the same batches: samples are
stacked once, at the input edge, and made again only at the output edge, as views
(:func:`split_output`).  A slot's array holds every value of its task exactly, in one dtype,
and a value the teacher's feed dtype cannot hold is an error (:func:`check_values`), never
a wrapped or overflowed number.

A slot whose samples differ in length along their first axis, or that feeds a variable-length
feed (first per-row dim -1), is *ragged*: its values end to end and ``l:<name>`` each
sample's length (:class:`~zdistill.spec.Ragged`'s layout).  ``f:<name>`` (one int64 per
reader batch) says in which form a batch reader gave a slot (a list of per-sample arrays, as
EDL's ERNIE example does), so the loop gets it back the same way.  Predictions are
``p:<name>`` on the wire; slots travel in shared memory (:mod:`zdistill.student.shm`) under
their own names.
"""

from __future__ import annotations

import enum
import itertools
import logging
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zdistill.errors import ConfigError
from zdistill.spec import Ragged, Tensor, TensorSpec

log = logging.getLogger(__name__)


class ReaderType(enum.StrEnum):
    """How the user's reader yields data (EDL's three kinds)."""

    SAMPLE = "sample"
    SAMPLE_LIST = "sample_list"
    BATCH = "batch"


def predict_key(name: str) -> str:
    return "p:" + name


_LENGTHS, _FORMS = "l:", "f:"  # a ragged slot's lengths; a slot's form per reader batch
PROBE_EVERY = 64  # one task in this many (and each epoch's first) checks that the reader leaves its items be
AS_LIST = -1  # in a slot's forms: this reader batch gave the slot as a list of per-sample arrays
_STAMP, _KEYS, _HITS, _AUDIT, _ANSWER = "i:", "k:", "h:", "a:", "c:"  # CacheSlots' names in a slot
_OWN = (_LENGTHS, _FORMS, _STAMP, _KEYS, _HITS, _AUDIT, _ANSWER)  # how a task's own arrays' names start
Spec = tuple[tuple[int, ...], np.dtype]  # an array's shape and dtype in a slot
Allocator = Callable[[int, int, dict[str, Spec]], tuple[dict[str, np.ndarray], Any]]


def check_slot_names(ins: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``ins`` are distinct names that none of a task's own arrays
    take: a task's slot holds each reader slot under its name, beside a sequence's lengths
    (``l:<name>``), a slot's forms (``f:<name>``) and the cache's arrays (``c:<prediction>``...).
    A slot of such a name, or one given twice, would come back holding another array's values."""
    seen: set[str] = set()
    for name in ins:
        if not isinstance(name, str):
            raise ConfigError(f"slot names must be strings, got {name!r}")
        own = next((prefix for prefix in _OWN if name.startswith(prefix)), None)
        if own is not None:
            raise ConfigError(f"slot name {name!r} starts with {own!r}, which names the arrays zdistill keeps "
                              f"beside the slots ({', '.join(_OWN)}): rename the slot")
        if name in seen:
            raise ConfigError(f"slot name {name!r} is given twice in ins {list(ins)}: each slot needs its own name")
        seen.add(name)


def slot_tensors(slots: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, Tensor]:
    """The slots called ``names`` as the teacher takes them: a ragged one's values and lengths as one Ragged."""
    out: dict[str, Tensor] = {}
    for name in names:
        lengths = slots.get(_LENGTHS + name)
        out[name] = slots[name] if lengths is None else Ragged.checked(slots[name], lengths, f"slot {name!r}")
    return out


def slot_forms(slots: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """How each reader batch gave slot ``name`` (:data:`AS_LIST`, or a ragged slot's row length); None: as arrays."""
    return slots.get(_FORMS + name)


def row_shape(tensor: Tensor) -> tuple[int, ...]:
    """The shape of one row: -1 first for rows of different lengths."""
    return (-1, *tensor.inner_shape) if isinstance(tensor, Ragged) else tuple(tensor.shape[1:])


def select(tensor: Tensor, rows: slice | np.ndarray) -> Tensor:
    """The ``rows`` (a slice of step 1, or indices) of a tensor: views for a slice."""
    if not isinstance(tensor, Ragged):
        return tensor[rows]
    offsets = tensor.offsets
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(len(tensor))
        stop = max(start, stop)
        return Ragged(tensor.values[offsets[start] : offsets[stop]], tensor.lengths[start:stop])
    return Ragged(tensor.values[spans(offsets[:-1][rows], tensor.lengths[rows])], tensor.lengths[rows])


def spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``starts[i] .. starts[i] + lengths[i]``, one run after another, in one array."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)


def place(tensor: Tensor, rows: np.ndarray, values: Tensor) -> None:
    """Write ``values`` into the ``rows`` (indices) of ``tensor``: a Ragged's rows keep their lengths,
    which must be those of ``values``' rows (a ValueError otherwise)."""
    if not isinstance(tensor, Ragged):
        tensor[rows] = values
        return
    if not isinstance(values, Ragged) or not np.array_equal(tensor.lengths[rows], values.lengths):
        raise ValueError("per-token rows written into rows of other lengths")
    tensor.values[spans(tensor.offsets[:-1][rows], tensor.lengths[rows])] = values.values


def empty_rows(tensor: Tensor, rows: np.ndarray) -> Tensor:
    """Room for the ``rows`` (indices) of ``tensor``, uninitialised: a Ragged's rows of their lengths."""
    if not isinstance(tensor, Ragged):
        return np.empty((len(rows), *tensor.shape[1:]), tensor.dtype)
    lengths = tensor.lengths[rows]
    return Ragged(np.empty((int(lengths.sum()), *tensor.inner_shape), tensor.dtype), lengths)


def copy_tensor(tensor: Tensor) -> Tensor:
    """A copy of its own (a Ragged's values and lengths)."""
    if isinstance(tensor, Ragged):
        return Ragged(np.array(tensor.values), np.array(tensor.lengths))
    return np.array(tensor)


def join(parts: Sequence[Tensor]) -> Tensor:
    """Tensors' rows one after another (one part: itself)."""
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, Ragged) for p in parts):
        ragged = [p if isinstance(p, Ragged) else Ragged(p.reshape(-1, *p.shape[2:]), np.full(len(p), p.shape[1]))
                  for p in parts]
        return Ragged(np.concatenate([p.values for p in ragged]), np.concatenate([p.lengths for p in ragged]))
    return np.concatenate(parts)


def answer_problem(feeds: Mapping[str, Tensor], answer: Mapping[str, Tensor], fetches: Sequence[TensorSpec]) -> str:
    """Why a teacher's ``answer`` to ``feeds`` cannot be the predictions ``fetches`` (as its meta
    declares them) of their rows ("" when it can): a row per fed row, of the declared row (or
    token) shape and dtype, and a per-token one each sequence's length, so that no sample gets
    another's predictions or padding.  A per-token prediction that comes as one array has rows of
    its second axis' length: padding, where a sequence is shorter.  The cache stores answers by
    the declaration, so one of another shape or dtype would come back otherwise from it."""
    rows = len(next(iter(feeds.values()))) if feeds else 0
    lengths = next((t.lengths for t in feeds.values() if isinstance(t, Ragged)), None)
    for spec in fetches:
        name, got = spec.name, answer.get(spec.name)
        if got is None:
            return f"its answer has no output {name!r}"
        if len(got) != rows:
            return f"output {name!r} has {len(got)} rows for a request of {rows}"
        shape, dtype = row_shape(got), got.values.dtype if isinstance(got, Ragged) else got.dtype
        if not spec.matches(shape) or dtype != np.dtype(spec.dtype):
            return (f"output {name!r} has rows of {dtype} {list(shape)}; "
                    f"its meta declares {spec.dtype} {list(spec.shape)}")
        if lengths is None or not spec.variable:
            continue
        entries = got.lengths if isinstance(got, Ragged) else np.full(rows, got.shape[1])
        if not np.array_equal(entries, lengths):
            bad = int(np.flatnonzero(entries != lengths)[0])
            return (f"per-token output {name!r} has {int(entries[bad])} entries for row {bad} of the request, "
                    f"whose sequence has {int(lengths[bad])}")
    return ""


def empty_output(spec: TensorSpec) -> Tensor:
    """The answer of no rows for an output of ``spec``: a Ragged for a variable-length one."""
    if spec.variable:
        return Ragged(np.zeros((0, *(max(d, 1) for d in spec.shape[1:])), spec.dtype), np.zeros(0, np.int64))
    return spec.example(0)


@dataclass(frozen=True)
class CacheSlots:
    """The teacher-output cache's arrays in a task's slot, under names with a ``:`` that this
    class alone knows: the producer lays them out (:meth:`layout`) and fills them; the worker
    and the sink read them (:meth:`of`).  A per-token prediction's ``c:<name>`` holds as many
    tokens as the task's first variable-length feed, and ``l:c:<name>`` that feed's lengths (a
    teacher cuts per-token answers to the row's length), so the room is known before the
    lookup and a row's answer lies where its tokens lie.
    """

    stamp: np.ndarray  # (epoch, task id), written before anything else of the task, at the slot's start
    keys: np.ndarray  # each row's cache key (rows x 16 bytes)
    hits: np.ndarray  # per row: the cache answered it
    audit: np.ndarray  # per row: cached, but asked of the teacher anyway, to compare with the cache
    answers: dict[str, Tensor]  # per output: the cache's answers (rows it had none for: zeros); per-token: Ragged

    @staticmethod
    def stamped(specs: Mapping[str, Spec]) -> dict[str, Spec]:
        """A task's arrays ``specs`` after its stamp, which every task has (with the cache or without),
        at the slot's start: a worker still holding a cached task of the slot's last layout reads its
        stamp where the next task writes its own before anything else.  Laid out anywhere else, the
        old stamp could lie where the next task wrote nothing (a smaller task), or feeds that happen
        to hold the old task's numbers (a task of an epoch with the cache off), and still name the
        old task over the next one's bytes."""
        return {_STAMP: ((2,), np.dtype(np.int64)), **specs}

    @staticmethod
    def stamp_of(slots: Mapping[str, np.ndarray]) -> np.ndarray:
        """The (epoch, task id) of the task a slot holds (see :meth:`stamped`)."""
        return slots[_STAMP]

    @staticmethod
    def layout(specs: Mapping[str, Spec], rows: int, fetches: Sequence[TensorSpec], tokens: int) -> dict[str, Spec]:
        """A task's arrays ``specs`` with its stamp (:meth:`stamped`) and the cache's, for ``rows`` rows
        whose first variable-length feed holds ``tokens`` (0: none)."""
        out = {**CacheSlots.stamped(specs), _KEYS: ((rows, 16), np.dtype(np.uint8)),
               _HITS: ((rows,), np.dtype(bool)), _AUDIT: ((rows,), np.dtype(bool))}
        for f in fetches:
            if f.variable:
                out[_ANSWER + f.name] = ((tokens, *f.shape[1:]), np.dtype(f.dtype))
                out[_LENGTHS + _ANSWER + f.name] = ((rows,), np.dtype(np.int64))
            else:
                out[_ANSWER + f.name] = ((rows, *f.shape), np.dtype(f.dtype))
        return out

    @classmethod
    def of(cls, slots: Mapping[str, np.ndarray]) -> CacheSlots:
        """The cache's arrays among a slot's (laid out by :meth:`layout`)."""
        answers = {name[len(_ANSWER):]: arr if _LENGTHS + name not in slots else Ragged(arr, slots[_LENGTHS + name])
                   for name, arr in slots.items() if name.startswith(_ANSWER)}
        return cls(slots[_STAMP], slots[_KEYS], slots[_HITS], slots[_AUDIT], answers)

    @staticmethod
    def tokens(specs: Mapping[str, Spec], feeds: Sequence[str]) -> int:
        """The tokens of a task's first variable-length feed among ``feeds``, from its slot ``specs`` (0: none)."""
        first = next((name for name in feeds if _LENGTHS + name in specs), None)
        return 0 if first is None else specs[first][0][0]

    def set_lengths(self, feeds: Mapping[str, Tensor]) -> None:
        """Give per-token answers the rows' lengths: those of the first variable-length feed in ``feeds``."""
        lengths = next((t.lengths for t in feeds.values() if isinstance(t, Ragged)), None)
        for arr in self.answers.values():
            if isinstance(arr, Ragged):
                assert lengths is not None and len(arr.values) == int(lengths.sum())
                arr.lengths[:] = lengths


@dataclass
class BuiltTask:
    """A task as the producer builds it; the dispatcher is told of it as a :class:`zdistill.student.protocol.Task`."""

    task_id: int
    slots: dict[str, np.ndarray]
    sizes: list[int] | None  # None: a sample reader, every row is yielded on its own
    rows: int
    descriptor: Any = None  # where the slots live in shared memory (zdistill.student.shm), if they do

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.slots.values())


def check_feed(slot: str, row_shape: tuple[int, ...], spec: TensorSpec) -> None:
    """Raise a clear error unless rows of ``row_shape`` (-1 first: of different lengths, for a
    variable-length feed only) can be fed to ``spec``; a row of as many values as the feed's is
    reshaped on the way, as EDL did (a flat 784-vector for a 1x28x28 feed)."""
    if row_shape[:1] == (-1,) and not spec.variable:
        raise ConfigError(
            f"slot {slot!r} has samples of different lengths (rows {_rows_text(row_shape[1:])}), "
            f"but the teacher's feed {spec.name!r} takes rows of fixed shape {list(spec.shape)}; a teacher takes "
            "sequences in a feed declared with -1 first (e.g. ('int64', [-1]))"
        )
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
    """True when every value of ``source`` is exactly a value of ``dtype``: numpy calls int64 ->
    float64 safe, but a float holds integers exactly only as far as its mantissa (float64: 2**53)."""
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

    An integer or bool feed must hold every value exactly (no wrapping, no dropped fraction,
    no NaN); a float feed takes the nearest value (a model's input is rounded anyway), but no
    finite value may overflow to infinity nor an imaginary part be dropped.  Values within its
    range (float64 samples for a float32 model) are known to fit from their min and max.
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


def to_feed(arr: Tensor, spec: TensorSpec, check: bool = True) -> Tensor:
    """A slot's tensor in the teacher's row shape and dtype (no copy if already so); ``check``
    (:func:`check_values`) is False only for values already checked against this spec."""
    if isinstance(arr, Ragged):
        return Ragged(to_feed(arr.values, TensorSpec(spec.name, spec.dtype, spec.shape[1:]), check), arr.lengths)
    if not spec.matches(arr.shape[1:]):
        arr = arr.reshape(len(arr), *spec.shape)
    if check:
        check_values(arr, spec)
    return _cast_quietly(arr, np.dtype(spec.dtype)) if arr.dtype != np.dtype(spec.dtype) else arr


def feeds_mismatch(slots: Sequence[TensorSpec], feeds: Sequence[TensorSpec]) -> str | None:
    """Why a teacher taking ``feeds`` cannot be sent tasks built for ``slots`` (the feeds of the
    teacher they were built for), or None: it must take the same names, rows of as many values
    (a reshape is free), and a dtype the values cast to within their kind (not float to int)."""
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


def fetches_mismatch(expected: Sequence[TensorSpec], fetches: Sequence[TensorSpec]) -> str | None:
    """Why a teacher whose predictions are ``fetches`` cannot serve a reader whose teachers give
    ``expected`` (as the teacher it first asked declares them), or None.  Its predictions would
    reach the loop beside theirs in another dtype or shape: a float16 batch among float32 ones, or
    rows of 12 classes among rows of 10, which a loss may broadcast or cast without a word."""
    mine = {f.name: f for f in fetches}
    for want in expected:
        got = mine[want.name]
        if np.dtype(got.dtype) != np.dtype(want.dtype) or got.shape != want.shape:
            return (f"its prediction {want.name!r} is {got.dtype} {list(got.shape)} per row, where this "
                    f"reader's teachers give {want.dtype} {list(want.shape)}")
    return None


class TaskBuilder:
    """Turns what the user's reader yields into tasks of about ``task_rows`` rows.

    Whole reader batches are packed into a task until it holds ``task_rows`` rows or
    ``task_bytes`` bytes (the pipeline's cost is per message, its memory per byte), built in
    place where ``allocate`` says (shared memory), so stacking the samples is the only copy.

    A task holds the reader's items until it is full, while the reader makes the next ones; a
    reader may fill the same arrays for each item (EDL's queue pickled every item as it came),
    which would give the task the last item's values in every row.  So the first task of an
    epoch, and then one in :data:`PROBE_EVERY`, holds copies, and its cut compares them with
    the items: a reader found writing into what it gave has every item copied from then on
    (its values, not the later ones, go to the teachers), or, when tasks built without copies
    have gone already, :class:`~zdistill.errors.ConfigError` names it rather than let them
    stand.  A copy of each item costs a sample list 1 to 2 us a sample (3 KB ones); the probe, 1/64 of it.

    An empty reader batch rides in a task as a size of 0, so the output has as many batches as
    the reader yielded.  A slot is ragged when its teacher's feed is variable-length, or when
    its samples in the task differ in length: a sample reader's are looked at only once
    stacking them failed, so slots of fixed shape cost nothing more.
    """

    def __init__(self, reader_type: ReaderType, ins: Sequence[str], feeds: Sequence[TensorSpec], task_rows: int,
                 task_bytes: int, allocate: Allocator):
        self.reader_type = reader_type
        self.ins = list(ins)
        self.feeds = {spec.name: spec for spec in feeds}
        self.task_rows = max(1, task_rows)
        self.task_bytes = task_bytes
        self.allocate = allocate
        self.tasks_made = 0
        self._row_bytes = 0  # bytes of one row of all slots, learnt from the first task
        self.copying = False  # every item is copied as it comes: the reader writes into what it gave
        self._reset()

    def _reset(self) -> None:
        self._parts: list[list[Any]] = [[] for _ in self.ins]  # per slot: samples, or batches (arrays or row lists)
        self._forms: list[list[int]] = [[] for _ in self.ins]  # per slot, per reader batch: AS_LIST or its row length
        self._sizes: list[int] = []
        self._rows = 0
        probing = not self.copying and self.tasks_made % PROBE_EVERY == 0
        self._copies = self.copying or probing  # whether the task holds copies of the items
        self._given: list[list[Any]] | None = [[] for _ in self.ins] if probing else None  # the items, per slot

    def add(self, item: Any) -> Iterator[BuiltTask]:
        """Take one item from the user's reader; yield a task whenever one is full."""
        if self.reader_type is ReaderType.SAMPLE:
            self._add_samples([item])
            n = 1
        elif self.reader_type is ReaderType.SAMPLE_LIST:
            if not isinstance(item, (list, tuple)):
                raise ConfigError(f"a sample list generator must yield lists of samples, got {type(item).__name__}")
            self._add_samples(item)
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

    def _add_samples(self, samples: Sequence[Any]) -> None:
        """Append samples to their slots' parts, transposed in one pass (no Python per sample)."""
        if not samples:
            return
        columns: list[tuple[Any, ...]] = []
        if set(map(type, samples)) <= {tuple, list}:
            try:
                columns = list(zip(*samples, strict=True))
            except ValueError:  # samples of different lengths: the check below names one
                pass
        if len(columns) != len(self.ins):  # other sequences, or a sample is wrong: check each (naming a bad one)
            columns = list(zip(*(self._arity(sample, "sample") for sample in samples), strict=True))
        for i, column in enumerate(columns):
            if self._given is not None:
                self._given[i].extend(column)
            self._parts[i].extend(map(_copied, column) if self._copies else column)
        if not self._row_bytes:
            self._row_bytes = sum(_as_array(name, v).nbytes for name, v in zip(self.ins, samples[0], strict=True))

    def _add_batch(self, batch: Any) -> int:
        values = self._arity(batch, "batch")
        parts: list[Any] = list(values)  # the common case: arrays, taken as they are
        listed = [False] * len(parts)
        if not all(type(v) is np.ndarray for v in values):
            made = [_batch_part(name, v) for name, v in zip(self.ins, values, strict=True)]
            parts, listed = [p for p, _ in made], [as_list for _, as_list in made]
        rows = {len(p) if isinstance(p, list) else p.shape[0] if p.ndim else -1 for p in parts}
        if len(rows) != 1 or min(rows) < 0:
            shapes = {name: f"{len(p)} samples" if isinstance(p, list) else list(p.shape)
                      for name, p in zip(self.ins, parts, strict=True)}
            raise ConfigError(f"every slot of a batch needs the same number of rows, got shapes {shapes}")
        n = rows.pop()
        for forms, p, as_list in zip(self._forms, parts, listed, strict=True):
            forms.append(AS_LIST if as_list else p.shape[1] if p.ndim > 1 else 0)
        if n and not self._rows:  # an empty batch decides a task's dtypes only when no row does
            self._parts = [[] for _ in self.ins]
        if n or not self._rows:
            for i, p in enumerate(parts):
                if self._given is not None:
                    if n and not self._rows:
                        self._given[i].clear()
                    self._given[i].append(p)
                if self._copies:
                    p = [r.copy() for r in p] if isinstance(p, list) else p.copy()
                self._parts[i].append(p)
        if not self._row_bytes and n:
            self._row_bytes = sum(sum(r.nbytes for r in p) if isinstance(p, list) else p.nbytes for p in parts) // n
        return n

    def _check_given(self) -> None:
        """The probe: whether the reader wrote into an item it gave while this task held it (the
        task has copies of them as they came).  If so, every item is copied from now on; raise
        if tasks holding the reader's own arrays were built since the last probe."""
        assert self._given is not None
        for name, given, copies in zip(self.ins, self._given, self._parts, strict=True):
            changed = next((i for i, (g, c) in enumerate(zip(given, copies, strict=True)) if not _same(g, c)), None)
            if changed is None:
                continue
            what = f"slot {name!r} of {'batch' if self.reader_type is ReaderType.BATCH else 'sample'} {changed}"
            if self.tasks_made:
                raise ConfigError(
                    f"the reader wrote into an array it had already yielded ({what} of task {self.tasks_made} "
                    "changed before the task was full); the tasks built since the check before this one held "
                    "its arrays without copies, and their rows may hold later items' values.  Yield new arrays "
                    "(or copies) for each item")
            log.info("the reader writes into arrays it has yielded (%s changed): each item is copied", what)
            self.copying = True
            return

    def _uneven(self, name: str, part: list[Any]) -> bool:
        """Whether a slot's samples in the task differ in length along their first axis."""
        if self.reader_type is not ReaderType.BATCH:
            arrays = [_as_array(name, v) for v in part]
            return all(a.ndim for a in arrays) and len({a.shape[0] for a in arrays}) > 1
        return any(isinstance(p, list) for p in part) or len({p.shape[1] for p in part if p.ndim > 1 and len(p)}) > 1

    def _cut(self) -> BuiltTask:
        if self._given is not None:
            self._check_given()
        ragged = {name for name, spec in self.feeds.items() if spec.variable and name in self.ins}
        built = None if self.reader_type is ReaderType.BATCH else self._build(ragged)
        if built is None:  # a batch reader's task, or a sample differs from the first: in length, dtype or shape
            ragged |= {name for name, part in zip(self.ins, self._parts, strict=True) if self._uneven(name, part)}
            built = self._build(ragged) or self._build(ragged, promote=True)
        assert built is not None
        slots, descriptor = built
        for name in self.ins if self._rows else ():  # before a teacher gets a value its dtype cannot hold
            if name in self.feeds:
                check_values(slots[name], self.feeds[name])
        sizes = None if self.reader_type is ReaderType.SAMPLE else self._sizes
        task = BuiltTask(self.tasks_made, slots, sizes, self._rows, descriptor)
        self.tasks_made += 1
        self._reset()
        return task

    def _build(self, ragged: set[str], promote: bool = False) -> tuple[dict[str, np.ndarray], Any] | None:
        """The task's arrays in a slot, the slots in ``ragged`` as values and lengths; None when a
        sample reader's sample differs from the first in dtype or shape (unless ``promote``:
        then each such slot is stacked in a dtype that holds every value, :meth:`_stack`)."""
        batch = self.reader_type is ReaderType.BATCH
        specs: dict[str, Spec] = {}
        pieces, stacked = {}, {}
        for name, part, forms in zip(self.ins, self._parts, self._forms, strict=True):
            if name in ragged:
                pieces[name], specs[name], specs[_LENGTHS + name] = _ragged(name, part, batch)
            elif promote:
                stacked[name] = self._stack(name, part)
                specs[name] = stacked[name].shape, stacked[name].dtype
            elif batch:
                specs[name] = (self._rows, *part[0].shape[1:]), np.result_type(*{p.dtype for p in part})
            elif part:  # as the first sample, which every other must match (or the stacking fails)
                first = _as_array(name, part[0])
                specs[name] = (len(part), *first.shape), first.dtype
            else:  # a task of empty sample lists only: its arrays are never read
                specs[name] = (0,), np.dtype(np.float64)
            if forms and (name in ragged or AS_LIST in forms):
                specs[_FORMS + name] = (len(forms),), np.dtype(np.int64)
        for name in self.ins:
            shape, dtype = specs[name]
            if dtype.kind not in "biufc":
                raise ConfigError(f"slot {name!r} holds {dtype} values; zdistill sends numbers and bools")
            if name in self.feeds and shape[0]:
                check_feed(name, (-1, *shape[1:]) if name in ragged else shape[1:], self.feeds[name])
        slots, descriptor = self.allocate(self.tasks_made, self._rows, specs)
        for name, part, forms in zip(self.ins, self._parts, self._forms, strict=True):
            if _FORMS + name in slots:
                slots[_FORMS + name][:] = forms
            if name in ragged:
                if pieces[name]:
                    np.concatenate([v for v, _ in pieces[name]], out=slots[name], casting="no")
                    np.concatenate([n for _, n in pieces[name]], out=slots[_LENGTHS + name])
            elif batch:
                _concatenate(name, slots[name], part)
            elif promote:
                np.copyto(slots[name], stacked[name])
            elif part:
                try:
                    _stack_into(slots[name], part)
                except (ValueError, TypeError):
                    return None
        return slots, descriptor

    def _stack(self, name: str, part: list[Any]) -> np.ndarray:
        """A sample slot's values in one array of numpy's promoted dtype of their ``np.asarray`` arrays
        (a Python int is int64, uint64 above its range), if it holds each exactly: a value no number
        dtype holds (an int beyond uint64), or a mix that promotion changes (int64 and uint64 make
        float64), is an error."""
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


_SHAPE = operator.attrgetter("shape")


def _copied(value: Any) -> Any:
    """A sample's ``value`` as it is now, whatever its reader writes into it later: an array
    copied, a list or tuple as one of its items copied (of numbers, which cannot change, a
    shallow copy), numbers as they are."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple)):
        items = value if set(map(type, value)) <= {int, float, bool} else map(_copied, value)
        return list(items) if isinstance(value, list) else tuple(items)
    return value


def _same(given: Any, copy: Any) -> bool:
    """Whether ``given`` (as its reader holds it now) still holds what ``copy`` (:func:`_copied`) took."""
    if copy is given:
        return True
    if isinstance(copy, np.ndarray):
        now = np.asarray(given)
        return now.dtype == copy.dtype and now.shape == copy.shape and now.tobytes() == copy.tobytes()
    if isinstance(copy, (list, tuple)):
        return type(given) is type(copy) and len(given) == len(copy) and all(map(_same, given, copy))
    return type(given) is type(copy) and bool(given == copy)


def _stack_into(out: np.ndarray, part: list[Any]) -> None:
    """``np.stack(part, out=out, casting="no")``, in one numpy call where the samples allow it.

    numpy's stack makes an array of each sample first (about 0.5 us a sample).  Samples that are
    arrays of ``out``'s row shape go in one concatenate instead, and scalars of one Python or
    numpy type (EDL's readers give labels as ints) in one ``np.array``.  Both raise, as the stack
    does, when a sample's dtype is not ``out``'s (``casting="no"``), so the caller's fallback
    sees the same failures.
    """
    kinds = set(map(type, part))
    if kinds == {np.ndarray} and out.ndim > 1 and out.flags.c_contiguous:  # the reshape below is a view, never a copy
        # concatenate checks that every sample has the axes of ``out``'s rows and its dtype, and only adds
        # their lengths along the first: so those are checked here (for rows of one axis, that is all)
        fits = set(map(len, part)) == {out.shape[1]} if out.ndim == 2 else set(map(_SHAPE, part)) == {out.shape[1:]}
        if fits:
            np.concatenate(part, out=out.reshape(-1, *out.shape[2:]), casting="no")
            return
    elif out.ndim == 1 and len(kinds) == 1 and (kinds <= {int, float, bool} or issubclass(kinds.pop(), np.generic)):
        np.copyto(out, np.array(part), casting="no")
        return
    np.stack(part, out=out, casting="no")


def _concatenate(name: str, out: np.ndarray, part: list[np.ndarray]) -> None:
    """A batch reader's batches into ``out`` (their promoted dtype), checking that it holds every value."""
    if not len(out):  # only empty batches, whose shapes may differ: nothing to join
        return
    try:
        np.concatenate(part, out=out)
    except ValueError as exc:
        raise ConfigError(f"slot {name!r}: batches cannot be joined into one array ({exc})") from None
    start = 0
    for p in part:
        if p.dtype != out.dtype and not _holds(out.dtype, p.dtype):
            _check_held(name, out[start : start + len(p)], p)
        start += len(p)


def _batch_part(name: str, value: Any) -> tuple[np.ndarray | list[np.ndarray], bool]:
    """A batch reader's slot: an array, or the rows of a list of per-sample arrays of different
    shapes; and whether it came as a list of arrays (it goes back to the loop as one)."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
        rows = list(value)
    else:
        try:
            return np.asarray(value), False
        except ValueError:  # lists of different lengths: one list per sample
            if not isinstance(value, (list, tuple)):
                raise
            rows = [_as_array(name, v) for v in value]
    return (np.stack(rows) if len({(r.shape, r.dtype) for r in rows}) == 1 else rows), True


def _ragged(name: str, part: list[Any], batches: bool) -> tuple[list[tuple[np.ndarray, np.ndarray]], Spec, Spec]:
    """A ragged slot's samples as (values, lengths) pieces to join, one per sample or per batch of
    rows of one length (a batch reader's array ``[n, length, ...]``), and its values' and lengths'
    specs; ConfigError naming the slot unless every sample has one dtype and one token shape."""
    pieces = []
    for value in part:
        if batches and isinstance(value, np.ndarray) and value.ndim > 1:
            pieces.append((value.reshape(-1, *value.shape[2:]), np.full(len(value), value.shape[1], np.int64)))
            continue
        for row in value if batches else [value]:  # a 1-d batch's rows are scalars, refused below
            arr = _as_array(name, row)
            if not arr.ndim:
                raise ConfigError(f"slot {name!r} holds samples of different lengths, and a scalar {arr.item()!r:.40} "
                                  "among them: each sample of a variable-length slot needs a length axis")
            pieces.append((arr, np.array([len(arr)], np.int64)))
    first = pieces[0][0] if pieces else np.zeros(0)
    for values, _ in pieces:
        if values.shape[1:] != first.shape[1:] or values.dtype != first.dtype:
            raise ConfigError(
                f"slot {name!r} holds samples of different lengths, so it travels as a sequence per sample, "
                f"whose samples may differ in length only: one is {values.dtype} {_rows_text(values.shape[1:])}, "
                f"another {first.dtype} {_rows_text(first.shape[1:])}"
            )
    tokens, rows = sum(len(v) for v, _ in pieces), sum(len(n) for _, n in pieces)
    return pieces, ((tokens, *first.shape[1:]), first.dtype), ((rows,), np.dtype(np.int64))


def _rows_text(inner: Sequence[int]) -> str:
    """The shape of rows of any length and a token shape ``inner``: ``[n]``, ``[n, 4]``."""
    return "[" + ", ".join(["n", *map(str, inner)]) + "]"


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


def split_output(reader_type: ReaderType, slots: Sequence[Tensor], predicts: Sequence[Tensor],
                 sizes: Iterable[int] | None, forms: Sequence[np.ndarray | None] = ()) -> Iterator[Any]:
    """Cut a finished task back into what EDL's reader yields, as views of its arrays.

    A ragged slot or prediction gives each sample its own array.  A batch reader's batch gives
    a slot back in the form the reader gave it (``forms``, per slot: :func:`slot_forms`): a
    list of per-sample arrays, or one array (a ragged slot's ``[n, length, ...]``, a view of
    its values); a ragged prediction is a list of per-sample arrays.
    """
    columns = [*slots, *predicts]
    if reader_type is ReaderType.SAMPLE:
        yield from zip(*[c.rows() if isinstance(c, Ragged) else c for c in columns], strict=True)
        return
    bounds = itertools.pairwise(itertools.accumulate(sizes or (), initial=0))
    if not any(isinstance(c, Ragged) for c in columns) and not any(k is not None for k in forms):
        for start, stop in bounds:  # arrays only (the common case): views, and nothing else to do
            part = [c[start:stop] for c in columns]
            yield tuple(part) if reader_type is ReaderType.BATCH else list(zip(*part, strict=True))
        return
    kinds = [*forms, *[None] * (len(columns) - len(forms))]
    for batch, (start, stop) in enumerate(bounds):
        part = [select(c, slice(start, stop)) for c in columns]
        if reader_type is ReaderType.BATCH:
            yield tuple(_as_given(c, None if k is None else int(k[batch])) for c, k in zip(part, kinds, strict=True))
        else:
            yield list(zip(*[c.rows() if isinstance(c, Ragged) else c for c in part], strict=True))


def _as_given(column: Tensor, form: int | None) -> Any:
    """One batch's rows of a column in the form the reader gave them: :data:`AS_LIST`, rows of
    ``form`` long, or None for a column whose every batch was an array (or a prediction)."""
    if isinstance(column, Ragged):
        if form is None or form == AS_LIST:
            return column.rows()
        return column.values.reshape(len(column), form, *column.inner_shape)
    return list(column) if form == AS_LIST else column
