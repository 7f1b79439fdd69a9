"""Shared fixtures: real teacher processes and a private redis-server, stopped by PID."""

from __future__ import annotations

import pytest

from tests import procs


@pytest.fixture
def start_teacher(tmp_path):
    """Factory: ``start_teacher("tests/teachers.py:softmax", *flags)`` -> running Proc."""
    started: list[procs.Proc] = []

    def _start(model: str = f"{procs.TEACHERS}:softmax", *extra: str, **kw) -> procs.Proc:
        proc = procs.start_teacher(model, tmp_path, *extra, **kw)
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        proc.stop()


@pytest.fixture
def redis_server():
    """A private redis-server for one test; ``.extra['port']``, ``.endpoint``."""
    proc = procs.start_redis()
    yield proc
    proc.stop()
