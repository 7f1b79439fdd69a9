"""Teacher functions the tests serve with real ``zdistill-teacher`` processes.

They are plain numpy so a test can compute the expected predictions itself.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

import zdistill

W = np.random.default_rng(1234).standard_normal((784, 10)).astype(np.float32) * 0.05


def softmax_np(x: np.ndarray) -> np.ndarray:
    """What :func:`softmax` serves, for tests to compare against."""
    z = x.reshape(len(x), -1).astype(np.float32) @ W
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [10])})
def softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax(img @ W), the cheap stand-in for a real teacher."""
    return {"prob": softmax_np(batch["img"])}


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [10])})
def slow_softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax with a fixed service time per call (ZDISTILL_TEST_DELAY_MS, default 10 ms)."""
    time.sleep(float(os.environ.get("ZDISTILL_TEST_DELAY_MS", "10")) / 1000)
    return {"prob": softmax_np(batch["img"])}


_CALLS = {"running": 0}
_CALLS_LOCK = threading.Lock()


def _count_calls(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax that takes ZDISTILL_TEST_DELAY_MS and reports, per row, how many calls were running when it began."""
    with _CALLS_LOCK:
        _CALLS["running"] += 1
        running = _CALLS["running"]
    try:
        time.sleep(float(os.environ.get("ZDISTILL_TEST_DELAY_MS", "10")) / 1000)
        return {"prob": softmax_np(batch["img"]), "calls": np.full(len(batch["img"]), running, np.int32)}
    finally:
        with _CALLS_LOCK:
            _CALLS["running"] -= 1


_COUNTED = {"feeds": {"img": ("float32", [784])}, "fetches": {"prob": ("float32", [10]), "calls": ("int32", [])}}


@zdistill.teacher_function(**_COUNTED)
def overlap_softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax reporting how many calls ran at once (thread-safe: instances may overlap)."""
    return _count_calls(batch)


@zdistill.teacher_function(**_COUNTED, thread_safe=False)
def serial_softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same, declared not thread-safe: the teacher must never run two calls at once."""
    return _count_calls(batch)


@zdistill.teacher_function(feeds={"x": ("float32", [4])}, fetches={"y": ("float32", [4])})
def echo(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns its input itself (a view of it): a model whose output shares the input's memory."""
    return {"y": batch["x"]}


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [10])})
def fragile_softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax that raises on any row holding a NaN: a model failing on bad input."""
    if np.isnan(batch["img"]).any():
        raise FloatingPointError("NaN in the input")
    return {"prob": softmax_np(batch["img"])}


@zdistill.teacher_function(feeds={"img": ("float32", [100])}, fetches={"prob": ("float32", [10])})
def softmax_100(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A teacher whose ``img`` rows hold 100 values: students with 784-value images cannot use it."""
    return {"prob": softmax_np(np.tile(batch["img"], (1, 8))[:, :784])}


@zdistill.teacher_function(feeds={"pixels": ("float32", [784])}, fetches={"prob": ("float32", [10])})
def renamed_softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax whose feed is called ``pixels``: a model redeployed with another input name."""
    return {"prob": softmax_np(batch["pixels"])}


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float16", [10])})
def softmax_fp16(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax answered in float16: beside float32 teachers, the loop would get batches of both."""
    return {"prob": softmax_np(batch["img"]).astype(np.float16)}


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [12])})
def softmax_12(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax with two more classes (always 0): beside 10-class teachers, rows of two widths."""
    return {"prob": np.pad(softmax_np(batch["img"]), ((0, 0), (0, 2)))}


HANG_MARK = -1.0  # an img row starting with this value makes hang_softmax's model call never return


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [10])})
def hang_softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax whose call never returns (it sleeps ZDISTILL_TEST_HANG_S, default an hour) for a batch
    holding a row that starts with HANG_MARK: a model stuck on one input, while the teacher still
    answers pings and, on its other instances, other batches."""
    if (batch["img"][:, 0] == HANG_MARK).any():
        time.sleep(float(os.environ.get("ZDISTILL_TEST_HANG_S", "3600")))
    return {"prob": softmax_np(batch["img"])}


@zdistill.teacher_function(feeds={"a": ("float32", []), "b": ("int32", [])},
                           fetches={"na": ("float32", []), "b1": ("int64", [])})
def negate_increment(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``na = -a``, ``b1 = b + 1``: exact, so a test can tell from its output what the teacher was fed."""
    return {"na": -batch["a"], "b1": batch["b"].astype(np.int64) + 1}


@zdistill.teacher_function(feeds={"mask": ("bool", [4])}, fetches={"m": ("float32", [4])})
def mask_bytes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The mask's bytes as float32, as Paddle casts a bool: a True held as any byte but 1 comes out as that byte."""
    return {"m": batch["mask"].view(np.uint8).astype(np.float32)}


@zdistill.teacher_function(feeds={"a": ("float32", []), "b": ("int16", [])},
                           fetches={"na": ("float32", []), "b1": ("int64", [])})
def negate_increment_int16(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`negate_increment` with an int16 ``b``: a teacher that takes narrower values than another."""
    return {"na": -batch["a"], "b1": batch["b"].astype(np.int64) + 1}


@zdistill.teacher_function(feeds={"tokens": ("int32", [-1])},
                           fetches={"topk_logprobs": ("float16", [-1, 8]), "topk_indices": ("int32", [-1, 8])},
                           description="example causal LM, size tiny: a numpy stand-in")
def tiny_lm_topk(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds, fetches and description of examples/torch_teacher's tiny LM, in numpy: ids 0..7, equally likely."""
    rows, seq = batch["tokens"].shape
    return {"topk_logprobs": np.full((rows, seq, 8), -np.log(512), np.float16),
            "topk_indices": np.broadcast_to(np.arange(8, dtype=np.int32), (rows, seq, 8))}


EMBED = np.random.default_rng(21).standard_normal((1000, 4)).astype(np.float32)  # token id -> 4 values


def per_token_np(ids: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`per_token` serves for ONE row (``ids``, ``weight`` of its own length): ``h``, ``mean``."""
    x = EMBED[ids] * weight[:, None]
    h = np.cumsum(x, axis=0, dtype=np.float64).astype(np.float32)
    mean = (x.sum(axis=0, dtype=np.float64) / max(len(ids), 1)).astype(np.float32)
    return h, mean


_TOKENS = {"feeds": {"ids": ("int64", [-1]), "weight": ("float32", [-1])},
           "fetches": {"h": ("float32", [-1, 4]), "mean": ("float32", [4])}}


@zdistill.teacher_function(**_TOKENS)
def per_token(batch: dict[str, np.ndarray], lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Token sequences: ``h`` per token (running sum of weighted embeddings: padding after a row
    leaves its tokens alone), ``mean`` over the row's own tokens (by ``lengths``: padding counted
    in would change it).  Sleeps ZDISTILL_TEST_DELAY_MS (default 0) per call."""
    time.sleep(float(os.environ.get("ZDISTILL_TEST_DELAY_MS", "0")) / 1000)
    x = EMBED[batch["ids"]] * batch["weight"][..., None]
    h = np.cumsum(x, axis=1, dtype=np.float64).astype(np.float32)
    mask = np.arange(x.shape[1]) < lengths[:, None]
    total = (x * mask[..., None]).sum(axis=1, dtype=np.float64)
    return {"h": h, "mean": (total / np.maximum(lengths, 1)[:, None]).astype(np.float32)}


@zdistill.teacher_function(**_TOKENS)
def short_tokens(batch: dict[str, np.ndarray], lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Returns one token of ``h`` per row whatever the rows' lengths: a per-token output too short
    for any batch whose longest row holds more than one token."""
    out = per_token(batch, lengths=lengths)
    return {"h": out["h"][:, :1], "mean": out["mean"]}


@zdistill.teacher_function(feeds={"ids": ("int64", [-1])}, fetches={"seen": ("int64", [-1, -1])})
def batch_wide(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per token, the whole padded row it belongs to (as attention weights over the batch's
    positions would be): a per-token output whose token shape is the batch's longest row, so
    it differs between model calls of different lengths."""
    ids = batch["ids"]
    return {"seen": np.broadcast_to(ids[:, None, :], (ids.shape[0], ids.shape[1], ids.shape[1]))}


@zdistill.teacher_function(feeds={"img": ("float32", [1, 8, 8])}, fetches={"prob": ("float32", [10])})
def digits_softmax(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax over an 8x8 digit (``examples/mnist_distill``'s images): a teacher the example's students can use."""
    return {"prob": softmax_np(np.tile(batch["img"].reshape(len(batch["img"]), 64), (1, 13))[:, :784])}
