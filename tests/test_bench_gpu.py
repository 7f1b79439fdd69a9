"""``bench/bench_gpu.py``: its help and flag checks need no PyTorch; its CPU smoke run works end to end.

The smoke run (tiny models on the CPU, skipped without PyTorch) runs the whole script:
real teacher processes serving the example's functions, raw clients, DistillReaders;
it must write every figure, and leave no process behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import psutil
import pytest

from tests import procs

BENCH = procs.REPO / "bench" / "bench_gpu.py"
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['bench_gpu.py', *sys.argv[1:]]; "
                 f"runpy.run_path({str(BENCH)!r}, run_name='__main__')")


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    """The script with ``import torch`` made to fail, as on a machine without PyTorch."""
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], capture_output=True, text=True, timeout=60,
                          cwd=str(procs.REPO))


def test_help_works_without_torch():
    done = run_without_torch("--help")
    assert done.returncode == 0, done.stderr
    for flag in ("--quick", "--cases", "--configs", "--batches", "--size", "--out"):
        assert flag in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--cases", "text,nope"], "unknown ['nope']"),
    (["--configs", "1y2"], "PROCESSESxINSTANCES"),
    (["--configs", "0x1"], "at least 1"),
    (["--batches", "32,512"], "must lie in 1..256"),
])
def test_bad_flags_are_refused_before_torch_is_needed(args, message):
    done = run_without_torch(*args)
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the smoke run needs PyTorch")
def test_cpu_smoke_run_measures_every_figure_and_stops_its_processes(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}  # its teachers' files land here
    done = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--out", str(out)], capture_output=True,
                          text=True, timeout=280, cwd=str(procs.REPO), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DistillReader, batch 256" in done.stdout
    results = json.loads(out.read_text())
    assert results["size"] == "tiny" and "1x1" in results["configs"]
    for name in ("text", "image"):
        case = results["cases"][name]
        assert case["in_process"]["threads1"]["rows_per_s"] > 0
        assert case["in_process"]["plain"]["rows_per_s"] > 0
        for config in results["configs"]:
            served = case["served"][config]
            for key in ("raw", "reader32", "reader64", "reader256"):
                figures = served[key]
                assert figures["rows_per_s"] > 0 and figures["ratio"] > 0, (name, config, key)
                assert 0 < figures["busy"] <= 1.05 * served["instances"] * served["processes"], (name, config, key)
                assert 1 <= figures["rows_per_call"] <= 256
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    for proc in left:  # stopped here by PID, so that a failure leaves nothing behind either
        proc.kill()
    assert not left, f"processes left running: {[p.pid for p in left]}"
