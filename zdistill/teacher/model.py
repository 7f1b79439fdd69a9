"""What a teacher serves: a model with named, typed feeds and fetches.

Two kinds of model exist: a saved Paddle inference model (:mod:`zdistill.teacher.paddle_model`,
imported only when asked for, so ``import zdistill`` never pulls in Paddle) and a
plain Python callable that maps ``dict[str, np.ndarray]`` to the same.  A callable
declares its feeds and fetches with :func:`teacher_function`; that declaration is
what the teacher reports in ``meta`` and checks every request against.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from zdistill.errors import ConfigError, ModelOutputError, ZDistillError
from zdistill.spec import MAX_MODEL_ID, Arrays, TensorSpec, check_model_id


class Model(Protocol):
    """The interface the teacher server needs from any model.

    The teacher runs ``--instances`` copies of a model, each in its own thread: the first
    is the loaded model, the others come from :meth:`clone`.  ``thread_safe`` says whether
    two instances may run at the same time (the teacher reports it in ``meta``).

    ``model_id`` names what the model computes and changes whenever the model does (a
    hash of its files unless the operator or the function's ``version=`` names it): a
    student's teacher-output cache keys predictions by it, so answers cached for one
    ``model_id`` are never served for another.  The teacher reports it in ``meta``, beside
    the model's fingerprint (its answers to a fixed probe batch, computed through
    :meth:`run`: :mod:`zdistill.fingerprint`), which the cache is keyed by too, since files
    do not show everything a model computes with.
    """

    feeds: list[TensorSpec]
    fetches: list[TensorSpec]
    description: str
    device: str
    thread_safe: bool
    model_id: str

    def run(self, feeds: Arrays, lengths: np.ndarray | None = None) -> Arrays:
        """Run one batch: every feed has the same number of rows.

        ``lengths``: each row's length (int64 ``[rows]``) when the model has a variable-length
        feed (first per-row dimension -1): every such feed comes padded with 0 to the batch's
        longest row, and a per-token fetch (first per-row dimension -1) goes back padded,
        ``[rows, >= longest, ...]``, for the server to cut each row back to its length.
        None for a model without one, or for a batch whose rows all have the feed's full
        length (a warm-up or probe run).

        Returns the declared fetches as checked by :func:`check_outputs` (or raises its
        :class:`~zdistill.errors.ModelOutputError`), in arrays the caller owns: they share
        no memory with the feeds or with anything the model writes again, because the
        teacher encodes them while the instance already runs its next batch.
        """
        ...

    def clone(self) -> Model:
        """Another instance for another thread, sharing this one's weights."""
        ...


def version_model_id(version: str) -> str:
    """The model id of a function declared with ``teacher_function(..., version=version)``."""
    return "version:" + version


def _const_text(const: Any) -> str:
    """A constant's text, the same in every process (a frozenset's order follows the string hash seed)."""
    if isinstance(const, frozenset):
        return "frozenset(" + ",".join(sorted(_const_text(c) for c in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ",".join(_const_text(c) for c in const) + ")"
    return repr(const)


def _hash_code(code: Any, h: Any) -> None:
    """Feed a code object's bytecode, names and constants (nested functions too) to ``h``."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if inspect.iscode(const):
            _hash_code(const, h)
        else:
            h.update(_const_text(const).encode() + b"\0")


def function_model_id(fn: Callable[..., Any]) -> str:
    """The model id of a Python teacher function without a ``version``: ``py:`` + 32 hex digits.

    A hash of the bytes of the file that defines ``fn`` (so any edit to it, and only
    that, changes the id) and of ``fn``'s qualified name (so two functions of one file
    differ).  A function with no source file (defined by ``exec``, say) is hashed by its
    bytecode, names and constants instead.  Weights the function loads from elsewhere, or
    that a factory in the file builds, are not seen here: a student's cache tells such
    models apart by their fingerprint (:mod:`zdistill.fingerprint`).
    """
    h = hashlib.blake2b(digest_size=16)  # 32 hex digits: ample to tell a model's versions apart
    h.update(getattr(fn, "__qualname__", type(fn).__qualname__).encode() + b"\0")
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:  # a callable object: its class's file
        try:
            path = inspect.getsourcefile(type(fn))
        except TypeError:
            path = None
    try:
        if path is None:
            raise OSError("no source file")
        with open(path, "rb") as f:
            h.update(b"file\0")
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        code = getattr(fn, "__code__", None)
        if code is None:
            raise ConfigError(f"cannot derive a model id for {fn!r:.80}: it has neither a source file nor Python "
                              "code; declare teacher_function(..., version=...) or serve it with --model-id") from None
        h.update(b"code\0")
        _hash_code(code, h)
    return "py:" + h.hexdigest()


def check_outputs(outputs: object, fetches: Sequence[TensorSpec], rows: int, origin: str, copy: bool,
                  lengths: np.ndarray | None = None) -> Arrays:
    """A model's declared fetches for a batch of ``rows`` rows, each as its declared dtype.

    A student joins, caches and hands on predictions by the declared fetches, so an
    output that does not match its declaration would be a wrong answer: each declared
    fetch must be present, have ``rows`` rows of the declared row shape (-1 matches any
    size), and a dtype that casts to the declared one without changing its kind (numpy's
    ``same_kind``: float64 to float32, int64 to int32 or bool to float are fine; float to
    int, complex to float, a string or an object array are not), whose values the declared
    dtype can hold: a cast that would wrap an int (int64 2**31 for int32) or make a finite
    number infinite (float64 1e39 for float32) changes the answer, while rounding to the
    declared precision does not.  Anything else raises a
    :class:`~zdistill.errors.ModelOutputError` naming ``origin``, the output, and the
    declared and returned shapes (or dtypes, or the value).  Outputs the model did not
    declare are left out.
    ``copy`` returns a fresh array for every fetch, even one already of its dtype.
    With ``lengths`` (a batch of variable-length rows), a per-token fetch
    (:attr:`TensorSpec.variable`) must have a length axis at least as long as the longest row,
    since the server keeps each row's first ``lengths[i]`` entries.
    """
    longest = int(lengths.max()) if lengths is not None and len(lengths) else 0
    if not isinstance(outputs, Mapping):
        raise ModelOutputError(f"{origin} returned {type(outputs).__name__}, not a dict of arrays")
    checked = {}
    for spec in fetches:
        if spec.name not in outputs:
            names = sorted(str(name) for name in outputs)
            raise ModelOutputError(f"{origin} returned no output {spec.name!r} (only {names}), {_declared(spec, rows)}")
        try:
            arr = np.asarray(outputs[spec.name])
        except (TypeError, ValueError) as exc:  # ragged lists, tensors numpy cannot read
            raise ModelOutputError(f"{origin}: output {spec.name!r} is not an array ({type(exc).__name__}: {exc}), "
                                   f"{_declared(spec, rows)}") from None
        if arr.ndim == 0 or arr.shape[0] != rows or not spec.matches(arr.shape[1:]):
            raise ModelOutputError(f"{origin}: output {spec.name!r} has shape {list(arr.shape)} for a batch of "
                                   f"{rows} rows, {_declared(spec, rows)}")
        if lengths is not None and spec.variable and arr.shape[1] < longest:
            raise ModelOutputError(f"{origin}: per-token output {spec.name!r} has shape {list(arr.shape)}, a length "
                                   f"axis shorter than the batch's longest row ({longest}): it must hold "
                                   f"[rows, >= longest row, ...], {_declared(spec, rows)}")
        if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
            raise ModelOutputError(f"{origin}: output {spec.name!r} has dtype {arr.dtype}, which does not cast to "
                                   f"the declared {spec.dtype} within its kind (numpy 'same_kind'), "
                                   f"{_declared(spec, rows)}")
        if arr.size and not np.can_cast(arr.dtype, spec.dtype, casting="safe"):
            with np.errstate(over="ignore"):  # an overflow is refused below, naming the value, not logged
                out = arr.astype(spec.dtype, copy=copy)
            _check_range(arr, out, spec, rows, origin)
        else:
            out = arr.astype(spec.dtype, copy=copy)
        checked[spec.name] = out
    return checked


def _check_range(arr: np.ndarray, out: np.ndarray, spec: TensorSpec, rows: int, origin: str) -> None:
    """Refuse a narrowing cast that changed a value's magnitude: an int wrapped (int64 2**31 + 1 as
    int32 is -2**31 + 1, uint8 200 as int8 is -56), a finite number made infinite (float64 1e39 as
    float32).  Rounding is the declared dtype's precision and passes; so do the infinities and NaNs
    the model computed itself.  ``out`` is ``arr`` cast to ``spec``'s dtype."""
    if out.dtype.kind in "iu":  # from a wider int, or an unsigned one of the same width (same_kind casts no float)
        info = np.iinfo(out.dtype)
        low, high = int(arr.min()), int(arr.max())
        if low >= info.min and high <= info.max:
            return
        value, bounds = (low if low < info.min else high), f"[{info.min}, {info.max}]"
    else:
        if np.isfinite(out).all():  # one pass in the usual case: nothing overflowed
            return
        overflowed = np.isinf(out) & np.isfinite(arr)
        if not overflowed.any():
            return
        value = arr[np.unravel_index(int(overflowed.argmax()), arr.shape)].item()
        bounds = f"(largest {np.finfo(out.dtype).max.item():g})"
    raise ModelOutputError(f"{origin}: output {spec.name!r} holds {value!r}, beyond the range of its declared dtype "
                           f"{spec.dtype} {bounds} (returned as {arr.dtype}): the cast would change the value, "
                           f"{_declared(spec, rows)}")


def _declared(spec: TensorSpec, rows: int) -> str:
    """What ``spec`` declares for a batch of ``rows`` rows, for :func:`check_outputs`' errors."""
    return f"declared {spec.dtype} {[rows, *spec.shape]}" + (" (-1: any size)" if -1 in spec.shape else "")


def _specs(declared: Mapping[str, tuple[str, Sequence[int]]], what: str) -> list[TensorSpec]:
    from zdistill.wire import check_dtype  # a declared dtype the wire refuses could never be served

    specs = []
    for name, value in declared.items():
        try:
            dtype, shape = value
            specs.append(TensorSpec(name, check_dtype(np.dtype(dtype)).name, tuple(int(d) for d in shape)))
        except (TypeError, ValueError, ZDistillError) as exc:
            raise ConfigError(f"{what} {name!r}: expected (dtype, per-row shape), got {value!r}: {exc}") from None
    if not specs:
        raise ConfigError(f"a teacher function needs at least one {what}")
    return specs


def teacher_function(
    feeds: Mapping[str, tuple[str, Sequence[int]]],
    fetches: Mapping[str, tuple[str, Sequence[int]]],
    description: str = "",
    thread_safe: bool = True,
    version: str | None = None,
) -> Callable[[Callable[..., Arrays]], Callable[..., Arrays]]:
    """Declare a Python function as a teacher model.

    ``feeds`` and ``fetches`` map each name to ``(dtype, per_row_shape)``; use -1 for
    a size that varies.  A first per-row dimension of -1 declares rows of different lengths
    (token ids ``("int64", [-1])``): the function gets a batch padded with 0 to its longest
    row and, if it has a parameter named ``lengths``, each row's length as
    ``lengths=`` (int64 ``[rows]``); a fetch declared ``[-1, ...]`` is per-token, returned
    padded and cut back to each row's length by the teacher (docs/teacher.md, Variable-length
    rows).  Example::

        import numpy as np
        import zdistill

        W = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32)

        def softmax(z):
            e = np.exp(z - z.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)

        @zdistill.teacher_function(feeds={"img": ("float32", [784])},
                                   fetches={"prob": ("float32", [10])})
        def predict(batch):
            return {"prob": softmax(batch["img"] @ W)}

    and serve it with ``zdistill-teacher --model mymodule:predict`` (or ``file.py:predict``).

    Threads: with ``zdistill-teacher --instances N`` the function is called from N
    threads at once, each with its own batch.  It must then not change shared state
    without a lock (reading weights is fine; numpy and PyTorch inference are), and it
    must not keep its input arrays after it returns: they are read-only, and a merged
    batch's memory is reused for the instance's next batch.  A function that cannot run
    twice at once declares ``thread_safe=False``: its calls are then serialised, while the
    other instances still merge inputs and the server still splits and sends replies
    meanwhile.  A thread-safe function that writes its outputs into buffers it reuses
    needs one set of buffers per thread (``threading.local``).

    Outputs: the function returns a dict holding every declared fetch, each an array
    (or anything ``np.asarray`` reads) with one row per input row, rows of the declared
    shape, and a dtype that casts to the declared one within its kind (numpy's
    ``same_kind``: returning float64 for a declared float32 is fine, float for a
    declared int is not) and values the declared dtype holds (int64 2**31 for a declared
    int32 would wrap, float64 1e39 for a declared float32 would become inf).  Any other
    output is refused with the error ``bad_output``, which names the function, the output
    and both shapes (or the value); the teacher keeps serving.
    The teacher copies every output before the function can run again (under the lock
    of a function declared ``thread_safe=False``), so the function may return views of
    its inputs or of buffers it overwrites on its next call (preallocated or pinned
    output buffers); the copy costs a memcpy of the outputs.

    Model id: the teacher reports a ``model_id`` in ``meta``, and a student's
    teacher-output cache keys the predictions it keeps by it, so that answers cached for
    one model are never served for another.  By default it is ``py:`` and a hash of the
    file that defines the function (and of its name): any edit to that file gives a new
    id, and so an empty cache.  ``version="..."`` makes the id ``version:`` + that string
    instead, whatever the file holds: keep the version to keep the cache across edits that
    change no prediction (comments, logging), change it to drop the cache when the
    predictions change while the file does not.  A version must name the model, not only
    count its releases: two functions declaring the same version share one id.
    ``zdistill-teacher --model-id`` overrides either.  Whatever the id says, the cache also
    keys answers by the function's fingerprint (what it answers to a fixed probe batch,
    run at the teacher's start: :mod:`zdistill.fingerprint`), so new weights loaded from
    elsewhere, which no file hash sees, never get the old weights' answers; a function
    whose answers change from run to run (dropout left on) gets no cache at all.
    """
    feed_specs, fetch_specs = _specs(feeds, "feed"), _specs(fetches, "fetch")
    if version is not None:
        check_model_id(version, "teacher_function's version", MAX_MODEL_ID - len(version_model_id("")))

    def mark(fn: Callable[..., Arrays]) -> Callable[..., Arrays]:
        fn.zdistill_spec = (feed_specs, fetch_specs, description or fn.__doc__ or "", bool(thread_safe), version)  # type: ignore[attr-defined]
        return fn

    return mark


class CallableModel:
    """A Python function declared with :func:`teacher_function`.

    All instances share the one function (:meth:`clone` returns the model itself); a
    function declared ``thread_safe=False`` is called under a lock, one call at a time,
    and its outputs are copied before the lock is released.  ``device`` is what the
    operator said with ``--gpu-ids`` (the function itself decides where it computes),
    else ``cpu``.  ``model_id`` is ``model_id`` when given (the
    operator's ``--model-id``), else derived from the declared ``version``, else from the
    function's source file (:func:`function_model_id`), once, here.
    """

    def __init__(self, fn: Callable[..., Arrays], origin: str, device: str = "cpu",
                 model_id: str | None = None) -> None:
        spec = getattr(fn, "zdistill_spec", None)
        if spec is None:
            raise ConfigError(
                f"{origin} does not declare its feeds and fetches: decorate it with "
                "@zdistill.teacher_function(feeds={...}, fetches={...})"
            )
        self.feeds, self.fetches, doc, self.thread_safe, version = spec
        if model_id is not None:
            self.model_id = check_model_id(model_id)
        elif version is not None:
            self.model_id = version_model_id(version)
        else:
            self.model_id = function_model_id(fn)
        self.origin = f"teacher function {origin}"
        self.description = f"python callable {origin}" + (f": {doc.strip().splitlines()[0]}" if doc.strip() else "")
        self.device = device
        self._fn = fn
        self._serial = contextlib.nullcontext() if self.thread_safe else threading.Lock()
        self._variable = next((s.name for s in self.feeds if s.variable), None)
        try:
            self._takes_lengths = "lengths" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a callable whose signature Python cannot read
            self._takes_lengths = False

    def run(self, feeds: Arrays, lengths: np.ndarray | None = None) -> Arrays:
        """Call the function; its checked outputs, copied before it can run again (see :class:`Model`).

        Without ``lengths``, rows of a variable-length feed all have that feed's full length.
        """
        rows = len(next(iter(feeds.values())))
        if lengths is None and self._variable is not None:
            lengths = np.full(rows, feeds[self._variable].shape[1], np.int64)
            lengths.flags.writeable = False
        args = {"lengths": lengths} if self._takes_lengths else {}
        with self._serial:
            return check_outputs(self._fn(feeds, **args), self.fetches, rows, self.origin, copy=True, lengths=lengths)

    def clone(self) -> CallableModel:
        return self
