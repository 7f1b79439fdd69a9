"""Saved Paddle models with variable-length inputs: token ids of any length per row.

Small models are built and exported once per module (``paddle.jit.save`` with ``InputSpec``
shape ``[None, None]`` for ids): a masked mean over an embedding reading each row's length
from a lengths input, the same reading a mask input, a per-token output, and models the
teacher must refuse.  Every answer for a padded batch must equal the answer for each row
run alone, and a numpy computation from the embedding table: padding cannot leak into a row.
In process (``PaddleModel.run``) and through a real ``zdistill-teacher`` a client sends
``Ragged`` ids to.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests import procs
from tests.test_paddle_teacher import load_module
from zdistill.client import TeacherClient
from zdistill.errors import ConfigError
from zdistill.spec import Ragged, TensorSpec

paddle = pytest.importorskip("paddle")

TIMEOUT = 30.0
RTOL, ATOL = 1e-5, 1e-6
VOCAB, WIDTH = 50, 4

# Written to a file at test time: paddle.jit.save reads the source of ``forward``; the
# parameter names are the inputs' names, and the first one must literally be ``self``.
MODELS_SOURCE = '''
import paddle
from paddle.static import InputSpec

IDS = InputSpec([None, None], "int64", "ids")


def token_mask(ids, lengths):
    """[rows, T] float32: 1 where the position is within the row's length."""
    positions = paddle.arange(paddle.shape(ids)[1], dtype="int64").unsqueeze(0)
    return (positions < lengths.unsqueeze(1)).astype("float32")


class LengthsMean(paddle.nn.Layer):
    """The mean of each row's token embeddings over its length, and each token's embedding x 2."""

    def __init__(self):
        super().__init__()
        self.emb = paddle.nn.Embedding(50, 4)

    def forward(self, ids, lengths):
        e = self.emb(ids)
        mask = token_mask(ids, lengths).unsqueeze(-1)
        mean = paddle.sum(e * mask, axis=1) / lengths.astype("float32").unsqueeze(1)
        return mean, e * 2.0


class LengthsMean8(LengthsMean):
    """LengthsMean reading the lengths as int8: a row longer than 127 has no length it can hold."""

    def forward(self, ids, lengths):
        return super().forward(ids, lengths.astype("int64"))


class MaskMean(paddle.nn.Layer):
    """The mean of each row's token embeddings where the mask is 1."""

    def __init__(self):
        super().__init__()
        self.emb = paddle.nn.Embedding(50, 4)

    def forward(self, ids, mask):
        m = mask.unsqueeze(-1)
        return paddle.sum(self.emb(ids) * m, axis=1) / paddle.sum(m, axis=1)


class MaskMean3(paddle.nn.Layer):
    """MaskMean with ERNIE's mask shape, [rows, T, 1]."""

    def __init__(self):
        super().__init__()
        self.emb = paddle.nn.Embedding(50, 4)

    def forward(self, ids, mask):
        return paddle.sum(self.emb(ids) * mask, axis=1) / paddle.sum(mask, axis=1)


class PlainMean(paddle.nn.Layer):
    """A mean over every position, padding included: it has no way to know the lengths."""

    def __init__(self):
        super().__init__()
        self.emb = paddle.nn.Embedding(50, 4)

    def forward(self, ids):
        return paddle.mean(self.emb(ids), axis=1)


class Transposed(paddle.nn.Layer):
    """Per-token embeddings as [rows, 4, T]: the length on an axis that cannot be cut back."""

    def __init__(self):
        super().__init__()
        self.emb = paddle.nn.Embedding(50, 4)

    def forward(self, ids):
        return paddle.transpose(self.emb(ids), [0, 2, 1])


class Scaled(paddle.nn.Layer):
    """Fixed-size rows and a [rows] input: nothing of variable length for lengths to describe."""

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 3)

    def forward(self, x, n):
        return self.fc(x) * n.unsqueeze(1)


class Halves(paddle.nn.Layer):
    """Fixed-size rows whose outputs are bfloat16 and float16: Paddle returns the bfloat16 one as
    float32 holding its bytes and as many bytes past them, which the teacher must refuse to serve."""

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 3)

    def forward(self, x):
        y = self.fc(x)
        return y.astype("float16"), y.astype("bfloat16")


class Weighted(paddle.nn.Layer):
    """Fixed-size rows, and a weight of 4 rows as a second output: not one answer per input row,
    which a batch of 4 rows would get a row of each (the teacher must refuse to serve it)."""

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), self.fc.weight * 1.0


class Pixels(paddle.nn.Layer):
    """Images of any size and no variable-length input: each pixel's class, [rows, H, W], whose
    sizes the program leaves open (-1) and no row's length cuts."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3, padding=1)

    def forward(self, img):
        return paddle.argmax(self.conv(img), axis=1)


class Tokens(paddle.nn.Layer):
    """Each token's embedding x 2: written in Paddle 2's format, whose program records no output shapes."""

    def __init__(self):
        super().__init__()
        self.emb = paddle.nn.Embedding(50, 4)

    def forward(self, ids):
        return self.emb(ids) * 2.0


def export_paddle2(prefix):
    paddle.seed(7)
    layer = Tokens()
    layer.eval()
    paddle.jit.save(layer, prefix, input_spec=[IDS])
    paddle.save(layer.emb.weight.numpy(), prefix + ".table")


def export(prefix):
    paddle.seed(7)
    specs = {
        "lengths": (LengthsMean(), [IDS, InputSpec([None], "int64", "lengths")]),
        "mask": (MaskMean(), [IDS, InputSpec([None, None], "float32", "mask")]),
        "lengths8": (LengthsMean8(), [IDS, InputSpec([None], "int8", "lengths")]),
        "mask3": (MaskMean3(), [IDS, InputSpec([None, None, 1], "float32", "mask")]),
        "plain": (PlainMean(), [IDS]),
        "transposed": (Transposed(), [IDS]),
        "scaled": (Scaled(), [InputSpec([None, 3], "float32", "x"), InputSpec([None], "float32", "n")]),
        "halves": (Halves(), [InputSpec([None, 3], "float32", "x")]),
        "weighted": (Weighted(), [InputSpec([None, 4], "float32", "x")]),
        "pixels": (Pixels(), [InputSpec([None, 3, None, None], "float32", "img")]),
    }
    tables = {}
    for name, (layer, input_spec) in specs.items():
        layer.eval()
        paddle.jit.save(layer, f"{prefix}/{name}/model", input_spec=input_spec)
        if hasattr(layer, "emb"):
            tables[name] = layer.emb.weight.numpy()
    return tables
'''


class Exported:
    """Where each model lies, and the embedding tables to compute the answers with numpy."""

    def __init__(self, folder: Path, tables: dict[str, np.ndarray]) -> None:
        self.folder = folder
        self.tables = tables

    def path(self, name: str) -> str:
        return str(self.folder / name / "model")


# run in a child with FLAGS_enable_pir_api=0, so jit.save writes the Paddle 2 protobuf program
EXPORT_PADDLE2 = ("import sys; sys.path.insert(0, sys.argv[1]); import seq_models; "
                  "seq_models.export_paddle2(sys.argv[2])")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Iterator[Exported]:
    folder = tmp_path_factory.mktemp("seq_models")
    (folder / "seq_models.py").write_text(MODELS_SOURCE)
    tables = load_module(folder / "seq_models.py").export(str(folder))
    prefix = folder / "paddle2" / "model"
    subprocess.run([sys.executable, "-c", EXPORT_PADDLE2, str(folder), str(prefix)],
                   env={**os.environ, "FLAGS_enable_pir_api": "0"}, check=True, timeout=120, capture_output=True)
    assert (folder / "paddle2" / "model.pdmodel").is_file(), "FLAGS_enable_pir_api=0 did not write a .pdmodel"
    tables["paddle2"] = paddle.load(f"{prefix}.table")
    yield Exported(folder, tables)
    sys.modules.pop("seq_models", None)


def load(exported: Exported, name: str, **flags: str):
    from zdistill.teacher.loading import load_model

    return load_model(exported.path(name), threads=1, **flags)


def ragged_ids(lengths: list[int], seed: int = 0) -> Ragged:
    """Token ids 1..VOCAB-1 (never the padding 0, so a leak of padding changes the answer)."""
    rng = np.random.default_rng(seed)
    return Ragged.from_rows([rng.integers(1, VOCAB, size=n, dtype=np.int64) for n in lengths])


LENGTHS = [5, 1, 9, 3, 9, 2]


def test_specs_come_from_the_program_with_the_filled_inputs_hidden(exported) -> None:
    """Feeds and fetches are read from the saved program, -1 where a row's length goes; the
    lengths and mask inputs the teacher fills are not among the feeds a student sends."""
    by_lengths = load(exported, "lengths", lengths_input="lengths")
    assert by_lengths.feeds == [TensorSpec("ids", "int64", (-1,))]
    assert by_lengths.fetches == [TensorSpec("fetch_name_0", "float32", (WIDTH,)),
                                  TensorSpec("fetch_name_1", "float32", (-1, WIDTH))]
    by_mask = load(exported, "mask", mask_input="mask")
    assert by_mask.feeds == [TensorSpec("ids", "int64", (-1,))]
    assert by_mask.fetches == [TensorSpec("fetch_name_0", "float32", (WIDTH,))]


@pytest.mark.parametrize("name,flags", [("lengths", {"lengths_input": "lengths"}), ("mask", {"mask_input": "mask"}),
                                        ("mask3", {"mask_input": "mask"})])
def test_a_padded_batch_answers_each_row_as_if_alone(exported, name: str, flags: dict) -> None:
    """run() on rows padded to the longest equals each row run alone (no padding at all) and
    the masked mean numpy computes from the embedding table."""
    model = load(exported, name, **flags)
    ids = ragged_ids(LENGTHS)
    lengths = ids.lengths
    out = model.run({"ids": ids.padded()}, lengths)
    table = exported.tables[name]
    for i, row in enumerate(ids.rows()):
        alone = model.run({"ids": row[None, :]})
        np.testing.assert_allclose(out["fetch_name_0"][i], alone["fetch_name_0"][0], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(out["fetch_name_0"][i], table[row].mean(axis=0), rtol=RTOL, atol=ATOL)
    assert out["fetch_name_0"].shape == (len(LENGTHS), WIDTH)
    assert int(lengths.max()) == 9 and min(LENGTHS) < 9  # the batch really is padded


def test_per_token_outputs_come_back_padded_and_cut_back_to_each_row(exported) -> None:
    model = load(exported, "lengths", lengths_input="lengths")
    ids = ragged_ids(LENGTHS, seed=1)
    tokens = model.run({"ids": ids.padded()}, ids.lengths)["fetch_name_1"]
    assert tokens.shape == (len(LENGTHS), max(LENGTHS), WIDTH)
    cut = Ragged.unpad(tokens, ids.lengths)
    for row, answer in zip(ids.rows(), cut.rows(), strict=True):
        np.testing.assert_allclose(answer, exported.tables["lengths"][row] * 2, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(answer, model.run({"ids": row[None, :]})["fetch_name_1"][0], rtol=RTOL, atol=ATOL)


def test_a_length_the_lengths_input_cannot_hold_is_refused(exported) -> None:
    """An int8 lengths input holds lengths up to 127: a row of 130 tokens would be filled in as
    -126 (the model then means over no token); the call raises naming the input and the length,
    while rows whose lengths fit are answered as if alone."""
    model = load(exported, "lengths8", lengths_input="lengths")
    ids = ragged_ids([130, 4])
    with pytest.raises(ValueError, match=r"lengths input 'lengths' \(int8\) cannot hold the length 130"):
        model.run({"ids": ids.padded()}, ids.lengths)
    fits = ragged_ids([127, 4])
    out = model.run({"ids": fits.padded()}, fits.lengths)["fetch_name_0"]
    for i, row in enumerate(fits.rows()):
        np.testing.assert_allclose(out[i], exported.tables["lengths8"][row].mean(axis=0), rtol=RTOL, atol=ATOL)


def test_a_paddle2_program_gets_its_output_shapes_from_the_warm_ups(exported) -> None:
    """A .pdmodel records no output shapes: the two warm-ups find the per-token axis."""
    model = load(exported, "paddle2")
    assert model.feeds == [TensorSpec("ids", "int64", (-1,))]
    assert [(f.dtype, f.shape) for f in model.fetches] == [("float32", (-1, WIDTH))]
    ids = ragged_ids(LENGTHS, seed=4)
    tokens = model.run({"ids": ids.padded()}, ids.lengths)[model.fetches[0].name]
    for row, answer in zip(ids.rows(), Ragged.unpad(tokens, ids.lengths).rows(), strict=True):
        np.testing.assert_allclose(answer, exported.tables["paddle2"][row] * 2, rtol=RTOL, atol=ATOL)


def test_lengths_left_out_mean_every_row_is_full(exported) -> None:
    """Without lengths (the warm-up and fingerprint probes send equal-length rows) every row is as
    long as the padded feeds."""
    model = load(exported, "lengths", lengths_input="lengths")
    ids = np.random.default_rng(2).integers(1, VOCAB, size=(3, 6), dtype=np.int64)
    out = model.run({"ids": ids})
    np.testing.assert_allclose(out["fetch_name_0"], exported.tables["lengths"][ids].mean(axis=1), rtol=RTOL,
                               atol=ATOL)


def test_lengths_outside_the_padding_are_refused(exported) -> None:
    model = load(exported, "lengths", lengths_input="lengths")
    ids = np.ones((2, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"lengths must lie in 0\.\.4"):
        model.run({"ids": ids}, np.array([4, 5]))
    with pytest.raises(ValueError, match="lengths must be 2 integers"):
        model.run({"ids": ids}, np.array([4]))


def test_a_model_without_lengths_is_served_with_a_warning(exported, caplog) -> None:
    """A variable-length input and no --lengths-input / --mask-input: the model sees the padding
    (as it may, reading id 0 as padding), and the log says so once, at load."""
    with caplog.at_level(logging.WARNING, logger="zdistill.teacher.paddle_model"):
        model = load(exported, "plain")
    warnings = [r.getMessage() for r in caplog.records if "vary in length" in r.getMessage()]
    assert len(warnings) == 1 and "['ids']" in warnings[0]
    assert model.feeds == [TensorSpec("ids", "int64", (-1,))]
    ids = np.array([[3, 4, 0, 0]], dtype=np.int64)
    padded_mean = model.run({"ids": ids}, np.array([2]))["fetch_name_0"][0]
    np.testing.assert_allclose(padded_mean, exported.tables["plain"][ids[0]].mean(axis=0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,flags,match", [
    ("lengths", {"lengths_input": "length"}, r"--lengths-input 'length': .* has no such input \(its inputs: "
                                             r"\['ids', 'lengths'\]\)"),
    ("lengths", {"lengths_input": "ids"}, r"--lengths-input 'ids': the input is int64 \[rows, -1\], a lengths "
                                          r"input must be \[rows\]"),
    ("lengths", {"mask_input": "lengths"}, r"--mask-input 'lengths': the input is int64 \[rows\], a mask input "
                                           r"must be \[rows, -1\]"),
    ("mask", {"lengths_input": "mask"}, r"--lengths-input 'mask': the input is float32 \[rows, -1\]"),
    ("scaled", {"lengths_input": "n"}, r"lengths input 'n': .* has no other input of variable length"),
    ("transposed", {}, r"output 'fetch_name_0' axis 2 is 2, then 3, for inputs of length 2, then 3: only a first "
                       "per-row axis"),
    ("halves", {}, r"output 'fetch_name_1' is BFLOAT16 in the model, which Paddle's copy_to_cpu\(\) returns as "
                   r"float32 of other values .* cast it to float32 in the model"),
    ("weighted", {}, r"output 'linear_\d+.w_0' has 4 rows, then 4, for one input row: not one answer per row"),
])
def test_misnamed_or_unfit_inputs_and_uncuttable_outputs_are_refused(exported, name: str, flags: dict,
                                                                     match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(exported, name, **flags)


def test_filling_inputs_of_a_python_function_is_refused() -> None:
    from zdistill.teacher.loading import load_model

    with pytest.raises(ConfigError, match="is a Python function, which is given each row's length itself"):
        load_model(f"{procs.TEACHERS}:softmax", lengths_input="lengths")


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory) -> Iterator[procs.Proc]:
    """The lengths model served by a real teacher, its lengths input filled by the teacher."""
    proc = procs.start_teacher(exported.path("lengths"), tmp_path_factory.mktemp("seq_teacher"), "--threads", "1",
                               "--lengths-input", "lengths")
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()[-2000:]


def test_a_teacher_process_declares_ids_of_variable_length_and_no_lengths_input(served) -> None:
    c = TeacherClient(served.endpoint, timeout=TIMEOUT)
    try:
        meta = c.meta()
    finally:
        c.close()
    assert meta["feeds"] == [{"name": "ids", "dtype": "int64", "shape": [-1]}]
    assert [(f["name"], f["shape"]) for f in meta["fetches"]] == [("fetch_name_0", [WIDTH]),
                                                                   ("fetch_name_1", [-1, WIDTH])]


def test_a_dense_batch_is_rows_all_of_its_length(exported, served) -> None:
    ids = np.random.default_rng(3).integers(1, VOCAB, size=(4, 7), dtype=np.int64)
    c = TeacherClient(served.endpoint, timeout=TIMEOUT)
    try:
        out = c.predict({"ids": ids})
    finally:
        c.close()
    table = exported.tables["lengths"]
    np.testing.assert_allclose(out["fetch_name_0"], table[ids].mean(axis=1), rtol=RTOL, atol=ATOL)
    assert np.array_equal(out["fetch_name_1"].lengths, [7] * 4)
    np.testing.assert_allclose(out["fetch_name_1"].values, table[ids].reshape(-1, WIDTH) * 2, rtol=RTOL, atol=ATOL)


def test_ragged_requests_get_each_row_answered_as_if_alone(exported, served) -> None:
    """Requests of rows of different lengths, pipelined so the batcher merges (and pads) rows of
    several requests: every row's mean and per-token answers equal the row sent alone and numpy."""
    table = exported.tables["lengths"]
    sent = {seed: ragged_ids(list(np.random.default_rng(seed).integers(1, 12, size=5)), seed) for seed in range(8)}
    c = TeacherClient(served.endpoint, timeout=TIMEOUT)
    try:
        requests = list(sent.values())
        for feeds, done in zip(requests, procs.pipelined(c, [{"ids": f} for f in requests], TIMEOUT), strict=True):
            assert done.error is None, done.error
            mean, tokens = done.result["fetch_name_0"], done.result["fetch_name_1"]
            assert isinstance(tokens, Ragged) and np.array_equal(tokens.lengths, feeds.lengths)
            for i, (row, answer) in enumerate(zip(feeds.rows(), tokens.rows(), strict=True)):
                np.testing.assert_allclose(mean[i], table[row].mean(axis=0), rtol=RTOL, atol=ATOL)
                np.testing.assert_allclose(answer, table[row] * 2, rtol=RTOL, atol=ATOL)
                alone = c.predict({"ids": Ragged.from_rows([row])})
                np.testing.assert_allclose(mean[i], alone["fetch_name_0"][0], rtol=RTOL, atol=ATOL)
                np.testing.assert_allclose(answer, alone["fetch_name_1"].rows()[0], rtol=RTOL, atol=ATOL)
    finally:
        c.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["sample", "sample_list", "batch"])
@pytest.mark.parametrize("cache", [False, True])
def test_a_distill_reader_gets_each_rows_per_token_answers_with_the_cache_on_and_off(exported, served, tmp_path,
                                                                                      mode, cache) -> None:
    """Token ids of different lengths through a DistillReader in each mode (a batch reader's
    slot as a list of per-sample arrays, EDL's ERNIE example): every sample back as given,
    every prediction numpy's for its row, the second epoch the cache's."""
    from tests.test_reader_sequences import as_items, check, reader

    table = exported.tables["lengths"]
    rng = np.random.default_rng(8)
    samples = [(rng.integers(1, VOCAB, size=int(rng.integers(1, 12)), dtype=np.int64), np.int64(i)) for i in range(60)]
    items = as_items(mode, samples)

    def expect(sample: tuple[np.ndarray, np.int64]) -> tuple[np.ndarray, np.ndarray]:
        rows = table[sample[0]]
        return rows.mean(axis=0), rows * 2

    with reader(mode, ["ids", "label"], ["fetch_name_0", "fetch_name_1"], served.endpoint, items) as dr:
        if cache:
            dr.set_teacher_cache(tmp_path / "cache")
        for _ in range(2):
            check(mode, list(dr()), items, samples, expect, rtol=RTOL, atol=ATOL)
        stats = dr.stats()["cache"]
    assert stats["enabled"] == cache and (stats["hits"] >= len(samples) - 1 if cache else stats["hits"] == 0), stats


def test_images_of_any_size_get_outputs_of_their_size(exported, tmp_path) -> None:
    """A model without variable-length inputs whose output's first per-row size follows the image
    (-1, then -1): served, each request answered [rows, H, W] for its own size, each row as if alone."""
    proc = procs.start_teacher(exported.path("pixels"), tmp_path, "--threads", "1")
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        assert [(f["name"], f["shape"]) for f in c.meta()["fetches"]] == [("fetch_name_0", [-1, -1])]
        rng = np.random.default_rng(5)
        images = [rng.standard_normal((n, 3, h, w)).astype(np.float32) for n, h, w in [(3, 5, 6), (2, 4, 4), (4, 5, 6)]]
        for img, done in zip(images, procs.pipelined(c, [{"img": i} for i in images], TIMEOUT), strict=True):
            assert done.error is None, done.error
            classes = done.result["fetch_name_0"]
            assert classes.shape == (img.shape[0], *img.shape[2:]) and classes.dtype == np.int64
            for row, answer in zip(img, classes, strict=True):
                assert np.array_equal(answer, c.predict({"img": row[None]})["fetch_name_0"][0])
    finally:
        c.close()
    code = proc.stop()
    assert code == 0, proc.log()[-2000:]
