"""The exception types zdistill raises, in one place so callers can catch them by kind."""

from __future__ import annotations


class ZDistillError(Exception):
    """Base class of every error zdistill raises on purpose."""


class WireError(ZDistillError):
    """A message on a socket is malformed, truncated, oversized or of a forbidden type.

    One type for every way a peer's bytes can be wrong, so a daemon's receive loop
    needs a single ``except`` to drop or answer a bad message and keep serving.
    """


class TeacherError(ZDistillError):
    """A teacher answered a request with an error reply (bad input, model failure, ...).

    ``code`` is the teacher's machine-readable reason (``bad_request``, ``model_error``,
    ``bad_output``, ``too_large``, ``shutting_down``, ...); the message says what was wrong.
    """

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class ModelOutputError(ZDistillError):
    """A teacher's model returned outputs that do not match what it declares.

    Raised in the teacher, where it becomes the error reply ``bad_output``: a student
    keys, caches and joins predictions by the declared fetches, so an output of other
    rows, row shape or kind of dtype would be a wrong answer, never one to pass on.
    The message names the model, the output, and the declared and returned shapes.
    """


class TeacherTimeout(ZDistillError):
    """A teacher did not answer a request within its timeout."""


class ReaderError(ZDistillError):
    """The user's reader failed in its process with an exception zdistill cannot re-create."""


class WorkerError(ZDistillError):
    """A DistillReader's worker processes cannot start (the message quotes what they printed)."""


class ClosedError(ZDistillError):
    """The DistillReader was closed while its epoch ran (``close()`` from another thread).

    The training loop gets it at once, in its own thread, instead of waiting on
    processes that are gone.
    """


class ConfigError(ZDistillError, ValueError):
    """A DistillReader or daemon was configured with arguments that cannot work."""


class RecordError(ZDistillError, ValueError):
    """A record read from Redis (or a teacher's ``meta`` bound for one) is malformed.

    Redis is shared and anyone with its password can write there, so every record is
    checked before use; a bad one is skipped with a log line and the daemon keeps
    serving, never crashes on it.
    """


class WrongTypeError(ZDistillError):
    """A zdistill key in Redis holds the wrong kind of value (a string where a hash belongs).

    Its own type, so that it is reported as what it is, not as Redis being unreachable.
    """
