"""The teacher's dynamic batcher: which queued requests run together in one model call.

Bookkeeping only, no sockets: the socket thread adds requests, and each model instance
takes its next batch when it becomes free (:meth:`Batcher.next_batch`), formed at that
moment from everything queued.  :meth:`Batcher.take` has no clock of its own (the caller
passes ``now``), so the rule is easy to test.

The rule: a batch starts with the oldest queued request and takes the following
requests whose rows have the same shapes, in order, up to ``max_rows`` in all.  It is
ready when it is full, or when its oldest request has waited ``max_delay`` seconds.  With
a delay of 0 it still merges whatever queued up while the instances were busy, which is
where the throughput of many small concurrent requests comes from.

Cost: requests wait in one FIFO per shape key, and a heap orders the keys by the arrival
of each key's head, so forming a batch costs the requests it takes (plus a heap step),
however many requests and distinct shapes are queued.

Memory: the batcher also knows which client (peer) queued what, so that a teacher whose
queue is full can make room for a client holding little by refusing the newest requests
of the client holding the most (:meth:`Batcher.make_room`): one client flooding the
teacher cannot lock the others out.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zdistill.spec import Arrays

Key = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(eq=False)
class Request:
    """One validated ``predict`` request waiting for the model."""

    envelope: list[Any]
    req_id: Any
    feeds: Arrays
    rows: int
    arrived: float
    key: Key = field(init=False)
    nbytes: int = field(init=False)
    peer: bytes = field(init=False)
    seq: int = field(init=False, default=-1)  # arrival order, set by Batcher.add
    queued: bool = field(init=False, default=False)  # in the batcher, not yet taken nor evicted

    def __post_init__(self) -> None:
        # by name, not by the order the client sent its feeds in: only requests whose rows
        # really have the same shapes, feed by feed, can be concatenated into one batch
        self.key = tuple(sorted((name, arr.shape[1:]) for name, arr in self.feeds.items()))
        self.nbytes = sum(arr.nbytes for arr in self.feeds.values())
        self.peer = bytes(self.envelope[0]) if self.envelope else b""


@dataclass
class BatchStats:
    """Counters the teacher reports in ``meta`` and ``stats`` replies."""

    requests: int = 0
    rows: int = 0
    batches: int = 0
    merged_batches: int = 0
    max_batch_rows: int = 0

    def record(self, batch: list[Request]) -> None:
        rows = sum(r.rows for r in batch)
        self.requests += len(batch)
        self.rows += rows
        self.batches += 1
        self.merged_batches += len(batch) > 1
        self.max_batch_rows = max(self.max_batch_rows, rows)


class Batcher:
    """Queued requests, the rule that cuts them into model batches, and who queued what.

    Thread-safe: one lock guards everything, held only for bookkeeping (never while a
    model runs or a batch is copied).
    """

    def __init__(self, max_rows: int, max_delay: float) -> None:
        self.max_rows = max_rows
        self.max_delay = max_delay
        self.stats = BatchStats()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._seq = itertools.count()
        self._queues: dict[Key, deque[Request]] = {}  # per shape key, in arrival order; may hold evicted requests
        self._rows: dict[Key, int] = {}  # rows queued per key (evicted ones not counted)
        self._heads: list[tuple[int, Key]] = []  # heap of (seq of a key's head, key); stale entries are fixed lazily
        self._by_peer: dict[bytes, dict[int, Request]] = {}  # queued requests per peer, in arrival order
        self._peer_bytes: dict[bytes, int] = {}
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def add(self, request: Request) -> None:
        with self._lock:
            request.seq = next(self._seq)
            request.queued = True
            q = self._queues.get(request.key)
            if q is None:
                q = self._queues[request.key] = deque()
                self._rows[request.key] = 0
                heapq.heappush(self._heads, (request.seq, request.key))
            q.append(request)
            self._rows[request.key] += request.rows
            self._by_peer.setdefault(request.peer, {})[request.seq] = request
            self._peer_bytes[request.peer] = self._peer_bytes.get(request.peer, 0) + request.nbytes
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
                key = self._oldest_key()
                wait = None if key is None else self._queues[key][0].arrived + self.max_delay - time.monotonic()
                self._changed.wait(None if wait is None else max(wait, 0.0))
            return None

    def make_room(self, peer: bytes, nbytes: int, need: int) -> list[Request]:
        """Evict queued requests to free ``need`` bytes for ``nbytes`` more from ``peer``; return them.

        Only from the peer holding the most queued bytes, newest first, and only while it
        holds more than ``peer`` would after adding its request (longest-queue drop): a
        peer never loses requests to one holding as much as itself.  May free less than
        ``need``; the caller then refuses the new request.
        """
        evicted: list[Request] = []
        with self._lock:
            mine = self._peer_bytes.get(peer, 0) + nbytes
            while need > 0 and self._peer_bytes:
                victim = max(self._peer_bytes, key=self._peer_bytes.__getitem__)
                if victim == peer or self._peer_bytes[victim] <= mine:
                    break
                _, request = self._by_peer[victim].popitem()
                self._unlink(request)
                self._rows[request.key] -= request.rows
                evicted.append(request)
                need -= request.nbytes
        return evicted

    def close(self) -> list[Request]:
        """Stop handing out batches (waiting instances return None); remove and return every queued request."""
        with self._lock:
            self._closed = True
            left = sorted((r for reqs in self._by_peer.values() for r in reqs.values()), key=lambda r: r.seq)
            for request in left:
                request.queued = False
            self._queues.clear()
            self._rows.clear()
            self._heads.clear()
            self._by_peer.clear()
            self._peer_bytes.clear()
            self._count = 0
            self._changed.notify_all()
            return left

    def counters(self) -> BatchStats:
        """A consistent copy of the counters."""
        with self._lock:
            return BatchStats(**vars(self.stats))

    # -- under the lock ----------------------------------------------------

    def _oldest_key(self) -> Key | None:
        """The key whose head request is the oldest queued one, fixing stale heap entries on the way."""
        while self._heads:
            seq, key = self._heads[0]
            q = self._queues[key]
            while q and not q[0].queued:  # evicted requests leave their queue lazily
                q.popleft()
            if not q:
                heapq.heappop(self._heads)
                del self._queues[key], self._rows[key]
            elif q[0].seq != seq:
                heapq.heapreplace(self._heads, (q[0].seq, key))
            else:
                return key
        return None

    def _take(self, now: float, force: bool) -> list[Request] | None:
        key = self._oldest_key()
        if key is None:
            return None
        q = self._queues[key]
        full = self._rows[key] >= self.max_rows  # then a request does not fit, or the batch is exactly full
        if not (full or force or now >= q[0].arrived + self.max_delay):
            return None
        batch: list[Request] = []
        rows = 0
        while q and (not q[0].queued or rows + q[0].rows <= self.max_rows):
            request = q.popleft()
            if request.queued:
                del self._by_peer[request.peer][request.seq]
                self._unlink(request)
                batch.append(request)
                rows += request.rows
        self._rows[key] -= rows
        if q:
            heapq.heapreplace(self._heads, (q[0].seq, key))
        else:
            heapq.heappop(self._heads)
            del self._queues[key], self._rows[key]
        self.stats.record(batch)
        return batch

    def _unlink(self, request: Request) -> None:
        """Count a request out of the queue (already removed from its peer's table)."""
        request.queued = False
        self._count -= 1
        left = self._peer_bytes[request.peer] - request.nbytes
        if self._by_peer[request.peer]:
            self._peer_bytes[request.peer] = left
        else:
            del self._by_peer[request.peer], self._peer_bytes[request.peer]
