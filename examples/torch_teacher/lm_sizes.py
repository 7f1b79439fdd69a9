"""The sizes of the example LM, and which one a served ``lm_teacher`` is (no PyTorch needed).

``lm_teacher.py`` builds its model in the size ``ZDISTILL_TORCH_TEACHER_SIZE`` names
when the teacher starts.  A student must use that size's vocabulary and sequence
length, whatever its own environment says, so it asks the teacher: ``meta`` gives the
per-row shape of the ``tokens`` feed, the sequence length, and each size has a length
of its own, so the length says which size is served (the vocabulary itself is not in
``meta``).  An ``lm_teacher`` of no known size is an error, never a guess: a wrong
vocabulary would give the student wrong targets without a word.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LMSize:
    """One size of the example LM: vocabulary, width, depth, attention heads, tokens per sample."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    seq: int


SIZES = {
    "full": LMSize(vocab=50257, hidden=768, layers=12, heads=12, seq=128),  # GPT-2 small
    "tiny": LMSize(vocab=512, hidden=32, layers=2, heads=2, seq=16),  # seconds on a CPU, for tests
}


def served_size(meta: Mapping[str, Any], teacher: str) -> LMSize:
    """The size of the ``lm_teacher`` whose ``meta`` this is, from its ``tokens`` feed's shape.

    Raises ValueError naming ``teacher`` and what it takes when no size has that shape
    (another model at that address, or a size this file does not list).
    """
    shapes = {f.get("name"): f.get("shape") for f in meta.get("feeds", []) if isinstance(f, Mapping)}
    shape = shapes.get("tokens")
    for size in SIZES.values():
        if shape == [size.seq]:
            return size
    known = ", ".join(f"{name}: [{size.seq}]" for name, size in SIZES.items())
    raise ValueError(f"teacher {teacher} takes feeds {shapes}, not the 'tokens' of any size of lm_teacher ({known})")
