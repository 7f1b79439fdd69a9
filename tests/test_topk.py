"""``zdistill.topk.topk_to_dense``: a teacher's top-k log-probabilities back to dense rows for a KL loss."""

from __future__ import annotations

import numpy as np
import pytest

from zdistill.errors import ConfigError
from zdistill.topk import topk_to_dense


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def teacher_topk(full: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What the example LM teacher sends: the k largest log-probabilities and their ids."""
    idx = np.argsort(-full, axis=-1)[..., :k]
    return np.take_along_axis(full, idx, axis=-1), idx.astype(np.int32)


@pytest.fixture
def full() -> np.ndarray:
    """Full-vocabulary log-probabilities of 2 sequences x 5 tokens x 50 ids."""
    return log_softmax(np.random.default_rng(3).standard_normal((2, 5, 50)) * 3).astype(np.float32)


def test_spread_keeps_the_top_k_and_shares_the_rest_evenly(full):
    values, idx = teacher_topk(full, 8)
    dense = topk_to_dense(values, idx, 50)
    assert dense.shape == (2, 5, 50) and dense.dtype == np.float32
    np.testing.assert_allclose(np.take_along_axis(dense, idx.astype(np.intp), axis=-1), values, rtol=1e-6)
    np.testing.assert_allclose(np.exp(dense).sum(axis=-1), 1.0, rtol=1e-5)  # whole distributions
    others = np.ones(full.shape, dtype=bool)
    np.put_along_axis(others, idx.astype(np.intp), False, axis=-1)
    rest = np.exp(dense)[others].reshape(2, 5, 42)
    np.testing.assert_allclose(rest, rest[..., :1].repeat(42, axis=-1), rtol=1e-5)  # evenly shared
    true_rest = np.where(others, np.exp(full), 0).sum(axis=-1)
    np.testing.assert_allclose(rest.sum(axis=-1), true_rest, rtol=1e-4)  # exactly the mass left out


def test_spread_with_every_token_rebuilds_the_distribution(full):
    values, idx = teacher_topk(full, 50)
    np.testing.assert_allclose(topk_to_dense(values, idx, 50), full, rtol=1e-6)


def test_spread_kl_approaches_the_full_kl_as_k_grows(full):
    """What the student's loss sees: KL(teacher || student) from the rebuilt rows vs from the full teacher."""
    student = log_softmax(np.random.default_rng(4).standard_normal(full.shape)).astype(np.float32)

    def kl(p_log: np.ndarray) -> float:
        return float((np.exp(p_log) * (p_log - student)).sum(axis=-1).mean())

    exact = kl(full)
    errors = [abs(kl(topk_to_dense(*teacher_topk(full, k), 50)) - exact) for k in (2, 8, 32, 50)]
    assert errors[-1] < 1e-5
    assert errors[0] > errors[1] > errors[2] > errors[3]


def test_float16_values_from_the_wire_are_accepted(full):
    values, idx = teacher_topk(full, 8)
    dense = topk_to_dense(values.astype(np.float16), idx, 50)
    np.testing.assert_allclose(np.exp(dense).sum(axis=-1), 1.0, rtol=1e-3)


def test_drop_renormalises_the_top_k_and_zeroes_the_rest(full):
    values, idx = teacher_topk(full, 8)
    logits = values + 7.5  # raw logits: an unknown shift of the log-probabilities
    dense = topk_to_dense(logits, idx, 50, rest="drop")
    p = np.exp(dense)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.count_nonzero(np.isneginf(dense)) == 2 * 5 * 42
    kept = np.take_along_axis(p, idx.astype(np.intp), axis=-1)
    np.testing.assert_allclose(kept, np.exp(values) / np.exp(values).sum(axis=-1, keepdims=True), rtol=1e-5)


def test_out_is_filled_in_place_and_old_contents_do_not_leak(full):
    values, idx = teacher_topk(full, 4)
    out = np.full((2, 5, 50), 123.0, dtype=np.float32)
    assert topk_to_dense(values, idx, 50, out=out) is out
    np.testing.assert_array_equal(out, topk_to_dense(values, idx, 50))
    with pytest.raises(ConfigError, match="out must be"):
        topk_to_dense(values, idx, 50, out=np.empty((2, 5, 49), dtype=np.float32))


def test_all_mass_in_the_top_k_leaves_minus_infinity_elsewhere():
    dense = topk_to_dense(np.array([[0.0, -np.inf]], dtype=np.float32), np.array([[3, 1]]), 6)
    assert np.isneginf(dense[0, [0, 1, 2, 4, 5]]).all()
    assert dense[0, 3] == 0.0


@pytest.mark.parametrize(("values", "indices", "kwargs", "message"), [
    (np.zeros((2, 3)), np.zeros((2, 4), dtype=np.int32), {}, "same shape"),
    (np.log(np.full((1, 2), 0.4)), np.array([[0, 9]]), {}, r"lie in \[0, 9\)"),
    (np.log(np.full((1, 2), 0.4)), np.array([[-1, 2]]), {}, "lie in"),
    (np.log(np.full((1, 2), 0.4)), np.array([[2, 2]]), {}, "repeats a token id"),
    (np.log(np.full((1, 2), 0.4)), np.array([[0.0, 1.0]]), {}, "integer token ids"),
    (np.array([[1, 2]]), np.array([[0, 1]]), {}, "must be floats"),
    (np.array([[np.nan, -1.0]]), np.array([[0, 1]]), {}, "NaN"),
    (np.array([[2.0, 1.0]]), np.array([[0, 1]]), {}, "not log-probabilities"),
    (np.array([[-np.inf, -np.inf]]), np.array([[0, 1]]), {"rest": "drop"}, "all -inf"),
    (np.log(np.full((1, 2), 0.4)), np.array([[0, 1]]), {"rest": "uniform"}, "rest must be"),
    (np.zeros((1, 12)), np.arange(12).reshape(1, 12), {}, "k = 12"),
])
def test_bad_input_is_refused_with_a_clear_error(values, indices, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        topk_to_dense(values, indices, 9, **kwargs)
