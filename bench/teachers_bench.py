"""Teacher functions that exist only for the reader benchmark (served by real ``zdistill-teacher`` processes).

- :func:`softmax` is the cheap teacher of cases (a) and (b): the same function the tests
  serve, so a benchmark figure and a test describe the same work.
- :func:`fixed_time_softmax` stands in for a GPU in case (c): every call takes 10 ms
  (``ZDISTILL_BENCH_SERVICE_MS``) whatever its size up to the max batch, so a teacher's
  capacity is exactly ``max_batch / 10 ms`` and any shortfall is the pipeline's (its
  sleeps are corrected for waking late: see :class:`_Lateness`).
- :func:`image_mean` is the big-payload teacher of case (d): 3x224x224 float32 in, 10
  floats out.  It reads every byte once (a mean per channel), which is about the least a
  real model could do, so the case measures moving bytes, not computing.
- :func:`gpu_standin` is the GPU stand-in of ``bench_instances.py``: uint8 3x224x224
  images in, 10 floats out; it copies every input byte into a buffer of its thread (like
  a host-to-device copy, numpy releasing the GIL) and then waits 30 ms per 64 images
  (like a kernel), so model instances can overlap one call's copy with another's wait.
- :func:`seq_pooled`, :func:`seq_pooled_fixed` and :func:`seq_tokens` are the token-sequence
  teachers of ``bench_sequences.py``: int64 token ids in, an embedding lookup (the least a
  language model does with every token), then the mean over each row's own tokens (8
  floats per row) or every token's 4 values (a per-token fetch).  ``seq_pooled_fixed`` is
  ``seq_pooled`` with a fixed feed of 128 tokens, for ragged slots against fixed ones.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # served as a file: make the repo importable

import zdistill  # noqa: E402
from tests.teachers import W, per_token, softmax, softmax_np  # noqa: E402,F401  (re-exported: bench and tests share it)

_SERVICE_S = float(os.environ.get("ZDISTILL_BENCH_SERVICE_MS", "10")) / 1000
_MAX_LATENESS_S = 0.001  # timer slack plus a wait for a core; beyond this, a wake-up was descheduled
_W_IMG = np.random.default_rng(7).standard_normal((3, 10)).astype(np.float32)


class _Lateness:
    """How late ``time.sleep`` wakes in this process, as an exponential average.

    On a loaded 2-core machine a 10 ms sleep wakes 0.1-0.4 ms late (timer slack, then a
    wait for a free core), so a stand-in that slept to its deadline lasted ~10.2-10.35 ms
    per call at k = 8: ~3% below the nominal capacity that case (c) divides by, for the
    raw baseline and the pipeline alike.  A GPU kernel of 10 ms does not run late, so the
    stand-in sets its alarm early by the lateness it has seen; its calls then last 10 ms
    on average, which the benchmark checks from the teachers' ``model_seconds``.
    """

    def __init__(self) -> None:
        self.mean = 0.0

    def sleep_until(self, deadline: float) -> None:
        alarm = deadline - self.mean
        wait = alarm - time.perf_counter()
        if wait > 0:  # only sleeps that happened say anything about lateness
            time.sleep(wait)
            # a wake-up descheduled for longer is not timer slack: unclipped, one such sample
            # could set the alarm past the deadline, and then no call would sleep (nor learn) again
            late = min(time.perf_counter() - alarm, _MAX_LATENESS_S)
            self.mean += 0.1 * (late - self.mean)


_LATENESS = _Lateness()


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [10])})
def fixed_time_softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax whose every call lasts 10 ms *including* its math, like a GPU kernel of fixed latency.

    Sleeping until a deadline (not sleeping 10 ms after the math) keeps the service time
    exact, so the ideal in case (c) is really ``k * max_batch / 10 ms``.
    """
    start = time.perf_counter()
    z = batch["img"] @ W  # softmax_np without its copy: a GPU stand-in should spend little CPU
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out = e / e.sum(axis=1, keepdims=True)
    _LATENESS.sleep_until(start + _SERVICE_S)
    return {"prob": out}


@zdistill.teacher_function(feeds={"img": ("float32", [3, 224, 224])}, fetches={"prob": ("float32", [10])})
def image_mean(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax(channel means @ W): touches every input byte once, returns 10 floats per image."""
    x = batch["img"]
    z = x.reshape(len(x), 3, -1).mean(axis=2, dtype=np.float32) @ _W_IMG
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return {"prob": (e / e.sum(axis=1, keepdims=True)).astype(np.float32)}


_KERNEL_S_PER_ROW = float(os.environ.get("ZDISTILL_BENCH_KERNEL_MS", "30")) / 1000 / 64
_DEVICE = threading.local()  # one "device buffer" per model instance (thread), reused like a GPU's


@zdistill.teacher_function(feeds={"img": ("uint8", [3, 224, 224])}, fetches={"prob": ("float32", [10])})
def gpu_standin(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies every input byte (a host-to-device copy), then waits 30 ms per 64 images (a kernel)."""
    x = batch["img"]
    buf = getattr(_DEVICE, "buf", None)
    if buf is None or len(buf) < len(x):
        buf = _DEVICE.buf = np.empty_like(x)
    np.copyto(buf[: len(x)], x)
    _LATENESS.sleep_until(time.perf_counter() + _KERNEL_S_PER_ROW * len(x))
    return {"prob": buf[: len(x), 0, 0, :10].astype(np.float32)}


VOCAB = 30000
EMB_POOLED = np.random.default_rng(8).standard_normal((VOCAB, 8)).astype(np.float32)
EMB_TOKENS = np.random.default_rng(9).standard_normal((VOCAB, 4)).astype(np.float32)
FIXED_TOKENS = 128  # seq_pooled_fixed's row length


def pooled(ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Each row's mean embedding over its own ``lengths`` tokens of ``ids`` (``[rows, longest]``)."""
    h = EMB_POOLED[ids]  # [rows, longest, 8], padding included
    mask = np.arange(h.shape[1]) < lengths[:, None]
    total = (h * mask[..., None]).sum(axis=1, dtype=np.float32)
    return {"pooled": total / np.maximum(lengths, 1)[:, None].astype(np.float32)}


@zdistill.teacher_function(feeds={"ids": ("int64", [-1])}, fetches={"pooled": ("float32", [8])})
def seq_pooled(batch: dict[str, np.ndarray], lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of any length: the mean embedding of each row's tokens."""
    return pooled(batch["ids"], lengths)


@zdistill.teacher_function(feeds={"ids": ("int64", [FIXED_TOKENS])}, fetches={"pooled": ("float32", [8])})
def seq_pooled_fixed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`seq_pooled` for rows of exactly 128 tokens (a fixed-shape feed: no lengths, no padding).

    The same math, the mask included, so that ragged against fixed slots compares the
    slots and the batching, not two functions.
    """
    ids = batch["ids"]
    return pooled(ids, np.full(len(ids), FIXED_TOKENS))


@zdistill.teacher_function(feeds={"ids": ("int64", [-1])}, fetches={"logits": ("float32", [-1, 4])})
def seq_tokens(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per token: its 4 embedding values (each token on its own, so padding needs no mask)."""
    return {"logits": EMB_TOKENS[batch["ids"]]}
