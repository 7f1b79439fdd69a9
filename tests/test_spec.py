"""TeacherMeta: a teacher's ``meta`` reply parsed once, every field checked, a bad one named; Ragged cut into rows."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from zdistill.errors import WireError
from zdistill.spec import Ragged, TeacherMeta, TensorSpec

# what a zdistill-teacher answers to ``meta`` (see tests/test_teacher.py), with the reply's own keys
REPLY: dict[str, Any] = {
    "kind": "meta", "id": 7,
    "feeds": [{"name": "img", "dtype": "float32", "shape": [784]}],
    "fetches": [{"name": "prob", "dtype": "float32", "shape": [10]}, {"name": "ids", "dtype": "int64", "shape": [-1]}],
    "max_batch_size": 64, "max_delay_ms": 0, "instances": 2, "thread_safe": True,
    "max_message_bytes": 128 << 20, "max_queue_bytes": 512 << 20, "description": "softmax(img @ W)",
    "device": "cpu", "model_id": "mnist-v1", "fingerprint": {"version": 1, "outputs": {}, "jitter": 0.0},
    "stats": {"requests": 3},
}


def test_a_teachers_reply_parses_to_typed_fields() -> None:
    meta = TeacherMeta.parse(REPLY)
    assert meta.feeds == [TensorSpec("img", "float32", (784,))]
    ids, prob = TensorSpec("ids", "int64", (-1,)), TensorSpec("prob", "float32", (10,))
    assert meta.fetches_named(["ids", "prob"]) == [ids, prob]
    assert (meta.max_batch_size, meta.instances, meta.model_id, meta.device) == (64, 2, "mnist-v1", "cpu")
    assert meta.fingerprint == REPLY["fingerprint"]


def test_a_reply_of_an_older_teacher_takes_the_defaults() -> None:
    meta = TeacherMeta.parse({"feeds": REPLY["feeds"], "fetches": REPLY["fetches"]})
    assert (meta.max_batch_size, meta.instances, meta.model_id, meta.fingerprint) == (1, 1, None, None)
    with pytest.raises(KeyError):
        meta.fetches_named(["logits"])


@pytest.mark.parametrize(("field", "value", "where"), [
    ("feeds", "img", "$.feeds"),
    ("feeds", [{"name": "img", "dtype": "float32"}], "$.feeds[0]"),  # no shape
    ("feeds", [{"name": "img", "dtype": "float32", "shape": [-2]}], "$.feeds[0].shape[0]"),
    ("fetches", [{"name": "", "dtype": "float32", "shape": [10]}], "$.fetches[0].name"),
    ("fetches", [{"name": "prob", "dtype": "float32", "shape": [1] * 33}], "$.fetches[0].shape"),
    ("max_batch_size", 0, "$.max_batch_size"),
    ("max_batch_size", "64", "$.max_batch_size"),
    ("instances", True, "$.instances"),
    ("model_id", 5, "$.model_id"),
    ("fingerprint", [1, 2], "$.fingerprint"),
    ("device", "x" * 257, "$.device"),
])
def test_a_malformed_field_is_a_wire_error_naming_it(field: str, value: Any, where: str) -> None:
    with pytest.raises(WireError, match=f"^malformed meta: .* at `{re.escape(where)}`$"):
        TeacherMeta.parse({**REPLY, field: value})


@pytest.mark.parametrize(("shape", "variable"), [((-1,), True), ((-1, 4), True), ((4, -1), False), ((), False),
                                                 ((7,), False)])
def test_a_spec_is_variable_when_its_first_per_row_dim_is_open(shape: tuple[int, ...], variable: bool) -> None:
    assert TensorSpec("t", "int64", shape).variable is variable


def padded_layouts(dtype: str, inner: tuple[int, ...]) -> list[np.ndarray]:
    """``[5, 9, *inner]`` of distinct values: C order, Fortran order, a strided view, a broadcast."""
    rows, longest = 5, 9
    base = (np.arange(rows * longest * int(np.prod(inner))) % 251).astype(dtype).reshape(rows, longest, *inner)
    wide = np.repeat(base, 2, axis=1)[:, ::2]  # the same values, not contiguous
    broadcast = np.broadcast_to(base[:1], base.shape)
    return [base, np.asfortranarray(base), wide, broadcast]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "bool", "uint8"])
@pytest.mark.parametrize("inner", [(), (4,), (2, 3), (0,)])
def test_unpad_and_rows_give_each_row_its_own_tokens(dtype: str, inner: tuple[int, ...]) -> None:
    lengths = np.array([3, 0, 9, 1, 5])
    for padded in padded_layouts(dtype, inner):
        ragged = Ragged.unpad(padded, lengths)
        assert ragged.values.dtype == padded.dtype and ragged.values.shape == (18, *inner)
        assert ragged.lengths.dtype == np.int64
        rows = ragged.rows()
        assert len(rows) == 5
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            np.testing.assert_array_equal(row, padded[i, :n])
            assert row.dtype == padded.dtype and row.shape == (n, *inner)


def test_unpad_and_rows_of_no_rows() -> None:
    ragged = Ragged.unpad(np.zeros((0, 0, 4), np.float32), np.zeros(0, np.int64))
    assert ragged.values.shape == (0, 4) and ragged.rows() == []
