"""Teachers whose ``model_id`` does not tell their models apart, for the cache's tests.

``model_id`` hashes the file that defines a teacher function: these share one file, so
two teachers built by :func:`_linear` get one id, and so does :func:`from_file` whatever
weights it loads.  Each computes softmax(img @ W) in numpy, so a test computes the
expected predictions itself (:func:`expected`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

import zdistill

WEIGHTS_ENV = "ZDISTILL_TEST_WEIGHTS"  # the .npy file from_file loads its weights from


def weights(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((784, 10)).astype(np.float32) * 0.05


def expected(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What a teacher of weights ``w`` answers for ``x``."""
    z = x.astype(np.float32) @ w
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def expected_outside(x: np.ndarray, w: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """What a teacher of weights ``w`` for rows within [0, 1) and ``outside`` for the others answers."""
    within = (x.max(axis=1) < 1)[:, None]
    return np.where(within, expected(x, w), expected(x, outside))


Teacher = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _linear(w: np.ndarray, outside: np.ndarray | None = None) -> Teacher:
    @zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [10])})
    def predict(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if outside is None:
            return {"prob": expected(batch["img"], w)}
        return {"prob": expected_outside(batch["img"], w, outside)}

    return predict


model_a = _linear(weights(1))  # one factory, three models, one model_id
model_b = _linear(weights(2))
model_a_within = _linear(weights(1), weights(2))  # model_a on the probe's inputs ([0, 1)), model_b beyond



def expected_pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What a :func:`_pair` teacher answers for rows of ``a`` and ``b``: g(a) - g(b), g(v) = v (v - 1),
    0 on the probe's inputs (0 or 1) and not symmetric in ``a`` and ``b`` beyond them."""
    return (a * (a - 1) - b * (b - 1)).astype(np.float32)


def _pair(order: tuple[str, str]) -> Teacher:
    @zdistill.teacher_function(feeds={name: ("int64", [1]) for name in order}, fetches={"d": ("float32", [1])})
    def predict(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"d": expected_pair(batch["a"], batch["b"])}

    return predict


pair_ab = _pair(("a", "b"))  # one model, one model_id, its feeds declared in two orders
pair_ba = _pair(("b", "a"))


def token_embedding(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1000, 4)).astype(np.float32)


def expected_tokens(ids: np.ndarray, embed: np.ndarray) -> np.ndarray:
    """What a :func:`_per_token` teacher of ``embed`` answers for ONE row: ``h``, its running sum of embeddings."""
    return np.cumsum(embed[ids], axis=0, dtype=np.float64).astype(np.float32)


def _per_token(embed: np.ndarray) -> Teacher:
    @zdistill.teacher_function(feeds={"ids": ("int64", [-1])}, fetches={"h": ("float32", [-1, 4])})
    def predict(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"h": np.cumsum(embed[batch["ids"]], axis=1, dtype=np.float64).astype(np.float32)}

    return predict


tokens_a = _per_token(token_embedding(1))  # per-token outputs only: one factory, two models, one model_id
tokens_b = _per_token(token_embedding(2))

_LOADED: dict[str, np.ndarray] = {}


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [10])})
def from_file(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """softmax(img @ W) with W loaded from the .npy file $ZDISTILL_TEST_WEIGHTS names, as real teachers load theirs."""
    if "w" not in _LOADED:
        _LOADED["w"] = np.load(os.environ[WEIGHTS_ENV])
    return {"prob": expected(batch["img"], _LOADED["w"])}


_NOISE = np.random.default_rng()
NOISE = 0.01


@zdistill.teacher_function(feeds={"img": ("float32", [784])}, fetches={"prob": ("float32", [10])})
def noisy(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """model_a's answers, each off by up to NOISE (relative), differently on every call: a
    stand-in for dropout left on or a nondeterministic kernel."""
    prob = expected(batch["img"], weights(1))
    return {"prob": (prob * (1 + NOISE * _NOISE.uniform(-1, 1, prob.shape))).astype(np.float32)}
