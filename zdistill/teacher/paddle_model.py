"""A saved Paddle inference model, run with ``paddle.inference``.

Paddle 3's ``paddle.jit.save`` writes ``prefix.json`` (a PIR program) and
``prefix.pdiparams``; Paddle 2 wrote ``prefix.pdmodel`` (a protobuf program).  The
predictor reports input *names* but not their shapes or dtypes before a run, so the
feeds are read from the program file itself (the ``data`` ops of a PIR program, the
``feed`` targets of a protobuf one), and the fetches from a warm-up run.  Output
names are whatever the predictor reports (``fetch_name_0`` for Paddle 3 models).
The model id is a hash of the program and parameters files (:func:`model_files_id`).
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from zdistill.errors import ConfigError
from zdistill.spec import Arrays, TensorSpec, check_model_id
from zdistill.teacher.model import check_outputs

log = logging.getLogger(__name__)

_PB_DTYPES = {
    "BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "INT16": "int16", "INT32": "int32",
    "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
}


def resolve_model_files(target: str) -> tuple[str, str]:
    """Return ``(program_file, params_file)`` for a prefix, a program file or a folder."""
    if os.path.isdir(target):
        found = sorted(glob.glob(os.path.join(target, "*.json")) + glob.glob(os.path.join(target, "*.pdmodel")))
        prefixes = {os.path.splitext(f)[0] for f in found if os.path.exists(os.path.splitext(f)[0] + ".pdiparams")}
        if len(prefixes) != 1:
            found_text = sorted(prefixes) or "none"
            raise ConfigError(f"folder {target!r} must hold exactly one saved model, found {found_text}")
        target = prefixes.pop()
    prefix, ext = os.path.splitext(target)
    if ext not in (".json", ".pdmodel", ".pdiparams"):
        prefix = target
    for program in (prefix + ".json", prefix + ".pdmodel"):
        if (ext in ("", ".pdiparams") or program == target) and os.path.isfile(program):
            params = prefix + ".pdiparams"
            if not os.path.isfile(params):
                raise ConfigError(f"model {program!r} has no parameters file {params!r}")
            return program, params
    raise ConfigError(
        f"no saved Paddle model at {target!r}: expected {prefix}.json (Paddle 3) or {prefix}.pdmodel "
        "(Paddle 2) beside a .pdiparams file, or module:function for a Python teacher"
    )


def model_files_id(program_file: str, params_file: str, chunk_bytes: int = 8 << 20) -> str:
    """The model id of a saved Paddle model: ``paddle:`` + 32 hex digits of a hash of both files' bytes.

    Any change to the program or the parameters changes it; where the files lie does
    not.  Read in chunks: a parameters file may take gigabytes.
    """
    h = hashlib.blake2b(digest_size=16)
    for path in (program_file, params_file):
        try:
            with open(path, "rb") as f:
                h.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))  # where one file ends and the next begins
                for chunk in iter(lambda: f.read(chunk_bytes), b""):
                    h.update(chunk)
        except OSError as exc:
            raise ConfigError(f"cannot read {path} to derive the model id: {exc.strerror or exc}") from None
    return "paddle:" + h.hexdigest()


def _files_state(*paths: str) -> list[tuple[int, int, int, int]]:
    """What tells a replaced or rewritten file apart: device, inode, size, modification time."""
    state = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        state.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return state


def read_feed_specs(program_file: str, names: Sequence[str]) -> list[TensorSpec]:
    """Read each input's dtype and per-row shape from the saved program."""
    found: dict[str, tuple[str, list[int]]] = {}
    if program_file.endswith(".json"):
        with open(program_file) as f:
            _collect_pir_data_ops(json.load(f), found)
    else:
        from paddle.base.proto import framework_pb2

        with open(program_file, "rb") as f:
            program = framework_pb2.ProgramDesc.FromString(f.read())
        for var in program.blocks[0].vars:
            tensor = var.type.dense_tensor.tensor
            dtype = _PB_DTYPES.get(framework_pb2.VarType.Type.Name(tensor.data_type))
            if var.name in names and dtype:
                found[var.name] = (dtype, list(tensor.dims))
    specs = []
    for name in names:
        if name not in found:
            raise ConfigError(f"cannot read the shape and dtype of input {name!r} from {program_file}")
        dtype, dims = found[name]
        specs.append(TensorSpec(name, dtype, tuple(int(d) for d in dims[1:])))
    return specs


def _collect_pir_data_ops(node: Any, found: dict[str, tuple[str, list[int]]]) -> None:
    """Walk a PIR json program and record the name, dtype and shape of each ``data`` op."""
    if isinstance(node, dict):
        if str(node.get("#", "")).endswith(".data"):
            attrs = {a.get("N"): a.get("AT", {}).get("D") for a in node.get("A", []) if isinstance(a, dict)}
            if isinstance(attrs.get("name"), str) and isinstance(attrs.get("shape"), list):
                found[attrs["name"]] = (str(attrs.get("dtype")), attrs["shape"])
        for value in node.values():
            _collect_pir_data_ops(value, found)
    elif isinstance(node, list):
        for value in node:
            _collect_pir_data_ops(value, found)


class PaddleModel:
    """One ``paddle.inference`` predictor: on a GPU when asked and available, else CPU + oneDNN.

    A predictor must not run in two threads at once; each model instance of the teacher
    is a :meth:`clone` with a predictor of its own, so the instances are thread-safe.
    ``model_id`` is ``model_id`` when given (``--model-id``), else :func:`model_files_id`
    of the files, computed once, here (clones share it).
    """

    thread_safe = True

    def __init__(self, target: str, gpu_ids: Sequence[int] = (), threads: int = 1,
                 model_id: str | None = None) -> None:
        program, params = resolve_model_files(target)  # before importing Paddle: a wrong path is the common error
        files_before = _files_state(program, params)
        self.model_id = check_model_id(model_id) if model_id is not None else model_files_id(program, params)
        try:
            import paddle
            from paddle import inference
        except ImportError as exc:
            raise ConfigError(
                f"serving the Paddle model {program} needs paddlepaddle (pip install 'zdistill[paddle]'): {exc}"
            ) from None

        config = inference.Config(program, params)
        config.disable_glog_info()
        if gpu_ids and paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
            if len(gpu_ids) > 1:
                log.warning("one teacher process serves one GPU: using GPU %d; start one teacher per GPU", gpu_ids[0])
            config.enable_use_gpu(256, int(gpu_ids[0]))
            self.device = f"gpu:{gpu_ids[0]}"
        else:
            if gpu_ids:
                log.warning("--gpu-ids given but this Paddle has no CUDA device: serving on the CPU")
            config.disable_gpu()
            config.enable_mkldnn()
            config.set_cpu_math_library_num_threads(max(1, threads))
            self.device = "cpu"
        try:
            self._bind(inference.create_predictor(config))
        except Exception as exc:  # Paddle raises its own types for a corrupt or incompatible program
            raise ConfigError(f"Paddle cannot load {program}: {type(exc).__name__}: {exc}") from None
        self.feeds = read_feed_specs(program, list(self._inputs))
        if model_id is None and _files_state(program, params) != files_before:
            # the id might name other bytes than those loaded: a student would cache this
            # model's answers under another model's id
            raise ConfigError(f"{program} or {params} changed while the teacher loaded it: start the teacher again")
        self.origin = f"Paddle model {program}"
        warm = self._predict({spec.name: spec.example(1) for spec in self.feeds})
        self.fetches = [TensorSpec(n, a.dtype.name, tuple(a.shape[1:])) for n, a in warm.items()]
        self.description = f"paddle inference model {program} (Paddle {paddle.__version__})"

    def clone(self) -> PaddleModel:
        """Another predictor for another thread: Paddle's ``clone()`` shares the weights (one
        copy in memory, on the GPU too) and gives the clone its own input, output and
        intermediate tensors, so the instances can run at the same time."""
        twin = copy.copy(self)
        twin._bind(self._predictor.clone())
        return twin

    def _bind(self, predictor: Any) -> None:
        self._predictor = predictor
        self._inputs = {n: predictor.get_input_handle(n) for n in predictor.get_input_names()}
        self._outputs = {n: predictor.get_output_handle(n) for n in predictor.get_output_names()}

    def run(self, feeds: Arrays, lengths: np.ndarray | None = None) -> Arrays:
        """The predictor's outputs, checked against the fetches its first run showed.

        ``copy_to_cpu()`` returns fresh arrays, so the outputs are the caller's as they are.
        """
        rows = len(next(iter(feeds.values())))
        return check_outputs(self._predict(feeds), self.fetches, rows, self.origin, copy=False)

    def _predict(self, feeds: Arrays) -> Arrays:
        for name, handle in self._inputs.items():
            arr = np.ascontiguousarray(feeds[name])
            handle.reshape(list(arr.shape))
            handle.copy_from_cpu(arr)
        self._predictor.run()
        return {name: handle.copy_to_cpu() for name, handle in self._outputs.items()}
