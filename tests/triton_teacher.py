"""A real Triton Inference Server for the tests: PyTriton binding a numpy softmax.

Run by the interpreter of the server-side venv (``ZDISTILL_TRITON_PYTHON``, see
``tests/tritons.py``), never by the project's: PyTriton's Python backend loads the
system's ``libpython3.11``, so only Debian's own ``python3.11`` serves models with it.
It imports nothing of zdistill (that venv has only PyTriton and numpy), so the model
is written out here; ``tests/test_triton.py`` checks its answers against
:func:`tests.teachers.softmax_np`, which computes the same thing.

Binds model ``softmax`` (``img`` float32 [784] -> ``prob`` float32 [10]) with Triton's
dynamic batcher, on the ports given, and serves until SIGTERM or SIGINT.  With
``--version`` the model is served under that version and scaled by it, so two versions
of one model answer differently (what a cache must keep apart); with ``--next-version-file PATH``,
once PATH exists the next version is loaded on the running server (which then serves it alone,
Triton's default version policy) and ``PATH.loaded`` is made.  With ``--hold-file PATH``,
a batch that starts while PATH exists is held unanswered until PATH is gone (120 s at
most), and ``PATH.held`` is made first: the event that says the server holds a request.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
from pytriton.utils.workspace import Workspace

W = np.random.default_rng(1234).standard_normal((784, 10)).astype(np.float32) * 0.05  # tests/teachers.py's
# Model 'dtypes': each of Triton's numeric types zdistill takes that a mix-up would show (a narrower or wider
# reading of the bytes, a wrap-around, a sign), and its outputs declared in another order than its inputs
DTYPE_INPUTS = [("h", "float16", (4,)), ("i8", "int8", (3,)), ("u8", "uint8", (3,)), ("b", "bool", (2,)),
                ("n", "int32", (2,))]
DTYPE_OUTPUTS = [("n64", "int64", (2,)), ("b_not", "bool", (2,)), ("u8_inc", "uint8", (3,)),
                 ("i8_neg", "int8", (3,)), ("h2", "float16", (4,))]


@batch
def dtypes(h: np.ndarray, i8: np.ndarray, u8: np.ndarray, b: np.ndarray, n: np.ndarray) -> dict[str, np.ndarray]:
    """What ``tests/test_triton.py`` computes too: in the inputs' dtypes, wrapping where they wrap."""
    return {"h2": h * np.float16(2), "i8_neg": -i8, "u8_inc": u8 + np.uint8(1), "b_not": ~b,
            "n64": n.astype(np.int64) * 3 + 2**33}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--model", default="softmax")
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=0.0, help="a fixed service time per batch")
    p.add_argument("--queue-delay-us", type=int, default=500, help="the dynamic batcher's max_queue_delay")
    p.add_argument("--hold-file", default=None, help="while this file exists, batches are held unanswered")
    p.add_argument("--workspace", default=None, help="PyTriton's model store and server files (default: temporary)")
    p.add_argument("--next-version-file", default=None, help="once this file exists, the next version is loaded")
    p.add_argument("--dtypes", action="store_true", help="serve model 'dtypes' too (DTYPE_INPUTS, DTYPE_OUTPUTS)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    def softmax(version: int):  # noqa: ANN202 - PyTriton's batched callable
        scale = np.float32(version)

        @batch
        def infer(img: np.ndarray) -> dict[str, np.ndarray]:
            if args.hold_file and os.path.exists(args.hold_file):
                Path(args.hold_file + ".held").touch()
                end = time.monotonic() + 120  # bounded: a test that forgot the file still ends
                while os.path.exists(args.hold_file) and time.monotonic() < end:
                    time.sleep(0.01)
            if args.delay_ms:
                time.sleep(args.delay_ms / 1000)
            z = img.reshape(len(img), -1).astype(np.float32) @ W * scale
            e = np.exp(z - z.max(axis=1, keepdims=True))
            return {"prob": e / e.sum(axis=1, keepdims=True)}

        return infer

    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                          grpc_address="127.0.0.1", http_address="127.0.0.1")
    # No token on the model-control endpoints: the tests unload the model through Triton's own API.
    security = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=config, workspace=args.workspace, security_config=security) as triton:
        def bind(version: int) -> None:
            triton.bind(
                model_name=args.model, model_version=version, infer_func=softmax(version),
                inputs=[Tensor(name="img", dtype=np.float32, shape=(784,))],
                outputs=[Tensor(name="prob", dtype=np.float32, shape=(10,))],
                config=ModelConfig(max_batch_size=args.max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us)),
                strict=True,
            )

        bind(args.version)
        if args.dtypes:
            triton.bind(model_name="dtypes", infer_func=dtypes,
                        inputs=[Tensor(name=n, dtype=np.dtype(t), shape=s) for n, t, s in DTYPE_INPUTS],
                        outputs=[Tensor(name=n, dtype=np.dtype(t), shape=s) for n, t, s in DTYPE_OUTPUTS],
                        config=ModelConfig(max_batch_size=args.max_batch_size), strict=True)
        if args.next_version_file:
            triton.run()
            while triton.is_alive() and not os.path.exists(args.next_version_file):
                time.sleep(0.01)
            # PyTriton names a model's sockets by the model's name alone, in its workspace: the next version
            # binds its own in another one, while the server still serves the first
            workspace, triton._workspace = triton._workspace, Workspace(f"{args.workspace}-next")
            bind(args.version + 1)  # loaded at once: the server is running
            triton._workspace = workspace
            Path(args.next_version_file + ".loaded").touch()
        triton.serve()


if __name__ == "__main__":
    main()
