"""Run a PyTorch module as a zdistill teacher function, fast, from one thread or from several.

A teacher function gets a dict of numpy arrays and returns one.  Written the obvious
way (``torch.from_numpy(x).cuda()``, ``model(x)``, ``y.cpu().numpy()``) every call
stages its input through the driver's own pinned buffer, waits for that copy, runs,
and waits again for the output, all on the one default CUDA stream; with
``zdistill-teacher --instances N`` the N threads then queue behind each other on that
stream.  :class:`TorchTeacher` does the same work the fast way:

- **one lane per calling thread** (``threading.local``): its own CUDA stream and its
  own pinned host buffers, so N threads never share a buffer (no lock) and one
  thread's copies overlap another thread's kernels;
- **pinned (page-locked) host buffers**, reused call after call: the GPU's copy
  engine reads them directly (from pageable memory the driver copies once more through
  a pinned bounce buffer, at about half the speed), and pinning is costly, so it is
  done once per lane and buffer size, not per call;
- **non-blocking copies** in and out on the lane's stream, and one
  ``synchronize`` per call, when the outputs are needed;
- **``torch.inference_mode()``**: no autograd bookkeeping (version counters, graph
  nodes) on any tensor, less CPU work per op than ``no_grad``;
- **bf16 autocast**: matrix work on the tensor cores at half the bytes, while
  autocast keeps softmax, norms and reductions in float32.

The weights are built once (the first call, under a lock), from a fixed seed, on the
CPU and then moved to the device, so every process and every thread serves the same
model.  On a machine without CUDA the same code runs on the CPU (no streams, no
pinning, float32): that is how the tests run it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable

import numpy as np
import torch

Arrays = dict[str, np.ndarray]
Forward = Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]

SIZES = ("full", "tiny")


def model_size() -> str:
    """``ZDISTILL_TORCH_TEACHER_SIZE``: ``full`` (the real model sizes) or ``tiny`` (seconds on a CPU, for tests)."""
    size = os.environ.get("ZDISTILL_TORCH_TEACHER_SIZE", "full")
    if size not in SIZES:
        raise ValueError(f"ZDISTILL_TORCH_TEACHER_SIZE must be one of {SIZES}, got {size!r}")
    return size


@functools.cache
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype."""
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class _Lane:
    """One calling thread's CUDA stream and host staging buffers; only that thread touches them."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pin = device.type == "cuda"
        self.buffers: dict[str, torch.Tensor] = {}

    def staging(self, key: str, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer view of ``rows`` rows; grown to the next power of two when too small.

        Growing by powers of two pins memory a few times per lane (the teacher's batches
        vary in size up to its max batch), never once per call.
        """
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < rows or tuple(buf.shape[1:]) != row_shape or buf.dtype != dtype:
            capacity = 1 << max(0, rows - 1).bit_length()
            buf = torch.empty((capacity, *row_shape), dtype=dtype, pin_memory=self.pin)
            self.buffers[key] = buf
        return buf[:rows]


class TorchTeacher:
    """``teacher(batch)``: numpy in, the module run on the device, numpy out (see the module docstring).

    ``build()`` makes the module (on the CPU; it is moved to the device here);
    ``forward(module, inputs)`` takes the inputs as device tensors (the dtypes the
    feeds arrive in) and returns a dict of device tensors, one row per input row, in
    the dtypes to send (a bfloat16 output, which numpy cannot hold, is sent as
    float32).  Do on the device whatever shrinks the answer (a top-k, a softmax, a
    cast to float16): the wire carries only what ``forward`` returns.
    """

    def __init__(self, build: Callable[[], torch.nn.Module], forward: Forward, seed: int = 0,
                 device: torch.device | None = None, autocast: torch.dtype | None = torch.bfloat16) -> None:
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.forward = forward
        # bf16 autocast pays on tensor cores; on a CPU it is often slower than float32.
        self.autocast = autocast if self.device.type == "cuda" else None
        self._build, self._seed = build, seed
        self._module: torch.nn.Module | None = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def module(self) -> torch.nn.Module:
        """The module, built on first use (once, whichever thread asks first)."""
        if self._module is None:
            with self._lock:
                if self._module is None:
                    with torch.random.fork_rng(devices=[]):  # the same weights in every process
                        torch.manual_seed(self._seed)
                        module = self._build()
                    module = module.eval().requires_grad_(False).to(self.device)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)  # weights in place before any lane's stream reads them
                    self._module = module
        return self._module

    def _lane(self) -> _Lane:
        lane = getattr(self._local, "lane", None)
        if lane is None:
            lane = self._local.lane = _Lane(self.device)
        return lane

    def __call__(self, batch: Arrays) -> Arrays:
        module, lane = self.module(), self._lane()
        try:
            with (torch.cuda.stream(lane.stream),  # a no-op without CUDA (stream None)
                  torch.inference_mode(),
                  torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                 enabled=self.autocast is not None)):
                inputs = {}
                for name, array in batch.items():
                    host = lane.staging("in:" + name, len(array), tuple(array.shape[1:]), torch_dtype(array.dtype))
                    np.copyto(host.numpy(), array)  # the frames zdistill received are not pinned: one copy
                    inputs[name] = host.to(self.device, non_blocking=True)
                staged = {}
                for name, tensor in self.forward(module, inputs).items():
                    if tensor.dtype == torch.bfloat16:
                        tensor = tensor.float()
                    host = lane.staging("out:" + name, tensor.shape[0], tuple(tensor.shape[1:]), tensor.dtype)
                    host.copy_(tensor, non_blocking=True)
                    staged[name] = host
        finally:
            # Also after a failure: the next call rewrites the staging buffers, which
            # copies still queued on the stream would otherwise read.
            if lane.stream is not None:
                lane.stream.synchronize()
        # Views of the staging buffers, which this thread's next call overwrites: the
        # teacher copies every output before the function can run again on this thread.
        return {name: host.numpy() for name, host in staged.items()}
