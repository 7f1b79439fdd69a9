"""Loading what ``zdistill-teacher --model`` names: a Python teacher function or a saved Paddle model.

Apart from :mod:`zdistill.teacher.model` so that the model interface never imports the
Paddle model that implements it: Paddle is imported here, and only when a Paddle model
is asked for, so ``import zdistill`` never pulls it in.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from zdistill.errors import ConfigError
from zdistill.spec import check_model_id
from zdistill.teacher.model import CallableModel, Model


def _load_callable(target: str, device: str, model_id: str | None = None) -> CallableModel:
    where, _, attr = target.rpartition(":")
    if not attr:
        raise ConfigError(f"--model {target!r} names no function: give it after the colon, as {where}:function")
    if where.endswith(".py") or os.sep in where:
        if not os.path.isfile(where):
            raise ConfigError(f"model file {where!r} does not exist")
        name = "zdistill_user_model_" + os.path.splitext(os.path.basename(where))[0]
        spec = importlib.util.spec_from_file_location(name, where)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load {where!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # any failure of user code at import is a bad --model, not a crash
            del sys.modules[name]
            raise ConfigError(f"cannot load model file {where!r}: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ConfigError(f"cannot import module {where!r} for the model: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where!r} has no callable named {attr!r}")
    return CallableModel(fn, target, device, model_id)


def load_model(target: str, gpu_ids: Sequence[int] = (), threads: int = 1, model_id: str | None = None,
               lengths_input: str | None = None, mask_input: str | None = None) -> Model:
    """Load ``target``: ``module:function`` / ``file.py:function``, or a saved Paddle model.

    A Paddle model is given as its path prefix, its ``.json`` / ``.pdmodel`` file, or a
    folder holding exactly one model.  ``model_id`` (``--model-id``) replaces the id the
    model would derive from its files (see :class:`Model`).  ``lengths_input`` and
    ``mask_input`` (``--lengths-input`` / ``--mask-input``) name a Paddle model's inputs
    the teacher fills from each row's length (:class:`~zdistill.teacher.paddle_model.PaddleModel`).
    """
    if model_id is not None:
        check_model_id(model_id)  # before loading: a bad flag fails fast, not after minutes of loading
    if ":" in target and not os.path.exists(target):
        if lengths_input is not None or mask_input is not None:
            # a function receives each row's length itself; there is no model input to fill
            raise ConfigError(f"--lengths-input and --mask-input name inputs of a saved Paddle model; {target!r} is "
                              "a Python function, which is given each row's length itself")
        return _load_callable(target, f"gpu:{gpu_ids[0]}" if gpu_ids else "cpu", model_id)
    if target.endswith(".py"):
        raise ConfigError(f"--model {target!r} is a Python file: name the teacher function too, as {target}:function")
    from zdistill.teacher.paddle_model import PaddleModel  # Paddle only when a Paddle model is served

    return PaddleModel(target, gpu_ids=gpu_ids, threads=threads, model_id=model_id, lengths_input=lengths_input,
                       mask_input=mask_input)
