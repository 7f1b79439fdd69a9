"""The knobs of a DistillReader's data plane (``DistillReader.options``)."""

from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from dataclasses import dataclass
from typing import Any

from zdistill.errors import ConfigError
from zdistill.teacher_messages import MAX_WEIGHT, MIN_WEIGHT

# Knobs where 0 means something (no retry, no wait, no floor); every other knob must be > 0.
_MAY_BE_ZERO = frozenset({"max_retries", "teacher_wait", "straggler_min"})


@dataclass(kw_only=True)
class PipelineOptions:
    """Knobs of the pipeline; the defaults are chosen for throughput on small machines.

    How tasks and queues are sized from them is :meth:`zdistill.student.scheduler.Scheduler.plan`.
    Every task has a bounded life: each send of it is a try that fails when refused or
    unanswered for ``request_timeout``, and a task whose tries failed ``max_retries + 1``
    times fails the epoch, naming the teachers and the time waited (see
    :mod:`zdistill.student.scheduler`).
    """

    request_rows: int = 256  # rows per teacher request (the teacher's max batch caps it)
    task_rows: int = 1024  # rows per task at most: whole reader batches are packed up to this
    task_seconds: float = 0.01  # teacher time per task: slow teachers get smaller tasks
    task_bytes: int = 4 << 20  # ...or up to this many bytes
    window: int = 16  # tasks in flight per epoch, at least 3 x in_flight per worker (memory bound)
    max_inflight_bytes: int = 512 << 20  # bytes of tasks in flight (memory bound for big samples)
    in_flight: int = 2  # tasks in flight per worker, at least (each is one or more teacher requests)
    max_in_flight: int | None = None  # ...and at most (None: up to 8, more to fill a teacher's batches)
    queue_seconds: float = 0.04  # teacher time a worker holds in flight
    request_timeout: float = 30.0  # a request unanswered this long marks its teacher down; a try of a task, failed
    max_retries: int = 3  # failed tries of a task (refused, busy, unanswered) retried: one more fails the epoch
    teacher_wait: float = 300.0  # how long an epoch waits with no teacher up before it fails
    stall_timeout: float = 60.0  # no progress this long: send every missing task again
    straggler_factor: float = 4.0  # the next task late by this many typical task times is sent again
    straggler_min: float = 0.5  # ...but never sooner than this many seconds
    share_weight: float = 1.0  # this student's share of each teacher against its other students (0.01..100)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, _checked(name, value))


@functools.cache
def _types() -> dict[str, Any]:
    """Each knob's annotated type (``int``, ``float``, ``int | None``), resolved once."""
    hints = typing.get_type_hints(PipelineOptions)
    return {f.name: hints[f.name] for f in dataclasses.fields(PipelineOptions)}


def _checked(name: str, value: Any) -> int | float | None:
    """``value`` as knob ``name`` takes it, or a ConfigError saying what the knob needs."""
    kind = _types().get(name)
    if kind is None:
        raise ConfigError(f"PipelineOptions has no knob {name!r} (knobs: {', '.join(_types())})")
    if value is None and kind == int | None:
        return None
    number = int if kind in (int, int | None) else float
    wanted = numbers.Integral if number is int else numbers.Real
    floor = "0 or more" if name in _MAY_BE_ZERO else "more than 0"
    if not isinstance(value, wanted) or isinstance(value, bool):
        raise ConfigError(f"PipelineOptions.{name} must be {'an int' if number is int else 'a number'} "
                          f"({floor}{' or None' if kind != number else ''}), got {value!r:.40}")
    value = number(value)
    if not (value >= 0 if name in _MAY_BE_ZERO else value > 0):  # a NaN fails both
        raise ConfigError(f"PipelineOptions.{name} must be {floor}, got {value!r}")
    if name == "share_weight" and not MIN_WEIGHT <= value <= MAX_WEIGHT:  # what a teacher accepts
        raise ConfigError(f"PipelineOptions.share_weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, got {value!r}")
    return value
