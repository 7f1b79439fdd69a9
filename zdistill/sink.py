"""The sink's reorder buffer: finished tasks in, the reader's order out, each task once.

Tasks finish out of order (several workers, several teachers) and can finish twice
(a task sent again after a timeout whose first answer then arrives too).  The buffer
keeps each task id once, drops ids already yielded, and releases only the next id.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    """Holds finished tasks of one epoch until every earlier task has been yielded."""

    def __init__(self) -> None:
        self._held: dict[int, T] = {}
        self.next_id = 0
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._held)

    def held_ids(self) -> list[int]:
        return sorted(self._held)

    def add(self, task_id: int, value: T) -> bool:
        """Keep ``value``; False (and counted) if this task was already seen."""
        if task_id < self.next_id or task_id in self._held:
            self.duplicates += 1
            return False
        self._held[task_id] = value
        return True

    def pop_next(self) -> T | None:
        """The next task in order, or None if it has not finished yet."""
        value = self._held.pop(self.next_id, None)
        if value is not None:
            self.next_id += 1
        return value
