"""The sequence teacher (a GRU), the bag-of-words student, and how a batch of reviews becomes tensors.

Both networks take padded id batches ``[rows, longest]`` int64 with :data:`language.PAD`
(0) after each review's end, so the MNIST example's training loop, losses and accuracy
(``models.train_epochs``, ``models.distill_loss``, ``models.accuracy``) run them unchanged;
:func:`collate` is the one place a list of reviews of different lengths is padded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from language import PAD, VOCAB, pad
from paddle import nn

TEACHER_INPUTS = ("ids", "lengths")  # the saved teacher's feeds, in this order
TEACHER_OUTPUT = "fetch_name_0"  # what Paddle 3's predictor calls a jit.save'd layer's single output
TEACHER_EMBEDDING, TEACHER_HIDDEN = 32, 64


class TeacherGRU(nn.Layer):
    """Embeddings read left to right by a GRU; its state after each review's last word gives the logits.

    ``sequence_length`` makes the GRU stop at each review's end, so the padding after it
    changes nothing: the same review gives the same output in any batch.  A state that has
    read the whole review knows which clause came last and whether ``not`` preceded its
    opinion word, which is all the label depends on.
    """

    def __init__(self, embedding: int = TEACHER_EMBEDDING, hidden: int = TEACHER_HIDDEN) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), embedding, padding_idx=PAD)
        self.gru = nn.GRU(embedding, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, ids: paddle.Tensor, lengths: paddle.Tensor | None = None) -> paddle.Tensor:
        """Logits ``[rows, 2]``; ``lengths`` defaults to each row's count of non-PAD ids (PAD never occurs inside)."""
        if lengths is None:
            lengths = (ids != PAD).astype("int64").sum(axis=1)
        _, last = self.gru(self.embed(ids), sequence_length=lengths)
        return self.head(last[-1])


class ServedTeacher(nn.Layer):
    """What ``zdistill-teacher`` serves: ``softmax(GRU(ids, lengths))``, the probabilities EDL students expect.

    ``paddle.jit.save`` names the inputs after ``forward``'s arguments, which must match the
    ``InputSpec`` names (:data:`TEACHER_INPUTS`).
    """

    def __init__(self, net: TeacherGRU) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids: paddle.Tensor, lengths: paddle.Tensor) -> paddle.Tensor:
        return F.softmax(self.net(ids, lengths), axis=-1)


class StudentBOW(nn.Layer):
    """A bag of words: the mean of the review's word embeddings, then one linear layer (EDL's BOW student).

    The mean is taken over the real words only (PAD masked out), so the output depends on
    the review's word counts and nothing else: word order is invisible to it.
    """

    def __init__(self, embedding: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), embedding, padding_idx=PAD)
        self.head = nn.Linear(embedding, 2)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        mask = (ids != PAD).astype("float32").unsqueeze(-1)
        mean = (self.embed(ids) * mask).sum(axis=1) / paddle.clip(mask.sum(axis=1), min=1.0)
        return self.head(mean)


def collate(samples: Sequence[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """A list of ``(ids, label[, prob])`` samples -> ``[ids padded [rows, longest], label, prob]`` arrays.

    The ids of each sample are a 1-D array of its own length (as the reader gave them,
    and as DistillReader gives them back); every other slot has one shape and is stacked.
    """
    ids, *rest = zip(*samples, strict=True)
    return [pad(ids)[0], *(np.stack(slot) for slot in rest)]


def export_teacher(net: TeacherGRU, prefix: str) -> str:
    """``paddle.jit.save`` the served model with variable-length ``ids [-1, -1]`` and ``lengths [-1]`` (int64)."""
    served = ServedTeacher(net)
    served.eval()
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    specs = [paddle.static.InputSpec([None, None], "int64", TEACHER_INPUTS[0]),
             paddle.static.InputSpec([None], "int64", TEACHER_INPUTS[1])]
    paddle.jit.save(served, prefix, input_spec=specs)
    return prefix


class SavedTeacher:
    """The exported teacher run in this process with ``paddle.inference``: what ``--in-process`` distils from.

    It pads a batch exactly as ``zdistill-teacher`` does (PAD = 0 up to the batch's longest
    review) and fills ``lengths`` from each review's length, so its probabilities are the
    served teacher's.
    """

    def __init__(self, prefix: str, threads: int = 1) -> None:
        from paddle import inference

        config = inference.Config(prefix + ".json", prefix + ".pdiparams")
        config.disable_gpu()
        config.disable_glog_info()
        config.set_cpu_math_library_num_threads(threads)
        self.predictor = inference.create_predictor(config)
        self.rows = 0  # reviews labeled so far

    @property
    def input_names(self) -> list[str]:
        return list(self.predictor.get_input_names())

    def __call__(self, sentences: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities ``[rows, 2]`` float32 for a list of reviews (1-D int64 ids each)."""
        ids, lengths = pad(sentences)
        for name, array in zip(TEACHER_INPUTS, (ids, lengths), strict=True):
            handle = self.predictor.get_input_handle(name)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(array)
        self.predictor.run()
        self.rows += len(sentences)
        return self.predictor.get_output_handle(TEACHER_OUTPUT).copy_to_cpu()
