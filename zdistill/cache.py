"""A persistent teacher-output cache: a teacher is never asked twice about the same sample.

Where the student's data is not augmented, every epoch after the first asks the
teachers the same questions.  With ``DistillReader.set_teacher_cache(path)`` the
answers are kept on disk, keyed by the teacher's ``model_id`` (from its ``meta``) and
a 128-bit hash (xxh3) of the exact bytes of each sample's feeds, and rows already
answered are answered from the cache before a task leaves the student's machine.

Layout: ``<path>/<model>/<schema>/fp<n>/<segment files>``, where ``<model>`` is a digest
of the ``model_id``, ``<schema>`` one of the predictions kept (names, dtypes, row
shapes) and ``fp<n>`` one per behaviour of the model: its ``fingerprint.json`` holds
what the model answered to the probe batch (:mod:`zdistill.fingerprint`), and only
teachers reproducing it read or write there (:func:`namespace_for`).  So a different
model, another set of outputs, or another model under the same ``model_id`` (weights
loaded from another file) never gets answers cached
for another.  Each segment is written by one process only (a worker, appending whole
records with one ``write``), so concurrent students sharing a path never interleave.
A record is fixed-size: the key, each prediction's row, and a check word over both;
a torn write (``kill -9`` mid-write, a crash) leaves an incomplete tail or a record
whose check fails, and either is skipped, never served.

Readers (the student, before each epoch) scan only the bytes added since their last
look, map each segment read-only, and look keys up in sorted arrays, vectorized per
task; the producer inherits the index and the mappings across its fork and copies
hits straight from the mappings into the task's slot.  The cache is bounded by
``max_bytes`` over the whole ``path``: writers delete the oldest segments (by
modification time) when they start a new one (segments are at most an eighth of
``max_bytes``, so the bound holds within a segment per writer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from zdistill.fingerprint import TOLERANCE, distance
from zdistill.model import TensorSpec

log = logging.getLogger(__name__)

MAGIC = b"ZDC1"
_HEADER = 4096  # a segment starts with MAGIC and its schema as JSON, padded to this
_SEGMENT_BYTES = 64 << 20  # a writer starts a new segment past this
_CHECK_SALT = np.uint32(0x9E3779B9)  # so a record of zeros (an unwritten page) never checks
_SUFFIX = ".zdc"


def default_max_bytes(path: str) -> int:
    """A tenth of the file system holding ``path``, but never more than half of what is free."""
    st = os.statvfs(path)
    return int(min(st.f_blocks * st.f_frsize * 0.10, st.f_bavail * st.f_frsize * 0.5))


def cacheable(fetches: Sequence[TensorSpec]) -> str | None:
    """Why predictions of these specs cannot be cached (a row size that varies), or None."""
    varying = [f.name for f in fetches if any(d < 0 for d in f.shape)]
    return f"outputs {varying} have rows of varying size" if varying else None


def record_dtype(fetches: Sequence[TensorSpec]) -> np.dtype:
    """One record: the key, each prediction's row, padding to 4 bytes, the check word."""
    fields: list[tuple[str, str, tuple[int, ...]]] = [("key", "u1", (16,))]
    fields += [(f"p:{f.name}", np.dtype(f.dtype).newbyteorder("<").str, tuple(f.shape)) for f in fetches]
    size = sum(np.dtype((np.dtype(t), s)).itemsize for _, t, s in fields)
    if size % 4:
        fields.append(("pad", "u1", (4 - size % 4,)))
    fields.append(("check", "<u4", ()))
    return np.dtype([(n, t, s) if s else (n, t) for n, t, s in fields])


def folder_for(root: str, model_id: str, fetches: Sequence[TensorSpec]) -> str:
    """Where answers of ``model_id`` for these outputs live under the cache's ``root``."""
    model = hashlib.blake2b(model_id.encode(), digest_size=12).hexdigest()
    schema = json.dumps([f.to_wire() for f in fetches], sort_keys=True)
    return os.path.join(root, model, hashlib.blake2b(schema.encode(), digest_size=12).hexdigest())


def _checks(records: np.ndarray) -> np.ndarray:
    """The check word of each record: a salted sum of its 32-bit words before the check."""
    words = records.view(np.uint8).reshape(len(records), -1)[:, :-4].view("<u4")
    return (words.sum(axis=1, dtype=np.uint32) + _CHECK_SALT).astype(np.uint32)


def row_keys(arrays: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """128-bit keys (rows x 16 bytes) of the rows of ``arrays`` taken together."""
    import xxhash

    rows = len(arrays[0])
    views = [memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)) for a in arrays]
    sizes = [len(v) // rows if rows else 0 for v in views]
    if len(views) == 1:
        digest, view, n = xxhash.xxh3_128_digest, views[0], sizes[0]
        joined = b"".join([digest(view[i * n : (i + 1) * n], seed) for i in range(rows)])
    else:
        parts = []
        for i in range(rows):
            h = xxhash.xxh3_128(seed=seed)
            for view, n in zip(views, sizes, strict=True):
                h.update(view[i * n : (i + 1) * n])
            parts.append(h.digest())
        joined = b"".join(parts)
    return np.frombuffer(joined, np.uint8).reshape(rows, 16)


def key_seed(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    """A 64-bit seed from the feeds' names, dtypes and row shapes: the same bytes under another
    name or shape are another question."""
    text = json.dumps(sorted((name, dtype, list(shape)) for name, (dtype, shape) in specs.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass
class _Segment:
    path: str
    usable: bool = True  # False: a file of another schema, never read
    mapping: mmap.mmap | None = None
    records: np.ndarray | None = None  # the complete records, a view of the mapping
    scanned: int = 0  # records looked at so far


@dataclass
class CacheIndex:
    """The reader's side: which keys are cached, and their rows (see the module docstring)."""

    folder: str
    fetches: list[TensorSpec]
    dtype: np.dtype = field(init=False)
    _segments: dict[str, _Segment] = field(default_factory=dict, init=False)
    _names: list[str] = field(default_factory=list, init=False)  # segment number -> file name
    _hi: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64), init=False)  # sorted
    _lo: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64), init=False)
    _seg: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32), init=False)
    _row: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), init=False)

    def __post_init__(self) -> None:
        self.dtype = record_dtype(self.fetches)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)

    def __len__(self) -> int:
        return len(self._hi)

    def refresh(self) -> int:
        """Take in the records written since the last look; the number of new keys."""
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(_SUFFIX))
        except FileNotFoundError:
            names = []
        gone = [n for n in self._segments if n not in names]
        if gone:  # evicted: forget their keys (a producer already forked keeps its own mappings)
            for name in gone:
                del self._segments[name]
            self._rebuild()
        his, los, segs, rows = [], [], [], []
        for name in names:
            seg = self._segments.get(name) or self._open(name)
            if seg is None or not seg.usable:
                continue
            new = self._scan(seg)
            if new is None:
                continue
            first, records = new
            good = np.flatnonzero(_checks(records) == records["check"])
            if len(good) < len(records):
                log.warning("cache segment %s: %d torn or damaged records skipped", name, len(records) - len(good))
            keys = records["key"][good].copy().view("<u8")
            his.append(keys[:, 0])
            los.append(keys[:, 1])
            segs.append(np.full(len(good), self._names.index(name), np.int32))
            rows.append(first + good)
        if not his:
            return 0
        added = sum(len(h) for h in his)
        self._merge(np.concatenate(his), np.concatenate(los), np.concatenate(segs), np.concatenate(rows))
        return added

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Per key (rows x 16 bytes): its position in the index, or -1."""
        if not len(self._hi):
            return np.full(len(keys), -1, np.int64)
        q = np.ascontiguousarray(keys).view("<u8")
        hi, lo = q[:, 0], q[:, 1]
        at = np.searchsorted(self._hi, hi)
        at = np.minimum(at, len(self._hi) - 1)
        found = (self._hi[at] == hi) & (self._lo[at] == lo)
        return np.where(found, at, -1)

    def gather(self, positions: np.ndarray, out: Mapping[str, np.ndarray]) -> None:
        """Copy the cached rows at ``positions`` (from :meth:`lookup`, all found) into ``out[name]``."""
        segs, rows = self._seg[positions], self._row[positions]
        for seg_no in np.unique(segs):
            records = self._segments[self._names[seg_no]].records
            assert records is not None
            mine = np.flatnonzero(segs == seg_no)
            picked = records[rows[mine]]
            for name, arr in out.items():
                arr[mine] = picked[f"p:{name}"]

    def _open(self, name: str) -> _Segment | None:
        path = os.path.join(self.folder, name)
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER)
        except FileNotFoundError:
            return None
        if len(head) < _HEADER:
            return None  # its writer is still writing the header
        if not head.startswith(MAGIC) or json.loads(head[4:].rstrip(b"\0") or b"null") != self._schema():
            log.warning("cache segment %s is not one of this folder's; ignored", path)
            self._segments[name] = _Segment(path, usable=False)  # remembered, never read
            self._names.append(name)
            return None
        seg = self._segments[name] = _Segment(path)
        self._names.append(name)
        return seg

    def _schema(self) -> list[dict]:
        return [f.to_wire() for f in self.fetches]

    def _scan(self, seg: _Segment) -> tuple[int, np.ndarray] | None:
        """Records added to ``seg`` since it was last scanned: (the first's number, the records)."""
        try:
            size = os.path.getsize(seg.path)
        except FileNotFoundError:
            return None
        count = (size - _HEADER) // self.dtype.itemsize
        if count <= seg.scanned:
            return None
        with open(seg.path, "rb") as f:
            seg.mapping = mmap.mmap(f.fileno(), _HEADER + count * self.dtype.itemsize, access=mmap.ACCESS_READ)
        seg.records = np.frombuffer(seg.mapping, self.dtype, count=count, offset=_HEADER)
        first, seg.scanned = seg.scanned, count
        return first, seg.records[first:]

    def _merge(self, hi: np.ndarray, lo: np.ndarray, seg: np.ndarray, row: np.ndarray) -> None:
        """Insert new keys: only they are sorted, so a refresh costs what was added, plus a copy.

        Keys are ordered by their first 64 bits; two keys sharing those (odds of about
        n^2 / 2^65) may then be missed by :meth:`lookup`, which is a miss, never a wrong row.
        """
        order = np.argsort(hi, kind="stable")
        hi, lo, seg, row = hi[order], lo[order], seg[order], row[order]
        at = np.searchsorted(self._hi, hi)
        self._hi, self._lo = np.insert(self._hi, at, hi), np.insert(self._lo, at, lo)
        self._seg, self._row = np.insert(self._seg, at, seg), np.insert(self._row, at, row)

    def _rebuild(self) -> None:
        """Drop the keys of segments gone (evicted), renumbering the rest."""
        keep = [n for n in self._names if n in self._segments]
        renumber = np.array([keep.index(n) if n in self._segments else -1 for n in self._names], np.int32)
        alive = renumber[self._seg] >= 0 if len(self._seg) else np.zeros(0, bool)
        self._hi, self._lo, self._row = self._hi[alive], self._lo[alive], self._row[alive]
        self._seg = renumber[self._seg[alive]]
        self._names = keep


class CacheWriter:
    """A worker's side: appends answered rows to a segment of its own."""

    def __init__(self, folder: str, fetches: Sequence[TensorSpec], max_bytes: int, root: str) -> None:
        self.folder, self.fetches, self.max_bytes, self.root = folder, list(fetches), max_bytes, root
        self.dtype = record_dtype(self.fetches)
        # Segments small beside max_bytes, so that deleting whole ones keeps the bound close.
        self.segment_bytes = max(1 << 20, min(_SEGMENT_BYTES, max_bytes // 8))
        self._fd: int | None = None
        self._size = 0

    def append(self, keys: np.ndarray, outputs: Mapping[str, np.ndarray]) -> None:
        """Store one row per key: ``outputs[name]`` rows are the predictions, in key order."""
        records = np.zeros(len(keys), self.dtype)
        records["key"] = keys
        for f in self.fetches:
            records[f"p:{f.name}"] = outputs[f.name]
        records["check"] = _checks(records)
        if self._fd is None or self._size >= self.segment_bytes:
            self._start_segment()
        assert self._fd is not None
        os.write(self._fd, records.tobytes())  # one write: a torn one leaves an incomplete tail
        self._size += records.nbytes

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _start_segment(self) -> None:
        self.close()
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        evict(self.root, self.max_bytes - self.segment_bytes)
        name = f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}{_SUFFIX}"
        fd = os.open(os.path.join(self.folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        head = MAGIC + json.dumps([f.to_wire() for f in self.fetches]).encode()
        if len(head) > _HEADER:
            os.close(fd)
            raise ValueError("the outputs' description does not fit a cache segment header")
        os.write(fd, head.ljust(_HEADER, b"\0"))
        self._fd, self._size = fd, _HEADER


def evict(root: str, max_bytes: int) -> int:
    """Delete the oldest segments under ``root`` until the rest hold at most ``max_bytes``; bytes freed."""
    segments = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(_SUFFIX):
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                segments.append((st.st_mtime, path, st.st_size))
    total = sum(size for _, _, size in segments)
    freed = 0
    for _, path, size in sorted(segments):
        if total - freed <= max(0, max_bytes):
            break
        try:
            os.unlink(path)
            freed += size
        except FileNotFoundError:
            pass
    return freed


def stored_bytes(root: str) -> int:
    """Bytes of every segment under ``root``."""
    return sum(os.path.getsize(os.path.join(f, n)) for f, _, files in os.walk(root) for n in files
               if n.endswith(_SUFFIX) and os.path.exists(os.path.join(f, n)))


FINGERPRINT_FILE = "fingerprint.json"


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
    fingerprint is within ``tolerance`` of ``fp``, else a new one.

    Two models of one ``model_id`` (weights loaded from another file, say) so get folders of
    their own: answers of one are never looked up for the other.  A new folder is made whole
    (its fingerprint written) under a temporary name and renamed into place, so a folder
    seen by its name always has its fingerprint, and two students making one at once both
    end up in one of them.
    """
    parent = folder_for(root, model_id, fetches)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    names = [f.name for f in fetches]
    number = 0
    while True:
        folder = os.path.join(parent, f"fp{number}")
        if os.path.isdir(folder):
            known = read_fingerprint(folder)
            if known is not None and distance(known, fp, names) <= tolerance:
                return folder
            number += 1
            continue
        staging = os.path.join(parent, f".new-{os.getpid()}-{os.urandom(4).hex()}")
        os.makedirs(staging, mode=0o700)
        with open(os.path.join(staging, FINGERPRINT_FILE), "w", encoding="utf-8") as f:
            json.dump(fp, f)
        try:
            os.rename(staging, folder)
            return folder
        except OSError:  # another student made this one meanwhile: look at it
            os.unlink(os.path.join(staging, FINGERPRINT_FILE))
            os.rmdir(staging)


class CacheGate:
    """Whether cached answers may still be served to this reader's training loop.

    Closed (for good) the moment a teacher is known not to reproduce the cache's
    fingerprint: the producer stops looking rows up, and no answer holding cached rows
    reaches the training loop any more (the dispatcher and the sink send such tasks to
    the teachers again).  One byte of shared memory made before any fork, so the
    producers of later forks and the one running see it change at once.
    """

    def __init__(self) -> None:
        self._flag = mmap.mmap(-1, 1)  # anonymous and shared: a forked producer reads the same byte

    @property
    def closed(self) -> bool:
        return self._flag[0] != 0

    def close(self) -> None:
        self._flag[0] = 1
