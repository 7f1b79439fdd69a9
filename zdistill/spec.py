"""The types both sides of a teacher connection speak: named tensors, arrays, model ids, meta.

The teacher declares its feeds and fetches as :class:`TensorSpec` and reports them in
its ``meta`` reply (:class:`TeacherMeta`); the student checks its slots against them.
Neither side owns these types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np

from zdistill.errors import ConfigError, WireError

Arrays = dict[str, np.ndarray]

MAX_MODEL_ID = 256  # characters; a model id travels in every meta reply and keys a student's cache
MAX_SPECS = 1024  # feeds or fetches of one teacher
MAX_TEXT = 4096  # a teacher's description or device


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor's dtype and *per-row* shape (the batch axis left out; -1 = any size)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    dtype: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    shape: Annotated[tuple[Annotated[int, msgspec.Meta(ge=-1)], ...], msgspec.Meta(max_length=32)]

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


class TeacherMeta(msgspec.Struct, frozen=True, kw_only=True):
    """A teacher's ``meta`` reply, checked once where it is received (:meth:`parse`).

    A student's reader and workers, and the discovery register, all decide from it
    whether a teacher can serve; parsing it in one place means they agree on what a
    malformed one is.  Fields a newer teacher adds are ignored.
    """

    feeds: Annotated[list[TensorSpec], msgspec.Meta(max_length=MAX_SPECS)] = []
    fetches: Annotated[list[TensorSpec], msgspec.Meta(max_length=MAX_SPECS)] = []
    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] = 1
    instances: Annotated[int, msgspec.Meta(ge=1)] = 1
    model_id: str | None = None  # None: a teacher older than the cache (check_model_id bounds a real one)
    fingerprint: dict[str, Any] | None = None  # its answers to the probe batch (zdistill.fingerprint.usable)
    device: Annotated[str, msgspec.Meta(max_length=256)] = ""
    description: str = ""  # free text: long ones are cut where they are kept, not refused

    @classmethod
    def parse(cls, reply: Mapping[str, Any]) -> TeacherMeta:
        """The typed meta of a teacher's reply header; WireError naming the bad field."""
        try:
            return msgspec.convert(reply, cls)
        except msgspec.ValidationError as exc:
            raise WireError(f"malformed meta: {exc}") from None

    def fetches_named(self, names: Sequence[str]) -> list[TensorSpec]:
        """The fetches (outputs) called ``names``, in that order; KeyError for one the teacher has not."""
        specs = {f.name: f for f in self.fetches}
        return [specs[name] for name in names]


def check_model_id(model_id: object, what: str = "--model-id", limit: int = MAX_MODEL_ID) -> str:
    """``model_id`` if it is 1 to ``limit`` printable characters, else a :class:`ConfigError` naming ``what``."""
    if not isinstance(model_id, str) or not 1 <= len(model_id) <= limit or not model_id.isprintable():
        raise ConfigError(f"{what} must be 1 to {limit} printable characters (no tabs or newlines), "
                          f"got {model_id!r:.80}")
    return model_id
