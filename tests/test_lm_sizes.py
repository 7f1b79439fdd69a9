"""``examples/torch_teacher/lm_sizes.py``: which size of the example LM a teacher serves, from its real ``meta``.

The LM student (``student_lm.py``) takes its vocabulary and sequence length from this,
not from ``ZDISTILL_TORCH_TEACHER_SIZE``.  No PyTorch here: the teacher is a numpy
function with the tiny LM's feeds and fetches, served by a real ``zdistill-teacher``.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests import procs
from zdistill import TeacherClient

EXAMPLE = procs.REPO / "examples" / "torch_teacher"


def lm_sizes() -> ModuleType:
    if "torch_teacher_lm_sizes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("torch_teacher_lm_sizes", EXAMPLE / "lm_sizes.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["torch_teacher_lm_sizes"] = module  # before it runs: its dataclass looks itself up there
        spec.loader.exec_module(module)
    return sys.modules["torch_teacher_lm_sizes"]


def served_meta(teacher: procs.Proc) -> dict:
    client = TeacherClient(teacher.endpoint, timeout=10)
    try:
        return client.meta()
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_a_tiny_teacher_is_known_as_tiny_whatever_the_students_environment(start_teacher, monkeypatch):
    monkeypatch.delenv("ZDISTILL_TORCH_TEACHER_SIZE", raising=False)  # the student's own: unset
    sizes = lm_sizes()
    teacher = start_teacher(f"{procs.TEACHERS}:tiny_lm_topk")
    size = sizes.served_size(served_meta(teacher), teacher.endpoint)
    assert size == sizes.SIZES["tiny"]
    assert (size.vocab, size.seq) == (512, 16)


@pytest.mark.timeout(60)
def test_a_variable_length_teacher_that_names_no_size_is_an_error(start_teacher):
    teacher = start_teacher(f"{procs.TEACHERS}:per_token")
    with pytest.raises(ValueError, match=r"not the variable-length 'tokens' of a size of lm_teacher \(full, tiny\)"):
        lm_sizes().served_size(served_meta(teacher), teacher.endpoint)


@pytest.mark.timeout(60)
def test_a_teacher_of_no_lm_size_is_an_error_naming_it(start_teacher):
    teacher = start_teacher()  # softmax over 784-float images: no tokens at all
    with pytest.raises(ValueError, match=r"takes feeds \{'img': \[784\]\} .*not the variable-length 'tokens'"):
        lm_sizes().served_size(served_meta(teacher), teacher.endpoint)
