"""Teacher functions whose outputs put the teacher's ownership and checks to the test.

The tests serve them with real ``zdistill-teacher`` processes.  Each computes
:func:`double` (``2 * x + 1``, plain numpy), so a test can check every row it gets back.

- Functions that write their outputs into buffers they reuse, as GPU code with
  preallocated or pinned output buffers does: the reply of one call must never show the
  next call's rows.
- :func:`misbehaving`, whose outputs break its declaration in the way a row's first
  value asks for (:data:`MODES`), and are right otherwise: its warm-up run on zeros
  passes, so the teacher starts, and a test can show it stays up after a bad answer.
- :func:`any_width`, declaring rows of any size (-1).
- :func:`int64_answer`, computing in int64 what it declares as int32.
- :func:`one_column`, wrong from its first call: the teacher must refuse to start.
"""

from __future__ import annotations

import threading

import numpy as np

import zdistill

SPEC = {"feeds": {"x": ("float32", [4])}, "fetches": {"y": ("float32", [4])}}
MAX_ROWS = 4096  # the largest batch the buffers below hold: serve them with --max-batch-size up to this


def double(x: np.ndarray) -> np.ndarray:
    """What every function here serves for a good batch, for tests to compare against."""
    return 2 * x + 1


_BUFFER = np.empty((MAX_ROWS, 4), np.float32)


@zdistill.teacher_function(**SPEC, thread_safe=False)
def reused_buffer(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Writes into one preallocated buffer and returns a view of it: its next call overwrites the rows."""
    out = _BUFFER[: len(batch["x"])]
    np.multiply(batch["x"], 2, out=out)
    out += 1
    return {"y": out}


_BY_ROWS: dict[int, np.ndarray] = {}


@zdistill.teacher_function(**SPEC, thread_safe=False)
def same_array(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keeps one output array per batch size and returns that very array (not a view) every call."""
    x = batch["x"]
    out = _BY_ROWS.setdefault(len(x), np.empty((len(x), 4), np.float32))
    np.multiply(x, 2, out=out)
    out += 1
    return {"y": out}


_LOCAL = threading.local()


@zdistill.teacher_function(**SPEC)
def thread_buffer(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Thread-safe: one preallocated buffer per thread (instance), returned as a view."""
    if not hasattr(_LOCAL, "buffer"):
        _LOCAL.buffer = np.empty((MAX_ROWS, 4), np.float32)
    out = _LOCAL.buffer[: len(batch["x"])]
    np.multiply(batch["x"], 2, out=out)
    out += 1
    return {"y": out}


# What misbehaving returns when a row's first value is the key: outputs that break the
# declaration (float32 rows of [4]), and two that keep it (a dtype that casts within its kind).
MODES: dict[float, str] = {
    -1.0: "one column",
    -2.0: "five columns",
    -3.0: "2x2 rows",
    -4.0: "a row too many",
    -5.0: "complex",
    -6.0: "strings",
    -7.0: "missing",
    -8.0: "ragged",
    -9.0: "not a dict",
    -10.0: "float64",
    -11.0: "int64",
    -12.0: "float64 inf and nan",
    -13.0: "float64 beyond float32",
}


@zdistill.teacher_function(**SPEC)
def misbehaving(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """double(x), returned the wrong way :data:`MODES` names when a row's first value is a key of it."""
    x = batch["x"]
    y = double(x)
    mode = next((MODES[v] for v in x[:, 0].tolist() if v in MODES), "")
    n = len(x)
    if mode == "one column":
        return {"y": y[:, :1]}
    if mode == "five columns":
        return {"y": np.concatenate([y, y[:, :1]], axis=1)}
    if mode == "2x2 rows":
        return {"y": y.reshape(n, 2, 2)}
    if mode == "a row too many":
        return {"y": np.concatenate([y, y[:1]])}
    if mode == "complex":
        return {"y": y.astype(np.complex64)}
    if mode == "strings":
        return {"y": y.astype(str)}
    if mode == "missing":
        return {"prob": y}
    if mode == "ragged":
        return {"y": [list(row) for row in y[:-1]] + [[1.0]]}
    if mode == "not a dict":
        return [y]  # type: ignore[return-value]
    if mode == "float64":
        return {"y": y.astype(np.float64)}
    if mode == "int64":
        return {"y": np.rint(y).astype(np.int64)}
    if mode in ("float64 inf and nan", "float64 beyond float32"):
        y = y.astype(np.float64)
        y[0, 1:3] = (np.inf, np.nan) if mode == "float64 inf and nan" else (1e39, -1e39)
        return {"y": y}
    return {"y": y}


@zdistill.teacher_function(feeds={"x": ("float32", [4])}, fetches={"y": ("float32", [-1])})
def any_width(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Declares rows of any size: the first ``1 + int(x[0, 0]) % 4`` columns of double(x),
    or rows of shape [4, 1], which no [-1] matches, when a row's first value is -1."""
    x = batch["x"]
    y = double(x)
    if (x[:, 0] == -1).any():
        return {"y": y[:, :, None]}
    return {"y": y[:, : 1 + int(x[0, 0]) % 4]}


@zdistill.teacher_function(feeds={"x": ("int64", [4])}, fetches={"y": ("int32", [4])})
def int64_answer(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """double(x) computed in int64 (numpy's default for int64 feeds) and declared int32: served as
    int32 while its values fit one, and 2 * 2**30 + 1 for an x of 2**30 does not."""
    return {"y": double(batch["x"])}


@zdistill.teacher_function(**SPEC)
def one_column(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns [n, 1] for its declared [4] on every call, its warm-up run included."""
    return {"y": double(batch["x"])[:, :1]}
