"""A client for one model on a Triton Inference Server, shaped as :class:`~zdistill.client.TeacherClient`.

A student's worker, the reader, ``zdistill-register`` and ``zdistill ping`` drive a
teacher through ``submit`` / ``collect`` / ``next_deadline`` / ``reset`` and a pollable
``socket``; this class gives a model served by Triton that same face, so each of them
treats a ``triton://`` address as any other teacher (:func:`connect_teacher` picks the
client by the address):

- ``meta`` reads the model's metadata and config (feeds, fetches, ``max_batch_size``,
  instances) and runs :mod:`zdistill.fingerprint`'s probe batch through the model, and
  answers with the same header a zdistill-teacher sends, so the student checks its
  slots and keys its cache with the same code and messages.  A model whose inputs
  are not fixed-shape numeric tensors is refused there (``bad_request``), which the
  reader raises as a :class:`~zdistill.errors.ConfigError`.
- ``predict`` is one ``async_infer`` over gRPC: tensors travel as raw bytes, as many
  in flight as the caller submits; the answers come back on tritonclient's threads
  and are handed over through a pipe whose read end is :attr:`socket` (a file
  descriptor a ``zmq.Poller`` polls beside sockets).
- ``ping`` answers while the server is live and the model ready.

Triton's gRPC errors become zdistill's: ``UNAVAILABLE`` (and a lost connection, a
deadline, a cancelled call) a :class:`~zdistill.errors.TeacherTimeout`, which makes a
worker hand its tasks back and probe; ``INVALID_ARGUMENT`` a ``bad_request``
:class:`~zdistill.errors.TeacherError` naming the model and the inputs sent (fatal: the
student's training loop gets it); ``RESOURCE_EXHAUSTED`` (a full queue) ``busy``; any
other (the model raised) ``model_error``.  An answer of another model version than the meta
described is ``shutting_down`` (the worker asks the meta again).

``tritonclient[grpc]`` is the extra ``zdistill[triton]``, imported only when a Triton
address is used.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import zmq

from zdistill.client import Completion, TeacherClient
from zdistill.errors import ConfigError, ErrorCode, TeacherError, TeacherTimeout
from zdistill.fingerprint import fingerprint
from zdistill.security import ClientKeys
from zdistill.spec import Arrays, Ragged, Tensors, TensorSpec
from zdistill.triton_address import TritonAddress, is_triton

log = logging.getLogger(__name__)

# Triton's tensor types that zdistill's slots can hold (BYTES and BF16 have no numpy dtype it sends)
DTYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
          "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
          "FP16": "float16", "FP32": "float32", "FP64": "float64"}
TRITON_TYPES = {np.dtype(v): k for k, v in DTYPES.items()}
_DOWN = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED", "StatusCode.NOT_FOUND"}
_NO_BATCH_LIMIT = 2**31 - 1
_META_WORKERS = 1  # meta and ping calls block: one thread runs them, in order
# gRPC's channel options: tritonclient's message limits, and reconnects as a TeacherClient's (ZeroMQ's
# 100 ms to 1 s), not gRPC's default back-off of up to two minutes, so a restarted server is seen soon
_CHANNEL = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


def connect_teacher(
    address: str,
    context: zmq.Context | None = None,
    timeout: float = 30.0,
    watch: bool = False,
    weight: float = 1.0,
    curve: ClientKeys | None | Literal["env"] = "env",
    outputs: Sequence[str] | None = None,
) -> TeacherClient | TritonClient:
    """The client for a teacher ``address``: a :class:`TritonClient` for ``triton://``, else a
    :class:`~zdistill.client.TeacherClient` (``context``, ``watch``, ``weight`` and ``curve`` are
    its alone; ``outputs`` is what a Triton model is asked for, all of them when None)."""
    if is_triton(address):
        return TritonClient(address, timeout=timeout, outputs=outputs)
    return TeacherClient(address, context, timeout=timeout, watch=watch, weight=weight, curve=curve)


def _grpc() -> Any:
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as exc:
        raise ConfigError(f"a triton:// teacher needs tritonclient[grpc]: pip install 'zdistill[triton]' ({exc})") \
            from None
    return grpcclient


class TritonClient:
    """Talks to one model on one Triton server; not thread-safe (one owner, as TeacherClient).

    Answers arrive on tritonclient's threads; they only queue a :class:`Completion` and
    write a byte to a pipe, under a lock.  A :meth:`reset` starts a new *generation*:
    answers of calls made before it are dropped when they come.
    """

    monitor = None  # no connection events: a lost server fails the calls in flight (UNAVAILABLE)
    handshake_error = None

    def __init__(self, address: str, timeout: float = 30.0, outputs: Sequence[str] | None = None) -> None:
        self.target = TritonAddress.parse(address)
        self.address = str(self.target)
        self.timeout = timeout
        self.outputs = list(outputs) if outputs else None
        self._grpc = _grpc()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._generation = 0
        self._deadlines: dict[int, float] = {}
        self._ready: list[Completion] = []
        self._kept: dict[int, Completion] = {}  # finished while call() waited for another
        self._version = ""  # the model version the last meta described ("": none yet, or Triton named none)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.socket = self._read_fd  # readable when something finished
        self._pool = ThreadPoolExecutor(_META_WORKERS, thread_name_prefix="triton-meta")
        self._server = self._connect()
        self._closed = False

    # -- the caller's side ---------------------------------------------------

    def submit(self, kind: str = "predict", arrays: Tensors | None = None, timeout: float | None = None) -> int:
        """Start a request now and return its id; the answer comes from :meth:`collect`."""
        req_id = next(self._ids)
        wait = self.timeout if timeout is None else timeout
        with self._lock:
            self._deadlines[req_id] = time.monotonic() + wait
            generation = self._generation
        if kind == "predict":
            self._infer(req_id, generation, arrays or {}, wait)
        elif kind in ("meta", "ping"):
            job: Callable[[float], Completion] = self._meta if kind == "meta" else self._ping
            self._pool.submit(self._run_job, req_id, generation, job, wait)
        else:
            self._finish(generation, Completion(req_id, error=TeacherError(
                f"teacher {self.address}: a Triton teacher answers no {kind!r}", ErrorCode.BAD_REQUEST)))
        return req_id

    def next_deadline(self) -> float | None:
        with self._lock:
            return min(self._deadlines.values()) if self._deadlines else None

    def collect(self, wait: float = 0.0) -> list[Completion]:
        """Finished requests: waits up to ``wait`` seconds for the first, then takes all ready."""
        done = list(self._kept.values())
        self._kept.clear()
        with self._lock:
            ready = bool(self._ready)
        if not done and not ready and wait > 0:
            select.select([self._read_fd], [], [], wait)
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        now = time.monotonic()
        with self._lock:
            done += self._ready
            self._ready = []
            late = [i for i, t in self._deadlines.items() if t <= now]
            for req_id in late:
                del self._deadlines[req_id]
        return done + [Completion(i, error=TeacherTimeout(f"teacher {self.address} did not answer in time"))
                       for i in late]

    def call(self, kind: str, arrays: Tensors | None = None, timeout: float | None = None) -> Completion:
        """Send one request and wait for its own answer (others finishing meanwhile are kept)."""
        req_id = self.submit(kind, arrays, timeout)
        while True:
            with self._lock:
                deadline = self._deadlines.get(req_id, time.monotonic())
            for completion in self.collect(max(0.0, deadline - time.monotonic())):
                if completion.req_id == req_id:
                    if completion.error is not None:
                        raise completion.error
                    return completion
                self._kept[completion.req_id] = completion

    def predict(self, feeds: Tensors, timeout: float | None = None) -> Tensors:
        return self.call("predict", feeds, timeout).result or {}

    def ping(self, timeout: float | None = None) -> None:
        """Return while the server is live and the model ready; raise TeacherTimeout or TeacherError otherwise."""
        self.call("ping", timeout=timeout)

    def disconnected(self) -> bool:
        return False

    def reset(self) -> None:
        """Drop every request in flight and open a fresh channel (gRPC's own reconnects back off for minutes)."""
        with self._lock:
            self._generation += 1
            self._deadlines.clear()
            self._ready.clear()
        self._kept.clear()
        old, self._server = self._server, self._connect()
        self._pool.submit(old.close)  # closing cancels its calls: their callbacks must not run under our lock

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._generation += 1
            self._deadlines.clear()
            self._ready.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)  # a meta call in progress ends on its own timeout
        self._server.close()
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _connect(self) -> Any:
        return self._grpc.InferenceServerClient(self.target.url, channel_args=_CHANNEL)

    # -- answers, from other threads -------------------------------------------

    def _finish(self, generation: int, completion: Completion) -> None:
        with self._lock:
            if generation != self._generation or self._deadlines.pop(completion.req_id, None) is None:
                return  # reset since, or past its deadline already
            self._ready.append(completion)
            try:
                os.write(self._write_fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    def _run_job(self, req_id: int, generation: int, job: Callable[[float], Completion], wait: float) -> None:
        try:
            completion = job(wait)
            completion.req_id = req_id
        except Exception as exc:  # noqa: BLE001 - whatever failed is this request's answer
            completion = Completion(req_id, error=self._error(exc, "", ""))
        self._finish(generation, completion)

    # -- Triton's side -----------------------------------------------------------

    def _infer(self, req_id: int, generation: int, arrays: Tensors, wait: float) -> None:
        grpc = self._grpc
        inputs = []
        for name, arr in arrays.items():
            if isinstance(arr, Ragged):
                self._finish(generation, Completion(req_id, error=TeacherError(
                    f"teacher {self.address}: feed {name!r} holds rows of different lengths; a Triton teacher "
                    "takes fixed-shape inputs only", ErrorCode.BAD_REQUEST)))
                return
            kind = TRITON_TYPES.get(arr.dtype)
            if kind is None:
                self._finish(generation, Completion(req_id, error=TeacherError(
                    f"teacher {self.address}: feed {name!r} is {arr.dtype}, which Triton cannot take",
                    ErrorCode.BAD_REQUEST)))
                return
            tensor = grpc.InferInput(name, list(arr.shape), kind)
            tensor.set_data_from_numpy(np.ascontiguousarray(arr))  # sent as raw bytes, not as a list of values
            inputs.append(tensor)
        sent = ", ".join(f"{name} {arr.dtype} {list(arr.shape)}" for name, arr in arrays.items())
        outputs = [grpc.InferRequestedOutput(name) for name in self.outputs] if self.outputs else None
        version = self._version

        def answered(result: Any, error: Exception | None) -> None:
            error = error or self._other_version(result, version)
            if error is not None:
                self._finish(generation, Completion(req_id, error=self._error(error, sent, "infer")))
                return
            names = self.outputs or [o.name for o in result.get_response().outputs]
            self._finish(generation, Completion(req_id, result={n: result.as_numpy(n) for n in names}))

        try:
            self._server.async_infer(self.target.model, inputs, answered, model_version=self.target.version,
                                     outputs=outputs, client_timeout=wait)
        except Exception as exc:  # noqa: BLE001 - a channel that cannot take the call: this request's answer
            self._finish(generation, Completion(req_id, error=self._error(exc, sent, "infer")))

    def _other_version(self, result: Any, version: str) -> TeacherError | None:
        """Why ``result`` is not an answer of model ``version`` (the one the meta described), or None.

        Without a version in the address Triton answers with the latest one ready, and a new one can
        be loaded on a running server: no connection drops and no call fails, yet it is another model
        (other answers, another ``model_id``), which its answers must never be filed or audited under.
        ``shutting_down`` makes a worker hand its tasks back and ask the meta again."""
        answered = result.get_response().model_version
        if not version or not answered or answered == version:
            return None
        return TeacherError(f"teacher {self.address}: model {self.target.model!r} answered as version {answered}, "
                            f"not version {version} as its meta said (another model since)", ErrorCode.SHUTTING_DOWN)

    def _error(self, exc: Exception, sent: str, what: str) -> Exception:
        """Triton's error as zdistill's (see the module's docstring)."""
        if isinstance(exc, TeacherError):
            return exc
        status = str(getattr(exc, "status", lambda: "")() or "")
        said = str(getattr(exc, "message", lambda: str(exc))() or exc)
        model = f"model {self.target.model!r}" + (f" version {self.target.version}" if self.target.version else "")
        if status in _DOWN or not status:
            return TeacherTimeout(f"teacher {self.address} is unavailable ({status or type(exc).__name__}: {said})")
        if status == "StatusCode.INVALID_ARGUMENT":
            return TeacherError(f"teacher {self.address}: Triton refused the inputs of {model}"
                                f"{f' ({sent})' if sent else ''}: {said}", ErrorCode.BAD_REQUEST)
        if status == "StatusCode.RESOURCE_EXHAUSTED":
            return TeacherError(f"teacher {self.address}: {model} is busy: {said}", ErrorCode.BUSY)
        code = ErrorCode.MODEL_ERROR if what == "infer" else ErrorCode.BAD_REQUEST
        return TeacherError(f"teacher {self.address}: {model} failed ({status}): {said}", code)

    def _ping(self, wait: float) -> Completion:
        server, model = self._server, self.target
        if not server.is_server_live(client_timeout=wait):
            return Completion(0, error=TeacherError(f"teacher {self.address}: the Triton server is not live",
                                                    ErrorCode.SHUTTING_DOWN))
        if not server.is_model_ready(model.model, model.version, client_timeout=wait):
            return Completion(0, error=TeacherError(
                f"teacher {self.address}: model {model.model!r} is not ready on the Triton server (unloaded, or "
                "still loading)", ErrorCode.SHUTTING_DOWN))
        return Completion(0, header={"kind": "pong"})

    def _meta(self, wait: float) -> Completion:
        """The model's description as a zdistill-teacher's ``meta`` header, with its fingerprint."""
        end = time.monotonic() + wait
        server, target = self._server, self.target
        metadata = server.get_model_metadata(target.model, target.version, as_json=True, client_timeout=wait)
        config = server.get_model_config(target.model, target.version, as_json=True,
                                         client_timeout=max(0.01, end - time.monotonic()))["config"]
        try:
            model = TritonModel.describe(self.address, metadata, config)
        except ConfigError as exc:
            return Completion(0, error=TeacherError(str(exc), ErrorCode.BAD_REQUEST))
        version = model.model_id.rsplit(":", 1)[1]  # the address's, or the latest the metadata lists
        model.run_model = lambda feeds: self._run_sync(feeds, model.max_batch_size, end, version)
        header = model.meta()
        header["fingerprint"] = fingerprint(model)
        self._version = version
        return Completion(0, header=header)

    def _run_sync(self, feeds: Arrays, max_rows: int, end: float, version: str) -> Arrays:
        """The model's answers to ``feeds`` (the probe batch), in calls of at most ``max_rows`` rows, all
        of model ``version`` (a fingerprint of another version's answers would pass for this one's)."""
        grpc, rows = self._grpc, len(next(iter(feeds.values())))
        parts: list[Arrays] = []
        for start in range(0, rows, max_rows):
            inputs = []
            for name, arr in feeds.items():
                tensor = grpc.InferInput(name, [len(arr[start:start + max_rows]), *arr.shape[1:]],
                                         TRITON_TYPES[arr.dtype])
                tensor.set_data_from_numpy(np.ascontiguousarray(arr[start:start + max_rows]))
                inputs.append(tensor)
            result = self._server.infer(self.target.model, inputs, model_version=self.target.version,
                                        client_timeout=max(0.01, end - time.monotonic()))
            if (error := self._other_version(result, version)) is not None:
                raise error
            names = [o.name for o in result.get_response().outputs]
            parts.append({n: result.as_numpy(n) for n in names})
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


class TritonModel:
    """A Triton model's inputs and outputs as zdistill's feeds and fetches (what :mod:`zdistill.fingerprint` runs)."""

    def __init__(self, address: str, model_id: str, feeds: list[TensorSpec], fetches: list[TensorSpec],
                 max_batch_size: int, instances: int, device: str, description: str) -> None:
        self.address, self.model_id = address, model_id
        self.feeds, self.fetches = feeds, fetches
        self.max_batch_size, self.instances = max_batch_size, instances
        self.device, self.description = device, description
        self.run_model: Callable[[Arrays], Arrays] | None = None

    def run(self, feeds: Arrays) -> Arrays:
        assert self.run_model is not None, "run_model is set before the fingerprint runs"
        return self.run_model(feeds)

    def meta(self) -> dict[str, Any]:
        return {"kind": "meta", "feeds": [f.to_wire() for f in self.feeds],
                "fetches": [f.to_wire() for f in self.fetches], "max_batch_size": self.max_batch_size,
                "instances": self.instances, "model_id": self.model_id,
                "device": self.device, "description": self.description}

    @classmethod
    def describe(cls, address: str, metadata: dict[str, Any], config: dict[str, Any]) -> TritonModel:
        """From ``get_model_metadata`` and ``get_model_config`` (as JSON); ConfigError for a model zdistill
        cannot feed: one that does not batch along a first axis, a BYTES or BF16 tensor, a variable-length input."""
        target = TritonAddress.parse(address)
        name = f"model {target.model!r} of teacher {address}"
        batching = int(config.get("max_batch_size", 0) or 0)
        tensors = {"input": metadata.get("inputs", []), "output": metadata.get("outputs", [])}
        if not batching and not all(t.get("shape") and int(t["shape"][0]) == -1
                                    for ts in tensors.values() for t in ts):
            raise ConfigError(f"{name} does not batch (max_batch_size 0, and not every tensor's first "
                              "dimension is -1): zdistill sends rows in batches")
        specs: dict[str, list[TensorSpec]] = {}
        for side, found in tensors.items():
            specs[side] = []
            for t in found:
                dtype = DTYPES.get(str(t.get("datatype")))
                if dtype is None:
                    raise ConfigError(f"{name}: {side} {t.get('name')!r} is {t.get('datatype')}, which zdistill "
                                      f"cannot hold (it takes {', '.join(DTYPES)})")
                row = tuple(int(d) for d in t.get("shape", []))[1:]  # the batch axis, Triton's or the model's own
                if side == "input" and row[:1] == (-1,):
                    raise ConfigError(f"{name}: input {t['name']!r} has a variable first dimension "
                                      f"{list(row)}: a Triton teacher takes fixed-shape inputs only (variable-length "
                                      "slots need a zdistill-teacher)")
                specs[side].append(TensorSpec(str(t["name"]), dtype, row))
        versions = sorted((int(v) for v in metadata.get("versions", []) if str(v).isdigit()), reverse=True)
        version = target.version or (str(versions[0]) if versions else "")
        groups = config.get("instance_group") or [{}]
        instances = max(1, sum(int(g.get("count", 1)) for g in groups))
        device = "gpu" if any(g.get("kind") == "KIND_GPU" for g in groups) else "cpu"
        description = (f"Triton model {target.model} version {version or '?'} ({metadata.get('platform') or '?'}) "
                       f"at {target.url}")
        return cls(address, f"triton:{target.model}:{version}", specs["input"], specs["output"],
                   batching or _NO_BATCH_LIMIT, instances, device, description)
