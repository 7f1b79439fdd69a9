"""Slot files: what the reader process writes is what workers and the student read.

The reader process maps of a slot file only what its tasks use, so a later task of the
same slot that needs more is mapped again, and one that needs more than the file holds
gets a file of a new generation.
"""

from __future__ import annotations

import os

import numpy as np

from zdistill.student.shm import SlotReader, SlotWriter

ROW = np.dtype(np.float32)


def written(writer: SlotWriter, slot: int, rows: int, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """A task of ``rows`` rows of 784 floats built in ``slot``: the values, and the slot's descriptor."""
    arrays, descriptor = writer.allocate(slot, {"img": ((rows, 784), ROW), "label": ((rows,), np.dtype(np.int64))})
    values = {"img": np.random.default_rng(seed).random((rows, 784), dtype=np.float32),
              "label": np.arange(rows, dtype=np.int64) + seed}
    for name, arr in values.items():
        arrays[name][:] = arr
    return values, descriptor


def test_a_slot_reused_by_bigger_tasks_reads_back_what_was_written(tmp_path) -> None:
    writer, reader = SlotWriter(str(tmp_path), 2), SlotReader(str(tmp_path))
    for rows, seed in ((16, 1), (300, 2), (200, 3), (600, 4)):  # 50 KB, then 0.9 MB (remapped), then 1.9 MB: a new file
        values, descriptor = written(writer, 0, rows, seed)
        got = reader.read(descriptor)
        for name, arr in values.items():
            np.testing.assert_array_equal(got[name], arr)
    assert sorted(os.listdir(tmp_path)) == [descriptor["file"]]  # the older generation is gone

    again = SlotWriter(str(tmp_path), 2)  # the next epoch's reader process adopts the file
    values, descriptor = written(again, 0, 500, 5)
    assert descriptor["file"] == sorted(os.listdir(tmp_path))[0]
    _, view, mapping = reader.view(descriptor)
    for name, arr in values.items():
        np.testing.assert_array_equal(view[name], arr)
    del view
    mapping.close()
