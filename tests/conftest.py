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


@pytest.fixture
def store(redis_server):
    """The zdistill store on the test's private Redis."""
    from zdistill.discovery.store import Store

    s = Store.open(redis_server.endpoint)
    yield s
    s.close()


@pytest.fixture
def stopper():
    """Processes a test starts itself (several on one port), all stopped by PID at the end."""
    started: list[procs.Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def clients():
    """DiscoveryClients a test makes, all closed at the end."""
    made: list = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def programs():
    """``programs(args, *prefix, **kw)``: a :class:`procs.Program` (JSON lines out), stopped by PID at the end."""
    started: list[procs.Program] = []

    def _start(args: list[str], *prefix: str, **kw) -> procs.Program:
        program = procs.Program(args, *prefix, **kw)
        started.append(program)
        return program

    yield _start
    for program in started:
        program.stop()
