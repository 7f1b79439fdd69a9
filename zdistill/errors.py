"""The exception types zdistill raises, in one place so callers can catch them by kind."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The machine-readable reason of an error reply, from a teacher or a balancer.

    A ``StrEnum``, so a code is its wire string (``ErrorCode.BUSY == "busy"``): the wire
    stays the same and a code a newer peer sends that is not listed here still reads
    as a plain string.
    """

    BAD_MESSAGE = "bad_message"  # the frames are not a valid message (see zdistill.wire)
    BAD_REQUEST = "bad_request"  # a valid message the server cannot serve: unknown kind, a field of the wrong type
    TOO_LARGE = "too_large"  # more rows or bytes than the teacher takes in one request
    BAD_OUTPUT = "bad_output"  # the model's outputs do not match the fetches it declares
    MODEL_ERROR = "model_error"  # the model raised (or its reply cannot be sent)
    BUSY = "busy"  # the teacher's queue is full: send again later, here or elsewhere
    SHUTTING_DOWN = "shutting_down"  # the teacher is stopping: send to another teacher now
    WRONG_SERVER = "wrong_server"  # a balancer was asked what only a teacher answers
    UNKNOWN_STUDENT = "unknown_student"  # a balancer does not know this student: register again
    INTERNAL = "internal"  # a bug in the server cost this one request (logged there with its traceback)


# Codes no retry mends: the same request fails the same way on any teacher.
FATAL_CODES = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.BAD_MESSAGE, ErrorCode.BAD_OUTPUT})


class ZDistillError(Exception):
    """Base class of every error zdistill raises on purpose."""


class WireError(ZDistillError):
    """A message on a socket is malformed, truncated, oversized or of a forbidden type.

    One type for every way a peer's bytes can be wrong, so a daemon's receive loop
    needs a single ``except`` to drop or answer a bad message and keep serving.
    """


class TeacherError(ZDistillError):
    """A teacher answered a request with an error reply (bad input, model failure, ...).

    ``code`` is the teacher's machine-readable reason, an :class:`ErrorCode` value
    (compare it with one); the message says what was wrong.
    """

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class RequestError(ZDistillError):
    """A request a teacher or a balancer refuses: it becomes the error reply ``code``.

    Raised inside a server's request handling, caught once where the reply is sent,
    so every refusal, whatever its depth, reaches the client as an answer.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
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
