"""The sizes of the example LM, and which one a served ``lm_teacher`` is (no PyTorch needed).

``lm_teacher.py`` builds its model in the size ``ZDISTILL_TORCH_TEACHER_SIZE`` names
when the teacher starts.  A student must use that size's vocabulary and longest
sequence, whatever its own environment says, so it asks the teacher: its ``tokens``
feed is variable-length (``[-1]``), so the shape cannot tell the sizes apart, and the
teacher names its size in its description (:func:`description`), which ``meta``
carries.  An ``lm_teacher`` of no known size is an error, never a guess: a wrong
vocabulary would give the student wrong targets without a word.
"""

from __future__ import annotations

import re
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
    seq: int  # the longest sequence it takes (its position embeddings)


SIZES = {
    "full": LMSize(vocab=50257, hidden=768, layers=12, heads=12, seq=128),  # GPT-2 small
    "tiny": LMSize(vocab=512, hidden=32, layers=2, heads=2, seq=16),  # seconds on a CPU, for tests
}


_NAMED = re.compile(r"example causal LM, size (\w+)")


def description(name: str) -> str:
    """What ``lm_teacher`` of size ``name`` says it is: the part of its ``meta`` that names the size."""
    size = SIZES[name]
    return f"example causal LM, size {name}: {size.vocab} token ids, sequences of 1 to {size.seq} tokens"


def served_size(meta: Mapping[str, Any], teacher: str) -> LMSize:
    """The size of the ``lm_teacher`` whose ``meta`` this is: variable-length ``tokens``, its size named.

    Raises ValueError naming ``teacher`` and what it serves when it is no size of
    ``lm_teacher`` (another model at that address, or a size this file does not list).
    """
    shapes = {f.get("name"): f.get("shape") for f in meta.get("feeds", []) if isinstance(f, Mapping)}
    named = _NAMED.search(str(meta.get("description", "")))
    if shapes.get("tokens") == [-1] and named and named[1] in SIZES:
        return SIZES[named[1]]
    raise ValueError(f"teacher {teacher} takes feeds {shapes} ({str(meta.get('description', ''))[:120]!r}), "
                     f"not the variable-length 'tokens' of a size of lm_teacher ({', '.join(SIZES)})")
