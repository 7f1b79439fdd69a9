"""The MNIST example's parts this example reuses, imported rather than copied.

``data``: :class:`~data.EpochReader`, the sample-list readers' base; ``models``: the
training loop with its progress bar (``train_epochs``), the distillation loss and the
tempered soft labels, ``History``; ``report``: the verdict sentence, ``results.json`` and
the curves; ``mnist_demo`` (its ``demo.py``): the child processes stopped by PID, and
starting ``zdistill-teacher``. The MNIST folder goes on ``sys.path`` right after this one,
so this folder's modules win and no installed package of the same name hides the MNIST ones;
its ``demo.py`` is loaded under another name because this folder has a ``demo.py`` too.
``data`` is numpy only and imported at once; the rest imports Paddle, so it is loaded when
first asked for and the language needs no Paddle.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))
MNIST_DIR = os.path.join(os.path.dirname(HERE), "mnist_distill")
if MNIST_DIR not in sys.path:
    sys.path.insert(sys.path.index(HERE) + 1 if HERE in sys.path else 0, MNIST_DIR)

import data  # noqa: E402,F401  (the MNIST example's, found through the path set above; re-exported)


def _load(name: str, filename: str) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(MNIST_DIR, filename))
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


def __getattr__(name: str) -> ModuleType:
    """``models``, ``report`` and ``mnist_demo``, imported on first use."""
    if name == "mnist_demo":
        return _load("mnist_demo", "demo.py")
    if name in ("models", "report"):
        return importlib.import_module(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

