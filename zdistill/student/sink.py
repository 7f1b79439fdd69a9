"""The sink: the training loop's side of an epoch.  It only reorders and yields.

Finished tasks reach it from the dispatcher (:mod:`zdistill.student.dispatcher`) in the order
teachers finish them; it puts them back in the reader's order
(:class:`ReorderBuffer`), lends the loop each task's slot arrays from shared memory
(:class:`SlotLender`) beside the predictions, and cuts them back into what EDL's
reader yields.  Everything else (resends, duplicates, slots, workers) is the
dispatcher's.
"""

from __future__ import annotations

import itertools
import queue
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from zdistill.student import dispatcher as d
from zdistill.student import protocol
from zdistill.student.batches import CacheSlots, ReaderType, predict_key, slot_forms, slot_tensors, split_output
from zdistill.student.cache import CacheGate
from zdistill.student.shm import SlotReader

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

    def again(self, task_id: int) -> None:
        """The task just popped was not yielded: wait for another answer of it."""
        self.next_id = task_id


class SlotLender:
    """Lends the training loop a task's slot arrays, and tells when it let go of them.

    Views cost nothing, but their slot stays taken while the loop holds them; a loop
    that keeps everything (``list(dr())``) would take every slot.  So past
    ``keep_limit`` slots lent, the loop gets copies and the slot is free at once.
    """

    def __init__(self, folder: str, release: Callable[[int], None]) -> None:
        self._slot_reader = SlotReader(folder)
        self._release = release
        self.lent: set[int] = set()  # slots whose views the loop may still hold

    def lend(self, task: protocol.Task, keep_limit: int, hold: bool = False) -> dict[str, np.ndarray]:
        """The task's slot arrays: views, or copies past ``keep_limit``.  With ``hold`` a copied
        task's slot stays taken until :meth:`give_back` (a teacher may have to read it again)."""
        slot, arrays, mapping = self._slot_reader.view(task.shm)
        if len(self.lent) < keep_limit:
            self.lent.add(slot)
            weakref.finalize(mapping, self._returned, slot)
            return arrays
        copies = {name: np.array(arr) for name, arr in arrays.items()}
        del arrays
        mapping.close()
        if not hold:
            self._release(slot)
        return copies

    def give_back(self, task: protocol.Task) -> None:
        """A task lent with ``hold`` is yielded: its slot is free, unless the loop holds views of it."""
        if task.slot not in self.lent:
            self._release(task.slot)

    def _returned(self, slot: int) -> None:  # any thread: the finalizer of the slot's mapping
        self.lent.discard(slot)
        self._release(slot)


class EpochSink:
    """One epoch's outputs, in order, from the dispatcher's events."""

    def __init__(self, events: queue.SimpleQueue[d.Event], epoch: int, reader_type: ReaderType,
                 ins: Sequence[str], predicts: Sequence[str], lender: SlotLender, keep_limit: int,
                 check_open: Callable[[], None], gate: CacheGate | None = None,
                 redo: Callable[[protocol.Task], None] | None = None) -> None:
        self.events, self.epoch, self.reader_type = events, epoch, reader_type
        self.check_open = check_open  # raises once the reader was closed (from another thread, say)
        self.gate, self.redo = gate, redo  # the cache's gate; asks the dispatcher to have a task answered again
        self.ins, self.predicts = list(ins), list(predicts)
        self.lender, self.keep_limit = lender, keep_limit
        self.buffer: ReorderBuffer[d.Answered] = ReorderBuffer()
        self.total: int | None = None
        self.wait_seconds = 0.0  # time the training loop spent waiting for data

    def outputs(self) -> Iterator[Any]:
        while self.total is None or self.buffer.next_id < self.total:
            self.check_open()  # at least every 0.1 s while it waits: nothing comes once the reader is closed
            result = self.buffer.pop_next()
            if result is None:
                self._wait()
                continue
            yield from self._task_outputs(self._trusted(result))

    def _task_outputs(self, result: d.Answered) -> Iterator[Any]:
        """One task's reader batches with their predictions.

        A task with cached rows keeps its slot until its last batch is yielded: should the
        cache turn out to hold another model's answers meanwhile (the gate closes), the
        batches not yet yielded get a teacher's answers instead (:meth:`_trusted`), and the
        teacher reads the rows from the slot.
        """
        cached = bool(result.cached)
        shared = self.lender.lend(result.task, self.keep_limit, hold=cached)
        slots = list(slot_tensors(shared, self.ins).values())
        forms = [slot_forms(shared, n) for n in self.ins]
        if isinstance(result, d.CachedAnswer):
            answers = CacheSlots.of(shared).answers
            preds = [answers[n] for n in self.predicts]
        else:
            preds = [result.arrays[predict_key(n)] for n in self.predicts]
        del shared
        if not cached:
            yield from split_output(self.reader_type, slots, preds, result.task.sizes, forms)
            return
        yielded = 0
        try:
            while True:
                for batch in itertools.islice(split_output(self.reader_type, slots, preds, result.task.sizes, forms),
                                              yielded, None):
                    if self._untrusted(result):
                        break
                    yield batch
                    yielded += 1
                else:
                    return
                result = self._trusted(result)
                assert isinstance(result, d.Answer)  # a task asked again is answered by a teacher
                preds = [result.arrays[predict_key(n)] for n in self.predicts]
        finally:
            self.lender.give_back(result.task)

    def _untrusted(self, result: d.Answered) -> bool:
        """Its predictions hold cached rows, and the cache is no longer trusted."""
        return bool(result.cached) and self.gate is not None and self.gate.closed

    def _trusted(self, result: d.Answered) -> d.Answered:
        """``result``, or, if it holds cached rows no longer trusted, a teacher's answer of the task."""
        while self._untrusted(result) and self.redo is not None:
            task_id = result.task.task_id
            self.buffer.again(task_id)
            self.redo(result.task)
            again = None
            while again is None:
                self.check_open()
                self._wait()
                again = self.buffer.pop_next()
            result = again
        return result

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
        if isinstance(event, d.Answer | d.CachedAnswer):
            self.buffer.add(event.task.task_id, event)
        elif isinstance(event, d.AllAnswered):
            self.total = event.tasks
        elif isinstance(event, d.Failed):
            raise event.error
