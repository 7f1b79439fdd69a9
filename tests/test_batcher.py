"""The teacher's batcher as pure bookkeeping: batching rule, fair shares between clients, fair eviction.

The rule is checked on small cases, then on random sequences of adds, takes and evictions
against a reference that scans the whole queue the obvious way, computing every
request's fair-queueing tag from the queue as it stands.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zdistill.errors import ModelOutputError
from zdistill.spec import Ragged
from zdistill.teacher.batcher import BUCKET_RATIO, Batcher, Request, Whole, length_bucket, split_by_length


def req(width: int, rows: int = 1, peer: bytes = b"p", arrived: float = 0.0, req_id: int = 0,
        weight: float = 1.0) -> Request:
    """A request of ``rows`` rows of a variable-size feed ``width`` wide (its shape key)."""
    return Request([peer], req_id, {"x": np.zeros((rows, width), np.float32)}, rows, arrived, weight=weight)


def ids(batch: list[Request] | None) -> list[int]:
    assert batch is not None
    return [r.req_id for r in batch]


def test_batches_start_with_the_oldest_request_and_take_its_shape_in_order() -> None:
    b = Batcher(max_rows=8, max_delay=0.0)
    for i, width in enumerate([1, 2, 1, 3, 2, 1]):
        b.add(req(width, req_id=i))
    assert ids(b.take(0.0)) == [0, 2, 5]
    assert ids(b.take(0.0)) == [1, 4]
    assert ids(b.take(0.0)) == [3]
    assert b.take(0.0) is None and len(b) == 0
    assert (b.stats.batches, b.stats.requests, b.stats.merged_batches, b.stats.max_batch_rows) == (3, 6, 2, 3)


def test_a_batch_stops_at_the_first_request_that_does_not_fit() -> None:
    b = Batcher(max_rows=5, max_delay=0.0)
    for i, rows in enumerate([2, 2, 3, 1]):
        b.add(req(1, rows, req_id=i))
    assert ids(b.take(0.0)) == [0, 1]  # the 1-row request behind the 3-row one waits its turn
    assert ids(b.take(0.0)) == [2, 3]


def test_max_delay_holds_a_partial_batch_until_its_oldest_request_is_due() -> None:
    b = Batcher(max_rows=4, max_delay=1.0)
    b.add(req(1, 2, arrived=10.0, req_id=0))
    assert b.take(10.5) is None
    assert ids(b.take(10.5, force=True)) == [0]
    b.add(req(1, 2, arrived=20.0, req_id=1))
    b.add(req(1, 2, arrived=20.1, req_id=2))
    assert ids(b.take(20.2)) == [1, 2]  # full: no need to wait
    b.add(req(1, 1, arrived=30.0, req_id=3))
    assert ids(b.take(31.0)) == [3]


def test_make_room_takes_the_newest_requests_of_the_peer_holding_the_most() -> None:
    b = Batcher(max_rows=256, max_delay=0.0)
    for i in range(4):
        b.add(req(100, peer=b"flood", req_id=i))  # 400 bytes each
    b.add(req(100, peer=b"calm", req_id=10))
    evicted = b.make_room(b"calm", 400, need=700)
    assert ids(evicted) == [3, 2]  # newest first, until enough is free
    assert len(b) == 3
    # evicted requests are gone from the batches too; calm's request, at the virtual time,
    # goes before flood's second (fair shares)
    assert ids(b.take(0.0)) == [0, 10, 1]


def test_clients_get_equal_rows_per_batch_whatever_each_keeps_queued() -> None:
    b = Batcher(max_rows=6, max_delay=0.0)
    for i in range(20):
        b.add(req(1, peer=b"deep", req_id=i))
    for i in range(20, 22):
        b.add(req(1, peer=b"shallow", req_id=i))
    for i in range(30, 50):
        b.add(req(1, 2, peer=b"wide", req_id=i))  # 2 rows per request: half as many requests per turn
    assert ids(b.take(0.0)) == [0, 20, 30, 1, 21]  # 2 rows each; wide's second would pass 6 rows
    assert ids(b.take(0.0)) == [2, 31, 3, 4]  # deep and wide share what shallow leaves; 32 would pass 6 rows
    rows = {b"deep": 0, b"wide": 0}
    for _ in range(5):
        for r in b.take(0.0) or []:
            rows[r.peer] += r.rows
    assert sum(rows.values()) >= 25 and abs(rows[b"deep"] - rows[b"wide"]) <= 2  # equal within one request


def test_a_client_declaring_weight_2_gets_twice_the_rows() -> None:
    b = Batcher(max_rows=6, max_delay=0.0)
    for i in range(30):
        b.add(req(1, peer=b"one", req_id=i))
        b.add(req(1, peer=b"two", req_id=100 + i, weight=2.0))
    rows = {b"one": 0, b"two": 0}
    for _ in range(5):
        for r in b.take(0.0) or []:
            rows[r.peer] += r.rows
    assert rows == {b"one": 10, b"two": 20}


def test_a_client_that_was_idle_starts_at_the_virtual_time_without_credit() -> None:
    b = Batcher(max_rows=4, max_delay=0.0)
    for i in range(12):
        b.add(req(1, peer=b"busy", req_id=i))
    assert ids(b.take(0.0)) == [0, 1, 2, 3]
    b.add(req(1, peer=b"late", req_id=20))
    b.add(req(1, peer=b"late", req_id=21))
    b.add(req(1, peer=b"late", req_id=22))
    # late starts at the tag of the last request taken (busy's 3), not at 0, which would let
    # it take the whole batch for the rows busy got while late was idle: the two alternate
    assert ids(b.take(0.0)) == [20, 4, 21, 5]


def test_an_evicted_request_does_not_count_against_its_clients_share() -> None:
    b = Batcher(max_rows=4, max_delay=0.0)
    for i in range(4):
        b.add(req(100, peer=b"flood", req_id=i))
    assert ids(b.make_room(b"calm", 400, need=800)) == [3, 2]
    b.add(req(100, peer=b"calm", req_id=10))
    b.add(req(100, peer=b"calm", req_id=11))
    b.add(req(100, peer=b"flood", req_id=4))  # in the place of its evicted request 2
    assert ids(b.take(0.0)) == [0, 10, 1, 11]
    assert ids(b.take(0.0)) == [4]


def test_an_evicted_head_leaves_the_next_oldest_request_first() -> None:
    b = Batcher(max_rows=8, max_delay=0.0)
    b.add(req(1, 5, peer=b"x", req_id=0))  # the head of width 1, and x's only request
    b.add(req(2, 1, peer=b"y", req_id=1))
    b.add(req(1, 1, peer=b"y", req_id=2))
    assert ids(b.make_room(b"z", 4, need=1)) == [0]
    assert ids(b.take(0.0)) == [1]  # now the oldest; width 1 must not keep request 0's place
    assert ids(b.take(0.0)) == [2]


def test_make_room_never_takes_from_a_peer_holding_no_more_than_the_newcomer() -> None:
    b = Batcher(max_rows=256, max_delay=0.0)
    b.add(req(100, peer=b"a", req_id=0))
    b.add(req(100, peer=b"b", req_id=1))
    assert b.make_room(b"b", 400, need=400) == []  # a holds 400, b would hold 800
    assert b.make_room(b"a", 400, need=400) == []  # the newcomer's own requests are never taken
    assert len(b) == 2


def test_close_returns_what_waits_and_wakes_the_instances() -> None:
    b = Batcher(max_rows=4, max_delay=60.0)
    b.add(req(1, req_id=0, arrived=time.monotonic()))  # not due for a minute: the waiter waits
    b.add(req(2, req_id=1, arrived=time.monotonic()))
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(b.next_batch()))
    waiter.start()
    assert ids(b.close()) == [0, 1]
    waiter.join(10)
    assert not waiter.is_alive() and got == [None]
    assert len(b) == 0 and b.take(0.0, force=True) is None


def test_a_burst_wakes_one_instance_and_each_wakes_the_next_while_work_is_left() -> None:
    """wake() after a burst of adds: one waiting instance takes the first batch and, as
    requests are left, wakes another, which takes the second."""
    b = Batcher(max_rows=2, max_delay=0.0)
    got: list[list[int]] = []
    waiters = [threading.Thread(target=lambda: got.append(ids(b.next_batch()))) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for i, width in enumerate([1, 1, 2]):
        b.add(req(width, req_id=i))
    b.wake()
    for waiter in waiters:
        waiter.join(10)
    assert not any(w.is_alive() for w in waiters) and sorted(got) == [[0, 1], [2]]


class Reference:
    """The fair batching rule the obvious way: one list, scanned whole at every step.

    A request's start tag is the larger of the virtual time (the largest tag taken so
    far) and the finish (start + cost / weight) of its peer's previous request, taken or
    not, while the peer has any request queued (an evicted request gives its start
    back); a batch takes
    the requests of the key of the smallest tag, in tag order (ties in arrival order).
    Among peers holding the same bytes, the victim of an eviction is the one that has
    held requests the longest without a break (``order``).
    """

    def __init__(self, max_rows: int, max_delay: float) -> None:
        self.max_rows, self.max_delay = max_rows, max_delay
        self.queue: list[Request] = []
        self.order: list[bytes] = []
        self.tags: dict[int, float] = {}  # by id() of a queued request
        self.finish: dict[bytes, float] = {}  # by peer: its previous request's finish tag
        self.virtual = 0.0

    def add(self, r: Request) -> None:
        if not any(q.peer == r.peer for q in self.queue):
            self.order.append(r.peer)
            self.finish[r.peer] = self.virtual
        self.tags[id(r)] = max(self.virtual, self.finish[r.peer])
        self.finish[r.peer] = self.tags[id(r)] + r.cost / r.weight
        self.queue.append(r)

    def remove(self, gone: list[Request]) -> None:
        self.queue = [r for r in self.queue if r not in gone]
        self.order = [p for p in self.order if any(r.peer == p for r in self.queue)]

    def in_tag_order(self, requests: list[Request]) -> list[Request]:
        return sorted(requests, key=lambda r: (self.tags[id(r)], self.queue.index(r)))

    def take(self, now: float, force: bool) -> list[int] | None:
        if not self.queue:
            return None
        head = self.in_tag_order(self.queue)[0]
        same = self.in_tag_order([r for r in self.queue if r.key == head.key])
        batch, rows = [], 0
        for r in same:
            if rows + r.rows > self.max_rows:
                break
            batch.append(r)
            rows += r.rows
        full = sum(r.rows for r in same) >= self.max_rows
        if not (full or force or now >= min(r.arrived for r in same) + self.max_delay):
            return None
        self.virtual = max(self.virtual, self.tags[id(batch[-1])])
        self.remove(batch)
        return [r.req_id for r in batch]

    def make_room(self, peer: bytes, nbytes: int, need: int) -> list[int]:
        evicted = []
        while need > 0 and self.queue:
            held = {p: sum(r.nbytes for r in self.queue if r.peer == p) for p in self.order}
            victim = max(self.order, key=held.__getitem__)
            if victim == peer or held[victim] <= held.get(peer, 0) + nbytes:
                break
            newest = [r for r in self.queue if r.peer == victim][-1]
            self.finish[victim] = self.tags[id(newest)]
            self.remove([newest])
            evicted.append(newest.req_id)
            need -= newest.nbytes
        return evicted


PEERS = st.sampled_from([b"a", b"b", b"c"])
ADD = st.tuples(st.just("add"), st.integers(1, 4), st.integers(1, 5), PEERS, st.sampled_from([1.0, 1.0, 2.0, 0.5]))
OPS = st.lists(
    st.one_of(ADD, ADD, ADD, st.tuples(st.just("take"), st.booleans()),
              st.tuples(st.just("room"), PEERS, st.integers(1, 100))),
    min_size=10, max_size=120,
)


@settings(max_examples=500, deadline=None)
@given(ops=OPS, max_rows=st.integers(1, 8), delay=st.sampled_from([0.0, 2.5, 50.0]))
def test_the_batcher_forms_the_same_batches_as_the_reference(ops, max_rows: int, delay: float) -> None:
    b, ref = Batcher(max_rows, delay), Reference(max_rows, delay)
    now = 0.0
    for i, op in enumerate(ops):
        now += 1.0
        if op[0] == "add":
            _, width, rows, peer, weight = op
            if rows > max_rows:  # the server refuses those before they reach the batcher
                continue
            r = req(width, rows, peer, arrived=now, req_id=i, weight=weight)
            b.add(r)
            ref.add(r)
        elif op[0] == "take":
            got = b.take(now, force=op[1])
            assert (None if got is None else ids(got)) == ref.take(now, op[1])
        else:
            _, peer, need = op
            assert ids(b.make_room(peer, 4, need)) == ref.make_room(peer, 4, need)
        assert len(b) == len(ref.queue)
    while (got := b.take(now, force=True)) is not None:
        assert ids(got) == ref.take(now, True)
    assert ref.queue == []


# -- rows of different lengths ---------------------------------------------------------------------


def ragged_parts(lengths: list[int] | np.ndarray, max_rows: int = 256, max_tokens: int = 32768,
                 req_id: int = 0, peer: bytes = b"p") -> list[Request]:
    """A request of token rows of ``lengths`` (row i holds the value i), cut into parts by the rule."""
    lengths = np.asarray(lengths, np.int64)
    values = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    return split_by_length([peer], req_id, {"ids": Ragged(values, lengths)}, lengths, 0.0, max_rows, max_tokens)


def test_length_buckets_hold_lengths_within_the_ratio() -> None:
    for length in range(2, 5000):
        b = length_bucket(length)
        assert BUCKET_RATIO ** (b - 1) < length <= BUCKET_RATIO**b * (1 + 1e-12), length
    assert length_bucket(0) == length_bucket(1) == 0


@pytest.mark.parametrize("rows_per_request", [1, 16, 64])
def test_padding_stays_under_a_quarter_for_lengths_spread_over_1_to_256(rows_per_request: int) -> None:
    """Lengths spread evenly over 1..256, in requests of 1 to 64 rows: the batches the batcher forms
    compute fewer than 25% padding tokens, and never more than max_tokens nor max_rows."""
    rng = np.random.default_rng(rows_per_request)
    b = Batcher(max_rows=256, max_delay=0.0, max_tokens=16384)
    for i in range(4096 // rows_per_request):
        for part in ragged_parts(rng.integers(1, 257, rows_per_request), 256, 16384, req_id=i):
            b.add(part)
    rows = 0
    while (batch := b.take(0.0, force=True)) is not None:
        batch_rows = sum(r.rows for r in batch)
        assert batch_rows <= 256 and batch_rows * max(r.longest for r in batch) <= 16384
        rows += batch_rows
    s = b.stats
    assert rows == s.rows == 4096 and s.requests == 4096 // rows_per_request
    assert s.padding_tokens / (s.tokens + s.padding_tokens) < 0.25, (s.tokens, s.padding_tokens)
    assert s.batches < 4096 / 8  # and rows do get merged


def test_a_request_within_one_bucket_and_the_bounds_stays_whole_and_uncopied() -> None:
    feeds = {"ids": Ragged(np.arange(30, dtype=np.int64), np.array([10, 9, 11]))}
    parts = split_by_length([b"p"], 7, feeds, feeds["ids"].lengths, 0.0, 8, 100)
    assert len(parts) == 1 and parts[0].whole is None and parts[0].feeds is feeds and parts[0].longest == 11


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=40), max_rows=st.integers(1, 12),
       max_tokens=st.integers(40, 200))
def test_parts_keep_within_the_bounds_and_come_back_in_the_clients_order(lengths: list[int], max_rows: int,
                                                                         max_tokens: int) -> None:
    parts = ragged_parts(lengths, max_rows, max_tokens)
    seen = np.concatenate([p.index if p.index is not None else np.arange(len(lengths)) for p in parts])
    assert sorted(seen.tolist()) == list(range(len(lengths)))  # every row in exactly one part
    for part in parts:
        assert part.rows <= max_rows and part.rows * part.longest <= max_tokens
        assert len({length_bucket(int(n)) for n in part.lengths}) == 1
        rows_of = part.index if part.index is not None else np.arange(len(lengths))
        for i, row, n in zip(rows_of.tolist(), part.feeds["ids"].rows(), part.lengths.tolist(), strict=True):
            assert len(row) == n == lengths[i] and (row == i).all()  # the row's own values, whole
    if parts[0].whole is None:
        return
    # answers per part (row i answers i, as its tokens and as a dense value), back in the client's order
    whole, merged = parts[0].whole, None
    for part in reversed(parts):
        ids_of_rows = part.index
        outputs = {"tok": Ragged(np.repeat(ids_of_rows, part.lengths), part.lengths), "row": ids_of_rows * 10}
        merged = whole.add(part.index, outputs)
    assert merged is not None
    assert merged["row"].tolist() == [10 * i for i in range(len(lengths))]
    assert merged["tok"].lengths.tolist() == lengths
    assert merged["tok"].values.tolist() == np.repeat(np.arange(len(lengths)), lengths).tolist()


def test_a_batch_never_passes_max_tokens_and_takes_parts_of_one_bucket_only() -> None:
    b = Batcher(max_rows=100, max_delay=0.0, max_tokens=64)
    for i, lengths in enumerate([[8] * 4, [8] * 4, [8] * 4, [30], [3, 4], [8]]):
        for part in ragged_parts(lengths, 100, 64, req_id=i):
            b.add(part)
    assert ids(b.take(0.0)) == [0, 1]  # 8 rows of 8 = 64; the third request would pass 64
    assert ids(b.take(0.0)) == [2, 5]  # the oldest left, and the other request of its bucket
    assert ids(b.take(0.0)) == [3]
    assert ids(b.take(0.0)) == [4]  # 3 and 4 share a bucket: one part
    assert b.take(0.0, force=True) is None


def test_a_whole_answers_in_client_order_whatever_order_its_parts_finish() -> None:
    whole = Whole(rows=3, parts=2)
    assert whole.add(np.array([1]), {"y": np.array([[1.0]])}) is None
    got = whole.add(np.array([0, 2]), {"y": np.array([[0.0], [2.0]])})
    assert got is not None and got["y"].ravel().tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("first, second", [
    (np.arange(12.0).reshape(2, 2, 3), np.full((1, 2, 1), 9.0)),  # numpy would broadcast the 9s over 3 columns
    (Ragged(np.arange(6.0).reshape(3, 2), np.array([1, 2])), Ragged(np.full((2, 3), 7.0), np.array([2]))),  # cut to 2
])
def test_a_whole_whose_parts_answer_rows_of_different_shapes_raises(first, second) -> None:
    """Parts run in separate model calls; an output whose row (or token) shape follows the call
    differs between them, and no one array holds both without changing a row's values."""
    whole = Whole(rows=3, parts=2)
    assert whole.add(np.array([0, 2]), {"y": first}) is None
    shown = r"(rows of shape \[2, 3\]|tokens of shape \[2\])"
    with pytest.raises(ModelOutputError, match=rf"output 'y' has {shown} in one part of this request"):
        whole.add(np.array([1]), {"y": second})
