"""The teacher's dynamic batcher: which queued requests run together in one model call.

Bookkeeping only, no sockets: the socket thread adds requests, and each model instance
takes its next batch when it becomes free (:meth:`Batcher.next_batch`), formed at that
moment from everything queued.  :meth:`Batcher.take` has no clock of its own (the caller
passes ``now``), so the rule is easy to test.

The rule: every client (ROUTER identity, the request's peer) gets an equal share of the
model, counted in rows (in tokens, rows x longest row, for variable-length feeds), however
many requests it keeps queued, or a share in proportion to the weight it declares.  That
is start-time fair queueing: a request's start tag is the larger of the virtual time (the
largest tag taken so far) and the finish tag of its client's previous queued request, and
its finish tag is its start plus its cost divided by its weight.  A batch starts with
the queued request of the smallest start tag and takes the requests whose rows have the
same shapes in tag order (ties in arrival order), up to ``max_rows`` in all.  So a
client keeping 64 requests queued and one keeping 8 alternate turn by turn, and a client
that was idle starts level with the others, with no credit for its idle time.  A batch
is ready when it is full, or when the oldest request of its shapes has waited
``max_delay`` seconds.  With a delay of 0 it still merges whatever queued up while the
instances were busy, which is where the throughput of many small concurrent requests
comes from.

Rows of different lengths (a feed declared with a variable first per-row dimension,
:class:`~zdistill.spec.Ragged` on the wire): the model gets them padded to the longest
row of its batch, so rows of similar length must run together.  :func:`split_by_length`
cuts such a request into parts, one per length bucket (lengths within a factor of
:data:`BUCKET_RATIO` of one another) and within ``max_tokens`` (rows x longest row) each;
the bucket is part of a part's shape key, so a batch only ever merges parts of one
bucket, and a batch stops before it would pass ``max_tokens``.  For lengths spread
evenly, a bucket's rows average about 85% of its longest, so padding stays near 15% of
the tokens computed.  A :class:`Whole` gathers its parts' answers back into the
client's row order.

Cost: requests wait in a heap per shape key, ordered by tag, and a heap orders the keys
by the tag of each key's head, so forming a batch costs a heap step per request it takes,
however many requests, clients and distinct shapes are queued.

Memory: the batcher also knows which client (peer) queued what, so that a teacher whose
queue is full can make room for a client holding little by refusing the newest requests
of the client holding the most (:meth:`Batcher.make_room`): one client flooding the
teacher cannot lock the others out, and what it was refused does not count against its share.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zdistill.errors import ModelOutputError
from zdistill.spec import Ragged, Tensor, Tensors, token_items

Key = tuple[Any, ...]  # (feed name, row shape) pairs by name, then the length bucket of a ragged part
BUCKET_RATIO = math.sqrt(2)  # the longest row of a bucket over its shortest, at most
DEFAULT_MAX_TOKENS = 32768  # rows x longest row of one batch: 64 rows of 512 tokens, 256 of 128


@dataclass(eq=False)
class Request:
    """One validated ``predict`` request, or one part of it (:func:`split_by_length`), waiting for the model.

    ``lengths``: each row's length when the model has variable-length feeds (those feeds
    are :class:`~zdistill.spec.Ragged` here), else None.  ``whole`` and ``index``: the
    client's request this part belongs to and which of its rows it holds (None for a
    request sent on whole).  ``weight``: the share its client declared (``Predict.weight``).
    """

    envelope: list[Any]
    req_id: Any
    feeds: Tensors
    rows: int
    arrived: float
    lengths: np.ndarray | None = None
    whole: Whole | None = None
    index: np.ndarray | None = None
    weight: float = 1.0  # its client's declared share weight: its cost counts 1 / weight
    key: Key = field(init=False)
    nbytes: int = field(init=False)
    peer: bytes = field(init=False)
    longest: int = field(init=False)  # the longest row (0 without variable-length feeds)
    tokens: int = field(init=False)  # what it costs a padded batch on its own: rows x longest row
    seq: int = field(init=False, default=-1)  # arrival order, set by Batcher.add
    start: float = field(init=False, default=0.0)  # its fair-queueing start tag, set by Batcher.add
    queued: bool = field(init=False, default=False)  # in the batcher, not yet taken nor evicted

    def __post_init__(self) -> None:
        # by name, not by the order the client sent its feeds in: only requests whose rows
        # really have the same shapes, feed by feed, can be concatenated into one batch
        self.nbytes = sum(arr.nbytes for arr in self.feeds.values())
        self.peer = bytes(self.envelope[0]) if self.envelope else b""
        if self.lengths is None:
            self.key = tuple(sorted((name, arr.shape[1:]) for name, arr in self.feeds.items()))  # type: ignore[union-attr]
            self.longest = self.tokens = 0
        else:
            self.longest = int(self.lengths.max())
            self.tokens = self.rows * self.longest
            self.key = (*sorted((name, _row_shape(arr)) for name, arr in self.feeds.items()),
                        length_bucket(self.longest))

    @property
    def cost(self) -> int:
        """What its client's share is counted in: tokens for variable-length rows, else rows."""
        return self.tokens if self.lengths is not None else self.rows


def _row_shape(arr: Tensor) -> tuple[Any, ...]:
    return ("ragged", *arr.inner_shape) if isinstance(arr, Ragged) else arr.shape[1:]


def length_bucket(length: int) -> int:
    """The bucket of rows of ``length``: bucket ``b`` holds lengths in (ratio**(b-1), ratio**b]."""
    return int(_buckets(np.array([length]))[0])


def _buckets(lengths: np.ndarray) -> np.ndarray:
    """:func:`length_bucket` of every length at once (0 for lengths 0 and 1)."""
    return np.ceil(np.log2(np.maximum(lengths, 1)) / math.log2(BUCKET_RATIO) - 1e-9).astype(np.int64)


@dataclass(eq=False)
class Whole:
    """A client's request cut into parts: their answers, put back into the client's row order.

    Owned by the socket thread, which sends the reply once :meth:`add` has every part,
    or one error the first time a part fails (``failed``; later parts are dropped).
    """

    rows: int
    parts: int
    failed: bool = False
    _done: list[tuple[np.ndarray, Tensors]] = field(default_factory=list)

    def add(self, index: np.ndarray, outputs: Tensors) -> Tensors | None:
        """Keep one part's outputs (rows ``index`` of the whole); every output once the last part is in.

        Parts run in separate model calls, so an output whose row or token shape follows the call
        (a -1 after the first per-row dimension) may differ between them: a
        :class:`~zdistill.errors.ModelOutputError` then, never rows cut, padded or broadcast.
        """
        self._done.append((index, outputs))
        if len(self._done) < self.parts:
            return None
        merged: Tensors = {}
        for name, first in self._done[0][1].items():
            what, shape = _item(first)
            for _, outputs in self._done[1:]:  # numpy would cut, pad or broadcast other parts' rows into these
                if (other := _item(outputs[name])) != (what, shape):
                    raise ModelOutputError(
                        f"output {name!r} has {what} of shape {list(shape)} in one part of this request and "
                        f"{other[0]} of shape {list(other[1])} in another: the teacher ran its rows of different "
                        "lengths in separate model calls (length buckets, --max-batch-tokens), and an output "
                        "whose shape changes with the call cannot be put back into one answer")
            if isinstance(first, Ragged):
                lengths = np.empty(self.rows, np.int64)
                for index, outputs in self._done:
                    lengths[index] = outputs[name].lengths
                starts = np.zeros(self.rows, np.int64)
                np.cumsum(lengths[:-1], out=starts[1:])
                values = np.empty((int(lengths.sum()), *first.inner_shape), first.dtype)
                tokens = token_items(values)
                for index, outputs in self._done:
                    part = token_items(np.ascontiguousarray(outputs[name].values))
                    tokens[_token_positions(starts[index], lengths[index])] = part
                merged[name] = Ragged(values, lengths)
            else:
                out = np.empty((self.rows, *first.shape[1:]), first.dtype)
                for index, outputs in self._done:
                    out[index] = outputs[name]
                merged[name] = out
        return merged


def _item(output: Tensor) -> tuple[str, tuple[int, ...]]:
    """What one entry of an output is, and its shape: a token of a per-token output, else a row."""
    return ("tokens", output.inner_shape) if isinstance(output, Ragged) else ("rows", output.shape[1:])


def _token_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Where the tokens of rows starting at ``starts`` with ``lengths`` lie in their values, in row order."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def split_by_length(envelope: list[Any], req_id: Any, feeds: Tensors, lengths: np.ndarray, arrived: float,
                    max_rows: int, max_tokens: int, weight: float = 1.0) -> list[Request]:
    """A request whose rows differ in length, as parts that each batch with rows of similar length.

    One part per length bucket, cut further so that no part passes ``max_rows`` rows nor
    ``max_tokens`` (rows x longest row).  A request whose rows all fall in one bucket
    and fit the bounds stays one :class:`Request` (no copy).  Every row must be at most
    ``max_tokens`` long (the caller checks).
    """
    buckets = _buckets(lengths)
    rows = len(lengths)
    if rows <= max_rows and (buckets == buckets[0]).all() and rows * int(lengths.max()) <= max_tokens:
        return [Request(envelope, req_id, feeds, rows, arrived, lengths, weight=weight)]
    # the rows gathered once in bucket order (stable: the client's order within a bucket),
    # then cut where the bucket changes or a bound would be passed: parts are views of that copy
    order = np.argsort(buckets, kind="stable")
    ordered = _rows_of(feeds, order)
    ordered_lengths = lengths[order]
    ends = np.cumsum(ordered_lengths).tolist()
    ordered_buckets = buckets[order].tolist()
    cuts = [0]
    start = longest = 0
    for i, n in enumerate(ordered_lengths.tolist()):
        taken = i - start  # rows already in the part that starts at ``start``
        if taken and (ordered_buckets[i] != ordered_buckets[start] or taken >= max_rows
                      or (taken + 1) * max(longest, n) > max_tokens):
            cuts.append(i)
            start, longest = i, 0
        longest = max(longest, n)
    cuts.append(rows)
    whole = Whole(rows, len(cuts) - 1)
    parts = []
    for a, b in itertools.pairwise(cuts):
        first, last = (ends[a - 1] if a else 0), ends[b - 1]
        part = {name: Ragged(arr.values[first:last], ordered_lengths[a:b]) if isinstance(arr, Ragged) else arr[a:b]
                for name, arr in ordered.items()}
        parts.append(Request(envelope, req_id, part, b - a, arrived, ordered_lengths[a:b], whole, order[a:b], weight))
    return parts


def _rows_of(feeds: Tensors, index: np.ndarray) -> Tensors:
    """Rows ``index`` of every feed (a copy)."""
    out: Tensors = {}
    for name, arr in feeds.items():
        if isinstance(arr, Ragged):
            lengths = arr.lengths[index]
            out[name] = Ragged(arr.values[_token_positions(arr.offsets[index], lengths)], lengths)
        else:
            out[name] = arr[index]
    return out


@dataclass
class BatchStats:
    """Counters the teacher reports in ``meta`` and ``stats`` replies."""

    requests: int = 0  # as the clients sent them: a request cut into parts counts once, with its row 0
    rows: int = 0
    batches: int = 0
    merged_batches: int = 0
    max_batch_rows: int = 0
    tokens: int = 0  # the rows' own lengths, in batches of variable-length feeds
    padding_tokens: int = 0  # what padding added to them: rows x longest row - tokens

    def record(self, batch: list[Request]) -> None:
        rows = sum(r.rows for r in batch)
        self.requests += sum(1 for r in batch if r.index is None or r.index[0] == 0)
        self.rows += rows
        self.batches += 1
        self.merged_batches += len(batch) > 1
        self.max_batch_rows = max(self.max_batch_rows, rows)
        tokens, padding = padded_tokens(batch)
        self.tokens += tokens
        self.padding_tokens += padding


def padded_tokens(batch: list[Request]) -> tuple[int, int]:
    """A batch's own tokens and what padding to its longest row adds; ``(0, 0)`` for fixed-shape rows.

    The one definition of both, for the ``stats`` counters and the Prometheus metrics alike.
    """
    if batch[0].lengths is None:
        return 0, 0
    tokens = sum(int(r.lengths.sum()) for r in batch)  # type: ignore[union-attr]
    return tokens, sum(r.rows for r in batch) * max(r.longest for r in batch) - tokens


@dataclass(eq=False)
class _Peer:
    """One client's queued requests (by seq, in arrival order), their bytes, and its last finish tag."""

    finish: float
    requests: dict[int, Request] = field(default_factory=dict)
    nbytes: int = 0


class Batcher:
    """Queued requests, the rule that cuts them into model batches, and who queued what.

    Thread-safe: one lock guards everything, held only for bookkeeping (never while a
    model runs or a batch is copied).
    """

    def __init__(self, max_rows: int, max_delay: float, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.max_rows = max_rows
        self.max_delay = max_delay
        self.max_tokens = max_tokens  # rows x longest row of a batch of variable-length rows
        self.stats = BatchStats()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._seq = itertools.count()
        self._virtual = 0.0  # the largest start tag taken so far: where a client with nothing queued starts
        # per shape key: a heap of (start tag, seq, request), and a FIFO in arrival order for
        # max_delay; both may hold requests taken or evicted through the other (removed lazily)
        self._queues: dict[Key, list[tuple[float, int, Request]]] = {}
        self._arrivals: dict[Key, deque[Request]] = {}
        self._rows: dict[Key, int] = {}  # rows queued per key (evicted ones not counted)
        self._tokens: dict[Key, int] = {}  # rows x longest row, summed over the requests queued per key
        self._heads: list[tuple[float, int, Key]] = []  # heap of (start tag, seq) of each key's head, key
        self._listed: dict[Key, tuple[float, int]] = {}  # the entry of _heads that stands for each key
        self._peers: dict[bytes, _Peer] = {}  # clients with requests queued
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def add(self, request: Request) -> None:
        with self._lock:
            request.seq = next(self._seq)
            request.queued = True
            peer = self._peers.get(request.peer)
            if peer is None:
                peer = self._peers[request.peer] = _Peer(self._virtual)
            request.start = max(self._virtual, peer.finish)
            peer.finish = request.start + request.cost / request.weight
            peer.requests[request.seq] = request
            peer.nbytes += request.nbytes
            q = self._queues.get(request.key)
            if q is None:
                q = self._queues[request.key] = []
                self._arrivals[request.key] = deque()
                self._rows[request.key] = self._tokens[request.key] = 0
            heapq.heappush(q, (request.start, request.seq, request))
            self._arrivals[request.key].append(request)
            self._rows[request.key] += request.rows
            self._tokens[request.key] += request.tokens
            if q[0][2] is request:  # a new head for its key: list it (the entry it replaces is dropped lazily)
                self._list(request.key, request)
            self._count += 1

    def wake(self) -> None:
        """Wake one waiting instance if anything is queued (after a burst of :meth:`add`).

        Not on every add: an instance woken by a burst's first request would take it
        alone while the rest of the burst is still being received.  An instance that
        takes a batch and leaves requests behind wakes the next one.
        """
        with self._lock:
            if self._count:
                self._changed.notify()

    def take(self, now: float, force: bool = False) -> list[Request] | None:
        """Remove and return the next batch if it is ready (or ``force``), else None."""
        with self._lock:
            return self._take(now, force)

    def next_batch(self) -> list[Request] | None:
        """Block until a batch is ready and return it; None once :meth:`close` was called.

        A model instance calls this whenever it is free, so the batch is formed from
        everything queued at the moment the instance can run it.
        """
        with self._changed:
            while not self._closed:
                batch = self._take(time.monotonic(), force=False)
                if batch is not None:
                    if self._count:
                        self._changed.notify()
                    return batch
                key = self._next_key()
                wait = None if key is None else self._oldest(key).arrived + self.max_delay - time.monotonic()
                self._changed.wait(None if wait is None else max(wait, 0.0))
            return None

    def make_room(self, peer: bytes, nbytes: int, need: int) -> list[Request]:
        """Evict queued requests to free ``need`` bytes for ``nbytes`` more from ``peer``; return them.

        Only from the peer holding the most queued bytes, newest first, and only while it
        holds more than ``peer`` would after adding its request (longest-queue drop): a
        peer never loses requests to one holding as much as itself.  The victim's finish
        tag goes back to its evicted request's start, so what it was refused never counts
        against its share.  May free less than ``need``; the caller then refuses the new request.
        """
        evicted: list[Request] = []
        with self._lock:
            mine = (self._peers[peer].nbytes if peer in self._peers else 0) + nbytes
            while need > 0 and self._peers:
                victim = max(self._peers, key=lambda p: self._peers[p].nbytes)
                if victim == peer or self._peers[victim].nbytes <= mine:
                    break
                _, request = self._peers[victim].requests.popitem()
                self._peers[victim].finish = request.start
                self._unlink(request)
                self._rows[request.key] -= request.rows
                self._tokens[request.key] -= request.tokens
                evicted.append(request)
                need -= request.nbytes
        return evicted

    def close(self) -> list[Request]:
        """Stop handing out batches (waiting instances return None); remove and return every queued request."""
        with self._lock:
            self._closed = True
            left = sorted((r for p in self._peers.values() for r in p.requests.values()), key=lambda r: r.seq)
            for request in left:
                request.queued = False
            self._queues.clear()
            self._arrivals.clear()
            self._rows.clear()
            self._tokens.clear()
            self._heads.clear()
            self._listed.clear()
            self._peers.clear()
            self._count = 0
            self._changed.notify_all()
            return left

    def counters(self) -> BatchStats:
        """A consistent copy of the counters."""
        with self._lock:
            return BatchStats(**vars(self.stats))

    # -- under the lock ----------------------------------------------------

    def _list(self, key: Key, head: Request) -> None:
        """Make ``head`` the entry of ``_heads`` that stands for ``key``."""
        self._listed[key] = (head.start, head.seq)
        heapq.heappush(self._heads, (head.start, head.seq, key))

    def _head(self, key: Key) -> Request | None:
        """The queued request of ``key`` with the smallest tag, dropping taken and evicted ones on the way."""
        q = self._queues[key]
        while q and not q[0][2].queued:
            heapq.heappop(q)
        return q[0][2] if q else None

    def _oldest(self, key: Key) -> Request:
        """The queued request of ``key`` that arrived first (the key has one)."""
        arrivals = self._arrivals[key]
        while not arrivals[0].queued:
            arrivals.popleft()
        return arrivals[0]

    def _next_key(self) -> Key | None:
        """The key whose head has the smallest start tag, fixing stale entries of ``_heads`` on the way."""
        while self._heads:
            start, seq, key = self._heads[0]
            if self._listed.get(key) != (start, seq):  # replaced by a newer head's entry, or its key is gone
                heapq.heappop(self._heads)
                continue
            head = self._head(key)
            if head is None:
                heapq.heappop(self._heads)
                del self._queues[key], self._arrivals[key], self._rows[key], self._tokens[key], self._listed[key]
            elif head.seq != seq:
                self._listed[key] = (head.start, head.seq)
                heapq.heapreplace(self._heads, (head.start, head.seq, key))
            else:
                return key
        return None

    def _take(self, now: float, force: bool) -> list[Request] | None:
        key = self._next_key()
        if key is None:
            return None
        q = self._queues[key]
        # then a request does not fit, or the batch is exactly full
        full = self._rows[key] >= self.max_rows or self._tokens[key] >= self.max_tokens
        if not (full or force or now >= self._oldest(key).arrived + self.max_delay):
            return None
        batch: list[Request] = []
        rows = longest = tokens = 0
        while q:
            request = q[0][2]
            if request.queued:
                grown = rows + request.rows
                if grown > self.max_rows or (
                    request.longest and rows and grown * max(longest, request.longest) > self.max_tokens
                ):
                    break
            heapq.heappop(q)
            if request.queued:
                del self._peers[request.peer].requests[request.seq]
                self._unlink(request)
                batch.append(request)
                rows += request.rows
                longest = max(longest, request.longest)
                tokens += request.tokens
        self._virtual = max(self._virtual, batch[-1].start)
        self._rows[key] -= rows
        self._tokens[key] -= tokens
        self._next_key()  # lists the key's new head, or forgets the key
        self.stats.record(batch)
        return batch

    def _unlink(self, request: Request) -> None:
        """Count a request out of the queue (already removed from its peer's table)."""
        request.queued = False
        self._count -= 1
        peer = self._peers[request.peer]
        peer.nbytes -= request.nbytes
        if not peer.requests:  # back at the virtual time when it queues again
            del self._peers[request.peer]
