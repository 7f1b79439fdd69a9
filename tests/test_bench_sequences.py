"""``bench/bench_sequences.py``: a short run works end to end, writes every figure, and stops its teachers.

The run is the script itself (real teacher processes, a raw client, DistillReaders whose
first batch it checks against numpy); the test asserts what the figures must be whatever
the machine's speed: every rate measured, the padding the batcher's design promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil

from tests import procs

BENCH = procs.REPO / "bench" / "bench_sequences.py"


def test_short_run_measures_every_figure_and_stops_its_processes(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its teachers' ready files, hence their command lines, land here
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--seconds", "0.2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=str(procs.REPO), env=env)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    for proc in left:  # stopped here by PID, so that a failure leaves nothing behind either
        proc.kill()
    assert not left, f"processes left running: {[p.pid for p in left]}"
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "sequences.json").read_text())
    for teacher in ("seq_pooled", "seq_tokens"):
        s1 = results["s1_reader_vs_raw"][teacher]
        assert s1["reader_tokens_per_s"][0] > 0 and s1["raw_tokens_per_s"][0] > 0
        assert 0 < s1["reader_padding_share"] < 0.25
    padding = results["s2_padding"]
    assert len(padding) == 8
    assert padding["uniform 1..256, 256-row requests"]["padding_share"] < 0.25  # the batcher's promise
    assert padding["all 128, 256-row requests"]["padding_share"] == 0
    s3 = results["s3_ragged_vs_fixed"]
    assert s3["fixed rows to a fixed feed"]["over_fixed"] == 1
    assert s3["sequences l, 256 - l"]["tokens_per_s"][0] > 0
