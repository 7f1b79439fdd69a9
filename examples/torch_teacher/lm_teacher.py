"""A language-model teacher that sends only the top-k of each token's distribution.

Serve it with ``zdistill-teacher --model examples/torch_teacher/lm_teacher.py:topk
--port 9292``.  A GPT-2-small-sized causal Transformer (12 layers, hidden 768, a
50,257-id vocabulary, random weights) reads a sequence of 1 to 128 int32 token ids per
sample, each sample its own length.  Its full answer, up to 128 x 50,257 float32
logits, is 25.7 MB a sample: 6.6 GB for a 256-row batch,
which no wire carries at training speed.  So the GPU reduces it before anything is
copied back: per token, ``log_softmax`` over the whole vocabulary (in float32), then
the k largest log-probabilities (float16) and their token ids (int32).  With k = 32
that is 24 KB a sample, 1/1000 of the logits.  The student rebuilds dense rows for
its KL loss with :func:`zdistill.topk.topk_to_dense` (see ``student_lm.py``).

Rows of different lengths arrive padded to the batch's longest; the attention is
causal, so a token never sees the padding after it, and the teacher cuts each row's
top-k back to its own length (per-token fetches, ``[-1, k]``).

Log-probabilities, not logits, because the full-vocabulary normaliser is in them:
the student then knows how much mass the top k hold, and can spread the rest over the
other tokens (``rest="spread"``).

``ZDISTILL_LM_TOPK`` sets k (default 32; 8 in the tiny size);
``ZDISTILL_TORCH_TEACHER_SIZE=tiny`` serves 2 layers of width 32, a 512-id vocabulary
and sequences of up to 16 tokens, for tests on a CPU (the sizes: ``lm_sizes.py``, where
a student finds which one a teacher serves).
"""

from __future__ import annotations

import os
import sys
from dataclasses import astuple
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # served as a file: its sibling modules

from lm_sizes import SIZES, description  # noqa: E402  (shared with the student, which finds the served size in meta)
from torch_serving import TorchTeacher, model_size  # noqa: E402

import zdistill  # noqa: E402

TINY = model_size() == "tiny"
VOCAB, HIDDEN, LAYERS, HEADS, SEQ = astuple(SIZES[model_size()])
TOPK = int(os.environ.get("ZDISTILL_LM_TOPK", "8" if TINY else "32"))
if not 1 <= TOPK <= VOCAB:
    raise ValueError(f"ZDISTILL_LM_TOPK must be between 1 and the vocabulary size {VOCAB}, got {TOPK}")
# The vocabulary projection is the big tensor: [rows, length, VOCAB].  It is made for a
# few sequences at a time (about 64 MiB of float32 logits), never for the whole batch.
CHUNK_ROWS = max(1, 2**24 // (SEQ * VOCAB))


class CausalLM(nn.Module):
    """Token + position embeddings, a pre-norm causal Transformer, an output head tied to the embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        # Logits of about unit-2 spread: a few tokens stand out, as in a trained model
        # (nn.Embedding's N(0, 1) would put all the mass on one token).
        nn.init.normal_(self.tokens.weight, std=2 / HIDDEN**0.5)
        self.positions = nn.Embedding(SEQ, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, 4 * HIDDEN, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, LAYERS, norm=nn.LayerNorm(HIDDEN), enable_nested_tensor=False)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tokens(ids) + self.positions.weight[:t]
        return self.body(x, mask=self.causal[:t, :t], is_causal=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.tokens.weight.T


def forward(module: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if inputs["tokens"].shape[1] > SEQ:  # the teacher answers the request with this error
        raise ValueError(f"a sequence of {inputs['tokens'].shape[1]} tokens is longer than this model's {SEQ}")
    hidden = module.hidden(inputs["tokens"].long())
    values, indices = [], []
    for part in hidden.split(CHUNK_ROWS):
        logits = module.logits(part)  # bf16 under autocast
        top = logits.topk(TOPK, dim=-1)
        norm = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # over the whole vocabulary
        values.append((top.values.float() - norm).half())
        indices.append(top.indices.int())
    return {"topk_logprobs": torch.cat(values), "topk_indices": torch.cat(indices)}


TEACHER = TorchTeacher(CausalLM, forward)


@zdistill.teacher_function(feeds={"tokens": ("int32", [-1])},
                           fetches={"topk_logprobs": ("float16", [-1, TOPK]), "topk_indices": ("int32", [-1, TOPK])},
                           description=description(model_size()))
def topk(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per token: the k largest next-token log-probabilities (float16) and their ids (int32)."""
    return TEACHER(batch)
