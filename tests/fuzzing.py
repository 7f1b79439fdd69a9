"""Hostile messages for fuzzing zdistill daemons: random bytes and mutated valid messages.

:func:`hostile_messages` mixes pure noise with the cases a parser is most likely to
get wrong: wrong frame counts, headers that declare huge or lying sizes, forbidden
dtypes, truncated frames, and valid messages with random bytes flipped.  It is
seeded, so a failure can be replayed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import msgpack
import numpy as np

from zdistill import wire

BAD_DTYPES = ["O", "<U10", "|V8", "f4,i4", "float32", "x", "", "<f4\x00", "M8[ns]", "S5", "|b1" * 40]


def _pack(header: object) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _mutations(rng: random.Random, valid: list[bytes]) -> Iterator[list[bytes]]:
    """One hostile message per call of each generator below, chosen at random."""
    header, *arrays = valid
    decoded = msgpack.unpackb(header, raw=False)
    table = decoded.get("arrays", [])
    kind = decoded.get("kind", "predict")
    choices = [
        lambda: [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))],
        lambda: [header],  # arrays missing
        lambda: [header, *arrays, *arrays],  # extra frames
        lambda: [header] + [b"x"] * rng.randint(60, 80),  # too many frames
        lambda: [_pack({**decoded, "arrays": [[e[0], e[1], [2**40, 784], *e[3:]] for e in table]}), *arrays],
        lambda: [_pack({**decoded, "arrays": [[e[0], rng.choice(BAD_DTYPES), *e[2:]] for e in table]}), *arrays],
        lambda: [header, *(a[: rng.randint(0, max(0, len(a) - 1))] for a in arrays)],  # truncated
        lambda: [_pack({**decoded, "arrays": [[n, d, [s[0] + 1, *s[1:]] if s else [1], *r] for n, d, s, *r in table]}),
                 *arrays],  # lying shape
        lambda: [_pack({**decoded, "arrays": [[n, d, [-1, *s[1:]], *r] for n, d, s, *r in table]}), *arrays],
        lambda: [_pack({**decoded, "arrays": [[n, d, ["a"], *r] for n, d, _, *r in table]}), *arrays],
        # ragged entries: rows lying or hostile, lengths frames lying, a dense entry turned ragged
        lambda: [_pack({**decoded, "arrays": [[n, d, s, rng.choice([2**40, -1, 0, "3", None, 10**9, len(s)])]
                                              for n, d, s, *_ in table]}), *arrays],
        lambda: [header, *(rng.choice([a, _lengths(rng, len(a) // 8)]) for a in arrays)],
        lambda: [header, *(a for a in arrays if rng.random() < 0.7)],  # a lengths frame (or values) missing
        lambda: [_pack({**decoded, "arrays": "nope"}), *arrays],
        lambda: [_pack([1, 2, 3]), *arrays],  # header not a map
        lambda: [_pack({"kind": rng.choice([kind, "x" * 100, 7, None, [], {}]), "id": rng.choice(
            [1, -1, 2**63, "a", [1], {"a": 1}, None, 1.5])}), *arrays],
        lambda: [_pack({**decoded, "arrays": list(table) * 2}), *arrays, *arrays],
        lambda: [_flip(rng, header), *arrays],
        lambda: [header, *(_flip(rng, a) for a in arrays)],  # bad numbers are data, not errors
        lambda: [b"\xdd\xff\xff\xff\xff" + rng.randbytes(8)],  # msgpack array declaring 4 G entries
        lambda: [b"\xc6\x7f\xff\xff\xff" + rng.randbytes(8)],  # bin declaring 2 GB
        lambda: [_pack({"kind": kind, "id": 1, "x": [[[[[[[[1]]]]]]]] * 3}), *arrays],
        lambda: [b""],
    ]
    while True:
        yield rng.choice(choices)()


def _lengths(rng: random.Random, rows: int) -> bytes:
    """A lengths frame of ``rows`` hostile row lengths (negative, huge, or merely not adding up)."""
    pick = [-1, 0, 1, 10**9, 2**62, -(2**63)]
    return np.array([rng.choice(pick) for _ in range(rows)], dtype="<i8").tobytes()


def _flip(rng: random.Random, frame: bytes) -> bytes:
    if not frame:
        return frame
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def hostile_messages(seed: int, count: int, valid_examples: Sequence[list[bytes]]) -> Iterator[list[bytes]]:
    """``count`` hostile messages built from ``valid_examples`` (lists of frames as bytes)."""
    rng = random.Random(seed)
    streams = [_mutations(rng, list(v)) for v in valid_examples]
    for _ in range(count):
        yield next(rng.choice(streams))


def frames_of(header: dict, arrays: dict[str, np.ndarray] | None = None) -> list[bytes]:
    """A valid message as plain bytes frames."""
    frames = wire.encode(header, arrays)
    return [f if isinstance(f, bytes) else np.ascontiguousarray(f).tobytes() for f in frames]
