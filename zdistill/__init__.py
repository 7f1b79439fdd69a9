"""zdistill: teacher-as-a-service knowledge distillation over ZeroMQ.

``from zdistill import DistillReader`` is a drop-in for PaddlePaddle EDL's reader;
``from zdistill import TeacherClient`` talks to one teacher (``meta``, ``ping``,
``predict``).  Importing this package never imports Paddle, nor ZeroMQ until one of
those two is used.
"""

from __future__ import annotations

from zdistill.errors import (
    ClosedError,
    ConfigError,
    ReaderError,
    TeacherError,
    TeacherTimeout,
    WireError,
    WorkerError,
    ZDistillError,
)
from zdistill.teacher.model import teacher_function

__version__ = "0.1.0"

__all__ = [
    "ClosedError",
    "ConfigError",
    "DistillReader",
    "ReaderError",
    "TeacherClient",
    "TeacherError",
    "TeacherTimeout",
    "WireError",
    "WorkerError",
    "ZDistillError",
    "teacher_function",
    "__version__",
]


def __getattr__(name: str) -> object:
    if name == "DistillReader":  # imported on first use: keeps `import zdistill` light
        from zdistill.reader import DistillReader

        return DistillReader
    if name == "TeacherClient":
        from zdistill.client import TeacherClient

        return TeacherClient
    raise AttributeError(f"module 'zdistill' has no attribute {name!r}")
