"""The teacher's model instances: threads that each pull the next batch as soon as they are free.

A single model thread would run copy-in, compute and copy-out back to back, leaving a GPU
idle during every copy and every Python step between two calls, and a partial batch
waiting in the socket thread while the model is busy.  So ``--instances N`` threads each own one
instance of the model (Paddle predictors cloned from one another share the weights; a
Python function is called from every thread, see :func:`zdistill.teacher_function`),
and each takes its next batch from the :class:`~zdistill.teacher.batcher.Batcher` the moment it
is free, formed then from everything queued (Triton's instance groups).  While one
instance copies or runs Python, another computes.  The model calls (Paddle's predictor,
numpy, PyTorch) release the GIL.

A merged batch is copied once, into a buffer per feed that the instance reuses from
batch to batch (:class:`MergeBuffers`): ``np.concatenate`` into fresh memory makes the
kernel map and zero new pages for every batch.  A batch of one request is not copied,
except where rows of different lengths are padded to the batch's longest row (0 after
each row's own values), which the model gets with each row's length.

Hand-over back: an instance appends what it finished to a deque and pushes one byte on
an inproc socket that the socket thread polls beside its ROUTER; the socket thread cuts
the outputs per request, records the metrics and replies, while the instance already
runs its next batch.  The model instances belong to their threads; the socket, the
replies and the metrics to the socket thread; the queue to the batcher (its own lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zmq

from zdistill.metrics import TeacherMetrics
from zdistill.spec import Arrays, Ragged, Tensors
from zdistill.teacher.batcher import Batcher, Request, padded_tokens
from zdistill.teacher.model import Model, check_outputs

log = logging.getLogger("zdistill.teacher.server")

Result = tuple[Request, Tensors | Exception]


@dataclass
class Finished:
    """Requests an instance ran together, and what came out (or the exception it raised)."""

    requests: list[Request]
    outcome: Arrays | Exception
    instance: int
    taken: float  # when the instance took the batch (monotonic)
    seconds: float  # the model call's duration (0 when it failed)
    calls: int  # model calls it took (a merged batch that failed is run again request by request)


class MergeBuffers:
    """One instance's reusable input buffers: a merged batch is copied once, into memory already mapped.

    Each feed's buffer grows to the largest batch seen (at most ``--max-batch-size`` rows
    of that feed) and is then reused, so steady serving allocates nothing per batch.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def merge(self, batch: list[Request]) -> tuple[Arrays, np.ndarray | None]:
        """The feeds of a batch as one array per feed (no copy for a batch of one dense request), and
        each row's length when the feeds are variable-length (:class:`Ragged`, padded here)."""
        first = batch[0].feeds
        if len(batch) == 1 and batch[0].lengths is None:
            return first, None  # type: ignore[return-value]  # no Ragged without lengths
        rows = sum(r.rows for r in batch)
        lengths = None if batch[0].lengths is None else np.concatenate([r.lengths for r in batch])  # type: ignore[misc]
        merged = {}
        for name, arr in first.items():
            if isinstance(arr, Ragged):
                assert lengths is not None
                values = arr.values if len(batch) == 1 else np.concatenate([r.feeds[name].values for r in batch])
                out = self._buffer(name, (rows, int(lengths.max()), *arr.inner_shape), arr.dtype)
                out[...] = 0
                out[np.arange(out.shape[1]) < lengths[:, None]] = values
            else:
                out = self._buffer(name, (rows, *arr.shape[1:]), arr.dtype)
                np.concatenate([r.feeds[name] for r in batch], out=out)
            out.flags.writeable = False  # like every input a model gets
            merged[name] = out
        if lengths is not None:
            lengths.flags.writeable = False
        return merged, lengths

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array of ``shape`` in ``name``'s reused buffer, grown when too small."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self._buffers[name] = np.empty(nbytes, np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


class ModelInstances:
    """``len(models)`` threads, each running one model instance on the batches it pulls (see the module)."""

    def __init__(self, models: Sequence[Model], batcher: Batcher, context: zmq.Context,
                 metrics: TeacherMetrics) -> None:
        self.metrics = metrics
        self.batcher = batcher
        self.instance_seconds = [0.0] * len(models)  # time in successful model calls, per instance
        self.model_calls = 0  # every call of Model.run on a batch, failed ones too
        # fetches the model answers per token, padded: cut back to each row's length here
        self._per_token = [spec for spec in models[0].fetches if spec.variable]
        self._done: deque[list[Finished]] = deque()
        self._endpoint = f"inproc://zdistill-instances-{id(self)}"
        self.wake = context.socket(zmq.PULL)
        self.wake.bind(self._endpoint)
        self._context = context
        self._threads = [
            threading.Thread(target=self._loop, args=(i, model), name=f"zdistill-model-{i}", daemon=True)
            for i, model in enumerate(models)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def model_seconds(self) -> float:
        """Time spent in successful model calls, all instances together: the teacher's busy time."""
        return sum(self.instance_seconds)

    def collect(self) -> list[Result]:
        """Per-request results of the batches finished since the last call (socket thread)."""
        while self.wake.poll(0):
            self.wake.recv()
        results: list[Result] = []
        while self._done:
            for done in self._done.popleft():
                results.extend(self._split(done))
        return results

    def running(self) -> bool:
        """Whether an instance is still at work (after :meth:`Batcher.close`: finishing its batch)."""
        return any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float) -> list[Result]:
        """Wait up to ``timeout`` s for the instances to end (close the batcher first); the last results.

        Closes the wake socket; an instance still running then (a hung model call) is
        left behind, and said so.
        """
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        if self.running():
            log.warning("a model instance is still running after %.0f s; stopping without its answer", timeout)
        results = self.collect()
        self.wake.close(linger=0)
        return results

    # -- in each instance's thread ------------------------------------------

    def _loop(self, index: int, model: Model) -> None:
        bell = self._context.socket(zmq.PUSH)
        bell.connect(self._endpoint)
        buffers = MergeBuffers()
        try:
            while (batch := self.batcher.next_batch()) is not None:
                self._done.append(self._run(index, model, buffers, batch, time.monotonic()))
                try:
                    bell.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # the socket thread has bells unread: it will collect this batch with theirs
                    pass
        finally:
            bell.close(linger=0)

    def _run(self, index: int, model: Model, buffers: MergeBuffers, batch: list[Request],
             taken: float) -> list[Finished]:
        try:
            outputs, seconds = self._call(model, buffers, batch)
        except Exception as exc:  # the model is user code: any failure becomes a reply
            if len(batch) > 1:  # find the request that breaks it; the others still get answers
                again = [done for req in batch for done in self._run(index, model, buffers, [req], taken)]
                again[0].calls += 1
                return again
            return [Finished(batch, exc, index, taken, 0.0, 1)]
        return [Finished(batch, outputs, index, taken, seconds, 1)]

    def _call(self, model: Model, buffers: MergeBuffers, batch: list[Request]) -> tuple[Arrays, float]:
        """The model's outputs and how long the model took.

        :meth:`Model.run` checks the outputs against the declared fetches and returns
        arrays of its caller's own, which share no memory with the merge buffers or with
        anything the model writes on its next call: the socket thread may split and send
        them while this instance already runs its next batch.
        """
        feeds, lengths = buffers.merge(batch)
        started = time.monotonic()
        outputs = model.run(feeds) if lengths is None else model.run(feeds, lengths)
        seconds = time.monotonic() - started
        if lengths is not None and self._per_token:  # whatever the model checked: rows are cut by lengths
            check_outputs(outputs, self._per_token, len(lengths), model.description, copy=False, lengths=lengths)
        return outputs, seconds

    # -- in the socket thread ---------------------------------------------

    def _split(self, done: Finished) -> list[Result]:
        """Per-request results of a finished batch, and its metrics."""
        rows = sum(r.rows for r in done.requests)
        self.model_calls += done.calls
        for req in done.requests:
            self.metrics.queue_wait.observe(max(0.0, done.taken - req.arrived))
        self.metrics.batch_rows.observe(rows)
        self.metrics.batch_requests.observe(len(done.requests))
        if isinstance(done.outcome, Exception):
            exc = done.outcome
            log.warning("model failed on a batch of %d rows: %s: %s", rows, type(exc).__name__, exc)
            return [(req, exc) for req in done.requests]
        self.instance_seconds[done.instance] += done.seconds
        self.metrics.model_time.observe(done.seconds)
        self.metrics.instance_seconds.labels(str(done.instance)).inc(done.seconds)
        self.metrics.rows.inc(rows)
        tokens, padding = padded_tokens(done.requests)
        self.metrics.tokens.inc(tokens)
        self.metrics.padding_tokens.inc(padding)
        results: list[Result] = []
        start = 0
        for req in done.requests:
            outputs: Tensors = {name: out[start : start + req.rows] for name, out in done.outcome.items()}
            if req.lengths is not None:
                for spec in self._per_token:
                    outputs[spec.name] = Ragged.unpad(outputs[spec.name], req.lengths)  # type: ignore[arg-type]
            results.append((req, outputs))
            start += req.rows
        return results
