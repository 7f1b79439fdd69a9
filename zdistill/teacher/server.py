"""``zdistill-teacher``: serve a model to students over one ZeroMQ ROUTER socket.

Protocol (every message in the :mod:`zdistill.wire` format, its header one of the types
of :mod:`zdistill.teacher_messages`; ``id`` is echoed back):

==========  ==========================================  =====================================
request     header / arrays                             reply
==========  ==========================================  =====================================
``predict`` ``{"kind": "predict", "id"}`` + one array   ``{"kind": "result", "id"}`` + one
            per feed, all with the same number of rows  array per fetch, the same rows
            (ragged for a variable-length feed);        (ragged for a per-token fetch)
            optional ``weight``: the client's share
``meta``    ``{"kind": "meta", "id"}``                  ``{"kind": "meta", ...}``: feeds,
                                                        fetches, max batch, instances,
                                                        device, model id, fingerprint,
                                                        bounds, stats
``stats``   ``{"kind": "stats", "id"}``                 ``{"kind": "stats", "stats": {...}}``
``ping``    ``{"kind": "ping", "id"}``                  ``{"kind": "pong", "id"}``
==========  ==========================================  =====================================

Anything wrong gets ``{"kind": "error", "id", "code", "message"}`` (``code`` an
:class:`~zdistill.errors.ErrorCode`: ``bad_message`` for frames that are no message,
``bad_request`` for an unknown kind or a field of the wrong type, ``internal`` for a
bug met while handling it, logged with its traceback) and the server goes on serving
everyone else.  A model that raises gets ``model_error``; one whose outputs
do not match the fetches it declares (rows, row shape, dtype; see
:func:`~zdistill.teacher.model.check_outputs`) gets ``bad_output``, which no retry mends.  The
socket is bound only after every model instance has loaded and run once, so an answered
``ping`` means the teacher is really ready.

Memory is bounded.  The requests a teacher holds (queued or running) may take at most
``--max-queue-mb``; a ``predict`` that does not fit gets the error code ``busy`` at once
(retry later, elsewhere or here: it is not a failure).  Before refusing, the teacher
makes room for a client holding less than the one holding the most, by refusing the
latter's newest queued requests with ``busy`` (so one flooding client cannot lock out
the others).  ``meta``, ``ping`` and ``stats`` are answered whatever the queue holds.
One message may carry at most ``--max-message-mb`` over all its arrays (``too_large``
beyond; a single frame beyond it makes libzmq drop the connection).  See
docs/teacher.md for what libzmq itself buffers per client.

On SIGTERM (or SIGINT) the teacher lets the batches its instances are running finish
and answers them, refuses every queued request, and every request that arrives until
its socket has been quiet for a moment (at most a second), with ``shutting_down`` (a
client resends those elsewhere at once), then flushes its replies and exits 0: a few
seconds, whatever the backlog.

Clients (ROUTER identities) get equal shares of the model's rows, or shares in
proportion to the ``weight`` their requests declare, however many requests each keeps
queued (fair queueing in :mod:`zdistill.teacher.batcher`; docs/teacher.md, Fair shares).

One thread owns the socket: it receives, validates, admits and replies.  The model
instances (:mod:`zdistill.teacher.instances`) each pull their next batch from the batcher
(:mod:`zdistill.teacher.batcher`) the moment they are free, so receiving, batching, running and
replying overlap.

Rows of different lengths: a feed declared with a variable first per-row dimension takes
a :class:`~zdistill.spec.Ragged` (or a dense array, every row of its full length); all such
feeds of one row must have the same length.  The batcher groups rows of similar length
within ``--max-batch-tokens`` (:func:`~zdistill.teacher.batcher.split_by_length`), the model
gets them padded with each row's length, and a per-token fetch goes back cut to each row's
length, as a Ragged.  A row longer than ``--max-batch-tokens`` gets ``too_large``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from zdistill import wire
from zdistill.errors import ConfigError, ErrorCode, ModelOutputError, RequestError, WireError
from zdistill.fingerprint import fingerprint, usable
from zdistill.flags import add_daemon_flags, setup_logging
from zdistill.metrics import TeacherMetrics
from zdistill.security import ServerKeys, server_keys, stop_authenticator
from zdistill.spec import MAX_MODEL_ID, Ragged, Tensor, Tensors
from zdistill.teacher.batcher import DEFAULT_MAX_TOKENS, Batcher, Request, split_by_length
from zdistill.teacher.instances import ModelInstances, Result
from zdistill.teacher.loading import load_model
from zdistill.teacher.model import Model
from zdistill.teacher_messages import REQUESTS, MetaRequest, Ping, Predict, read_request

log = logging.getLogger("zdistill.teacher.server")

MiB = 2**20
DEFAULT_MAX_MESSAGE = 128 * MiB  # 256 rows of uint8 3x224x224 or 64 rows of float32 3x224x224: 37 MiB
DEFAULT_MAX_QUEUE = 512 * MiB
MAX_INSTANCES = 64
_DRAIN_AT_ONCE = 256
_RCVHWM = 8  # whole messages libzmq may hold per client before this thread reads them (then TCP backpressure)
# Replies libzmq may hold per client before they leave (then they are dropped and counted).
# A merged batch answers all its requests at once, faster than the I/O thread sends them,
# so this must exceed the requests any client keeps in flight (64 is too few for a
# student sending many 1-row requests).  1000 is libzmq's own default.
_SNDHWM = 1000
_LINGER_MS = 1000  # how long the last replies may take to leave after the socket closes
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_STOP_QUIET_S = 0.05  # a stopping teacher closes once no message came for this long...
_STOP_GRACE_S = 1.0  # ...or after this long, however busy its peers still are
_STOP_RUNNING_S = 30.0  # the longest a stopping teacher waits for the batches already running
_WARN_EVERY_S = 10.0


class TeacherServer:
    """The teacher's event loop: receive, validate, admit, reply; the instances batch and run."""

    def __init__(
        self,
        models: Sequence[Model],
        endpoint: str,
        max_batch_size: int = 256,
        max_delay: float = 0.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE,
        context: zmq.Context | None = None,
        curve: ServerKeys | None = None,
        metrics: TeacherMetrics | None = None,
        max_batch_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max batch size must be at least 1, got {max_batch_size}")
        if max_batch_tokens < 1:
            raise ConfigError(f"--max-batch-tokens must be at least 1, got {max_batch_tokens}")
        if not models:
            raise ConfigError("a teacher needs at least one model instance")
        if max_message_bytes < 1 or max_queue_bytes < max_message_bytes:
            raise ConfigError(
                f"the queue bound ({max_queue_bytes / MiB:g} MiB) must be positive and hold at least one message "
                f"of the largest size ({max_message_bytes / MiB:g} MiB): raise --max-queue-mb or lower --max-message-mb"
            )
        self.model = models[0]
        # what every predict is checked against, the dtypes parsed once
        self._feeds = {spec.name: (spec, np.dtype(spec.dtype)) for spec in self.model.feeds}
        self._variable = [spec.name for spec in self.model.feeds if spec.variable]
        # What the model answers to the fixed probe batch: students key cached answers by it.
        self.fingerprint = fingerprint(self.model)
        _, why = usable(self.fingerprint, [f.name for f in self.model.fetches], "this teacher")
        if why:
            log.warning("students will not cache this teacher's answers: %s", why)
        self.max_message_bytes = max_message_bytes
        self.max_queue_bytes = max_queue_bytes
        self.limits = wire.Limits(max_array_bytes=max_message_bytes)
        self.batcher = Batcher(max_batch_size, max_delay, max_batch_tokens)
        self.held_bytes = 0  # requests admitted and not yet answered, queued or running
        self.errors: dict[str, int] = {}  # error replies sent, by code
        self.dropped_replies = 0
        self._stopping = False
        self._refusing = False
        self._next_drop_warning = 0.0
        self.metrics = metrics or TeacherMetrics()
        self.metrics.instances.set(len(models))
        self._ctx = context or zmq.Context.instance()
        self.socket = wire.limit_socket(self._ctx.socket(zmq.ROUTER), self.limits)
        self.socket.setsockopt(zmq.LINGER, _LINGER_MS)
        self.socket.setsockopt(zmq.RCVHWM, _RCVHWM)
        self.socket.setsockopt(zmq.SNDHWM, _SNDHWM)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply that cannot be queued raises, so it is counted
        try:
            if curve is not None:
                curve.apply(self.socket)
            self.socket.bind(endpoint)
        except (zmq.ZMQError, ConfigError):
            self.socket.close(linger=0)  # an open socket would block the context's term() forever
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.instances = ModelInstances(models, self.batcher, self._ctx, self.metrics)

    def stop(self) -> None:
        """Stop taking requests; :meth:`serve` answers those running, refuses the rest, then returns."""
        self._stopping = True

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.instances.wake, zmq.POLLIN)
        while not self._stopping:
            events = dict(poller.poll(100))
            if self._stopping:  # SIGTERM during the poll: _finish decides what is answered
                break
            if self.socket in events:
                self._receive_ready()
            if self.instances.wake in events:
                self._reply_results()
        self._finish(poller)

    def _receive_ready(self) -> None:
        """Handle the messages already queued on the socket (at most a few hundred at once)."""
        for _ in range(_DRAIN_AT_ONCE):
            if not self.socket.get(zmq.EVENTS) & zmq.POLLIN:
                break
            self._on_message(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
        self.batcher.wake()  # once per burst, so a free instance takes the burst together
        self.metrics.in_flight.set(len(self.batcher))
        self.metrics.held_bytes.set(self.held_bytes)

    def _finish(self, poller: zmq.Poller) -> None:
        """Answer the batches running, refuse everything else with ``shutting_down``, then close.

        Queued requests are refused at once rather than run: a deep queue could take
        minutes, and the clients can resend them to another teacher now.  Whatever
        arrives meanwhile is refused too, until the socket has been quiet for a moment.
        """
        self._refusing = True
        for req in self.batcher.close():
            self._refuse(req, ErrorCode.SHUTTING_DOWN, _SHUTTING_DOWN)
        end = time.monotonic() + _STOP_RUNNING_S
        while self.instances.running() and time.monotonic() < end:
            events = dict(poller.poll(50))
            if self.socket in events:
                self._receive_ready()
            if self.instances.wake in events:
                self._reply_results()
        self._reply(self.instances.stop(max(0.0, end - time.monotonic())))
        end = time.monotonic() + _STOP_GRACE_S
        while time.monotonic() < end and self.socket.poll(int(_STOP_QUIET_S * 1000)):
            self._receive_ready()
        self.socket.close()  # LINGER lets the replies still queued go out

    # -- receiving --------------------------------------------------------

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        envelope, body = frames[:1], frames[1:]  # DEALER peers: the identity, then the message
        req_id: Any = None
        try:
            header = wire.decode_header(body, self.limits)
            req_id = header.get("id")  # a request whose arrays are refused is answered by its id, naming why
            msg = wire.decode_arrays(header, body, self.limits)
            size = sum(arr.nbytes for arr in msg.arrays.values())  # a Ragged's values and lengths
            if size > self.max_message_bytes:
                raise RequestError(ErrorCode.TOO_LARGE,
                                   f"the arrays of this request take {size / MiB:.1f} MiB, more than "
                                                f"the teacher's --max-message-mb {self.max_message_bytes / MiB:g}")
            self._dispatch(envelope, req_id, msg)
        except WireError as exc:
            self._reply_error(envelope, req_id, ErrorCode.BAD_MESSAGE, str(exc))
        except RequestError as exc:
            self._reply_error(envelope, req_id, exc.code, str(exc))
        except Exception as exc:  # a bug must cost one request, never the service (docs/teacher.md, Failures)
            log.exception("failed to handle a request")
            self._reply_error(envelope, req_id, ErrorCode.INTERNAL, type(exc).__name__)

    def _dispatch(self, envelope: list[Any], req_id: Any, msg: wire.Message) -> None:
        self.metrics.requests.labels(msg.kind if msg.kind in REQUESTS else "other").inc()
        if self._refusing:
            raise RequestError(ErrorCode.SHUTTING_DOWN, _SHUTTING_DOWN)
        request = read_request(msg.header)
        if isinstance(request, Predict):
            rows, feeds, lengths = self._validate(msg.arrays)
            if lengths is None:
                self._admit([Request(envelope, request.id, feeds, rows, time.monotonic(), weight=request.weight)])
            else:
                self._admit(split_by_length(envelope, request.id, feeds, lengths, time.monotonic(),
                                            self.batcher.max_rows, self.batcher.max_tokens, request.weight))
        elif isinstance(request, Ping):
            self._send(envelope, {"kind": "pong", "id": request.id})
        elif isinstance(request, MetaRequest):
            self._send(envelope, {"kind": "meta", "id": request.id, **self.meta()})
        else:
            self._send(envelope, {"kind": "stats", "id": request.id, "stats": self.stats()})

    def _admit(self, parts: list[Request]) -> None:
        """Queue a request's parts if the held bytes stay within the bound, after making room fairly; else refuse it."""
        nbytes = sum(part.nbytes for part in parts)
        over = self.held_bytes + nbytes - self.max_queue_bytes
        if over > 0:
            for old in self.batcher.make_room(parts[0].peer, nbytes, over):
                self._refuse(old, ErrorCode.BUSY, _BUSY)
            if self.held_bytes + nbytes > self.max_queue_bytes:
                raise RequestError(ErrorCode.BUSY, _BUSY)
        self.held_bytes += nbytes
        for part in parts:
            self.batcher.add(part)

    def _release(self, req: Request) -> None:
        self.held_bytes -= req.nbytes

    def _refuse(self, req: Request, code: ErrorCode, message: str) -> None:
        """Answer a queued request (or part) with an error: once per client request, however many parts it had."""
        self._release(req)
        if req.whole is not None:
            if req.whole.failed:
                return
            req.whole.failed = True
        self._reply_error(req.envelope, req.req_id, code, message)

    def _validate(self, arrays: dict[str, Tensor]) -> tuple[int, Tensors, np.ndarray | None]:
        """A predict's rows, its feeds (variable-length ones as :class:`Ragged`) and each row's length
        (None when the model has no variable-length feed); RequestError naming what is wrong."""
        feeds = self._feeds
        unknown = sorted(set(arrays) - set(feeds))
        missing = sorted(set(feeds) - set(arrays))
        if unknown or missing:
            raise RequestError(
                ErrorCode.BAD_REQUEST,
                f"feeds do not match the model's {sorted(feeds)}: unknown {unknown}, missing {missing}",
            )
        rows = {len(arr) if isinstance(arr, Ragged) else arr.shape[0] if arr.ndim else -1 for arr in arrays.values()}
        if len(rows) != 1 or min(rows) < 1:
            raise RequestError(ErrorCode.BAD_REQUEST,
                               f"every feed needs the same number (>= 1) of rows, got {sorted(rows)}")
        n = rows.pop()
        if n > self.batcher.max_rows:
            raise RequestError(ErrorCode.TOO_LARGE, f"{n} rows exceed the max batch size {self.batcher.max_rows}")
        for name, arr in arrays.items():
            spec, dtype = feeds[name]
            if arr.dtype != dtype:
                raise RequestError(ErrorCode.BAD_REQUEST,
                                   f"feed {name!r} has dtype {arr.dtype}, the model wants {spec.dtype}")
            if isinstance(arr, Ragged):
                if name not in self._variable:
                    raise RequestError(ErrorCode.BAD_REQUEST,
                                       f"feed {name!r} came with rows of different lengths, but the model declares "
                                       f"its rows {list(spec.shape)} (a first dimension of -1 would allow them)")
                row_shape = [0, *arr.inner_shape]
            else:
                row_shape = list(arr.shape[1:])
            if not spec.matches(row_shape):
                shown = f"[n, {', '.join(map(str, row_shape[1:]))}]" if isinstance(arr, Ragged) else str(row_shape)
                raise RequestError(ErrorCode.BAD_REQUEST,
                                   f"feed {name!r} has rows of shape {shown}, the model wants {list(spec.shape)}")
        if not self._variable:
            return n, arrays, None  # type: ignore[return-value]  # a Ragged feed was refused above
        return (n, *self._one_length_per_row(arrays, n))

    def _one_length_per_row(self, arrays: dict[str, Tensor], rows: int) -> tuple[Tensors, np.ndarray]:
        """The feeds with every variable-length one as a :class:`Ragged`, and the rows' one length each."""
        feeds: Tensors = dict(arrays)
        lengths: np.ndarray | None = None
        first = ""
        for name in self._variable:
            arr = arrays[name]
            if not isinstance(arr, Ragged):  # dense: every row of the full length
                arr = feeds[name] = Ragged(arr.reshape(rows * arr.shape[1], *arr.shape[2:]),
                                           np.full(rows, arr.shape[1], np.int64))
            if lengths is None:
                lengths, first = arr.lengths, name
            elif not np.array_equal(arr.lengths, lengths):
                row = int(np.flatnonzero(arr.lengths != lengths)[0])
                raise RequestError(ErrorCode.BAD_REQUEST,
                                   f"feed {name!r} row {row} has length {int(arr.lengths[row])}, feed {first!r} "
                                   f"{int(lengths[row])}: all variable-length feeds of a row must have the same length")
        assert lengths is not None
        longest = int(lengths.max())
        if longest > self.batcher.max_tokens:
            row = int(lengths.argmax())
            raise RequestError(ErrorCode.TOO_LARGE, f"row {row} has {longest} tokens, more than the teacher's "
                                                    f"--max-batch-tokens {self.batcher.max_tokens}")
        return feeds, lengths

    # -- replying ---------------------------------------------------------

    def _reply_results(self) -> None:
        self._reply(self.instances.collect())

    def _reply(self, results: list[Result]) -> None:
        for req, result in results:
            if isinstance(result, Exception):
                code = ErrorCode.BAD_OUTPUT if isinstance(result, ModelOutputError) else ErrorCode.MODEL_ERROR
                self._refuse(req, code, _failure(result))
                continue
            self._release(req)
            if req.whole is not None:  # a part: the client's reply waits for every part
                if req.whole.failed:
                    continue
                try:
                    result = req.whole.add(req.index, result)  # type: ignore[arg-type]
                except ModelOutputError as exc:  # parts' answers that are not one answer
                    req.whole.failed = True
                    self._reply_error(req.envelope, req.req_id, ErrorCode.BAD_OUTPUT, str(exc))
                    continue
                if result is None:
                    continue
            self._send(req.envelope, {"kind": "result", "id": req.req_id}, result)
        self.metrics.held_bytes.set(self.held_bytes)

    def meta(self) -> dict[str, Any]:
        return {
            "feeds": [s.to_wire() for s in self.model.feeds],
            "fetches": [s.to_wire() for s in self.model.fetches],
            "max_batch_size": self.batcher.max_rows,
            "max_batch_tokens": self.batcher.max_tokens,
            "max_delay_ms": self.batcher.max_delay * 1000,
            "instances": len(self.instances.instance_seconds),
            "thread_safe": self.model.thread_safe,
            "max_message_bytes": self.max_message_bytes,
            "max_queue_bytes": self.max_queue_bytes,
            "description": self.model.description,
            "device": self.model.device,
            "model_id": self.model.model_id,
            "fingerprint": self.fingerprint,
            "stats": self.stats(),
        }

    def stats(self) -> dict[str, Any]:
        s = self.batcher.counters()
        return {
            "requests": s.requests,
            "rows": s.rows,
            "batches": s.batches,
            "merged_batches": s.merged_batches,
            "max_batch_rows": s.max_batch_rows,
            "tokens": s.tokens,
            "padding_tokens": s.padding_tokens,
            "model_calls": self.instances.model_calls,
            "model_seconds": self.instances.model_seconds,
            "instance_seconds": list(self.instances.instance_seconds),
            "queued": len(self.batcher),
            "held_bytes": self.held_bytes,
            "errors": dict(self.errors),
            "dropped_replies": self.dropped_replies,
        }

    def _reply_error(self, envelope: list[Any], req_id: Any, code: ErrorCode, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        self.errors[code] = self.errors.get(code, 0) + 1
        log.debug("error reply %s: %s", code, message)
        if type(req_id) not in (int, str, type(None)):
            req_id = None
        self._send(envelope, {"kind": "error", "id": req_id, "code": code, "message": message})

    def _send(self, envelope: list[Any], header: dict[str, Any], arrays: Tensors | None = None) -> None:
        try:
            wire.send(self.socket, header, arrays, envelope=envelope, flags=zmq.NOBLOCK)
        except zmq.Again:  # SNDHWM replies already wait for this client
            self._dropped(envelope, "is not reading its replies")
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self._dropped(envelope, "has disconnected")
        except WireError as exc:  # e.g. a model output of a dtype the wire refuses
            log.warning("cannot encode a reply: %s", exc)
            if header.get("kind") != "error":  # the client must still hear back, not time out
                self._reply_error(envelope, header.get("id"), ErrorCode.MODEL_ERROR, f"the reply cannot be sent: {exc}")

    def _dropped(self, envelope: list[Any], why: str) -> None:
        self.dropped_replies += 1
        self.metrics.dropped_replies.inc()
        now = time.monotonic()
        if now >= self._next_drop_warning:  # a client that stopped reading would otherwise flood the log
            self._next_drop_warning = now + _WARN_EVERY_S
            log.warning("client %r %s: reply dropped (%d so far)", bytes(envelope[0]), why, self.dropped_replies)


def _failure(exc: Exception) -> str:
    """A model failure as its reply says it: the output check's own words, or the exception and its type."""
    return str(exc) if isinstance(exc, ModelOutputError) else f"{type(exc).__name__}: {exc}"


_BUSY = "the teacher's queue is full: send this request again later (or to another teacher)"
_SHUTTING_DOWN = "the teacher is shutting down: send this request to another teacher"


def parse_gpu_ids(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--gpu-ids must be a comma list of integers, got {text!r}") from None


def parse_instances(text: str, model: Model) -> int:
    """``--instances``: a count, or ``auto``: 2 on a GPU, 1 on a CPU (see the flag's help)."""
    if text == "auto":
        return 1 if model.device == "cpu" else 2
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_INSTANCES:
        raise ConfigError(f"--instances must be auto or a count from 1 to {MAX_INSTANCES}, got {text!r}")
    return n


def model_instances(model: Model, n: int) -> list[Model]:
    """The loaded model and ``n - 1`` clones sharing its weights, each run once (ready means it has run)."""
    models = [model, *(model.clone() for _ in range(n - 1))]
    for instance in models:
        try:
            instance.run({spec.name: spec.example(1) for spec in model.feeds})
        except Exception as exc:  # user code: a model that cannot run once is a bad --model
            raise ConfigError(f"the model failed its first run: {type(exc).__name__}: {exc}") from None
    return models


def max_message_bytes(args: argparse.Namespace) -> int:
    """``--max-message-mb``, by default 128 MiB or the queue bound if that is smaller."""
    if args.max_message_mb is None:
        return min(DEFAULT_MAX_MESSAGE, int(args.max_queue_mb * MiB))
    return int(args.max_message_mb * MiB)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zdistill-teacher",
        description="Serve a saved Paddle inference model or a Python function to zdistill students.",
    )
    p.add_argument(
        "--model", required=True, help="Paddle model prefix/file/folder, or module:function, or file.py:function"
    )
    p.add_argument("--model-id", default=None, metavar="ID",
                   help="the model id meta reports, instead of the one derived from the model (a hash of its "
                        "files, or a function's version=): students key cached predictions by it, so give a new "
                        f"one whenever the predictions change (1 to {MAX_MODEL_ID} printable characters)")
    p.add_argument("--lengths-input", default=None, metavar="NAME",
                   help="a Paddle model's input the teacher fills with each row's length (shape [rows]) for inputs "
                        "of variable length; students do not send it")
    p.add_argument("--mask-input", default=None, metavar="NAME",
                   help="a Paddle model's input the teacher fills with each row's mask (shape [rows, padded "
                        "length], 1 for tokens, 0 for padding) for inputs of variable length; students do not send it")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (0 picks a free one)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    p.add_argument("--gpu-ids", "--gpu_ids", default=None,
                   help="serve on this GPU, e.g. 0 (a Paddle model needs paddlepaddle-gpu; a Python function is "
                        "only reported as on it: it picks its device itself)")
    p.add_argument("--max-batch-size", type=int, default=256, help="most rows in one model call (default 256)")
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="for a model with variable-length feeds: most rows x longest row in one model call, "
                        "rows of similar length batched together; a longer request is cut into several calls, "
                        f"a single row longer than this gets too_large (default {DEFAULT_MAX_TOKENS})")
    p.add_argument(
        "--max-delay-ms", type=float, default=0.0,
        help="how long a request may wait for others to fill a batch (default 0: merge what queued while busy)",
    )
    p.add_argument(
        "--instances", default="auto",
        help="model instances in this process, sharing the weights, each running the next batch as soon as it "
             "is free (default auto: 2 on a GPU, so one batch's copies and Python overlap another's kernels; "
             "1 on a CPU, whose cores the math threads already use)",
    )
    p.add_argument("--threads", type=int, default=1,
                   help="CPU math threads per instance of a Paddle model (default 1)")
    p.add_argument("--ready-file", default=None, help="write the bound endpoint to this file once serving")
    p.add_argument("--max-message-mb", type=float, default=None,
                   help="largest request, all its arrays together, in MiB: bigger ones get too_large, and libzmq "
                        f"drops a client sending a bigger frame (default {DEFAULT_MAX_MESSAGE // MiB}, or the "
                        "queue bound if that is smaller)")
    p.add_argument("--max-queue-mb", type=float, default=DEFAULT_MAX_QUEUE / MiB,
                   help="most MiB of requests held, queued or running; beyond, predict requests get busy "
                        f"(default {DEFAULT_MAX_QUEUE // MiB})")
    add_daemon_flags(p, curve=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    missing = [v for v in _THREAD_VARS if v not in os.environ]
    if missing and argv is None:
        # BLAS libraries read their thread count once, when numpy loads, and numpy is
        # loaded by now: set the count and start again, so --threads really holds.
        os.environ.update({v: str(max(1, args.threads)) for v in missing})
        os.execv(sys.executable, [sys.executable, "-m", "zdistill.teacher.server", *sys.argv[1:]])
    context = zmq.Context()
    try:
        model = load_model(args.model, gpu_ids=parse_gpu_ids(args.gpu_ids), threads=args.threads,
                           model_id=args.model_id, lengths_input=args.lengths_input, mask_input=args.mask_input)
        models = model_instances(model, parse_instances(args.instances, model))
        endpoint = f"tcp://{args.host}:{args.port}"
        metrics = TeacherMetrics()
        try:
            server = TeacherServer(models, endpoint, args.max_batch_size, args.max_delay_ms / 1000,
                                   max_message_bytes(args), int(args.max_queue_mb * MiB), context=context,
                                   curve=server_keys(args.curve_secret_key, args.curve_allow), metrics=metrics,
                                   max_batch_tokens=args.max_batch_tokens)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot listen on {endpoint}: {exc}") from None
        metrics.serve(args.metrics_port, args.host)
    except (ConfigError, OSError) as exc:
        log.error("%s", exc)
        stop_authenticator(context)
        context.destroy(linger=0)
        return 2
    # Paddle installs its own SIGTERM handler on import; ours must come after the model loads.
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    serial = "" if model.thread_safe or len(models) == 1 else "; the function is not thread-safe: calls serialised"
    log.info("serving %s on %s (model_id %s, device %s, max batch %d, %d instance%s%s)", model.description,
             server.endpoint, model.model_id, model.device, args.max_batch_size, len(models),
             "s" if len(models) > 1 else "", serial)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(server.endpoint)
        os.replace(tmp, args.ready_file)
    server.serve()
    stop_authenticator(context)
    if server.instances.running():  # a hung model call: its thread's socket would keep term() waiting
        context.destroy(linger=_LINGER_MS)
    else:
        context.term()  # waits (up to the socket's LINGER) until the last replies have left
    log.info("stopped after %d requests", server.batcher.stats.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
