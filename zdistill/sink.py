"""The sink: the training loop's side of an epoch.  It only reorders and yields.

Finished tasks reach it from the dispatcher (:mod:`zdistill.dispatcher`) in the order
teachers finish them; it puts them back in the reader's order
(:class:`ReorderBuffer`), lends the loop each task's slot arrays from shared memory
(:class:`SlotLender`) beside the predictions, and cuts them back into what EDL's
reader yields.  Everything else (resends, duplicates, slots, workers) is the
dispatcher's.
"""

from __future__ import annotations

import queue
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from zdistill import dispatcher as d
from zdistill import protocol
from zdistill.scheduler import cached_whole
from zdistill.shm import SlotReader
from zdistill.tasks import ReaderType, cached_key, predict_key, split_output

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    """Holds finished tasks of one epoch until every earlier task has been yielded."""

    def __init__(self) -> None:
        self._held: dict[int, T] = {}
        self.next_id = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, task_id: int, value: T) -> None:
        if task_id >= self.next_id:
            self._held[task_id] = value

    def pop_next(self) -> T | None:
        """The next task in order, or None if it has not finished yet."""
        value = self._held.pop(self.next_id, None)
        if value is not None:
            self.next_id += 1
        return value


class SlotLender:
    """Lends the training loop a task's slot arrays, and tells when it let go of them.

    Views cost nothing, but their slot stays taken while the loop holds them; a loop
    that keeps everything (``list(dr())``) would take every slot.  So past
    ``keep_limit`` slots lent, the loop gets copies and the slot is free at once.
    """

    def __init__(self, folder: str, release: Callable[[int], None]) -> None:
        self._reader = SlotReader(folder)
        self._release = release
        self.lent: set[int] = set()  # slots whose views the loop may still hold

    def lend(self, task: protocol.Task, keep_limit: int) -> dict[str, np.ndarray]:
        slot, arrays, mapping = self._reader.view(task.shm)
        if len(self.lent) < keep_limit:
            self.lent.add(slot)
            weakref.finalize(mapping, self._returned, slot)
            return arrays
        copies = {name: np.array(arr) for name, arr in arrays.items()}
        del arrays
        mapping.close()
        self._release(slot)
        return copies

    def _returned(self, slot: int) -> None:  # any thread: the finalizer of the slot's mapping
        self.lent.discard(slot)
        self._release(slot)


class EpochSink:
    """One epoch's outputs, in order, from the dispatcher's events."""

    def __init__(self, events: queue.SimpleQueue[d.Event], epoch: int, reader_type: ReaderType,
                 ins: Sequence[str], predicts: Sequence[str], lender: SlotLender, keep_limit: int,
                 check_open: Callable[[], None]) -> None:
        self.events, self.epoch, self.reader_type = events, epoch, reader_type
        self.check_open = check_open  # raises once the reader was closed (from another thread, say)
        self.ins, self.predicts = list(ins), list(predicts)
        self.lender, self.keep_limit = lender, keep_limit
        self.buffer: ReorderBuffer[d.Result] = ReorderBuffer()
        self.total: int | None = None
        self.wait_seconds = 0.0  # time the training loop spent waiting for data

    def outputs(self) -> Iterator[Any]:
        while self.total is None or self.buffer.next_id < self.total:
            self.check_open()  # at least every 0.1 s while it waits: nothing comes once the reader is closed
            result = self.buffer.pop_next()
            if result is None:
                self._wait()
                continue
            shared = self.lender.lend(result.task, self.keep_limit)
            slots = [shared[n] for n in self.ins]
            if cached_whole(result.task):  # answered from the cache: the predictions are in the slot
                preds = [shared[cached_key(n)] for n in self.predicts]
            else:
                preds = [result.arrays[predict_key(n)] for n in self.predicts]
            del shared
            yield from split_output(self.reader_type, slots, preds, result.task.sizes)

    def _wait(self) -> None:
        started = time.monotonic()
        try:
            event = self.events.get(timeout=0.1)
        except queue.Empty:
            return
        finally:
            self.wait_seconds += time.monotonic() - started
        while True:
            self._on_event(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def _on_event(self, event: d.Event) -> None:
        if event.epoch != self.epoch:
            return  # a late word of an epoch that ended
        if isinstance(event, d.Result):
            self.buffer.add(event.task.task, event)
        elif isinstance(event, d.Finished):
            self.total = event.tasks
        elif isinstance(event, d.Failed):
            raise event.error
