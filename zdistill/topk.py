"""Student side of a top-k teacher: rebuild dense log-probabilities for a KL loss (numpy only).

A language-model teacher cannot send its full distribution: 128 tokens x 50,257
float32 logits is 25 MB a sample, far beyond any wire.  It sends, per token, the k
largest log-probabilities of its full-vocabulary softmax and their token ids instead
(``examples/torch_teacher/lm_teacher.py``: 128 x 32 of each, 24 KB a sample).  This
module turns such a pair back into a ``[..., vocab_size]`` array of log-probabilities
that any framework's KL loss takes.  It lives in :mod:`zdistill`, not in the example,
because every top-k teacher (PyTorch, Paddle or numpy) needs the same inverse on the
student, which has zdistill and numpy but not necessarily torch.

What the other ``vocab_size - k`` tokens get is a choice (``rest``):

- ``"spread"`` (the default): the mass the top-k leave out, ``1 - sum(exp(values))``,
  is shared evenly by the other tokens.  Every row is then a whole distribution (it
  sums to 1), so ``KL(teacher || student)`` counts every token and the student is not
  pushed to put all its mass on the teacher's top k.  This needs ``values`` to be
  log-probabilities normalised over the *full* vocabulary (a teacher's top-k of
  ``log_softmax(logits)``), which is why the example teacher sends those, not logits.
- ``"drop"``: the other tokens get ``-inf`` (probability 0) and the top-k are
  renormalised to sum to 1.  Use it for raw top-k logits (which carry no
  full-vocabulary normaliser) or to distil on the teacher's top-k support only.  The
  KL loss must then treat ``0 * log 0`` as 0: give PyTorch's ``kl_div`` probabilities
  (``exp`` of this array, ``log_target=False``), or use ``cross_entropy`` with them as
  soft targets (the same gradient); ``kl_div(..., log_target=True)`` and a hand-written
  ``p * (log p - log q)`` give NaN for the ``-inf`` entries.

A dense batch is big (32 sequences x 128 tokens x 50,257 float32 = 823 MB), so pass
``out`` to reuse one array across batches instead of allocating one per batch.
"""

from __future__ import annotations

import numpy as np

from zdistill.errors import ConfigError

RESTS = ("spread", "drop")
# float16 log-probabilities round by up to ~1e-3 relative; top-k of a normalised
# distribution may therefore appear to hold a little more than all the mass.
_MASS_TOLERANCE = 1e-2


def topk_to_dense(values: np.ndarray, indices: np.ndarray, vocab_size: int, rest: str = "spread",
                  out: np.ndarray | None = None) -> np.ndarray:
    """Dense float32 log-probabilities ``[..., vocab_size]`` from a teacher's top-k.

    ``values``: the top-k log-probabilities ``[..., k]`` (any float dtype; raw logits
    with ``rest="drop"``); ``indices``: their token ids ``[..., k]`` (any integer
    dtype), distinct within a row.  ``rest``: ``"spread"`` or ``"drop"`` (see the
    module docstring).  ``out``: a float32 C-contiguous array of the result's shape to
    write into (its old contents are overwritten); it is returned.

    Raises :class:`~zdistill.errors.ConfigError` for mismatched shapes, ids outside
    ``[0, vocab_size)`` or repeated in a row, NaNs, and (``"spread"``) values that are
    not log-probabilities of a full distribution.
    """
    values, indices = np.asarray(values), np.asarray(indices)
    _check(values, indices, vocab_size, rest)
    k = values.shape[-1]
    logp = values.astype(np.float32)
    fill = np.full(values.shape[:-1], -np.inf, dtype=np.float32)  # "drop", or no token outside the top-k
    if rest == "drop":
        peak = logp.max(axis=-1, keepdims=True)
        if np.isneginf(peak).any():
            raise ConfigError("a row's top-k values are all -inf: it holds no probability to renormalise")
        logp -= peak + np.log(np.exp(logp - peak).sum(axis=-1, keepdims=True))
    else:
        kept = np.exp(logp.astype(np.float64)).sum(axis=-1)
        if (kept > 1 + _MASS_TOLERANCE).any():
            raise ConfigError(
                f"top-k values hold up to {kept.max():.3f} of the probability mass, more than 1: they are not "
                "log-probabilities over the full vocabulary (send log_softmax's top-k, or use rest='drop')")
        if vocab_size > k:
            with np.errstate(divide="ignore"):  # no mass left: the other tokens get log 0 = -inf
                fill[...] = np.log(np.clip(1.0 - kept, 0.0, None)) - np.log(vocab_size - k)
    shape = (*values.shape[:-1], vocab_size)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ConfigError(f"out must be a C-contiguous float32 array of shape {list(shape)}, "
                          f"got {out.dtype} {list(out.shape)}")
    out[...] = fill[..., None]
    np.put_along_axis(out, indices.astype(np.intp, copy=False), logp, axis=-1)
    return out


def _check(values: np.ndarray, indices: np.ndarray, vocab_size: int, rest: str) -> None:
    """Refuse input that would give a silently wrong distribution."""
    if rest not in RESTS:
        raise ConfigError(f"rest must be one of {RESTS}, got {rest!r}")
    if values.shape != indices.shape or values.ndim == 0:
        raise ConfigError(f"values {list(values.shape)} and indices {list(indices.shape)} must have the same "
                          "shape [..., k]")
    if not np.issubdtype(values.dtype, np.floating):
        raise ConfigError(f"values must be floats (log-probabilities or logits), got {values.dtype}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ConfigError(f"indices must be integer token ids, got {indices.dtype}")
    k = values.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ConfigError(f"k = {k} top values for a vocabulary of {vocab_size}")
    if indices.size and (indices.min() < 0 or indices.max() >= vocab_size):
        raise ConfigError(f"token ids must lie in [0, {vocab_size}), got {indices.min()}..{indices.max()}")
    if np.isnan(values).any() or np.isposinf(values).any():
        raise ConfigError("values hold NaN or +inf")
    ordered = np.sort(indices, axis=-1)
    if k > 1 and (ordered[..., 1:] == ordered[..., :-1]).any():
        raise ConfigError("a row repeats a token id: top-k ids must be distinct")
