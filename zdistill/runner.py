"""The teacher's model thread: runs batches while the socket thread keeps receiving and replying.

A teacher that received, ran and replied in one thread left its model idle during
every receive and reply (about 5% of a 10 ms GPU call, more for shorter ones).  Here
one thread owns the model and runs the batches it is handed, one at a time; the
socket thread forms the next batch meanwhile, so the model always has work when
there is any.  The model's own calls (Paddle's predictor, numpy) release the GIL.

Hand-over: :meth:`ModelRunner.submit` puts a batch on a queue; the model thread puts
each finished batch's outputs on a deque and writes one byte to an inproc socket,
which the socket thread polls along with its ROUTER.  The socket thread then cuts the
outputs per request and records the metrics while the model already runs the next
batch: between two calls the model thread does only what it must (that cut the
pause between two calls of a fixed 10 ms model from ~165 to ~125 us).  No lock guards
anything else: the model belongs to the model thread; the socket, the batcher and the
metrics to the socket thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import zmq

from zdistill.batcher import Request, merge
from zdistill.metrics import TeacherMetrics
from zdistill.model import Arrays, Model

log = logging.getLogger("zdistill.teacher")

Result = tuple[Request, Arrays | Exception]


@dataclass
class Finished:
    """Requests the model ran together, and what came out (or the exception it raised)."""

    requests: list[Request]
    outcome: Arrays | Exception
    seconds: float  # the model call's duration (0 when it failed)


class ModelRunner:
    """One thread that runs the model on the batches it is given (see the module docstring)."""

    def __init__(self, model: Model, context: zmq.Context, metrics: TeacherMetrics) -> None:
        self.model = model
        self.metrics = metrics
        self.pending = 0  # batches handed over and not yet collected (socket thread's count)
        self.model_seconds = 0.0  # time spent in successful model calls: the teacher's busy time
        self._todo: queue.SimpleQueue[list[Request] | None] = queue.SimpleQueue()
        self._done: deque[list[Finished]] = deque()
        endpoint = f"inproc://zdistill-runner-{id(self)}"
        self.wake = context.socket(zmq.PAIR)
        self.wake.bind(endpoint)
        self._bell = context.socket(zmq.PAIR)
        self._bell.connect(endpoint)
        self._thread = threading.Thread(target=self._loop, name="zdistill-model", daemon=True)
        self._thread.start()

    def submit(self, batch: list[Request]) -> None:
        self.pending += 1
        self._todo.put(batch)

    def collect(self) -> list[Result]:
        """Per-request results of the batches finished since the last call."""
        while self.wake.poll(0):
            self.wake.recv()
        results: list[Result] = []
        while self._done:
            for done in self._done.popleft():
                results.extend(self._split(done))
            self.pending -= 1
        return results

    def close(self) -> None:
        """Stop the thread after the batches already handed over; close the sockets."""
        self._todo.put(None)
        self._thread.join(30)
        self.wake.close(linger=0)

    def _loop(self) -> None:
        while (batch := self._todo.get()) is not None:
            self._done.append(self._run(batch))
            self._bell.send(b"")
        self._bell.close(linger=0)

    def _run(self, batch: list[Request]) -> list[Finished]:
        try:
            outputs, seconds = self._call(merge(batch), sum(r.rows for r in batch))
        except Exception as exc:  # the model is user code: any failure becomes a reply
            if len(batch) > 1:  # find the request that breaks it; the others still get answers
                return [done for req in batch for done in self._run([req])]
            return [Finished(batch, exc, 0.0)]
        return [Finished(batch, outputs, seconds)]

    def _call(self, feeds: Arrays, rows: int) -> tuple[Arrays, float]:
        """The model's outputs, checked to have a row per input row, and how long the model took."""
        started = time.monotonic()
        outputs = self.model.run(feeds)
        seconds = time.monotonic() - started
        checked = {}
        for spec in self.model.fetches:
            out = outputs.get(spec.name)
            if not isinstance(out, np.ndarray) or out.ndim == 0 or out.shape[0] != rows:
                shape = None if not isinstance(out, np.ndarray) else list(out.shape)
                raise ValueError(f"output {spec.name!r} has shape {shape}, expected {rows} rows")
            checked[spec.name] = out
        return checked, seconds

    def _split(self, done: Finished) -> list[Result]:
        """Per-request results of a finished batch, and its metrics (socket thread)."""
        rows = sum(r.rows for r in done.requests)
        if isinstance(done.outcome, Exception):
            exc = done.outcome
            log.warning("model failed on a batch of %d rows: %s: %s", rows, type(exc).__name__, exc)
            return [(req, exc) for req in done.requests]
        self.model_seconds += done.seconds
        self.metrics.model_time.observe(done.seconds)
        self.metrics.rows.inc(rows)
        results: list[Result] = []
        start = 0
        for req in done.requests:
            results.append((req, {name: out[start : start + req.rows] for name, out in done.outcome.items()}))
            start += req.rows
        return results
