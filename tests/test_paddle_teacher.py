"""A real Paddle inference model served by ``zdistill-teacher`` in its own process.

A tiny MLP (784 -> 16 -> 10, softmax) is built and exported once per module, in both
formats a user may hold: Paddle 3's ``prefix.json`` (PIR) and Paddle 2's ``prefix.pdmodel``
(written by a child process with the PIR API off).  The served predictions must equal the
same model run here, in the test process, to float tolerance.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests import procs
from zdistill.client import TeacherClient

paddle = pytest.importorskip("paddle")

TIMEOUT = 30.0
RTOL, ATOL = 1e-5, 1e-6
BATCH_SIZES = [1, 7, 64, 256]

# The layer lives in a file of its own, written at test time: ``paddle.jit.save`` reads the
# source of ``forward`` (so it cannot be a string exec'd here), and the child process that
# writes the Paddle 2 form must build the very same class.  forward's parameter is named like
# the InputSpec, and its first parameter must be literally ``self`` for Paddle's converter.
MLP_SOURCE = '''
import paddle


class TinyMLP(paddle.nn.Layer):
    """784 -> 16 -> 10 with a softmax: the smallest model worth serving."""

    def __init__(self):
        super().__init__()
        self.fc1 = paddle.nn.Linear(784, 16)
        self.fc2 = paddle.nn.Linear(16, 10)

    def forward(self, img):
        return paddle.nn.functional.softmax(self.fc2(paddle.nn.functional.relu(self.fc1(img))))


def export(layer, prefix):
    from paddle.static import InputSpec

    layer.eval()
    paddle.jit.save(layer, prefix, input_spec=[InputSpec([None, 784], "float32", "img")])
'''

# run in a child with FLAGS_enable_pir_api=0, so jit.save writes the Paddle 2 protobuf program
EXPORT_PADDLE2 = '''
import sys
import paddle
sys.path.insert(0, sys.argv[1])
import tiny_mlp
layer = tiny_mlp.TinyMLP()
layer.set_state_dict(paddle.load(sys.argv[2]))
tiny_mlp.export(layer, sys.argv[3])
'''


def load_module(path: Path) -> ModuleType:
    """Import the model source written at ``path`` under its file's name, as the export child imports it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


class Exported:
    """The layer (for in-process predictions) and where each saved form of it lies."""

    def __init__(self, layer, pir_prefix: Path, pb_prefix: Path) -> None:
        self.layer = layer
        self.pir_prefix = pir_prefix
        self.pb_prefix = pb_prefix

    def predict(self, x: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return self.layer(paddle.to_tensor(x)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Iterator[Exported]:
    folder = tmp_path_factory.mktemp("paddle_model")
    (folder / "tiny_mlp.py").write_text(MLP_SOURCE)
    (folder / "export_paddle2.py").write_text(EXPORT_PADDLE2)
    module = load_module(folder / "tiny_mlp.py")
    paddle.seed(2024)
    layer = module.TinyMLP()
    module.export(layer, str(folder / "pir" / "mlp"))
    paddle.save(layer.state_dict(), str(folder / "mlp.pdparams"))
    subprocess.run(
        [sys.executable, str(folder / "export_paddle2.py"), str(folder), str(folder / "mlp.pdparams"),
         str(folder / "pb" / "mlp")],
        env={**os.environ, "FLAGS_enable_pir_api": "0"}, check=True, timeout=120, capture_output=True,
    )
    assert (folder / "pir" / "mlp.json").is_file() and (folder / "pir" / "mlp.pdiparams").is_file()
    assert (folder / "pb" / "mlp.pdmodel").is_file(), "FLAGS_enable_pir_api=0 did not write a .pdmodel"
    yield Exported(layer, folder / "pir" / "mlp", folder / "pb" / "mlp")
    sys.modules.pop("tiny_mlp", None)


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory) -> Iterator[procs.Proc]:
    """The Paddle 3 model served by a real teacher, one math thread (a 2-core machine)."""
    proc = procs.start_teacher(str(exported.pir_prefix), tmp_path_factory.mktemp("pir_teacher"), "--threads", "1")
    yield proc
    stop_cleanly(proc)


def stop_cleanly(proc: procs.Proc) -> None:
    """SIGTERM must stop a Paddle teacher with status 0: Paddle installs its own SIGTERM handler
    (a C++ "FatalError" dump) on import, which the teacher has to replace after loading."""
    code = proc.stop()
    assert code == 0, proc.log()[-2000:]
    assert "FatalError" not in proc.log()


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).standard_normal((n, 784)).astype(np.float32)


def test_served_predictions_equal_the_model_in_process(exported, served) -> None:
    c = TeacherClient(served.endpoint, timeout=TIMEOUT)
    try:
        for n in BATCH_SIZES:
            x = inputs(n)
            out = c.predict({"img": x})
            assert list(out) == ["fetch_name_0"]
            assert out["fetch_name_0"].shape == (n, 10) and out["fetch_name_0"].dtype == np.float32
            np.testing.assert_allclose(out["fetch_name_0"], exported.predict(x), rtol=RTOL, atol=ATOL)
    finally:
        c.close()


def test_pipelined_requests_merge_and_still_match(exported, served) -> None:
    """Several requests in flight through the batcher each come back with their own rows."""
    c = TeacherClient(served.endpoint, timeout=TIMEOUT)
    try:
        requests = [inputs(3, seed) for seed in range(16)]
        for x, done in zip(requests, procs.pipelined(c, [{"img": x} for x in requests], TIMEOUT), strict=True):
            assert done.error is None, done.error
            np.testing.assert_allclose(done.result["fetch_name_0"], exported.predict(x), rtol=RTOL, atol=ATOL)
    finally:
        c.close()


def test_instances_answer_bit_for_bit_alike(exported, tmp_path_factory) -> None:
    """--instances 1, 2 and 4 (cloned predictors sharing the weights, running at once) serve
    the same bytes for the same requests; each request is its own batch (64 rows, max 64)."""
    requests = [inputs(64, seed) for seed in range(12)]
    answers: dict[int, list[np.ndarray]] = {}
    for n in (1, 2, 4):
        proc = procs.start_teacher(str(exported.pir_prefix), tmp_path_factory.mktemp(f"instances{n}"), "--threads",
                                   "1", "--instances", str(n), "--max-batch-size", "64")
        c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
        try:
            assert c.meta()["instances"] == n
            done = procs.pipelined(c, [{"img": x} for x in requests], TIMEOUT)
            assert all(d.error is None for d in done), [d.error for d in done]
            answers[n] = [d.result["fetch_name_0"] for d in done]
        finally:
            c.close()
        stop_cleanly(proc)
    for n in (2, 4):
        assert all(np.array_equal(a, b) for a, b in zip(answers[n], answers[1], strict=True)), f"--instances {n}"
    for x, got in zip(requests, answers[1], strict=True):
        np.testing.assert_allclose(got, exported.predict(x), rtol=RTOL, atol=ATOL)


def test_meta_reports_feeds_and_fetches(exported, served) -> None:
    c = TeacherClient(served.endpoint, timeout=TIMEOUT)
    try:
        meta = c.meta()
    finally:
        c.close()
    assert meta["feeds"] == [{"name": "img", "dtype": "float32", "shape": [784]}]
    assert meta["fetches"] == [{"name": "fetch_name_0", "dtype": "float32", "shape": [10]}]
    assert meta["device"] == "cpu"
    assert meta["max_batch_size"] == 256
    assert meta["instances"] == 1 and meta["thread_safe"] is True
    assert "paddle inference model" in meta["description"] and "mlp.json" in meta["description"]


def served_meta(proc: procs.Proc) -> dict:
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        return c.meta()
    finally:
        c.close()


def test_model_id_is_a_hash_of_the_model_files(exported, served, served_pb, tmp_path) -> None:
    """Two loads of the same files agree, wherever the files lie (a copy elsewhere); one changed
    byte of the parameters changes the id; a Paddle 2 program is another model."""
    from zdistill.teacher.paddle_model import model_files_id

    first = served_meta(served)["model_id"]
    assert re.fullmatch(r"paddle:[0-9a-f]{32}", first), first
    assert first == model_files_id(f"{exported.pir_prefix}.json", f"{exported.pir_prefix}.pdiparams")
    assert f"(model_id {first}, device cpu" in served.log()
    assert served_meta(served_pb)["model_id"] not in (first, None)
    copy = tmp_path / "copy"
    shutil.copytree(exported.pir_prefix.parent, copy)
    proc = procs.start_teacher(str(copy / "mlp"), tmp_path, "--threads", "1")
    try:
        assert served_meta(proc)["model_id"] == first
    finally:
        stop_cleanly(proc)
    params = copy / "mlp.pdiparams"
    data = bytearray(params.read_bytes())
    data[-4] ^= 1  # the lowest mantissa bit of the last weight: the model still loads and runs
    params.write_bytes(bytes(data))
    proc = procs.start_teacher(str(copy / "mlp"), tmp_path, "--threads", "1")
    try:
        changed = served_meta(proc)["model_id"]
    finally:
        stop_cleanly(proc)
    assert re.fullmatch(r"paddle:[0-9a-f]{32}", changed) and changed != first


def test_a_paddle_teacher_fingerprints_what_the_model_computes(exported, served, served_pb) -> None:
    """The probe batch runs through the Paddle predictor: the fingerprint in meta is reproducible
    (a student may cache by it) and summarizes what the model computes here, in both formats
    of the one model (whose model_ids differ)."""
    from zdistill.fingerprint import TOLERANCE, distance, probe_batch, summarize, usable
    from zdistill.spec import TensorSpec

    pir, pb = served_meta(served), served_meta(served_pb)
    names = [f["name"] for f in pir["fetches"]]
    fp, why = usable(pir.get("fingerprint"), names, "the Paddle teacher")
    assert fp is not None, why
    probe = probe_batch([TensorSpec.from_wire(f) for f in pir["feeds"]])
    here = summarize({names[0]: exported.predict(probe["img"])}, names)
    assert distance(fp, here, names) <= TOLERANCE
    pb_names = [f["name"] for f in pb["fetches"]]  # Paddle 2 names its output otherwise
    other, why = usable(pb.get("fingerprint"), pb_names, "the Paddle 2 teacher")
    assert other is not None, why
    assert pb["model_id"] != pir["model_id"] and distance(fp, {names[0]: other[pb_names[0]]}, names) <= TOLERANCE


def test_model_id_given_and_files_changed_while_loading(exported, tmp_path, monkeypatch) -> None:
    """A given model_id (--model-id) replaces the hash; files rewritten between the hash and the
    load are refused, since the id might name other bytes than those served."""
    from zdistill.errors import ConfigError
    from zdistill.teacher import paddle_model

    shutil.copytree(exported.pir_prefix.parent, tmp_path / "m")
    prefix = str(tmp_path / "m" / "mlp")
    assert paddle_model.PaddleModel(prefix, model_id="tiny mlp 7").model_id == "tiny mlp 7"
    hash_files = paddle_model.model_files_id

    def hash_then_rewrite(program: str, params: str) -> str:
        model_id = hash_files(program, params)
        os.utime(params, ns=(0, 0))  # as a deploy copying new weights in would
        return model_id

    monkeypatch.setattr(paddle_model, "model_files_id", hash_then_rewrite)
    with pytest.raises(ConfigError, match="changed while the teacher loaded it"):
        paddle_model.PaddleModel(prefix)


HAS_CUDA = bool(paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0)


@pytest.fixture(scope="module")
def served_pb(exported, tmp_path_factory) -> Iterator[procs.Proc]:
    """The Paddle 2 model, named by its .pdmodel file.  Without CUDA it is also asked for
    ``--gpu-ids 0``, which must fall back to the CPU: one teacher start checks both."""
    gpu_flag = [] if HAS_CUDA else ["--gpu-ids", "0"]
    proc = procs.start_teacher(f"{exported.pb_prefix}.pdmodel", tmp_path_factory.mktemp("pb_teacher"),
                               "--threads", "1", *gpu_flag)
    yield proc
    stop_cleanly(proc)


def test_paddle2_pdmodel_is_served(exported, served_pb) -> None:
    c = TeacherClient(served_pb.endpoint, timeout=TIMEOUT)
    try:
        meta = c.meta()
        assert meta["feeds"] == [{"name": "img", "dtype": "float32", "shape": [784]}]
        assert len(meta["fetches"]) == 1 and meta["fetches"][0]["shape"] == [10]
        assert meta["description"].endswith(f"(Paddle {paddle.__version__})") and "mlp.pdmodel" in meta["description"]
        fetch = meta["fetches"][0]["name"]  # whatever the predictor reports (a softmax var here)
        for n in BATCH_SIZES:
            x = inputs(n)
            np.testing.assert_allclose(c.predict({"img": x})[fetch], exported.predict(x), rtol=RTOL, atol=ATOL)
    finally:
        c.close()


@pytest.mark.skipif(HAS_CUDA, reason="this Paddle has a CUDA device: the CPU fallback cannot be seen here")
def test_gpu_ids_without_cuda_falls_back_to_cpu(served_pb) -> None:
    """On a CPU-only Paddle, --gpu-ids serves on the CPU and says so (meta and log)."""
    c = TeacherClient(served_pb.endpoint, timeout=TIMEOUT)
    try:
        assert c.meta()["device"] == "cpu"
    finally:
        c.close()
    assert "serving on the CPU" in served_pb.log()


@pytest.mark.parametrize("fmt", ["pir", "pb"])
def test_a_model_may_be_named_by_prefix_file_or_folder(exported, fmt: str) -> None:
    """Every way of naming a saved model resolves to the same program and parameters."""
    from zdistill.teacher.paddle_model import resolve_model_files

    prefix = exported.pir_prefix if fmt == "pir" else exported.pb_prefix
    program = f"{prefix}.json" if fmt == "pir" else f"{prefix}.pdmodel"
    want = (program, f"{prefix}.pdiparams")
    for name in (str(prefix), program, f"{prefix}.pdiparams", str(prefix.parent)):
        assert resolve_model_files(name) == want, name


@pytest.mark.skipif(not HAS_CUDA, reason="needs paddlepaddle-gpu and a CUDA device")
def test_gpu_serving_matches_cpu(exported, served, start_teacher) -> None:
    """--gpu-ids 0 serves on the GPU and agrees with the CPU teacher (GPU math: looser tolerance)."""
    proc = start_teacher(str(exported.pir_prefix), "--gpu-ids", "0")
    gpu = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    cpu = TeacherClient(served.endpoint, timeout=TIMEOUT)
    try:
        assert gpu.meta()["device"] == "gpu:0"
        for n in BATCH_SIZES:
            x = inputs(n)
            np.testing.assert_allclose(
                gpu.predict({"img": x})["fetch_name_0"], cpu.predict({"img": x})["fetch_name_0"], rtol=1e-3, atol=1e-5
            )
    finally:
        gpu.close()
        cpu.close()


def test_bad_model_folder_is_a_clear_error(tmp_path) -> None:
    """A folder with no saved model: exit 2 and a message naming what was expected."""
    result = subprocess.run(
        [sys.executable, "-m", "zdistill.teacher.server", "--model", str(tmp_path), "--port", "0",
         "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=120, cwd=str(procs.REPO),
    )
    assert result.returncode == 2, result.stderr
    assert "must hold exactly one saved model" in result.stderr


def test_the_readme_distill_reader_example_runs_as_pasted(served) -> None:
    """The README's first DistillReader example, against a Paddle model with an input ``img``:
    the teacher's address is changed (it names a port of its own), and the output's name to
    the one Paddle gives (``fetch_name_0``, as the README says under the example)."""
    readme = (procs.REPO / "README.md").read_text()
    section = readme[readme.index("## Drop-in table"):]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start : section.index("```", start)]
    assert "'127.0.0.1:9292'" in snippet and "predicts=['prob']" in snippet
    snippet = snippet.replace("predicts=['prob']", "predicts=['fetch_name_0']")
    namespace: dict = {}
    exec(snippet.replace("127.0.0.1:9292", served.endpoint.replace("tcp://", "")), namespace)  # noqa: S102
    img, label, soft_label = namespace["img"], namespace["label"], namespace["soft_label"]
    assert img.shape == (784,) and soft_label.shape == (10,) and label == 0  # the first sample of the last batch
    assert abs(float(soft_label.sum()) - 1.0) < 1e-5  # the model ends in a softmax
