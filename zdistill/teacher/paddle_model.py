"""A saved Paddle inference model, run with ``paddle.inference``.

Paddle 3's ``paddle.jit.save`` writes ``prefix.json`` (a PIR program) and
``prefix.pdiparams``; Paddle 2 wrote ``prefix.pdmodel`` (a protobuf program).  The
predictor reports input and output *names* but not their shapes or dtypes before a run,
so they are read from the program file itself: the ``data`` and ``fetch`` ops of a PIR
program, the ``feed`` targets of a protobuf one (which records no output shapes).  The
sizes a program leaves open (-1) are settled by two warm-up runs (:meth:`PaddleModel._fetch_specs`).
Output names are whatever the predictor reports (``fetch_name_0`` for Paddle 3 models).
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

from zdistill.errors import ConfigError, ModelOutputError
from zdistill.spec import Arrays, TensorSpec, check_model_id
from zdistill.teacher.model import check_outputs

log = logging.getLogger(__name__)

_PB_DTYPES = {
    "BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "INT16": "int16", "INT32": "int32",
    "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
_PIR_DTYPES = {
    "t_bool": "bool", "t_i8": "int8", "t_ui8": "uint8", "t_i16": "int16", "t_i32": "int32", "t_i64": "int64",
    "t_f16": "float16", "t_f32": "float32", "t_f64": "float64", "t_c64": "complex64", "t_c128": "complex128",
}
# the dtype an output handle's copy_to_cpu() returns for each type the handle reports.  Not
# BFLOAT16: Paddle 3.3 returns such an output as float32 of its shape holding the bfloat16
# bytes and as many bytes past them, values no model computed (other types it cannot copy raise)
_HANDLE_DTYPES = {
    "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT32": "int32", "INT64": "int64",
    "FLOAT16": "float16", "FLOAT32": "float32", "FLOAT64": "float64",
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


def read_program_specs(program_file: str, input_names: Sequence[str]) -> tuple[list[TensorSpec], dict[str, TensorSpec]]:
    """Each input's spec, and the spec of each output the program records, read from the saved program.

    A PIR program (``.json``) records both: its ``data`` ops name the inputs, its
    ``fetch`` ops the outputs, each with a dtype and a shape whose -1s are the sizes
    the program leaves open.  A protobuf program (``.pdmodel``) records the inputs only
    (outputs: ``{}``).
    """
    inputs: dict[str, TensorSpec] = {}
    outputs: dict[str, TensorSpec] = {}
    if program_file.endswith(".json"):
        with open(program_file) as f:
            _collect_pir_specs(json.load(f), inputs, outputs)
    else:
        from paddle.base.proto import framework_pb2

        with open(program_file, "rb") as f:
            program = framework_pb2.ProgramDesc.FromString(f.read())
        for var in program.blocks[0].vars:
            tensor = var.type.dense_tensor.tensor
            dtype = _PB_DTYPES.get(framework_pb2.VarType.Type.Name(tensor.data_type))
            if var.name in input_names and dtype:
                inputs[var.name] = _row_spec(var.name, dtype, tensor.dims)
    missing = [name for name in input_names if name not in inputs]
    if missing:
        raise ConfigError(f"cannot read the shape and dtype of input {missing[0]!r} from {program_file}")
    return [inputs[name] for name in input_names], outputs


def _row_spec(name: str, dtype: str, dims: Sequence[int]) -> TensorSpec:
    """The per-row spec of a tensor whose program shape is ``dims`` (batch axis first)."""
    return TensorSpec(name, dtype, tuple(int(d) for d in dims[1:]))


def _collect_pir_specs(node: Any, inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec]) -> None:
    """Walk a PIR json program: each ``data`` op's name, dtype and shape into ``inputs``, each
    ``fetch`` op's into ``outputs`` (an output of a dtype numpy lacks, bfloat16, is left out)."""
    if isinstance(node, dict):
        op = str(node.get("#", ""))
        attrs = {a.get("N"): a.get("AT", {}).get("D") for a in node.get("A", []) if isinstance(a, dict)}
        name = attrs.get("name")
        if op.endswith(".data") and isinstance(name, str) and isinstance(attrs.get("shape"), list):
            inputs[name] = _row_spec(name, str(attrs.get("dtype")), attrs["shape"])
        elif op.endswith(".fetch") and isinstance(name, str):
            result = node.get("O")
            typed = result[0] if isinstance(result, list) and result else result
            described = typed.get("TT", {}).get("D") if isinstance(typed, dict) else None
            if isinstance(described, list) and len(described) >= 2 and isinstance(described[0], dict):
                dtype = _PIR_DTYPES.get(str(described[0].get("#", "")).rpartition(".")[2])
                if dtype and isinstance(described[1], list) and described[1]:
                    outputs[name] = _row_spec(name, dtype, described[1])
        for value in node.values():
            _collect_pir_specs(value, inputs, outputs)
    elif isinstance(node, list):
        for value in node:
            _collect_pir_specs(value, inputs, outputs)


class PaddleModel:
    """One ``paddle.inference`` predictor: on a GPU when asked and available, else CPU + oneDNN.

    A predictor must not run in two threads at once; each model instance of the teacher
    is a :meth:`clone` with a predictor of its own, so the instances are thread-safe.
    ``model_id`` is ``model_id`` when given (``--model-id``), else :func:`model_files_id`
    of the files, computed once, here (clones share it).

    Variable-length inputs: an input whose first per-row dim is -1 in the program takes
    rows padded to the batch's longest (:meth:`run`).  ``lengths_input`` and
    ``mask_input`` name inputs the model reads each row's length from (``--lengths-input``
    / ``--mask-input``): the teacher fills them itself, so they are left out of
    :attr:`feeds` and a student never sends them.
    """

    thread_safe = True

    def __init__(self, target: str, gpu_ids: Sequence[int] = (), threads: int = 1,
                 model_id: str | None = None, lengths_input: str | None = None,
                 mask_input: str | None = None) -> None:
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
        inputs, recorded = read_program_specs(program, list(self._inputs))
        if model_id is None and _files_state(program, params) != files_before:
            # the id might name other bytes than those loaded: a student would cache this
            # model's answers under another model's id
            raise ConfigError(f"{program} or {params} changed while the teacher loaded it: start the teacher again")
        self.origin = f"Paddle model {program}"
        self._filled = _filled_inputs(inputs, lengths_input, mask_input, program)
        self.feeds = [spec for spec in inputs if spec.name not in self._filled]
        self._variable = [spec.name for spec in self.feeds if spec.variable]
        if self._variable and not self._filled:
            log.warning("%s: inputs %s vary in length and no --lengths-input or --mask-input names where the model "
                        "reads each row's length: it gets rows padded with 0 to the batch's longest and must tell "
                        "the padding apart itself (a padding id of 0), or a row's answer depends on its batch",
                        self.origin, self._variable)
        self.fetches = self._fetch_specs(recorded)
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
        """The predictor's outputs for ``feeds``, checked against the declared fetches.

        Variable-length feeds come padded to one length ``T`` (``[rows, T, ...]``) with
        each row's length in ``lengths`` (int64 ``[rows]``; None: every row is ``T`` long),
        from which the lengths and mask inputs are filled.  A variable-length fetch comes
        back padded, ``[rows, T, ...]``: row ``i``'s answer is its first ``lengths[i]``
        entries, which the caller cuts out.  ``copy_to_cpu()`` returns fresh arrays, so the
        outputs are the caller's as they are.
        """
        rows = len(next(iter(feeds.values())))
        padded = self._padded_length(feeds)
        if padded is not None:
            lengths = self._checked_lengths(lengths, rows, padded)
        outputs = check_outputs(self._predict({**feeds, **self._fill(lengths, padded)}), self.fetches, rows,
                                self.origin, copy=False)
        for spec in self.fetches if padded is not None else ():  # without variable-length feeds nothing is cut
            if spec.variable and outputs[spec.name].shape[1] != padded:
                raise ModelOutputError(
                    f"{self.origin}: output {spec.name!r} varies in length but has {outputs[spec.name].shape[1]} "
                    f"entries per row for inputs padded to {padded}: it cannot be cut back to each row's length")
        return outputs

    def _padded_length(self, feeds: Arrays) -> int | None:
        """The length the variable-length feeds are padded to (they must agree); None without any."""
        found = {name: np.shape(feeds[name])[1] for name in self._variable if np.ndim(feeds[name]) >= 2}
        if len(found) < len(self._variable):
            raise ValueError(f"{self.origin}: variable-length feeds {self._variable} must be [rows, length, ...]")
        if len(set(found.values())) > 1:
            raise ValueError(f"{self.origin}: variable-length feeds padded to different lengths {found}")
        return next(iter(found.values()), None)

    def _checked_lengths(self, lengths: np.ndarray | None, rows: int, padded: int) -> np.ndarray:
        if lengths is None:
            return np.full(rows, padded, dtype=np.int64)
        lengths = np.asarray(lengths)
        if lengths.shape != (rows,) or lengths.dtype.kind not in "iu":
            raise ValueError(f"{self.origin}: lengths must be {rows} integers, got {lengths.dtype} {lengths.shape}")
        if rows and (int(lengths.min()) < 0 or int(lengths.max()) > padded):
            raise ValueError(f"{self.origin}: lengths must lie in 0..{padded} (the padded length), "
                             f"got {int(lengths.min())}..{int(lengths.max())}")
        return lengths

    def _fill(self, lengths: np.ndarray | None, padded: int | None) -> Arrays:
        """The lengths and mask inputs for rows of ``lengths``, padded to ``padded``."""
        filled = {}
        for name, (role, spec) in self._filled.items():
            assert lengths is not None and padded is not None  # _filled_inputs: only beside a variable feed
            if role == "lengths":
                values = lengths
            else:
                values = np.arange(padded) < lengths[:, None]
            cast = values.astype(spec.dtype)
            if role == "lengths" and not np.array_equal(cast, values):  # int8 wraps 130 to -126, float16 rounds 2049
                length = int(values[np.flatnonzero(cast != values)[0]])
                raise ValueError(f"{self.origin}: the lengths input {name!r} ({spec.dtype}) cannot hold the length "
                                 f"{length}: the model would read another length")
            filled[name] = cast.reshape(values.shape + (1,) * (len(spec.shape) + 1 - values.ndim))
        return filled

    def _predict(self, feeds: Arrays) -> Arrays:
        for name, handle in self._inputs.items():
            arr = np.ascontiguousarray(feeds[name])
            handle.reshape(list(arr.shape))
            handle.copy_from_cpu(arr)
        self._predictor.run()
        return {name: handle.copy_to_cpu() for name, handle in self._outputs.items()}

    def _warm_up(self, length: int) -> Arrays:
        """The raw outputs for one zero row, every open size of the feeds set to ``length``."""
        feeds = {spec.name: np.zeros((1, *(length if d < 0 else d for d in spec.shape)), spec.dtype)
                 for spec in self.feeds}
        padded = self._padded_length(feeds)
        lengths = None if padded is None else np.full(1, padded, dtype=np.int64)
        try:
            return self._predict({**feeds, **self._fill(lengths, padded)})
        except Exception as exc:  # Paddle's own error types: a model that cannot run a zero row
            raise ConfigError(f"{self.origin} failed its warm-up run on a zero row with open sizes {length}: "
                              f"{type(exc).__name__}: {exc}") from None

    def _fetch_specs(self, recorded: dict[str, TensorSpec]) -> list[TensorSpec]:
        """Each output's spec: the program's where it records it, its open sizes settled by two warm-ups.

        The inputs' open sizes are set to 2, then 3.  A size the program leaves open (or
        does not record) that is the same in both runs is fixed at it; the first per-row
        size of a model with variable-length inputs that is 2, then 3, varies with the row
        (-1: per-token outputs, cut back to each row's length); any other size that moves
        with the inputs stays -1 in a model without variable-length inputs (images of any
        size) and is refused in one with them: it would carry padding into a row's answer.
        An output that ``copy_to_cpu()`` returns as another dtype than its own (bfloat16), or that has
        other than one row for the warm-ups' one, is refused.
        """
        first, second = self._warm_up(2), self._warm_up(3)
        fetches = []
        for name, a in first.items():
            kind = self._outputs[name].type().name
            if _HANDLE_DTYPES.get(kind) != a.dtype.name:
                raise ConfigError(f"{self.origin}: output {name!r} is {kind} in the model, which Paddle's "
                                  f"copy_to_cpu() returns as {a.dtype} of other values (not the model's): cast it "
                                  "to float32 in the model before saving it")
            b = second[name]
            program = recorded.get(name)
            if a.ndim == 0 or a.ndim != b.ndim or (program is not None and len(program.shape) != a.ndim - 1):
                raise ConfigError(f"{self.origin}: output {name!r} has shapes {list(a.shape)} and {list(b.shape)} "
                                  f"for one row, the program declares {program}")
            if a.shape[0] != 1 or b.shape[0] != 1:  # a weight or a batch-wide value: a batch of as many rows
                # would take its rows for each row's answer
                raise ConfigError(f"{self.origin}: output {name!r} has {a.shape[0]} rows, then {b.shape[0]}, for one "
                                  "input row: not one answer per row (a weight, a value of the whole batch, rows on "
                                  "another axis); leave it out of the saved model's outputs or put the rows first")
            shape = []
            for axis, (size_a, size_b) in enumerate(zip(a.shape[1:], b.shape[1:], strict=True)):
                declared = -1 if program is None else program.shape[axis]
                if declared >= 0 and size_a == size_b == declared:
                    shape.append(declared)
                elif declared >= 0:
                    raise ConfigError(f"{self.origin}: output {name!r} axis {axis + 1} is {size_a}, then {size_b}, "
                                      f"where the program declares {declared}")
                elif size_a == size_b:
                    shape.append(size_a)
                elif self._variable and (axis, size_a, size_b) != (0, 2, 3):
                    raise ConfigError(
                        f"{self.origin}: output {name!r} axis {axis + 1} is {size_a}, then {size_b}, for inputs of "
                        "length 2, then 3: only a first per-row axis as long as the input can be cut back to each "
                        "row's length; any other size that moves with the padded length would carry padding into "
                        "a row's answer")
                else:
                    shape.append(-1)
            dtype = program.dtype if program is not None else a.dtype.name
            fetches.append(TensorSpec(name, dtype, tuple(shape)))
        return fetches


def _filled_inputs(inputs: Sequence[TensorSpec], lengths_input: str | None, mask_input: str | None,
                   program: str) -> dict[str, tuple[str, TensorSpec]]:
    """The inputs the teacher fills from each row's length: name -> ("lengths" | "mask", spec).

    A lengths input is ``[rows]`` of any integer or float dtype; a mask input ``[rows, T]``
    (T open) of any numeric or bool dtype, 1 for tokens and 0 for padding.  Either may
    have trailing axes of size 1 (ERNIE's ``input_mask`` is ``[rows, T, 1]``).  Both need
    another input that varies in length, which the lengths describe.
    """
    specs = {spec.name: spec for spec in inputs}
    wanted = {"lengths": (lengths_input, "--lengths-input", (), "iuf"),
              "mask": (mask_input, "--mask-input", (-1,), "iufb")}
    filled: dict[str, tuple[str, TensorSpec]] = {}
    for role, (name, flag, row_shape, kinds) in wanted.items():
        if name is None:
            continue
        if name not in specs:
            raise ConfigError(f"{flag} {name!r}: {program} has no such input (its inputs: {sorted(specs)})")
        spec = specs[name]
        fits = spec.shape[:len(row_shape)] == row_shape and all(d == 1 for d in spec.shape[len(row_shape):])
        if not fits or np.dtype(spec.dtype).kind not in kinds:
            raise ConfigError(
                f"{flag} {name!r}: the input is {spec.dtype} [rows{''.join(f', {d}' for d in spec.shape)}], "
                f"a {role} input must be [rows{', -1' if row_shape else ''}] (-1: the padded length; trailing "
                f"axes of size 1 allowed) of {'an integer or float' if role == 'lengths' else 'a numeric or bool'} "
                "dtype")
        filled[name] = (role, spec)
    if filled and not any(spec.variable for spec in inputs if spec.name not in filled):
        raise ConfigError(f"{' and '.join(f'{r} input {n!r}' for n, (r, _) in filled.items())}: {program} has no "
                          "other input of variable length (first per-row dim -1) for the lengths to describe")
    return filled
