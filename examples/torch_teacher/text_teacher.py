"""A text teacher: a BERT-base-sized encoder, 128 int64 token ids -> 16 logits (random weights).

Serve it with ``zdistill-teacher --model examples/torch_teacher/text_teacher.py:classify
--port 9292``.  12 layers, hidden 768, 12 heads, feed-forward 3072, a 30,522-id
vocabulary, a tanh pooler on the first token and a 16-way classifier: BERT-base's
shape, built from ``torch.nn`` so nothing is downloaded.  A sample is 1 KB in and
64 bytes out: this teacher is bound by its GPU, never by the wire.
``ZDISTILL_TORCH_TEACHER_SIZE=tiny`` serves 2 layers of width 32 on 16 ids, for tests
on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # served as a file: its sibling modules

from torch_serving import TorchTeacher, model_size  # noqa: E402

import zdistill  # noqa: E402

TINY = model_size() == "tiny"
VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ = (1000, 32, 2, 2, 64, 16) if TINY else (30522, 768, 12, 12, 3072, 128)
CLASSES = 16


class Encoder(nn.Module):
    """Token + position embeddings, a post-norm Transformer encoder (as BERT), a pooled classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(SEQ, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.pooler = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.tokens(ids) + self.positions.weight[: ids.shape[1]])
        return self.classifier(self.pooler(self.encoder(x)[:, 0]))


def forward(module: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"logits": module(inputs["ids"]).float()}


TEACHER = TorchTeacher(Encoder, forward)


@zdistill.teacher_function(feeds={"ids": ("int64", [SEQ])}, fetches={"logits": ("float32", [CLASSES])})
def classify(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BERT-base-sized encoder logits of token ids (bf16 on a GPU)."""
    return TEACHER(batch)
