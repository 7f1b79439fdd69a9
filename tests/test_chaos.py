"""The short chaos run: kills of a teacher, a worker, the balancer and Redis in one epoch."""

from __future__ import annotations

from tests import chaos


def test_short_chaos_run_loses_nothing():
    result = chaos.run(samples=20_000, seed=3, events=4, n_teachers=3, batch=64, teacher_delay_ms=10)
    assert {e["kind"] for e in result["events"]} == set(chaos.KINDS)  # each kind of failure happened
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert result["out_of_order"] == 0
    assert result["wrong_predictions"] == 0
