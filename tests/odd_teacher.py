"""A server that answers ``ping`` and ``meta`` as a teacher does, with whatever ``meta`` it is given.

What a buggy or hostile teacher sends: a real ``zdistill-teacher`` checks its own
model, so it cannot be made to say ``max_batch_size: "lots"``.  The meta is read
from a JSON file at every ``meta`` request, so a test can make it sane later::

    python -m tests.odd_teacher PORT META_JSON READY_FILE

It runs until SIGTERM; it writes READY_FILE once bound, and prints a line for each
``meta`` it answers.  A ``predict`` gets its first feed back under every declared fetch,
rows of different lengths padded to the longest and left so (a teacher that leaves cutting
per-token answers to the client): what a zdistill-teacher never sends.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import zmq

from zdistill import wire
from zdistill.spec import Ragged


def main(port: str, meta_path: str, ready: str) -> int:
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    Path(ready).write_text("ready")
    while not stopping:
        if not sock.poll(50):
            continue
        envelope, *body = sock.recv_multipart()
        msg = wire.decode(body)
        arrays = None
        if msg.kind == "meta":
            reply = {**json.loads(Path(meta_path).read_text()), "kind": "meta"}
            sys.stdout.write("meta asked\n")
            sys.stdout.flush()
        elif msg.kind == "predict":
            first = next(iter(msg.arrays.values()))
            answer = first.padded() if isinstance(first, Ragged) else first
            reply = {"kind": "result"}
            arrays = {f["name"]: answer for f in json.loads(Path(meta_path).read_text())["fetches"]}
        else:
            reply = {"kind": "pong"}
        wire.send(sock, {**reply, "id": msg.header.get("id")}, arrays, envelope=[envelope])
    sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
