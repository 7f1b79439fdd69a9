"""``DistillReader``: EDL's distillation reader, same calls and output, over ZeroMQ.

A student swaps ``from paddle_edl.distill.distill_reader import DistillReader`` for
``from zdistill import DistillReader`` and keeps its training loop.  What differs:

- the teacher is a ``zdistill-teacher`` (not Paddle Serving); its ``meta`` says which
  slots it takes, so ``set_serving_conf_file`` is accepted but not needed;
- ``teacher_batch_size`` defaults to whole reader batches packed up to the teacher's
  max batch (EDL's default of 1 sample per request was its main cost); it never
  changes the output;
- an empty reader batch (or sample list) comes out as an empty batch (EDL dropped it);
- a slot whose samples differ in length (token ids) travels unpadded, and each sample
  comes back at its own length, a per-token prediction cut to it (README.md,
  "Variable-length sequences");
- every value comes back unchanged (a slot's dtype is one that holds all of its task's
  values, see README.md), or the epoch raises ``ConfigError`` naming it;
- ``close()``, ``with``, garbage collection and interpreter exit stop every process
  the reader started; ``close()`` may be called from any thread, and a training loop
  waiting on the reader then raises :class:`~zdistill.errors.ClosedError` at once.

The machinery lives in :mod:`zdistill.student.pipeline`; this module is the API edge: it
keeps the configuration, applies EDL's environment variables, asks a teacher for
its feeds, and starts the pipeline on the first epoch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq

from zdistill.client import addresses, unreachable
from zdistill.errors import ClosedError, ConfigError, TeacherError, TeacherTimeout, WireError
from zdistill.fingerprint import TOLERANCE
from zdistill.spec import TeacherMeta, TensorSpec
from zdistill.student.batches import ReaderType, check_slot_names
from zdistill.student.options import PipelineOptions
from zdistill.student.pipeline import Pipeline
from zdistill.triton_address import is_triton
from zdistill.triton_client import connect_teacher

log = logging.getLogger("zdistill.reader")

ENV_BALANCE_SERVER = "PADDLE_DISTILL_BALANCE_SERVER"
ENV_SERVICE_NAME = "PADDLE_DISTILL_SERVICE_NAME"
ENV_MAX_TEACHER = "PADDLE_DISTILL_MAX_TEACHER"


class DistillReader:
    """Reads the user's samples, asks teachers for predictions, yields both (EDL's API)."""

    def __init__(self, ins: Sequence[str], predicts: Sequence[str]) -> None:
        if isinstance(ins, str) or isinstance(predicts, str) or not ins or not predicts:
            raise ConfigError("ins and predicts must be non-empty lists of names, e.g. ins=['img', 'label']")
        self._ins, self._predicts = list(ins), list(predicts)
        check_slot_names(self._ins)
        self._mode: str | None = None
        self._teachers: list[str] = []
        self._discovery_servers: list[str] = []
        self._service_name: str | None = None
        self._require_num = 1
        self._teacher_batch_size: int | None = None
        self._serving_conf_file: str | None = None
        self._reader: Callable[[], Iterable[Any]] | None = None
        self._reader_type: ReaderType | None = None
        self.options = PipelineOptions()
        self._pipeline: Pipeline | None = None
        self._feeds: list[TensorSpec] = []  # what the teachers take, asked when the pipeline starts
        self._meta = TeacherMeta()  # the meta of the teacher those feeds came from
        self._cache: tuple[str, int | None, float] | None = None  # the teacher-output cache: path, max bytes, tolerance
        self._active: Iterator[Any] | None = None
        self._discovery: Any = None
        self._membership_version = -1
        # close() may come from any thread, or from a signal handler of the thread inside a call
        # of this reader (hence reentrant): the state is swapped under this lock.
        self._lock = threading.RLock()

    # -- EDL's configuration calls ---------------------------------------------

    def set_fixed_teacher(self, teachers: str | Sequence[str]) -> None:
        """Teachers at fixed addresses: a list, a tuple, or ``'ip:port,ip:port'``.

        Each is ``HOST:PORT``, ``tcp://HOST:PORT`` or ``ipc://PATH``; anything else
        raises :class:`ConfigError` here, naming it.  Refused while the reader runs (see
        :meth:`_check_not_started`).
        """
        self._check_not_started("set_fixed_teacher")
        self._teachers = addresses(teachers, "teachers", "teacher")
        self._mode = "fixed"
        self._require_num = len(self._teachers)

    def set_dynamic_teacher(
        self, discovery_servers: str | Sequence[str], teacher_service_name: str, require_max_teacher: int = 1
    ) -> None:
        """Teachers found through ``zdistill-balancer`` (a comma list of them, for failover).

        Each balancer address is checked here, as :meth:`set_fixed_teacher` checks teachers'.
        Refused while the reader runs (see :meth:`_check_not_started`).
        """
        self._check_not_started("set_dynamic_teacher")
        self._discovery_servers = addresses(discovery_servers, "discovery_servers", "balancer")
        self._service_name = teacher_service_name
        self._require_num = int(require_max_teacher)
        self._mode = "discover"

    def _check_not_started(self, call: str) -> None:
        """Refuse a change of teachers (or of their cache) while the reader runs: its workers keep
        what its first epoch started with, so every later epoch would get the old settings' answers."""
        if self._pipeline is not None and not self._pipeline.closed:
            raise ConfigError(f"{call} must be called before the first epoch or after close(): "
                              "the running reader keeps the teachers and cache it started with")

    def set_require_max_teacher(self, require_max_teacher: int) -> None:
        """The most teachers this student uses at once (ignored for fixed teachers, as in EDL)."""
        if self._mode != "fixed":
            self._require_num = int(require_max_teacher)

    def set_teacher_batch_size(self, teacher_batch_size: int = 1) -> None:
        """Rows per teacher request: a speed knob only, the output is the same for any value."""
        if int(teacher_batch_size) < 1:
            raise ConfigError(f"teacher_batch_size must be >= 1, got {teacher_batch_size}")
        self._teacher_batch_size = int(teacher_batch_size)

    def set_teacher_cache(self, path: str | os.PathLike[str], max_bytes: int | None = None,
                          tolerance: float = TOLERANCE) -> None:
        """Keep the teachers' answers under ``path`` and answer rows asked before from there.

        A row is looked up by the teacher's ``model_id``, its fingerprint and a 128-bit hash
        of the exact bytes of its feeds; rows found never go to a teacher, and a task whose
        rows are all found (but for an audit, below) never leaves this machine.  The cache
        outlives the process (a restarted student, or several students on this machine,
        share what is under ``path``) and holds at most ``max_bytes`` over the whole
        ``path`` (default: a tenth of its file system, at most half of what is free), the
        oldest answers going first.  The output
        is the same with or without it (bit for bit where a teacher's answer to a row does
        not move with the batch around it): a damaged record or segment is skipped with a
        warning, never served, and a cache that cannot be written (a full or read-only file
        system) turns itself off with one warning naming the file.  It helps where samples repeat (a
        fixed dataset: every epoch after the first; restarts; sweeps of the student
        against one teacher) and cannot where they never do (augmented inputs: every row
        misses, and hashing is what it costs; see ``bench/bench_cache.py``).  Call before
        the first epoch.

        The fingerprint is what the model answers to a fixed probe batch (each teacher runs
        it at start, twice, in two batch compositions, and reports it in ``meta``:
        :mod:`zdistill.fingerprint`), so two models sharing a ``model_id`` (weights loaded
        from another file) never get each other's answers.  Answers are served only while
        every teacher reproduces the fingerprint within ``tolerance`` (relative): a teacher
        that does not, or whose two runs differ by more (dropout left on), turns the cache
        off with one warning, and from that moment no cached answer reaches the training
        loop.  Each epoch is audited too: one cached row of its first task with cached rows
        (and of one in every 64 after) is asked of the teacher anyway and compared, which
        catches models that agree on the probe only.  Teachers computing in reduced
        precision (bf16) whose answers move with the batch may need a larger ``tolerance``;
        a larger one also takes models closer than it for one.
        """
        try:
            import xxhash  # noqa: F401 - the row hash
        except ImportError:
            raise ConfigError("the teacher-output cache needs xxhash: pip install 'zdistill[cache]'") from None
        if max_bytes is not None and int(max_bytes) <= 0:
            raise ConfigError(f"max_bytes must be positive, got {max_bytes}")
        if not 0 <= float(tolerance) < 1:
            raise ConfigError(f"tolerance must be at least 0 and below 1, got {tolerance}")
        self._check_not_started("set_teacher_cache")
        self._cache = (os.fspath(path), None if max_bytes is None else int(max_bytes), float(tolerance))

    def set_serving_conf_file(self, conf_file: str) -> None:
        """Accepted for EDL compatibility and unused: a zdistill teacher describes its own feeds."""
        if not os.path.isfile(conf_file):
            log.warning("serving conf file %s does not exist (it is not needed by zdistill)", conf_file)
        self._serving_conf_file = conf_file

    def _set_reader(self, reader: Callable[[], Iterable[Any]], kind: ReaderType) -> DistillReader:
        if not callable(reader):
            raise TypeError(f"the reader must be a callable that returns a generator, got {type(reader).__name__}")
        if self._reader is not None:
            raise ConfigError("a reader has already been set on this DistillReader")
        self._reader, self._reader_type = reader, kind
        return self

    def set_sample_generator(self, reader: Callable[[], Iterable[Any]]) -> DistillReader:
        """``reader()`` yields samples ``(slot, ...)``; the output yields ``(slot, ..., predict, ...)``."""
        return self._set_reader(reader, ReaderType.SAMPLE)

    def set_sample_list_generator(self, reader: Callable[[], Iterable[Any]]) -> DistillReader:
        """``reader()`` yields lists of samples; the output yields lists of the same sizes."""
        return self._set_reader(reader, ReaderType.SAMPLE_LIST)

    def set_batch_generator(self, reader: Callable[[], Iterable[Any]]) -> DistillReader:
        """``reader()`` yields tuples of arrays; the output yields ``(slot_batch, ..., predict_batch, ...)``."""
        return self._set_reader(reader, ReaderType.BATCH)

    def config(self) -> dict[str, Any]:
        """What :meth:`print_config` prints (EDL's keys), as a dict."""
        return {
            "ins": self._ins,
            "predicts": self._predicts,
            "serving_conf_file": self._serving_conf_file,
            "teacher_batch_size": self._teacher_batch_size or f"auto ({self.options.request_rows})",
            "distill_mode": self._mode,
            "teachers": self._teachers,
            "require_max_teacher": self._require_num,
            "discovery_servers": self._discovery_servers,
            "teacher_service_name": self._service_name,
            "reader_type": self._reader_type.value if self._reader_type else None,
        }

    def print_config(self) -> None:
        """Print the configuration as EDL does (it is a user-facing report, so it prints)."""
        lines = ["------ DistillReader Configuration Arguments ------"]
        if self._pipeline is None:
            lines.append("DistillReader not start yet, some args may change.")
        lines += [f"{key}: {value}" for key, value in self.config().items()]
        lines.append("------------------------------------------------")
        print("\n".join(lines))  # noqa: T201

    # -- running ------------------------------------------------------------------

    def _apply_env(self) -> None:
        """EDL's environment variables win over the calls, as they did there."""
        servers = os.environ.get(ENV_BALANCE_SERVER)
        if servers:
            name = os.environ.get(ENV_SERVICE_NAME)
            if not name:
                raise ConfigError(f"{ENV_BALANCE_SERVER} is set but {ENV_SERVICE_NAME} is not")
            self._discovery_servers = addresses(servers, ENV_BALANCE_SERVER, "balancer")
            self._service_name = name
            self._mode = "discover"
            if os.environ.get(ENV_MAX_TEACHER):
                self._require_num = int(os.environ[ENV_MAX_TEACHER])
        if self._mode is None:
            raise ConfigError(
                "no teacher: call set_fixed_teacher or set_dynamic_teacher, "
                f"or set {ENV_BALANCE_SERVER} and {ENV_SERVICE_NAME}"
            )

    def _start(self) -> Pipeline:
        self._apply_env()
        if self._teacher_batch_size is not None:
            self.options.request_rows = self._teacher_batch_size
            self.options.task_rows = max(self.options.task_rows, self._teacher_batch_size)
        pipeline = Pipeline(self._ins, self._predicts, self.options)
        with self._lock:
            self._pipeline = pipeline  # close() from another thread stops it while it waits for teachers
        try:
            if self._mode == "fixed":
                teachers = self._teachers
            else:
                teachers = self._start_discovery()
            self._feeds = self._fetch_feeds(pipeline.ctx, teachers)
            pipeline.feeds, pipeline.fetches = self._feeds, self._meta.fetches_named(self._predicts)
            if self._cache is not None:
                path, max_bytes, tolerance = self._cache
                pipeline.use_cache(path, self._meta, max_bytes, tolerance)
            pipeline.set_teachers(teachers, self._membership_changes if self._discovery is not None else None)
        except BaseException as exc:
            closed = pipeline.closed
            pipeline.close()
            if not closed:
                raise
            with self._lock:  # a discovery client started after close() took the state: stop it too
                discovery, self._discovery = self._discovery, None
            if discovery is not None:
                discovery.close()
            if isinstance(exc, ClosedError):
                raise
            # What failed is a wait that close() cut short (on a destroyed context, say).
            raise ClosedError("the DistillReader was closed while its first epoch waited for teachers") from exc
        return pipeline

    def _start_discovery(self) -> list[str]:
        from zdistill.discovery.client import DiscoveryClient

        if not self._service_name:
            raise ConfigError("dynamic teachers need a teacher service name (set_dynamic_teacher)")
        self._discovery = DiscoveryClient(self._discovery_servers, self._service_name, self._require_num)
        self._discovery.start()
        version, teachers = self._discovery.current()
        wait = self.options.teacher_wait
        deadline = time.monotonic() + wait
        said = ""
        while not teachers:
            self._check_open()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TeacherTimeout(f"no teacher of {self._service_name!r} within {wait:.0f} s: {said}")
            version, teachers = self._discovery.wait_for_change(version, min(0.5, left))
            why = "" if teachers else self._why_no_teacher()
            if why and why != said:
                log.warning("%s; waiting up to %.0f s more (DistillReader.options.teacher_wait)", why, left)
                said = why
        self._membership_version = version
        return teachers

    def _why_no_teacher(self) -> str:
        """What the balancers say (or why they say nothing) while they give this student no teacher."""
        from zdistill.discovery.client import ask_balancer
        from zdistill.discovery.messages import StatusReply, StatusRequest

        leader = self._discovery.leader
        if leader is None:
            leaderless = self._discovery.leaderless()
            causes = [f"{s}: up, but has no leader ({why})" for s, why in leaderless.items()]
            causes += [f"{s}: {unreachable(s) or 'no answer'}" for s in self._discovery.servers if s not in leaderless]
            return f"no balancer {'leads' if leaderless else 'answers'} ({'; '.join(causes)})"
        status = ask_balancer(leader, StatusRequest(id=1), timeout=1.0)
        known = status.teachers if isinstance(status, StatusReply) else {}
        if self._service_name in known:
            return f"the balancer at {leader} has no live teacher of service {self._service_name!r} yet"
        services = ", ".join(f"{name} ({count} teachers)" for name, count in sorted(known.items())) or "none"
        return f"the balancer at {leader} knows no service {self._service_name!r}; the services it knows: {services}"

    def _membership_changes(self) -> list[str] | None:
        """The new teacher list when the balancer changed it since the last look, else None."""
        version, teachers = self._discovery.current()
        if version == self._membership_version:
            return None
        self._membership_version = version
        return teachers

    def _fetch_feeds(self, ctx: zmq.Context, teachers: Sequence[str]) -> list[TensorSpec]:
        """Ask the teachers (in turn, until one answers) which slots they take.

        A teacher that cannot be reached is named at once, with the cause (connection
        refused, unknown host, no route, CURVE keys that do not fit, no answer), and
        again whenever the cause changes, until ``teacher_wait`` runs out.
        """
        wait = self.options.teacher_wait
        deadline = time.monotonic() + wait
        said: dict[str, str] = {}
        while True:
            self._check_open()
            for address in teachers:
                cause = unreachable(address)
                if cause is None:
                    meta, cause = self._ask_meta(ctx, address)
                    if meta is not None:
                        self._meta = meta
                        return self._check_meta(address, meta)
                if said.get(address) != cause:
                    left = max(0.0, deadline - time.monotonic())
                    log.warning("teacher %s: %s; trying again for up to %.0f s (DistillReader.options.teacher_wait)",
                                address, cause, left)
                    said[address] = cause
            if time.monotonic() > deadline:
                causes = "; ".join(f"{address}: {cause}" for address, cause in said.items())
                raise TeacherTimeout(f"no teacher answered within {wait:.0f} s ({causes})")
            time.sleep(0.25)  # between rounds of refused connections: they fail in microseconds

    def _ask_meta(self, ctx: zmq.Context, address: str, timeout: float = 2.0) -> tuple[TeacherMeta | None, str]:
        """A teacher's meta, or None and why it did not come (a failed handshake is known at once)."""
        silent = (f"it accepts connections but does not answer in {timeout:g} s "
                  "(is it a zdistill-teacher? still loading its model?)")
        client = connect_teacher(address, ctx, timeout=timeout, watch=True)
        deadline = time.monotonic() + timeout
        req_id: int | None = None
        try:
            while time.monotonic() < deadline:
                if req_id is None:
                    try:
                        req_id = client.submit("meta", timeout=max(0.0, deadline - time.monotonic()))
                    except TeacherTimeout:
                        pass  # no connection to queue it on yet (between two failed handshakes, say)
                for done in client.collect(0.05):
                    if done.req_id != req_id:
                        continue
                    if isinstance(done.error, TeacherError):
                        raise ConfigError(f"teacher {address} refused meta: {done.error}")
                    if done.error is not None:  # a Triton teacher's says why (no such model, say)
                        return None, str(done.error) if is_triton(address) else silent
                    try:
                        return TeacherMeta.parse(done.header or {}), ""
                    except WireError as exc:
                        raise ConfigError(f"teacher {address} sent a {exc}") from None
                client.disconnected()
                if client.handshake_error:
                    return None, client.handshake_error
            return None, silent
        finally:
            client.close()

    def _check_meta(self, address: str, meta: TeacherMeta) -> list[TensorSpec]:
        feeds = meta.feeds
        fetches = [f.name for f in meta.fetches]
        missing = [p for p in self._predicts if p not in fetches]
        if missing:
            raise ConfigError(f"predicts {missing} are not outputs of teacher {address}; its outputs are {fetches}")
        absent = [f.name for f in feeds if f.name not in self._ins]
        if absent:
            raise ConfigError(f"teacher {address} needs feeds {absent}, which are not among ins {self._ins}")
        return feeds

    def __call__(self) -> Iterator[Any]:
        """One epoch: a generator of the reader's samples with the teachers' predictions appended."""
        if self._reader is None or self._reader_type is None:
            raise ConfigError("set a reader first (set_sample_generator / set_sample_list_generator / ...)")
        with self._lock:
            active, pipeline = self._active, self._pipeline
        if active is not None:
            # A new epoch starts from its beginning, whatever the last one did.  One that another
            # thread runs cannot be closed (ValueError): it stays the active one, so that no epoch
            # begins beside it (the dispatcher would forget its tasks, and its loop wait for ever).
            active.close()
        if pipeline is None or pipeline.closed:
            pipeline = self._start()
        with self._lock:
            if self._pipeline is not pipeline:
                raise ClosedError("the DistillReader was closed while its epoch was starting")
            self._active = pipeline.epoch(self._reader, self._reader_type)
            return self._active

    def _check_open(self) -> None:
        """Raise :class:`ClosedError` if :meth:`close` came while the first epoch waits for teachers."""
        if self._pipeline is None or self._pipeline.closed:
            raise ClosedError("the DistillReader was closed while its first epoch waited for teachers")

    def stats(self) -> dict[str, Any]:
        """Throughput and health so far: samples/s, waits, resends, and per teacher.

        ``samples_per_s`` counts time inside epochs only; ``wait_s`` is how long the
        training loop waited for data (near zero when the teachers keep up);
        ``teachers`` maps each teacher seen to its tasks, samples, failures, returned
        tasks and whether its worker holds it *up* now; ``task_rows`` and ``in_flight``
        are the task size and the tasks per worker the next epoch uses (see
        :meth:`zdistill.student.scheduler.Scheduler.plan`); ``reader_pid``, ``workers`` (teacher -> PID) and
        ``folders`` name the processes and folders the reader made (for monitoring).
        """
        if self._pipeline is None:
            return {"samples": 0, "tasks": 0, "samples_per_s": 0.0, "wait_s": 0.0,
                    "task_rows": self.options.task_rows, "in_flight": self.options.in_flight, "teachers": {}}
        return self._pipeline.snapshot()

    def close(self) -> None:
        """Stop every process this reader started; the reader can be started again later.

        Safe from any thread, and twice at once: the epoch generator is left to the thread
        that iterates it (closing it here would raise "generator already executing" while
        that thread waits in it); once the pipeline is closed the generator raises
        :class:`ClosedError` at its next step, within 0.1 s if it waits.
        """
        with self._lock:
            pipeline, self._pipeline, self._active = self._pipeline, None, None
            if pipeline is not None:
                pipeline.close()  # first: its dispatcher polls the discovery client until it stops
            discovery, self._discovery = self._discovery, None
            if discovery is not None:
                discovery.close()

    def __enter__(self) -> DistillReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit modules may be half gone; the finalizer still runs
            pass
