"""Task slots in shared memory: the student's own bytes never cross a socket twice.

The producer builds each task's arrays directly in a memory-mapped slot file (under
``/dev/shm`` where it has room); only a small descriptor travels to the dispatcher and
the worker, which sends the feeds from that memory to its teacher (the one hop that must
carry them): two full copies through the kernel per task fewer than over sockets.

A slot whose task is bigger than its file gets a new, bigger file (a new *generation*);
readers map each file once and drop the mapping of an older generation, so memory stays
bounded by the number of slots.  Slot files outlive an epoch, so the next epoch writes
into pages that already exist instead of faulting in fresh ones (for big samples,
faulting is most of the producer's time).  ``posix_fallocate`` reserves a file's space
when it is made, so a full ``/dev/shm`` is a clear error then, never a SIGBUS later.

The training loop gets views of a slot (:meth:`SlotReader.view`): a private, copy-on-write
mapping, so it may write into its arrays without touching the file; the slot stays taken
while any of them lives (:mod:`zdistill.student.pipeline`).  A late worker may read a
reused slot: its answer is for a task already answered, and the dispatcher drops it.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from zdistill.errors import ConfigError, WireError
from zdistill.wire import check_dtype

_ALIGN = 64
# Map a slot file's pages in one go: each epoch's reader process maps the slots afresh, and
# populating them up front costs less than half of faulting them in page by page.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000 if sys.platform.startswith("linux") else 0)
_GROW = 1 << 20  # files grow in whole MiB, so ragged last tasks do not force a new file
_MAP_STEP = 64 << 10  # the reader process maps (and populates) of a slot file what its tasks use, in these steps
_NAME = re.compile(r"^s(\d+)-g(\d+)$")
_FOLDER = re.compile(r"^zdistill-(?:slots|ipc)-\d+-")
_LOCK = "owner.lock"  # in each private folder: its owner holds an exclusive flock on it for its life


class PrivateFolder:
    """A private (0700) folder of one pipeline, locked by its owner for the owner's whole life.

    The owner holds an exclusive ``flock`` on the folder's lock file until it removes
    the folder; a folder is reclaimed by anyone else only once that lock can be taken,
    which proves its owner gone: the PID in its name proves nothing, as another PID
    namespace (a sibling container sharing ``/tmp`` and ``/dev/shm``) does not see it.
    The lock's file descriptor is close-on-exec, so processes the owner starts (its
    workers) never hold it; a child it forks shares it (a lock belongs to the open file,
    not to a process), so the folder stays while such a child lives (and only the process
    that made the pipeline removes its folders, :func:`zdistill.student.pipeline._shutdown`).
    """

    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    def remove(self) -> None:
        """Remove the folder and let go of its lock (safe twice)."""
        if self._lock_fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = -1


def make_private_folder(kind: str, root: str | None = None) -> PrivateFolder:
    """A private (0700) folder for one pipeline, named by the owner's PID and locked by it.  First the
    folders of owners that died without cleaning up (``kill -9``) are reclaimed (:func:`reclaim`)."""
    root = root or tempfile.gettempdir()
    for name in os.listdir(root):
        if _FOLDER.match(name):
            reclaim(os.path.join(root, name))
    while True:
        path = tempfile.mkdtemp(prefix=f"zdistill-{kind}-{os.getpid()}-", dir=root)
        fd = _lock(path, create=True)
        if fd is not None:
            return PrivateFolder(path, fd)
        # A reclaimer took the folder between its making and its locking: it removes it.


def make_slot_folder(needed: int) -> PrivateFolder:
    """The folder for a pipeline's slot files: in RAM-backed ``/dev/shm`` when it has room for twice
    ``needed`` bytes, else in the temporary folder (the page cache keeps it nearly as fast)."""
    try:
        st = os.statvfs("/dev/shm")
        roomy = os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize > 2 * needed
    except OSError:
        roomy = False
    return make_private_folder("slots", "/dev/shm" if roomy else None)


def reclaim(folder: str, wait: float = 0.0) -> bool:
    """Remove a pipeline's folder if its owner is provably gone: nobody holds its lock.

    A folder without a lock file (in the making, or not a zdistill folder) is left as
    it is.  ``wait`` is how long to keep trying while the lock is held (a forked child
    of a dead owner may hold it a moment longer).  True if this call removed it.
    """
    deadline = time.monotonic() + wait
    while (fd := _lock(folder, create=False)) is None:
        if time.monotonic() >= deadline or not os.path.exists(os.path.join(folder, _LOCK)):
            return False
        time.sleep(0.02)
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _lock(folder: str, create: bool) -> int | None:
    """The descriptor of ``folder``'s lock file, locked by this call.

    None if its owner holds it or a reclaimer removed the folder meanwhile; any other
    failure is None too when looking at someone's folder (another user's, say), and
    raised when making one's own (``create``: out of file descriptors, say).
    """
    path = os.path.join(folder, _LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    except OSError as exc:
        if create and not isinstance(exc, FileNotFoundError):  # not found: a reclaimer removed the folder
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now, locked = os.stat(path, follow_symlinks=False), os.fstat(fd)
        if (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):  # not removed (and made again) meanwhile
            return fd
    except (FileNotFoundError, BlockingIOError):
        pass  # its owner holds the lock, or a reclaimer removed the folder meanwhile
    except OSError:
        if create:
            os.close(fd)
            raise
    os.close(fd)
    return None


Specs = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # a task's arrays: name -> (shape, dtype)


def _aligned(n: int, step: int = _ALIGN) -> int:
    return (n + step - 1) // step * step


class SlotWriter:
    """The producer's side: writable arrays inside a slot file per task, in the files of ``folder``
    (those an earlier epoch's writer left too)."""

    def __init__(self, folder: str, slots: int) -> None:
        self.folder = folder
        self._slots: dict[int, tuple[str, int, mmap.mmap | None]] = {}  # slot -> (file, size, mapping)
        self._generation = 0
        # oldest first: a slot's newest file is the one kept
        found = sorted((int(m[2]), int(m[1]), name) for name in os.listdir(folder) if (m := _NAME.match(name)))
        for generation, slot, name in found:
            self._generation = generation
            if slot < slots:  # a slot beyond this epoch's count stays as it is
                old = self._slots.get(slot)
                if old is not None:
                    os.unlink(os.path.join(folder, old[0]))
                self._slots[slot] = (name, os.path.getsize(os.path.join(folder, name)), None)

    def allocate(self, slot: int, specs: Specs) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Writable arrays for ``specs`` in ``slot``, and their descriptor."""
        layout, offset = [], 0
        for name, (shape, dtype) in specs.items():
            layout.append((name, shape, dtype, offset))
            offset = _aligned(offset + math.prod(shape) * dtype.itemsize)
        file_name, size, mapping = self._ensure(slot, max(offset, _ALIGN))
        arrays = {name: np.frombuffer(mapping, dtype=dtype, count=math.prod(shape), offset=off).reshape(shape)
                  for name, shape, dtype, off in layout}
        table = [[name, dtype.str, list(shape), off] for name, shape, dtype, off in layout]
        return arrays, {"file": file_name, "size": size, "arrays": table}

    def _ensure(self, slot: int, needed: int) -> tuple[str, int, mmap.mmap]:
        """The slot's file and size, and a mapping of its first ``needed`` bytes (in steps of 64 KiB):
        only what a task uses is populated, and torn down when this process exits."""
        name, size, mapping = self._slots.get(slot, ("", 0, None))
        if mapping is not None and len(mapping) >= needed:
            return name, size, mapping
        flags = os.O_RDWR  # a file an earlier epoch made, or one mapped short of this task
        if size < needed:  # a new generation: readers keep their mapping of the old file until they see it
            if name:
                os.unlink(os.path.join(self.folder, name))
            self._generation += 1
            name, size, flags = f"s{slot}-g{self._generation}", _aligned(needed, _GROW), flags | os.O_CREAT | os.O_EXCL
        path = os.path.join(self.folder, name)
        fd = os.open(path, flags, 0o600)
        try:
            if flags & os.O_CREAT:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    os.unlink(path)
                    raise ConfigError(
                        f"no room for a {size / 2**20:.0f} MiB task slot in {self.folder} ({exc.strerror}): "
                        "lower DistillReader.options.task_bytes / window, or give /dev/shm more space"
                    ) from None
            mapping = mmap.mmap(fd, min(size, _aligned(needed, _MAP_STEP)), flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
        self._slots[slot] = (name, size, mapping)
        return name, size, mapping


def _parse(descriptor: Mapping[str, Any]) -> tuple[int, str, int, Any]:
    try:
        name, size, table = str(descriptor["file"]), int(descriptor["size"]), descriptor["arrays"]
        slot = int(_NAME.match(name)[1])  # type: ignore[index]  # TypeError: not a slot file's name
    except (KeyError, TypeError, ValueError):
        raise WireError(f"bad shared-memory descriptor {descriptor!r:.120}") from None
    return slot, name, size, table


def _arrays(mapping: mmap.mmap, size: int, table: Any) -> dict[str, np.ndarray]:
    arrays = {}
    for key, dtype_str, shape, offset in table:
        dtype = check_dtype(np.dtype(dtype_str))
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and type(offset) is int):
            raise WireError(f"array {key!r} has a bad shape or offset in its descriptor")
        count = math.prod(shape)
        if offset < 0 or offset + count * dtype.itemsize > size:
            raise WireError(f"array {key!r} lies outside its slot file")
        arrays[key] = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)
    return arrays


class SlotReader:
    """A worker's or the student's side: views of a task's arrays."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._maps: dict[int, tuple[str, mmap.mmap]] = {}  # slot -> (file, mapping)

    def read(self, descriptor: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Read-only arrays of a descriptor (mappings cached); raises WireError if it does not describe its file."""
        slot, name, size, table = _parse(descriptor)
        held = self._maps.get(slot)
        if held is None or held[0] != name:  # the old generation's mapping goes with its last view
            held = self._maps[slot] = (name, self._open(name, size, mmap.ACCESS_READ))
        return _arrays(held[1], size, table)

    def view(self, descriptor: Mapping[str, Any]) -> tuple[int, dict[str, np.ndarray], mmap.mmap]:
        """The slot, and writable arrays of a descriptor in a private copy-on-write mapping of their own
        (no bytes are copied until someone writes), and the mapping: it lives as long as any of the
        arrays (or views of them) does, so a finalizer on it tells when the slot is free."""
        slot, name, size, table = _parse(descriptor)
        mapping = self._open(name, size, mmap.ACCESS_COPY)
        return slot, _arrays(mapping, size, table), mapping

    def _open(self, name: str, size: int, access: int) -> mmap.mmap:
        try:
            fd = os.open(os.path.join(self.folder, name), os.O_RDONLY)
        except FileNotFoundError:
            raise WireError(f"slot file {name} is gone (replaced by a bigger one)") from None
        try:
            if os.fstat(fd).st_size < size:
                raise WireError(f"slot file {name} is smaller than its descriptor says")
            return mmap.mmap(fd, size, access=access)
        finally:
            os.close(fd)
