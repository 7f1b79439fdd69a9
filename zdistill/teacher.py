"""``zdistill-teacher``: serve a model to students over one ZeroMQ ROUTER socket.

Protocol (every message in the :mod:`zdistill.wire` format; ``id`` is echoed back):

==========  ==========================================  =====================================
request     header / arrays                             reply
==========  ==========================================  =====================================
``predict`` ``{"kind": "predict", "id"}`` + one array   ``{"kind": "result", "id"}`` + one
            per feed, all with the same number of rows  array per fetch, the same rows
``meta``    ``{"kind": "meta", "id"}``                  ``{"kind": "meta", ...}``: feeds,
                                                        fetches, max batch, device, stats
``stats``   ``{"kind": "stats", "id"}``                 ``{"kind": "stats", "stats": {...}}``
``ping``    ``{"kind": "ping", "id"}``                  ``{"kind": "pong", "id"}``
==========  ==========================================  =====================================

Anything wrong gets ``{"kind": "error", "id", "code", "message"}`` and the server goes
on serving everyone else.  The socket is bound only after the model has loaded and
run once, so an answered ``ping`` means the teacher is really ready.

On SIGTERM (or SIGINT) the teacher answers every request that had reached its socket,
including those still queued in libzmq and not yet read; requests that arrive after
that get the error code ``shutting_down`` (so a client can resend them elsewhere at
once instead of waiting for a timeout); it closes when the socket has been quiet for
a moment, flushes its replies and exits 0.

One thread owns the socket and the batcher; another owns the model
(:mod:`zdistill.runner`), so receiving, batching and replying overlap the model's
run.  Requests that arrive while the model runs are merged into the next batch.
"""

from __future__ import annotations

import argparse
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
from zdistill.batcher import Batcher, Request
from zdistill.errors import ConfigError, WireError
from zdistill.flags import add_daemon_flags, setup_logging
from zdistill.metrics import TeacherMetrics
from zdistill.model import Model, load_model
from zdistill.runner import ModelRunner
from zdistill.security import ServerKeys, server_keys, stop_authenticator

log = logging.getLogger("zdistill.teacher")

_DRAIN_AT_ONCE = 256
_DEPTH = 2  # batches handed to the model thread at once: one running, one waiting
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_KINDS = frozenset({"predict", "meta", "stats", "ping"})
_STOP_QUIET_S = 0.05  # a stopping teacher closes once no message came for this long...
_STOP_GRACE_S = 5.0  # ...or after this long, however busy its peers still are


class RequestError(Exception):
    """A request the teacher refuses; becomes an error reply with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TeacherServer:
    """The teacher's event loop: receive, validate, batch, run, split, reply."""

    def __init__(
        self,
        model: Model,
        endpoint: str,
        max_batch_size: int = 256,
        max_delay: float = 0.0,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        context: zmq.Context | None = None,
        curve: ServerKeys | None = None,
        metrics: TeacherMetrics | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max batch size must be at least 1, got {max_batch_size}")
        self.model = model
        self.limits = limits
        self.batcher = Batcher(max_batch_size, max_delay)
        self.errors: dict[str, int] = {}
        self._stopping = False
        self._refusing = False
        self.metrics = metrics or TeacherMetrics()
        self._ctx = context or zmq.Context.instance()
        self.socket = wire.limit_socket(self._ctx.socket(zmq.ROUTER), limits)
        self.socket.setsockopt(zmq.LINGER, 2000)
        try:
            if curve is not None:
                curve.apply(self.socket)
            self.socket.bind(endpoint)
        except (zmq.ZMQError, ConfigError):
            self.socket.close(linger=0)  # an open socket would block the context's term() forever
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.runner = ModelRunner(model, self._ctx, self.metrics)

    def stop(self) -> None:
        """Stop taking requests; :meth:`serve` answers those already taken, then returns."""
        self._stopping = True

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.runner.wake, zmq.POLLIN)
        while not self._stopping:
            deadline = self.batcher.deadline() if not self.runner.pending else None
            wait_ms = 100 if deadline is None else max(0.0, (deadline - time.monotonic()) * 1000)
            events = dict(poller.poll(wait_ms))
            if self._stopping:  # SIGTERM during the poll: no reply may go out before _finish reads the socket
                break
            if self.socket in events:
                self._receive_ready()
            if self.runner.wake in events:
                self._reply_results()
            self._run_ready(force=False)
        self._finish()

    def _receive_ready(self, limit: int = _DRAIN_AT_ONCE) -> int:
        """Handle up to ``limit`` messages already queued on the socket; return how many."""
        for count in range(limit):
            if not self.socket.get(zmq.EVENTS) & zmq.POLLIN:
                return count
            self._on_message(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
        return limit

    def _finish(self) -> None:
        """Answer what reached the socket before the stop, refuse later arrivals, then close.

        Messages queued inside libzmq were sent by clients before the stop: they are in
        flight, so they get real answers, however many.  Whatever comes after gets a
        ``shutting_down`` error until the socket has been quiet for a moment.
        """
        while self._receive_ready() == _DRAIN_AT_ONCE:
            pass
        self._run_ready(force=True)
        while self.runner.pending:  # the model finishes what it was given
            if self.runner.wake.poll(1000):
                self._reply_results()
        self.runner.close()
        self._refusing = True
        end = time.monotonic() + _STOP_GRACE_S
        while time.monotonic() < end and self.socket.poll(int(_STOP_QUIET_S * 1000)):
            self._receive_ready()
        self.socket.close()  # LINGER lets the replies still queued go out

    def _run_ready(self, force: bool) -> None:
        """Hand batches to the model thread: one running and, if full, one ready behind it.

        A full batch waits behind the running one, so a busy model never waits for us;
        a partial batch waits here instead, where requests arriving meanwhile join it.
        """
        while force or self.runner.pending < _DEPTH:
            batch = self.batcher.take(time.monotonic(), force, full_only=self.runner.pending > 0 and not force)
            if batch is None:
                break
            now = time.monotonic()
            for req in batch:
                self.metrics.queue_wait.observe(now - req.arrived)
            self.metrics.batch_rows.observe(sum(r.rows for r in batch))
            self.metrics.batch_requests.observe(len(batch))
            self.runner.submit(batch)
        self.metrics.in_flight.set(len(self.batcher))

    # -- receiving --------------------------------------------------------

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        envelope, body = frames[:1], frames[1:]  # DEALER peers: the identity, then the message
        req_id: Any = None
        try:
            msg = wire.decode(body, self.limits)
            req_id = msg.header.get("id")
            self._dispatch(envelope, req_id, msg)
        except WireError as exc:
            self._reply_error(envelope, req_id, "bad_message", str(exc))
        except RequestError as exc:
            self._reply_error(envelope, req_id, exc.code, str(exc))

    def _dispatch(self, envelope: list[Any], req_id: Any, msg: wire.Message) -> None:
        self.metrics.requests.labels(msg.kind if msg.kind in _KINDS else "other").inc()
        if self._refusing:
            raise RequestError("shutting_down", "the teacher is shutting down: send this request to another teacher")
        if msg.kind == "predict":
            rows = self._validate(msg.arrays)
            self.batcher.add(Request(envelope, req_id, msg.arrays, rows, time.monotonic()))
        elif msg.kind == "ping":
            self._send(envelope, {"kind": "pong", "id": req_id})
        elif msg.kind == "meta":
            self._send(envelope, {"kind": "meta", "id": req_id, **self.meta()})
        elif msg.kind == "stats":
            self._send(envelope, {"kind": "stats", "id": req_id, "stats": self.stats()})
        else:
            raise RequestError("bad_request", f"unknown request kind {msg.header.get('kind')!r:.40}")

    def _validate(self, arrays: dict[str, np.ndarray]) -> int:
        feeds = {spec.name: spec for spec in self.model.feeds}
        unknown = sorted(set(arrays) - set(feeds))
        missing = sorted(set(feeds) - set(arrays))
        if unknown or missing:
            raise RequestError(
                "bad_request",
                f"feeds do not match the model's {sorted(feeds)}: unknown {unknown}, missing {missing}",
            )
        rows = {arr.shape[0] if arr.ndim else -1 for arr in arrays.values()}
        if len(rows) != 1 or min(rows) < 1:
            raise RequestError("bad_request", f"every feed needs the same number (>= 1) of rows, got {sorted(rows)}")
        n = rows.pop()
        if n > self.batcher.max_rows:
            raise RequestError("too_large", f"{n} rows exceed the max batch size {self.batcher.max_rows}")
        for name, arr in arrays.items():
            spec = feeds[name]
            if arr.dtype != np.dtype(spec.dtype):
                raise RequestError("bad_request", f"feed {name!r} has dtype {arr.dtype}, the model wants {spec.dtype}")
            if not spec.matches(arr.shape[1:]):
                raise RequestError(
                    "bad_request",
                    f"feed {name!r} has rows of shape {list(arr.shape[1:])}, the model wants {list(spec.shape)}",
                )
        return n

    # -- running ----------------------------------------------------------

    def _reply_results(self) -> None:
        for req, result in self.runner.collect():
            if isinstance(result, Exception):
                self._reply_error(req.envelope, req.req_id, "model_error", f"{type(result).__name__}: {result}")
            else:
                self._send(req.envelope, {"kind": "result", "id": req.req_id}, result)

    # -- replying ---------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {
            "feeds": [s.to_wire() for s in self.model.feeds],
            "fetches": [s.to_wire() for s in self.model.fetches],
            "max_batch_size": self.batcher.max_rows,
            "max_delay_ms": self.batcher.max_delay * 1000,
            "description": self.model.description,
            "device": self.model.device,
            "stats": self.stats(),
        }

    def stats(self) -> dict[str, Any]:
        s = self.batcher.stats
        return {
            "requests": s.requests,
            "rows": s.rows,
            "batches": s.batches,
            "merged_batches": s.merged_batches,
            "max_batch_rows": s.max_batch_rows,
            "model_seconds": self.runner.model_seconds,
            "queued": len(self.batcher),
            "errors": dict(self.errors),
        }

    def _reply_error(self, envelope: list[Any], req_id: Any, code: str, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        self.errors[code] = self.errors.get(code, 0) + 1
        log.debug("error reply %s: %s", code, message)
        if type(req_id) not in (int, str, type(None)):
            req_id = None
        self._send(envelope, {"kind": "error", "id": req_id, "code": code, "message": message})

    def _send(self, envelope: list[Any], header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        try:
            wire.send(self.socket, header, arrays, envelope=envelope, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("client %r is not reading its replies; one reply dropped", bytes(envelope[0]))
        except WireError as exc:  # e.g. a model output of a dtype the wire refuses
            log.warning("cannot encode a reply: %s", exc)
            if header.get("kind") != "error":  # the client must still hear back, not time out
                self._reply_error(envelope, header.get("id"), "model_error", f"the reply cannot be sent: {exc}")


def parse_gpu_ids(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--gpu-ids must be a comma list of integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zdistill-teacher",
        description="Serve a saved Paddle inference model or a Python function to zdistill students.",
    )
    p.add_argument(
        "--model", required=True, help="Paddle model prefix/file/folder, or module:function, or file.py:function"
    )
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (0 picks a free one)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    p.add_argument("--gpu-ids", "--gpu_ids", default=None, help="serve on this GPU (needs paddlepaddle-gpu), e.g. 0")
    p.add_argument("--max-batch-size", type=int, default=256, help="most rows in one model call (default 256)")
    p.add_argument(
        "--max-delay-ms", type=float, default=0.0,
        help="how long a request may wait for others to fill a batch (default 0: merge what queued while busy)",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU math threads for a Paddle model (default 1)")
    p.add_argument("--ready-file", default=None, help="write the bound endpoint to this file once serving")
    p.add_argument("--max-message-mb", type=float, default=1024,
                   help="largest array a request may carry, in MiB; bigger frames are refused by libzmq (default 1024)")
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
        os.execv(sys.executable, [sys.executable, "-m", "zdistill.teacher", *sys.argv[1:]])
    context = zmq.Context()
    try:
        model = load_model(args.model, gpu_ids=parse_gpu_ids(args.gpu_ids), threads=args.threads)
        try:  # ready means it has run
            model.run({spec.name: spec.example(1) for spec in model.feeds})
        except Exception as exc:  # user code: a model that cannot run once is a bad --model
            raise ConfigError(f"the model failed its first run: {type(exc).__name__}: {exc}") from None
        endpoint = f"tcp://{args.host}:{args.port}"
        limits = wire.Limits(max_array_bytes=int(args.max_message_mb * 2**20))
        metrics = TeacherMetrics()
        try:
            server = TeacherServer(model, endpoint, args.max_batch_size, args.max_delay_ms / 1000, limits=limits,
                                   context=context, curve=server_keys(args.curve_secret_key, args.curve_allow),
                                   metrics=metrics)
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
    log.info("serving %s on %s (device %s, max batch %d)", model.description, server.endpoint, model.device,
             args.max_batch_size)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(server.endpoint)
        os.replace(tmp, args.ready_file)
    server.serve()
    stop_authenticator(context)
    context.term()  # waits (up to the socket's LINGER) until the last replies have left
    log.info("stopped after %d requests", server.batcher.stats.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
