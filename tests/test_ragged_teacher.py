"""``zdistill-teacher`` serving rows of different lengths, against real processes.

Token sequences travel as :class:`~zdistill.spec.Ragged`; the teacher batches rows of
similar length, pads them for the model, hands it each row's length and cuts per-token
outputs back.  Every answer is checked row by row against numpy run on that row alone,
so a padding token leaking into a row, or a row cut to another's length, fails.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
import zmq

from tests import fuzzing, procs
from tests.teachers import per_token_np
from tests.test_teacher import served_here
from tests.test_wire import MALFORMED_RAGGED
from zdistill import wire
from zdistill.client import TeacherClient
from zdistill.errors import TeacherError, TeacherTimeout
from zdistill.spec import Ragged, TensorSpec

TIMEOUT = 10.0  # seconds; every blocking call in this file is bounded by it
TOKENS = f"{procs.TEACHERS}:per_token"
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def token_teacher(tmp_path_factory) -> Iterator[procs.Proc]:
    """per_token, waiting up to 20 ms for requests to merge, with a small token budget (256)."""
    proc = procs.start_teacher(TOKENS, tmp_path_factory.mktemp("tokens"), "--max-delay-ms", "20",
                               "--max-batch-tokens", "256")
    yield proc
    proc.stop()


@pytest.fixture
def client(token_teacher) -> Iterator[TeacherClient]:
    c = TeacherClient(token_teacher.endpoint, timeout=TIMEOUT)
    yield c
    c.close()


def sequences(seed: int, lengths: list[int]) -> tuple[dict[str, Ragged], list[np.ndarray], list[np.ndarray]]:
    """Feeds of token rows of ``lengths`` (random ids and weights), and the rows themselves."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 1000, n, dtype=np.int64) for n in lengths]
    weight = [rng.random(n, dtype=np.float32) + 0.5 for n in lengths]
    return {"ids": Ragged.from_rows(ids), "weight": Ragged.from_rows(weight)}, ids, weight


def assert_rows(result: dict, ids: list[np.ndarray], weight: list[np.ndarray]) -> None:
    """Each row's answer is what numpy computes on that row alone."""
    h = result["h"]
    assert isinstance(h, Ragged) and h.dtype == np.float32 and h.inner_shape == (4,)
    assert h.lengths.tolist() == [len(i) for i in ids]
    assert result["mean"].shape == (len(ids), 4)
    for i, (row_h, mean) in enumerate(zip(h.rows(), result["mean"], strict=True)):
        want_h, want_mean = per_token_np(ids[i], weight[i])
        np.testing.assert_allclose(row_h, want_h, **TOL, err_msg=f"row {i}")
        np.testing.assert_allclose(mean, want_mean, **TOL, err_msg=f"row {i}")


def assert_still_serving(client: TeacherClient) -> None:
    feeds, ids, weight = sequences(99, [5, 1, 9])
    assert_rows(client.predict(feeds), ids, weight)


def test_ragged_requests_are_answered_row_by_row(client) -> None:
    """Pipelined requests of rows of many lengths (an empty row, a dense request among them) are
    merged, padded and cut back: every row's answer is its own."""
    before = client.stats()
    rng = np.random.default_rng(0)
    sent: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    tokens = 0
    for seed in range(16):
        lengths = rng.integers(1, 60, rng.integers(1, 9)).tolist() + ([0] if seed == 3 else [])
        feeds, ids, weight = sequences(seed, lengths)
        sent[client.submit("predict", feeds)] = (ids, weight)
        tokens += sum(lengths)
    dense_ids = rng.integers(0, 1000, (3, 7))
    dense_w = rng.random((3, 7), dtype=np.float32)
    sent[client.submit("predict", {"ids": dense_ids, "weight": dense_w})] = (list(dense_ids), list(dense_w))
    tokens += 21
    got: dict[int, object] = {}
    end = time.monotonic() + TIMEOUT
    while len(got) < len(sent) and time.monotonic() < end:
        got.update((done.req_id, done) for done in client.collect(wait=0.1))
    assert set(got) == set(sent)
    for req_id, (ids, weight) in sent.items():
        assert got[req_id].error is None, got[req_id].error
        assert_rows(got[req_id].result, ids, weight)
    after = client.stats()
    for name in ("tokens", "padding_tokens", "model_calls"):
        assert type(after[name]) is int, name
    assert after["tokens"] - before["tokens"] == tokens
    assert after["requests"] - before["requests"] == len(sent)
    assert after["model_calls"] - before["model_calls"] == after["batches"] - before["batches"]
    assert after["batches"] - before["batches"] < after["requests"] - before["requests"] + 8  # merged, mostly


def test_rows_of_one_request_with_different_lengths_per_feed_are_refused(client) -> None:
    feeds, _, _ = sequences(1, [3, 2])
    weight = Ragged.from_rows([np.ones(3, np.float32), np.ones(3, np.float32)])
    with pytest.raises(TeacherError, match="feed 'weight' row 1 has length 3, feed 'ids' 2") as info:
        client.predict({"ids": feeds["ids"], "weight": weight}, timeout=TIMEOUT)
    assert info.value.code == "bad_request"
    assert_still_serving(client)


@pytest.mark.parametrize("feeds,match", [
    ({"ids": Ragged(np.zeros((3, 2), np.int64), np.array([1, 2])), "weight": Ragged(np.zeros(3, np.float32),
                                                                                 np.array([1, 2]))},
     r"rows of shape \[n, 2\]"),
    ({"ids": Ragged(np.zeros(3, np.int32), np.array([1, 2])), "weight": Ragged(np.zeros(3, np.float32),
                                                                            np.array([1, 2]))}, "dtype int32"),
    ({"ids": Ragged(np.zeros(3, np.int64), np.array([1, 2])), "weight": np.zeros((3, 2), np.float32)},
     "same number"),
    ({"ids": Ragged(np.zeros(0, np.int64), np.zeros(0, np.int64)),
      "weight": Ragged(np.zeros(0, np.float32), np.zeros(0, np.int64))}, "same number"),
], ids=["inner shape", "dtype", "rows", "no rows"])
def test_malformed_ragged_requests_are_refused_naming_why(client, feeds, match: str) -> None:
    with pytest.raises(TeacherError, match=match) as info:
        client.predict(feeds, timeout=TIMEOUT)
    assert info.value.code == "bad_request"
    assert_still_serving(client)


def test_rows_of_different_lengths_for_a_fixed_shape_feed_are_refused(start_teacher) -> None:
    proc = start_teacher()  # softmax: img [784]
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        img = Ragged(np.zeros((3, 784), np.float32), np.array([1, 2]))
        with pytest.raises(TeacherError, match="a first dimension of -1 would allow them") as info:
            c.predict({"img": img})
        assert info.value.code == "bad_request"
        assert c.predict({"img": np.zeros((2, 784), np.float32)})["prob"].shape == (2, 10)
    finally:
        c.close()


def test_a_request_over_the_token_budget_is_served_in_several_calls_a_row_over_it_refused(client) -> None:
    """--max-batch-tokens 256: 40 rows of up to 200 tokens are cut into calls within the budget
    and answered as one reply; a row of 257 tokens is refused with too_large, naming the flag."""
    before = client.stats()
    lengths = np.random.default_rng(5).integers(1, 201, 40).tolist()
    feeds, ids, weight = sequences(5, lengths)
    assert_rows(client.predict(feeds, timeout=TIMEOUT), ids, weight)
    after = client.stats()
    assert after["model_calls"] - before["model_calls"] >= sum(lengths) / 256
    assert after["requests"] - before["requests"] == 1
    assert after["max_batch_rows"] <= 256  # within the budget: at most 256 rows of 1 token
    feeds, _, _ = sequences(6, [3, 257])
    with pytest.raises(TeacherError, match="row 1 has 257 tokens, more than the teacher's --max-batch-tokens 256"):
        client.predict(feeds, timeout=TIMEOUT)
    assert_still_serving(client)


def test_a_per_token_output_shorter_than_the_longest_row_is_bad_output(start_teacher) -> None:
    proc = start_teacher(f"{procs.TEACHERS}:short_tokens")
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        feeds, _, _ = sequences(7, [4, 3])  # one length bucket: one model call
        with pytest.raises(TeacherError, match="per-token output 'h' has shape \\[2, 1, 4\\]") as info:
            c.predict(feeds)
        assert info.value.code == "bad_output"
        feeds, ids, weight = sequences(8, [1, 1, 0])  # one token at most: what it returns is enough
        assert_rows(c.predict(feeds), ids, weight)
    finally:
        c.close()


def test_a_token_shape_that_differs_between_the_parts_of_a_request_is_bad_output(start_teacher) -> None:
    """A request cut by length runs as several model calls; a per-token output whose token shape
    follows the call's longest row (batch_wide: [-1, -1]) comes back wider from one part than
    from another.  Put back into one answer, the wider rows would be cut to the first part's
    width (or the narrower padded): a row's prediction that is not what the model computed for
    it.  The client gets bad_output instead, and the teacher serves on."""
    proc = start_teacher(f"{procs.TEACHERS}:batch_wide")
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        rows = [np.array([3, 4]), np.arange(10, 26)]  # 2 and 16 tokens: two length buckets, two model calls
        with pytest.raises(TeacherError, match=r"output 'seen' has tokens of shape \[(2|16)\] in one part of "
                                               r"this request and tokens of shape \[(16|2)\] in another") as info:
            c.predict({"ids": Ragged.from_rows(rows)})
        assert info.value.code == "bad_output"
        seen = c.predict({"ids": Ragged.from_rows(rows[1:])})["seen"]  # one part: the model's own answer
        assert seen.lengths.tolist() == [16] and seen.inner_shape == (16,)
        np.testing.assert_array_equal(seen.values, np.broadcast_to(rows[1], (16, 16)))
    finally:
        c.close()


def test_hostile_ragged_frames_get_error_replies_and_the_teacher_stays_up(token_teacher, client) -> None:
    """Hand-made bad ragged entries, then 3000 mutations of valid ragged requests: every message
    is answered (an error for the broken ones), the teacher's memory stays put, it keeps serving."""
    feeds, _, _ = sequences(11, [3, 0, 7])
    valid = [fuzzing.frames_of({"kind": "predict", "id": 1}, feeds),
             fuzzing.frames_of({"kind": "predict", "id": 2}, {"ids": feeds["ids"], "weight": feeds["weight"]})]
    messages = [frames for frames, _ in MALFORMED_RAGGED.values()]
    messages += list(fuzzing.hostile_messages(seed=21, count=3000, valid_examples=valid))
    proc = psutil.Process(token_teacher.pid)
    rss_before = proc.memory_info().rss
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(token_teacher.endpoint)
    kinds: dict[str, int] = {}
    try:
        for i, frames in enumerate(messages):
            sock.send_multipart(frames)
            if i < len(MALFORMED_RAGGED):  # each hand-made one on its own: its reply is a bad_message error
                assert sock.poll(int(TIMEOUT * 1000)), f"no reply to {list(MALFORMED_RAGGED)[i]}"
                reply = wire.decode(sock.recv_multipart()).header
                assert (reply["kind"], reply["code"]) == ("error", "bad_message"), reply
            while sock.poll(0):
                kind = wire.decode(sock.recv_multipart()).kind
                kinds[kind] = kinds.get(kind, 0) + 1
        end = time.monotonic() + 30
        while sum(kinds.values()) < len(messages) - len(MALFORMED_RAGGED) and time.monotonic() < end:
            if sock.poll(100):
                kind = wire.decode(sock.recv_multipart()).kind
                kinds[kind] = kinds.get(kind, 0) + 1
    finally:
        sock.close()
    assert token_teacher.popen.poll() is None, token_teacher.log()
    assert sum(kinds.values()) == len(messages) - len(MALFORMED_RAGGED), kinds
    assert kinds.get("error", 0) > len(messages) // 2
    assert_still_serving(client)
    growth = proc.memory_info().rss - rss_before
    assert growth < 64 * 2**20, f"teacher RSS grew by {growth / 2**20:.1f} MiB"


def test_busy_and_two_instances_answer_every_ragged_request_once(start_teacher) -> None:
    """A slow teacher with two instances, a small queue and a small token budget (requests cut
    into parts): a flood of ragged requests gets, for each request, exactly one reply, either
    every row right or busy; a calm client is let in meanwhile."""
    proc = start_teacher(TOKENS, "--instances", "2", "--max-queue-mb", str(40_000 / 2**20), "--max-batch-tokens",
                         "64", env={"ZDISTILL_TEST_DELAY_MS": "20"})
    flood = zmq.Context.instance().socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.connect(proc.endpoint)
    calm = TeacherClient(proc.endpoint, timeout=TIMEOUT * 3)
    try:
        sent = send_ragged(flood, 60, rows=16, first_seed=100)
        feeds, ids, weight = sequences(999, [30, 2, 17])
        assert_rows(calm.predict(feeds), ids, weight)  # not refused: the flooder's newest parts make room
        replies = raw_replies(flood, len(sent))
        assert set(replies) == set(sent) and all(len(r) == 1 for r in replies.values())
        busy = 0
        for i, (msg,) in replies.items():
            if msg.kind == "error":
                assert msg.header["code"] == "busy", msg.header
                busy += 1
            else:
                assert_rows(msg.arrays, *sent[i])
        assert 0 < busy < len(sent)
        stats = calm.stats()
        assert stats["held_bytes"] == 0 and stats["queued"] == 0  # every part released
        assert len(stats["instance_seconds"]) == 2 and all(s > 0 for s in stats["instance_seconds"])
    finally:
        flood.close()
        calm.close()


def send_ragged(sock: zmq.Socket, n: int, rows: int,
                first_seed: int) -> dict[int, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Send ``n`` predict requests of ``rows`` sequences, 1 to 39 tokens long, with ids 0 to n - 1 (request
    ``i`` drawn from seed ``first_seed + i``); return the ids and weights each request's answer is made of."""
    sent = {}
    for i in range(n):
        lengths = np.random.default_rng(first_seed + i).integers(1, 40, rows).tolist()
        feeds, ids, weight = sequences(first_seed + i, lengths)
        wire.send(sock, {"kind": "predict", "id": i}, feeds)
        sent[i] = (ids, weight)
    return sent


def raw_replies(sock: zmq.Socket, want: int, quiet_s: float = 0.3) -> dict[object, list[wire.Message]]:
    """Replies on ``sock`` by id: until ``want`` came (at most TIMEOUT), then until it is quiet for ``quiet_s``
    (a second reply to any request would come then)."""
    replies: dict[object, list[wire.Message]] = {}
    end = time.monotonic() + TIMEOUT
    while sum(map(len, replies.values())) < want and time.monotonic() < end:
        if sock.poll(100):
            msg = wire.decode(sock.recv_multipart())
            replies.setdefault(msg.header["id"], []).append(msg)
    while sock.poll(int(quiet_s * 1000)):
        msg = wire.decode(sock.recv_multipart())
        replies.setdefault(msg.header["id"], []).append(msg)
    return replies


def test_sigterm_with_requests_cut_into_parts_answers_each_once_and_exits_0(start_teacher) -> None:
    """Requests cut into parts (--max-batch-tokens 64), some running, the rest queued, when SIGTERM
    comes: each request gets exactly one reply, every row right or shutting_down."""
    proc = start_teacher(TOKENS, "--instances", "1", "--max-batch-tokens", "64", env={"ZDISTILL_TEST_DELAY_MS": "50"})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(proc.endpoint)
    try:
        sent = send_ragged(sock, 12, rows=8, first_seed=200)
        assert sock.poll(int(TIMEOUT * 1000)), "no reply to the first requests"  # the model is at work
        proc.popen.send_signal(signal.SIGTERM)
        replies = raw_replies(sock, len(sent))
        assert set(replies) == set(sent) and all(len(r) == 1 for r in replies.values()), replies
        codes = []
        for i, (msg,) in replies.items():
            if msg.kind == "error":
                codes.append(msg.header["code"])
            else:
                assert_rows(msg.arrays, *sent[i])
        assert codes and set(codes) == {"shutting_down"}, codes
        assert proc.popen.wait(TIMEOUT) == 0
    finally:
        sock.close()


def test_a_ragged_request_past_its_deadline_times_out_and_its_late_answer_is_dropped(start_teacher) -> None:
    proc = start_teacher(TOKENS, env={"ZDISTILL_TEST_DELAY_MS": "300"})
    c = TeacherClient(proc.endpoint, timeout=TIMEOUT)
    try:
        feeds, ids, weight = sequences(300, [5, 30, 2])
        with pytest.raises(TeacherTimeout):
            c.predict(feeds, timeout=0.05)
        assert_rows(c.predict(feeds), ids, weight)  # the late answer to the first is not taken for this one
    finally:
        c.close()


class UncheckedTokensModel:
    """A Model that checks nothing and gives every row one token of output, whatever its length:
    the teacher itself must refuse to cut rows by lengths its output cannot hold."""

    feeds = [TensorSpec("ids", "int64", (-1,))]
    fetches = [TensorSpec("h", "float32", (-1,))]
    description = "unchecked tokens"
    device = "cpu"
    thread_safe = True
    model_id = "unchecked-tokens"

    def run(self, feeds: dict[str, np.ndarray], lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return {"h": feeds["ids"][:, :1].astype(np.float32)}

    def clone(self) -> UncheckedTokensModel:
        return self


def test_a_model_that_checks_no_lengths_still_gets_bad_output_never_a_wrong_row() -> None:
    with served_here(UncheckedTokensModel(), TIMEOUT) as (_, c):
        # rows of 3 and 2 tokens fall in two length buckets: two parts, each refused, one reply
        with pytest.raises(TeacherError, match=r"unchecked tokens: per-token output 'h' has shape \[1, 1\], "
                                               r"a length axis shorter than the batch's longest row \([23]\)") as info:
            c.predict({"ids": Ragged.from_rows([np.array([5, 6, 7]), np.array([8, 9])])})
        assert info.value.code == "bad_output"
        got = c.predict({"ids": Ragged.from_rows([np.array([5]), np.array([], np.int64)])})["h"]
        assert got.lengths.tolist() == [1, 0] and got.values.tolist() == [5.0]


def test_a_function_gets_lengths_only_when_it_has_a_lengths_parameter() -> None:
    """``lengths=`` is passed to a function that names it (None without a variable-length feed);
    a function without it gets the padded batch alone; a dense batch means rows of full length."""
    import zdistill
    from zdistill.teacher.model import CallableModel

    seen: list[object] = []

    @zdistill.teacher_function(feeds={"ids": ("int64", [-1])}, fetches={"n": ("int64", [])})
    def counts(batch, lengths):
        seen.append(lengths.tolist())
        assert not lengths.flags.writeable
        return {"n": lengths}

    @zdistill.teacher_function(feeds={"ids": ("int64", [-1])}, fetches={"n": ("int64", [])})
    def no_lengths(batch):
        return {"n": (batch["ids"] != 0).sum(axis=1)}

    @zdistill.teacher_function(feeds={"x": ("float32", [2])}, fetches={"n": ("int64", [])})
    def fixed(batch, lengths=0):
        seen.append(lengths)
        return {"n": np.zeros(len(batch["x"]), np.int64)}

    padded = np.array([[3, 4, 0], [5, 0, 0]])
    lengths = np.array([2, 1])
    lengths.flags.writeable = False
    assert CallableModel(counts, "counts", model_id="a").run({"ids": padded}, lengths)["n"].tolist() == [2, 1]
    assert CallableModel(counts, "counts", model_id="a").run({"ids": padded})["n"].tolist() == [3, 3]
    assert CallableModel(no_lengths, "no_lengths", model_id="b").run({"ids": padded}, lengths)["n"].tolist() == [2, 1]
    CallableModel(fixed, "fixed", model_id="c").run({"x": np.zeros((2, 2), np.float32)})
    assert seen == [[2, 1], [3, 3], None]
