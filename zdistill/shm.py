"""Task slots in shared memory: the student's own bytes never cross a socket twice.

The reader process builds each task's arrays directly in a memory-mapped file (under
``/dev/shm`` where it exists); only a small descriptor travels to the worker and on
to the sink.  The worker sends the feed slots from that memory to its teacher (the
one hop that must carry them) and the student reads the slots back from it.  Compared
with moving the arrays over sockets this saves two full copies through the kernel per
task, which is most of what a pipeline hop costs.

Slots are reused round-robin: task ``t`` lives in slot ``t % window``, which is free
because the credit window lets task ``t`` exist only once task ``t - window`` has
been consumed.  A slot whose task is bigger than its file gets a new, bigger file (a
new *generation*); readers map each file once and drop mappings of older generations
and epochs, so memory stays bounded by the window.

A worker that is late with a task the student already consumed may read a reused
slot; its answer is for a task id the sink already yielded, so it is dropped.  The
student copies slot data out before it credits the task, since the training loop
may keep the arrays it was given.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from zdistill.errors import WireError
from zdistill.wire import check_dtype

_ALIGN = 64
_GROW = 1 << 20  # files grow in whole MiB, so ragged last tasks do not force a new file


def shm_root() -> str | None:
    """Where slot files go: RAM-backed ``/dev/shm`` if present (else the pipeline's folder)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class SlotWriter:
    """The reader process's side: hands out writable arrays inside a slot file per task."""

    def __init__(self, folder: str, epoch: int, window: int) -> None:
        self.folder, self.epoch, self.window = folder, epoch, window
        self._slots: dict[int, tuple[str, int, mmap.mmap]] = {}  # slot -> (file name, size, mapping)
        self._generation = 0

    def allocate(self, task_id: int, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> tuple[
        dict[str, np.ndarray], dict[str, Any]
    ]:
        """Writable arrays for ``specs`` (name -> (shape, dtype)) in this task's slot, and its descriptor."""
        layout, offset = [], 0
        for name, (shape, dtype) in specs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            layout.append((name, shape, dtype, offset))
            offset = _aligned(offset + nbytes)
        slot = task_id % self.window
        file_name, size, mapping = self._ensure(slot, max(offset, _ALIGN))
        arrays = {
            name: np.frombuffer(mapping, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=off).reshape(
                shape
            )
            for name, shape, dtype, off in layout
        }
        descriptor = {
            "file": file_name,
            "size": size,
            "arrays": [[name, dtype.str, list(shape), off] for name, shape, dtype, off in layout],
        }
        return arrays, descriptor

    def _ensure(self, slot: int, needed: int) -> tuple[str, int, mmap.mmap]:
        held = self._slots.get(slot)
        if held is not None and held[1] >= needed:
            return held
        if held is not None:  # readers keep their mapping of the old file until they see the new one
            os.unlink(os.path.join(self.folder, held[0]))
        self._generation += 1
        size = (needed + _GROW - 1) // _GROW * _GROW
        name = f"e{self.epoch}-s{slot}-g{self._generation}"
        fd = os.open(os.path.join(self.folder, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._slots[slot] = (name, size, mapping)
        return self._slots[slot]


class SlotReader:
    """A worker's or the student's side: read-only views of a task's arrays, mappings cached."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._maps: dict[tuple[int, int], tuple[str, mmap.mmap]] = {}  # (epoch, slot) -> (file, mapping)
        self._epoch = -1

    def read(self, descriptor: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The arrays a descriptor names; raises WireError if it does not describe its file."""
        try:
            name, size, table = str(descriptor["file"]), int(descriptor["size"]), descriptor["arrays"]
            epoch, slot, _ = (int(part[1:]) for part in name.split("-"))
        except (KeyError, TypeError, ValueError):
            raise WireError(f"bad shared-memory descriptor {descriptor!r:.120}") from None
        mapping = self._map(epoch, slot, name, size)
        arrays = {}
        for key, dtype_str, shape, offset in table:
            dtype = check_dtype(np.dtype(dtype_str))
            count = int(np.prod(shape, dtype=np.int64))
            if offset < 0 or offset + count * dtype.itemsize > size:
                raise WireError(f"array {key!r} lies outside its slot file")
            arrays[key] = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)
        return arrays

    def _map(self, epoch: int, slot: int, name: str, size: int) -> mmap.mmap:
        if epoch > self._epoch:  # a new epoch: the old one's files are gone or going
            self._maps = {k: v for k, v in self._maps.items() if k[0] >= epoch}
            self._epoch = epoch
        held = self._maps.get((epoch, slot))
        if held is not None and held[0] == name:
            return held[1]
        try:
            fd = os.open(os.path.join(self.folder, name), os.O_RDONLY)
        except FileNotFoundError:
            raise WireError(f"slot file {name} is gone (a task of an epoch that ended)") from None
        try:
            if os.fstat(fd).st_size < size:
                raise WireError(f"slot file {name} is smaller than its descriptor says")
            mapping = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._maps[(epoch, slot)] = (name, mapping)  # the old generation's mapping goes with its last view
        return mapping
