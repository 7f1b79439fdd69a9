"""The teacher's dynamic batcher: which queued requests run together in one model call.

Pure bookkeeping, no sockets and no clock of its own (the caller passes ``now``), so
it is easy to test.  A batch starts with the oldest request and takes the following
requests whose rows have the same shape, up to ``max_rows`` in all.  It is ready when
it is full, or when its oldest request has waited ``max_delay`` seconds.  With a delay
of 0 it still merges whatever queued up while the model was busy, which is where the
throughput of many small concurrent requests comes from.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zdistill.model import Arrays


@dataclass
class Request:
    """One validated ``predict`` request waiting for the model."""

    envelope: list[Any]
    req_id: Any
    feeds: Arrays
    rows: int
    arrived: float
    key: tuple[tuple[str, tuple[int, ...]], ...] = field(init=False)

    def __post_init__(self) -> None:
        # by name, not by the order the client sent its feeds in: only requests whose rows
        # really have the same shapes, feed by feed, can be concatenated into one batch
        self.key = tuple(sorted((name, arr.shape[1:]) for name, arr in self.feeds.items()))


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
    """A FIFO of requests and the rule that cuts it into model batches."""

    def __init__(self, max_rows: int, max_delay: float) -> None:
        self.max_rows = max_rows
        self.max_delay = max_delay
        self._queue: deque[Request] = deque()
        self.stats = BatchStats()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def deadline(self) -> float | None:
        """When the oldest request must run, or None when nothing waits."""
        return self._queue[0].arrived + self.max_delay if self._queue else None

    def take(self, now: float, force: bool = False, full_only: bool = False) -> list[Request] | None:
        """Remove and return the next batch if it is ready (or ``force``), else None.

        ``full_only``: only a full batch is ready (the model is busy, so a partial batch
        can still grow while it waits).
        """
        if not self._queue:
            return None
        head = self._queue[0]
        chosen: list[int] = []
        rows, full = 0, False
        for i, req in enumerate(self._queue):
            if req.key != head.key:
                continue
            if rows + req.rows > self.max_rows:
                full = True
                break
            chosen.append(i)
            rows += req.rows
        full = full or rows == self.max_rows
        if not (full or force or (not full_only and now >= head.arrived + self.max_delay)):
            return None
        picked = set(chosen)
        batch = [self._queue[i] for i in chosen]
        self._queue = deque(r for i, r in enumerate(self._queue) if i not in picked)
        self.stats.record(batch)
        return batch


def merge(batch: list[Request]) -> Arrays:
    """The feeds of a batch as one array per feed (no copy for a batch of one)."""
    if len(batch) == 1:
        return batch[0].feeds
    return {name: np.concatenate([r.feeds[name] for r in batch]) for name in batch[0].feeds}
