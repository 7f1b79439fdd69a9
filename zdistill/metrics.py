"""Prometheus metrics of the zdistill daemons, served with the official ``prometheus-client``.

Each daemon takes ``--metrics-port`` (0 or absent: off).  Metrics live in a registry of
their own per daemon object, so several daemons in one process (tests) do not clash.
When metrics are off the daemons still call the same methods, on a registry nobody
serves, which costs a few hundred nanoseconds per call and keeps the daemon code free
of ``if metrics:`` branches.  ``prometheus-client`` is imported only here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from zdistill.errors import ConfigError

log = logging.getLogger("zdistill.metrics")

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
except ImportError:  # metrics are optional; serve() says how to get them
    CollectorRegistry = Counter = Gauge = Histogram = start_http_server = None  # type: ignore[assignment,misc]

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_TIME_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Metrics:
    """A registry, and the HTTP endpoint that exposes it once :meth:`serve` is called."""

    def __init__(self) -> None:
        if CollectorRegistry is None:
            self.registry = None
            return
        self.registry = CollectorRegistry()

    def serve(self, port: int | None, host: str = "0.0.0.0") -> int | None:
        """Expose ``/metrics`` on ``port`` (0 picks a free one); None when off. Returns the port."""
        if port is None:
            return None
        if self.registry is None:
            raise ConfigError("--metrics-port needs the prometheus-client package (pip install prometheus-client)")
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound


class _Null:
    """Stands in for a metric when prometheus-client is missing: every call does nothing."""

    def labels(self, *args: object, **kwargs: object) -> _Null:
        return self

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def _make(kind: type, registry: object, *args: object, **kwargs: object) -> object:
    return _Null() if registry is None else kind(*args, registry=registry, **kwargs)


class TeacherMetrics(_Metrics):
    """``zdistill-teacher``: requests, rows, tokens and padding, formed batches, waits, model time per instance,
    errors, memory."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = _make(Counter, r, "zdistill_teacher_requests", "Requests received, by kind", ["kind"])
        self.rows = _make(Counter, r, "zdistill_teacher_rows", "Rows predicted")
        self.tokens = _make(Counter, r, "zdistill_teacher_tokens",
                            "Tokens of variable-length rows predicted, padding not counted")
        self.padding_tokens = _make(Counter, r, "zdistill_teacher_padding_tokens",
                                    "Padding the model computed besides those tokens (rows x longest row - tokens)")
        self.batch_rows = _make(Histogram, r, "zdistill_teacher_batch_rows", "Rows per model call (dynamic batcher)",
                                buckets=_ROW_BUCKETS)
        self.batch_requests = _make(Histogram, r, "zdistill_teacher_batch_requests", "Requests merged per model call",
                                    buckets=_ROW_BUCKETS)
        self.queue_wait = _make(Histogram, r, "zdistill_teacher_queue_wait_seconds",
                                "Time a request waited for its batch to start", buckets=_TIME_BUCKETS)
        self.model_time = _make(Histogram, r, "zdistill_teacher_model_seconds", "Time of one model call",
                                buckets=_TIME_BUCKETS)
        self.instance_seconds = _make(Counter, r, "zdistill_teacher_instance_busy_seconds",
                                      "Time in model calls, by model instance", ["instance"])
        self.instances = _make(Gauge, r, "zdistill_teacher_instances", "Model instances (--instances)")
        self.errors = _make(Counter, r, "zdistill_teacher_errors", "Error replies, by code", ["code"])
        self.dropped_replies = _make(Counter, r, "zdistill_teacher_dropped_replies",
                                     "Replies dropped: the client had disconnected or was not reading")
        self.in_flight = _make(Gauge, r, "zdistill_teacher_in_flight_requests", "Requests waiting for the model")
        self.held_bytes = _make(Gauge, r, "zdistill_teacher_held_bytes",
                                "Bytes of requests held, queued or running (bounded by --max-queue-mb)")


class BalancerMetrics(_Metrics):
    """``zdistill-balancer``: what it sees and does."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.services = _make(Gauge, r, "zdistill_balancer_services", "Services with teachers or students")
        self.teachers = _make(Gauge, r, "zdistill_balancer_teachers", "Teachers registered, by service", ["service"])
        self.students = _make(Gauge, r, "zdistill_balancer_students", "Students alive, by service", ["service"])
        self.version = _make(Gauge, r, "zdistill_balancer_assignment_version", "Assignment version, by service",
                             ["service"])
        self.rebalances = _make(Counter, r, "zdistill_balancer_rebalances", "Assignments recomputed that changed")
        self.requests = _make(Counter, r, "zdistill_balancer_requests", "Student requests, by kind", ["kind"])
        self.bad_messages = _make(Counter, r, "zdistill_balancer_bad_messages", "Malformed messages dropped or refused")
        self.leader = _make(Gauge, r, "zdistill_balancer_leader", "1 while this balancer leads, 0 on standby")

    def set_counts(self, teachers: Mapping[str, int], students: Mapping[str, int]) -> None:
        for service, n in teachers.items():
            self.teachers.labels(service).set(n)
        for service, n in students.items():
            self.students.labels(service).set(n)
        self.services.set(len(set(teachers) | set(students)))


class RegisterMetrics(_Metrics):
    """``zdistill-register``: health checks and registrations."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.checks = _make(Counter, r, "zdistill_register_health_checks", "Teacher health checks, by result",
                            ["result"])
        self.registrations = _make(Counter, r, "zdistill_register_registrations",
                                   "Records written (first and after losing them)")
        self.refreshes = _make(Counter, r, "zdistill_register_refreshes", "TTL refreshes")
        self.registered = _make(Gauge, r, "zdistill_register_registered", "1 while the teacher's record is in Redis")
        self.redis_errors = _make(Counter, r, "zdistill_register_redis_errors", "Failed Redis operations")
