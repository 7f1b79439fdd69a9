"""A model's behavioural fingerprint: what it answers to a fixed probe batch.

A ``model_id`` names a model by its files (or by what its owner declares), and files
do not show everything that decides a prediction: weights a function loads from a
checkpoint, two teachers a factory builds in one module, an edited helper module.  A
student's teacher-output cache must never serve one model's answers for another's, so
it also keys its answers by how the model behaves: every teacher runs one probe batch
at start, built from its feed specs alone (:func:`probe_batch`: the same rows for every
teacher that takes the same inputs), and reports a compact summary of the answers in
``meta`` (:func:`fingerprint`).  A student keeps a cache's answers only while every
teacher reproduces the summary the cache was made with, within a tolerance
(:func:`distance`; :data:`TOLERANCE` unless ``set_teacher_cache`` says otherwise).

The probe runs twice, in two batch compositions (all rows in one call, then two calls
of half the rows each, the second half first): a model whose answers change from run
to run or with the batch around a row (dropout or batch statistics left on in
inference, a nondeterministic kernel beyond the tolerance) reports a ``jitter`` above
the tolerance, and a student then does not cache its answers at all.

The summary of one output: its values over the probe rows, summed into
:data:`BUCKETS` buckets (every value in exactly one bucket, by a fixed hash of its
position), with each bucket's sum of absolute values as its scale.  Two answers whose
values agree within a relative tolerance ``r`` have bucket sums that agree within
``r`` times the scale, so the comparison tolerates what hardware and batch sizes change
in the last bits and catches other weights, which move the sums far more.  Outputs of
integers or booleans must agree exactly.  A per-token output (of a model with a
variable-length feed, whose probe rows are all :data:`VARIABLE_SIZE` tokens long) is
summarized over each row's tokens, as a teacher cuts it (:func:`summarized`).  What it
cannot see: a difference confined to inputs the probe never holds (token ids above 1,
say), or one smaller than the tolerance over a whole bucket.  The first is what the student's audits are for (a cached
row asked anyway each epoch and compared with :func:`rows_apart`: see the producer).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from zdistill.spec import Arrays, Ragged, Tensor, TensorSpec

VERSION = 1  # of the probe and the summary: fingerprints of another version never match
PROBE_ROWS = 8
VARIABLE_SIZE = 16  # the size a probe gives a dimension declared -1
BUCKETS = 16  # per output: meta stays small whatever the outputs' size
TOLERANCE = 1e-3  # relative, per bucket: runs and teachers farther apart differ (set_teacher_cache's default)
_TINY = 1e-30  # the scale of a bucket of zeros


class _Runs(Protocol):
    """What a fingerprint needs of a model: its declared feeds and fetches, and a way to run it."""

    feeds: list[TensorSpec]
    fetches: list[TensorSpec]

    def run(self, feeds: Arrays) -> Arrays: ...


def probe_batch(feeds: Sequence[TensorSpec]) -> Arrays:
    """The probe's feeds: :data:`PROBE_ROWS` rows, the same for every model taking these feeds.

    Seeded by the feeds' names, dtypes and shapes; floats uniform in [0, 1), integers 0 or 1
    (in range of any embedding table or mask), booleans either, sizes of -1 set to
    :data:`VARIABLE_SIZE`.
    """
    text = json.dumps([[f.name, f.dtype, list(f.shape)] for f in feeds])
    rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))
    out: Arrays = {}
    for f in feeds:
        shape = (PROBE_ROWS, *(VARIABLE_SIZE if d < 0 else d for d in f.shape))
        dtype = np.dtype(f.dtype)
        if dtype.kind == "f":
            out[f.name] = rng.random(shape).astype(dtype)
        elif dtype.kind == "c":
            out[f.name] = (rng.random(shape) + 1j * rng.random(shape)).astype(dtype)
        else:  # integers and booleans
            out[f.name] = rng.integers(0, 2, shape).astype(dtype)
        out[f.name].flags.writeable = False  # as every input a teacher's model gets
    return out


def summarize(outputs: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per output in ``names``: its bucket sums, their scales, and whether it must match exactly."""
    summary = {}
    for name in names:
        arr = np.asarray(outputs[name])
        exact = arr.dtype.kind in "biu"
        values = arr.reshape(len(arr), -1) if arr.ndim else arr.reshape(1, 1)
        if values.dtype.kind == "c":
            values = np.concatenate([values.real, values.imag], axis=1)
        values = values.astype(np.float64)
        n = values.shape[1]
        # A fixed hash of each position, then a shift per row: every value lands in one
        # bucket, and no bucket holds a whole row (a softmax row sums to 1 in any model).
        where = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
        sums, scales = np.zeros(BUCKETS), np.zeros(BUCKETS)
        for row, vals in enumerate(values):
            bucket = ((where + np.uint64(row * 7)) % np.uint64(BUCKETS)).astype(np.intp)
            sums += np.bincount(bucket, weights=vals, minlength=BUCKETS)
            scales += np.bincount(bucket, weights=np.abs(vals), minlength=BUCKETS)
        summary[name] = {"sum": [float(v) for v in sums], "scale": [float(v) for v in scales], "exact": exact}
    return summary


def distance(a: Mapping[str, Any], b: Mapping[str, Any], names: Sequence[str]) -> float:
    """How far two summaries are apart: the largest bucket difference over its scale; inf where
    they cannot be compared (an output missing, an exact one differing, a NaN against a number)."""
    worst = 0.0
    for name in names:
        if name not in a or name not in b:
            return math.inf
        sa, sb = np.asarray(a[name]["sum"], float), np.asarray(b[name]["sum"], float)
        ca, cb = np.asarray(a[name]["scale"], float), np.asarray(b[name]["scale"], float)
        if sa.shape != sb.shape or ca.shape != sa.shape or cb.shape != sb.shape:
            return math.inf
        same = (sa == sb) | (np.isnan(sa) & np.isnan(sb))
        if same.all():
            continue
        if a[name].get("exact") or b[name].get("exact"):
            return math.inf
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.abs(sa - sb) / np.maximum(np.maximum(ca, cb), _TINY)
        gap = np.where(same, 0.0, gap)
        if np.isnan(gap).any():
            return math.inf
        worst = max(worst, float(gap.max()))
    return worst


def summarized(fetches: Sequence[TensorSpec], feeds: Sequence[TensorSpec]) -> list[str]:
    """The outputs a fingerprint summarizes: those a cache can keep.

    Outputs of a fixed row size, and per-token ones (first per-row dimension -1, the rest
    fixed) of a model with a variable-length feed: every probe row is then
    :data:`VARIABLE_SIZE` tokens long, and a per-token output is summarized over each
    row's tokens, as a teacher cuts it (what lies past them is padding's, not an answer).
    """
    tokens = any(f.variable for f in feeds)
    return [f.name for f in fetches
            if all(d >= 0 for d in f.shape[1 if f.variable and tokens else 0 :])]


def fingerprint(model: _Runs) -> dict[str, Any]:
    """Run the probe through ``model.run`` twice, in two batch compositions: the summary of the
    first run and the distance of the second from it (``jitter``), or the error the probe raised.

    Only the outputs a cache can keep are summarized (:func:`summarized`).
    """
    try:
        probe = probe_batch(model.feeds)
        names = summarized(model.fetches, model.feeds)
        if not names:
            return {"version": VERSION, "outputs": {}, "jitter": 0.0}
        per_token = {f.name for f in model.fetches if f.variable}

        def run(feeds: Arrays) -> Arrays:  # per-token outputs cut to the probe rows' length
            out = model.run(feeds)
            return {name: np.asarray(out[name])[:, :VARIABLE_SIZE] if name in per_token else out[name]
                    for name in names}

        first = run(probe)
        half = PROBE_ROWS // 2
        late = run({name: arr[half:] for name, arr in probe.items()})
        early = run({name: arr[:half] for name, arr in probe.items()})
        second = {name: np.concatenate([np.asarray(early[name]), np.asarray(late[name])]) for name in names}
        summary = summarize(first, names)
        return {"version": VERSION, "outputs": summary, "jitter": distance(summary, summarize(second, names), names)}
    except Exception as exc:  # noqa: BLE001 - any failure of the model on the probe: no fingerprint, said why
        return {"version": VERSION, "error": f"{type(exc).__name__}: {exc}"[:500]}


def usable(fp: object, names: Sequence[str], what: str,
           tolerance: float = TOLERANCE) -> tuple[dict[str, Any] | None, str]:
    """``fp`` (a teacher's meta ``fingerprint``) restricted to ``names`` if answers may be cached
    by it (its two runs within ``tolerance``), else None and why not (``what`` names the teacher)."""
    if not isinstance(fp, Mapping):
        return None, f"{what} reports no fingerprint of its answers (a zdistill-teacher older than this student?)"
    if fp.get("version") != VERSION:
        return None, f"{what} reports a fingerprint of version {fp.get('version')!r}, not {VERSION}"
    if "error" in fp:
        return None, f"{what} could not run its probe batch: {fp['error']}"
    outputs, jitter = fp.get("outputs"), fp.get("jitter")
    if not isinstance(outputs, Mapping) or not isinstance(jitter, (int, float)):
        return None, f"{what} reports a malformed fingerprint"
    if not jitter <= tolerance:  # NaN and inf too
        return None, (f"{what} does not reproduce its own answers (two runs of its probe batch differ by "
                      f"{jitter:.3g}, over the tolerance {tolerance:g}): dropout or batch statistics left on, "
                      "or nondeterministic kernels (reduced precision: see set_teacher_cache's tolerance)")
    try:
        picked = {name: {"sum": list(outputs[name]["sum"]), "scale": list(outputs[name]["scale"]),
                         "exact": bool(outputs[name].get("exact"))} for name in names}
    except (KeyError, TypeError, AttributeError):
        return None, f"{what} reports a fingerprint without the outputs {list(names)}"
    return picked, ""


def rows_apart(a: Tensor, b: Tensor) -> float:
    """How far two answers to the same rows are apart: the largest difference in a row over the
    row's largest magnitude (inf for integers or booleans that differ, or a NaN against a number).

    Per-token answers (:class:`~zdistill.spec.Ragged`) are compared token by token, and are
    inf apart where a row's length differs.
    """
    if isinstance(a, Ragged) or isinstance(b, Ragged):
        if not (isinstance(a, Ragged) and isinstance(b, Ragged)) or not np.array_equal(a.lengths, b.lengths):
            return math.inf
        a, b = a.values, b.values
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return math.inf
    same = (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind in "fc" else a == b
    if same.all():
        return 0.0
    if a.dtype.kind in "biu" or b.dtype.kind in "biu":
        return math.inf
    fa, fb = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.maximum(np.abs(fa).max(axis=1), np.abs(fb).max(axis=1))
        gap = np.where(same.reshape(len(a), -1), 0.0, np.abs(fa - fb)).max(axis=1) / np.maximum(scale, _TINY)
    return math.inf if np.isnan(gap).any() else float(gap.max())
