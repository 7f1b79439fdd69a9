"""A persistent teacher-output cache: a teacher is never asked twice about the same sample.

With ``DistillReader.set_teacher_cache(path)`` the answers are kept on disk, keyed by the
teacher's ``model_id`` (from its ``meta``) and a 128-bit hash (xxh3) of the exact bytes of
each sample's feeds, so that where the data is not augmented, rows already answered are
answered before a task leaves the student's machine.

Layout: ``<path>/<model>/<schema>/fp<n>-<tolerance>/<segment files>``: a digest of the ``model_id``,
one of the predictions kept (names, dtypes, row shapes), and a folder per behaviour of the
model and tolerance, whose ``fingerprint.json`` holds what it answered to the probe batch
(:func:`namespace_for`): another model, even one under the same ``model_id``, never gets
another's answers.  A segment starts with a header (the format's magic and the schema as
JSON) and has one writer (a worker, appending whole records), so students sharing a path
never interleave.  A record holds the key, each prediction's row and a check word, the
xxh32 of the bytes before it, so a torn write (``kill -9`` mid-write) leaves an incomplete
tail or a record that fails its check, never served (records of per-token predictions:
:class:`TokenRecords`).

Readers (the student, before each epoch) scan only the bytes added since their last look
into sorted arrays; the producer inherits the index and its open files across its fork and
reads its hits with ``pread``, never through a mapping, so a segment that shrinks under it
reads short (misses), never a SIGBUS.  ``max_bytes`` bounds the whole ``path``: writers
delete the oldest segments (by modification time) as they start one (segments are at most
an eighth of ``max_bytes``, so the bound holds within a segment per writer).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import mmap
import os
import shutil
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from zdistill.fingerprint import TOLERANCE, distance
from zdistill.spec import Ragged, Tensor, TensorSpec
from zdistill.student.batches import spans

try:
    import xxhash
except ImportError:  # optional (zdistill[cache]): DistillReader.set_teacher_cache says it is needed
    xxhash = None

log = logging.getLogger(__name__)

MAGIC = b"ZDC2"  # the format: records checked by xxh32 (ZDC1's plain sums are not read)
_HEADER = 4096  # a segment starts with MAGIC and its schema as JSON, padded to this
_SEGMENT_BYTES = 64 << 20  # a writer starts a new segment past this
CHECK_SEED = 0x5A444332  # the seed of each record's xxh32
_GAP_BYTES = 4 << 10  # hits closer than this in a segment are read with one pread
_SUFFIX = ".zdc"
FINGERPRINT_FILE = "fingerprint.json"


def default_max_bytes(path: str) -> int:
    """A tenth of the file system holding ``path``, but never more than half of what is free."""
    st = os.statvfs(path)
    return int(min(st.f_blocks * st.f_frsize * 0.10, st.f_bavail * st.f_frsize * 0.5))


def cacheable(fetches: Sequence[TensorSpec], feeds: Sequence[TensorSpec]) -> str | None:
    """Why predictions of these specs, answered to these feeds, cannot be cached, or None.  A per-token
    prediction (first per-row dimension -1) is kept when the teacher takes a variable-length feed: each
    row's answer then has that row's length, which its key holds, so a task's room for cached answers
    is laid out before they are looked up (:class:`~zdistill.student.batches.CacheSlots`)."""
    varying = [f.name for f in fetches if any(d < 0 for d in f.shape[1 if f.variable else 0 :])]
    if varying:
        return f"outputs {varying} have a size that varies other than per token, and the cache cannot lay them out"
    per_token = [f.name for f in fetches if f.variable]
    if per_token and not any(f.variable for f in feeds):
        return (f"outputs {per_token} are per-token, but the teacher takes no variable-length feed that would "
                "give each row's length")
    return None


def _rows(fetches: Iterable[TensorSpec]) -> list[tuple[str, str, tuple[int, ...]]]:
    """A record's field per fixed-size prediction: its row, little-endian."""
    return [(f"p:{f.name}", np.dtype(f.dtype).newbyteorder("<").str, tuple(f.shape)) for f in fetches]


def record_dtype(fetches: Sequence[TensorSpec]) -> np.dtype:
    """One record of fixed-size predictions: the key, each prediction's row, padding to 4 bytes, the check word."""
    fields = [("key", "u1", (16,)), *_rows(fetches)]
    size = np.dtype(fields).itemsize
    if size % 4:
        fields.append(("pad", "u1", (-size % 4,)))
    return np.dtype([*fields, ("check", "<u4")])


@dataclass(frozen=True)
class TokenRecords:
    """The records of a schema with per-token predictions, each of its own size: its fixed part
    (:attr:`head`: the key, the row's length in tokens, each fixed-size prediction's row), then each
    per-token prediction's ``length`` rows, padding to 4 bytes, and the check word (the xxh32 of the
    bytes before it).  A teacher cuts every per-token prediction of a row to the row's length (its
    variable-length feeds'), so one length sizes the record.
    """

    head: np.dtype
    parts: tuple[tuple[str, np.dtype, tuple[int, ...]], ...]  # per per-token prediction: name, dtype, token shape
    token_bytes: int  # bytes of one token of all per-token predictions

    @classmethod
    def of(cls, fetches: Sequence[TensorSpec]) -> TokenRecords | None:
        """The layout for these predictions; None when all are of a fixed size (see :func:`record_dtype`)."""
        if not any(f.variable for f in fetches):
            return None
        head = np.dtype([("key", "u1", (16,)), ("length", "<i8"), *_rows(f for f in fetches if not f.variable)])
        parts = tuple((f.name, np.dtype(f.dtype).newbyteorder("<"), tuple(f.shape[1:])) for f in fetches if f.variable)
        return cls(head, parts, sum(dt.itemsize * math.prod(shape) for _, dt, shape in parts))

    def sizes(self, lengths: int | np.ndarray) -> int | np.ndarray:
        """Each record's bytes, for rows of ``lengths`` tokens (an int, or an int64 array)."""
        body = self.head.itemsize + lengths * self.token_bytes
        return body + (-body % 4) + 4

    def pack(self, keys: np.ndarray, outputs: Mapping[str, Tensor]) -> np.ndarray:
        """The records of rows ``keys``, end to end: ``outputs[name]`` holds each prediction (a
        per-token one as a Ragged); a ValueError if per-token ones differ in a row's length."""
        lengths = next(t.lengths for t in outputs.values() if isinstance(t, Ragged))
        for name, _, _ in self.parts:
            out = outputs[name]
            if not isinstance(out, Ragged) or not np.array_equal(out.lengths, lengths):
                raise ValueError(f"per-token output {name!r} is not of the rows' lengths: a record holds one length")
        heads = np.zeros(len(keys), self.head)
        heads["key"], heads["length"] = keys, lengths
        for name in self.head.names[2:]:
            heads[name] = outputs[name[2:]]
        sizes = self.sizes(lengths)
        starts = np.cumsum(sizes) - sizes
        buf = np.zeros(int(sizes.sum()), np.uint8)
        hs, view, digest = self.head.itemsize, memoryview(buf), xxhash.xxh32_intdigest
        buf[starts[:, None] + np.arange(hs)] = heads.view(np.uint8).reshape(len(keys), hs)
        tokens = [(memoryview(np.ascontiguousarray(outputs[name].values, dt).reshape(-1).view(np.uint8)),
                   (outputs[name].offsets * dt.itemsize * math.prod(outputs[name].inner_shape)).tolist())
                  for name, dt, _ in self.parts]  # per per-token prediction: its bytes, where each row starts in them
        for i, (start, end) in enumerate(zip(starts.tolist(), (starts + sizes).tolist(), strict=True)):
            at = start + hs
            for values, offsets in tokens:
                view[at : at + offsets[i + 1] - offsets[i]] = values[offsets[i] : offsets[i + 1]]
                at += offsets[i + 1] - offsets[i]
            view[end - 4 : end] = digest(view[start : end - 4], CHECK_SEED).to_bytes(4, "little")
        return buf


def folder_for(root: str, model_id: str, fetches: Sequence[TensorSpec]) -> str:
    """Where answers of ``model_id`` for these outputs live under the cache's ``root``."""
    model = hashlib.blake2b(model_id.encode(), digest_size=12).hexdigest()
    schema = json.dumps([f.to_wire() for f in fetches], sort_keys=True)
    return os.path.join(root, model, hashlib.blake2b(schema.encode(), digest_size=12).hexdigest())


def record_checks(records: np.ndarray) -> np.ndarray:
    """The check word of each record: the xxh32 of its bytes before the check (a hash, not a sum, so
    that words swapped, or moved between records, fail it).  One call of the library per record:
    measured, that beats an xxh32 vectorized in numpy except for small records by the million (0.37
    against 0.14 us a 56-byte record, but 0.9 against 7 us a 4 KB one, 0.3 against 0.9 in a task's)."""
    raw = records.view(np.uint8).reshape(len(records), -1)
    digest, body = xxhash.xxh32_intdigest, raw.shape[1] - 4
    return np.fromiter((digest(row[:body], CHECK_SEED) for row in raw), np.uint32, len(records))


def _checked(buf: np.ndarray, start: int, end: int) -> bool:
    """Whether the record ``buf[start:end]`` passes its check."""
    return xxhash.xxh32_intdigest(buf[start : end - 4], CHECK_SEED) == int.from_bytes(buf[end - 4 : end], "little")


def row_keys(arrays: Sequence[Tensor], seed: int) -> np.ndarray:
    """128-bit keys (rows x 16 bytes) of the rows of ``arrays`` taken together.  A Ragged's row is
    hashed with its length before its bytes: rows of variable-length feeds that join into the same
    bytes (``[1, 2] + [3]`` and ``[1] + [2, 3]``) are other questions, and so are rows of zero-sized tokens.
    """
    rows = len(arrays[0])
    if len(arrays) == 1 and not isinstance(arrays[0], Ragged):
        view = memoryview(np.ascontiguousarray(arrays[0]).reshape(-1).view(np.uint8))
        digest, n = xxhash.xxh3_128_digest, len(view) // rows if rows else 0
        joined = b"".join([digest(view[i * n : (i + 1) * n], seed) for i in range(rows)])
        return np.frombuffer(joined, np.uint8).reshape(rows, 16)
    cuts = []  # per array: its bytes, where each row starts and ends in them, and each row's length (or None)
    for a in arrays:
        if isinstance(a, Ragged):
            view = memoryview(np.ascontiguousarray(a.values).reshape(-1).view(np.uint8))
            token = a.values.itemsize * int(np.prod(a.inner_shape))
            cuts.append((view, (a.offsets * token).tolist(), a.lengths.astype("<i8").tobytes()))
        else:
            view = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
            cuts.append((view, (np.arange(rows + 1) * (len(view) // rows if rows else 0)).tolist(), None))
    parts = []
    for i in range(rows):
        h = xxhash.xxh3_128(seed=seed)
        for view, offsets, lengths in cuts:
            if lengths is not None:
                h.update(lengths[i * 8 : i * 8 + 8])
            h.update(view[offsets[i] : offsets[i + 1]])
        parts.append(h.digest())
    return np.frombuffer(b"".join(parts), np.uint8).reshape(rows, 16)


def key_seed(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    """A 64-bit seed from the feeds' names, dtypes and row shapes, in the order :func:`row_keys`
    joins their rows' bytes: the same bytes under another name or shape are another question, and
    so are they in feeds of another order (``a=1, b=2`` and ``b=1, a=2`` join into the same bytes)."""
    text = json.dumps([(name, dtype, list(shape)) for name, (dtype, shape) in specs.items()])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass
class _Segment:
    path: str
    fd: int = -1  # open read-only while usable: positional reads never fault, whatever the file becomes
    usable: bool = True  # False: a file of another format or schema, or damaged, never read
    scanned: int = 0  # bytes of complete records (after the header) looked at so far
    ended: bool = False  # a damaged record of its own size was found: nothing after it is read
    stat: tuple[int, int] = (-1, -1)  # its size and modification time (ns) when last scanned
    settled: bool = False  # modified over a second before that scan: any change since shows in its stat

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _close_segments(segments: dict[str, _Segment]) -> None:
    for seg in segments.values():
        seg.close()


class CacheIndex:
    """The reader's side: which keys are cached, and their rows (see the module docstring)."""

    def __init__(self, folder: str, fetches: Sequence[TensorSpec]) -> None:
        self.folder, self.fetches = folder, list(fetches)
        self.tokens = TokenRecords.of(self.fetches)  # records of their own size (per-token predictions), else None
        self.dtype = record_dtype(self.fetches) if self.tokens is None else self.tokens.head  # the fixed part
        self._segments: dict[str, _Segment] = {}
        self._names: list[str] = []  # segment number -> file name
        # Per key, sorted by its first 64 bits: its two halves, its segment's number, its byte after the header.
        self._hi, self._lo = np.empty(0, np.uint64), np.empty(0, np.uint64)
        self._seg, self._pos = np.empty(0, np.int32), np.empty(0, np.int64)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        self._finalizer = weakref.finalize(self, _close_segments, self._segments)

    def close(self) -> None:
        """Close the segments' files (a producer already forked keeps its own)."""
        self._finalizer()

    def refresh(self) -> int:
        """Take in the records written since the last look; the number of new keys."""
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(_SUFFIX))
        except FileNotFoundError:
            names = []
        for name in [n for n in self._segments if n not in names]:  # evicted (a producer keeps its own files)
            self._segments.pop(name).close()
        new = []  # (segment name, keys, places) per segment with records added
        for name in names:
            seg = self._segments.get(name) or self._open(name)
            if seg is None or not seg.usable:
                continue
            try:
                added = self._scan(seg)
            except OSError as exc:
                self._skip(seg, f"cannot be read ({exc})")
                added = None
            if added is not None:
                new.append((name, *added))
        self._rebuild()  # before numbering the new keys' segments
        if not new:
            return 0
        keys = np.concatenate([k for _, k, _ in new]).view("<u8")
        segs = np.concatenate([np.full(len(k), self._names.index(name), np.int32) for name, k, _ in new])
        places = np.concatenate([p for _, _, p in new])
        # Only the new keys are sorted, so a refresh costs what was added, plus a copy.  Two keys sharing
        # their first 64 bits (odds of about n^2 / 2^65) may be missed by lookup: a miss, never a wrong row.
        order = np.argsort(keys[:, 0], kind="stable")
        keys, segs, places = keys[order], segs[order], places[order]
        at = np.searchsorted(self._hi, keys[:, 0])
        self._hi, self._lo = np.insert(self._hi, at, keys[:, 0]), np.insert(self._lo, at, keys[:, 1])
        self._seg, self._pos = np.insert(self._seg, at, segs), np.insert(self._pos, at, places)
        return len(keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Per key (rows x 16 bytes): its position in the index, or -1."""
        if not len(self._hi):
            return np.full(len(keys), -1, np.int64)
        hi, lo = np.ascontiguousarray(keys).view("<u8").T
        at = np.minimum(np.searchsorted(self._hi, hi), len(self._hi) - 1)
        found = (self._hi[at] == hi) & (self._lo[at] == lo)
        return np.where(found, at, -1)

    def gather(self, positions: np.ndarray, out: Mapping[str, Tensor]) -> np.ndarray:
        """Copy the cached rows at ``positions`` (from :meth:`lookup`, all found) into ``out[name]`` (a
        per-token prediction's is a Ragged of the rows' lengths, which their keys hold); per position,
        whether its row was copied.  Its record, read now, must still hold its key (and length) and
        pass its check, else its segment changed since the scan: a miss, never a wrong row, and the
        segment is skipped from then on (in this process) with a warning naming it.  The checks are
        computed again unless the segment's size and modification time are as scanned and that time
        was a second older than the scan (so that a later change cannot share its clock tick).
        """
        served = np.zeros(len(positions), bool)
        segs, places = self._seg[positions], self._pos[positions]
        keys = np.stack([self._hi[positions], self._lo[positions]], axis=1)
        lengths = next((t.lengths for t in out.values() if isinstance(t, Ragged)), None)
        sizes = (np.full(len(positions), self.dtype.itemsize, np.int64) if self.tokens is None
                 else self.tokens.sizes(lengths))
        for seg_no in np.unique(segs):
            seg = self._segments[self._names[seg_no]]
            mine = np.flatnonzero(segs == seg_no)
            if not seg.usable:
                continue
            st = os.fstat(seg.fd)
            buf, starts, read = self._read(seg, places[mine], sizes[mine])
            heads = buf[starts[:, None] + np.arange(self.dtype.itemsize)].view(self.dtype).reshape(-1)
            ok = read & (heads["key"].copy().view("<u8") == keys[mine]).all(axis=1)
            recheck = not seg.settled or (st.st_size, st.st_mtime_ns) != seg.stat  # else checked when scanned
            if self.tokens is not None:
                ok &= heads["length"] == lengths[mine]
            if recheck and self.tokens is None:
                ok &= record_checks(heads) == heads["check"]
            elif recheck:  # records of their own size, one at a time
                ends = starts + sizes[mine]
                ok[ok] = [_checked(buf, at, end) for at, end in zip(starts[ok], ends[ok], strict=True)]
            if not ok.all():
                short = int((~read).sum())
                self._skip(seg, f"changed since it was scanned ({short} of {len(mine)} records read past its end, "
                                f"{len(mine) - short - int(ok.sum())} no longer the ones scanned)")
            good = np.flatnonzero(ok)
            rows, at = mine[good], starts[good] + self.dtype.itemsize
            served[rows] = True
            for name in self.dtype.names:
                if name.startswith("p:"):
                    out[name[2:]][rows] = heads[name][good]
            for name, dt, shape in self.tokens.parts if self.tokens else ():
                arr, per_row = out[name], lengths[rows] * math.prod(shape)  # each row's values of it
                values = buf[spans(at, per_row * dt.itemsize)].view(dt)
                arr.values.reshape(-1)[spans(arr.offsets[rows] * math.prod(shape), per_row)] = values
                at = at + per_row * dt.itemsize
        return served

    def _read(self, seg: _Segment, places: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The records of ``sizes`` bytes at ``places`` of ``seg``, one ``pread`` per run of them close together:
        a buffer, where each starts in it, and which were read whole (a file that shrank reads short)."""
        order = np.argsort(places, kind="stable")
        first, last = places[order], places[order] + sizes[order]
        opens = np.concatenate([[True], first[1:] - np.maximum.accumulate(last)[:-1] > _GAP_BYTES])  # a new run
        run, begin = np.cumsum(opens) - 1, first[opens]
        extent = np.maximum.reduceat(last, np.flatnonzero(opens)) - begin
        base = np.cumsum(extent) - extent  # each run's place in the buffer
        buf = np.zeros(int(extent.sum()), np.uint8)
        raw, got = memoryview(buf), np.zeros(len(extent), np.int64)
        try:
            for i, (at, to, n) in enumerate(zip(begin.tolist(), base.tolist(), extent.tolist(), strict=True)):
                got[i] = os.preadv(seg.fd, [raw[to : to + n]], _HEADER + at)
        except OSError as exc:
            log.warning("cache segment %s cannot be read: %s", seg.path, exc)
        offset = first - begin[run]
        where, read = np.empty(len(places), np.int64), np.empty(len(places), bool)
        where[order], read[order] = base[run] + offset, offset + sizes[order] <= got[run]
        return buf, where, read

    def _skip(self, seg: _Segment, why: str) -> None:
        """Never read ``seg`` again, saying why once."""
        log.warning("cache segment %s %s; skipped", seg.path, why)
        seg.usable = False
        seg.close()

    def _open(self, name: str) -> _Segment | None:
        """The segment ``name``, or None while its writer is still writing its header.  One never to be
        read is remembered, so that it is named once."""
        seg = _Segment(os.path.join(self.folder, name))
        try:
            seg.fd = os.open(seg.path, os.O_RDONLY)
            head = os.pread(seg.fd, _HEADER, 0)
            if len(head) < _HEADER:
                seg.close()
                return None
            why = ""
            if not head.startswith(MAGIC):
                why = f"is of another format (magic {head[:len(MAGIC)]!r}, not {MAGIC!r})"
            elif json.loads(head[len(MAGIC) :].rstrip(b"\0").decode()) != [f.to_wire() for f in self.fetches]:
                why = "is not one of this folder's (another schema)"
        except FileNotFoundError:
            return None
        except OSError as exc:
            why = f"cannot be read ({exc})"
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            why = f"has a damaged header ({type(exc).__name__}: {exc})"
        self._segments[name] = seg
        if why:
            self._skip(seg, why)
        else:
            self._names.append(name)
        return seg

    def _scan(self, seg: _Segment) -> tuple[np.ndarray, np.ndarray] | None:
        """The keys (rows x 16 bytes) and places of the good records added to ``seg`` since its last scan, as
        many as a read gets now (a file that shrank since is skipped: records scanned before may be gone).
        Records of their own size are walked: an incomplete one is waited for, a damaged one ends the reading."""
        st = os.fstat(seg.fd)
        size = max(0, st.st_size - _HEADER)
        seg.stat, seg.settled = (st.st_size, st.st_mtime_ns), time.time_ns() - st.st_mtime_ns > 1_000_000_000
        if size < seg.scanned:
            self._skip(seg, f"shrank to {size} bytes of records after {seg.scanned} were scanned")
            return None
        if self.tokens is None:
            at, itemsize = seg.scanned, self.dtype.itemsize
            records = np.empty((size - at) // itemsize, self.dtype)
            if not len(records):
                return None
            records = records[: os.preadv(seg.fd, [records.view(np.uint8)], _HEADER + at) // itemsize]
            seg.scanned += records.nbytes
            good = np.flatnonzero(record_checks(records) == records["check"])
            if len(good) < len(records):
                log.warning("cache segment %s: %d torn or damaged records skipped", seg.path, len(records) - len(good))
            return records["key"][good], at + good * itemsize
        if seg.ended or size == seg.scanned:
            return None
        buf = np.empty(size - seg.scanned, np.uint8)
        got = os.preadv(seg.fd, [buf], _HEADER + seg.scanned)
        found, at = [], 0  # where each good record starts in buf
        while at + self.dtype.itemsize <= got:
            length = int.from_bytes(buf[at + 16 : at + 24].tobytes(), "little", signed=True)
            record = self.tokens.sizes(length) if length >= 0 else -1
            if record > 0 and at + record > got:
                break  # its writer has not written it whole yet
            if record < 0 or not _checked(buf, at, at + record):
                log.warning("cache segment %s: a damaged record at byte %d; the %d bytes after it are not read",
                            seg.path, _HEADER + seg.scanned + at, size - seg.scanned - at)
                seg.ended = True
                break
            found.append(at)
            at += record
        starts = np.array(found, np.int64)
        keys, places = buf[starts[:, None] + np.arange(16)], seg.scanned + starts
        seg.scanned += at
        return keys, places

    def _rebuild(self) -> None:
        """Drop the keys of segments gone (evicted) or skipped, if any, renumbering the rest."""
        keep = [n for n in self._names if n in self._segments and self._segments[n].usable]
        if len(keep) == len(self._names):
            return
        renumber = np.array([keep.index(n) if n in keep else -1 for n in self._names], np.int32)
        alive = renumber[self._seg] >= 0
        self._hi, self._lo, self._pos = self._hi[alive], self._lo[alive], self._pos[alive]
        self._seg = renumber[self._seg[alive]]
        self._names = keep


class CacheWriter:
    """A worker's side: appends answered rows to a segment of its own."""

    def __init__(self, folder: str, fetches: Sequence[TensorSpec], max_bytes: int, root: str) -> None:
        self.folder, self.fetches, self.max_bytes, self.root = folder, list(fetches), max_bytes, root
        self.tokens = TokenRecords.of(self.fetches)
        self.dtype = record_dtype(self.fetches) if self.tokens is None else self.tokens.head  # the fixed part
        # Segments small beside max_bytes, so that deleting whole ones keeps the bound close.
        self.segment_bytes = max(1 << 20, min(_SEGMENT_BYTES, max_bytes // 8))
        self._fd: int | None = None
        self._path, self._size = "", 0

    def append(self, keys: np.ndarray, outputs: Mapping[str, Tensor]) -> None:
        """Store one row per key: ``outputs[name]`` rows are the predictions, in key order (a
        per-token one a :class:`~zdistill.spec.Ragged`).

        A write that fails (a full or read-only file system) raises an ``OSError`` naming
        the file; the segment is closed, so that no record ever follows a torn one.
        """
        if self.tokens is not None:
            data = self.tokens.pack(keys, outputs)
        else:
            records = np.zeros(len(keys), self.dtype)
            records["key"] = keys
            for f in self.fetches:
                records[f"p:{f.name}"] = outputs[f.name]
            records["check"] = record_checks(records)
            data = records.view(np.uint8)
        if self._fd is not None and self._size < self.segment_bytes:
            size = os.fstat(self._fd).st_size
            if size != self._size:  # truncated, or written by another: readers number records by their place
                log.warning("cache segment %s is %d bytes, not the %d written: a new one is started",
                            self._path, size, self._size)
                self.close()
        if self._fd is None or self._size >= self.segment_bytes:
            self._start_segment()
        self._write(data)
        self._size += data.nbytes

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, data: np.ndarray) -> None:
        """Append all of ``data`` (a short write is followed by the rest); an error names the file and closes it."""
        view, done = memoryview(data), 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, exc.strerror, self._path) from exc

    def _start_segment(self) -> None:
        self.close()
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        evict(self.root, self.max_bytes - self.segment_bytes)
        head = MAGIC + json.dumps([f.to_wire() for f in self.fetches]).encode()
        if len(head) > _HEADER:
            raise ValueError("the outputs' description does not fit a cache segment header")
        self._path = os.path.join(self.folder, f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}{_SUFFIX}")
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            self._write(np.frombuffer(head.ljust(_HEADER, b"\0"), np.uint8))
        except OSError:
            with contextlib.suppress(OSError):  # a header cut short would be waited on by readers forever
                os.unlink(self._path)
            raise
        self._size = _HEADER


def evict(root: str, max_bytes: int) -> int:
    """Delete the oldest segments under ``root`` until the rest hold at most ``max_bytes``; bytes freed."""
    segments = []
    for folder, _, files in os.walk(root):
        for path in (os.path.join(folder, name) for name in files if name.endswith(_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                segments.append((st.st_mtime, path, st.st_size))
    total, freed = sum(size for _, _, size in segments), 0
    for _, path, size in sorted(segments):
        if total - freed <= max(0, max_bytes):
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            freed += size
    return freed


def stored_bytes(root: str) -> int:
    """Bytes of every segment under ``root``.  One listed but gone when its size is read (evicted
    meanwhile by another reader of the same cache) counts as nothing, never as an error."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    total += os.path.getsize(os.path.join(folder, name))
    return total


def read_fingerprint(folder: str) -> dict | None:
    """The fingerprint a namespace folder was made for (see :func:`namespace_for`), or None."""
    try:
        with open(os.path.join(folder, FINGERPRINT_FILE), encoding="utf-8") as f:
            fp = json.load(f)
    except (OSError, ValueError):
        return None
    return fp if isinstance(fp, dict) else None


def namespace_for(root: str, model_id: str, fetches: Sequence[TensorSpec], fp: Mapping[str, object],
                  tolerance: float = TOLERANCE) -> str:
    """The folder of answers of ``model_id`` that behaves as ``fp`` says (a summary of its answers to
    the probe batch, :func:`zdistill.fingerprint.usable`): the first under :func:`folder_for` whose
    fingerprint is within ``tolerance`` of ``fp``, else a new one, so that two models of one
    ``model_id`` get folders of their own.  Only folders made for this ``tolerance`` are looked at
    (its ``repr`` ends their name): a reader of a looser one takes models further from the folder's
    fingerprint for the folder's and files their answers there, which a stricter reader sharing
    the cache would be served.  A new folder is made whole (its fingerprint written)
    under a temporary name and renamed into place: a folder seen by its name always has its
    fingerprint, and two students making one at once both end up in one of them.
    """
    parent = folder_for(root, model_id, fetches)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    for number in itertools.count():
        folder = os.path.join(parent, f"fp{number}-{tolerance!r}")
        if not os.path.isdir(folder):
            staging = os.path.join(parent, f".new-{os.getpid()}-{os.urandom(4).hex()}")
            os.makedirs(staging, mode=0o700)
            with open(os.path.join(staging, FINGERPRINT_FILE), "w", encoding="utf-8") as f:
                json.dump(fp, f)
            try:
                os.rename(staging, folder)
                return folder
            except OSError:  # another student made this one meanwhile: look at it
                shutil.rmtree(staging)
                if not os.path.isdir(folder):
                    raise  # not a race: the rename itself failed
        known = read_fingerprint(folder)
        if known is not None and distance(known, fp, [f.name for f in fetches]) <= tolerance:
            return folder


class CacheGate:
    """Whether cached answers may still be served to this reader's training loop: closed for good
    once a teacher is known not to reproduce the cache's fingerprint (the producer stops looking
    rows up; the dispatcher and the sink send tasks holding cached rows to the teachers again).
    One byte of shared memory made before any fork, so that every producer sees it change at once.
    """

    def __init__(self) -> None:
        self._flag = mmap.mmap(-1, 1)  # anonymous and shared: a forked producer reads the same byte

    @property
    def closed(self) -> bool:
        return self._flag[0] != 0

    def close(self) -> None:
        self._flag[0] = 1
