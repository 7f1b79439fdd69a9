"""The types both sides of a teacher connection speak: named tensors, arrays, model ids.

The teacher declares its feeds and fetches as :class:`TensorSpec` and reports them in
``meta``; the student checks its slots against them.  Neither side owns these types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zdistill.errors import ConfigError

Arrays = dict[str, np.ndarray]

MAX_MODEL_ID = 256  # characters; a model id travels in every meta reply and keys a student's cache


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor's dtype and *per-row* shape (the batch axis left out; -1 = any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))

    def matches(self, row_shape: Sequence[int]) -> bool:
        """True when a row of ``row_shape`` fits this spec (-1 matches any size)."""
        return len(row_shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, row_shape, strict=True)
        )

    def example(self, rows: int) -> np.ndarray:
        """A zero batch of ``rows`` rows, variable sizes set to 1: for warm-up runs."""
        return np.zeros((rows, *(1 if d < 0 else d for d in self.shape)), dtype=self.dtype)


def check_model_id(model_id: object, what: str = "--model-id", limit: int = MAX_MODEL_ID) -> str:
    """``model_id`` if it is 1 to ``limit`` printable characters, else a :class:`ConfigError` naming ``what``."""
    if not isinstance(model_id, str) or not 1 <= len(model_id) <= limit or not model_id.isprintable():
        raise ConfigError(f"{what} must be 1 to {limit} printable characters (no tabs or newlines), "
                          f"got {model_id!r:.80}")
    return model_id
