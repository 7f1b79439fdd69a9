"""Distil the example LM teacher into a small student, with a KL loss on the teacher's top-k.

Start the teacher (``README.md`` beside this file), then::

    python examples/torch_teacher/student_lm.py --teacher 127.0.0.1:9292 --steps 100

The student reads token sequences of different lengths (random ones here; a real
job's data loader in practice), a batch as a list of per-sample arrays, as EDL's text
readers yield them; ``DistillReader`` sends them to the teacher and hands back each
batch with, per sample, the teacher's top-k log-probabilities and ids for each of its
tokens; ``topk_to_dense`` turns those into dense rows over the vocabulary, and the
student minimises ``KL(teacher || student)`` per token, padding left out.  It prints
the loss every ``--log-every`` steps and, at the end, the mean loss of the first and of the last 10 steps.

The vocabulary and the longest sequence are the served teacher's: the student asks its
``meta`` which size of ``lm_teacher`` it is (``lm_sizes.py``), so a teacher started with
``ZDISTILL_TORCH_TEACHER_SIZE=tiny`` needs no such variable for the student.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_sizes import LMSize, served_size  # noqa: E402  (the student must share the teacher's vocabulary)

from zdistill import DistillReader, TeacherClient, ZDistillError  # noqa: E402
from zdistill.topk import RESTS, topk_to_dense  # noqa: E402


class Student(nn.Module):
    """A small next-token model: embeddings, one GRU layer, a projection on the vocabulary."""

    def __init__(self, vocab: int, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def token_batches(steps: int, batch: int, seed: int, size: LMSize) -> Iterator[tuple[list[np.ndarray]]]:
    """``steps`` batches of ``batch`` random sequences of 1 to ``size.seq`` tokens: one slot, ``tokens``."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        lengths = rng.integers(1, size.seq + 1, batch)
        yield ([rng.integers(0, size.vocab, n, dtype=np.int32) for n in lengths],)


def padded(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded with 0 to the longest (int64 ``[batch, longest]``), and where the real tokens are."""
    lengths = torch.tensor([len(r) for r in rows])
    mask = torch.arange(int(lengths.max())) < lengths[:, None]
    out = torch.zeros(mask.shape, dtype=torch.int64)
    out[mask] = torch.from_numpy(np.concatenate(rows)).long()
    return out, mask


def teacher_size(teachers: str) -> LMSize:
    """The size of the ``lm_teacher`` served at the first of ``teachers``, from its ``meta``."""
    first = teachers.split(",")[0].strip()
    client = TeacherClient(first, timeout=60)
    try:
        return served_size(client.meta(), first)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the teacher(s), ip:port[,ip:port...]")
    p.add_argument("--steps", type=int, default=100, help="training steps (one batch each)")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rest", choices=RESTS, default="spread",
                   help="what the tokens outside the teacher's top-k get (see zdistill.topk)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        size = teacher_size(args.teacher)
    except (ValueError, ZDistillError) as exc:  # a bad address, no answer, another model there
        print(f"student_lm: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    student = Student(size.vocab)
    optimiser = torch.optim.Adam(student.parameters(), lr=args.lr)
    losses: list[float] = []
    with DistillReader(ins=["tokens"], predicts=["topk_logprobs", "topk_indices"]) as dr:
        dr.set_fixed_teacher(args.teacher)
        reader = dr.set_batch_generator(lambda: token_batches(args.steps, args.batch, args.seed, size))
        for step, (tokens, logprobs, ids) in enumerate(reader()):
            # One row per real token, in the order the mask below picks the student's.
            dense = topk_to_dense(np.concatenate(logprobs), np.concatenate(ids), size.vocab, rest=args.rest)
            # Probabilities, not log-probabilities: kl_div counts 0 * log 0 as 0, which
            # the -inf of rest="drop" (and of tokens given no mass) need.
            target = torch.from_numpy(dense).exp()
            inputs, real = padded(tokens)
            log_q = F.log_softmax(student(inputs)[real], dim=-1)
            loss = F.kl_div(log_q, target, reduction="batchmean")  # mean over tokens
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            if step % args.log_every == 0:
                print(f"step {step:4d}  KL(teacher || student) per token {losses[-1]:.4f}", flush=True)
    if len(losses) != args.steps:
        print(f"expected {args.steps} batches, got {len(losses)}", file=sys.stderr)
        return 1
    head, tail = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"KL per token: first 10 steps {head:.4f}, last 10 steps {tail:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
