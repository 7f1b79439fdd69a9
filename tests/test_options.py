"""PipelineOptions checks every knob where it is set: at construction and at each later assignment.

``DistillReader.options`` is shared and changed live, so a bad value must fail at the
line that set it, naming the knob, rather than stall or divide by zero inside the pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from zdistill import DistillReader
from zdistill.errors import ConfigError
from zdistill.student.options import PipelineOptions

KNOBS = [f.name for f in dataclasses.fields(PipelineOptions)]
MAY_BE_ZERO = {"max_retries", "teacher_wait", "straggler_min"}


def test_the_defaults_pass_their_own_checks() -> None:
    options = PipelineOptions()
    for name in KNOBS:
        setattr(options, name, getattr(options, name))
    assert options == PipelineOptions()


@pytest.mark.parametrize("name", KNOBS)
def test_a_negative_or_mistyped_knob_is_a_config_error_at_the_assignment(name: str) -> None:
    options = PipelineOptions()
    before = getattr(options, name)
    for bad in (-1, "8", True, math.nan, [1]):
        with pytest.raises(ConfigError, match=f"PipelineOptions.{name} "):
            setattr(options, name, bad)
    assert getattr(options, name) == before  # a refused value is not kept
    with pytest.raises(ConfigError, match=name):
        PipelineOptions(**{name: -1})


@pytest.mark.parametrize("name", KNOBS)
def test_zero_is_refused_unless_it_means_something(name: str) -> None:
    options = PipelineOptions()
    if name in MAY_BE_ZERO:
        setattr(options, name, 0)
        assert getattr(options, name) == 0
    else:
        with pytest.raises(ConfigError, match="more than 0"):
            setattr(options, name, 0)


@pytest.mark.parametrize(("name", "value", "kept"), [
    ("window", np.int64(32), 32),  # a numpy int is an int
    ("request_timeout", 2, 2.0),  # an int is a number of seconds
    ("task_seconds", np.float32(0.5), 0.5),
    ("max_in_flight", None, None),  # None: no cap
    ("max_in_flight", 4, 4),
])
def test_a_good_value_is_kept_as_the_knob_type(name: str, value: Any, kept: Any) -> None:
    options = PipelineOptions()
    setattr(options, name, value)
    assert getattr(options, name) == kept and type(getattr(options, name)) is type(kept)


def test_a_misspelt_knob_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no knob 'windows'"):
        PipelineOptions().windows = 4  # type: ignore[attr-defined]


def test_a_readers_options_are_checked_where_the_user_sets_them() -> None:
    reader = DistillReader(ins=["x"], predicts=["y"])
    with pytest.raises(ConfigError, match="window"):
        reader.options.window = 0
    with pytest.raises(ConfigError, match="request_timeout"):
        reader.options.request_timeout = -5.0
    assert reader.options.window == PipelineOptions().window


def test_share_weight_stays_within_what_a_teacher_accepts() -> None:
    options = PipelineOptions()
    for bad in (0.001, 101):
        with pytest.raises(ConfigError, match="share_weight must be from 0.01 to 100"):
            options.share_weight = bad
    options.share_weight = 2
    assert options.share_weight == 2.0
